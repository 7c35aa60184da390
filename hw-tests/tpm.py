"""A real TPM 2.0 simulator (swtpm) for the tests, and tpm2-tools around it.

`Swtpm(state_dir)` runs

    swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1
                 --ctrl type=tcp,port=P+1,bindaddr=127.0.0.1
                 --tpmstate dir=D --flags not-need-init,startup-clear

on a pair of free loopback ports (P and P+1 must both be free: picked by
binding 127.0.0.1:0 and checking P+1), with its log next to the state. The
TCTI string for gatewayd and tpm2-tools is `Swtpm.tcti`
(`swtpm:host=127.0.0.1,port=P`; the `mssim` TCTI does not work with this swtpm).

- `restart()` stops the process and starts it again on the same state folder
  and ports: a TPM power cycle (PCRs reset, persistent objects kept).
- `wipe_state()` stops it, deletes the state folder, recreates it empty and
  starts again: a cleared / replaced TPM (new seeds, no persistent objects).
- `extend_pcr(16, digest)` runs `tpm2_pcrextend 16:sha256=<hex>`.

The process is stopped by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 30.0


def missing_tools() -> list[str]:
    """swtpm and the tpm2-tools the tests call, if absent from PATH."""
    return [t for t in ("swtpm", "tpm2_pcrextend", "tpm2_pcrread") if shutil.which(t) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise AssertionError(
            f"not found on PATH: {', '.join(missing)}. Install them with `apt-get install -y "
            "--no-install-recommends swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0` (hw-tests/run-all.sh does this)"
        )


def _port_is_free(port: int, reuse: bool = False) -> bool:
    """Can 127.0.0.1:port be bound? With ``reuse`` (SO_REUSEADDR, as swtpm binds)
    only a listener counts, not connections in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_pair(attempts: int = 50) -> int:
    """A port P on 127.0.0.1 such that P and P+1 were both free a moment ago."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_is_free(port) and _port_is_free(port + 1):
            return port
    raise AssertionError(f"no pair of free consecutive ports on 127.0.0.1 after {attempts} attempts")


class Swtpm:
    """One swtpm process with its state in ``state_dir``."""

    def __init__(self, state_dir: Path | str, name: str = "swtpm"):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"
        self.port = free_port_pair()
        self.ctrl_port = self.port + 1
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
            "--tpmstate", f"dir={self.state_dir}",
            "--flags", "not-need-init,startup-clear",
        ]

    def start(self) -> "Swtpm":
        assert not self.is_running(), "swtpm already running"
        require_tools()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== hw-tests: start #{self.starts} of {self.name} =====\n".encode())
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"swtpm exited with {self.proc.returncode} at start (ports {self.port}/{self.ctrl_port})\n"
                    f"command: {' '.join(self.command())}\nlog tail:\n{self.log_tail()}"
                )
            # Nobody else talks to this swtpm yet: a connect-and-close on
            # both channels is harmless (swtpm goes back to accept()).
            try:
                with socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=0.5):
                    pass
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"swtpm not listening on 127.0.0.1:{self.port} within {START_TIMEOUT_S}s\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (SIGKILL if it lingers); waits until the ports are free again."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                _port_is_free(self.port, reuse=True) and _port_is_free(self.ctrl_port, reuse=True)):
            time.sleep(0.05)

    def restart(self) -> "Swtpm":
        """A power cycle: same state folder and ports, PCRs reset, persistent keys kept."""
        self.stop()
        return self.start()

    def wipe_state(self) -> "Swtpm":
        """A cleared / replaced TPM: the state folder deleted and recreated empty."""
        self.stop()
        shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)
        return self.start()

    def cleanup(self) -> None:
        """Fixture teardown: never leave a process behind."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    # -- tpm2-tools --------------------------------------------------------

    def tool_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                           env=self.tool_env(), stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, (
                f"`{' '.join(args)}` (TCTI {self.tcti}) exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def extend_pcr(self, pcr: int, digest_hex: str = "ab" * 32) -> None:
        """`tpm2_pcrextend PCR:sha256=<64 hex>` on the SHA-256 bank."""
        assert len(digest_hex) == 64, "a SHA-256 digest is 64 hex digits"
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={digest_hex}")

    def read_pcr(self, pcr: int) -> str:
        """The SHA-256 value of one PCR as lower-case hex (from `tpm2_pcrread`)."""
        r = self.tool("tpm2_pcrread", f"sha256:{pcr}")
        for line in r.stdout.splitlines():
            line = line.strip()
            if line.startswith(f"{pcr} :") or line.startswith(f"{pcr}:"):
                return line.split(":", 1)[1].strip().lower().removeprefix("0x")
        raise AssertionError(f"PCR {pcr} not in tpm2_pcrread output:\n{r.stdout}")

    # -- logs ---------------------------------------------------------------

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return "(no swtpm log)"
        return "\n".join(self.log_path.read_bytes().decode("utf-8", errors="replace").splitlines()[-n:])

    def hwtests_log_sections(self) -> list[tuple[str, str]]:
        return [(f"swtpm log ({self.name})", self.log_tail())]
