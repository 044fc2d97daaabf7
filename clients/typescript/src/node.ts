// Node transport: the `ws` package (a peer dependency) with the token in an `Authorization`
// header, and the HTTP status, error code and `Retry-After` of a refused upgrade.

import WebSocket from 'ws';
import type { Transport } from './transport.js';

export * from './index.js';

/** `options` go to `ws` as they are (TLS settings, an agent, …). */
export function nodeTransport(options: WebSocket.ClientOptions = {}): Transport {
  return (url, token, events) => {
    const ws = new WebSocket(url, {
      ...options,
      headers: { ...options.headers, Authorization: `Bearer ${token}` },
    });
    let refused = false;
    ws.on('open', () => events.open());
    ws.on('message', (data, isBinary) => {
      if (!isBinary) events.message(data.toString());
    });
    ws.on('unexpected-response', (_request, response) => {
      refused = true;
      const header = response.headers['retry-after'];
      const seconds = typeof header === 'string' ? Number(header) : NaN;
      const retryAfterMs = Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : undefined;
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => {
        if (body.length < 4096) body += chunk;
      });
      let reported = false;
      const finish = () => {
        if (reported) return;
        reported = true;
        let error: string | undefined;
        try {
          const parsed = JSON.parse(body) as { error?: unknown };
          if (typeof parsed.error === 'string') error = parsed.error;
        } catch {
          // not JSON: the status alone decides
        }
        events.refused(response.statusCode ?? 0, error, retryAfterMs);
        ws.terminate();
      };
      response.on('end', finish);
      response.on('error', finish);
    });
    ws.on('close', (code) => {
      if (!refused) events.closed(code);
    });
    ws.on('error', () => {}); // a close event follows every error
    return {
      send: (text) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(text);
      },
      close: (code) => ws.close(code),
    };
  };
}
