"""The load-test tool runs every preset against a local relay and its total-queue check holds.

Short runs: this proves the tool and the relay's accounting, not performance (BENCHMARKS.md has
the figures, from scripts/bench).
"""

import json
import os
import subprocess

import pytest

from conftest import ROOT

LOADTEST = ROOT / "target" / "debug" / "loadtest"


def loadtest(relay, *args, url=None, timeout=120):
    assert LOADTEST.exists(), f"{LOADTEST} missing: cargo build --workspace (scripts/test does)"
    key = relay.data_dir / "dev-secrets" / "token-signing-key.pem"
    cmd = [str(LOADTEST), "--url", url or relay.url, *args]
    if "--tokens" not in args:
        cmd += ["--key", str(key)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("preset, extra", [
    ("steady", ["--connections", "50", "--rate", "500", "--duration", "3", "--urgent", "0.1"]),
    ("soak", ["--connections", "20", "--duration", "3"]),
    ("churn", ["--connections", "50", "--rate", "500", "--duration", "6", "--churn-every", "2", "--offline", "1"]),
    ("storm", ["--connections", "300", "--handshake-rate", "500", "--duration", "1"]),
    ("idle", ["--connections", "100", "--duration", "1"]),
])
def test_presets(relay, preset, extra):
    r = loadtest(relay, "--scenario", preset, "--prefix", preset, *extra)
    assert r["scenario"] == preset
    assert r["connection_errors"] == 0
    assert r["handshake"]["samples"] >= int(extra[1])
    if preset in ("steady", "soak", "churn"):
        assert r["accepted"] > 0 and r["lost"] == 0
        assert r["delivered"] >= r["accepted"]
        assert r["end_to_end"]["p50_ms"] > 0
        if preset != "churn":
            assert r["duplicates"] == 0


def relay_threads(relay) -> int:
    for line in open(f"/proc/{relay.proc.pid}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_a_connect_storm_keeps_the_relays_threads_bounded(relay):
    """Each connect reads its inbox off the Tokio workers, on the blocking pool: a storm must not
    start a thread per concurrent connect, whose stacks and allocator caches stay in the relay's
    memory after the storm (they idle out only after seconds)."""
    before = relay_threads(relay)
    r = loadtest(relay, "--scenario", "storm", "--prefix", "threads", "--connections", "1000",
                 "--connect-concurrency", "256", "--handshake-rate", "0", "--duration", "1")
    assert r["connection_errors"] == 0 and r["handshake"]["samples"] >= 1000
    after = relay_threads(relay)
    assert after <= before + 16, f"{before} threads before the storm, {after} after"


def test_messages_for_offline_devices_are_replayed_when_they_reconnect(relay):
    """--to-prefix fills another run's inboxes while its devices are offline; the run that
    reconnects them counts what it was replayed (scripts/bench reconnect, with waiting messages)."""
    storm = ["--scenario", "storm", "--prefix", "away", "--connections", "50", "--handshake-rate", "0",
             "--duration", "1"]
    first = loadtest(relay, *storm)
    assert first["connection_errors"] == 0 and first["delivered_from_other_runs"] == 0
    sent = loadtest(relay, "--prefix", "fill", "--connections", "10", "--rate", "200", "--duration", "2",
                    "--to-prefix", "away", "--to-users", "50")
    # Nobody of this run receives them: nothing is counted lost here.
    assert sent["accepted"] >= 300 and sent["delivered"] == 0 and sent["lost"] == 0
    back = loadtest(relay, *storm)
    assert back["connection_errors"] == 0
    assert back["delivered_from_other_runs"] == sent["accepted"]


def test_workers_source_addresses_and_thresholds(relay):
    r = loadtest(relay, "--workers", "2", "--connections", "60", "--rate", "600", "--duration", "3", "--prefix", "w")
    assert r["workers"] == 2 and r["accepted"] > 0 and r["lost"] == 0 and r["duplicates"] == 0
    # An impossible latency threshold makes the tool fail.
    key = relay.data_dir / "dev-secrets" / "token-signing-key.pem"
    out = subprocess.run([str(LOADTEST), "--url", relay.url, "--key", str(key), "--connections", "10", "--duration", "2",
                          "--rate", "100", "--max-p99-ms", "0.001", "--prefix", "t"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "exceeds --max-p99-ms" in out.stderr


def test_refuses_non_loopback_targets(relay):
    out = subprocess.run([str(LOADTEST), "--url", "ws://10.1.2.3:8080/v1/ws", "--key", "x", "--duration", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "loopback" in out.stderr


def test_wss_and_token_file(make_relay, tmp_path):
    # A CA and a leaf it signs: rustls (rightly) refuses a CA certificate as the server's own.
    ca, ca_key, cert, key = (tmp_path / n for n in ("ca.pem", "ca.key", "cert.pem", "key.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
                    "-subj", "/CN=test CA"], check=True, capture_output=True)
    csr = tmp_path / "leaf.csr"
    subprocess.run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext)], check=True, capture_output=True)
    relay = make_relay({"RELAY_TLS__CERT_FILE": str(cert), "RELAY_TLS__KEY_FILE": str(key)})
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(relay.token(f"tf-{i}", "d") for i in range(20)) + "\n")
    url = f"wss://localhost:{relay.port}/v1/ws"
    r = loadtest(relay, "--tokens", str(tokens), "--ca", str(ca), "--connections", "20", "--rate", "200",
                 "--duration", "2", url=url)
    assert r["accepted"] > 0 and r["lost"] == 0
