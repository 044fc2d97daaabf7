"""fly.toml must describe the relay as it is: settings it accepts, its ports, paths and drain."""

import os
import subprocess
import tomllib
import urllib.request

from conftest import RELAY_BIN, ROOT

FLY = tomllib.loads((ROOT / "fly.toml").read_text())


def seconds(text: str) -> int:
    assert text.endswith("s"), text
    return int(text[:-1])


def fly_env(tmp_path) -> dict:
    """The machine's environment: [env] plus the secrets DEPLOY.md says to set (test values)."""
    keys = tmp_path / "keys"
    out = subprocess.run([str(RELAY_BIN), "keygen", "--out-dir", str(keys)], check=True, capture_output=True, text=True)
    key = {line.split(" ", 1)[0]: line.rsplit(" ", 1)[-1] for line in out.stdout.splitlines()}
    at_rest, audit = key["at-rest"], key["audit"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(FLY["env"])
    env.update(
        RELAY_AUTH__PUBLIC_KEYS=(keys / "token-signing-key.pub.pem").read_text(),
        RELAY_AT_REST__KEYS=f"k1:{at_rest}",
        RELAY_AT_REST__ACTIVE="k1",
        RELAY_AUDIT__KEYS=f"a1:{audit}",
        RELAY_AUDIT__ACTIVE="a1",
        RELAY_STORAGE__SCYLLA__NODES='["scylla-1.internal:9042", "scylla-2.internal:9042"]',
        RELAY_STORAGE__SCYLLA__USERNAME="relay",
        RELAY_STORAGE__SCYLLA__PASSWORD="test-only",
    )
    return env


def test_every_setting_is_accepted_by_the_relay(tmp_path):
    env = fly_env(tmp_path)
    ok = subprocess.run([str(RELAY_BIN), "check"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "mode Production, backend Scylla" in ok.stdout
    # The check does catch a setting the relay does not have.
    typo = subprocess.run([str(RELAY_BIN), "check"], env={**env, "RELAY_LIMITS__MAX_CONECTIONS": "5"},
                          capture_output=True, text=True)
    assert typo.returncode == 64 and "RELAY_LIMITS__MAX_CONECTIONS" in typo.stderr


def test_ports_paths_and_drain_match_the_relay():
    env = FLY["env"]
    public_port = int(env["RELAY_LISTEN"].rsplit(":", 1)[1])
    admin_port = int(env["RELAY_ADMIN_LISTEN"].rsplit(":", 1)[1])
    svc = FLY["http_service"]
    assert svc["internal_port"] == public_port
    assert FLY["checks"]["alive"]["port"] == public_port
    assert FLY["metrics"]["port"] == admin_port
    assert admin_port != public_port
    # The admin listener is never a public service.
    assert all(s.get("internal_port") != admin_port for s in FLY.get("services", []))
    assert svc["concurrency"]["type"] == "connections"
    assert svc["concurrency"]["hard_limit"] <= int(env["RELAY_LIMITS__MAX_CONNECTIONS"])
    assert svc["auto_stop_machines"] in ("off", False)
    assert FLY["kill_signal"] in ("SIGTERM", "SIGINT")
    assert seconds(FLY["kill_timeout"]) >= seconds(env["RELAY_SHUTDOWN_GRACE"]) + 5
    assert (ROOT / FLY["build"]["dockerfile"]).exists()


def test_check_and_metrics_paths_answer(relay):
    public = [c["path"] for c in FLY["http_service"]["checks"]] + [FLY["checks"]["alive"]["path"]]
    for path in public:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}{path}", timeout=5) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}{FLY['metrics']['path']}", timeout=5) as r:
        assert r.status == 200 and b"relay_build_info" in r.read()
