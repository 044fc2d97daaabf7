// Typed errors the client's promises reject with.

import type { ErrorCode, RejectCode } from './frames.js';

/** The relay refused a send for good (`rejected` with `retry: false`, or an `error` frame about
 * it); nothing was stored and the client will not resend it. */
export class SendRejectedError extends Error {
  override readonly name = 'SendRejectedError';
  constructor(
    readonly id: string,
    readonly code: RejectCode | ErrorCode,
  ) {
    super(`the relay refused message ${id}: ${code}`);
  }
}

/** The client stopped (`close()`, a remote logout, a lock, an inactivity logoff) before the
 * relay answered. After `close()` the send stays in a persistent outbox and goes out on the
 * next `start()` (reported by the `sent` event); after a logout the outbox was wiped. */
export class ClientStoppedError extends Error {
  override readonly name = 'ClientStoppedError';
  constructor(readonly reason: StopReason) {
    super(`the relay client stopped: ${reason}`);
  }
}

/** Why a client stopped for good (it never reconnects by itself after these). */
export type StopReason =
  | 'closed' // close() was called
  | 'logged_out' // remote logout, wiped and confirmed
  | 'locked' // the account is locked
  | 'revoked' // the relay refuses these credentials (logged out before)
  | 'idle_logoff' // 2 hours without user activity: authenticate the user again
  | 'displaced' // another connection of the same device took over
  | 'refused'; // the relay refuses this client for good (origin not allowed)
