// The relay client: one live connection per device, reconnected with full-jitter backoff; an
// outbox resent under the same ids until `accepted`; delivered messages handed to the app one at
// a time, in order, acknowledged only after the app's handler resolved, and deduplicated by id
// across reconnects; the close codes and the remote logout obeyed as PROTOCOL.md says.

import { decodeBase64, encodeBase64 } from './base64.js';
import { ClientStoppedError, SendRejectedError, type StopReason } from './errors.js';
import {
  Close,
  parseServerFrame,
  type ClientFrame,
  type LogoutReason,
  type Platform,
  type PushEnvironment,
  type ServerFrameOf,
} from './frames.js';
import { MemoryStore, type ClientStore, type OutboxEntry } from './store.js';
import { webSocketTransport, type Connection, type Transport } from './transport.js';

export interface RelayClientOptions {
  /** `wss://relay.example.org/v1/ws` */
  url: string;
  /** Gives a fresh token for every connection (the relay refuses expired and revoked ones). */
  token: () => Promise<string>;
  /** Outbox and seen ids; `MemoryStore` by default, `IndexedDbStore` in browsers. */
  store?: ClientStore;
  /** The global `WebSocket` by default; `nodeTransport()` from `./node` on Node. */
  transport?: Transport;
  /** Reconnect backoff: full jitter, `random(0, min(maxMs, baseMs · 2^attempt))`. */
  backoff?: { baseMs?: number; maxMs?: number };
  /** After a 1012 (relay restarting), reconnect after a random delay up to this. Default 5 s. */
  restartDelayMs?: number;
  /** A send unanswered this long makes the client reconnect (and resend). Default 30 s. */
  acceptTimeoutMs?: number;
  /** Sends awaiting `accepted` at once. Default 32 (the relay reads up to 64). */
  maxInFlight?: number;
  /** `active` frames go out at most this often. Default 60 s. */
  activeIntervalMs?: number;
  /** Message ids; `crypto.randomUUID` where it exists. */
  newId?: () => string;
}

/** A message delivered to this device. */
export interface Message {
  id: string;
  seq: number;
  /** Accept time, milliseconds since the Unix epoch. */
  ts: number;
  from: { user: string; device: string };
  /** The sender's (encrypted) bytes. */
  body: Uint8Array;
  urgent: boolean;
}

export interface Accepted {
  id: string;
  seq: number;
  ts: number;
  /** The relay had accepted this id before (a resend after a reconnect). */
  duplicate: boolean;
}

export interface SendOptions {
  urgent?: boolean;
  /** Reuse an id to make a retry of your own idempotent; a fresh UUID by default. */
  id?: string;
}

export interface Events {
  connected: { user: string; device: string; idleTimeoutS: number; maxBodyBytes: number; maxRecipients: number };
  /** The stored inbox was replayed and handled; live messages follow. */
  synced: { seq: number };
  disconnected: { code: number; reconnectInMs: number | undefined };
  /** Remote logout: wipe the device's data in the listener; the library then wipes its own
   * store and confirms with `logout_ack`. `signal` is absent when the relay already refuses
   * these credentials (`revoked`). */
  loggedOut: { reason: LogoutReason | 'revoked'; signal: string | undefined };
  accountLocked: Record<string, never>;
  /** No user activity for the idle timeout: authenticate the user again before `start()`. */
  idleLogoff: { idleTimeoutS: number };
  /** Every accepted send, including ones restored from a persistent outbox after a restart. */
  sent: Accepted;
  sendFailed: { id: string; error: SendRejectedError };
  /** The client will not reconnect by itself. */
  stopped: { reason: StopReason };
  /** Something went wrong that the client recovers from (it says how in the message). */
  error: Error;
}

type Listener<E extends keyof Events> = (event: Events[E]) => void | Promise<void>;

interface Waiter {
  resolve(accepted: Accepted): void;
  reject(error: Error): void;
}

interface Live {
  generation: number;
  connection: Connection;
  /** `hello` arrived: frames may be sent. */
  ready: boolean;
  inFlight: Map<string, number>;
  acks: number[];
  /** Deliveries received and not handled yet. */
  queued: number;
  openedAt: number;
  /** A handler failed: the rest of this connection's deliveries are left to the next one. */
  poisoned: boolean;
}

const DEFAULT_MAX_BODY = 262_144;
const DEFAULT_MAX_RECIPIENTS = 100;
const ACK_BATCH = 256;

export class RelayClient {
  private readonly store: ClientStore;
  private readonly transport: Transport;
  private readonly listeners = new Map<keyof Events, Set<Listener<keyof Events>>>();
  private handler: ((message: Message) => void | Promise<void>) | undefined;

  private loaded: Promise<void> | undefined;
  private outbox: OutboxEntry[] = [];
  private lastOrder = 0;
  /** Callers waiting for each outbox entry (a send repeated with the same id waits too). */
  private readonly waiters = new Map<string, Waiter[]>();
  private seen = new Set<string>();

  private live: Live | undefined;
  private generation = 0;
  private attempt = 0;
  private running = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private watchdog: ReturnType<typeof setInterval> | undefined;
  private holdUntil = 0;
  private holdTimer: ReturnType<typeof setTimeout> | undefined;
  private deliveries: Promise<void> = Promise.resolve();

  private maxBody = DEFAULT_MAX_BODY;
  private maxRecipients = DEFAULT_MAX_RECIPIENTS;
  private idleTimeoutS = 7200;
  private push: Extract<ClientFrame, { type: 'push_token' }> | { type: 'push_token_remove' } | undefined;
  private readonly pushWaiters: Array<{ resolve(): void; reject(error: Error): void }> = [];
  private activePending = false;
  private lastActive = -Infinity;
  private activeTimer: ReturnType<typeof setTimeout> | undefined;
  /** A logout being wiped, and whether its `logout_ack` went out. */
  private logout: { done: Promise<boolean>; acked: boolean } | undefined;
  private logoutStopReason: StopReason | undefined;

  constructor(private readonly options: RelayClientOptions) {
    this.store = options.store ?? new MemoryStore();
    this.transport = options.transport ?? webSocketTransport();
  }

  /** Listens to an event; returns the function that stops listening. A `loggedOut` listener
   * may return a promise: the logout is confirmed once every one has resolved. */
  on<E extends keyof Events>(event: E, listener: Listener<E>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener as Listener<keyof Events>);
    return () => set.delete(listener as Listener<keyof Events>);
  }

  /** Where delivered messages go, one at a time and in order. A message is acknowledged (and
   * leaves the relay) only after the handler's promise resolves: store it before resolving.
   * If the handler throws, the client reconnects and the message comes again. */
  onMessage(handler: (message: Message) => void | Promise<void>): void {
    this.handler = handler;
  }

  /** Connects, and keeps connecting until `close()` or a logout. */
  async start(): Promise<void> {
    if (!this.handler) throw new Error('call onMessage before start: messages are acknowledged by the handler');
    if (this.running) return;
    this.running = true;
    this.logout = undefined;
    await this.load();
    if (this.running) this.connect();
  }

  /** Stops for good: closes the connection, rejects waiting sends with `ClientStoppedError`
   * (they stay in the outbox and go out on the next `start()`). */
  close(): void {
    this.stop('closed');
  }

  /** Sends `body` to every device of the users in `to` (and the sender's other devices).
   * Resolves when the relay stored it; rejects with `SendRejectedError` when it refuses it
   * for good. Until then it stays in the outbox, resent with the same id after reconnects. */
  async send(to: string[], body: Uint8Array | string, options: SendOptions = {}): Promise<Accepted> {
    const bytes = typeof body === 'string' ? new TextEncoder().encode(body) : body;
    const id = options.id ?? this.newId();
    if (to.length === 0 || to.length > this.maxRecipients) throw new SendRejectedError(id, 'bad_recipients');
    if (bytes.length > this.maxBody) throw new SendRejectedError(id, 'too_large');
    await this.load();
    const entry: OutboxEntry = {
      id,
      to: [...to],
      body: encodeBase64(bytes),
      urgent: options.urgent ?? false,
      order: this.nextOrder(),
    };
    const accepted = new Promise<Accepted>((resolve, reject) =>
      this.waiters.set(id, [...(this.waiters.get(id) ?? []), { resolve, reject }]),
    );
    if (!this.outbox.some((e) => e.id === id)) {
      await this.store.putOutbox(entry);
      this.outbox.push(entry);
    }
    this.pump();
    return accepted;
  }

  /** The user did something in the app: resets the relay's inactivity logoff (sent at most
   * once per `activeIntervalMs`). */
  userActive(): void {
    this.activePending = true;
    this.flushActive();
  }

  /** Registers this device's push token (again after every connect); resolves once stored. */
  registerPush(
    platform: Platform,
    token: string,
    options: { environment: PushEnvironment; appId: string },
  ): Promise<void> {
    this.push = { type: 'push_token', platform, token, environment: options.environment, app_id: options.appId };
    return this.sendPush();
  }

  /** Stops pushes to this device. */
  unregisterPush(): Promise<void> {
    this.push = { type: 'push_token_remove' };
    return this.sendPush();
  }

  /** Sends not yet accepted, oldest first. */
  pending(): readonly OutboxEntry[] {
    return this.outbox;
  }

  // ---- connection lifecycle ----

  private connect(): void {
    this.reconnectTimer = undefined;
    if (!this.running) return;
    const generation = ++this.generation;
    this.options.token().then(
      (token) => {
        if (this.running && generation === this.generation) this.open(generation, token);
      },
      (error: unknown) => {
        this.emit('error', wrap('the token provider failed; trying again', error));
        this.reconnect(this.backoff());
      },
    );
  }

  private open(generation: number, token: string): void {
    let connection: Connection;
    try {
      connection = this.transport(this.options.url, token, {
        open: () => {},
        message: (text) => {
          if (this.live?.generation === generation) this.onFrame(this.live, text);
        },
        refused: (status, error, retryAfterMs) => {
          if (this.live?.generation === generation) this.onRefused(status, error, retryAfterMs);
        },
        closed: (code) => {
          if (this.live?.generation === generation) void this.onClosed(code);
        },
      });
    } catch (error) {
      this.emit('error', wrap('could not open a connection; trying again', error));
      this.reconnect(this.backoff());
      return;
    }
    this.live = {
      generation,
      connection,
      ready: false,
      inFlight: new Map(),
      acks: [],
      queued: 0,
      openedAt: Date.now(),
      poisoned: false,
    };
    this.startWatchdog();
  }

  private onRefused(status: number, error: string | undefined, retryAfterMs: number | undefined): void {
    this.live = undefined;
    if (status === 401 && error === 'revoked') {
      void this.wipe({ reason: 'revoked', signal: undefined }).then(() => this.stop('revoked'));
    } else if (status === 403 && error === 'account_locked') {
      this.emit('accountLocked', {});
      this.stop('locked');
    } else if (status === 403) {
      this.emit('error', new Error(`the relay refuses this client: ${error ?? status}`));
      this.stop('refused');
    } else {
      const delay = status === 429 && retryAfterMs !== undefined ? retryAfterMs : this.backoff();
      this.emit('disconnected', { code: status, reconnectInMs: delay });
      this.reconnect(delay);
    }
  }

  private async onClosed(code: number): Promise<void> {
    const live = this.live;
    this.live = undefined;
    this.stopWatchdog();
    if (live) this.failInFlight(live);
    if (this.logout) {
      // The relay closes 4006 after `logout_ack`, or after waiting for it in vain.
      const acked = await this.logout.done;
      if (acked) return this.stop(this.logoutStopReason ?? 'logged_out');
      this.emit('disconnected', { code, reconnectInMs: this.backoff() });
      return this.reconnect(this.backoff());
    }
    let delay: number | undefined;
    switch (code) {
      case Close.SESSION_EXPIRED:
        this.emit('idleLogoff', { idleTimeoutS: this.idleTimeoutS });
        return this.stop('idle_logoff');
      case Close.DISPLACED:
        return this.stop('displaced');
      case Close.RESTART:
        delay = Math.random() * (this.options.restartDelayMs ?? 5000);
        break;
      default:
        delay = this.backoff();
    }
    this.emit('disconnected', { code, reconnectInMs: delay });
    this.reconnect(delay);
  }

  private reconnect(delayMs: number): void {
    if (!this.running || this.reconnectTimer) return;
    this.attempt++;
    this.reconnectTimer = setTimeout(() => this.connect(), delayMs);
  }

  private backoff(): number {
    const base = this.options.backoff?.baseMs ?? 500;
    const max = this.options.backoff?.maxMs ?? 30_000;
    return Math.random() * Math.min(max, base * 2 ** Math.min(this.attempt, 30));
  }

  private stop(reason: StopReason): void {
    const wasRunning = this.running;
    this.running = false;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.holdTimer);
    clearTimeout(this.activeTimer);
    this.reconnectTimer = undefined;
    this.stopWatchdog();
    const live = this.live;
    this.live = undefined;
    live?.connection.close(Close.NORMAL);
    this.rejectWaiters(new ClientStoppedError(reason));
    for (const waiter of this.pushWaiters.splice(0)) waiter.reject(new ClientStoppedError(reason));
    if (wasRunning) this.emit('stopped', { reason });
  }

  // ---- frames ----

  private onFrame(live: Live, text: string): void {
    const frame = parseServerFrame(text);
    if (!frame) return; // a frame type from a later v1: ignored, as PROTOCOL.md asks
    switch (frame.type) {
      case 'hello':
        return this.onHello(live, frame);
      case 'deliver':
        return this.onDeliver(live, frame);
      case 'synced':
        return this.afterDeliveries(live, () => this.emit('synced', { seq: frame.seq }));
      case 'accepted':
        return this.settle(live, frame.id, () => this.accept(frame));
      case 'rejected':
        if (frame.retry) return this.retryLater(live, frame.id);
        return this.settle(live, frame.id, () => this.refuse(frame.id, frame.code));
      case 'error':
        if (frame.id === undefined) {
          // The frames this library sends unasked are well formed; a push registration the
          // relay could not use or store is the one that can be refused.
          this.pushWaiters.shift()?.reject(new Error(`the relay refused the push registration: ${frame.code}`));
          this.emit('error', new Error(`the relay answered a frame with ${frame.code}: ${frame.message}`));
        } else if (frame.code === 'unavailable') {
          this.retryLater(live, frame.id);
        } else {
          const id = frame.id;
          this.settle(live, id, () => this.refuse(id, frame.code));
        }
        return;
      case 'session_expired':
        this.idleTimeoutS = frame.idle_timeout_s;
        return;
      case 'logout':
        return this.onLogout(live, frame);
      case 'push_token_saved':
        this.pushWaiters.shift()?.resolve();
        return;
    }
  }

  private onHello(live: Live, hello: ServerFrameOf<'hello'>): void {
    live.ready = true;
    this.attempt = 0;
    this.maxBody = hello.max_body_bytes;
    this.maxRecipients = hello.max_recipients;
    this.idleTimeoutS = hello.idle_timeout_s;
    this.emit('connected', {
      user: hello.user,
      device: hello.device,
      idleTimeoutS: hello.idle_timeout_s,
      maxBodyBytes: hello.max_body_bytes,
      maxRecipients: hello.max_recipients,
    });
    // Registered again on every connection; the reply settles the oldest waiting registerPush.
    if (this.push) this.write(live, this.push);
    this.flushActive();
    this.pump();
  }

  private onDeliver(live: Live, frame: ServerFrameOf<'deliver'>): void {
    this.afterDeliveries(live, async () => {
      if (!this.seen.has(frame.id)) {
        const message: Message = {
          id: frame.id,
          seq: frame.seq,
          ts: frame.ts,
          from: frame.from,
          body: decodeBase64(frame.body),
          urgent: frame.urgent,
        };
        await this.handler!(message);
        this.seen.add(frame.id);
        await this.store.addSeen(frame.id);
      }
      live.acks.push(frame.seq);
    });
  }

  /** Runs `task` after every delivery received before it was handled, in order. */
  private afterDeliveries(live: Live, task: () => void | Promise<void>): void {
    live.queued++;
    this.deliveries = this.deliveries.then(async () => {
      live.queued--;
      if (live.poisoned || this.live !== live) return;
      try {
        await task();
      } catch (error) {
        live.poisoned = true;
        this.flushAcks(live);
        this.emit('error', wrap('the message handler failed; the message comes again after a reconnect', error));
        live.connection.close(4000);
        return;
      }
      // Acks go out in batches while a burst is being handled, at once when it is done.
      if (live.queued === 0 || live.acks.length >= ACK_BATCH) this.flushAcks(live);
    });
  }

  private flushAcks(live: Live): void {
    if (live.acks.length === 0 || this.live !== live) return;
    const seqs = live.acks.splice(0, 1024);
    this.write(live, { type: 'ack', seqs });
  }

  // ---- the outbox ----

  private pump(): void {
    const live = this.live;
    if (!live?.ready || this.logout || Date.now() < this.holdUntil) return;
    const limit = this.options.maxInFlight ?? 32;
    for (const entry of this.outbox) {
      if (live.inFlight.size >= limit) break;
      if (live.inFlight.has(entry.id)) continue;
      live.inFlight.set(entry.id, Date.now());
      const urgent = entry.urgent ? { urgent: true } : {};
      this.write(live, { type: 'send', id: entry.id, to: entry.to, body: entry.body, ...urgent });
    }
  }

  /** Ends an outbox entry: `outcome` runs once it left the store. */
  private settle(live: Live, id: string, outcome: () => void): void {
    live.inFlight.delete(id);
    const index = this.outbox.findIndex((e) => e.id === id);
    if (index < 0) return; // answered before (a resend's reply)
    this.outbox.splice(index, 1);
    this.store.deleteOutbox(id).then(outcome, (error: unknown) => {
      this.emit('error', wrap('the store could not forget a settled send', error));
      outcome();
    });
    this.pump();
  }

  private accept(frame: ServerFrameOf<'accepted'>): void {
    const accepted: Accepted = { id: frame.id, seq: frame.seq, ts: frame.ts, duplicate: frame.duplicate };
    for (const waiter of this.waiters.get(frame.id) ?? []) waiter.resolve(accepted);
    this.waiters.delete(frame.id);
    this.emit('sent', accepted);
  }

  private refuse(id: string, code: SendRejectedError['code']): void {
    const error = new SendRejectedError(id, code);
    for (const waiter of this.waiters.get(id) ?? []) waiter.reject(error);
    this.waiters.delete(id);
    this.emit('sendFailed', { id, error });
  }

  /** A refusal worth retrying (`rate_limited`, `unavailable`, `shutting_down`): hold every send
   * for a backoff, then resend from the oldest. */
  private retryLater(live: Live, id: string): void {
    live.inFlight.delete(id);
    const delay = this.backoff();
    this.attempt++;
    this.holdUntil = Date.now() + delay;
    clearTimeout(this.holdTimer);
    this.holdTimer = setTimeout(() => {
      this.holdUntil = 0; // timers may fire a little before Date.now() reaches the mark
      this.pump();
    }, delay);
  }

  private failInFlight(live: Live): void {
    live.inFlight.clear();
  }

  /** Reconnects when the relay leaves a send unanswered for `acceptTimeoutMs`. */
  private startWatchdog(): void {
    this.stopWatchdog();
    const timeout = this.options.acceptTimeoutMs ?? 30_000;
    this.watchdog = setInterval(
      () => {
        const live = this.live;
        if (!live) return;
        const now = Date.now();
        if (!live.ready && now - live.openedAt > timeout) {
          this.emit('error', new Error('the relay did not greet this connection; reconnecting'));
          live.connection.close(4000);
          return;
        }
        for (const sentAt of live.inFlight.values()) {
          if (now - sentAt > timeout) {
            this.emit('error', new Error('a send went unanswered; reconnecting to resend it'));
            live.connection.close(4000);
            return;
          }
        }
      },
      Math.min(1000, timeout),
    );
  }

  private stopWatchdog(): void {
    clearInterval(this.watchdog);
    this.watchdog = undefined;
  }

  // ---- remote logout ----

  private onLogout(live: Live, frame: ServerFrameOf<'logout'>): void {
    const state = { done: Promise.resolve(false), acked: false };
    this.logout = state;
    this.logoutStopReason = frame.reason === 'locked' ? 'locked' : 'logged_out';
    state.done = this.wipe({ reason: frame.reason, signal: frame.signal }).then(
      () => {
        if (frame.reason === 'locked') this.emit('accountLocked', {});
        if (this.live !== live) return false; // closed before the wipe ended: confirm on the next connection
        this.write(live, { type: 'logout_ack', signal: frame.signal });
        state.acked = true;
        return true;
      },
      (error: unknown) => {
        this.emit('error', wrap('the logout wipe failed; it runs again at the next connection', error));
        return false;
      },
    );
  }

  /** The app's wipe (the `loggedOut` listeners), then the library's own. */
  private async wipe(event: Events['loggedOut']): Promise<void> {
    const listeners = [...(this.listeners.get('loggedOut') ?? [])] as Listener<'loggedOut'>[];
    await Promise.all(listeners.map((listener) => listener(event)));
    await this.store.clear();
    this.outbox = [];
    this.seen.clear();
    this.rejectWaiters(new ClientStoppedError('logged_out'));
  }

  private rejectWaiters(error: Error): void {
    const all = [...this.waiters.values()].flat();
    this.waiters.clear();
    for (const waiter of all) waiter.reject(error);
  }

  // ---- small frames ----

  private sendPush(): Promise<void> {
    const live = this.live;
    const frame = this.push;
    if (!frame) return Promise.resolve();
    const saved = new Promise<void>((resolve, reject) => this.pushWaiters.push({ resolve, reject }));
    if (live?.ready) this.write(live, frame);
    return saved;
  }

  private flushActive(): void {
    const live = this.live;
    if (!this.activePending || !live?.ready || this.activeTimer) return;
    const interval = this.options.activeIntervalMs ?? 60_000;
    const wait = this.lastActive + interval - Date.now();
    if (wait > 0) {
      this.activeTimer = setTimeout(() => {
        this.activeTimer = undefined;
        this.flushActive();
      }, wait);
      return;
    }
    this.activePending = false;
    this.lastActive = Date.now();
    this.write(live, { type: 'active' });
  }

  private write(live: Live, frame: ClientFrame): void {
    live.connection.send(JSON.stringify(frame));
  }

  // ---- helpers ----

  private load(): Promise<void> {
    this.loaded ??= (async () => {
      const [outbox, seen] = await Promise.all([this.store.outbox(), this.store.seen()]);
      this.outbox = outbox;
      this.seen = new Set(seen);
      this.lastOrder = outbox.reduce((last, e) => Math.max(last, e.order), this.lastOrder);
    })().catch((error: unknown) => {
      this.loaded = undefined; // a store that failed to load is read again next time
      throw error;
    });
    return this.loaded;
  }


  private nextOrder(): number {
    this.lastOrder = Math.max(this.lastOrder + 1, Date.now() * 1000);
    return this.lastOrder;
  }

  private newId(): string {
    if (this.options.newId) return this.options.newId();
    const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
    if (c?.randomUUID) return c.randomUUID();
    throw new Error('no crypto.randomUUID here: pass options.newId');
  }

  private emit<E extends keyof Events>(event: E, value: Events[E]): void {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        const result = (listener as Listener<E>)(value);
        if (result instanceof Promise) result.catch(() => {});
      } catch {
        // a listener's failure is the app's; the client goes on
      }
    }
  }
}

function wrap(message: string, cause: unknown): Error {
  return new Error(message, { cause });
}
