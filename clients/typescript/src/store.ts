// What the client keeps across reconnects and (with a persistent adapter) across app restarts:
// the outbox of sends the relay has not accepted yet, and the ids of messages already handed to
// the app. A page reload or an app kill loses neither.

/** A send the relay has not answered with `accepted` (or a permanent refusal) yet. */
export interface OutboxEntry {
  /** Message id (UUID); every resend uses it, so the relay stores the message once. */
  id: string;
  to: string[];
  /** Standard base64 of the (end-to-end-encrypted) body. */
  body: string;
  urgent: boolean;
  /** Position in the outbox: sends go out in this order. */
  order: number;
}

/** Persistence behind the client. Methods may be called concurrently; each must be atomic. */
export interface ClientStore {
  /** Every outbox entry, in `order`. */
  outbox(): Promise<OutboxEntry[]>;
  putOutbox(entry: OutboxEntry): Promise<void>;
  deleteOutbox(id: string): Promise<void>;
  /** The most recently seen delivered message ids, oldest first. */
  seen(): Promise<string[]>;
  /** Records a delivered id; the store may forget the oldest beyond its capacity. */
  addSeen(id: string): Promise<void>;
  /** Forgets everything (remote logout: the wipe). */
  clear(): Promise<void>;
}

/** How many delivered ids are remembered to drop redeliveries. Redeliveries come from the
 * unacknowledged part of the inbox (at most 1,024 awaiting acks per connection), so 10,000
 * covers many reconnects. */
export const SEEN_CAPACITY = 10_000;

/** Keeps everything in memory: survives reconnects, not a process restart. The default. */
export class MemoryStore implements ClientStore {
  private readonly entries = new Map<string, OutboxEntry>();
  private readonly seenIds = new Set<string>();

  constructor(private readonly capacity = SEEN_CAPACITY) {}

  async outbox(): Promise<OutboxEntry[]> {
    return [...this.entries.values()].sort((a, b) => a.order - b.order);
  }
  async putOutbox(entry: OutboxEntry): Promise<void> {
    this.entries.set(entry.id, { ...entry, to: [...entry.to] });
  }
  async deleteOutbox(id: string): Promise<void> {
    this.entries.delete(id);
  }
  async seen(): Promise<string[]> {
    return [...this.seenIds];
  }
  async addSeen(id: string): Promise<void> {
    this.seenIds.delete(id);
    this.seenIds.add(id);
    while (this.seenIds.size > this.capacity) {
      const oldest = this.seenIds.values().next().value as string;
      this.seenIds.delete(oldest);
    }
  }
  async clear(): Promise<void> {
    this.entries.clear();
    this.seenIds.clear();
  }
}
