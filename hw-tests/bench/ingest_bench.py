#!/usr/bin/env python3
"""Manual ingest benchmark: gatewayd vs DCMTK storescp vs Orthanc (not run by run-all.sh).

    hw-tests/.venv/bin/python hw-tests/bench/ingest_bench.py [--repeats 3] [--gatewayd PATH]

A 200-file mixed set (150 CT-sized ~0.5 MB + 50 small, ~75 MB) is sent by
`storescu` with DCMTK's DEFAULT settings (no tuning, Nagle on, as a modality
sends) over ONE association to:

  (a) DCMTK `storescp -od DIR` with TCP_NODELAY=1 in its environment (its best),
  (b) gatewayd (release build, development config, software key store, data
      dir on the same disk as the others),
  (c) Orthanc's own C-STORE SCP (state in a temp dir),

each repeated (default 3 times, fresh state each time), median reported. Then 4
parallel storescu associations of 50 files each into gatewayd and storescp.
Also gatewayd's peak RSS (VmHWM) and the release binary's size. Prints a
Markdown table and writes it to hw-tests/bench/last-ingest.md.

Every server binds 127.0.0.1 (Orthanc binds all addresses whatever it is told:
the ports are free ones picked here), keeps its state in a temp dir and is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
import gw  # noqa: E402

REPO = HERE.parent.parent


def storescu_cmd(port: int, files: list[Path]) -> list[str]:
    return ["storescu", "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1", str(port), *map(str, files)]


def modality_env(nodelay: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)  # DCMTK default: Nagle on
    if nodelay:
        env["TCP_NODELAY"] = "1"  # a tuned sender: shows the receivers' own cost
    return env


def timed_storescu(port: int, batches: list[list[Path]], nodelay: bool = False) -> float:
    """Wall time of len(batches) concurrent storescu runs (one association each)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(storescu_cmd(port, b), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=modality_env(nodelay), stdin=subprocess.DEVNULL) for b in batches]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    dt = time.perf_counter() - t0
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited {p.returncode}:\n{out.decode(errors='replace')[-2000:]}")
    return dt


def wait_port(port: int, timeout: float = 20) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_pid(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- targets -------------------------------------------------------------------


class Storescp:
    name = "storescp"

    def __init__(self, root: Path, fork: bool = False):
        self.root = root
        self.fork = fork  # without --fork storescp serves one association at a time

    def start(self, run: int) -> int:
        self.out = self.root / f"storescp-{run}"
        self.out.mkdir(parents=True)
        self.port = gw.free_port()
        env = dict(os.environ, TCP_NODELAY="1")
        self.cmd = ["storescp", *(["--fork"] if self.fork else []), "-aet", "GATEWAY", "-od", str(self.out),
                    str(self.port)]
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        wait_port(self.port)
        return self.port

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        stop_pid(self.proc)


class Gatewayd:
    name = "gatewayd"

    def __init__(self, root: Path):
        self.root = root
        self.peak_rss_kib = 0
        # Durable-step time from /metrics, summed over runs: step -> [seconds, count].
        self.steps: dict[str, list[float]] = {}

    def start(self, run: int) -> int:
        self.g = gw.Gateway(self.root / f"gatewayd-{run}")
        self.g.start()
        self.cmd = [self.g.binary, "run", "--config", str(self.g.config_path)]
        return self.g.dicom_port

    def count(self) -> int:
        return int(self.g.status()["objects"])

    def scrape_steps(self) -> None:
        url = f"http://127.0.0.1:{self.g.admin_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            for kind, idx in (("_sum{", 0), ("_count{", 1)):
                prefix = "gateway_spool_commit_step_seconds" + kind
                if line.startswith(prefix):
                    step = line.split('step="', 1)[1].split('"', 1)[0]
                    self.steps.setdefault(step, [0.0, 0.0])[idx] += float(line.rsplit(" ", 1)[1])

    def stop(self) -> None:
        try:
            self.scrape_steps()
            for line in Path(f"/proc/{self.g.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        finally:
            rc = self.g.stop()
            self.g.cleanup()
        if rc != 0:
            raise RuntimeError(f"gatewayd exited {rc}\n{self.g.log_tail()}")


class Orthanc:
    name = "Orthanc"

    def __init__(self, root: Path):
        self.root = root

    def start(self, run: int) -> int:
        d = self.root / f"orthanc-{run}"
        d.mkdir(parents=True)
        self.port = gw.free_port()
        self.http = gw.free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(d / "storage"),
            "IndexDirectory": str(d / "index"),
            "DicomAet": "GATEWAY",
            "DicomPort": self.port,
            "HttpPort": self.http,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "Plugins": [],
        }
        (d / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self.cmd = ["Orthanc", str(d / "orthanc.json")]
        self.log = open(d / "orthanc.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=d)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/system", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {d / 'orthanc.log'}") from None
                time.sleep(0.2)
        wait_port(self.port)
        return self.port

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as r:
            return int(json.load(r)["CountInstances"])

    def stop(self) -> None:
        stop_pid(self.proc, timeout=60)
        self.log.close()


_RUNS = iter(range(1_000_000))


def bench(target, batches: list[list[Path]], repeats: int, expect: int, nodelay: bool = False) -> list[float]:
    times = []
    for _ in range(repeats):
        port = target.start(next(_RUNS))  # a fresh state dir per run
        try:
            times.append(timed_storescu(port, batches, nodelay))
            got = target.count()
            if got != expect:
                raise RuntimeError(f"{target.name}: {got} objects stored, expected {expect}")
        finally:
            target.stop()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--out", default=str(HERE / "last-ingest.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    os.environ["GATEWAYD"] = args.gatewayd
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run hw-tests/run-all.sh once (it installs dcmtk and orthanc)")
    gw.gatewayd_binary()

    # One temp root on the same disk for all three targets' state and the input set.
    load0 = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        files = data.make_mixed_set(150, 50, root / "input", seed=7)
        files = [f.path for f in files]
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        quarters = [files[i::4] for i in range(4)]
        results: dict[tuple[str, str], list[float]] = {}
        cmds: dict[tuple[str, str], str] = {}

        gwd = Gatewayd(root)
        targets = [Storescp(root), gwd, Orthanc(root)]
        for t in targets:
            print(f"[bench] {t.name}: 1 association x 200 files, {args.repeats} runs", flush=True)
            results[(t.name, "1 x 200")] = bench(t, [files], args.repeats, len(files))
            cmds[(t.name, "1 x 200")] = " ".join(t.cmd)
        one_assoc_steps = None
        for t in [Storescp(root, fork=True), gwd]:
            if t is gwd:
                one_assoc_steps = {k: list(v) for k, v in gwd.steps.items()}
            print(f"[bench] {t.name}: 4 parallel associations x 50 files, {args.repeats} runs", flush=True)
            results[(t.name, "4 x 50")] = bench(t, quarters, args.repeats, len(files))
            cmds[(t.name, "4 x 50")] = " ".join(t.cmd)
        tuned = "1 x 200, sender TCP_NODELAY=1"
        for t in [Storescp(root), gwd]:
            print(f"[bench] {t.name}: {tuned}, {args.repeats} runs", flush=True)
            results[(t.name, tuned)] = bench(t, [files], args.repeats, len(files), nodelay=True)
            cmds[(t.name, tuned)] = " ".join(t.cmd)

        size = os.path.getsize(args.gatewayd)
        dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        dcmtk = dcmtk.replace("$dcmtk:", "").replace("$", "").strip()
        lines = [
            f"# Ingest benchmark ({datetime.datetime.now().astimezone().isoformat(timespec='seconds')})",
            "",
            f"Host: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; {dcmtk}; "
            f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} (other work on the "
            "machine skews the numbers).",
            f"Input: {len(files)} CT Image Storage files (150 x 512x512x16-bit + 50 x 16x16), "
            f"{total_mb:.1f} MB, Explicit VR Little Endian.",
            f"Sender: `{' '.join(storescu_cmd(0, [])).replace(' 0', ' PORT')} FILES...` with DCMTK defaults "
            "(TCP_NODELAY unset: Nagle on, as a modality sends). Median of "
            f"{args.repeats} runs, fresh receiver state each run.",
            "",
            "| receiver | associations x files | median s | runs (s) | MB/s | vs storescp |",
            "|---|---|---:|---|---:|---:|",
        ]
        for (name, scen), times in results.items():
            med = statistics.median(times)
            base = results.get(("storescp", scen))
            ratio = f"{med / statistics.median(base):.2f}x" if base else "-"
            runs = ", ".join(f"{t:.2f}" for t in times)
            lines.append(f"| {name} | {scen} | {med:.2f} | {runs} | {total_mb / med:.1f} | {ratio} |")
        step_lines = []
        if one_assoc_steps:
            step_lines = [
                "",
                "Where gatewayd's time goes per object (1 x 200, default sender; from "
                "`gateway_spool_commit_step_seconds` on its own /metrics, mean over all runs):",
                "",
                "| durable step | mean ms per object | total s per 200-file run |",
                "|---|---:|---:|",
            ]
            for step in ("sync_blob", "publish", "index"):
                total, count = one_assoc_steps.get(step, [0.0, 0.0])
                if count:
                    step_lines.append(f"| {step} | {1000 * total / count:.2f} | {total / args.repeats:.2f} |")
        lines += step_lines
        lines += [
            "",
            f"gatewayd peak RSS (VmHWM, max over runs): {gwd.peak_rss_kib / 1024:.1f} MiB; "
            f"release binary: {size / 1e6:.2f} MB ({args.gatewayd}).",
            "",
            "Receivers:",
            *(f"- {name}, {scen}: `{cmd}`" for (name, scen), cmd in cmds.items()),
            "- storescp ran with `TCP_NODELAY=1` in its environment, and with `--fork` for the parallel runs "
            "(without it storescp serves one association at a time); gatewayd with the development config "
            "(software key store, every object sealed + fsync'd + indexed before its status).",
            "",
            f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        ]
        report = "\n".join(lines) + "\n"
        print(report)
        Path(args.out).write_text(report)
        print(f"[bench] written to {args.out}")
    finally:
        if args.keep:
            print(f"[bench] kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
