"""What is stored stays true (issue 14): seen by devices and by someone reading the store's files."""

import asyncio
import glob
import math
import subprocess
import time
import uuid

from conftest import RELAY_BIN, run
from test_access import audit_events, upgrade_status

# libfaketime (Debian's `faketime`, installed by scripts/test): steps the relay's wall clock back.
FAKETIME = (glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + [None])[0]


async def stream(dev, to, n, seconds):
    """Sends n messages spread over `seconds`, pipelined; returns (ids in order, id -> seq)."""
    ids = [str(uuid.uuid4()) for _ in range(n)]

    async def replies():
        seqs = {}
        while len(seqs) < n:
            frame = await dev.recv(15)
            assert frame["type"] == "accepted", frame
            seqs[frame["id"]] = frame["seq"]
        return seqs

    reader = asyncio.create_task(replies())
    start = time.monotonic()
    for i, msg_id in enumerate(ids):
        await dev.send([to], f"m{i}".encode(), msg_id=msg_id)
        if i % 10 == 9:
            await asyncio.sleep(max(0.0, start + seconds * (i + 1) / n - time.monotonic()))
    return ids, await reader


@run
async def test_a_restart_with_the_clock_stepped_back_never_reuses_a_sequence_number(make_relay):
    assert FAKETIME, "libfaketime missing: apt-get install faketime (scripts/test does)"
    relay = make_relay()
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")
    started = time.time()
    first_ids, first = await stream(alice, "bob", 1500, 1.5)
    await alice.close()
    relay.stop()

    # The next run's wall clock reads `started` again just as it starts sending: every
    # millisecond the first run used comes round a second time.
    back = math.ceil(time.time() - started) + 8
    relay.env.update(LD_PRELOAD=FAKETIME, FAKETIME=f"-{back}s", FAKETIME_DONT_FAKE_MONOTONIC="1")
    relay.start()
    alice = await relay.online("alice", "phone")
    await asyncio.sleep(max(0.0, started + back - time.time()))
    second_ids, second = await stream(alice, "bob", 1500, 1.5)

    reused = set(first.values()) & set(second.values())
    assert not reused, f"{len(reused)} sequence numbers issued twice"
    assert min(second.values()) > max(first.values()), "sequence numbers went back after the restart"

    # Every accepted message reaches bob once, in order, and acks delete only what they name:
    # bob acks the first run's messages as they come (as an app does, stored then acked).
    first_seqs = set(first.values())

    async def session_acking_first_run():
        bob = await relay.connect("bob", "phone")
        await bob.expect("hello")
        delivered, acking = [], []
        while (frame := await bob.recv())["type"] != "synced":
            assert frame["type"] == "deliver", frame
            delivered.append(frame["id"])
            if frame["seq"] in first_seqs:
                acking.append(frame["seq"])
            # Acks go out at 20, or as soon as the first run's messages stop coming: a remainder
            # held until `synced` would have fallen out of the 1,024-message window by then.
            if len(acking) == 20 or (acking and frame["seq"] not in first_seqs):
                await bob.ack(acking)
                acking = []
        if acking:
            await bob.ack(acking)
        await bob.close()
        return delivered

    assert await session_acking_first_run() == first_ids + second_ids
    # Acks are applied after the reads they answer (a loaded Cassandra may take seconds), and an
    # ack counts only while at most 1,024 delivered messages await theirs (PROTOCOL.md): a replay
    # that ran far ahead of bob's acks leaves some of the first run for the next session, which
    # acks them again. Once done, exactly the second run's messages are left, never acked away.
    deadline = time.monotonic() + 30
    while True:
        left = await session_acking_first_run()
        if left == second_ids or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert left == second_ids


@run
async def test_forged_logins_naming_made_up_users_create_no_audit_chains(make_relay, tmp_path):
    relay = make_relay({"RELAY_ACCESS__FAILED_AUTH_PER_IP": "1000", "RELAY_ACCESS__FAILED_AUTH_PER_ACCOUNT": "1000"})
    await relay.register_offline("dr.real", "phone")
    keys = tmp_path / "attacker"
    subprocess.run([str(RELAY_BIN), "keygen", "--out-dir", str(keys)], check=True, capture_output=True)
    forge = lambda user: relay.token(user, "phone", "--key", str(keys / "token-signing-key.pem"))  # noqa: E731
    for i in range(30):
        assert await upgrade_status(relay, forge(f"made-up-{i}")) == 401
    assert await upgrade_status(relay, forge("dr.real")) == 401

    # A real user's failures stay on their trail; made-up names land with the anonymous ones
    # (asking the admin API about a made-up user would itself be audited under that name).
    anon = [e for e in audit_events(relay, "%23anon") if e["event"] == "auth_failed"]
    assert sorted(e["claimed_user"] for e in anon) == sorted(f"made-up-{i}" for i in range(30))
    assert all("user" not in e and e["reason"] == "bad_signature" for e in anon)
    real = [e for e in audit_events(relay, "dr.real") if e["event"] == "auth_failed"]
    assert [(e["user"], e["device"], e["reason"]) for e in real] == [("dr.real", "phone", "bad_signature")]

    relay.stop()  # the embedded store is locked while the relay runs
    out = subprocess.run([str(RELAY_BIN), "audit", "verify"], env=relay._env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in 2 partitions" in out.stdout, out.stdout  # dr.real's month and the anonymous one


def audit_key_env() -> dict:
    import base64
    import os
    return {"RELAY_AUDIT__KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(), "RELAY_AUDIT__ACTIVE": "k1"}


def verify(relay, *args):
    return subprocess.run([str(RELAY_BIN), "audit", "verify", *args], env=relay._env(),
                          capture_output=True, text=True, timeout=120)


@run
async def test_checkpoints_outside_the_database_reveal_a_trail_that_lost_its_records(make_relay):
    keys = audit_key_env()
    relay = make_relay({**keys, "RELAY_LOG_FORMAT": "json"})
    dev = await relay.online("dr.audit", "phone")
    await dev.close()
    relay.admin("POST", "/v1/users/dr.audit/lock", {"reason": "test"}, as_="account-service")
    relay.stop()  # the last records are checkpointed on the way out

    checkpoint_file = relay.data_dir / "audit-checkpoints.jsonl"
    lines = checkpoint_file.read_text().splitlines()
    assert lines and all('"kind":"relay-audit-checkpoint/1"' in line for line in lines)
    out = verify(relay)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "audit trail intact" in out.stdout and f"{len(lines)} checkpoints" in out.stdout, out.stdout

    # The same checkpoints, read back from the JSON log stream instead of the file.
    out = verify(relay, "--checkpoints", str(relay.log_path))
    assert out.returncode == 0 and f"{len(lines)} checkpoints" in out.stdout, out.stdout + out.stderr

    # A database without those records (wiped, or an older backup put back): the trail it holds
    # links, but the checkpoints name chains it no longer has.
    other = make_relay(keys, name="other")
    other.stop()
    out = verify(other, "--checkpoints", str(checkpoint_file))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "subject=dr.audit" in out.stdout and "chain deleted" in out.stdout, out.stdout

    # A checkpoint edited to match is itself caught.
    forged = checkpoint_file.read_text().replace('"n":', '"n":1', 1)
    (relay.data_dir.parent / "forged.jsonl").write_text(forged)
    out = verify(relay, "--checkpoints", str(relay.data_dir.parent / "forged.jsonl"))
    assert out.returncode == 1 and "checkpoint forged or altered" in out.stdout, out.stdout


# Ids distinctive enough that a match in the store's files can only be them (fresh each run: the
# test Cassandra's commit log is shared by every keyspace and run).
_RUN = uuid.uuid4().hex[:10]
SENDER, SENDER_DEVICE = f"zebradoc{_RUN}", f"zebraphone{_RUN}"
RECIPIENT, RECIPIENT_DEVICE = f"okapinurse{_RUN}", f"okapitablet{_RUN}"
ORG = f"okapiclinic{_RUN}"


def leaked_ids(relay):
    """The distinctive ids found in clear in any file the store wrote."""
    blobs = b"".join(p.read_bytes() for p in relay.store_files())
    assert len(blobs) > 0
    return [i for i in (SENDER, SENDER_DEVICE, RECIPIENT, RECIPIENT_DEVICE, ORG) if i.encode() in blobs]


@run
async def test_a_copy_of_the_store_does_not_tell_who_messaged_whom(make_relay):
    relay = make_relay()
    token = relay.token(RECIPIENT, RECIPIENT_DEVICE, "--org", ORG)
    await (await relay.connect(RECIPIENT, RECIPIENT_DEVICE, token=token)).handshake()
    sender = await relay.connect(SENDER, SENDER_DEVICE, token=relay.token(SENDER, SENDER_DEVICE, "--org", ORG))
    await sender.handshake()
    for i in range(3):
        await sender.send_ok([RECIPIENT], f"m{i}".encode())
    recipient = await relay.connect(RECIPIENT, RECIPIENT_DEVICE, token=token)
    delivered = await recipient.handshake()
    assert len(delivered) == 3
    await recipient.ack([delivered[0]["seq"]])
    # A remote logout and an audit trail: access rows, a pending logout, audit records.
    status, _ = relay.admin("POST", f"/v1/devices/{SENDER_DEVICE}/logout", {"user": SENDER, "reason": "lost_device"})
    assert status == 200
    await recipient.close()
    # The audit writer batches: wait until the logout is on record before the kill.
    deadline = time.monotonic() + 10
    while not any(e["event"] == "logout_requested" for e in audit_events(relay, SENDER)):
        assert time.monotonic() < deadline, audit_events(relay, SENDER)
        await asyncio.sleep(0.2)
    relay.kill()  # the journal as written
    assert leaked_ids(relay) == []

    # After a clean stop (write buffers on disk as tables) the same holds, and everything is
    # still there for the relay, which knows the ids key.
    relay.start()
    recipient = await relay.connect(RECIPIENT, RECIPIENT_DEVICE, token=token)
    assert [d["body"] for d in await recipient.handshake()] == [d["body"] for d in delivered[1:]]
    await recipient.close()
    events = audit_events(relay, SENDER)
    assert any(e["event"] == "logout_requested" for e in events), events
    relay.stop()
    assert leaked_ids(relay) == []
