"""Cluster mode end to end: three real `relay` processes sharing a real NATS server and a real
Cassandra, on loopback. Run with E2E_BACKEND=cassandra (scripts/test does); nats-server comes
from Debian's package (scripts/test installs it).

The fault tests drive the load-test tool at 1,000 messages/s across the nodes and end with its
total-queue check: every message answered `accepted` delivered, none stored twice.
"""

import asyncio
import base64
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import BACKEND, ROOT, Relay, free_port, run

LOADTEST = ROOT / "target" / "debug" / "loadtest"
DISPLACED = 4002


class Nats:
    """A nats-server on a free loopback port, stoppable and restartable on the same port."""

    def __init__(self, directory, host="127.0.0.1"):
        self.bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
        assert shutil.which(self.bin), "nats-server missing: install Debian's nats-server (scripts/test does)"
        self.host = host
        self.port = free_port()
        self.log = directory / f"nats-{self.port}.log"
        self.proc = None

    @property
    def url(self):
        return f"nats://{self.host}:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [self.bin, "-a", self.host, "-p", str(self.port), "-l", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Cluster:
    """Three nodes: node 0 (dev mode) makes the keys, the others share them and the keyspace."""

    def __init__(self, tmp_path, nats, n=3, extra=None):
        self.tmp_path, self.nats, self.extra = tmp_path, nats, extra or {}
        self.nodes = []
        for _ in range(n):
            self.add()

    def add(self, env=None, host="127.0.0.1", wrap=()):
        """Starts one more node; `host` and `wrap` place it (a network namespace of a test's)."""
        first = self.nodes[0] if self.nodes else None
        env = {
            "RELAY_NODE_ID": "auto",  # leased from Cassandra
            "RELAY_CLUSTER__NATS": f'["{self.nats.url}"]',
            "RELAY_CLUSTER__DRAIN_SPREAD": "1s",
            "RELAY_SHUTDOWN_GRACE": "10s",
            **self.extra,
            **(env or {}),
        }
        if first is not None:
            secrets = first.data_dir / "dev-secrets"
            env.update(
                RELAY_AUTH__PUBLIC_KEYS_FILE=str(secrets / "token-signing-key.pub.pem"),
                RELAY_AT_REST__KEYS_FILE=str(secrets / "at-rest.keys"),
                RELAY_AT_REST__ACTIVE="dev1",
                RELAY_AUDIT__KEYS_FILE=str(secrets / "audit.keys"),
                RELAY_AUDIT__ACTIVE="dev1",
                RELAY_STORAGE__SCYLLA__KEYSPACE=first.keyspace,
            )
        node = Relay(self.tmp_path / f"node{len(self.nodes)}", env)
        node.host, node.wrap = host, list(wrap)
        if first is not None:
            node.keyspace, node.migrated = first.keyspace, True
        node.start()
        self.nodes.append(node)
        return node

    def __getitem__(self, i):
        return self.nodes[i]

    def token(self, user, device):
        return self.nodes[0].token(user, device)

    async def online(self, i, user, device):
        return await self.nodes[i].online(user, device, token=self.token(user, device))

    def stop(self):
        for n in self.nodes:
            n.stop()


def metric(node, name) -> float:
    total = 0.0
    for line in node.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_until(fn, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def nats(tmp_path):
    assert BACKEND == "cassandra", "cluster tests need the shared store: run with E2E_BACKEND=cassandra"
    n = Nats(tmp_path).start()
    yield n
    n.stop()


@pytest.fixture
def cluster(tmp_path, nats):
    c = Cluster(tmp_path, nats)
    yield c
    c.stop()


async def settle(cluster, devices):
    """Waits until every node sees `devices` devices online across the cluster."""
    def seen():
        return all(
            metric(n, "relay_devices_online") + metric(n, "relay_presence_remote_devices") >= devices
            for n in cluster.nodes
        )
    await wait_until(seen, what=f"presence of {devices} devices on every node")


@run
async def test_devices_of_one_user_spread_over_nodes_all_receive(cluster):
    phone = await cluster.online(0, "dr-alice", "phone")
    laptop = await cluster.online(1, "dr-alice", "laptop")
    bob = await cluster.online(2, "nurse-bob", "tablet")
    await settle(cluster, 3)
    for i in range(20):
        started = time.monotonic()
        acc = await bob.send_ok(["dr-alice"], f"m{i}".encode())
        for dev in (phone, laptop):
            got = await dev.expect("deliver", timeout=2)
            assert got["id"] == acc["id"] and got["seq"] == acc["seq"]
            assert got["from"] == {"user": "nurse-bob", "device": "tablet"}
        assert time.monotonic() - started < 1.0
        await phone.ack([acc["seq"]])
        await laptop.ack([acc["seq"]])
    # And back: sender and recipient on different nodes, both directions.
    acc = await laptop.send_ok(["nurse-bob"], b"reply")
    assert (await bob.expect("deliver"))["id"] == acc["id"]
    # The sender's other device, on another node, gets its copy too.
    assert (await phone.expect("deliver"))["id"] == acc["id"]
    for n in cluster.nodes:
        assert metric(n, "relay_bus_connected") == 1
    # The cluster-only series the dashboards and rules use (test_monitoring.CLUSTER_ONLY).
    scrape = cluster[0].metrics()
    for name in ("relay_bus_connected", "relay_cluster_nodes", "relay_presence_remote_devices",
                 "relay_bus_publish_duration_seconds", "relay_bus_delivery_duration_seconds"):
        assert f"# TYPE {name} " in scrape, name
    assert sum(metric(n, "relay_bus_received_total") for n in cluster.nodes) >= 41
    # Each node leased its own node id.
    logs = [re.sub(r"\x1b\[[0-9;]*m", "", n.logs()) for n in cluster.nodes]
    ids = [re.search(r"leased a node id node_id=(\d+)", text) for text in logs]
    assert all(ids), [text[-500:] for text in logs]
    assert len({m.group(1) for m in ids}) == 3


@run
async def test_logout_requested_on_one_node_closes_the_device_on_another_within_a_second(cluster):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    token = cluster.token("dr-lost", "phone")
    phone = await cluster[1].online("dr-lost", "phone", token=token)
    other = await cluster.online(2, "dr-lost", "laptop")
    await settle(cluster, 2)
    started = time.monotonic()
    status, out = cluster[0].admin("POST", "/v1/devices/phone/logout", {"user": "dr-lost", "reason": "lost_device"})
    assert status == 200 and out["live"] == ["phone"], out
    frame = await phone.recv(timeout=2)
    elapsed = time.monotonic() - started
    assert frame == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}
    assert elapsed < 1.0, elapsed
    await phone.ws.send(json.dumps({"type": "logout_ack", "signal": out["signal"]}))
    await asyncio.wait_for(phone.ws.wait_closed(), 3)
    assert phone.ws.close_code == 4006

    async def status_of(node):
        try:
            ws = await connect(node.url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None)
        except InvalidStatus as e:
            return e.response.status_code
        await ws.close()
        return 101

    # Refused at the upgrade on every node; the user's other device is untouched.
    assert [await status_of(n) for n in cluster.nodes] == [401, 401, 401]
    sender = await cluster.online(0, "nurse-zoe", "web")
    acc = await sender.send_ok(["dr-lost"], b"for the laptop")
    assert (await other.expect("deliver"))["id"] == acc["id"]
    # The audit trail, written by every node, tells the story, queried on node 2.
    def events():
        return cluster[2].admin("GET", "/v1/audit?user=dr-lost&device=phone")[1]["events"]

    # Other nodes' writers store their records within milliseconds; allow for that.
    await wait_until(lambda: len({e["node"] for e in events()}) == 3, timeout=5, what="audit records of all nodes")
    events = events()
    kinds = [e["event"] for e in events]
    assert kinds[:1] == ["connect"] and {"logout_requested", "logout_delivered", "logout_confirmed"} <= set(kinds), kinds
    refusals = [e for e in events if e["event"] == "auth_failed" and e["reason"] == "revoked"]
    assert len({e["node"] for e in refusals}) == 3, refusals


@run
async def test_with_the_bus_down_a_logout_still_reaches_the_device_from_the_store(cluster, nats):
    phone = await cluster.online(1, "dr-offbus", "phone")
    await settle(cluster, 1)
    nats.stop()
    await wait_until(lambda: metric(cluster[0], "relay_bus_connected") == 0, what="bus down")
    started = time.monotonic()
    status, out = cluster[0].admin("POST", "/v1/devices/phone/logout", {"user": "dr-offbus", "reason": "lost_device"})
    assert status == 200, out
    # No bus: node 1 finds the pending logout in the store on its next check (every 5 s).
    frame = await phone.recv(timeout=10)
    assert frame == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}
    assert time.monotonic() - started < 7
    nats.start()


@run
async def test_a_device_is_displaced_across_nodes(cluster):
    old = await cluster.online(0, "dr-carol", "phone")
    await settle(cluster, 1)
    new = await cluster.online(2, "dr-carol", "phone")
    await asyncio.wait_for(old.ws.wait_closed(), 3)
    assert old.ws.close_code == DISPLACED
    # The new connection is the one that receives.
    sender = await cluster.online(1, "dr-dan", "web")
    acc = await sender.send_ok(["dr-carol"], b"x")
    assert (await new.expect("deliver"))["id"] == acc["id"]
    assert metric(cluster[0], "relay_connections_displaced_total") >= 1


@run
async def test_a_device_first_seen_on_another_node_gets_the_next_message(cluster):
    """Node 0 caches dr-erin's device list; her new device registers on node 1 and must be
    included at once (the cache is invalidated over the bus, not after its 5 s expiry)."""
    sender = await cluster.online(0, "dr-frank", "web")
    await (await cluster.online(0, "dr-erin", "old-phone")).close()
    await sender.send_ok(["dr-erin"], b"warm the cache")
    fresh = await cluster.online(1, "dr-erin", "new-phone")
    await settle(cluster, 2)
    acc = await sender.send_ok(["dr-erin"], b"for every device")
    assert (await fresh.expect("deliver", timeout=2))["id"] == acc["id"]


@run
async def test_presence_follows_devices_and_forgets_a_killed_node(cluster):
    await cluster.online(1, "u1", "d1")
    await cluster.online(1, "u2", "d2")
    d3 = await cluster.online(2, "u3", "d3")
    await settle(cluster, 3)
    assert metric(cluster[0], "relay_presence_remote_devices") == 3
    assert metric(cluster[0], "relay_cluster_nodes") == 3
    await d3.close()
    await wait_until(lambda: metric(cluster[0], "relay_presence_remote_devices") == 2, what="offline event")
    cluster[1].kill()  # no goodbye
    started = time.monotonic()
    await wait_until(lambda: metric(cluster[0], "relay_presence_remote_devices") == 0, timeout=8,
                     what="the dead node's devices to count as offline")
    assert time.monotonic() - started < 6
    assert metric(cluster[0], "relay_cluster_nodes") == 2
    assert metric(cluster[0], "relay_cluster_nodes_lost_total") >= 1


@run
async def test_publications_dropped_on_a_full_queue_reach_the_devices_through_a_resync(tmp_path, nats):
    """A node whose publish queue overflowed (the bus up all along) has the others re-read their
    inboxes, within an inbox check; no node dies here, so no expiry catches up for it."""
    cluster = Cluster(tmp_path, nats, n=2, extra={
        "RELAY_CLUSTER__PUBLISH_QUEUE": "1",
        "RELAY_CLUSTER__INBOX_CHECK": "500ms",
        "RELAY_CLUSTER__NODE_TIMEOUT": "60s",
    })
    try:
        recipient = await cluster.online(1, "dr-queue", "phone")
        sender = await cluster.online(0, "nurse-queue", "web")
        await settle(cluster, 2)
        ids = [await sender.send(["dr-queue"], f"m{i}".encode()) for i in range(300)]
        for msg_id in ids:
            reply = await sender.recv()
            assert reply == {**reply, "type": "accepted", "id": msg_id}, reply
        got = set()
        while len(got) < len(ids):
            got.add((await recipient.expect("deliver", timeout=5))["id"])
        assert got == set(ids)
        assert metric(cluster[0], "relay_bus_publish_dropped_total") > 0, "the queue never overflowed"
    finally:
        cluster.stop()


def loadtest(cluster, *args, during=None, timeout=240, urls=None):
    """Runs the load-test tool against every node (or `urls`); `during(proc)` runs while it sends."""
    assert LOADTEST.exists(), f"{LOADTEST} missing: cargo build --workspace (scripts/test does)"
    key = cluster[0].data_dir / "dev-secrets" / "token-signing-key.pem"
    urls = ",".join(urls or [n.url for n in cluster.nodes])
    cmd = [str(LOADTEST), "--url", urls, "--key", str(key), "--reconnect", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if during:
        during(proc)
    out, err = proc.communicate(timeout=timeout)
    # Without the per-second progress lines: what failed, and why.
    assert proc.returncode == 0, "\n".join(l for l in err.splitlines() if "in flight" not in l)[-6000:]
    return json.loads(out), err


def check_total_queue(report, err):
    summary = err[err.rfind("Steady"):]
    print(summary)  # the figures, with `pytest -s`
    assert report["accepted"] >= 5000, summary
    assert report["lost"] == 0, summary
    assert report["duplicates"] == 0, summary
    assert report["connection_errors"] == 0, summary
    assert report["delivered"] == report["accepted"], summary
    # Everything missed while away arrives in the replay right after the reconnect: within 5 s,
    # or, when the shared test database is itself queueing writes for longer (two cores, three
    # debug relays, the load tool and Cassandra), within its own p99 accept time.
    if report["reconnects"]:
        bound = max(5000, report["accept"]["p99_ms"])
        assert report["resync"]["max_ms"] < bound, summary


LOAD = ["--connections", "150", "--rate", "1000", "--payload", "128"]


def test_kill_a_node_under_load_loses_nothing(cluster):
    def kill(proc):
        time.sleep(8)
        assert proc.poll() is None
        cluster[1].kill()

    report, err = loadtest(cluster, *LOAD, "--duration", "20", "--prefix", "kill", during=kill)
    check_total_queue(report, err)
    assert report["reconnects"] >= 40, report  # the killed node's third of the devices


def test_nodes_killed_again_and_again_under_load_lose_nothing(cluster):
    """SIGKILL at random moments, on random nodes: between the database write and `accepted`,
    between fan-out and the bus publish, mid-replay of the devices that moved over."""
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    print(f"CRASH_SEED={seed}")  # replays the same kills (with `pytest -s`)
    kills = []

    def crashes(proc):
        time.sleep(4)
        end = time.monotonic() + 16
        while time.monotonic() < end:
            node = rng.choice(cluster.nodes)
            node.kill()
            kills.append(node.port)
            node.start()
            time.sleep(rng.uniform(0.1, 0.6) if rng.random() < 0.5 else rng.uniform(0.6, 2.5))

    report, err = loadtest(cluster, *LOAD, "--duration", "24", "--prefix", "crash", during=crashes)
    print(f"seed {seed}: {len(kills)} kills")
    check_total_queue(report, err)
    assert len(kills) >= 5, kills


def test_rolling_restart_under_load_loses_nothing(cluster):
    def roll(proc):
        time.sleep(4)
        for node in cluster.nodes:
            assert node.stop() == 0, node.logs()[-2000:]  # SIGTERM: a clean drain
            node.start()
            time.sleep(1.5)

    report, err = loadtest(cluster, *LOAD, "--duration", "24", "--prefix", "roll", during=roll)
    check_total_queue(report, err)
    assert report["closed_by_relay"].get("1012", 0) >= 100, report  # told to reconnect


def test_bus_outage_under_load_loses_nothing(cluster, nats):
    def outage(proc):
        time.sleep(6)
        nats.stop()
        time.sleep(2)
        for n in cluster.nodes:
            assert metric(n, "relay_bus_connected") == 0
            with urllib.request.urlopen(f"http://{n.host}:{n.admin_port}/readyz", timeout=2) as r:
                assert r.status == 200 and b"degraded" in r.read()
        time.sleep(4)
        nats.start()

    report, err = loadtest(cluster, *LOAD, "--duration", "20", "--prefix", "bus", during=outage)
    check_total_queue(report, err)
    assert report["reconnects"] == 0, "a bus outage must not drop devices"
    for n in cluster.nodes:
        assert metric(n, "relay_bus_connected") == 1
        assert metric(n, "relay_bus_disconnects_total") >= 1


class RawNats:
    """A bare NATS protocol client: what an attacker on the bus network could do."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"INFO")
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        self.ping()

    def ping(self):
        self.sock.sendall(b"PING\r\n")
        while self.file.readline().strip() != b"PONG":
            pass

    def subscribe(self, subject):
        self.sock.sendall(f"SUB {subject} 1\r\n".encode())
        self.ping()

    def next_message(self):
        """(subject, headers or None, payload) of the next message."""
        while True:
            line = self.file.readline().strip()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            parts = line.split()
            if parts and parts[0] == b"MSG":
                data = self.file.read(int(parts[-1]) + 2)[:-2]
                return parts[1].decode(), None, data
            if parts and parts[0] == b"HMSG":
                hdr_len, total = int(parts[-2]), int(parts[-1])
                data = self.file.read(total + 2)[:-2]
                return parts[1].decode(), data[:hdr_len], data[hdr_len:]

    def publish(self, subject, headers, payload):
        if headers is None:
            self.sock.sendall(f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\n")
        else:
            total = len(headers) + len(payload)
            self.sock.sendall(f"HPUB {subject} {len(headers)} {total}\r\n".encode() + headers + payload + b"\r\n")
        self.ping()

    def close(self):
        self.sock.close()


@run
async def test_a_replayed_logout_on_the_bus_cannot_end_a_newer_login(cluster, nats):
    spy = RawNats(nats.port)
    spy.subscribe("*.ctl.logout")
    phone = await cluster[1].online("dr-replay", "phone", token=cluster.token("dr-replay", "phone"))
    await settle(cluster, 1)
    status, out = cluster[0].admin("POST", "/v1/devices/phone/logout", {"user": "dr-replay", "reason": "lost_device"})
    assert status == 200 and out["live"] == ["phone"], out
    captured = await asyncio.to_thread(spy.next_message)
    frame = await phone.recv(timeout=3)
    assert frame["type"] == "logout"
    await phone.ws.send(json.dumps({"type": "logout_ack", "signal": frame["signal"]}))
    await asyncio.wait_for(phone.ws.wait_closed(), 3)

    await asyncio.sleep(3.1)  # a new login: a token issued more than 2 s after the logout
    again = await cluster[1].online("dr-replay", "phone", token=cluster.token("dr-replay", "phone"))
    await settle(cluster, 1)
    for _ in range(3):
        await asyncio.to_thread(spy.publish, *captured)
    sender = await cluster.online(2, "nurse-rae", "web")
    acc = await sender.send_ok(["dr-replay"], b"for the new login")
    got = await again.recv(timeout=3)
    assert got["type"] == "deliver" and got["id"] == acc["id"], got
    await asyncio.sleep(1.0)
    assert again.ws.close_code is None, "the replayed logout ended a newer login"
    spy.close()


def test_an_at_rest_key_rotates_in_two_phases_under_load_and_loses_nothing(cluster, tmp_path):
    """DEPLOY.md's rotation: first every node gets the new key (still sealing with the old one),
    then every node activates it. A node that would activate a key some live node cannot open yet
    is refused at start, before it seals anything; done in order, the rotation under load loses
    nothing."""
    old = (cluster[0].data_dir / "dev-secrets" / "at-rest.keys").read_text().strip()
    both = tmp_path / "at-rest-both.keys"
    both.write_text(f"{old}\nk2:{base64.b64encode(os.urandom(32)).decode()}\n")

    def keys(active):
        return {"RELAY_AT_REST__KEYS_FILE": str(both), "RELAY_AT_REST__ACTIVE": active}

    # Activating k2 on one node while the others cannot open it: refused, with what to do.
    cluster[1].stop()
    cluster[1].env.update(keys("k2"))
    with pytest.raises(RuntimeError) as refused:
        cluster[1].start()
    assert "k2" in str(refused.value) and "not held by" in str(refused.value), str(refused.value)[-2000:]
    cluster[1].env.update(keys("dev1"))
    cluster[1].start()

    def rotate(proc):
        time.sleep(3)
        for active in ("dev1", "k2"):  # phase 1: distribute; phase 2: activate
            for node in cluster.nodes:
                assert node.stop() == 0, node.logs()[-2000:]
                node.env.update(keys(active))
                node.start()
                time.sleep(1)

    report, err = loadtest(cluster, *LOAD, "--duration", "30", "--prefix", "rotate", during=rotate)
    check_total_queue(report, err)
    for node in cluster.nodes:
        assert metric(node, "relay_store_corrupt_rows_total") == 0
        assert metric(node, "relay_store_unknown_key_rows_total") == 0
        assert metric(node, "relay_bus_rejected_total") == 0
    # And a node left behind, without the key the others now seal with, is refused too.
    cluster[2].stop()
    cluster[2].env.update(RELAY_AT_REST__KEYS_FILE=str(cluster[0].data_dir / "dev-secrets" / "at-rest.keys"),
                          RELAY_AT_REST__ACTIVE="dev1")
    with pytest.raises(RuntimeError) as refused:
        cluster[2].start()
    assert "k2" in str(refused.value) and "does not hold" in str(refused.value), str(refused.value)[-2000:]
