// A real relay binary (embedded store) for the tests: started on loopback ports of its own,
// stopped with SIGTERM or SIGKILL and started again on the same data and ports.

import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import WebSocket from 'ws';

export const ROOT = resolve(import.meta.dirname, '..', '..', '..', '..');
export const RELAY_BIN = process.env.RELAY_BIN ?? join(ROOT, 'target', 'debug', 'relay');

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => res(port));
    });
    srv.on('error', rej);
  });
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `check` every 20 ms until it holds or `ms` pass. */
export async function until(check: () => boolean, ms = 10_000, what = 'a condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export class Relay {
  readonly url: string;
  private child: ChildProcess | undefined;
  private readonly env: NodeJS.ProcessEnv;
  private readonly adminToken = 'rla_' + randomBytes(32).toString('hex');
  private readonly adminBase: string;
  private readonly base: string;

  private constructor(port: number, adminPort: number, settings: Record<string, string>) {
    const sha = createHash('sha256').update(this.adminToken).digest('hex');
    this.env = {
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('RELAY_'))),
      RELAY_LISTEN: `127.0.0.1:${port}`,
      RELAY_ADMIN_LISTEN: `127.0.0.1:${adminPort}`,
      RELAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'relay-ts-')),
      RELAY_LOG_LEVEL: 'warn',
      RELAY_ADMIN__CREDENTIALS: `[{ name = "account-service", role = "account_service", token_sha256 = "${sha}" }]`,
      ...settings,
    };
    this.base = `http://127.0.0.1:${port}`;
    this.adminBase = `http://127.0.0.1:${adminPort}`;
    this.url = `ws://127.0.0.1:${port}/v1/ws`;
  }

  /** `settings`: `RELAY_*` variables (README's configuration table). */
  static async start(settings: Record<string, string> = {}): Promise<Relay> {
    if (!existsSync(RELAY_BIN)) throw new Error(`${RELAY_BIN} missing: run cargo build -p relay (scripts/test does)`);
    const relay = new Relay(await freePort(), await freePort(), settings);
    await relay.run();
    return relay;
  }

  async run(): Promise<void> {
    this.child = spawn(RELAY_BIN, [], { env: this.env, stdio: ['ignore', 'ignore', 'inherit'] });
    for (let i = 0; i < 400; i++) {
      try {
        if ((await fetch(`${this.base}/readyz`)).status === 200) return;
      } catch {
        // not up yet
      }
      await sleep(25);
    }
    throw new Error('relay did not become ready');
  }

  /** Stops the process (SIGTERM drains, SIGKILL does not) and waits for it to exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    child.kill(signal);
    await exited;
  }

  /** The relay's environment, for tools that read its data directory (`relay token`). */
  environment(): NodeJS.ProcessEnv {
    return { ...this.env };
  }

  async dispose(): Promise<void> {
    await this.stop('SIGKILL');
    rmSync(this.env.RELAY_DATA_DIR!, { recursive: true, force: true });
  }

  /** A token the account service would issue; a provider that mints one per call. */
  token(user: string, device: string, extra: string[] = []): string {
    return execFileSync(RELAY_BIN, ['token', '--user', user, '--device', device, ...extra], { env: this.env })
      .toString()
      .trim();
  }

  provider(user: string, device: string, extra: string[] = []): { token: () => Promise<string>; calls: () => number } {
    let calls = 0;
    return {
      token: async () => {
        calls++;
        return this.token(user, device, extra);
      },
      calls: () => calls,
    };
  }

  async admin(method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown }> {
    const response = await fetch(`${this.adminBase}${path}`, {
      method,
      headers: { Authorization: `Bearer ${this.adminToken}`, 'Content-Type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    return { status: response.status, json: await response.json().catch(() => null) };
  }

  /** Status of an upgrade with `token` (101 when it is accepted). */
  upgradeStatus(token: string): Promise<number> {
    return new Promise((res) => {
      const ws = new WebSocket(this.url, { headers: { Authorization: `Bearer ${token}` } });
      ws.on('unexpected-response', (_req, response) => {
        res(response.statusCode ?? 0);
        ws.terminate();
      });
      ws.on('open', () => {
        res(101);
        ws.terminate();
      });
      ws.on('error', () => res(0));
    });
  }
}
