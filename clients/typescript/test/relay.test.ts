// The library on Node against the real relay binary (embedded store).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import {
  MemoryStore,
  RelayClient,
  nodeTransport,
  type ClientStore,
  type Events,
  type Message,
  type RelayClientOptions,
} from '../src/node.js';
import { Relay, sleep, until } from './relay.js';

const text = (m: Message) => new TextDecoder().decode(m.body);

/** An app: a client with a handler that keeps what it got, and a record of its events. */
function app(relay: Relay, user: string, device: string, options: Partial<RelayClientOptions> = {}) {
  const provider = relay.provider(user, device);
  const client = new RelayClient({
    url: relay.url,
    token: provider.token,
    transport: nodeTransport(),
    backoff: { baseMs: 50, maxMs: 400 },
    restartDelayMs: 100,
    ...options,
  });
  const got: Message[] = [];
  const events: Array<{ event: keyof Events; value: unknown }> = [];
  client.onMessage((m) => {
    got.push(m);
  });
  for (const event of ['connected', 'synced', 'disconnected', 'idleLogoff', 'accountLocked', 'stopped'] as const) {
    client.on(event, (value) => {
      events.push({ event, value });
    });
  }
  const count = (event: keyof Events) => events.filter((e) => e.event === event).length;
  return {
    client,
    got,
    events,
    count,
    tokens: provider.calls,
    synced: () => until(() => count('synced') > 0, 10_000, `${user}/${device} synced`),
    stoppedWith: () => (events.find((e) => e.event === 'stopped')?.value as Events['stopped'] | undefined)?.reason,
  };
}

async function started(...apps: Array<ReturnType<typeof app>>) {
  for (const a of apps) await a.client.start();
  for (const a of apps) await a.synced();
}

describe('against the relay', () => {
  let relay: Relay;
  before(async () => {
    relay = await Relay.start({
      // The 2,000-message test sends faster than a device's default 50/s.
      RELAY_LIMITS__SEND_RATE_PER_S: '100000',
      RELAY_LIMITS__SEND_BURST: '100000',
    });
  });
  after(() => relay.dispose());

  test('two apps exchange messages both ways', async () => {
    const alice = app(relay, 'ts-alice', 'phone');
    const bob = app(relay, 'ts-bob', 'laptop');
    await started(alice, bob);
    const accepted = await alice.client.send(['ts-bob'], 'hello from the library');
    assert.equal(accepted.duplicate, false);
    await until(() => bob.got.length === 1);
    assert.equal(bob.got[0]!.seq, accepted.seq);
    assert.equal(bob.got[0]!.id, accepted.id);
    assert.deepEqual(bob.got[0]!.from, { user: 'ts-alice', device: 'phone' });
    assert.equal(text(bob.got[0]!), 'hello from the library');
    await bob.client.send(['ts-alice'], new Uint8Array([0, 1, 2, 254, 255]));
    await until(() => alice.got.length === 1);
    assert.deepEqual([...alice.got[0]!.body], [0, 1, 2, 254, 255]);
    alice.client.close();
    bob.client.close();
  });

  test("every device of the recipient gets it, and the sender's other devices", async () => {
    const phone = app(relay, 'ts-carol', 'phone');
    const laptop = app(relay, 'ts-carol', 'laptop');
    const dave = app(relay, 'ts-dave', 'phone');
    await started(phone, laptop, dave);
    await dave.client.send(['ts-carol'], 'to both of carol');
    await until(() => phone.got.length === 1 && laptop.got.length === 1);
    await phone.client.send(['ts-dave'], 'from carol');
    await until(() => dave.got.length === 1 && laptop.got.length === 2);
    assert.equal(text(laptop.got[1]!), 'from carol');
    assert.equal(phone.got.length, 1, 'the sending device does not get its own message');
    for (const a of [phone, laptop, dave]) a.client.close();
  });

  test('an offline device drains its inbox in order, and is synced after handling it', async () => {
    const erin = app(relay, 'ts-erin', 'phone');
    await started(erin); // the relay knows the device from now on
    erin.client.close();
    const frank = app(relay, 'ts-frank', 'phone');
    await started(frank);
    for (let i = 0; i < 50; i++) await frank.client.send(['ts-erin'], `m${i}`);
    const later = app(relay, 'ts-erin', 'phone');
    let handledAtSynced = -1;
    later.client.on('synced', () => {
      handledAtSynced = later.got.length;
    });
    await started(later);
    assert.equal(handledAtSynced, 50);
    assert.deepEqual(
      later.got.map(text),
      Array.from({ length: 50 }, (_, i) => `m${i}`),
    );
    later.client.close();
    // Acknowledged: a new session gets nothing again.
    const again = app(relay, 'ts-erin', 'phone');
    await started(again);
    await sleep(200);
    assert.equal(again.got.length, 0);
    again.client.close();
    frank.client.close();
  });

  test('a resend is a duplicate; a message delivered twice reaches the app once, across reconnects', async () => {
    const gina = app(relay, 'ts-gina', 'phone');
    const hugo = app(relay, 'ts-hugo', 'phone');
    const store = new MemoryStore();
    const ivan = app(relay, 'ts-ivan', 'phone', { store });
    await started(gina, hugo, ivan);

    const id = randomUUID();
    const first = await gina.client.send(['ts-ivan'], 'once', { id });
    const again = await gina.client.send(['ts-ivan'], 'once', { id });
    assert.equal(again.duplicate, true);
    assert.equal(again.seq, first.seq);

    // Another sender using the same id is a different message to the relay: the device gets it
    // twice, and the library drops the second delivery, also after a reconnect with its store.
    await until(() => ivan.got.length === 1);
    ivan.client.close();
    const ivan2 = app(relay, 'ts-ivan', 'phone', { store });
    await started(ivan2);
    await hugo.client.send(['ts-ivan'], 'same id, another sender', { id });
    await hugo.client.send(['ts-ivan'], 'a new one');
    await until(() => ivan2.got.length === 1);
    assert.equal(text(ivan2.got[0]!), 'a new one');
    assert.deepEqual((await store.seen()).slice(-2), [id, ivan2.got[0]!.id]);
    for (const a of [gina, hugo, ivan2]) a.client.close();
  });

  test('the outbox goes out after the relay restarts (SIGTERM)', async () => {
    const jane = app(relay, 'ts-jane', 'phone');
    const kurt = app(relay, 'ts-kurt', 'phone');
    await started(jane, kurt);
    await relay.stop('SIGTERM');
    await until(() => jane.count('disconnected') > 0);
    const sends = Array.from({ length: 20 }, (_, i) => jane.client.send(['ts-kurt'], `while down ${i}`));
    await sleep(300);
    assert.equal(jane.client.pending().length, 20);
    await relay.run();
    const accepted = await Promise.all(sends);
    assert.equal(new Set(accepted.map((a) => a.seq)).size, 20);
    await until(() => kurt.got.length === 20);
    assert.deepEqual(
      kurt.got.map(text),
      Array.from({ length: 20 }, (_, i) => `while down ${i}`),
    );
    jane.client.close();
    kurt.client.close();
  });

  test('2,000 messages each way while the relay is killed twice: each exactly once, in order, every send resolved', async () => {
    const n = 2000;
    const ana = app(relay, 'ts-ana', 'phone');
    const ben = app(relay, 'ts-ben', 'phone');
    await started(ana, ben);
    const sendAll = (from: ReturnType<typeof app>, to: string) =>
      Array.from({ length: n }, (_, i) => from.client.send([to], `${i}`));
    const sends = [...sendAll(ana, 'ts-ben'), ...sendAll(ben, 'ts-ana')];
    let resolved = 0;
    for (const s of sends) void s.then(() => resolved++);

    for (const mark of [0.3, 0.65]) {
      await until(() => ben.got.length >= n * mark, 60_000, `${mark * 100}% delivered`);
      await relay.stop('SIGKILL');
      await relay.run();
    }
    const accepted = await Promise.all(sends);
    assert.equal(resolved, 2 * n);
    await until(() => ana.got.length >= n && ben.got.length >= n, 60_000, 'every message delivered');
    await sleep(300); // a duplicate would arrive now
    for (const [who, got] of [
      ['ben', ben.got],
      ['ana', ana.got],
    ] as const) {
      assert.equal(got.length, n, `${who} got each message once`);
      assert.deepEqual(
        got.map(text),
        Array.from({ length: n }, (_, i) => `${i}`),
        `${who} got them in the order they were sent`,
      );
    }
    assert.ok(ana.count('disconnected') >= 2 && ben.count('disconnected') >= 2, 'both were cut off twice');
    assert.equal(new Set(accepted.map((a) => a.id)).size, 2 * n);
    ana.client.close();
    ben.client.close();
  });

  test('remote logout: the app wipes, the library confirms, and never reconnects', async () => {
    const store: ClientStore = new MemoryStore();
    const lena = app(relay, 'ts-lena', 'phone', { store });
    const wiped: Array<Events['loggedOut']> = [];
    lena.client.on('loggedOut', async (event) => {
      await sleep(100); // an app's wipe takes a while
      wiped.push(event);
    });
    await started(lena);
    await store.addSeen(randomUUID());
    const oldToken = relay.token('ts-lena', 'phone');
    const { status } = await relay.admin('POST', '/v1/devices/phone/logout', { user: 'ts-lena', reason: 'lost_device' });
    assert.equal(status, 200);
    await until(() => lena.stoppedWith() !== undefined);
    assert.equal(lena.stoppedWith(), 'logged_out');
    assert.equal(wiped.length, 1);
    assert.equal(wiped[0]!.reason, 'lost_device');
    assert.deepEqual(await store.seen(), [], 'the library wiped its own store');
    // The relay refuses the old credentials only once the device confirmed: logout_ack went out.
    assert.equal(await relay.upgradeStatus(oldToken), 401);
    const tokens = lena.tokens();
    await sleep(1000);
    assert.equal(lena.tokens(), tokens, 'no reconnect after a logout');
  });

  test('a lock signs the device out for good', async () => {
    const mona = app(relay, 'ts-mona', 'phone');
    const reasons: string[] = [];
    mona.client.on('loggedOut', (event) => {
      reasons.push(event.reason);
    });
    await started(mona);
    assert.equal((await relay.admin('POST', '/v1/users/ts-mona/lock', { reason: 'left the practice' })).status, 200);
    await until(() => mona.stoppedWith() !== undefined);
    assert.equal(mona.stoppedWith(), 'locked');
    assert.equal(mona.count('accountLocked'), 1);
    assert.deepEqual(reasons, ['locked']);
    const tokens = mona.tokens();
    await sleep(1000);
    assert.equal(mona.tokens(), tokens, 'no reconnect after a lock');
  });
});

describe('against a relay with a 3 s inactivity logoff', () => {
  let relay: Relay;
  before(async () => {
    relay = await Relay.start({ RELAY_SESSION__IDLE_TIMEOUT: '3s' });
  });
  after(() => relay.dispose());

  test('an idle session is logged off and not reconnected; userActive keeps one alive', async () => {
    const idle = app(relay, 'ts-nina', 'phone');
    const busy = app(relay, 'ts-otto', 'phone', { activeIntervalMs: 500 });
    await started(idle, busy);
    const keepBusy = setInterval(() => busy.client.userActive(), 200);
    try {
      await until(() => idle.stoppedWith() !== undefined, 8000);
      assert.equal(idle.stoppedWith(), 'idle_logoff');
      assert.equal(idle.count('idleLogoff'), 1);
      await sleep(1500);
      assert.equal(idle.tokens(), 1, 'no reconnect after an inactivity logoff');
      assert.equal(busy.stoppedWith(), undefined);
      assert.equal(busy.count('disconnected'), 0, 'the active user stayed connected');
    } finally {
      clearInterval(keepBusy);
      busy.client.close();
    }
  });
});
