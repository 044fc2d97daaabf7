"""Harness for end-to-end tests: the real `relay` binary, driven by the `websockets` library.

Each test gets its own relay process on free loopback ports with its own data directory.
"""

import asyncio
import base64
import functools
import hashlib
import json
import secrets
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]
RELAY_BIN = Path(os.environ.get("RELAY_BIN", ROOT / "target" / "debug" / "relay"))

# `embedded` (default) or `cassandra`: the same suite runs against both backends.
BACKEND = os.environ.get("E2E_BACKEND", "embedded")
CASSANDRA_RUN = ROOT / "target" / "cassandra" / "run"


def cassandra_port() -> int:
    port_file = CASSANDRA_RUN / "port"
    assert port_file.exists(), "Cassandra is not running: start it with `scripts/cassandra start` (scripts/test does)"
    return int(port_file.read_text())


# Admin API credentials every test relay accepts: name -> (role, org, bearer token).
ADMIN = {
    "support-desk": ("support", None),
    "clinic-a-admin": ("org_admin", "clinic-a"),
    "clinic-b-admin": ("org_admin", "clinic-b"),
    "account-service": ("account_service", None),
}
ADMIN_TOKENS = {name: "rla_" + secrets.token_hex(32) for name in ADMIN}


def admin_credentials_toml() -> str:
    entries = []
    for name, (role, org) in ADMIN.items():
        digest = hashlib.sha256(ADMIN_TOKENS[name].encode()).hexdigest()
        org_part = f', org = "{org}"' if org else ""
        entries.append(f'{{ name = "{name}", role = "{role}"{org_part}, token_sha256 = "{digest}" }}')
    return "[" + ", ".join(entries) + "]"


_handed_out = set()


def free_port() -> int:
    """A free loopback port, never the same one twice in this test run (the kernel may hand
    out a just-released port again before the first taker binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def run(fn):
    """Runs an async test function on a fresh event loop."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


class Relay:
    """One relay process. `env` adds RELAY_* settings."""

    def __init__(self, data_dir: Path, env: dict | None = None):
        assert RELAY_BIN.exists(), f"{RELAY_BIN} missing: run `cargo build -p relay` (scripts/test does)"
        self.data_dir = data_dir
        self.env = dict(env or {})
        self.port = free_port()
        self.admin_port = free_port()
        self.proc = None
        self.log_path = data_dir.parent / f"relay-{self.port}.log"
        self.keyspace = "e2e_" + uuid.uuid4().hex[:16]
        self.migrated = BACKEND != "cassandra"
        # Where it listens, and what runs it: a partition test puts a relay in a network
        # namespace of its own (`ip netns exec NS`) with an address there.
        self.host = "127.0.0.1"
        self.wrap = []

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_LISTEN=f"{self.host}:{self.port}",
            RELAY_ADMIN_LISTEN=f"{self.host}:{self.admin_port}",
            RELAY_DATA_DIR=str(self.data_dir),
            RELAY_SHUTDOWN_GRACE="5s",
            RELAY_LIMITS__SEND_RATE_PER_S="10000",
            RELAY_LIMITS__SEND_BURST="10000",
            RELAY_LIMITS__URGENT_PER_MINUTE="10000",
            RELAY_ADMIN__CREDENTIALS=admin_credentials_toml(),
        )
        if BACKEND == "cassandra":
            env.update(
                RELAY_STORAGE__BACKEND="scylla",
                RELAY_STORAGE__SCYLLA__NODES=f'["127.0.0.1:{cassandra_port()}"]',
                RELAY_STORAGE__SCYLLA__KEYSPACE=self.keyspace,
                RELAY_STORAGE__SCYLLA__REPLICATION="{ datacenter1 = 1 }",
            )
        env.update(self.env)
        return env

    def store_files(self):
        """Every file the store wrote: where a payload in clear would show."""
        if BACKEND == "cassandra":
            roots = [CASSANDRA_RUN / "commitlog", *CASSANDRA_RUN.glob(f"data/{self.keyspace}")]
        else:
            roots = [self.data_dir / "store"]
        return [p for root in roots for p in root.rglob("*") if p.is_file()]

    def start(self):
        # A port from free_port() can be taken by someone's outgoing connection before the
        # relay binds it (ephemeral ports come from the same range): pick new ports and retry.
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError as e:
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                self.port, self.admin_port = free_port(), free_port()

    def _start(self):
        if not self.migrated:
            subprocess.run([str(RELAY_BIN), "migrate"], env=self._env(), check=True, capture_output=True, timeout=120)
            self.migrated = True
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrap, str(RELAY_BIN)], env=self._env(), stdout=self.log, stderr=self.log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.logs()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("relay did not become ready: " + self.logs())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill(self):
        self.stop(signal.SIGKILL)

    def restart(self, env: dict | None = None):
        self.stop()
        if env is not None:
            self.env = env
        return self.start()

    def token(self, user, device, *extra) -> str:
        out = subprocess.run(
            [str(RELAY_BIN), "token", "--user", user, "--device", device, *extra],
            env=self._env(), capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()

    def admin(self, method, path, body=None, as_="support-desk", token=None):
        """Calls the admin API; returns (status, parsed JSON body)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.host}:{self.admin_port}{path}", data=data, method=method)
        bearer = token if token is not None else ADMIN_TOKENS.get(as_)
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def readyz(self):
        """(status, body) of /readyz; (0, why) when the admin listener does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/readyz", timeout=2) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode().strip()
        except OSError as e:
            return 0, str(e)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    async def online(self, user, device, **kw):
        """A connected device past its replay (`hello`, queued messages, `synced`)."""
        dev = await self.connect(user, device, **kw)
        await dev.handshake()
        return dev

    async def register_offline(self, user, device):
        """Makes the device known to the relay, then disconnects it: messages now queue for it."""
        await (await self.online(user, device)).close()

    async def connect(self, user, device, token=None, **kw):
        token = token or self.token(user, device)
        headers = {"Authorization": f"Bearer {token}"}
        ws = await connect(self.url, additional_headers=headers, compression=None, **kw)
        return Device(ws, user, device)


class Device:
    """A connected device with protocol helpers."""

    def __init__(self, ws, user, device):
        self.ws, self.user, self.device = ws, user, device
        self.hello = None

    async def recv(self, timeout=5.0) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, type_, timeout=5.0) -> dict:
        frame = await self.recv(timeout)
        assert frame["type"] == type_, frame
        return frame

    async def handshake(self) -> list:
        """Reads `hello`, the replayed deliveries, and `synced`; returns the deliveries."""
        self.hello = await self.expect("hello")
        delivered = []
        while True:
            frame = await self.recv()
            if frame["type"] == "synced":
                return delivered
            assert frame["type"] == "deliver", frame
            delivered.append(frame)

    async def send(self, to, body: bytes, msg_id=None, urgent=False) -> str:
        msg_id = msg_id or str(uuid.uuid4())
        frame = {"type": "send", "id": msg_id, "to": to, "body": base64.b64encode(body).decode(), "urgent": urgent}
        await self.ws.send(json.dumps(frame))
        return msg_id

    async def send_ok(self, to, body: bytes, msg_id=None, urgent=False) -> dict:
        msg_id = await self.send(to, body, msg_id, urgent)
        reply = await self.recv()
        assert reply["type"] == "accepted" and reply["id"] == msg_id, reply
        return reply

    async def ack(self, seqs):
        await self.ws.send(json.dumps({"type": "ack", "seqs": list(seqs)}))

    async def close(self):
        await self.ws.close()


def body_of(frame) -> bytes:
    return base64.b64decode(frame["body"])


@pytest.fixture
def relay(tmp_path):
    r = Relay(tmp_path / "data").start()
    yield r
    r.stop()


@pytest.fixture
def make_relay(tmp_path):
    started = []

    def make(env=None, name="data"):
        r = Relay(tmp_path / name, env).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


FAKE_PUSH_BIN = Path(os.environ.get("FAKE_PUSH_BIN", ROOT / "target" / "debug" / "fake-push"))


class FakePush:
    """The fake APNs + FCM servers (`tests/src/fake_push.rs`): HTTP/2 over TLS on loopback."""

    def __init__(self, directory: Path):
        assert FAKE_PUSH_BIN.exists(), f"{FAKE_PUSH_BIN} missing: run `cargo build --workspace` (scripts/test does)"
        self.proc = subprocess.Popen(
            [str(FAKE_PUSH_BIN), "--dir", str(directory)], stdout=subprocess.PIPE, text=True
        )
        self.info = json.loads(self.proc.stdout.readline())
        self.dir = Path(self.info["dir"])

    def relay_env(self, **extra) -> dict:
        """RELAY_* settings that point a relay at this fake for both providers."""
        ca = str(self.dir / "ca.pem")
        env = {
            "RELAY_PUSH__APNS__KEY_FILE": str(self.dir / "apns-key.p8"),
            "RELAY_PUSH__APNS__KEY_ID": self.info["key_id"],
            "RELAY_PUSH__APNS__TEAM_ID": self.info["team_id"],
            "RELAY_PUSH__APNS__PRODUCTION_URL": self.info["apns_url"],
            "RELAY_PUSH__APNS__SANDBOX_URL": self.info["apns_url"],
            "RELAY_PUSH__APNS__CA_FILE": ca,
            "RELAY_PUSH__FCM__SERVICE_ACCOUNT_FILE": str(self.dir / "service-account.json"),
            "RELAY_PUSH__FCM__BASE_URL": self.info["fcm_url"],
            "RELAY_PUSH__FCM__CA_FILE": ca,
        }
        env.update({f"RELAY_PUSH__{k.upper()}": str(v) for k, v in extra.items()})
        return env

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.info["control"] + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def requests(self, provider=None, token=None) -> list:
        return [
            r for r in self._call("GET", "/requests")
            if (provider is None or r["provider"] == provider) and (token is None or r["token"] == token)
        ]

    def script(self, provider, status, reason="", times=1, retry_after=None, token=None):
        self._call("POST", "/script", {
            "provider": provider, "status": status, "reason": reason, "times": times,
            "retry_after": retry_after, "token": token,
        })

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=5)


@pytest.fixture
def fake_push(tmp_path):
    fake = FakePush(tmp_path / "push")
    yield fake
    fake.stop()


async def register_push(dev, platform="apns", token=None, environment="sandbox", app_id="com.example.relay"):
    """Registers a push token on a connected device; returns the token."""
    token = token or (uuid.uuid4().hex * 2 if platform == "apns" else f"fcm:{uuid.uuid4().hex}")
    await dev.ws.send(json.dumps({
        "type": "push_token", "platform": platform, "token": token,
        "environment": environment, "app_id": app_id,
    }))
    reply = await dev.recv()
    assert reply == {"type": "push_token_saved", "registered": True}, reply
    return token
