"""Network partitions and a slow database link (issue 15; RELIABILITY.md).

One of three relay nodes runs in a network namespace this test makes (as root), reaching the
rest of the world over three veth links of its own: one to the bus (NATS), one to the database
(Cassandra, through a forwarder on the host, since the test Cassandra listens on loopback), one
for its clients. A cut drops every packet on a link, both ways, silently (a `pfifo` queue of
length 0 on both ends: this kernel has no netem and no packet filter), as a real partition does:
nothing is refused, connections just stop answering. The forwarder also makes the slow link:
this kernel has no `tc netem`, so delay and loss are played in user space (see `Forwarder`).

While the load tool sends through all three nodes, the namespaced node is cut from the bus, from
the database, and from both, each for 8 s, then healed; then its database link turns slow. The
run ends with the load tool's total-queue check (nothing accepted lost or stored twice); during
each cut, a probe checks that nothing is accepted without a durable write and that a logout is
still enforced.
"""

import asyncio
import contextlib
import os
import random
import subprocess
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

import forwarder
from conftest import cassandra_port, run
from test_cluster import Cluster, Nats, loadtest, metric

NS = f"relay-part-{os.getpid()}"
# Lighter than the other cluster tests' load: a third of it crosses three forwarders in Python
# (clients, and the database link twice), which share two cores with Cassandra and the relays.
PART_LOAD = ["--connections", "90", "--rate", "300", "--payload", "128"]
LINKS = {"bus": 231, "db": 232, "clients": 233}  # name -> 10.<n>.0.0/30


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def host_addr(link):
    return f"10.{LINKS[link]}.0.1"


def ns_addr(link):
    return f"10.{LINKS[link]}.0.2"


def host_dev(link):
    return f"rp{os.getpid() % 100000}{link[0]}h"


def ns_dev(link):
    return f"rp{os.getpid() % 100000}{link[0]}n"


def cut(link):
    sh("tc", "qdisc", "replace", "dev", host_dev(link), "root", "pfifo", "limit", "0")
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "replace", "dev", ns_dev(link), "root", "pfifo", "limit", "0")


def heal(link):
    sh("tc", "qdisc", "del", "dev", host_dev(link), "root")
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "del", "dev", ns_dev(link), "root")


@pytest.fixture
def netns():
    assert os.geteuid() == 0, "partition tests make a network namespace: run as root (CI does)"
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        for link in LINKS:
            sh("ip", "link", "add", host_dev(link), "type", "veth", "peer", "name", ns_dev(link))
            sh("ip", "link", "set", ns_dev(link), "netns", NS)
            sh("ip", "addr", "add", f"{host_addr(link)}/30", "dev", host_dev(link))
            sh("ip", "link", "set", host_dev(link), "up")
            sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{ns_addr(link)}/30", "dev", ns_dev(link))
            sh("ip", "netns", "exec", NS, "ip", "link", "set", ns_dev(link), "up")
        yield NS
    finally:
        for link in LINKS:
            subprocess.run(["ip", "link", "del", host_dev(link)], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def wait_for(fn, timeout, what):
    started = time.monotonic()
    while not fn():
        assert time.monotonic() - started < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


async def first_frame(dev):
    """The device's next frame and when it came, or (None, when) if the relay closed it."""
    try:
        frame = await dev.recv(timeout=40)
    except ConnectionClosed:
        frame = None
    return frame, time.monotonic()


async def slow_sends(node, token, n):
    """n sends one after another, each until accepted; how long each took (ms)."""
    dev = await node.connect("probe", "slow", token=token)
    await dev.handshake()
    took, retried = [], 0
    for i in range(n):
        started, msg_id = time.monotonic(), None
        while True:  # as an app does: a retryable refusal is sent again, same id
            msg_id = await dev.send(["dr-sink"], f"slow {i}".encode(), msg_id=msg_id)
            reply = await dev.recv(timeout=20)
            if reply["type"] == "accepted":
                break
            assert reply["type"] == "rejected" and reply["retry"], reply
            retried += 1
            assert retried <= n, f"most sends over the slow link refused: {reply}"
            await asyncio.sleep(0.5)
        took.append((time.monotonic() - started) * 1000)
    await dev.close()
    took.sort()
    return {"sends": n, "retried": retried, "accept_p50_ms": round(took[n // 2]), "accept_max_ms": round(took[-1])}


async def probe_send(node, token, to):
    """One send from a fresh device on `node`: `accepted`, `rejected` or the handshake's status."""
    dev = None
    try:
        dev = await node.connect("probe", f"p{random.randrange(1 << 30)}", token=token(), open_timeout=5)
        await dev.handshake()
        await dev.send([to], b"probe")
        return (await dev.recv(timeout=10))
    except InvalidStatus as e:
        return {"type": "refused", "status": e.response.status_code}
    except (OSError, asyncio.TimeoutError) as e:
        return {"type": "refused", "error": repr(e)}
    finally:
        if dev:
            with contextlib.suppress(Exception):
                await dev.close()


@pytest.fixture
def parted(tmp_path, netns):
    nats = Nats(tmp_path, host=host_addr("bus")).start()
    # Cassandra announces 127.0.0.1 and the driver connects there: in the namespace, a
    # forwarder on its loopback, over the database link, to one on the host (the slow one).
    slow = forwarder.Forwarder((host_addr("db"), 0), ("127.0.0.1", cassandra_port()))
    inside = subprocess.Popen(
        ["ip", "netns", "exec", NS, "python3", forwarder.__file__, str(cassandra_port()), host_addr("db"),
         str(slow.server.sockets[0].getsockname()[1])],
        stdout=subprocess.PIPE, text=True,
    )
    cluster = None
    try:
        assert inside.stdout.readline().strip() == "ready"
        cluster = Cluster(tmp_path, nats, n=2)
        cluster.add(
            # Off loopback: production mode, with the keys node 0 made.
            {"RELAY_MODE": "production"}, host=ns_addr("clients"), wrap=["ip", "netns", "exec", NS],
        )
        yield cluster, slow
    finally:
        if cluster:
            cluster.stop()
        inside.kill()
        inside.wait()
        slow.stop()
        nats.stop()


def test_a_node_cut_from_the_bus_the_database_and_both_then_healed_loses_nothing(parted):
    cluster, slow = parted
    far = cluster[2]  # the namespaced node
    findings = {}

    def token_for(user, device):
        return lambda: cluster.token(user, device)

    async def phase(name, links):
        """Cuts `links`, checks what must hold meanwhile, heals, measures the recovery."""
        stale = cluster.token("dr-cut", f"phone-{name}")  # its credentials, from before the logout
        watched = await far.online("dr-cut", f"phone-{name}", token=stale)
        await asyncio.sleep(0.5)
        for link in links:
            cut(link)
        cut_at = time.monotonic()
        await asyncio.sleep(3)  # long past the relay's own checks (bus ping, request timeout)
        # Nothing accepted without a durable write: with the database gone, a send is refused
        # (retryable) or the connection is; never `accepted`.
        probe = await probe_send(far, token_for("probe", name), "dr-sink")
        if "db" in links:
            assert probe["type"] != "accepted", probe
            if probe["type"] == "rejected":
                assert probe["retry"] is True, probe
        else:
            assert probe["type"] == "accepted", probe
        # A logout requested meanwhile on a healthy node.
        status, out = cluster[0].admin("POST", f"/v1/devices/phone-{name}/logout",
                                       {"user": "dr-cut", "reason": "lost_device"})
        assert status == 200, out
        requested = time.monotonic()
        first = asyncio.ensure_future(first_frame(watched))
        # Its old credentials get nothing but the logout, from every node that can check the
        # store (the wipe is not confirmed yet, so the upgrade succeeds to carry the `logout`
        # frame: PROTOCOL.md); the node that cannot check refuses them.
        for node in cluster.nodes:
            try:
                dev = await node.connect("dr-cut", f"phone-{name}", token=stale, open_timeout=5)
            except InvalidStatus as e:
                assert node is far and "db" in links, (node.url, e.response.status_code, e.response.body)
                assert e.response.status_code == 503 and b"store_unavailable" in e.response.body
                continue
            except (OSError, asyncio.TimeoutError):
                assert node is far and "db" in links
                continue
            frame = await dev.recv(timeout=10)
            assert frame == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}, (name, node.url, frame)
            await dev.close()
        await asyncio.sleep(max(0.0, cut_at + 8 - time.monotonic()))
        for link in links:
            heal(link)
        healed = time.monotonic()
        ready = await asyncio.to_thread(wait_for, lambda: far.readyz() == (200, "ready") and metric(far, "relay_bus_connected") == 1,
                                        60, f"{name}: the node ready and on the bus again")
        # The device on the cut node gets its logout: live (over the bus, or from the store's
        # check once the node reads it again), or, if the node sent it away because it could not
        # reach the store (1013), on its reconnect to another node, as an app does.
        frame, at = await first
        how = "live"
        if frame is None:
            assert "db" in links and watched.ws.close_code == 1013, watched.ws.close_code
            watched = await cluster[0].connect("dr-cut", f"phone-{name}", token=stale)
            frame, at = await first_frame(watched)
            how = "on reconnect"
        assert frame == {"type": "logout", "reason": "lost_device", "signal": out["signal"]}, frame
        await watched.close()
        # Sends through the node are accepted again (an app retries a retryable refusal).
        refused = []
        while (probe := await probe_send(far, token_for("probe", name + "-after"), "dr-sink"))["type"] != "accepted":
            assert probe["type"] == "rejected" and probe["retry"], probe
            refused.append(round(time.monotonic() - healed, 2))
            assert time.monotonic() - healed < 30, f"{name}: sends still refused 30 s after the heal: {probe}"
            await asyncio.sleep(0.2)
        findings[name] = {"logout": how, "logout_after_request_s": round(at - requested, 2),
                          "logout_after_heal_s": round(max(0.0, at - healed), 2), "ready_s": round(ready, 2),
                          "send_after_heal_s": round(time.monotonic() - healed, 2), "refused_after_heal_at": refused}

    def faults(proc):
        time.sleep(4)
        for name, links in [p for p in (("bus", ["bus"]), ("db", ["db"]), ("both", ["bus", "db"])) if p[0] in os.environ.get("PHASES", "bus db both")]:
            asyncio.run(phase(name, links))
            time.sleep(2)
        # A slow, lossy database link: 100 ms each way, 2% of chunks held 300 ms more. Slow is
        # not down: every send through the node is accepted, in a few round trips.
        time.sleep(4)  # past the last heal's tail (requests sent into the cut time out)
        slow.slow(0.1, 0.3, 0.02)
        findings["slow"] = asyncio.run(slow_sends(far, cluster.token("probe", "slow"), 8))
        slow.slow()

    # The load tool sends to loopback only: it reaches the namespaced node through a forwarder.
    door = forwarder.Forwarder(("127.0.0.1", 0), (far.host, far.port))
    urls = [cluster[0].url, cluster[1].url, f"ws://127.0.0.1:{door.server.sockets[0].getsockname()[1]}/v1/ws"]
    try:
        report, err = loadtest(cluster, *PART_LOAD, "--duration", "64", "--prefix", "part", during=faults, timeout=300, urls=urls)
    finally:
        door.stop()
    summary = err[err.rfind("Steady"):]
    print(findings, summary, sep="\n")
    assert report["lost"] == 0, summary
    assert report["duplicates"] == 0, summary
    assert report["connection_errors"] == 0, summary
    # Every `accepted` delivered; beyond those, only sends answered `unavailable` (retry, same
    # id): a write that timed out in the cut may still have landed (PROTOCOL.md). The load
    # tool does not resend refused sends, so it sees them delivered without an `accepted`.
    unconfirmed = report["delivered"] - report["accepted"]
    assert 0 <= unconfirmed <= report["rejected_by_code"].get("unavailable", 0), summary
    assert report["accepted"] >= 10000, summary


async def accepted(dev, msg_id, timeout=20):
    """The `accepted` for `msg_id` and when it came (deliveries to the sender's other devices
    are skipped)."""
    while True:
        frame = await dev.recv(timeout=timeout)
        if frame["type"] != "deliver":
            assert frame["type"] == "accepted" and frame["id"] == msg_id, frame
            return frame, time.monotonic()


@run
async def test_over_a_slow_database_link_a_send_waits_for_its_own_batch_only(parted):
    """Issue 16: the ScyllaDB writer keeps several batches in flight. Over a database link with
    50 ms each way, a batch is a few round trips; a send that arrives while another batch is
    being written used to wait for that batch, then for its own (about twice a lone send's
    time). Now it is written at once, beside it. Fan-out and answers still follow sequence
    order, and an id sent again while its first attempt is in flight is stored once."""
    cluster, slow = parted
    far = cluster[2]  # the namespaced node, whose database link is slow
    devs = []
    for i in range(3):
        dev = await far.connect(f"train{i}", "phone", token=cluster.token(f"train{i}", "phone"))
        await dev.handshake()
        devs.append(dev)
    twins = []
    for name in ("a", "b"):
        dev = await far.connect("twin", name, token=cluster.token("twin", name))
        await dev.handshake()
        twins.append(dev)
    slow.slow(0.05)
    try:
        for dev in devs:  # warm: device lists cached, a reservation made
            await dev.send_ok(["dr-sink"], b"warm")
        lone = []
        for _ in range(3):
            started = time.monotonic()
            msg_id = await devs[0].send(["dr-sink"], b"lone")
            _, at = await accepted(devs[0], msg_id)
            lone.append(at - started)
        lone = sorted(lone)[1]

        async def one(dev, delay):
            await asyncio.sleep(delay)
            started = time.monotonic()
            msg_id = await dev.send(["dr-sink"], b"train")
            frame, at = await accepted(dev, msg_id)
            return frame, at - started

        # Three sends 60 ms apart: the second and third arrive while the first is written.
        train = await asyncio.gather(*(one(dev, 0.06 * i) for i, dev in enumerate(devs)))
        took = [t for _, t in train]
        seqs = [f["seq"] for f, _ in train]
        print(f"lone send {lone * 1000:.0f} ms; a train of three: {[round(t * 1000) for t in took]} ms; seqs {seqs}")
        assert seqs == sorted(seqs), "sequence numbers follow arrival across batches"
        assert max(took) < 1.4 * lone, (lone, took)

        # One id from two devices of a user, the second while the first is in flight.
        msg_id = str(uuid.uuid4())
        first, second = await asyncio.gather(one_id(twins[0], msg_id, 0), one_id(twins[1], msg_id, 0.06))
        assert first["seq"] == second["seq"], (first, second)
        assert [first["duplicate"], second["duplicate"]] == [False, True], (first, second)
    finally:
        slow.slow()
        for dev in devs + twins:
            await dev.close()


async def one_id(dev, msg_id, delay):
    await asyncio.sleep(delay)
    await dev.send(["dr-sink"], b"twice", msg_id=msg_id)
    frame, _ = await accepted(dev, msg_id)
    return frame


@run
async def test_over_a_slow_database_link_a_storm_of_new_users_reaches_the_audit_trail_at_once(parted):
    """Issue 16: the audit writer read the head of every chain new to it (a user's first event
    this month on this node) one at a time, a round trip each, so a storm of new users reached
    the trail at one user per round trip: over a link of 50 ms each way, 40 users took 4 s, and
    on a local Cassandra a 10,000-device storm's trail was still 6 s behind when the storm
    ended (its queue drops events once full). A batch's missing heads are now read together."""
    cluster, slow = parted
    far = cluster[2]  # the namespaced node, whose database link is slow
    users = [f"audited{i}" for i in range(40)]
    slow.slow(0.05)
    devs = []
    try:
        before = metric(far, "relay_audit_records_written_total")

        async def online(user):
            dev = await far.connect(user, "phone", token=cluster.token(user, "phone"))
            await dev.handshake()
            return dev

        devs = await asyncio.gather(*(online(u) for u in users))
        connected = time.monotonic()
        # One `connect` record per user (the tokens name no organisation: no report copy).
        while metric(far, "relay_audit_records_written_total") < before + len(users):
            assert time.monotonic() - connected < 20, "the audit trail never caught up"
            await asyncio.sleep(0.05)
        behind = time.monotonic() - connected
        print(f"{len(users)} new users' connects in the audit trail {behind * 1000:.0f} ms after the last handshake")
        assert behind < 1.5, behind
    finally:
        slow.slow()
        for dev in devs:
            await dev.close()
