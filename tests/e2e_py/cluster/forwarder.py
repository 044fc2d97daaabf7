"""A TCP forwarder for the partition tests, with a slow mode. Run as a script inside a network
namespace (`python3 forwarder.py LISTEN_PORT TARGET_HOST TARGET_PORT`) it makes the test
Cassandra, which listens on the host's loopback, answer on the namespace's loopback too: the
driver connects to the address the database announces (127.0.0.1), so the namespace needs it."""

import asyncio
import contextlib
import random
import sys
import threading
import time


class Forwarder:
    """TCP forwarder from the database link to the test Cassandra on loopback. `slow(delay, hold,
    p)` delays every chunk by `delay` each way and holds a fraction `p` of them `hold` longer,
    with everything behind it: what a lossy link looks like to a TCP reader (a lost segment is
    retransmitted after a timeout and stalls the stream behind it)."""

    def __init__(self, listen, target):
        self.listen, self.target = listen, target
        self.delay, self.hold, self.p = 0.0, 0.0, 0.0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "forwarder did not start"

    def slow(self, delay=0.0, hold=0.0, p=0.0):
        self.delay, self.hold, self.p = delay, hold, p

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, *self.listen))
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer), return_exceptions=True)

    async def _pump(self, reader, writer):
        queue = asyncio.Queue()

        async def send():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        last_due = 0.0
        try:
            while data := await reader.read(65536):
                due = time.monotonic() + self.delay
                if self.p and random.random() < self.p:
                    due += self.hold
                last_due = max(last_due, due)  # in order, as TCP delivers
                queue.put_nowait((last_due, data))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender

    def stop(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(5)


if __name__ == "__main__":
    port, host, target_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    f = Forwarder(("127.0.0.1", port), (host, target_port))
    print("ready", flush=True)
    f.thread.join()
