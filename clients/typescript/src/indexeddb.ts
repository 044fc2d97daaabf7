// The browser's persistent store: the outbox and the seen ids in IndexedDB, so a page reload or
// a closed tab loses no unaccepted send and redelivers nothing to the app.

import { SEEN_CAPACITY, type ClientStore, type OutboxEntry } from './store.js';

const OUTBOX = 'outbox';
const SEEN = 'seen';

interface SeenRow {
  id: string;
  at: number;
}

function done<T>(request: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function committed(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
  });
}

export class IndexedDbStore implements ClientStore {
  private constructor(
    private readonly db: IDBDatabase,
    private readonly capacity: number,
    private counter: number,
  ) {}

  /** Opens (or creates) the database `name`; use one name per signed-in user and device. */
  static async open(name: string, capacity = SEEN_CAPACITY, factory: IDBFactory = indexedDB): Promise<IndexedDbStore> {
    const request = factory.open(name, 1);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore(OUTBOX, { keyPath: 'id' });
      db.createObjectStore(SEEN, { keyPath: 'id' }).createIndex('at', 'at');
    };
    const db = await done(request);
    const cursor = await done(db.transaction(SEEN).objectStore(SEEN).index('at').openCursor(null, 'prev'));
    const last = cursor ? (cursor.value as SeenRow).at : 0;
    return new IndexedDbStore(db, capacity, last);
  }

  async outbox(): Promise<OutboxEntry[]> {
    const all = (await done(this.db.transaction(OUTBOX).objectStore(OUTBOX).getAll())) as OutboxEntry[];
    return all.sort((a, b) => a.order - b.order);
  }

  async putOutbox(entry: OutboxEntry): Promise<void> {
    const tx = this.db.transaction(OUTBOX, 'readwrite');
    tx.objectStore(OUTBOX).put(entry);
    await committed(tx);
  }

  async deleteOutbox(id: string): Promise<void> {
    const tx = this.db.transaction(OUTBOX, 'readwrite');
    tx.objectStore(OUTBOX).delete(id);
    await committed(tx);
  }

  async seen(): Promise<string[]> {
    const rows = (await done(this.db.transaction(SEEN).objectStore(SEEN).index('at').getAll())) as SeenRow[];
    return rows.map((row) => row.id);
  }

  async addSeen(id: string): Promise<void> {
    const tx = this.db.transaction(SEEN, 'readwrite');
    const store = tx.objectStore(SEEN);
    store.put({ id, at: ++this.counter } satisfies SeenRow);
    const count = store.count();
    count.onsuccess = () => {
      let excess = count.result - this.capacity;
      if (excess <= 0) return;
      const oldest = store.index('at').openCursor();
      oldest.onsuccess = () => {
        const cursor = oldest.result;
        if (!cursor || excess-- <= 0) return;
        cursor.delete();
        cursor.continue();
      };
    };
    await committed(tx);
  }

  async clear(): Promise<void> {
    const tx = this.db.transaction([OUTBOX, SEEN], 'readwrite');
    tx.objectStore(OUTBOX).clear();
    tx.objectStore(SEEN).clear();
    await committed(tx);
  }

  close(): void {
    this.db.close();
  }
}
