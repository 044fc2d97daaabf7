"""Fault test: the database goes away while devices are sending, then comes back.

Runs in the Cassandra pass of scripts/test (E2E_BACKEND=cassandra), which starts Cassandra.
"""

import asyncio
import subprocess
import time
import urllib.request

from conftest import BACKEND, ROOT

from conftest import run


def ready(relay) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def cassandra(cmd):
    subprocess.run([str(ROOT / "scripts" / "cassandra"), cmd], check=True, capture_output=True, timeout=180)


@run
async def test_database_outage_loses_nothing_and_recovers_alone(make_relay):
    assert BACKEND == "cassandra", "run with E2E_BACKEND=cassandra (scripts/test does)"
    relay = make_relay({"RELAY_STORAGE__SCYLLA__REQUEST_TIMEOUT": "1s"})
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")

    outcome = {}  # id -> reply frame
    order = []

    async def send_one(msg_id=None):
        msg_id = await alice.send(["bob"], b"during outage", msg_id=msg_id)
        reply = await alice.recv(timeout=15)
        assert reply["id"] == msg_id, reply
        assert reply["type"] in ("accepted", "rejected"), reply
        if reply["type"] == "rejected":
            assert reply["retry"] is True and reply["code"] in ("unavailable", "shutting_down"), reply
        outcome[msg_id] = reply
        return msg_id

    for _ in range(20):
        order.append(await send_one())
    assert all(r["type"] == "accepted" for r in outcome.values())

    stopping = asyncio.create_task(asyncio.to_thread(cassandra, "pause"))
    saw_not_ready = False
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        order.append(await send_one())
        saw_not_ready = saw_not_ready or not ready(relay)
        await asyncio.sleep(0.05)
    await stopping
    rejected_during = [i for i in order if outcome[i]["type"] == "rejected"]
    assert rejected_during, "no send was refused while the database was down"
    assert saw_not_ready, "/readyz never reported the outage"

    await asyncio.to_thread(cassandra, "resume")
    deadline = time.monotonic() + 60
    while not ready(relay):
        assert time.monotonic() < deadline, "relay did not recover by itself"
        await asyncio.sleep(0.5)

    # Retry every refused send with its own id until it is accepted.
    for msg_id in [i for i in order if outcome[i]["type"] == "rejected"]:
        for _ in range(30):
            await send_one(msg_id)
            if outcome[msg_id]["type"] == "accepted":
                break
            await asyncio.sleep(1)
        assert outcome[msg_id]["type"] == "accepted", outcome[msg_id]

    bob = await relay.connect("bob", "phone")
    delivered = await bob.handshake()
    ids = [d["id"] for d in delivered]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(ids) == set(order), "an accepted message was lost"
    seqs = [d["seq"] for d in delivered]
    assert seqs == sorted(seqs)
