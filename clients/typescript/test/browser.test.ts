// The library in headless Chromium (Debian's `chromium`, driven by puppeteer-core), through the
// example chat page (example/index.html, served by example/serve.mjs): the page connects with
// the subprotocol token, two tabs chat, the page rides out a relay restart, and its outbox
// survives a reload in IndexedDB.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';
import { after, before, test } from 'node:test';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { RelayClient, nodeTransport, type Message } from '../src/node.js';
import { RELAY_BIN, Relay, freePort, sleep, until } from './relay.js';

const PACKAGE = resolve(import.meta.dirname, '..', '..');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// Polled on a timer: a background tab gets no animation frames, puppeteer's default.
const POLL = { polling: 50, timeout: 15_000 };

let relay: Relay;
let server: ChildProcess;
let browser: Browser;
let base: string;

before(async () => {
  relay = await Relay.start();
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  server = spawn('node', [resolve(PACKAGE, 'example', 'serve.mjs')], {
    env: { ...relay.environment(), PORT: String(port), RELAY_URL: relay.url, RELAY_BIN },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${base}/config.json`)).ok) break;
    } catch {
      if (i > 200) throw new Error('example server did not start');
      await sleep(25);
    }
  }
  browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  server?.kill();
  await relay?.dispose();
});

async function open(me: string, peer: string): Promise<Page> {
  const page = await browser.newPage();
  page.on('pageerror', (error) => console.error(`page ${me}:`, error));
  await page.goto(`${base}/?me=${me}&peer=${peer}`);
  await waitForStatus(page, 'connected');
  return page;
}

function waitForStatus(page: Page, status: string) {
  return page.waitForFunction((s) => document.getElementById('status')?.textContent === s, POLL, status);
}

async function say(page: Page, text: string) {
  await page.bringToFront(); // input goes to the focused tab only
  await page.type('#text', text);
  await page.click('form button');
}

const received = (page: Page) => page.evaluate(() => [...(window as unknown as { chat: { received: string[] } }).chat.received]);
const pending = (page: Page) =>
  page.evaluate(() => (window as unknown as { chat: { client: { pending(): unknown[] } } }).chat.client.pending().length);

/** A Node app on the other end. */
async function nodeApp(user: string) {
  const got: string[] = [];
  const client = new RelayClient({
    url: relay.url,
    token: relay.provider(user, 'phone').token,
    transport: nodeTransport(),
    backoff: { baseMs: 50, maxMs: 400 },
    restartDelayMs: 100,
  });
  client.onMessage((m: Message) => {
    got.push(new TextDecoder().decode(m.body));
  });
  let synced = false;
  client.on('synced', () => {
    synced = true;
  });
  await client.start();
  await until(() => synced);
  return { client, got };
}

test('two tabs of the example page chat through the relay, authenticated by subprotocol', async () => {
  const alice = await open('br-alice', 'br-bob');
  const bob = await open('br-bob', 'br-alice');
  await say(alice, 'hello bob');
  await bob.waitForFunction(() => document.getElementById('log')!.textContent!.includes('br-alice: hello bob'), POLL);
  await say(bob, 'hi alice');
  await alice.waitForFunction(() => document.getElementById('log')!.textContent!.includes('br-bob: hi alice'), POLL);
  assert.deepEqual(await received(alice), ['hi alice']);
  // Nothing left pending once accepted.
  await alice.waitForFunction(() => document.querySelectorAll('.pending').length === 0, POLL);
  await alice.close();
  await bob.close();
});

test('a page rides out a relay restart and keeps its outbox across a reload (IndexedDB)', async () => {
  const nurse = await nodeApp('br-nurse');
  const page = await open('br-doctor', 'br-nurse');
  await say(page, 'before the restart');
  await until(() => nurse.got.length === 1);

  await relay.stop('SIGTERM');
  await page.waitForFunction(() => document.getElementById('status')!.textContent!.startsWith('disconnected'), POLL);
  for (const text of ['one', 'two', 'three']) await say(page, text);
  // Each send is in IndexedDB before it counts as pending.
  await page.waitForFunction(
    () => (window as unknown as { chat: { client: { pending(): unknown[] } } }).chat.client.pending().length === 3,
    POLL,
  );

  await page.reload();
  await page.waitForFunction(
    () => (window as unknown as { chat?: { client: { pending(): unknown[] } } }).chat?.client.pending().length === 3,
    POLL,
  ); // the outbox came back from IndexedDB
  assert.equal(await page.$$eval('.pending', (p) => p.length), 3);

  await relay.run();
  await waitForStatus(page, 'connected');
  await until(() => nurse.got.length === 4, 15_000, 'the outbox delivered');
  assert.deepEqual(nurse.got, ['before the restart', 'one', 'two', 'three']);
  await page.waitForFunction(() => document.querySelectorAll('.pending').length === 0, POLL);
  assert.equal(await pending(page), 0);

  await nurse.client.send(['br-doctor'], 'after the restart');
  await page.waitForFunction(() => document.getElementById('log')!.textContent!.includes('br-nurse: after the restart'), POLL);
  await sleep(200);
  assert.deepEqual(nurse.got.length, 4, 'nothing was sent twice');
  nurse.client.close();
  await page.close();
});
