// The client's reconnect and outbox rules against a scripted relay (a fake transport), for
// what the real relay cannot be made to do on cue: 429 with Retry-After, refusals only a
// browser cannot see, a handler that fails, jitter bounds.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  Close,
  MemoryStore,
  RelayClient,
  SendRejectedError,
  decodeBase64,
  encodeBase64,
  type ConnectionEvents,
  type Events,
  type RelayClientOptions,
  type ServerFrame,
  type Transport,
} from '../src/index.js';
import { sleep, until } from './relay.js';

class FakeConnection {
  readonly sent: Array<Record<string, unknown>> = [];
  closedWith: number | undefined;
  constructor(
    readonly token: string,
    private readonly events: ConnectionEvents,
  ) {}
  send(text: string) {
    this.sent.push(JSON.parse(text) as Record<string, unknown>);
  }
  close(code: number) {
    if (this.closedWith !== undefined) return;
    this.closedWith = code;
    setTimeout(() => this.events.closed(code), 1);
  }
  open() {
    this.events.open();
  }
  hello() {
    this.events.open();
    this.frame({ type: 'hello', v: 1, user: 'u', device: 'd', idle_timeout_s: 7200, max_body_bytes: 100, max_recipients: 5 });
  }
  frame(frame: ServerFrame) {
    this.events.message(JSON.stringify(frame));
  }
  refuse(status: number, error?: string, retryAfterMs?: number) {
    this.events.refused(status, error, retryAfterMs);
  }
  drop(code: number) {
    this.closedWith = code;
    this.events.closed(code);
  }
  sentOf(type: string) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** A relay scripted per connection attempt: `script(connection, attempt)`. */
function fake(script: (c: FakeConnection, attempt: number) => void) {
  const connections: FakeConnection[] = [];
  const at: number[] = [];
  const transport: Transport = (_url, token, events) => {
    const c = new FakeConnection(token, events);
    connections.push(c);
    at.push(Date.now());
    const attempt = connections.length - 1;
    setTimeout(() => script(c, attempt), 1);
    return c;
  };
  return { transport, connections, at };
}

function client(transport: Transport, options: Partial<RelayClientOptions> = {}) {
  let n = 0;
  const c = new RelayClient({
    url: 'ws://relay.invalid/v1/ws',
    token: async () => `token-${n++}`,
    transport,
    backoff: { baseMs: 10, maxMs: 80 },
    ...options,
  });
  const events: Array<{ event: keyof Events; value: unknown }> = [];
  for (const event of ['connected', 'disconnected', 'stopped', 'accountLocked', 'loggedOut', 'error'] as const) {
    c.on(event, (value) => {
      events.push({ event, value });
    });
  }
  const stopped = () => (events.find((e) => e.event === 'stopped')?.value as Events['stopped'] | undefined)?.reason;
  return { c, events, stopped };
}

const deliver = (seq: number, id = `00000000-0000-4000-8000-${String(seq).padStart(12, '0')}`): ServerFrame => ({
  type: 'deliver',
  id,
  seq,
  ts: 1,
  from: { user: 'x', device: 'y' },
  body: encodeBase64(new TextEncoder().encode(`m${seq}`)),
  urgent: false,
});

test('a 429 is retried after its Retry-After, not the backoff; every connect gets a fresh token', async () => {
  const relay = fake((c, attempt) => (attempt === 0 ? c.refuse(429, 'too_many_failed_logins', 300) : c.hello()));
  const { c } = client(relay.transport, { backoff: { baseMs: 60_000, maxMs: 60_000 } });
  c.onMessage(() => {});
  await c.start();
  await until(() => relay.connections.length === 2, 3000);
  const waited = relay.at[1]! - relay.at[0]!;
  assert.ok(waited >= 290 && waited < 2000, `waited ${waited} ms`);
  assert.deepEqual(
    relay.connections.map((x) => x.token),
    ['token-0', 'token-1'],
  );
  c.close();
});

test('backoff is full jitter under the cap, and resets after a hello', async () => {
  const relay = fake((c, attempt) => (attempt < 8 ? c.drop(1006) : c.hello()));
  const { c, events } = client(relay.transport, { backoff: { baseMs: 10, maxMs: 80 } });
  c.onMessage(() => {});
  await c.start();
  await until(() => events.some((e) => e.event === 'connected'), 5000);
  const delays = events
    .filter((e) => e.event === 'disconnected')
    .map((e) => (e.value as Events['disconnected']).reconnectInMs!);
  assert.equal(delays.length, 8);
  delays.forEach((d, k) => assert.ok(d >= 0 && d <= Math.min(80, 10 * 2 ** k), `delay ${k}: ${d}`));
  assert.ok(new Set(delays).size > 1, 'jittered');
  relay.connections.at(-1)!.drop(1006);
  await until(() => events.filter((e) => e.event === 'disconnected').length === 9);
  const afterHello = (events.filter((e) => e.event === 'disconnected').at(-1)!.value as Events['disconnected']).reconnectInMs!;
  assert.ok(afterHello <= 10, `the first retry after a session is short: ${afterHello}`);
  c.close();
});

for (const [what, act, reason] of [
  ['displaced (4002)', (x: FakeConnection) => x.drop(Close.DISPLACED), 'displaced'],
  ['401 revoked', (x: FakeConnection) => x.refuse(401, 'revoked'), 'revoked'],
  ['403 account_locked', (x: FakeConnection) => x.refuse(403, 'account_locked'), 'locked'],
  ['403 origin_not_allowed', (x: FakeConnection) => x.refuse(403, 'origin_not_allowed'), 'refused'],
  ['idle logoff (4001)', (x: FakeConnection) => {
    x.hello();
    x.frame({ type: 'session_expired', idle_timeout_s: 7200 });
    x.drop(Close.SESSION_EXPIRED);
  }, 'idle_logoff'],
] as const) {
  test(`no reconnect after ${what}`, async () => {
    const relay = fake((x) => act(x));
    const { c, stopped, events } = client(relay.transport);
    c.onMessage(() => {});
    const pending = c.send(['v'], 'kept').catch((e: unknown) => e);
    await c.start();
    await until(() => stopped() !== undefined);
    assert.equal(stopped(), reason);
    assert.equal(((await pending) as Error).name, 'ClientStoppedError');
    await sleep(200);
    assert.equal(relay.connections.length, 1);
    if (reason === 'revoked') assert.ok(events.some((e) => e.event === 'loggedOut'), 'the app wipes');
    if (reason === 'locked') assert.ok(events.some((e) => e.event === 'accountLocked'));
  });
}

test('a restart (1012) reconnects within the restart delay and resends the unanswered sends', async () => {
  const relay = fake((x) => x.hello());
  const { c } = client(relay.transport, { restartDelayMs: 100, backoff: { baseMs: 60_000, maxMs: 60_000 } });
  c.onMessage(() => {});
  await c.start();
  await until(() => relay.connections.length === 1 && relay.connections[0]!.sent.length === 0);
  const send = c.send(['v'], 'hi');
  await until(() => relay.connections[0]!.sentOf('send').length === 1);
  const id = relay.connections[0]!.sentOf('send')[0]!.id as string;
  relay.connections[0]!.drop(Close.RESTART);
  await until(() => relay.connections.length === 2 && relay.connections[1]!.sentOf('send').length === 1, 2000);
  assert.equal(relay.connections[1]!.sentOf('send')[0]!.id, id, 'the same id');
  relay.connections[1]!.frame({ type: 'accepted', id, seq: 7, ts: 1, duplicate: true });
  assert.deepEqual(await send, { id, seq: 7, ts: 1, duplicate: true });
  c.close();
});

test('a message is acked only after its handler resolved; a failing handler gets it again', async () => {
  let calls = 0;
  const relay = fake((x) => {
    x.hello();
    x.frame(deliver(1));
    x.frame(deliver(2));
    x.frame({ type: 'synced', seq: 2 });
  });
  const { c } = client(relay.transport);
  const handled: string[] = [];
  c.onMessage(async (m) => {
    calls++;
    if (calls === 2) throw new Error('disk full');
    await sleep(30);
    handled.push(new TextDecoder().decode(m.body));
  });
  await c.start();
  await until(() => relay.connections.length === 2 && handled.length === 2, 3000);
  const first = relay.connections[0]!;
  assert.equal(first.closedWith, 4000, 'the failed connection was given up');
  assert.deepEqual(first.sentOf('ack'), [{ type: 'ack', seqs: [1] }], 'only the handled message was acked');
  await until(() => relay.connections[1]!.sentOf('ack').length > 0);
  assert.deepEqual(relay.connections[1]!.sentOf('ack'), [{ type: 'ack', seqs: [1, 2] }], 'a redelivery is acked, not handled');
  assert.deepEqual(handled, ['m1', 'm2']);
  c.close();
});

test('the outbox survives the client: a new one on the same store sends it under the same ids', async () => {
  const store = new MemoryStore();
  const down = fake((x) => x.drop(1006));
  const first = client(down.transport, { store, backoff: { baseMs: 60_000, maxMs: 60_000 } });
  first.c.onMessage(() => {});
  const sends = [first.c.send(['v'], 'a'), first.c.send(['v'], 'b')];
  await first.c.start();
  await sleep(20);
  first.c.close();
  await Promise.allSettled(sends);
  const kept = (await store.outbox()).map((e) => e.id);
  assert.equal(kept.length, 2);

  const up = fake((x) => x.hello());
  const second = client(up.transport, { store });
  const sent: string[] = [];
  second.c.on('sent', (a) => {
    sent.push(a.id);
  });
  second.c.onMessage(() => {});
  await second.c.start();
  await until(() => up.connections[0]?.sentOf('send').length === 2);
  assert.deepEqual(
    up.connections[0]!.sentOf('send').map((f) => f.id),
    kept,
  );
  for (const [i, id] of kept.entries()) up.connections[0]!.frame({ type: 'accepted', id, seq: i + 1, ts: 1, duplicate: false });
  await until(() => sent.length === 2);
  assert.deepEqual(await store.outbox(), []);
  second.c.close();
});

test('a retryable refusal is resent with the same id; a permanent one rejects with its code', async () => {
  const relay = fake((x) => x.hello());
  const { c } = client(relay.transport);
  c.onMessage(() => {});
  await c.start();
  await until(() => relay.connections.length === 1);
  const retried = c.send(['v'], 'again');
  const refused = c.send(['v'], 'never', { urgent: true });
  const conn = relay.connections[0]!;
  await until(() => conn.sentOf('send').length === 2);
  const [a, b] = conn.sentOf('send').map((f) => f.id as string);
  assert.equal(conn.sentOf('send')[1]!.urgent, true);
  conn.frame({ type: 'rejected', id: a!, code: 'rate_limited', retry: true });
  conn.frame({ type: 'rejected', id: b!, code: 'urgent_not_allowed', retry: false });
  await assert.rejects(refused, (e: unknown) => e instanceof SendRejectedError && e.code === 'urgent_not_allowed');
  await until(() => conn.sentOf('send').length === 3, 2000);
  assert.equal(conn.sentOf('send')[2]!.id, a);
  conn.frame({ type: 'accepted', id: a!, seq: 1, ts: 1, duplicate: false });
  assert.equal((await retried).seq, 1);
  // Known limits are checked before anything is queued.
  await assert.rejects(c.send(['v'], new Uint8Array(101)), { code: 'too_large' });
  await assert.rejects(c.send([], 'x'), { code: 'bad_recipients' });
  assert.equal(c.pending().length, 0);
  c.close();
});

test('a logout wipe that outlasts the connection is confirmed on the next one', async () => {
  const signal = '11111111-2222-4333-8444-555555555555';
  const relay = fake((x) => {
    x.open();
    x.frame({ type: 'logout', reason: 'password_changed', signal });
  });
  const { c, stopped } = client(relay.transport);
  let wipes = 0;
  c.on('loggedOut', async () => {
    wipes++;
    if (wipes === 1) {
      relay.connections[0]!.drop(Close.LOGGED_OUT); // the relay stopped waiting for the ack
      await sleep(50);
    }
  });
  c.onMessage(() => {});
  await c.start();
  await until(() => relay.connections[1]?.sentOf('logout_ack').length === 1, 3000);
  assert.deepEqual(relay.connections[0]!.sentOf('logout_ack'), []);
  relay.connections[1]!.drop(Close.LOGGED_OUT);
  await until(() => stopped() !== undefined);
  assert.equal(stopped(), 'logged_out');
  assert.equal(relay.connections.length, 2);
});

test('a send repeated under its id settles both callers; push registration goes out on every connection', async () => {
  const relay = fake((x) => x.hello());
  const { c } = client(relay.transport);
  c.onMessage(() => {});
  const registered = c.registerPush('apns', 'ab12', { environment: 'sandbox', appId: 'org.example.app' });
  await c.start();
  await until(() => relay.connections[0]?.sentOf('push_token').length === 1);
  relay.connections[0]!.frame({ type: 'push_token_saved', registered: true });
  await registered;
  const id = '5f0c2d6e-8a51-4c1e-9c55-0d7d2c1a9b01';
  const first = c.send(['v'], 'x', { id });
  const second = c.send(['v'], 'x', { id });
  await until(() => relay.connections[0]!.sentOf('send').length === 1);
  await sleep(20);
  assert.equal(relay.connections[0]!.sentOf('send').length, 1, 'one outbox entry');
  relay.connections[0]!.frame({ type: 'accepted', id, seq: 3, ts: 1, duplicate: false });
  assert.equal((await first).seq, 3);
  assert.equal((await second).seq, 3);
  relay.connections[0]!.drop(1006);
  await until(() => relay.connections[1]?.sentOf('push_token').length === 1, 2000);
  assert.deepEqual(relay.connections[1]!.sentOf('push_token')[0], {
    type: 'push_token',
    platform: 'apns',
    token: 'ab12',
    environment: 'sandbox',
    app_id: 'org.example.app',
  });
  c.close();
});

test('base64 matches the platform encoder for every length and byte', () => {
  for (let n = 0; n < 300; n++) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 37 + n) & 255);
    const b64 = Buffer.from(bytes).toString('base64');
    assert.equal(encodeBase64(bytes), b64);
    assert.deepEqual(decodeBase64(b64), bytes);
  }
  assert.throws(() => decodeBase64('abc'));
  assert.throws(() => decodeBase64('ab=c'));
  assert.throws(() => decodeBase64('a*bc'));
});
