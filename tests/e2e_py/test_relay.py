"""End-to-end behaviour of the relay binary, seen from devices using the `websockets` library."""

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.asyncio.client import connect

from conftest import RELAY_BIN, Relay, body_of, run


async def closed_code(dev, timeout=5.0) -> int:
    """Reads until the relay closes the connection; returns the close code."""
    try:
        while True:
            await asyncio.wait_for(dev.ws.recv(), timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


@run
async def test_two_devices_exchange_both_ways(relay):
    alice = await relay.connect("alice", "phone")
    bob = await relay.connect("bob", "laptop", token=relay.token("bob", "laptop", "--urgent"))
    assert await alice.handshake() == []
    assert await bob.handshake() == []
    assert alice.hello["v"] == 1 and alice.hello["user"] == "alice"

    acc = await alice.send_ok(["bob"], b"hello bob")
    got = await bob.expect("deliver")
    assert body_of(got) == b"hello bob"
    assert got["seq"] == acc["seq"] and got["ts"] == acc["ts"]
    assert got["from"] == {"user": "alice", "device": "phone"}
    assert got["urgent"] is False

    acc2 = await bob.send_ok(["alice"], b"hi alice", urgent=True)
    got2 = await alice.expect("deliver")
    assert body_of(got2) == b"hi alice" and got2["urgent"] is True
    assert acc2["seq"] > acc["seq"]


@run
async def test_every_device_of_recipient_and_senders_other_devices_get_it(relay):
    devices = {}
    for user, dev in [("alice", "phone"), ("alice", "laptop"), ("bob", "phone"), ("bob", "tablet")]:
        devices[(user, dev)] = await relay.connect(user, dev)
        await devices[(user, dev)].handshake()
    sender = devices[("alice", "phone")]
    acc = await sender.send_ok(["bob"], b"to all of bob")
    for key in [("alice", "laptop"), ("bob", "phone"), ("bob", "tablet")]:
        got = await devices[key].expect("deliver")
        assert got["id"] == acc["id"] and body_of(got) == b"to all of bob", key
    # The sending device itself gets only `accepted`, no copy.
    with pytest.raises(asyncio.TimeoutError):
        await sender.recv(timeout=0.5)


@run
async def test_offline_device_gets_queue_in_order_then_synced(relay):
    bob = await relay.online("bob", "phone")
    await bob.close()  # bob is now a known device, offline
    alice = await relay.online("alice", "phone")
    sent = []
    for i in range(300):  # more than one replay page
        sent.append((await alice.send_ok(["bob"], f"m{i}".encode()))["id"])

    bob = await relay.connect("bob", "phone")
    delivered = await bob.handshake()
    assert [d["id"] for d in delivered] == sent
    seqs = [d["seq"] for d in delivered]
    assert seqs == sorted(seqs)
    # Live traffic follows the replay.
    live = await alice.send_ok(["bob"], b"live")
    assert (await bob.expect("deliver"))["id"] == live["id"]


@run
async def test_live_sends_during_replay_keep_order_without_gaps(relay):
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")
    sent = [(await alice.send_ok(["bob"], b"queued"))["id"] for _ in range(500)]

    async def keep_sending():
        for _ in range(200):
            sent.append((await alice.send_ok(["bob"], b"during replay"))["id"])

    bob = await relay.connect("bob", "phone")
    sender = asyncio.create_task(keep_sending())
    got = []
    await bob.expect("hello")
    while len(got) < 700:
        frame = await bob.recv()
        if frame["type"] == "deliver":
            got.append(frame["id"])
        else:
            assert frame["type"] == "synced"
    await sender
    assert got == sent


@run
async def test_duplicate_send_is_idempotent(relay):
    alice = await relay.connect("alice", "phone")
    bob = await relay.connect("bob", "phone")
    await alice.handshake()
    await bob.handshake()
    msg_id = str(uuid.uuid4())
    first = await alice.send_ok(["bob"], b"once", msg_id=msg_id)
    again = await alice.send_ok(["bob"], b"once", msg_id=msg_id)
    assert first["duplicate"] is False and again["duplicate"] is True
    assert again["seq"] == first["seq"]
    assert (await bob.expect("deliver"))["id"] == msg_id
    with pytest.raises(asyncio.TimeoutError):
        await bob.recv(timeout=0.5)
    # Still idempotent after a restart (the record is durable).
    await alice.close()
    await bob.close()
    relay.restart()
    alice = await relay.online("alice", "phone")
    assert (await alice.send_ok(["bob"], b"once", msg_id=msg_id))["duplicate"] is True


@run
async def test_ack_removes_and_unacked_is_redelivered(relay):
    bob = await relay.online("bob", "phone")
    alice = await relay.online("alice", "phone")
    a = await alice.send_ok(["bob"], b"will ack")
    b = await alice.send_ok(["bob"], b"will not ack")
    assert (await bob.expect("deliver"))["id"] == a["id"]
    assert (await bob.expect("deliver"))["id"] == b["id"]
    await bob.ack([a["seq"]])
    await asyncio.sleep(0.2)
    await bob.close()

    bob = await relay.connect("bob", "phone")
    replay = await bob.handshake()
    assert [d["id"] for d in replay] == [b["id"]]
    await bob.ack([b["seq"]])
    await asyncio.sleep(0.2)
    await bob.close()
    bob = await relay.connect("bob", "phone")
    assert await bob.handshake() == []


@run
async def test_browser_style_subprotocol_auth(relay):
    token = relay.token("carol", "browser")
    ws = await connect(
        relay.url,
        subprotocols=["relay.v1", f"bearer.{token}"],
        origin="http://localhost:5173",
        compression=None,
    )
    assert ws.subprotocol == "relay.v1"
    hello = json.loads(await ws.recv())
    assert hello["type"] == "hello" and hello["device"] == "browser"
    await ws.close()


def upgrade_status(relay, headers=None, **kw) -> int:
    async def attempt():
        try:
            ws = await connect(relay.url, additional_headers=headers or {}, compression=None, **kw)
        except InvalidStatus as e:
            return e.response.status_code
        await ws.close()
        return 101

    return asyncio.run(attempt())


def test_bad_tokens_and_origins_rejected_before_upgrade(relay, tmp_path):
    other_keys = tmp_path / "other-keys"
    subprocess.run([str(RELAY_BIN), "keygen", "--out-dir", str(other_keys)], check=True, capture_output=True)
    forged = relay.token("alice", "phone", "--key", str(other_keys / "token-signing-key.pem"))
    expired = relay.token("alice", "phone", "--expires-at", str(int(time.time()) - 3600))
    wrong_aud = relay.token("alice", "phone", "--audience", "someone-else")
    good = relay.token("alice", "phone")

    assert upgrade_status(relay) == 401
    for bad in [forged, expired, wrong_aud, "not-a-jwt", good[:-4] + "AAAA"]:
        assert upgrade_status(relay, {"Authorization": f"Bearer {bad}"}) == 401
    assert upgrade_status(relay, {"Authorization": f"Bearer {good}"}, origin="https://evil.example") == 403
    assert upgrade_status(relay, {"Authorization": f"Bearer {good}"}) == 101
    # Tokens in the URL are never accepted.
    async def url_token():
        try:
            await connect(relay.url + f"?access_token={good}", compression=None)
        except InvalidStatus as e:
            return e.response.status_code
    assert asyncio.run(url_token()) == 401
    metrics = relay.metrics()
    assert 'relay_handshakes_total{outcome="bad_signature"}' in metrics
    assert 'relay_handshakes_total{outcome="token_expired"}' in metrics
    assert 'relay_handshakes_total{outcome="forbidden_origin"}' in metrics
    # Logs carry reasons, never a token.
    assert good not in relay.logs() and forged not in relay.logs()


@run
async def test_oversized_frame_closed_with_1009(make_relay):
    relay = make_relay({"RELAY_LIMITS__MAX_BODY_BYTES": "1024"})
    alice = await relay.online("alice", "phone", max_size=None)
    assert alice.hello["max_body_bytes"] == 1024
    # Just over the body limit but within the frame limit: rejected, connection survives.
    msg_id = await alice.send(["bob"], b"x" * 1025)
    reply = await alice.recv()
    assert reply == {"type": "rejected", "id": msg_id, "code": "too_large", "retry": False}
    # A frame beyond the WebSocket limit closes the connection with 1009.
    await alice.send(["bob"], b"x" * 200_000)
    assert await closed_code(alice) == 1009


@run
async def test_malformed_frames_get_errors_then_repeated_abuse_closes(relay):
    alice = await relay.online("alice", "phone")
    cases = [
        ("{oops", "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": "send", "to": ["bob"]}), "bad_request"),
        (json.dumps({"type": "send", "id": str(uuid.uuid4()), "to": ["bob"], "body": "%%%"}), "bad_base64"),
        (json.dumps({"type": "send", "id": str(uuid.uuid4()), "to": ["no spaces"], "body": ""}), "bad_request"),
    ]
    for text, code in cases:
        await alice.ws.send(text)
        frame = await alice.expect("error")
        assert frame["code"] == code, (text, frame)
    await alice.ws.send(b"\x00binary")
    assert (await alice.expect("error"))["code"] == "binary_not_supported"
    # Still usable after isolated mistakes.
    await alice.send_ok(["bob"], b"still here")
    # Default budget: 10 errors a minute; this is the 7th..11th.
    for _ in range(5):
        await alice.ws.send("{oops")
    assert await closed_code(alice) == 1008


@run
async def test_rate_limit(make_relay):
    relay = make_relay({"RELAY_LIMITS__SEND_RATE_PER_S": "1", "RELAY_LIMITS__SEND_BURST": "3"})
    alice = await relay.online("alice", "phone")
    codes = []
    for _ in range(5):
        msg_id = await alice.send(["bob"], b"x")
        reply = await alice.recv()
        codes.append(reply["type"] if reply["type"] == "accepted" else reply["code"])
        if reply["type"] == "rejected":
            assert reply["retry"] is True
    assert codes == ["accepted"] * 3 + ["rate_limited"] * 2


@run
async def test_second_connection_displaces_first(relay):
    first = await relay.online("alice", "phone")
    second = await relay.online("alice", "phone")
    assert await closed_code(first) == 4002
    bob = await relay.online("bob", "phone")
    await bob.send_ok(["alice"], b"to the new connection")
    assert body_of(await second.expect("deliver")) == b"to the new connection"


@run
async def test_idle_logoff(make_relay):
    relay = make_relay({"RELAY_SESSION__IDLE_TIMEOUT": "2s", "RELAY_SESSION__PING_INTERVAL": "1s"})
    idle = await relay.online("alice", "phone")
    active = await relay.online("bob", "phone")
    started = time.monotonic()
    # `active` frames reset the timer; pongs (the client answers pings) do not.
    for _ in range(6):
        await asyncio.sleep(0.5)
        await active.ws.send(json.dumps({"type": "active"}))
    frame = await idle.recv(timeout=5)
    assert frame == {"type": "session_expired", "idle_timeout_s": 2}
    assert await closed_code(idle) == 4001
    assert 1.5 <= time.monotonic() - started <= 5
    await active.send_ok(["alice"], b"still active")
    assert "relay_idle_logoffs_total 1" in relay.metrics()
    # The automatic logoff is in the audit trail.
    status, page = relay.admin("GET", "/v1/audit?user=alice&device=phone")
    assert status == 200
    assert [e["event"] for e in page["events"]] == ["connect", "idle_logoff"], page


@run
async def test_accepted_survives_kill_9(relay):
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")
    accepted = [(await alice.send_ok(["bob"], f"durable {i}".encode()))["id"] for i in range(20)]
    relay.kill()  # no chance to flush anything
    relay.start()
    bob = await relay.connect("bob", "phone")
    assert [d["id"] for d in await bob.handshake()] == accepted


@run
async def test_graceful_shutdown_closes_with_1012_and_loses_nothing(relay):
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")
    ids = [await alice.send(["bob"], b"in flight") for _ in range(200)]
    relay.proc.send_signal(signal.SIGTERM)
    accepted, code = [], None
    try:
        while True:
            frame = await alice.recv(timeout=10)
            if frame["type"] == "accepted":
                accepted.append(frame["id"])
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
    assert code == 1012
    assert relay.proc.wait(timeout=15) == 0
    relay.start()
    bob = await relay.connect("bob", "phone")
    delivered = [d["id"] for d in await bob.handshake()]
    # Everything accepted is there, in send order; nothing else appears.
    assert set(accepted) <= set(delivered)
    assert delivered == [i for i in ids if i in set(delivered)]


@run
async def test_at_rest_encryption_and_key_rotation(make_relay, tmp_path):
    k1 = "k1:" + __import__("base64").b64encode(os.urandom(32)).decode()
    k2 = "k2:" + __import__("base64").b64encode(os.urandom(32)).decode()
    relay = make_relay({"RELAY_AT_REST__KEYS": k1, "RELAY_AT_REST__ACTIVE": "k1"})
    await relay.register_offline("bob", "phone")
    alice = await relay.online("alice", "phone")
    canary = b"CANARY-PAYLOAD-" + uuid.uuid4().hex.encode()
    await alice.send_ok(["bob"], canary)
    await alice.close()
    relay.kill()  # leave the journal as written

    blobs = b"".join(p.read_bytes() for p in relay.store_files())
    assert len(blobs) > 0
    assert canary not in blobs
    assert __import__("base64").b64encode(canary)[:24] not in blobs

    # Rotate: k2 seals new data, k1 stays readable.
    relay.env = {"RELAY_AT_REST__KEYS": f"{k1},{k2}", "RELAY_AT_REST__ACTIVE": "k2"}
    relay.start()
    bob = await relay.connect("bob", "phone")
    replay = await bob.handshake()
    assert [body_of(d) for d in replay] == [canary]
    alice = await relay.online("alice", "phone")
    await alice.send_ok(["bob"], b"sealed with k2")
    assert body_of(await bob.expect("deliver")) == b"sealed with k2"
    await bob.close()
    await alice.close()

    # Without the key that sealed them (k1 removed too early), rows do not open: they are not
    # delivered, not taken for tampering, and not dropped. Newer messages still flow.
    relay.stop()
    k3 = "k3:" + __import__("base64").b64encode(os.urandom(32)).decode()
    relay.env = {"RELAY_AT_REST__KEYS": f"{k2},{k3}", "RELAY_AT_REST__ACTIVE": "k3"}
    relay.start()
    bob = await relay.connect("bob", "phone")
    assert [body_of(d) for d in await bob.handshake()] == [b"sealed with k2"]
    alice = await relay.online("alice", "phone")
    await alice.send_ok(["bob"], b"sealed with k3")
    assert body_of(await bob.expect("deliver")) == b"sealed with k3"
    await bob.close()
    await alice.close()
    metrics = relay.metrics()
    assert "relay_store_unknown_key_rows_total 1" in metrics
    assert "relay_store_corrupt_rows_total 0" in metrics or "relay_store_corrupt_rows_total" not in metrics

    # Once the key is back, the row it could not open is delivered, in order.
    relay.stop()
    relay.env = {"RELAY_AT_REST__KEYS": f"{k1},{k2},{k3}", "RELAY_AT_REST__ACTIVE": "k3"}
    relay.start()
    bob = await relay.connect("bob", "phone")
    assert [body_of(d) for d in await bob.handshake()] == [canary, b"sealed with k2", b"sealed with k3"]
    await bob.close()

    # With none of its keys, the store does not open at all (its ids key is sealed too).
    relay.stop()
    k4 = "k4:" + __import__("base64").b64encode(os.urandom(32)).decode()
    proc = subprocess.run([str(RELAY_BIN)], env={**relay._env(), "RELAY_AT_REST__KEYS": k4,
                                                 "RELAY_AT_REST__ACTIVE": "k4"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "at-rest keys" in proc.stderr, proc.stderr


def test_bad_config_exits_64_before_binding(tmp_path):
    r = Relay(tmp_path / "data", {"RELAY_LIMITS__MAX_BODY_BYTES": "lots", "RELAY_MODE": "production"})
    proc = subprocess.run([str(RELAY_BIN)], env=r._env(), capture_output=True, text=True, timeout=20)
    assert proc.returncode == 64, proc.stderr
    assert "max_body_bytes" in proc.stderr or "invalid" in proc.stderr
    # Nothing was created or bound.
    assert not (tmp_path / "data").exists()
    proc = subprocess.run([str(RELAY_BIN)], env={**r._env(), "RELAY_LIMITS__MAX_BODY_BYTES": "1000"},
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 64
    assert "auth.public_keys" in proc.stderr and "at_rest.keys" in proc.stderr


def test_health_endpoints(relay):
    import urllib.request

    for port in (relay.port, relay.admin_port):
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                assert r.status == 200
    metrics = relay.metrics()
    assert "relay_build_info" in metrics


@run
async def test_sequence_numbers_are_exact_in_javascript(relay):
    alice = await relay.online("alice", "phone")
    acc = await alice.send_ok(["bob"], b"x")
    assert 0 < acc["seq"] < 2**53


@run
async def test_wss_with_in_app_tls(make_relay, tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    relay = make_relay({"RELAY_TLS__CERT_FILE": str(cert), "RELAY_TLS__KEY_FILE": str(key)})
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.set_alpn_protocols(["http/1.1"])
    url = relay.url.replace("ws://", "wss://")
    token = relay.token("alice", "phone")
    async with connect(url, ssl=ctx, additional_headers={"Authorization": f"Bearer {token}"}, compression=None) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        tls = ws.transport.get_extra_info("ssl_object")
        # rustls speaks only TLS 1.2 and 1.3; the listener advertises only http/1.1.
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() == "http/1.1"
    # Plain ws:// to the TLS listener gets nowhere.
    with pytest.raises(Exception):
        await connect(relay.url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=5)


@run
async def test_slow_consumer_is_disconnected_and_loses_nothing(make_relay):
    relay = make_relay({"RELAY_LIMITS__OUTBOUND_QUEUE": "16", "RELAY_LIMITS__WRITE_TIMEOUT": "1s"})
    # bob reads nothing: the client library's queue fills, then TCP, then the relay's queue.
    bob = await relay.online("bob", "phone", max_queue=1)
    alice = await relay.online("alice", "phone")
    body = b"x" * 16_000
    sent = [(await alice.send_ok(["bob"], body))["id"] for _ in range(600)]
    # The close frame (4003) sits behind the unread data; a client that never reads may only see
    # the connection drop. The relay's own count is the proof.
    assert await closed_code(bob, timeout=15) in (4003, None)
    assert "relay_slow_consumer_disconnects_total 1" in relay.metrics()
    # Everything is still queued for bob: a reconnect replays all of it, in order.
    bob = await relay.connect("bob", "phone", max_size=None)
    assert [d["id"] for d in await bob.handshake()] == sent


@run
async def test_connection_cap_and_handshake_timeout(make_relay):
    import socket as pysocket

    relay = make_relay({"RELAY_LIMITS__MAX_CONNECTIONS": "2", "RELAY_LIMITS__HANDSHAKE_TIMEOUT": "1s"})
    a = await relay.connect("alice", "phone")
    b = await relay.connect("bob", "phone")
    await a.handshake()
    await b.handshake()
    # A third connection is refused outright (the socket is dropped, nothing is parsed).
    with pytest.raises(Exception):
        await relay.connect("carol", "phone", open_timeout=5)
    assert 'relay_handshakes_total{outcome="over_capacity"} 1' in relay.metrics()
    # A freed slot is usable again.
    await b.close()
    await asyncio.sleep(0.3)
    c = await relay.online("carol", "phone")
    await c.close()
    await a.close()
    await asyncio.sleep(0.3)

    # A client that connects and never sends its request is cut off after the handshake timeout.
    def silent() -> float:
        with pysocket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            started = time.monotonic()
            assert s.recv(1) == b""  # closed by the relay
            return time.monotonic() - started

    waited = await asyncio.to_thread(silent)
    assert 0.5 <= waited <= 5, waited
