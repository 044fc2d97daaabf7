// How the client reaches the relay. The default uses the platform's global `WebSocket`
// (browsers, React Native, Node 22+) with the token as a subprotocol, since browsers cannot set
// headers on a WebSocket; `./node` offers `ws` with an `Authorization` header and the HTTP status
// of a refused upgrade.

import { SUBPROTOCOL } from './frames.js';

/** What a transport reports about one connection, in this order: `open`, then any `message`s,
 * then exactly one of `refused` (the upgrade got an HTTP answer, not a 101) or `closed`. */
export interface ConnectionEvents {
  open(): void;
  message(text: string): void;
  /** `retryAfterMs` from a `Retry-After` header; `error` from the JSON body's `error` field. */
  refused(status: number, error: string | undefined, retryAfterMs: number | undefined): void;
  /** 1006 when the connection failed without a close frame (a browser also reports a refused
   * upgrade this way: it cannot see the status). */
  closed(code: number): void;
}

export interface Connection {
  send(text: string): void;
  close(code: number): void;
}

export type Transport = (url: string, token: string, events: ConnectionEvents) => Connection;

interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number): void;
}

type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

/** The global `WebSocket`, authenticated with the `relay.v1` + `bearer.<token>` subprotocols. */
export function webSocketTransport(ctor?: WebSocketConstructor): Transport {
  return (url, token, events) => {
    const WS = ctor ?? (globalThis as unknown as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new Error('no global WebSocket here: pass a transport (on Node, import from "./node")');
    const ws = new WS(url, [SUBPROTOCOL, `bearer.${token}`]);
    ws.onopen = () => events.open();
    ws.onmessage = (event) => {
      if (typeof event.data === 'string') events.message(event.data);
    };
    ws.onclose = (event) => events.closed(event.code);
    ws.onerror = () => {}; // a close event follows every error
    return {
      send: (text) => {
        if (ws.readyState === 1) ws.send(text);
      },
      close: (code) => ws.close(code),
    };
  };
}
