"""Remote logout, account lock, the admin API and the access audit trail, end to end: the real
relay (embedded store, or Cassandra with E2E_BACKEND=cassandra) driven by `websockets` clients,
the admin API over HTTP, and the fake APNs/FCM servers for background logout pushes."""

import asyncio
import json
import subprocess
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import ADMIN_TOKENS, RELAY_BIN, register_push, run
from test_push import assert_no_phi, wait_for

LOGGED_OUT = 4006
CANARY = b"PATIENT-CANARY Jane Doe, MRN 555-0199, troponin 2.3"


async def upgrade_status(relay, token, headers=None) -> int:
    """HTTP status of an upgrade attempt (101 when it succeeded)."""
    try:
        ws = await connect(
            relay.url, additional_headers={"Authorization": f"Bearer {token}", **(headers or {})}, compression=None
        )
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    return 101


async def frames_until_close(dev, timeout=15.0):
    """Every frame the relay sends until it closes; and the close code."""
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(dev.ws.recv(), timeout)))
    except ConnectionClosed as e:
        return frames, (e.rcvd.code if e.rcvd else None)


async def ack_logout(dev, signal):
    await dev.ws.send(json.dumps({"type": "logout_ack", "signal": signal}))


def audit(relay, user, as_="support-desk", **params):
    query = "&".join(f"{k}={v}" for k, v in {"user": user, **params}.items())
    status, page = relay.admin("GET", f"/v1/audit?{query}", as_=as_)
    assert status == 200, page
    return page


def audit_events(relay, user, **params):
    """Every event of the query, following `next` across pages."""
    events, cursor = [], None
    while True:
        extra = dict(params, **({"cursor": cursor} if cursor else {}))
        page = audit(relay, user, **extra)
        events += page["events"]
        cursor = page.get("next")
        if not cursor:
            return events


def wait_until(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def org_of(relay, user):
    status, view = relay.admin("GET", f"/v1/users/{user}/devices", as_="account-service")
    return view.get("org") if status == 200 else None


@run
async def test_live_device_is_logged_out_within_a_second_and_its_token_refused(relay):
    token = relay.token("drbob", "iphone")
    phone = await relay.connect("drbob", "iphone", token=token)
    await phone.handshake()
    started = time.monotonic()
    status, out = relay.admin("POST", "/v1/devices/iphone/logout", {"user": "drbob", "reason": "lost_device"})
    assert status == 200, out
    assert out["devices"] == ["iphone"] and out["live"] == ["iphone"] and out["pushed"] == [], out
    frame = await phone.recv()
    assert time.monotonic() - started < 1.0
    assert frame == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}
    # Pending while unconfirmed; confirmed by the ack.
    _, view = relay.admin("GET", "/v1/users/drbob/devices")
    assert view["devices"][0]["logout"]["pending"] is True
    await ack_logout(phone, out["signal"])
    frames, code = await frames_until_close(phone)
    assert (frames, code) == ([], LOGGED_OUT)

    _, view = relay.admin("GET", "/v1/users/drbob/devices")
    device = view["devices"][0]
    assert device["device"] == "iphone" and device["online"] is False
    assert device["logout"]["pending"] is False and device["logout"]["confirmed_at"] >= device["logout"]["requested_at"]
    # The old token is refused before the upgrade; a new login (a newer token) works.
    assert await upgrade_status(relay, token) == 401
    assert 'relay_handshakes_total{outcome="revoked"} 1' in relay.metrics()
    await asyncio.sleep(3.1)  # a token issued more than 2 s after the logout
    again = await relay.online("drbob", "iphone")
    await again.close()


@run
async def test_offline_devices_get_one_background_push_then_logout_first_on_reconnect(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env() | {"RELAY_ACCESS__LOGOUT_ACK_WAIT": "1s"})
    tokens = {d: relay.token("drbob", d) for d in ("iphone", "pixel")}
    phone = await relay.connect("drbob", "iphone", token=tokens["iphone"])
    await phone.handshake()
    apns_token = await register_push(phone)
    await phone.close()
    pixel = await relay.connect("drbob", "pixel", token=tokens["pixel"])
    await pixel.handshake()
    fcm_token = await register_push(pixel, platform="fcm", environment="production")
    await pixel.close()
    alice = await relay.online("nurse-alice", "web")
    await alice.send_ok(["drbob"], CANARY)  # waits in both inboxes
    await wait_for(lambda: fake_push.requests("apns", apns_token), 1)

    status, out = relay.admin("POST", "/v1/users/drbob/logout", {"reason": "lost_device"})
    assert status == 200, out
    assert out["devices"] == ["iphone", "pixel"] and sorted(out["pushed"]) == ["iphone", "pixel"], out

    def logout_pushes():
        apns = [r for r in fake_push.requests("apns", apns_token) if r["headers"].get("apns-push-type") == "background"]
        fcm = [r for r in fake_push.requests("fcm", fcm_token) if r["body"]["message"]["data"].get("kind") == "logout"]
        return apns + fcm

    await wait_for(logout_pushes, 2)
    await asyncio.sleep(0.5)  # nothing else may follow
    pushes = logout_pushes()
    assert len(pushes) == 2, pushes
    for req in pushes:
        assert_no_phi(req, "drbob", "nurse-alice", "iphone", "pixel")
        assert req["status"] == 200
    apns, fcm = pushes
    assert apns["body"] == {"aps": {"content-available": 1}, "logout": out["signal"]}
    assert apns["headers"]["apns-priority"] == "5"
    assert fcm["body"]["message"]["data"] == {"kind": "logout", "logout": out["signal"]}
    assert "notification" not in fcm["body"]["message"]

    # Reconnecting with the old token: `logout` before anything else, no messages, then close.
    phone = await relay.connect("drbob", "iphone", token=tokens["iphone"])
    first = await phone.recv()
    assert first == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}
    await ack_logout(phone, out["signal"])
    frames, code = await frames_until_close(phone)
    assert (frames, code) == ([], LOGGED_OUT)
    # Without an ack the session still closes (after logout_ack_wait), and the next reconnect
    # gets the logout again.
    for _ in range(2):
        pixel = await relay.connect("drbob", "pixel", token=tokens["pixel"])
        frames, code = await frames_until_close(pixel)
        assert [f["type"] for f in frames] == ["logout"] and code == LOGGED_OUT
    assert await upgrade_status(relay, tokens["iphone"]) == 401

    # The push registrations are gone: a new message wakes nobody.
    before = len(fake_push.requests())
    await alice.send_ok(["drbob"], b"after logout")
    await asyncio.sleep(1.0)
    assert len(fake_push.requests()) == before
    via = [(e["device"], e["via"]) for e in audit_events(relay, "drbob") if e["event"] == "logout_delivered"]
    assert ("iphone", "push") in via and ("pixel", "push") in via and ("iphone", "reconnect") in via
    confirmed = [e["device"] for e in audit_events(relay, "drbob") if e["event"] == "logout_confirmed"]
    assert confirmed == ["iphone"]


@run
async def test_password_change_logs_out_every_device_but_the_current_one(relay):
    tokens = {d: relay.token("drcarol", d) for d in ("phone", "tablet", "laptop")}
    devices = {}
    for d, t in tokens.items():
        devices[d] = await relay.connect("drcarol", d, token=t)
        await devices[d].handshake()
    status, out = relay.admin(
        "POST", "/v1/users/drcarol/logout", {"reason": "password_changed", "except_device": "laptop"},
        as_="account-service",
    )
    assert status == 200 and out["devices"] == ["phone", "tablet"], out
    for d in ("phone", "tablet"):
        frame = await devices[d].recv()
        assert frame["type"] == "logout" and frame["reason"] == "password_changed"
        await ack_logout(devices[d], frame["signal"])
        assert (await frames_until_close(devices[d]))[1] == LOGGED_OUT
    # The laptop carries on, and its token still works after a reconnect.
    nurse = await relay.online("nurse-alice", "web")
    await nurse.send_ok(["drcarol"], b"still here?")
    assert (await devices["laptop"].expect("deliver"))["from"]["user"] == "nurse-alice"
    await devices["laptop"].close()
    assert await upgrade_status(relay, tokens["laptop"]) == 101
    for d in ("phone", "tablet"):
        assert await upgrade_status(relay, tokens[d]) == 401


@run
async def test_lock_refuses_connections_and_unlock_does_not_revive_old_sessions(relay):
    old = relay.token("drdan", "phone")
    phone = await relay.connect("drdan", "phone", token=old)
    await phone.handshake()
    status, out = relay.admin("POST", "/v1/users/drdan/lock", {"reason": "left the practice"}, as_="account-service")
    assert status == 200 and out["locked"] is True and out["logout"]["live"] == ["phone"], out
    frames, code = await frames_until_close(phone)
    assert [f["type"] for f in frames] == ["logout"] and frames[0]["reason"] == "locked" and code == LOGGED_OUT
    await asyncio.sleep(3.1)  # past the logout the lock made (and its 2 s issuer skew)
    fresh = relay.token("drdan", "phone")
    assert await upgrade_status(relay, fresh) == 403
    _, view = relay.admin("GET", "/v1/users/drdan/devices")
    assert view["locked"]["reason"] == "left the practice"

    status, out = relay.admin("POST", "/v1/users/drdan/unlock", as_="account-service")
    assert status == 200 and out == {"locked": False}
    assert await upgrade_status(relay, fresh) == 101
    # The session revoked by the lock stays revoked.
    dev = await relay.connect("drdan", "phone", token=old)
    assert (await dev.recv())["type"] == "logout"
    await dev.close()


@run
async def test_admin_scopes_and_bad_requests(relay):
    a = await relay.connect("dra", "phone", token=relay.token("dra", "phone", "--org", "clinic-a"))
    await a.handshake()
    b = await relay.connect("drb", "phone", token=relay.token("drb", "phone", "--org", "clinic-b"))
    await b.handshake()
    assert wait_until(lambda: org_of(relay, "dra") == "clinic-a" and org_of(relay, "drb") == "clinic-b")

    # Org admins act on their own organisation only.
    assert relay.admin("GET", "/v1/users/drb/devices", as_="clinic-a-admin")[1]["error"] == "outside_your_org"
    for path in ("/v1/users/drb/logout", "/v1/users/drb/lock"):
        status, body = relay.admin("POST", path, {"reason": "admin"}, as_="clinic-a-admin")
        assert (status, body["error"]) == (403, "outside_your_org"), (path, body)
    status, body = relay.admin("POST", "/v1/devices/phone/logout", {"user": "drb"}, as_="clinic-a-admin")
    assert (status, body["error"]) == (403, "outside_your_org")
    assert relay.admin("GET", "/v1/audit?user=drb", as_="clinic-a-admin")[0] == 403
    assert relay.admin("GET", "/v1/orgs/clinic-b/presence", as_="clinic-a-admin")[0] == 403
    status, presence = relay.admin("GET", "/v1/orgs/clinic-a/presence", as_="clinic-a-admin")
    assert status == 200 and presence == {"org": "clinic-a", "online": [{"user": "dra", "devices": ["phone"]}]}
    status, _ = relay.admin("GET", "/v1/users/dra/devices", as_="clinic-a-admin")
    assert status == 200

    # Roles: support cannot lock; the account service sees no org presence.
    assert relay.admin("POST", "/v1/users/dra/lock", {}, as_="support-desk")[1]["error"] == "forbidden"
    assert relay.admin("GET", "/v1/orgs/clinic-a/presence", as_="account-service")[0] == 403
    # Authentication and input errors: clear 4xx with a reason.
    assert relay.admin("GET", "/v1/users/dra/devices", as_=None)[0] == 401
    assert relay.admin("GET", "/v1/users/dra/devices", token="rla_" + "0" * 64)[0] == 401
    assert relay.admin("POST", "/v1/users/dra/logout", {"reason": "because"})[1]["error"] == "bad_reason"
    assert relay.admin("POST", "/v1/users/dra/logout", {"reasn": "admin"})[1]["error"] == "bad_request"
    assert relay.admin("POST", "/v1/users/has%20space/logout", {})[0] == 400
    assert relay.admin("POST", "/v1/devices/phone/logout", {"reason": "admin"})[1]["error"] == "bad_request"
    assert relay.admin("GET", "/v1/audit?user=dra&from=yesterday")[1]["error"] == "bad_request"
    assert relay.admin("GET", "/v1/audit")[1]["error"] == "bad_request"
    assert relay.admin("GET", "/v1/nothing")[0] == 404
    # Nothing above touched either device.
    status, view = relay.admin("GET", "/v1/users/drb/devices", as_="clinic-b-admin")
    assert status == 200 and view["devices"][0]["online"] is True and view["devices"][0]["logout"] is None
    # Every call is audited with its actor.
    calls = [e for e in audit_events(relay, "drb") if e["event"] == "admin_request"]
    assert {"clinic-a-admin (org_admin)", "clinic-b-admin (org_admin)"} <= {e.get("actor") for e in calls}
    assert any(e["status"] == 403 and e["request"] == "POST /v1/users/drb/lock" for e in calls)
    await a.close()
    await b.close()


@run
async def test_support_gets_exactly_the_events_of_a_device_in_a_time_range(relay):
    token = relay.token("drev", "phone")
    before = int(time.time() * 1000)
    await asyncio.sleep(0.01)
    dev = await relay.connect("drev", "phone", token=token)
    await dev.handshake()
    await dev.close()
    await asyncio.sleep(0.05)
    # A failed login naming this device; a connect of another device of the same user.
    assert await upgrade_status(relay, token[:-4] + "AAAA") == 401
    other = await relay.online("drev", "tablet")
    await asyncio.sleep(0.05)
    middle = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    dev = await relay.connect("drev", "phone", token=token)
    await dev.handshake()
    _, out = relay.admin("POST", "/v1/devices/phone/logout", {"user": "drev", "reason": "lost_device"})
    frame = await dev.recv()
    await ack_logout(dev, frame["signal"])
    await frames_until_close(dev)
    await other.close()
    await asyncio.sleep(0.2)
    after = int(time.time() * 1000)

    events = audit_events(relay, "drev", device="phone", **{"from": before, "to": after, "limit": 2})
    kinds = [(e["event"], e.get("reason") or e.get("via")) for e in events]
    assert kinds == [
        ("connect", None),
        ("disconnect", "client closed"),
        ("auth_failed", "bad_signature"),
        ("connect", None),
        ("logout_requested", "lost_device"),
        ("logout_delivered", "live"),
        ("logout_confirmed", None),
        ("disconnect", "logged out"),
    ], kinds
    assert all(e["device"] == "phone" and e["user"] == "drev" for e in events)
    assert events[0]["ip"] == "127.0.0.1" and events[4]["actor"] == "support-desk (support)"
    # The second half of the range only.
    later = audit_events(relay, "drev", device="phone", **{"from": middle, "to": after})
    assert [e["event"] for e in later] == [k for k, _ in kinds[3:]]
    # Tablet events are the tablet's.
    assert [e["event"] for e in audit_events(relay, "drev", device="tablet")] == ["connect", "disconnect"]


@run
async def test_failed_logins_are_limited_per_ip_and_per_account(make_relay, tmp_path):
    relay = make_relay({
        "RELAY_ACCESS__FAILED_AUTH_PER_IP": "5",
        "RELAY_ACCESS__FAILED_AUTH_PER_ACCOUNT": "3",
        "RELAY_ACCESS__CLIENT_IP_HEADER": "X-Client-IP",
        "RELAY_ACCESS__TRUSTED_PROXIES": '["127.0.0.1/32"]',
    })
    keys = tmp_path / "attacker"
    subprocess.run([str(RELAY_BIN), "keygen", "--out-dir", str(keys)], check=True, capture_output=True)
    forge = lambda user: relay.token(user, "phone", "--key", str(keys / "token-signing-key.pem"))  # noqa: E731
    await relay.register_offline("victim", "phone")  # a real user: failures are on their trail
    forged = forge("victim")
    good = relay.token("victim", "phone")

    # One account attacked from many addresses: the 4th failure is answered 429; the user's
    # own valid token is never refused for it.
    for i in range(3):
        assert await upgrade_status(relay, forged, {"X-Client-IP": f"198.51.100.{i}"}) == 401
    assert await upgrade_status(relay, forged, {"X-Client-IP": "198.51.100.50"}) == 429
    assert await upgrade_status(relay, good, {"X-Client-IP": "198.51.100.51"}) == 101
    assert await upgrade_status(relay, relay.token("bystander", "phone"), {"X-Client-IP": "198.51.100.51"}) == 101

    # One address trying many accounts: its 6th failure is answered 429; a valid token from
    # the same address still works.
    for i in range(5):
        assert await upgrade_status(relay, f"garbage-{i}", {"X-Client-IP": "203.0.113.9"}) == 401
    assert await upgrade_status(relay, forge("someone"), {"X-Client-IP": "203.0.113.9"}) == 429
    assert await upgrade_status(relay, relay.token("someone", "phone"), {"X-Client-IP": "203.0.113.9"}) == 101

    metrics = relay.metrics()
    assert 'relay_auth_throttled_total{scope="account"} 1' in metrics
    assert 'relay_auth_throttled_total{scope="ip"} 1' in metrics
    throttled = [e for e in audit_events(relay, "victim") if e["event"] == "auth_throttled"]
    assert len(throttled) == 1 and throttled[0]["reason"] == "account" and throttled[0]["ip"] == "198.51.100.50"
    failed = [e for e in audit_events(relay, "victim") if e["event"] == "auth_failed"]
    assert [e["ip"] for e in failed] == [f"198.51.100.{i}" for i in range(3)]
    anon = [e for e in audit_events(relay, "%23anon") if e["event"] == "auth_failed"]
    assert [e["ip"] for e in anon] == ["203.0.113.9"] * 5
    # "someone" had never signed in: a forged token in that name is audited with the anonymous
    # failures, so made-up names create no audit chains.
    ip_throttled = [e for e in audit_events(relay, "%23anon") if e["event"] == "auth_throttled"]
    assert [(e["reason"], e["claimed_user"]) for e in ip_throttled] == [("ip", "someone")]
    assert [e["event"] for e in audit_events(relay, "someone") if e["event"].startswith("auth")] == []


@run
async def test_unconfirmed_logouts_are_visible_and_overdue_in_metrics(make_relay):
    relay = make_relay({"RELAY_ACCESS__LOGOUT_CONFIRM_WITHIN": "1s"})
    await relay.register_offline("drfay", "phone")
    status, out = relay.admin("POST", "/v1/users/drfay/logout", {"reason": "lost_device"})
    assert status == 200 and out["devices"] == ["phone"] and out["live"] == [] and out["pushed"] == []
    assert wait_until(lambda: "relay_logouts_overdue 1" in relay.metrics(), timeout=15)
    _, view = relay.admin("GET", "/v1/users/drfay/devices")
    assert view["devices"][0]["logout"]["pending"] is True and view["devices"][0]["logout"]["overdue"] is True


@run
async def test_canary_payload_and_token_never_reach_logs_audit_or_metrics(relay):
    token = relay.token("drgus", "phone")
    canary_token = "eyJDANARY-TOKEN-0c9f.eyJDANARY.c2ln"
    assert await upgrade_status(relay, canary_token) == 401
    sender = await relay.connect("drgus", "phone", token=token)
    await sender.handshake()
    nurse = await relay.online("nurse-hal", "web")
    await sender.send_ok(["nurse-hal"], CANARY)
    assert (await nurse.expect("deliver"))["id"]
    relay.admin("POST", "/v1/devices/phone/logout", {"user": "drgus", "reason": "lost_device"})
    frame = await sender.recv()
    await ack_logout(sender, frame["signal"])
    await frames_until_close(sender)
    await nurse.close()
    await asyncio.sleep(0.2)
    records = json.dumps([audit_events(relay, u) for u in ("drgus", "nurse-hal", "%23anon")])
    assert "drgus" in records  # the trail is there, and is metadata only
    texts = {"logs": relay.logs(), "audit": records, "metrics": relay.metrics()}
    for where, text in texts.items():
        for secret in ("PATIENT-CANARY", "Jane Doe", canary_token, "CANARY-TOKEN", token, ADMIN_TOKENS["support-desk"]):
            assert secret not in text, (where, secret[:20])


def test_audit_verify_reports_an_intact_trail(relay):
    async def activity():
        dev = await relay.online("drivy", "phone")
        await dev.close()
        relay.admin("POST", "/v1/users/drivy/lock", {"reason": "test"}, as_="account-service")
    asyncio.run(activity())
    relay.stop()  # the embedded store is locked while the relay runs
    out = subprocess.run([str(RELAY_BIN), "audit", "verify"], env=relay._env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "audit trail intact" in out.stdout
    records = int(out.stdout.split("intact: ")[1].split()[0])
    assert records >= 5  # connect, disconnect, admin request, lock, logout requested


def test_an_audit_query_in_the_far_future_is_refused_at_once_and_the_relay_stays_responsive(relay):
    """A time range in month 2^32-1 (year ~358 million) used to wrap the month counter and spin
    one core for ever."""
    import urllib.request

    far = 11_294_673_064_761_600_000  # year 357,915,911, April: month number 2^32 - 1
    started = time.monotonic()
    status, body = relay.admin("GET", f"/v1/audit?user=drx&from={far}&to={far + 86_400_000}")
    assert status == 400 and body["error"] == "bad_request" and "9999" in body["detail"], body
    assert time.monotonic() - started < 2
    status, body = relay.admin("GET", "/v1/audit?user=drx&from=9999-12-01T00:00:00Z&to=9999-12-31T23:59:59Z")
    assert status == 200 and body["events"] == [], body
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/healthz", timeout=2) as r:
        assert r.status == 200


def org_report(relay, org, as_="support-desk", **params):
    """Every row of an org access report, following `next` across pages."""
    rows, cursor = [], None
    while True:
        query = "&".join(f"{k}={v}" for k, v in dict(params, **({"cursor": cursor} if cursor else {})).items())
        status, page = relay.admin("GET", f"/v1/orgs/{org}/access-report?{query}", as_=as_)
        assert status == 200, page
        rows += page["events"]
        cursor = page.get("next")
        if not cursor:
            return rows


def admin_text(relay, path, as_="support-desk"):
    """(status, content type, body text, headers) of an admin call that answers other than JSON."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{relay.admin_port}{path}")
    req.add_header("Authorization", f"Bearer {ADMIN_TOKENS[as_]}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode(), e.headers


@run
async def test_org_access_report_is_scoped_paged_exported_and_audited(relay):
    """An org's failed logins, connects, logouts and locks over a range; a user who moved orgs
    counts for each organisation only while they belonged to it."""
    import csv
    import io

    start = int(time.time() * 1000) - 1
    # dra in clinic-a: a connect, a failed login (an expired token), a lock by the org admin.
    a = await relay.connect("dra", "phone", token=relay.token("dra", "phone", "--org", "clinic-a"))
    await a.handshake()
    await a.close()
    assert wait_until(lambda: org_of(relay, "dra") == "clinic-a")
    expired = relay.token("dra", "phone", "--org", "clinic-a", "--expires-at", str(int(time.time()) - 3600))
    assert await upgrade_status(relay, expired) == 401
    assert relay.admin("POST", "/v1/users/dra/lock", {"reason": "audit"}, as_="clinic-a-admin")[0] == 200
    await asyncio.sleep(3.1)  # a token issued after the lock's logout (and its 2 s issuer skew): refused for the lock
    assert await upgrade_status(relay, relay.token("dra", "phone", "--org", "clinic-a")) == 403
    assert relay.admin("POST", "/v1/users/dra/unlock", {}, as_="clinic-a-admin")[0] == 200
    # drb in clinic-b, never in clinic-a's report.
    b = await relay.connect("drb", "phone", token=relay.token("drb", "phone", "--org", "clinic-b"))
    await b.handshake()
    await b.close()
    # dra moves to clinic-b (a newer token names it): what follows is clinic-b's.
    await asyncio.sleep(1.1)
    moved = time.time()
    a = await relay.connect("dra", "tablet", token=relay.token("dra", "tablet", "--org", "clinic-b"))
    await a.handshake()
    assert wait_until(lambda: org_of(relay, "dra") == "clinic-b")
    await a.close()
    assert relay.admin("POST", "/v1/users/dra/logout", {"reason": "lost_device"}, as_="clinic-b-admin")[0] == 200
    await asyncio.sleep(0.3)
    end = int(time.time() * 1000) + 1

    span = {"from": start, "to": end}
    report_a = org_report(relay, "clinic-a", as_="clinic-a-admin", **span)
    kinds_a = [(e["event"], e["user"], e.get("device"), e.get("reason")) for e in report_a]
    assert kinds_a == [
        ("connect", "dra", "phone", None),
        ("auth_failed", "dra", "phone", "token_expired"),
        ("lock", "dra", None, "audit"),
        ("logout_requested", "dra", None, "locked"),
        ("auth_failed", "dra", "phone", "account_locked"),
        ("unlock", "dra", None, None),
    ], kinds_a
    assert all(e["org"] == "clinic-a" and e["ts"] < moved * 1000 for e in report_a)
    report_b = org_report(relay, "clinic-b", as_="clinic-b-admin", **span)
    assert [(e["event"], e["user"]) for e in report_b] == [
        ("connect", "drb"), ("connect", "dra"), ("logout_requested", "dra"),
    ], report_b
    assert [e["ts"] for e in report_b] == sorted(e["ts"] for e in report_b)

    # Paging gives the same rows; a narrower range gives only its part.
    assert org_report(relay, "clinic-a", limit=1, **span) == report_a
    assert org_report(relay, "clinic-a", **{"from": report_a[2]["ts"], "to": report_a[4]["ts"]}) == report_a[2:4]

    # Scope: another org's admin and the account service get 403; bad ranges a clear 400.
    for who in ("clinic-b-admin", "account-service"):
        status, body = relay.admin("GET", f"/v1/orgs/clinic-a/access-report?from={start}&to={end}", as_=who)
        assert status == 403, (who, body)
    status, body = relay.admin("GET", "/v1/orgs/clinic-a/access-report?from=yesterday")
    assert (status, body["error"]) == (400, "bad_request")
    status, body = relay.admin("GET", f"/v1/orgs/clinic-a/access-report?from={start}&to={start + 200 * 86_400_000}")
    assert (status, body["error"]) == (400, "bad_request")

    # CSV export: a header, one row per event, the same rows.
    status, ctype, text, headers = admin_text(
        relay, f"/v1/orgs/clinic-a/access-report?from={start}&to={end}&format=csv", as_="clinic-a-admin")
    assert status == 200 and ctype.startswith("text/csv"), (status, ctype, text)
    assert "attachment" in headers.get("Content-Disposition", "")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["event"], r["user"], r["device"], r["reason"]) for r in rows] == [
        (k, u, d or "", r or "") for k, u, d, r in kinds_a
    ]
    assert rows[0]["time"].endswith("Z") and rows[0]["ip"] == "127.0.0.1"

    # The report is audited: who asked, for which range; readable by the org's admin.
    status, page = relay.admin("GET", "/v1/audit?org=clinic-a", as_="clinic-a-admin")
    assert status == 200, page
    asked = [e for e in page["events"] if e.get("request", "").startswith("GET /v1/orgs/clinic-a/access-report")]
    assert any(e["actor"] == "clinic-a-admin (org_admin)" and e["from"] == start and e["to"] == end
               and e["status"] == 200 for e in asked), asked
    assert any(e["actor"] == "clinic-b-admin (org_admin)" and e["status"] == 403 for e in asked), asked
    assert relay.admin("GET", "/v1/audit?org=clinic-a", as_="clinic-b-admin")[0] == 403
