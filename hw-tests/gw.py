"""Drive a real `gatewayd` process from the tests.

`Gateway` writes a TOML config into its own temporary folder, starts
`$GATEWAYD run --config FILE` with stderr captured to a log file there, waits
for `GET /healthz` to answer 200, and wraps the CLI commands of the contract
(`spool status|export|verify`, `check-config`). Every server binds 127.0.0.1
on a port picked here; the process is stopped by its PID.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60.0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not
    handed out before: the port is released on return, so the kernel may offer it again to
    the next call before its user binds it (a test's HL7 port came back as the admin port)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no free TCP port on 127.0.0.1 that was not handed out already")


def listening_on(port: int) -> bool:
    """Whether a socket listens on TCP ``port`` of 127.0.0.1 (or any address), read from
    /proc/net/tcp without connecting: a probe that connects would queue behind a
    single-threaded server's current association, or take its place."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        addr, _, hexport = fields[1].partition(":")
        if fields[3] == "0A" and int(hexport, 16) == port and addr in ("0100007F", "00000000"):
            return True
    return False


PROC_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (the peak), RssAnon, RssFile (KiB) and Threads of a live process, from
    /proc/PID/status: what its RSS is made of (heap and stacks, or pages of the binary and its
    libraries) and how many threads hold stacks."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in PROC_STATUS_KEYS:
            vals[key] = int(rest.split()[0])
    return vals


def gatewayd_binary() -> str:
    path = os.environ.get("GATEWAYD", "")
    if not path:
        raise AssertionError(
            "GATEWAYD is not set: point it at the release binary, e.g. "
            "GATEWAYD=$PWD/target/release/gatewayd (run-all.sh does this)"
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError(f"GATEWAYD={path} is not an executable file: run `cargo build --release -p gatewayd`")
    return path


# --------------------------------------------------------------------------
# TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(cfg: dict[str, Any]) -> str:
    """Write a nested dict as TOML: tables, arrays of tables, scalars and arrays."""
    out: list[str] = []

    def emit(prefix: str, table: dict[str, Any], header: str | None) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
        if header is not None:
            out.append(header)
        for k, v in scalars.items():
            out.append(f"{k} = {_toml_value(v)}")
        if header is not None or scalars:
            out.append("")
        for k, v in table.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                emit(name, v, f"[{name}]")
            elif _is_table_array(v):
                for item in v:
                    emit(name, item, f"[[{name}]]")

    emit("", cfg, None)
    return "\n".join(out) + "\n"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``over``; a value of None in ``over`` deletes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def base_config(data_dir: Path, dicom_port: int, admin_port: int) -> dict[str, Any]:
    """The contract's config with test-friendly values (small min_free_bytes)."""
    return {
        "node": {"id": "test-gw", "data_dir": str(data_dir), "mode": "development"},
        "dicom": {
            "listen": f"127.0.0.1:{dicom_port}",
            "ae_title": "GATEWAY",
            "max_associations": 32,
            "max_associations_per_peer": 8,
            "artim_timeout": "30s",
            "idle_timeout": "300s",
            "shutdown_grace": "30s",
        },
        "spool": {"max_bytes": "20GiB", "min_free_bytes": "1MiB"},
        "keystore": {"backend": "software"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }


def parse_duration_s(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = float(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# --------------------------------------------------------------------------
# Prometheus text format


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition as (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError(f"unparseable metrics line: {line!r}")
        labels = dict(_LABEL.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def metric_values(samples, name: str, **labels: str) -> list[float]:
    return [v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())]


# --------------------------------------------------------------------------
# The daemon


class Gateway:
    """One `gatewayd run` process with its own config, data dir and log."""

    def __init__(self, workdir: Path, overrides: dict[str, Any] | None = None, name: str = "gw"):
        self.binary = gatewayd_binary()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.data_dir = self.workdir / "data"
        self.dicom_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.dicom_port:
            self.admin_port = free_port()
        self.config = deep_merge(base_config(self.data_dir, self.dicom_port, self.admin_port), overrides or {})
        self.config_path = self.workdir / "gatewayd.toml"
        self.config_path.write_text(to_toml(self.config))
        self.log_path = self.workdir / "gatewayd.log"
        self.stdout_path = self.workdir / "gatewayd.stdout.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- process ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> "Gateway":
        assert not self.is_running(), "gatewayd already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== hw-tests: start #{self.starts} of {self.name} =====\n".encode())
        err = open(self.log_path, "ab")
        out = open(self.stdout_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            err.close()
            out.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"gatewayd exited with {self.proc.returncode} before /healthz answered\n"
                    f"config:\n{self.config_path.read_text()}\nlog tail:\n{self.log_tail()}"
                )
            try:
                code, _ = self.http_get("/healthz", timeout=1.0)
                if code == 200:
                    return
                last = f"HTTP {code}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(
            f"gatewayd /healthz on 127.0.0.1:{self.admin_port} not 200 within {timeout}s ({last})\n"
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, return the exit code."""
        assert self.proc is not None, "gatewayd was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"gatewayd did not exit within {timeout}s of SIGTERM\nlog tail:\n{self.log_tail()}"
            ) from None

    def kill9(self) -> None:
        assert self.proc is not None, "gatewayd was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self, wait: bool = True) -> "Gateway":
        """Start again on the same config, ports and data dir (stops it first if running)."""
        if self.is_running():
            rc = self.stop()
            assert rc == 0, f"gatewayd exited {rc} on SIGTERM before restart\n{self.log_tail()}"
        return self.start(wait=wait)

    def cleanup(self) -> None:
        """Fixture teardown: never leave a process behind."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    # -- logs ---------------------------------------------------------------

    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self.stdout_path):
            if p.exists():
                parts.append(p.read_bytes().decode("utf-8", errors="replace"))
        return "\n".join(parts)

    def log_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in (self.log_path, self.stdout_path) if p.exists())

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- admin HTTP ------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", errors="replace")

    def metrics_text(self) -> str:
        code, body = self.http_get("/metrics")
        assert code == 200, f"/metrics answered {code}: {body[:500]}"
        return body

    def metrics(self):
        return parse_metrics(self.metrics_text())

    # -- CLI -------------------------------------------------------------

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def status(self) -> dict[str, Any]:
        r = self.cli("spool", "status", "--config", str(self.config_path), "--json")
        assert r.returncode == 0, (
            f"`gatewayd spool status --json` exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            f"\ndaemon log tail:\n{self.log_tail(20)}"
        )
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"`spool status --json` printed no JSON ({e}): {r.stdout!r}") from None

    def export(self, uid: str, out: Path | str, check: bool = True) -> subprocess.CompletedProcess:
        r = self.cli("spool", "export", "--config", str(self.config_path), "--sop-instance-uid", uid, "--out", str(out))
        if check:
            assert r.returncode == 0, (
                f"`gatewayd spool export` of {uid} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
            assert Path(out).is_file(), f"`spool export` exited 0 but wrote no {out}"
        return r

    def verify(self) -> tuple[int, dict[str, Any] | None, subprocess.CompletedProcess]:
        """Run `spool verify --json`: (exit code, parsed JSON or None, the process)."""
        r = self.cli("spool", "verify", "--config", str(self.config_path), "--json", timeout=300)
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError:
            doc = None
        return r.returncode, doc, r

    def check_config(self) -> subprocess.CompletedProcess:
        return self.cli("check-config", "--config", str(self.config_path))

    def data_files(self) -> list[Path]:
        return [p for p in self.data_dir.rglob("*") if p.is_file()] if self.data_dir.exists() else []

    def sealed_files(self) -> list[Path]:
        """The files holding sealed objects: large DICOM objects in `spool/blobs/`, the
        others (small DICOM objects, HL7, audit) in the journal's segments."""
        spool = self.data_dir / "spool"
        blobs = sorted(p for p in (spool / "blobs").rglob("*") if p.is_file()) if (spool / "blobs").exists() else []
        return blobs + sorted((spool / "journal").glob("*.wal")) if (spool / "journal").exists() else blobs
