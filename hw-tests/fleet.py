"""The vendor side of the fleet agent, on a real mosquitto broker.

`Broker(dir, ca)` writes a mosquitto 2.0 config into ``dir`` and runs
`mosquitto -c CONF` on 127.0.0.1 and a port picked here: TLS only, every client
must present a certificate of the test CA (``require_certificate true``), the
certificate's CN is the MQTT user name (``use_identity_as_username true``), and
the ACL confines every device to ``gw/<its CN>/#`` (``pattern readwrite
gw/%u/#``) while the user ``vendor`` may read and write ``gw/#``. It is stopped
by its PID (`stop`), and killed at teardown by the fixture.

Provisioning by claim uses ``prov/<claim id>/#`` the same way (``pattern
readwrite prov/%u/#``; the vendor reads and writes ``prov/#``). `Provisioner`
plays the vendor's provisioning service: it answers each CSR published on
``prov/+/csr`` with a certificate of the test CA for a device id it assigns,
inside a signed ``provision`` command.

`Vendor` signs commands with its own command key (an Ed25519 key made with the
openssl CLI; ``openssl pkey -pubout`` gives the SPKI PEM file the gateway reads
as ``fleet.vendor_public_key``) and publishes them with `mosquitto_pub`.
`Subscription` runs `mosquitto_sub -v` in the background and collects
``(topic, payload)`` lines, e.g. a command's state messages.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import gw
import pki

TOOLS = ("mosquitto", "mosquitto_pub", "mosquitto_sub")
START_TIMEOUT_S = 10.0


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        raise AssertionError(
            f"mosquitto tools not found: {', '.join(missing)}. Install them with "
            "`apt-get install -y --no-install-recommends mosquitto mosquitto-clients` "
            "(hw-tests/run-all.sh does this)."
        )


def _mosquitto() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """A mosquitto with TLS client certificates and a per-device ACL (see module docs)."""

    def __init__(self, dir: Path, ca: pki.CA, acl: str | None = None):
        """``acl`` replaces the fleet ACL (e.g. the regional booking broker's)."""
        require_tools()
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.port = gw.free_port()
        self.server = ca.server_cert("127.0.0.1", name="broker")
        self.log = self.dir / "mosquitto.log"
        self.acl = self.dir / "acl"
        self.acl.write_text(acl if acl is not None else
            "# the vendor sees and commands every device, and answers every claim\n"
            "user vendor\n"
            "topic readwrite gw/#\n"
            "topic readwrite prov/#\n"
            "\n"
            "# every device (user = its certificate's CN) only its own subtree; a claim\n"
            "# certificate (CN = claim id) only its own provisioning subtree\n"
            "pattern readwrite gw/%u/#\n"
            "pattern readwrite prov/%u/#\n"
        )
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            "persistence false\n"
            # Started as root, mosquitto would switch to the `mosquitto` user, which cannot
            # read the test's private folders: stay the user that started it.
            "user root\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            f"acl_file {self.acl}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {ca.cert}\n"
            f"certfile {self.server.cert}\n"
            f"keyfile {self.server.key}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
        )
        self.proc: subprocess.Popen | None = None
        self._clients: dict[str, pki.KeyPair] = {}

    def client_cert(self, cn: str) -> pki.KeyPair:
        """A client certificate of the test CA whose CN (= MQTT user) is ``cn``."""
        if cn not in self._clients:
            self._clients[cn] = self.ca.other_client_cert(cn, name=f"mqtt-{cn}")
        return self._clients[cn]

    def start(self) -> "Broker":
        """Starts (or restarts, on the same port) and waits for this start's listen line."""
        offset = len(self.log_text())
        self.proc = subprocess.Popen([_mosquitto(), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "mosquitto.err", "ab"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}:\n{self.log_tail()}")
            if f"Opening ipv4 listen socket on port {self.port}" in self.log_text()[offset:]:
                return self
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port} within {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        err = self.dir / "mosquitto.err"
        extra = err.read_text(errors="replace") if err.exists() else ""
        return "\n".join(self.log_text().splitlines()[-n:]) + ("\n" + extra if extra else "")

    def hwtests_log_sections(self):
        return [("mosquitto log", self.log_tail(80))]

    def tls_args(self, cn: str) -> list[str]:
        kp = self.client_cert(cn)
        return ["-h", "127.0.0.1", "-p", str(self.port), "--cafile", str(self.ca.cert),
                "--cert", str(kp.cert), "--key", str(kp.key)]

    def publish(self, cn: str, topic: str, payload: bytes, retain: bool = False) -> subprocess.CompletedProcess:
        args = ["mosquitto_pub", *self.tls_args(cn), "-q", "1", "-i", f"{cn}-pub-{time.monotonic_ns()}",
                "-t", topic, "-s"]
        if retain:
            args.append("-r")
        return subprocess.run(args, input=payload, capture_output=True, timeout=20)

    def subscribe(self, cn: str, topic: str) -> "Subscription":
        return Subscription(self, cn, topic)


class Subscription:
    """`mosquitto_sub -v` in the background; `messages()` parses what it printed so far."""

    def __init__(self, broker: Broker, cn: str, topic: str):
        self.out = broker.dir / f"sub-{cn}-{time.monotonic_ns()}.txt"
        self.err = self.out.with_suffix(".err")
        self.proc = subprocess.Popen(
            ["mosquitto_sub", *broker.tls_args(cn), "-q", "1", "-v", "-i", f"{cn}-sub-{time.monotonic_ns()}",
             "-t", topic],
            stdin=subprocess.DEVNULL, stdout=open(self.out, "wb"), stderr=open(self.err, "wb"))

    def messages(self) -> list[tuple[str, str]]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            topic, _, payload = line.partition(" ")
            out.append((topic, payload))
        return out

    def on(self, topic: str) -> list[dict]:
        """JSON payloads received on exactly ``topic``."""
        return [json.loads(p) for t, p in self.messages() if t == topic]

    def wait_for(self, what, timeout: float = 15.0, describe: str = "message"):
        """Polls until ``what(self)`` is truthy and returns it (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what(self)
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"no {describe} within {timeout}s; received: {self.messages()[-20:]}\n"
                             f"mosquitto_sub stderr: {self.err.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Vendor:
    """Signs and publishes commands; keeps its own sequence counter."""

    def __init__(self, dir: Path, broker: Broker, name: str = "vendor-cmd"):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.key = self.dir / f"{name}.key"
        self.pub = self.dir / f"{name}.pub"
        pki.openssl("genpkey", "-algorithm", "ED25519", "-out", str(self.key))
        pki.openssl("pkey", "-in", str(self.key), "-pubout", "-out", str(self.pub))
        self.seq = int(time.time())  # increasing across test runs and restarts
        self._n = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def sign(self, data: bytes) -> bytes:
        f = self.dir / f"signed-{self._n}.bin"
        self._n += 1
        f.write_bytes(data)
        return pki.openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(self.key), "-in", str(f)).stdout

    def envelope(self, device: str, op: str, cmd_id: str, args: dict | None = None, seq: int | None = None,
                 expires_in: int = 300, expires_at: int | None = None, signer: "Vendor | None" = None,
                 signed: bool = True) -> bytes:
        body = {
            "device_id": device,
            "cmd_id": cmd_id,
            "op": op,
            "seq": self.next_seq() if seq is None else seq,
            "expires_at": int(time.time()) + expires_in if expires_at is None else expires_at,
            "args": args or {},
        }
        data = json.dumps(body).encode()
        env = {"alg": "ed25519", "payload": base64.b64encode(data).decode()}
        if signed:
            env["signature"] = base64.b64encode((signer or self).sign(data)).decode()
        return json.dumps(env).encode()

    def send(self, device: str, op: str, cmd_id: str, payload: bytes, as_user: str = "vendor") -> None:
        r = self.broker.publish(as_user, f"gw/{device}/cmd/{op}/{cmd_id}", payload)
        assert r.returncode == 0, f"mosquitto_pub failed: {r.stderr.decode(errors='replace')}"


# The final states of a command (DESIGN.md); rolled-back is an update's.
FINAL_STATES = ("successful", "failed", "rolled-back")


def state_topic(device: str, op: str, cmd_id: str) -> str:
    return f"gw/{device}/cmd/{op}/{cmd_id}/state"


def final_state(sub: Subscription, device: str, op: str, cmd_id: str, timeout: float = 15.0,
                after: int = 0) -> dict:
    """The command's final state message (successful, failed, or rolled-back for an
    `update`), looking only at the messages on its state topic after the first ``after``
    ones (a command id may be reused by a replay)."""
    topic = state_topic(device, op, cmd_id)

    def done(s: Subscription):
        finals = [m for m in s.on(topic)[after:] if m.get("state") in FINAL_STATES]
        return finals[-1] if finals else None

    return sub.wait_for(done, timeout, describe=f"final state on {topic}")


class Provisioner:
    """The vendor's provisioning service (see the module docs), in a background thread.

    ``device_ids`` are assigned in order, one per claim. ``bad_answers_first`` makes it send,
    before the real answer to the first claim, an unsigned answer and a validly signed one
    whose certificate certifies another key: the gateway must refuse both.
    """

    def __init__(self, broker: Broker, vendor: Vendor, ca: pki.CA, device_ids: list[str],
                 bad_answers_first: bool = False):
        self.broker, self.vendor, self.ca = broker, vendor, ca
        self.dir = vendor.dir / "provisioning"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_ids = list(device_ids)
        self.bad_answers_first = bad_answers_first
        self.assigned: dict[str, str] = {}
        self.answers: list[tuple[str, str, str]] = []  # (claim, cmd_id, kind)
        self.errors: list[str] = []
        self.sub = broker.subscribe("vendor", "prov/+/csr")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="provisioner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            messages = self.sub.messages()
            for topic, payload in messages[seen:]:
                if payload and payload != "(null)":  # mosquitto_sub -v prints a cleared retain so
                    try:
                        self._answer(topic, payload)
                    except Exception as e:  # reported by check(); the thread keeps serving
                        self.errors.append(f"{topic}: {e!r}")
            seen = len(messages)
            time.sleep(0.05)

    def _answer(self, topic: str, payload: str) -> None:
        claim = topic.split("/")[1]
        request = json.loads(payload)
        assert request["claim"] == claim, request
        if claim in self.assigned:
            return  # answered already (a reconnect republishes the retained CSR)
        device = self.device_ids.pop(0)
        self.assigned[claim] = device
        csr = self.dir / f"{claim}.csr"
        csr.write_text(request["csr"])
        cert = self.ca.sign_csr_as(csr, self.dir / f"{device}.pem", device).read_text()
        if self.bad_answers_first:
            self._send(claim, "bad-unsigned", self.vendor.envelope(
                claim, "provision", "bad-unsigned", {"device_id": device, "certificate": cert}, signed=False))
            stranger = self.ca.other_client_cert(device, name=f"stranger-{device}")
            self._send(claim, "bad-key", self.vendor.envelope(
                claim, "provision", "bad-key", {"device_id": device, "certificate": stranger.cert.read_text()}))
        self._send(claim, "good", self.vendor.envelope(
            claim, "provision", f"prov-{device}", {"device_id": device, "certificate": cert}))

    def _send(self, claim: str, kind: str, envelope: bytes) -> None:
        cmd_id = json.loads(base64.b64decode(json.loads(envelope)["payload"]))["cmd_id"]
        r = self.broker.publish("vendor", f"prov/{claim}/cmd/provision/{cmd_id}", envelope)
        assert r.returncode == 0, r.stderr
        self.answers.append((claim, cmd_id, kind))

    def check(self) -> None:
        assert not self.errors, f"the provisioning service failed: {self.errors}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sub.stop()


def result_topic(device: str, op: str, cmd_id: str) -> str:
    return f"gw/{device}/cmd/{op}/{cmd_id}/result"


def staff_command(vendor: Vendor, sub: Subscription, device: str, op: str, cmd_id: str, args: dict,
                  timeout: float = 20.0) -> tuple[dict, dict | None]:
    """Sends a signed ``staff-invite`` / ``staff-disable`` to ``device`` and returns its final
    state and its result body (None when there is none). ``sub`` must watch ``gw/<device>/#``
    as ``vendor``. Works for any broker the vendor reaches (a host mosquitto, or one a QEMU
    guest reaches through user networking)."""
    seen = len(sub.on(state_topic(device, op, cmd_id)))
    vendor.send(device, op, cmd_id, vendor.envelope(device, op, cmd_id, args))
    final = final_state(sub, device, op, cmd_id, timeout, after=seen)
    if final.get("state") != "successful":
        return final, None
    results = sub.wait_for(lambda s: s.on(result_topic(device, op, cmd_id)), timeout,
                           describe=f"result of {op} {cmd_id}")
    return final, results[-1]


def staff_invite(vendor: Vendor, sub: Subscription, device: str, name: str, role: str,
                 cmd_id: str, timeout: float = 20.0) -> dict:
    """``staff-invite`` that must succeed: its result ``{name, role, code, expires_at}``
    (``timeout``: for its final state and its result, each)."""
    final, result = staff_command(vendor, sub, device, "staff-invite", cmd_id, {"name": name, "role": role},
                                  timeout=timeout)
    assert final["state"] == "successful", f"staff-invite {name}: {final}"
    assert result and result.get("name") == name and result.get("code"), result
    return result
