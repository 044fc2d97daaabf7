"""Push wake-ups and urgent pages, end to end: the real relay against the fake APNs/FCM servers."""

import asyncio
import json
import re
import time

import pytest

from conftest import register_push, run

CANARY = b"PATIENT-CANARY Jane Doe, MRN 555-0199, troponin 2.3"

# Every key any push may contain, at any depth (APNs payload, FCM message).
ALLOWED_KEYS = {
    "aps", "alert", "loc-key", "mutable-content", "category", "interruption-level", "badge",
    "sound", "content-available", "mid", "logout", "message", "token", "data", "kind", "android",
    "priority", "ttl", "collapse_key", "notification", "title_loc_key", "channel_id",
    "notification_priority",
}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from keys(v)


def assert_no_phi(req, *names):
    """Only allow-listed keys; no body, user or device name anywhere in headers or payload."""
    assert req["violation"] is None, req
    assert set(keys(req["body"])) <= ALLOWED_KEYS, req["body"]
    text = json.dumps(req["body"]) + json.dumps(req["headers"]) + req["path"]
    for forbidden in ("PATIENT-CANARY", "Jane", *names):
        assert forbidden not in text, (forbidden, req)


async def wait_for(fn, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if len(got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


@run
async def test_offline_device_gets_exactly_one_wake_up_without_phi(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env())
    phone = await relay.online("drbob", "iphone")
    apns_token = await register_push(phone)
    await phone.close()
    android = await relay.online("drcarol", "pixel")
    fcm_token = await register_push(android, platform="fcm", environment="production")
    await android.close()

    alice = await relay.online("nurse-alice", "web")
    accepted = await alice.send_ok(["drbob", "drcarol"], CANARY)

    apns = await wait_for(lambda: fake_push.requests("apns", apns_token), 1)
    fcm = await wait_for(lambda: fake_push.requests("fcm", fcm_token), 1)
    await asyncio.sleep(1.0)  # nothing else may follow
    apns, fcm = fake_push.requests("apns", apns_token), fake_push.requests("fcm", fcm_token)
    assert len(apns) == 1 and len(fcm) == 1, (apns, fcm)
    for req in apns + fcm:
        assert_no_phi(req, "drbob", "drcarol", "nurse-alice", "iphone", "pixel")
        assert req["status"] == 200
    a = apns[0]
    assert a["path"] == f"/3/device/{apns_token}"
    assert a["headers"]["apns-topic"] == "com.example.relay"
    assert a["headers"]["apns-push-type"] == "alert"
    assert a["body"]["mid"] == accepted["id"] and UUID.match(a["body"]["mid"])
    assert a["body"]["aps"]["mutable-content"] == 1
    f = fcm[0]["body"]["message"]
    assert f["token"] == fcm_token and f["data"]["mid"] == accepted["id"]
    assert f["android"]["priority"] == "NORMAL"
    # The connected sender gets no push; the OAuth exchange happened once.
    assert len(fake_push.requests("oauth")) == 1
    assert 'relay_push_total{provider="apns",kind="wake",outcome="delivered"} 1' in relay.metrics()
    # The store never holds the push token in clear.
    for path in relay.store_files():
        assert apns_token.encode() not in path.read_bytes(), path


@run
async def test_a_burst_of_50_messages_coalesces_into_one_push(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env())
    phone = await relay.online("drbob", "iphone")
    token = await register_push(phone)
    await phone.close()
    alice = await relay.online("nurse-alice", "web")
    for i in range(50):
        await alice.send_ok(["drbob"], b"burst %d" % i)
    await wait_for(lambda: fake_push.requests("apns", token), 1)
    await asyncio.sleep(1.5)
    assert len(fake_push.requests("apns", token)) == 1
    assert 'relay_push_wakeups_total{result="coalesced"} 49' in relay.metrics()

    # Connecting resets the window: the next message after a reconnect wakes the device again.
    phone = await relay.online("drbob", "iphone")
    await phone.close()
    await alice.send_ok(["drbob"], b"after reconnect")
    assert len(await wait_for(lambda: fake_push.requests("apns", token), 2)) == 2


async def offline_iphone_and_a_pager(relay):
    """drbob's iPhone, registered for push and offline; nurse-alice online, allowed to page.
    Returns the iPhone's push token and nurse-alice."""
    phone = await relay.online("drbob", "iphone")
    token = await register_push(phone)
    await phone.close()
    alice = await relay.online("nurse-alice", "web", token=relay.token("nurse-alice", "web", "--urgent"))
    return token, alice


@run
async def test_unacked_urgent_message_is_paged_again_until_the_limit(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(urgent_ack_timeout="1s", urgent_repeats=2))
    token, alice = await offline_iphone_and_a_pager(relay)
    await alice.send_ok(["drbob"], CANARY, urgent=True)

    first = await wait_for(lambda: fake_push.requests("apns", token), 1)
    assert first[0]["headers"]["apns-priority"] == "10"
    assert first[0]["body"]["aps"]["interruption-level"] == "time-sensitive"
    pages = await wait_for(lambda: fake_push.requests("apns", token), 3, timeout=6)
    await asyncio.sleep(1.5)
    pages = fake_push.requests("apns", token)
    assert len(pages) == 3, "one page at once, then urgent_repeats = 2 more"
    gaps = [b["at_ms"] - a["at_ms"] for a, b in zip(pages, pages[1:])]
    assert all(g >= 900 for g in gaps), gaps
    for p in pages:
        assert_no_phi(p, "drbob", "nurse-alice")
        assert "apns-collapse-id" not in p["headers"], "pages must not replace each other"
    assert 'relay_push_escalations_total{result="exhausted"} 1' in relay.metrics()


@run
async def test_urgent_paging_stops_when_the_device_acks(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(urgent_ack_timeout="1s", urgent_repeats=5))
    phone = await relay.online("drbob", "iphone")
    token = await register_push(phone)
    alice = await relay.online("nurse-alice", "web", token=relay.token("nurse-alice", "web", "--urgent"))
    await alice.send_ok(["drbob"], b"page", urgent=True)
    # Connected (perhaps a zombie socket in a pocket): delivered live, not acked → paged again.
    delivered = await phone.expect("deliver")
    assert delivered["urgent"] is True
    await wait_for(lambda: fake_push.requests("apns", token), 1, timeout=3)
    assert len(fake_push.requests("apns", token)) == 1
    await phone.ack([delivered["seq"]])
    await asyncio.sleep(2.5)
    assert len(fake_push.requests("apns", token)) == 1, "no page after the ack"
    assert 'relay_push_escalations_total{result="acknowledged"} 1' in relay.metrics()


@run
async def test_a_dead_token_is_removed_and_never_pushed_again(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(coalesce_window="1s"))
    phone = await relay.online("drbob", "iphone")
    token = await register_push(phone)
    await phone.close()
    fake_push.script("apns", 410, "Unregistered", token=token)
    alice = await relay.online("nurse-alice", "web")
    await alice.send_ok(["drbob"], b"one")
    await wait_for(lambda: fake_push.requests("apns", token), 1)
    await asyncio.sleep(1.5)  # past the coalescing window
    await alice.send_ok(["drbob"], b"two")
    await asyncio.sleep(1.5)
    reqs = fake_push.requests("apns", token)
    assert [r["status"] for r in reqs] == [410], reqs
    m = relay.metrics()
    assert 'relay_push_tokens_removed_total{provider="apns"} 1' in m
    assert 'relay_push_wakeups_total{result="no_token"} 1' in m
    # The device's messages are untouched by push trouble.
    phone = await relay.online("drbob", "iphone")
    assert len(phone.hello) > 0


@run
async def test_a_503_storm_is_retried_with_backoff_and_delivery_is_unaffected(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(max_attempts=4))
    phone = await relay.online("drbob", "iphone")
    token = await register_push(phone)
    await phone.close()
    tablet = await relay.online("drbob", "ipad")
    fake_push.script("apns", 503, "ServiceUnavailable", times=100)
    alice = await relay.online("nurse-alice", "web")
    started = time.monotonic()
    for i in range(100):
        await alice.send_ok(["drbob"], b"m%d" % i)
    for i in range(100):
        assert (await tablet.expect("deliver"))["body"]
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"delivery took {elapsed:.1f}s during the push outage"

    tries = await wait_for(lambda: fake_push.requests("apns", token), 4, timeout=15)
    await asyncio.sleep(2)
    tries = fake_push.requests("apns", token)
    assert [t["status"] for t in tries] == [503] * 4, "bounded by push.max_attempts"
    gaps = [b["at_ms"] - a["at_ms"] for a, b in zip(tries, tries[1:])]
    assert sum(gaps) >= 300, gaps  # backoff, not a hot loop
    m = relay.metrics()
    assert 'relay_push_total{provider="apns",kind="wake",outcome="retried"} 3' in m
    assert 'relay_push_total{provider="apns",kind="wake",outcome="gave_up"} 1' in m


@run
async def test_push_token_registration_is_validated_and_removable(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(app_ids='["com.example.relay"]'))
    phone = await relay.online("drbob", "iphone")
    await phone.ws.send(json.dumps({
        "type": "push_token", "platform": "apns", "token": "not-hex",
        "environment": "sandbox", "app_id": "com.example.relay",
    }))
    err = await phone.expect("error")
    assert err["code"] == "bad_request" and "not-hex" not in err["message"]
    await phone.ws.send(json.dumps({
        "type": "push_token", "platform": "apns", "token": "ab" * 32,
        "environment": "sandbox", "app_id": "com.other.app",
    }))
    assert (await phone.expect("error"))["code"] == "bad_request"
    await phone.ws.send(json.dumps({"type": "push_token", "platform": "webpush", "token": "x"}))
    assert (await phone.expect("error"))["code"] == "bad_request"

    token = await register_push(phone)
    await phone.ws.send(json.dumps({"type": "push_token_remove"}))
    assert await phone.recv() == {"type": "push_token_saved", "registered": False}
    await phone.close()
    alice = await relay.online("nurse-alice", "web")
    await alice.send_ok(["drbob"], b"x")
    await asyncio.sleep(1.0)
    assert fake_push.requests("apns", token) == []
    assert 'relay_push_wakeups_total{result="no_token"} 1' in relay.metrics()


def test_relay_refuses_to_start_with_unusable_push_credentials(tmp_path, fake_push):
    import subprocess
    from conftest import RELAY_BIN, Relay

    bad = tmp_path / "bad.p8"
    bad.write_text("not a key")
    r = Relay(tmp_path / "data", fake_push.relay_env() | {"RELAY_PUSH__APNS__KEY_FILE": str(bad)})
    out = subprocess.run([str(RELAY_BIN)], env=r._env(), capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "push" in (out.stdout + out.stderr)


@run
async def test_urgent_sending_is_authorised_by_the_token_and_rate_limited(make_relay):
    relay = make_relay({"RELAY_LIMITS__URGENT_PER_MINUTE": "3"})
    plain = await relay.online("nurse-plain", "web")
    await plain.send(["drbob"], b"page?", urgent=True)
    reply = await plain.recv()
    assert reply["type"] == "rejected" and reply["code"] == "urgent_not_allowed" and reply["retry"] is False, reply
    await plain.send_ok(["drbob"], b"not urgent is fine")
    pager = await relay.online("nurse-oncall", "web", token=relay.token("nurse-oncall", "web", "--urgent"))
    for _ in range(3):
        await pager.send_ok(["drbob"], b"page", urgent=True)
    await pager.send(["drbob"], b"one too many", urgent=True)
    reply = await pager.recv()
    assert reply["type"] == "rejected" and reply["code"] == "rate_limited" and reply["retry"] is True, reply
    await pager.send_ok(["drbob"], b"normal messages still go")


@run
async def test_many_urgent_messages_make_one_escalation_per_device(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env(urgent_ack_timeout="1s", urgent_repeats=1))
    token, alice = await offline_iphone_and_a_pager(relay)
    for i in range(20):
        await alice.send_ok(["drbob"], f"page {i}".encode(), urgent=True)
    await wait_for(lambda: fake_push.requests("apns", token), 1)
    # One page at once, not one per message, then one repage (urgent_repeats = 1) for the whole
    # escalation once the ack timeout has passed. Told apart by the fake's clock, not by when
    # this test looks: twenty sends may outlast the timeout on a loaded Cassandra.
    await asyncio.sleep(2.5)
    pages = fake_push.requests("apns", token)
    assert len(pages) == 2, len(pages)
    assert pages[1]["at_ms"] - pages[0]["at_ms"] >= 900, "the second page is the repage, after the ack timeout"
    assert 'relay_push_escalations_total{result="exhausted"} 1' in relay.metrics()
