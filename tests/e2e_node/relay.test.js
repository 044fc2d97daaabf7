// End-to-end tests of the relay binary with the Node `ws` client, written from PROTOCOL.md.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import WebSocket from 'ws';

const ROOT = resolve(import.meta.dirname, '..', '..');
const RELAY_BIN = process.env.RELAY_BIN || join(ROOT, 'target', 'debug', 'relay');

function freePort() {
  return new Promise((res, rej) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
    srv.on('error', rej);
  });
}

let relay, env, url;

before(async () => {
  assert.ok(existsSync(RELAY_BIN), `${RELAY_BIN} missing: run cargo build -p relay (scripts/test does)`);
  const port = await freePort();
  const adminPort = await freePort();
  env = {
    ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('RELAY_'))),
    RELAY_LISTEN: `127.0.0.1:${port}`,
    RELAY_ADMIN_LISTEN: `127.0.0.1:${adminPort}`,
    RELAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'relay-node-')),
    RELAY_LOG_LEVEL: 'warn',
  };
  url = `ws://127.0.0.1:${port}/v1/ws`;
  relay = spawn(RELAY_BIN, [], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  for (let i = 0; i < 200; i++) {
    try {
      const r = await fetch(`http://127.0.0.1:${port}/readyz`);
      if (r.status === 200) return;
    } catch { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('relay did not become ready');
});

after(() => relay?.kill('SIGTERM'));

const token = (user, device) =>
  execFileSync(RELAY_BIN, ['token', '--user', user, '--device', device], { env }).toString().trim();

/** A device: a socket plus a queue of parsed frames. */
async function device(user, dev, { subprotocol = false } = {}) {
  const tok = token(user, dev);
  const ws = subprotocol
    ? new WebSocket(url, ['relay.v1', `bearer.${tok}`], { origin: 'http://localhost:3000' })
    : new WebSocket(url, { headers: { Authorization: `Bearer ${tok}` } });
  const frames = [];
  const waiters = [];
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    const w = waiters.shift();
    if (w) w(frame); else frames.push(frame);
  });
  await new Promise((res, rej) => { ws.once('open', res); ws.once('error', rej); });
  const next = (ms = 5000) => frames.length ? Promise.resolve(frames.shift()) : new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error('timeout waiting for a frame')), ms);
    waiters.push((f) => { clearTimeout(t); res(f); });
  });
  const d = {
    ws, next,
    async sync() {
      assert.equal((await next()).type, 'hello');
      const out = [];
      for (;;) {
        const f = await next();
        if (f.type === 'synced') return out;
        assert.equal(f.type, 'deliver');
        out.push(f);
      }
    },
    async send(to, text) {
      const id = randomUUID();
      ws.send(JSON.stringify({ type: 'send', id, to, body: Buffer.from(text).toString('base64') }));
      const reply = await next();
      assert.equal(reply.type, 'accepted');
      assert.equal(reply.id, id);
      return reply;
    },
    close: () => new Promise((res) => { ws.once('close', res); ws.close(); }),
  };
  return d;
}

test('two devices exchange messages both ways', async () => {
  const alice = await device('n-alice', 'phone');
  const bob = await device('n-bob', 'laptop');
  await alice.sync();
  await bob.sync();
  const acc = await alice.send(['n-bob'], 'hello from node');
  const got = await bob.next();
  assert.equal(got.type, 'deliver');
  assert.equal(got.seq, acc.seq);
  assert.equal(Buffer.from(got.body, 'base64').toString(), 'hello from node');
  assert.deepEqual(got.from, { user: 'n-alice', device: 'phone' });
  await bob.send(['n-alice'], 'and back');
  assert.equal(Buffer.from((await alice.next()).body, 'base64').toString(), 'and back');
  await alice.close();
  await bob.close();
});

test('browser-style subprotocol token is answered with relay.v1 only', async () => {
  const carol = await device('n-carol', 'browser', { subprotocol: true });
  assert.equal(carol.ws.protocol, 'relay.v1');
  const hello = await carol.next();
  assert.equal(hello.type, 'hello');
  assert.equal(hello.device, 'browser');
  await carol.close();
});

function upgradeStatus(headers, protocols) {
  return new Promise((res) => {
    const ws = new WebSocket(url, protocols, { headers });
    ws.on('unexpected-response', (_req, resp) => { res(resp.statusCode); ws.terminate(); });
    ws.on('open', () => { res(101); ws.close(); });
    ws.on('error', () => {});
  });
}

test('refused before the upgrade: no token, bad token, foreign origin', async () => {
  assert.equal(await upgradeStatus({}), 401);
  assert.equal(await upgradeStatus({ Authorization: 'Bearer nope' }), 401);
  const tok = token('n-dave', 'phone');
  assert.equal(await upgradeStatus({ Authorization: `Bearer ${tok}`, Origin: 'https://evil.example' }), 403);
  assert.equal(await upgradeStatus({ Authorization: `Bearer ${tok}` }), 101);
});

test('unacknowledged messages come back after reconnect, acknowledged ones do not', async () => {
  let erin = await device('n-erin', 'phone');
  await erin.sync();
  const frank = await device('n-frank', 'phone');
  await frank.sync();
  const a = await frank.send(['n-erin'], 'ack me');
  const b = await frank.send(['n-erin'], 'leave me');
  assert.equal((await erin.next()).seq, a.seq);
  assert.equal((await erin.next()).seq, b.seq);
  erin.ws.send(JSON.stringify({ type: 'ack', seqs: [a.seq] }));
  await new Promise((r) => setTimeout(r, 200));
  await erin.close();
  erin = await device('n-erin', 'phone');
  const replay = await erin.sync();
  assert.deepEqual(replay.map((f) => f.seq), [b.seq]);
  await erin.close();
  await frank.close();
});
