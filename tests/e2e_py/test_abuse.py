"""One client cannot degrade the relay for everyone else (issue 13): the real relay binary under
a misbehaving session, with a well-behaved client beside it."""

import asyncio
import base64
import json
import os
import time
import uuid

from websockets.exceptions import ConnectionClosed

from conftest import run


def proc_cpu_seconds(pid) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@run
async def test_a_client_that_keeps_sending_what_is_refused_is_closed_with_1008(make_relay):
    relay = make_relay({"RELAY_LIMITS__MAX_BODY_BYTES": "65536"})
    abuser = await relay.online("drflood", "p")
    bystander = await relay.online("nurse", "web")
    oversized = base64.b64encode(os.urandom(65537)).decode()
    cpu_before = proc_cpu_seconds(relay.proc.pid)
    async def flood():
        try:
            for _ in range(1000):
                frame = {"type": "send", "id": str(uuid.uuid4()), "to": ["nurse"], "body": oversized}
                await abuser.ws.send(json.dumps(frame))
        except ConnectionClosed:
            pass

    sending = asyncio.create_task(flood())
    rejected, code = 0, None
    try:
        while True:
            reply = json.loads(await asyncio.wait_for(abuser.ws.recv(), 10))
            assert reply["type"] == "rejected" and reply["code"] == "too_large", reply
            rejected += 1
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
    await sending
    assert code == 1008, (code, rejected)
    assert rejected == 100, rejected  # limits.max_refused_per_minute
    # The refusals cost the relay little, and the bystander never noticed.
    assert proc_cpu_seconds(relay.proc.pid) - cpu_before < 5.0
    started = time.monotonic()
    await bystander.send_ok(["drflood"], b"still fine")
    assert time.monotonic() - started < 1.0


@run
async def test_a_client_over_its_byte_budget_is_read_slower_and_loses_nothing(make_relay):
    relay = make_relay({"RELAY_LIMITS__INBOUND_BYTES_PER_S": "1000000", "RELAY_LIMITS__MAX_BODY_BYTES": "100000"})
    await relay.register_offline("nurse", "web")
    sender = await relay.online("drbytes", "p")
    body = os.urandom(100_000)  # ~133 KB frames; the burst is two maximal frames
    started = time.monotonic()
    ids = [await sender.send(["nurse"], body) for _ in range(30)]
    replies = [await sender.recv(timeout=30) for _ in ids]
    elapsed = time.monotonic() - started
    assert [r["type"] for r in replies] == ["accepted"] * 30 and [r["id"] for r in replies] == ids
    # ~4 MB at 1 MB/s after a ~270 KB burst.
    assert elapsed > 3.0, elapsed
    assert "relay_inbound_paused_total 0\n" not in relay.metrics()
    nurse = await relay.connect("nurse", "web")
    assert [d["id"] for d in await nurse.handshake()] == ids
