"""SRE kit checks: alert rules, a live scrape linted by promtool, a real Prometheus server
scraping a running relay, and every metric a dashboard or rule uses present in that scrape.

promtool and prometheus come from Debian's `prometheus` package (scripts/test installs it).
"""

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from conftest import ROOT

from conftest import register_push, run

RULES = ROOT / "dashboards" / "prometheus" / "relay-rules.yml"
# Exported only in cluster mode; cluster/test_cluster.py checks them in a cluster node's scrape.
CLUSTER_ONLY = {
    "relay_bus_connected", "relay_cluster_nodes", "relay_presence_remote_devices",
    "relay_bus_publish_duration_seconds", "relay_bus_delivery_duration_seconds",
}
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (scripts/test does)"
    return path


async def exchange(relay):
    """Traffic that touches the histograms: connect (replay), send, deliver live, ack."""
    bob = await relay.online("bob", "phone")
    alice = await relay.online("alice", "phone")
    acc = await alice.send_ok(["bob"], b"x")
    assert (await bob.expect("deliver"))["seq"] == acc["seq"]
    await bob.ack([acc["seq"]])
    await asyncio.sleep(0.3)


async def wake_up(relay, fake_push):
    """A wake-up push to an offline device, so the push histograms have a sample."""
    phone = await relay.online("carol", "phone")
    token = await register_push(phone)
    await phone.close()
    alice = await relay.online("alice", "laptop")
    await alice.send_ok(["carol"], b"x")
    deadline = time.monotonic() + 10
    while not fake_push.requests("apns", token):
        assert time.monotonic() < deadline, "no wake-up reached the fake APNs"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


def scrape(relay) -> str:
    return relay.metrics()


def exported_names(text: str) -> set:
    return {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}


def used_names(expr: str) -> set:
    names = set()
    for n in re.findall(r"\b(relay_[a-z0-9_]+)", expr):
        names.add(re.sub(r"_(bucket|sum|count)$", "", n))
    return names


def test_rules_pass_promtool():
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@run
async def test_live_scrape_passes_promtool_and_covers_dashboards_and_rules(make_relay, fake_push):
    relay = make_relay(fake_push.relay_env())
    await exchange(relay)
    await wake_up(relay, fake_push)
    text = scrape(relay)
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    exported = exported_names(text) | CLUSTER_ONLY
    rules_text = RULES.read_text()
    recorded = set(re.findall(r"record: (\S+)", rules_text))
    missing = {}
    assert DASHBOARDS, "no dashboards"
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name in used_names(expr) - exported:
                    missing.setdefault(path.name, set()).add(name)
                for name in set(re.findall(r"\b(relay:[a-z0-9_:]+)", expr)) - recorded:
                    missing.setdefault(path.name, set()).add(name)
    for name in used_names(rules_text) - exported:
        missing.setdefault(RULES.name, set()).add(name)
    assert not missing, f"metrics used but not exported: {missing}"
    # No label carries a user or device id.
    assert "alice" not in text and "bob" not in text and "carol" not in text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port, q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@run
async def test_prometheus_scrapes_a_running_relay(relay, tmp_path):
    await exchange(relay)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: relay
    static_configs:
      - targets: ["127.0.0.1:{relay.admin_port}"]
"""
    )
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                up = query(port, 'up{job="relay"}')
                accepted = query(port, "relay_messages_accepted_total")
                recorded = query(port, "relay:send_unavailable:ratio_rate5m")
                if up and up[0]["value"][1] == "1" and accepted and recorded:
                    break
            except OSError:
                pass
            assert time.time() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            await asyncio.sleep(0.5)
        assert accepted[0]["value"][1] == "1"
        assert float(recorded[0]["value"][1]) == 0.0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        assert {g["name"] for g in groups} >= {"relay-slo-recording", "relay-slo-alerts", "relay-alerts"}
        assert all(rule["health"] != "err" for g in groups for rule in g["rules"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@run
async def test_every_exported_metric_is_documented(relay):
    await exchange(relay)
    doc = (ROOT / "dashboards" / "METRICS.md").read_text()
    undocumented = {n for n in exported_names(scrape(relay)) if n.startswith("relay_") and f"`{n}`" not in doc}
    assert not undocumented, f"add to relay/src/metrics.rs CATALOGUE and dashboards/METRICS.md: {undocumented}"
