"""Backups that restore: a backup taken while a device sends, restored into a new store, gives
back what a restore must (ISSUE 19): every message accepted before the backup point, the
unacknowledged inboxes, the access state (locks, logouts, pending wipe confirmations) and an
audit trail that verifies. Embedded store: `relay backup` / `relay restore`. Cassandra: the
keyspace's `nodetool snapshot`, imported into a fresh keyspace (DEPLOY.md, "Backups")."""

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import time
import uuid

from conftest import BACKEND, CASSANDRA_RUN, RELAY_BIN, ROOT, Relay, run
from test_access import LOGGED_OUT, ack_logout, frames_until_close, upgrade_status


def now_ms() -> int:
    return int(time.time() * 1000)


def nodetool(*args):
    out = subprocess.run([str(ROOT / "scripts" / "cassandra"), "nodetool", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def last_backup(relay) -> float:
    # The gauge is set by the relay's periodic upkeep (and at once by a backup it takes): a
    # relay that just became ready may not have published it yet.
    deadline = time.monotonic() + 10
    while True:
        lines = [l for l in relay.metrics().splitlines() if l.startswith("relay_last_backup_timestamp_seconds")]
        if lines or time.monotonic() > deadline:
            assert lines, "relay_last_backup_timestamp_seconds not exported within 10 s"
            return float(lines[0].split()[-1])
        time.sleep(0.1)


def take_backup(relay, out):
    """Backs up the running relay's store; returns the backup point (ms)."""
    if BACKEND == "cassandra":
        # What the backup job does on every node: snapshot the keyspace (a flush, then hard
        # links); the checkpoint file is shipped alongside, as it was before the snapshot.
        shutil.copy(relay.data_dir / "audit-checkpoints.jsonl", out / "audit-checkpoints.jsonl")
        point = now_ms()
        nodetool("snapshot", "-t", out.name, relay.keyspace)
        done = subprocess.run([str(RELAY_BIN), "backup", "--record-snapshot", out.name, "--taken-at", str(point)],
                              env=relay._env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return point
    done = subprocess.run([str(RELAY_BIN), "backup", "--out", str(out)], env=relay._env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backup written" in done.stdout
    manifest = json.loads((out / "backup.json").read_text())
    assert manifest["rows"]["archive"] > 0 and manifest["rows"]["audit.2"] > 0, manifest
    return manifest["taken_at"]


def restore(relay, backup, data_dir) -> tuple[Relay, float]:
    """Restores `backup` into a new store on `data_dir` with the same keys; returns the restored
    relay (started) and the seconds the restore took."""
    data_dir.mkdir()
    # The keys are not in the backup: the operator brings them.
    shutil.copytree(relay.data_dir / "dev-secrets", data_dir / "dev-secrets")
    restored = Relay(data_dir, relay.env)
    started = time.monotonic()
    if BACKEND == "cassandra":
        restored.keyspace = "e2e_restored_" + uuid.uuid4().hex[:8]
        subprocess.run([str(RELAY_BIN), "migrate"], env=restored._env(), check=True, capture_output=True, timeout=120)
        for table_dir in (CASSANDRA_RUN / "data" / relay.keyspace).iterdir():
            snapshot = table_dir / "snapshots" / backup.name
            if snapshot.is_dir() and any(snapshot.glob("*-Data.db")):
                table = table_dir.name.rsplit("-", 1)[0]
                nodetool("import", "--copy-data", restored.keyspace, table, str(snapshot))
        restored.migrated = True
        shutil.copy(backup / "audit-checkpoints.jsonl", data_dir / "audit-checkpoints.jsonl")
    else:
        out = subprocess.run([str(RELAY_BIN), "restore", "--from", str(backup)], env=restored._env(),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "audit trail intact" in out.stdout and "not in it" in out.stdout, out.stdout
    seconds = time.monotonic() - started
    restored.start()
    return restored, seconds


@run
async def test_a_backup_taken_under_load_restores_what_was_accepted_before_it_and_the_access_state(make_relay, tmp_path):
    relay = make_relay({"RELAY_AUDIT__CHECKPOINT_INTERVAL": "1s"})
    tokens = {u: relay.token(u, "phone") for u in ("drrecv", "drlost", "drwiped", "drlocked", "drsend")}
    for user in ("drrecv", "drlost", "drlocked"):
        await (await relay.connect(user, "phone", token=tokens[user])).handshake()
    # Access state before the backup: a lock, a logout not yet confirmed, a confirmed one.
    wiped = await relay.connect("drwiped", "phone", token=tokens["drwiped"])
    await wiped.handshake()
    assert relay.admin("POST", "/v1/users/drlocked/lock", {"reason": "test"}, as_="account-service")[0] == 200
    assert relay.admin("POST", "/v1/devices/phone/logout", {"user": "drlost", "reason": "lost_device"})[0] == 200
    assert relay.admin("POST", "/v1/devices/phone/logout", {"user": "drwiped", "reason": "lost_device"})[0] == 200
    frame = await wiped.recv()
    await ack_logout(wiped, frame["signal"])
    assert (await frames_until_close(wiped))[1] == LOGGED_OUT
    await asyncio.sleep(1.5)  # a checkpoint covers the access events

    # A device sends all along; the backup is taken in the middle.
    sender = await relay.online("drsend", "phone", token=tokens["drsend"])
    sent, stop = [], asyncio.Event()

    async def send_all_along():
        i = 0
        while not stop.is_set():
            body = f"before-or-after-{i}".encode()
            at = now_ms()
            reply = await sender.send_ok(["drrecv"], body)
            sent.append({"body": body, "seq": reply["seq"], "id": reply["id"], "sent": at, "accepted": now_ms()})
            i += 1

    # A message delivered and acknowledged before the backup: in the archive only.
    acker = await relay.online("drack", "phone")
    reply = await sender.send_ok(["drack"], b"acknowledged before the backup")
    frame = await acker.expect("deliver")
    await acker.ack([frame["seq"]])
    await asyncio.sleep(0.2)
    await acker.close()
    acked = {"body": b"acknowledged before the backup", "seq": reply["seq"], "id": reply["id"]}

    load = asyncio.create_task(send_all_along())
    await asyncio.sleep(1.0)
    backup = tmp_path / "backup-1"
    backup.mkdir()
    point = await asyncio.to_thread(take_backup, relay, backup)
    if BACKEND != "cassandra":
        assert last_backup(relay) == point / 1000
    await asyncio.sleep(0.5)
    stop.set()
    await load
    await sender.close()
    before = [m for m in sent if m["accepted"] < point]
    after = [m for m in sent if m["sent"] > point]
    assert len(before) > 20 and len(after) > 5, (len(before), len(after))
    relay.stop()

    restored, seconds = restore(relay, backup, tmp_path / "restored")
    print(f"restore ({BACKEND}) took {seconds:.1f} s for {len(sent)} messages")
    if BACKEND != "cassandra":
        # As new as the backup it came from (the ScyllaDB job records its snapshot after it).
        assert last_backup(restored) == point / 1000

    # Every message accepted before the backup point replays to its offline device, in order.
    recv = await restored.connect("drrecv", "phone", token=tokens["drrecv"])
    frames = await recv.handshake()
    assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames), "in order"
    got = {f["seq"]: f for f in frames}
    for m in before:
        assert m["seq"] in got, f"message {m['seq']} accepted before the backup point is missing"
    if BACKEND != "cassandra":
        # The embedded backup is one point in time: nothing sent after it is there.
        assert not [m for m in after if m["seq"] in got]
    assert all(base64.b64decode(got[m["seq"]]["body"]) == m["body"] for m in before)
    await recv.close()

    # The access state came back: no logged-out device or locked user gets in.
    assert await upgrade_status(restored, tokens["drwiped"]) == 401
    assert await upgrade_status(restored, restored.token("drlocked", "phone")) == 403
    lost = await restored.connect("drlost", "phone", token=tokens["drlost"])
    frame = await lost.recv()
    assert frame["type"] == "logout" and frame["reason"] == "lost_device", frame
    await ack_logout(lost, frame["signal"])
    assert (await frames_until_close(lost))[1] == LOGGED_OUT
    assert await upgrade_status(restored, tokens["drlost"]) == 401

    # Every message accepted before the backup point is in the restored archive and opens with
    # the keys (the acknowledged one too); with the embedded store nothing sent after it is.
    if BACKEND != "cassandra":
        restored.stop()  # the embedded store is locked while the relay runs

    def archive_get(messages):
        path = tmp_path / f"messages-{uuid.uuid4().hex[:6]}.txt"
        path.write_text("".join(f"{m['seq']} {m['id']}\n" for m in messages))
        out = subprocess.run([str(RELAY_BIN), "archive", "get", "--messages", str(path)], env=restored._env(),
                             capture_output=True, text=True, timeout=120)
        return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr

    code, found, err = archive_get([acked, *before])
    assert code == 0, (code, err, [f for f in found if not f["found"]][:3])
    for m, f in zip([acked, *before], found):
        assert f["found"] and f["id"] == m["id"] and f["from"] == {"user": "drsend", "device": "phone"}, f
        assert f["body_sha256"] == hashlib.sha256(m["body"]).hexdigest() and "body" not in f, f
    if BACKEND != "cassandra":
        code, found, _ = archive_get(after)
        assert code == 1 and not any(f["found"] for f in found)

    # The restored audit trail verifies against the checkpoints up to the backup point and the
    # restored relay's own.
    restored.stop()
    out = subprocess.run([str(RELAY_BIN), "audit", "verify"], env=restored._env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "audit trail intact" in out.stdout, out.stdout + out.stderr
    assert " 0 checkpoints" not in out.stdout, out.stdout
