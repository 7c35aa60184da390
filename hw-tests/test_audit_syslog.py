"""The audit trail delivered to an audit repository: Debian's rsyslog as the repository,
syslog over TLS (RFC 5425) with client-certificate checking (`[[uplink]] kind =
"syslog-tls"`).

The repository is a private `rsyslogd -n` (its own config, work folder and pid file; no
system sockets) with imtcp on 127.0.0.1 and a port the test picks, GnuTLS
(`StreamDriver.Mode="1"`, `AuthMode="x509/certvalid"`: a client certificate from the test
CA is required), writing every message's raw text (JSON-escaped, one per line) to a file.
Between the gateway and rsyslog sits a small TCP proxy of the test's that can reset its
connections (SO_LINGER 0: a real RST on both sides).

- 10,000+ audit events (kiosk reads of appointments by logged-in staff, each one audit
  record, from 4 threads) while the test restarts rsyslog (SIGTERM, start again), resets the
  proxy's connections and kills gatewayd (kill -9) at random points and starts it again:
  at the end every chain position 1..N of the audit trail is at the repository, a position
  seen twice only with the identical message, no position that the chain does not have;
  `gatewayd audit verify` passes; the metrics say sent, nothing queued, up, no backlog;
- a gateway with a client certificate from another CA: the repository refuses it; nothing
  is delivered, the uplink counts retries and is not up, `spool status` says why;
- the queue cap: `max_queued = 50` with the repository down while 200+ audit records are
  written: when it comes up exactly chain positions 1..50 arrive, the drop metric counts
  the rest, and the log warns that the queue is full.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import gw
import kiosk
import pki
from test_uplink import poll

DEST = "arr"
SEQ = re.compile(rb'\[meta sequenceId="(\d+)"\]')


def rsyslogd_binary() -> str:
    path = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
    if path is None:
        raise AssertionError("rsyslogd is not installed: apt-get install rsyslog rsyslog-gnutls (hw-tests/run-all.sh does)")
    gtls = list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")) + list(Path("/usr/lib/rsyslog").glob("lmnsd_gtls.so"))
    if not gtls:
        raise AssertionError("rsyslog's GnuTLS driver (lmnsd_gtls.so) is missing: apt-get install rsyslog-gnutls")
    return path


class Rsyslog:
    """A private rsyslogd: TLS syslog on 127.0.0.1:``port``, client certificates from ``ca``
    required; every message's raw text, JSON-escaped, one line each, in ``out``."""

    def __init__(self, dir: Path, ca: pki.CA, port: int | None = None):
        self.binary = rsyslogd_binary()
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.work = dir / "work"
        self.work.mkdir(exist_ok=True)
        self.port = port or gw.free_port()
        self.server = ca.server_cert("127.0.0.1", name="rsyslog")
        self.ca = ca
        self.out = dir / "received.log"
        self.conf = dir / "rsyslog.conf"
        self.pidfile = dir / "rsyslogd.pid"
        self.log = dir / "rsyslogd.log"
        self.proc: subprocess.Popen | None = None
        self.conf.write_text(f"""
global(workDirectory="{self.work}" maxMessageSize="256k"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca.cert}"
       defaultNetstreamDriverCertFile="{self.server.cert}"
       defaultNetstreamDriverKeyFile="{self.server.key}")
main_queue(queue.timeoutShutdown="20000" queue.timeoutActionCompletion="20000")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid" MaxSessions="50")
input(type="imtcp" port="{self.port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg:::json%\\n")
action(type="omfile" file="{self.out}" template="raw" asyncWriting="off" flushOnTXEnd="on")
""")

    def start(self) -> "Rsyslog":
        self.proc = subprocess.Popen([self.binary, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"rsyslogd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def received(self) -> list[bytes]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().splitlines():
            if line:
                out.append(json.loads(b'"' + line + b'"').encode("utf-8"))
        return out

    def hwtests_log_sections(self):
        return [("rsyslogd", self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "")]


class ResettingProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream``; :meth:`reset` ends every connection it
    carries with a RST (SO_LINGER 0) on both sides."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(16)
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.resets = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                server.settimeout(None)  # the repository sends nothing: reads wait
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
            self.resets += 1
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        self.reset()


@pytest.fixture
def repositories(tmp_path):
    made: list[Rsyslog] = []

    def make(ca: pki.CA, port: int | None = None) -> Rsyslog:
        r = Rsyslog(tmp_path / f"rsyslog{len(made)}", ca, port)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def audit_gateway(gateway_factory, ca: pki.CA, client: pki.KeyPair, port: int, **uplink) -> tuple[gw.Gateway, int]:
    """A core gateway with the kiosk (the audit events' source) and one audit repository."""
    kport = gw.free_port()
    up = {"name": DEST, "kind": "syslog-tls", "url": f"syslog-tls://127.0.0.1:{port}",
          "ca_file": str(ca.cert), "client_auth": "files",
          "cert_file": str(client.cert), "key_file": str(client.key), **uplink}
    g = gateway_factory({
        "node": {"id": "core-1", "role": "core"},
        "booking": {"listen": f"127.0.0.1:{kport}",
                    "schedule": [{"id": "ct-1", "modality": "CT", "station_ae": "CT01",
                                  "hours": kiosk.EVERY_DAY}]},
        "uplink": [up],
    }, start=False)
    r = kiosk.cli(g, "keys", "init")
    assert r.returncode == 0, r.stderr
    return g, kport


def chain(g: gw.Gateway) -> list[dict]:
    path = g.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chain_seqs(g: gw.Gateway) -> list[int]:
    return [r["seq"] for r in chain(g)]


def by_seq(messages: list[bytes]) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {}
    for m in messages:
        found = SEQ.search(m)
        assert found, f"a message without [meta sequenceId]: {m[:200]!r}"
        out.setdefault(int(found.group(1)), set()).add(m)
    return out


def metric(g: gw.Gateway, name: str, **labels: str) -> float:
    values = gw.metric_values(g.metrics(), name, **labels)
    return sum(values)


class Accounts:
    """Staff accounts, each used for one login (a TOTP code is accepted once)."""

    def __init__(self, g: gw.Gateway, n: int):
        self.lock = threading.Lock()
        self.free: list[tuple[str, str]] = []

        def add(i: int) -> None:
            secret = kiosk.add_staff(g, f"clerk.{i:02d}")
            with self.lock:
                self.free.append((f"clerk.{i:02d}", secret))

        # The first alone: it creates the audit trail (two processes creating it at once
        # race for its head file).
        add(0)
        threads = [threading.Thread(target=add, args=(i,)) for i in range(1, n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(self.free) == n

    def take(self) -> tuple[str, str]:
        with self.lock:
            assert self.free, "out of fresh staff accounts"
            return self.free.pop()


class Session:
    """A logged-in staff session on one kept-open HTTPS connection."""

    def __init__(self, g: gw.Gateway, port: int, name: str, secret: str):
        self.k = kiosk.Kiosk(g, port)
        self.port = port
        r = self.k.login(name, secret)
        self.ok = r.status == 200
        self.conn: http.client.HTTPSConnection | None = None

    def get(self, path: str) -> int:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.k.ctx, timeout=10)
        try:
            self.conn.request("GET", path, headers={"Cookie": self.k.cookie or "",
                                                    "Accept": "application/fhir+json"})
            r = self.conn.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise


def reads(g: gw.Gateway, port: int, accounts: Accounts, want: int, stop: threading.Event,
          threads: int = 4, total: list[int] | None = None) -> list[int]:
    """Appointment reads (one audit record each) from ``threads`` logged-in sessions until
    ``want`` were answered 200 or ``stop`` is set; a session lost to a gateway restart logs
    in again with a fresh account. ``total[0]`` counts the 200s as they come. Returns the
    200s per thread."""
    done = [0] * threads
    lock = threading.Lock()
    total = total if total is not None else [0]

    def worker(t: int) -> None:
        s: Session | None = None
        account = None
        i = 0
        while not stop.is_set():
            with lock:
                if total[0] >= want:
                    return
            try:
                if s is None:
                    account = account or accounts.take()
                    s = Session(g, port, *account)
                    if not s.ok:  # the code was used (a login the restart cut off)
                        s, account = None, None
                        continue
                status = s.get(f"/fhir/Appointment?patient=ZZAUDIT{t}-{i}")
                i += 1
                if status == 200:
                    done[t] += 1
                    with lock:
                        total[0] += 1
                elif status == 401:
                    s, account = None, None
            except (OSError, http.client.HTTPException):
                # The gateway is down (killed): the session is gone with it; the account's
                # code may still be unused, so it is tried again.
                s = None
                time.sleep(0.2)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done


def test_ten_thousand_events_arrive_through_restarts_resets_and_kill9(
        tmp_path, gateway_factory, repositories, ca):
    started = time.monotonic()
    repo = repositories(ca).start()
    proxy = ResettingProxy(repo.port)
    client = ca.other_client_cert("core-1", name="gw-client")
    g, port = audit_gateway(gateway_factory, ca, client, proxy.port)
    accounts = Accounts(g, 24)
    g.start()
    events_started = time.monotonic()

    stop = threading.Event()
    chaos: list[str] = []

    total = [0]

    def chaos_monkey() -> None:
        # Faults at random points of the run (seeded), by the number of events answered, so
        # that all of them fall inside it however fast the machine is.
        rnd = random.Random(20)
        plan = ["rsyslog", "reset", "kill9", "reset", "rsyslog", "kill9", "reset", "rsyslog", "kill9"]
        at = sorted(rnd.sample(range(300, 9_700), len(plan)))
        for what, when in zip(plan, at):
            while total[0] < when:
                if stop.wait(0.05):
                    return
            if what == "rsyslog":
                repo.restart()
            elif what == "reset":
                proxy.reset()
            else:
                g.kill9()
                time.sleep(rnd.uniform(0.0, 0.5))
                g.start()
            chaos.append(f"{what}@{time.strftime('%H:%M:%S')}")

    monkey = threading.Thread(target=chaos_monkey)
    monkey.start()
    try:
        per_thread = reads(g, port, accounts, 10_000, stop, total=total)
    finally:
        stop.set()
        monkey.join()
    print(f"reads per thread: {per_thread}, chaos: {chaos}, events took {time.monotonic() - events_started:.1f}s")
    assert sum(per_thread) >= 10_000
    assert len(chaos) == 9, f"every planned fault happened: {chaos}"
    if not g.is_running():
        g.start()

    # Nothing appends any more: the chain is final. Every position reaches the repository.
    seqs = chain_seqs(g)
    n = len(seqs)
    assert seqs == list(range(1, n + 1)), "the chain is 1..N"
    assert n >= 10_000

    records = {r["seq"]: r for r in chain(g)}

    def arrived():
        got = by_seq(repo.received())
        missing = sorted(set(range(1, n + 1)) - set(got))
        return not missing, (f"{len(missing)} of {n} missing: "
                             f"{[(s, records[s]['time_unix_ms']) for s in missing[:10]]}; faults {chaos}")

    poll("every chain position at the repository", arrived, timeout=90, interval=1)
    got = by_seq(repo.received())
    assert set(got) == set(range(1, n + 1)), f"unknown positions: {sorted(set(got) - set(range(1, n + 1)))[:10]}"
    differing = [s for s, contents in got.items() if len(contents) != 1]
    assert not differing, f"positions repeated with different content: {differing[:10]}"
    total = len(repo.received())
    print(f"chain {n} records; repository got {total} messages ({total - n} recognisable repeats)")

    r = kiosk.cli(g, "audit", "verify")
    assert r.returncode == 0, r.stdout + r.stderr

    def settled():
        sent = metric(g, "gateway_uplink_sent_total", destination=DEST, result="sent")
        queued = metric(g, "gateway_uplink_queued", destination=DEST)
        up = metric(g, "gateway_uplink_up", destination=DEST)
        backlog = metric(g, "gateway_audit_export_backlog")
        return (queued == 0 and up == 1 and backlog == 0 and sent > 0), (sent, queued, up, backlog)

    info = poll("the uplink's metrics settle", settled, timeout=20, interval=0.5)
    print(f"after the last restart: sent {info[0]}, queued {info[1]}, up {info[2]}, backlog {info[3]}")
    assert metric(g, "gateway_audit_export_dropped_total") == 0
    assert g.status()["by_destination"][DEST]["queued"] == 0
    assert "ZZAUDIT" not in g.log_text(), "no patient identifier in the gateway's log"
    assert g.stop() == 0
    proxy.close()
    assert time.monotonic() - started < 180, "the test stays under 3 minutes"


def test_a_client_certificate_from_another_ca_is_refused_and_nothing_is_delivered(
        tmp_path, gateway_factory, repositories, ca):
    repo = repositories(ca).start()
    other = pki.CA(tmp_path / "other-ca", name="not the hospital's CA")
    client = other.other_client_cert("core-1", name="gw-client")
    g, _ = audit_gateway(gateway_factory, ca, client, repo.port)
    kiosk.add_staff(g, "clerk.a")  # audit records before the start: AccountAdded, TotpEnrolled
    g.start()
    d = poll("last_error set", lambda: ((d := g.status()["by_destination"].get(DEST, {})).get("last_error") is not None, d), 20)
    time.sleep(2)
    assert repo.received() == [], "the repository took nothing from an unknown client"
    assert metric(g, "gateway_uplink_sent_total", destination=DEST, result="sent") == 0
    assert metric(g, "gateway_uplink_sent_total", destination=DEST, result="retry") >= 1
    assert metric(g, "gateway_uplink_up", destination=DEST) == 0
    assert g.status()["by_destination"][DEST]["queued"] == len(chain(g))
    print(f"last_error: {d['last_error']}")
    assert "audit export failed" in g.log_text()
    assert g.stop() == 0


def test_queue_cap_keeps_the_oldest_and_counts_the_rest(tmp_path, gateway_factory, repositories, ca):
    port = gw.free_port()
    repo = repositories(ca, port)
    client = ca.other_client_cert("core-1", name="gw-client")
    g, kport = audit_gateway(gateway_factory, ca, client, port, max_queued=50)
    accounts = Accounts(g, 2)
    g.start()
    stop = threading.Event()
    reads(g, kport, accounts, 200, stop, threads=2)
    n = len(chain(g))
    assert n >= 200
    poll("the export reached the chain head",
         lambda: (metric(g, "gateway_audit_export_backlog") == 0
                  and metric(g, "gateway_audit_exported_total")
                  + metric(g, "gateway_audit_export_dropped_total", destination=DEST) == n, n), timeout=20)
    assert metric(g, "gateway_audit_exported_total") == 50
    assert metric(g, "gateway_audit_export_dropped_total", destination=DEST) == n - 50
    assert g.status()["by_destination"][DEST]["queued"] == 50
    assert "audit repository queue is full" in g.log_text()

    repo.start()
    poll("50 messages delivered", lambda: (len(by_seq(repo.received())) == 50, len(repo.received())), timeout=30)
    time.sleep(2)
    got = by_seq(repo.received())
    assert sorted(got) == list(range(1, 51)), "the oldest 50 were kept and delivered"
    assert metric(g, "gateway_audit_export_dropped_total", destination=DEST) == n - 50
    poll("queue empty", lambda: (metric(g, "gateway_uplink_queued", destination=DEST) == 0, None), timeout=10)
    assert g.stop() == 0
