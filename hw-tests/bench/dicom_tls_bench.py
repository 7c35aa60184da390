#!/usr/bin/env python3
"""Manual DICOM-over-TLS ingest benchmark (not run by run-all.sh).

    GATEWAYD=target/release/gatewayd hw-tests/.venv/bin/python hw-tests/bench/dicom_tls_bench.py [--repeats 3]

The 200-file mixed set of ingest_bench.py (150 CT-sized ~0.5 MB + 50 small, ~79 MB) is sent
by `storescu` with DCMTK's defaults (Nagle on, as a modality sends; `+tls` with its default
non-downgrading BCP 195 profile and a client certificate) over ONE association to:

  gatewayd plain  `[dicom] listen`
  gatewayd TLS    `[dicom] tls_listen` of the same kind of gateway (certificate files, client
                  CA: every client must present a certificate)
  storescp plain  `storescp -od DIR`, TCP_NODELAY=1 (its best), the reference
  storescp TLS    the same with `+tls KEY CERT +cf CA` (requires the client certificate)

interleaved in each run (fresh receiver state each time), median of --repeats. The ratio
that issue 20 targets is gatewayd TLS / gatewayd plain (at most 1.3x). Certificates: an
ECDSA P-256 test CA made with the openssl CLI (`pki.CA`). Prints a Markdown table and
writes it to hw-tests/bench/last-dicom-tls.md.

Every server binds 127.0.0.1 on a free port picked here, keeps its state in a temp dir and
is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import gw  # noqa: E402
import pki  # noqa: E402
from ingest_bench import modality_env, stop_pid, wait_port  # noqa: E402


def storescu(port: int, files: list[Path], tls: list[str]) -> float:
    cmd = ["storescu", *tls, "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, env=modality_env(), stdin=subprocess.DEVNULL, timeout=900)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:12])} ... exited {r.returncode}:\n{r.stderr.decode(errors='replace')[-2000:]}")
    return dt


class Gatewayd:
    def __init__(self, root: Path, ca: pki.CA, server: pki.KeyPair, tls: bool):
        self.root, self.ca, self.server, self.tls = root, ca, server, tls
        self.name = "gatewayd TLS" if tls else "gatewayd plain"

    def start(self, run: int) -> int:
        over = {}
        tls_port = gw.free_port()
        if self.tls:
            over = {"dicom": {"tls_listen": f"127.0.0.1:{tls_port}", "tls_cert_file": str(self.server.cert),
                              "tls_key_file": str(self.server.key), "tls_client_ca_file": str(self.ca.cert)}}
        self.g = gw.Gateway(self.root / f"{self.name.replace(' ', '-')}-{run}", over)
        self.g.start()
        self.cmd = [self.g.binary, "run", "--config", str(self.g.config_path)]
        return tls_port if self.tls else self.g.dicom_port

    def count(self) -> int:
        return int(self.g.status()["objects"])

    def stop(self) -> None:
        rc = self.g.stop()
        self.g.cleanup()
        if rc != 0:
            raise RuntimeError(f"gatewayd exited {rc}")


class Storescp:
    def __init__(self, root: Path, ca: pki.CA, server: pki.KeyPair, tls: bool):
        self.root, self.ca, self.server, self.tls = root, ca, server, tls
        self.name = "storescp TLS" if tls else "storescp plain"

    def start(self, run: int) -> int:
        self.out = self.root / f"{self.name.replace(' ', '-')}-{run}"
        self.out.mkdir(parents=True)
        port = gw.free_port()
        tls = ["+tls", str(self.server.key), str(self.server.cert), "+cf", str(self.ca.cert)] if self.tls else []
        self.cmd = ["storescp", *tls, "-aet", "GATEWAY", "-od", str(self.out), str(port)]
        self.proc = subprocess.Popen(self.cmd, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_port(port)
        return port

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        stop_pid(self.proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gw.gatewayd_binary()
    with tempfile.TemporaryDirectory(prefix="dicom-tls-bench-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        ca = pki.CA(root / "pki", name="bench CA")
        server = ca.server_cert("127.0.0.1", name="receiver")
        client = ca.other_client_cert("ct01.bench", name="ct01")
        client_tls = ["+tls", str(client.key), str(client.cert), "-pw", "+cf", str(ca.cert)]
        files = [f.path for f in data.make_mixed_set(150, 50, root / "in", seed=2020)]
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        targets = [Gatewayd(root, ca, server, False), Gatewayd(root, ca, server, True),
                   Storescp(root, ca, server, False), Storescp(root, ca, server, True)]
        times: dict[str, list[float]] = {t.name: [] for t in targets}
        cmds: dict[str, str] = {}
        load0 = os.getloadavg()[0]
        for run in range(args.repeats):
            for t in targets:
                port = t.start(run)
                try:
                    dt = storescu(port, files, client_tls if t.tls else [])
                    n = t.count()
                    if n != len(files):
                        raise RuntimeError(f"{t.name}: {n} objects stored, {len(files)} sent")
                finally:
                    cmds[t.name] = " ".join(t.cmd)
                    t.stop()
                times[t.name].append(dt)
                print(f"run {run + 1}: {t.name}: {dt:.2f} s", flush=True)
        load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    ver = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        f"# DICOM over TLS ingest benchmark ({datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})",
        "",
        f"Host: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; {ver.strip('$ ')}; "
        f"load average at start {load0:.2f}, at end {load1:.2f}. gatewayd: {gw.gatewayd_binary()}.",
        f"Input: 200 files (150 CT ~0.5 MB + 50 small), {total_mb:.1f} MB, one association, storescu defaults "
        "(Nagle on); `+tls` = DCMTK's default BCP 195 profile with a client certificate. Median of "
        f"{args.repeats} runs, receivers interleaved, fresh state each run.",
        "",
        "| receiver | median s | runs (s) | MB/s | vs same receiver plain |",
        "|---|---:|---|---:|---:|",
    ]
    for name in times:
        base = med[name.replace("TLS", "plain")]
        lines.append(f"| {name} | {med[name]:.2f} | {', '.join(f'{x:.2f}' for x in times[name])} | "
                     f"{total_mb / med[name]:.1f} | {med[name] / base:.2f}x |")
    lines += [
        "",
        f"gatewayd TLS / gatewayd plain: **{med['gatewayd TLS'] / med['gatewayd plain']:.2f}x** (issue 20 target: at most 1.3x); "
        f"gatewayd TLS / storescp TLS: {med['gatewayd TLS'] / med['storescp TLS']:.2f}x; "
        f"storescp TLS / storescp plain: {med['storescp TLS'] / med['storescp plain']:.2f}x.",
        "",
        "Receivers (last run):",
        *[f"- {k}: `{v}`" for k, v in cmds.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (HERE / "last-dicom-tls.md").write_text(text)


if __name__ == "__main__":
    main()
