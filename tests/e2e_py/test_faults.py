"""Faults real machines have, end to end, against the real relay (issue 15; RELIABILITY.md).

The embedded store's own faults: the Cassandra pass skips this file (scripts/test), since there
the database's disk is the database's concern.
"""

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid

from conftest import RELAY_BIN, Relay, run


def readyz(relay):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/readyz", timeout=2) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def gauge(relay, name):
    for line in relay.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@run
async def test_a_full_disk_refuses_sends_as_retryable_loses_nothing_and_recovers_by_itself(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], check=True)
    relay = None
    try:
        relay = Relay(disk, {"RELAY_LIMITS__SENDER_BYTES_PER_DAY": "1000000000"}).start()
        await relay.register_offline("bob", "phone")
        alice = await relay.online("alice", "phone")

        accepted, refused = [], None
        for _ in range(400):
            await alice.send(["bob"], os.urandom(200_000))
            reply = await alice.recv(20)
            if reply["type"] != "accepted":
                refused = reply
                break
            accepted.append(reply["id"])
        assert refused is not None, "40 MiB took 400 sends of 200 KB"
        assert len(accepted) > 20, f"refused after {len(accepted)} sends"
        assert (refused["type"], refused["code"], refused["retry"]) == ("rejected", "unavailable", True), refused
        status, why = readyz(relay)
        assert status == 503 and "disk full" in why, (status, why)
        assert gauge(relay, "relay_store_disk_full") == 1
        # Reads go on: bob's phone signs in and gets everything accepted so far.
        bob = await relay.connect("bob", "phone")
        assert [d["id"] for d in await bob.handshake()] == accepted
        await bob.close()

        # Space comes back (an operator grows the volume, or old files go): no restart.
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        started = time.monotonic()
        while readyz(relay)[0] != 200:
            assert time.monotonic() - started < 30, f"still {readyz(relay)} 30 s after space returned"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - started
        print(f"{len(accepted)} accepted before the disk filled; ready again {recovered:.1f} s after space returned")
        assert readyz(relay) == (200, "ready")
        assert gauge(relay, "relay_store_disk_full") == 0

        # The refused message, sent again as the `retry` told the app, and one more.
        again = await alice.send(["bob"], b"the refused one, again", msg_id=refused["id"])
        after = await alice.send(["bob"], b"after")
        for expected in (again, after):
            reply = await alice.recv(20)
            assert (reply["type"], reply["id"]) == ("accepted", expected), reply
            accepted.append(expected)
        await alice.close()

        # Everything accepted reaches bob, once, in order, and is still there after a restart.
        bob = await relay.connect("bob", "phone")
        assert [d["id"] for d in await bob.handshake()] == accepted
        await bob.close()
        relay.restart()
        bob = await relay.connect("bob", "phone")
        assert [d["id"] for d in await bob.handshake()] == accepted
        await bob.close()

        # The audit records written while the disk was full were retried, not lost or forked.
        relay.stop()
        out = subprocess.run([str(RELAY_BIN), "audit", "verify"], env=relay._env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        if relay:
            relay.stop()
        subprocess.run(["umount", str(disk)], check=False)
