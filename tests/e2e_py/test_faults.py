"""Faults real machines have, end to end, against the real relay (issue 15; RELIABILITY.md).

The embedded store's own faults: the Cassandra pass skips this file (scripts/test), since there
the database's disk is the database's concern.
"""

import asyncio
import glob
import json
import os
import random
import subprocess
import time

from websockets.exceptions import InvalidStatus

from conftest import RELAY_BIN, ROOT, Relay, run

LOADTEST = ROOT / "target" / "debug" / "loadtest"
FAKETIME = (glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + [None])[0]


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
        status, why = relay.readyz()
        assert status == 503 and "disk full" in why, (status, why)
        assert gauge(relay, "relay_store_disk_full") == 1
        # Reads go on: bob's phone signs in and gets everything accepted so far.
        bob = await relay.connect("bob", "phone")
        assert [d["id"] for d in await bob.handshake()] == accepted
        await bob.close()

        # Space comes back (an operator grows the volume, or old files go): no restart.
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        started = time.monotonic()
        while relay.readyz()[0] != 200:
            assert time.monotonic() - started < 30, f"still {relay.readyz()} 30 s after space returned"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - started
        print(f"{len(accepted)} accepted before the disk filled; ready again {recovered:.1f} s after space returned")
        assert relay.readyz() == (200, "ready")
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


async def sends(dev, to, n):
    """n pipelined sends; their sequence numbers in send order."""
    ids = [await dev.send([to], f"m{i}".encode()) for i in range(n)]
    seqs = {}
    while len(seqs) < n:
        frame = await dev.expect("accepted", 15)
        seqs[frame["id"]] = frame["seq"]
    return ids, [seqs[i] for i in ids]


@run
async def test_a_clock_that_jumps_while_running_keeps_sequences_and_logs_off_on_real_time(tmp_path):
    assert FAKETIME, "libfaketime missing: apt-get install faketime (scripts/test does)"
    clock = tmp_path / "clock"
    clock.write_text("+0s\n")
    relay = Relay(tmp_path / "data", {"RELAY_SESSION__IDLE_TIMEOUT": "20s", "RELAY_SESSION__PING_INTERVAL": "2s"})
    # The wall clock (of the relay and of `relay token`) follows the file, read at every call
    # (libfaketime's cached reading missed the second change); the monotonic clock is the
    # machine's.
    relay.env.update(LD_PRELOAD=FAKETIME, FAKETIME_TIMESTAMP_FILE=str(clock), FAKETIME_NO_CACHE="1",
                     FAKETIME_DONT_FAKE_MONOTONIC="1")
    relay.start()
    try:
        await relay.register_offline("bob", "phone")
        idle = await relay.online("carol", "phone")
        idle_since = time.monotonic()
        alice = await relay.online("alice", "phone")

        ids, seqs = await sends(alice, "bob", 300)
        clock.write_text("-60s\n")  # back a minute
        await asyncio.sleep(1.5)
        half_hour = relay.token("dave", "phone", "--ttl", "30m")
        more_ids, more = await sends(alice, "bob", 300)
        ids, seqs = ids + more_ids, seqs + more
        clock.write_text("+3600s\n")  # forward an hour
        await asyncio.sleep(1.5)
        more_ids, more = await sends(alice, "bob", 300)
        ids, seqs = ids + more_ids, seqs + more

        # Unique and increasing through both jumps.
        assert len(set(seqs)) == len(seqs), "a sequence number was issued twice"
        assert seqs == sorted(seqs), "sequence numbers went back with the clock"
        # The jumps happened (a sequence number holds its accept time, ms, above 12 bits): the
        # minute back held the clock at the last time issued through 1.5 s of real time, and
        # the hour forward shows.
        ms = [s >> 12 for s in seqs]
        assert ms[599] - ms[299] < 1000, ms
        assert ms[600] - ms[599] > 3_500_000, ms

        # Tokens are checked against the wall clock, as documented: the half-hour token
        # minted before the hour jump has expired; one minted now is good.
        try:
            await relay.connect("dave", "phone", token=half_hour)
            raise AssertionError("a token expired by the clock was accepted")
        except InvalidStatus as e:
            assert e.response.status_code == 401
            assert b"token_expired" in e.response.body, e.response.body
        await (await relay.online("dave", "phone")).close()

        # The inactivity logoff counts real time: the hour jump did not log carol off; 20 s
        # without activity did.
        frame = await idle.recv(timeout=30)
        assert frame == {"type": "session_expired", "idle_timeout_s": 20}, frame
        idle_for = time.monotonic() - idle_since
        assert 19 <= idle_for <= 26, f"logged off after {idle_for:.1f} s"

        # Every message reaches bob once, in order.
        bob = await relay.connect("bob", "phone")
        assert [d["id"] for d in await bob.handshake()] == ids
        await bob.close()
        await alice.close()
    finally:
        relay.stop()


def test_sigkill_at_random_moments_of_the_write_path_loses_nothing(tmp_path):
    """The relay killed (SIGKILL, no drain) again and again under load: sometimes within half a
    second of coming back (mid-replay of the reconnect storm), sometimes seconds later (mid-write,
    between a store write and its `accepted`, mid-fan-out). The load tool resends unanswered
    sends under their ids, as an app does; its total-queue check ends the run."""
    assert LOADTEST.exists(), f"{LOADTEST} missing: cargo build --workspace (scripts/test does)"
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    relay = Relay(tmp_path / "data").start()
    key = relay.data_dir / "dev-secrets" / "token-signing-key.pem"
    cmd = [str(LOADTEST), "--url", relay.url, "--key", str(key), "--reconnect", "--connections", "60",
           "--rate", "600", "--payload", "128", "--duration", "30", "--prefix", "crash"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills, downtime = 0, []
    try:
        time.sleep(3)
        end = time.monotonic() + 24  # the last kill leaves time for every device to drain
        while time.monotonic() < end:
            relay.kill()
            kills += 1
            down = time.monotonic()
            relay.start()
            downtime.append(time.monotonic() - down)
            time.sleep(rng.uniform(0.05, 0.5) if rng.random() < 0.5 else rng.uniform(0.5, 2.5))
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.stop()
    assert proc.returncode == 0, err[-4000:]
    report = json.loads(out)
    summary = err[err.rfind("Steady"):]
    print(f"seed {seed}: {kills} kills, restart to ready median {sorted(downtime)[len(downtime) // 2]:.2f} s\n{summary}")
    assert kills >= 10, kills
    assert report["reconnects"] >= kills * 30, report["reconnects"]  # every kill reached the devices
    assert report["accepted"] >= 5000, summary
    assert report["lost"] == 0, f"seed {seed}: {summary}"
    assert report["duplicates"] == 0, f"seed {seed}: {summary}"
    assert report["connection_errors"] == 0, f"seed {seed}: {summary}"
    assert report["delivered"] == report["accepted"], f"seed {seed}: {summary}"
