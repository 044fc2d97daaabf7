// Serves the example chat page and the built library on loopback, and mints device tokens with
// `relay token` as an account service would (DEVELOPMENT ONLY: it signs in anyone who asks).
//
//   node clients/typescript/example/serve.mjs   (at the repository root, beside a running
//   relay, after `npm run build` here), then open, in two tabs,
//   http://127.0.0.1:8000/?me=alice&peer=bob  and  http://127.0.0.1:8000/?me=bob&peer=alice
//
// Settings (environment): PORT (8000), RELAY_URL (ws://127.0.0.1:8080/v1/ws), RELAY_BIN (the
// relay binary: target/release/relay or target/debug/relay of this repository, else `relay` on
// PATH). `relay token` reads the dev signing key from the relay's data directory: run this from
// where you run the relay, with the same RELAY_DATA_DIR.
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(here, '..', 'dist');
const built = ['release', 'debug'].map((p) => resolve(here, '..', '..', '..', 'target', p, 'relay'));
const relayBin = process.env.RELAY_BIN ?? built.find((p) => existsSync(p)) ?? 'relay';
const relayUrl = process.env.RELAY_URL ?? 'ws://127.0.0.1:8080/v1/ws';
const port = Number(process.env.PORT ?? 8000);
const ID = /^[A-Za-z0-9._:@+-]{1,128}$/;

const types = { '.html': 'text/html', '.js': 'text/javascript', '.map': 'application/json' };

createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://localhost');
  if (url.pathname === '/token') {
    const user = url.searchParams.get('user') ?? '';
    const device = url.searchParams.get('device') ?? '';
    if (!ID.test(user) || !ID.test(device)) return void res.writeHead(400).end();
    execFile(relayBin, ['token', '--user', user, '--device', device, '--ttl', '1h'], (error, stdout) => {
      if (error) return void res.writeHead(500).end('relay token failed');
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Cache-Control': 'no-store' }).end(stdout.trim());
    });
    return;
  }
  if (url.pathname === '/config.json') {
    return void res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ relayUrl }));
  }
  const page = url.pathname === '/';
  const file = page ? join(here, 'index.html') : resolve(dist, '.' + url.pathname.slice('/dist'.length));
  if (!(page || (url.pathname.startsWith('/dist/') && file.startsWith(dist + sep))) || !existsSync(file)) {
    return void res.writeHead(404).end();
  }
  const ext = file.slice(file.lastIndexOf('.'));
  res.writeHead(200, { 'Content-Type': types[ext] ?? 'application/octet-stream' }).end(readFileSync(file));
}).listen(port, '127.0.0.1', () => {
  console.log(`example chat on http://127.0.0.1:${port}/?me=alice&peer=bob (relay ${relayUrl})`);
});
