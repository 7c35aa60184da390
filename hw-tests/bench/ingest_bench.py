#!/usr/bin/env python3
"""Manual ingest benchmark: gatewayd vs DCMTK storescp, the fsync floor and Orthanc (not run by run-all.sh).

    hw-tests/.venv/bin/python hw-tests/bench/ingest_bench.py [--repeats 3] [--quick] [--gatewayd PATH]

Two data sets, each sent by three senders, over ONE association and over 4
parallel associations that split the files:

  data sets: "mixed", 200 files (150 CT-sized ~0.5 MB + 50 small, ~79 MB), and
             "small", 1,000 small (16x16) CT objects;
  senders:   `storescu` with DCMTK's DEFAULT settings (Nagle on, as a modality sends),
             `storescu` with TCP_NODELAY=1 in its environment, and
             pynetdicom: a small SCU here with pynetdicom's defaults (3.0.4 does NOT set
             TCP_NODELAY: Nagle on; it reads and re-encodes each file), one process per
             association;
  receivers: (a) DCMTK `storescp -od DIR` with TCP_NODELAY=1 in its environment (its
                 best), with `--fork` for the parallel associations,
             (b) gatewayd (release build, development config, software key store, data
                 dir on the same disk as the others),
             (c) Orthanc's own C-STORE SCP (state in a temp dir): mixed set, default
                 storescu, one association only.

Each configuration is repeated (default 3 times, fresh receiver state each time),
median reported. The floor of a data set / sender / associations configuration is
storescp's median time plus the median time to write each file of the set and
fdatasync it, one file at a time, in a temp dir on the same disk (measured here in
the same run). Every gatewayd row is given as a ratio against storescp and against
that floor. Per gatewayd configuration: where its time goes, from the
`gateway_spool_commit_step_seconds` histogram on its own /metrics, and its peak RSS
(VmHWM); also the release binary's size. Prints a Markdown table and writes it to
hw-tests/bench/last-ingest.md.

`--quick` (1 repeat, 40 mixed + 100 small files) checks the script works in about a minute.

Every server binds 127.0.0.1 (Orthanc binds all addresses whatever it is told:
the ports are free ones picked here), keeps its state in a temp dir and is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Protocol

import pydicom
import pynetdicom
from pydicom.uid import CTImageStorage
from pynetdicom import AE

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
import gw  # noqa: E402

REPO = HERE.parent.parent
PARALLEL = 4  # associations in the parallel configurations
# gatewayd's durable steps: an object up to 2 MiB sealed is one journal append + fdatasync
# before its status, indexed behind it (the "index" step is then per checkpointer batch);
# a larger one takes sync_blob, publish and index before its status (docs/adr/0015).
STEPS = ("journal", "sync_blob", "publish", "index")
RSS_TARGET_MB = 40  # the target for gatewayd's peak RSS under four associations


# -- data ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class DataSet:
    name: str
    description: str
    files: list[Path]
    mb: float

    def batches(self, n: int) -> list[list[Path]]:
        """The files split round-robin over ``n`` associations."""
        return [self.files[i::n] for i in range(n)]

    def label(self, n: int) -> str:
        return f"{n} x {len(self.files) // n}"


def make_data_sets(root: Path, quick: bool) -> list[DataSet]:
    n_ct, n_small_mixed, n_small = (30, 10, 100) if quick else (150, 50, 1000)
    mixed = [f.path for f in data.make_mixed_set(n_ct, n_small_mixed, root / "mixed", seed=7)]
    small = [f.path for f in data.make_ct_set(n_small, root / "small", "small")]
    return [
        DataSet("mixed", f"{n_ct} x 512x512x16-bit + {n_small_mixed} x 16x16", mixed, megabytes(mixed)),
        DataSet("small", f"{n_small} x 16x16", small, megabytes(small)),
    ]


def megabytes(files: list[Path]) -> float:
    return sum(p.stat().st_size for p in files) / 1e6


def write_fdatasync_seconds(files: list[Path], scratch: Path) -> float:
    """Time to write each file's bytes to a new file in ``scratch`` and fdatasync it, one
    file at a time (the files are read into memory first, outside the clock)."""
    blobs = [p.read_bytes() for p in files]
    scratch.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        with open(scratch / f"{i:06d}.dcm", "xb") as f:
            f.write(blob)
            f.flush()
            os.fdatasync(f.fileno())
    dt = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return dt


# -- senders ---------------------------------------------------------------------


def storescu_cmd(port: int, files: list[Path]) -> list[str]:
    return ["storescu", "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1", str(port), *map(str, files)]


def modality_env(nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)  # DCMTK default: Nagle on
    if nodelay:
        env["TCP_NODELAY"] = "1"  # a tuned sender: shows the receivers' own cost
    return env


class Sender(Protocol):
    @property
    def name(self) -> str:
        ...

    def send(self, port: int, batches: list[list[Path]]) -> float:
        """Wall time to send every batch over its own association, all batches in parallel."""
        ...


@dataclass(frozen=True)
class Storescu:
    nodelay: bool

    @property
    def name(self) -> str:
        return "storescu TCP_NODELAY=1" if self.nodelay else "storescu (default)"

    def send(self, port: int, batches: list[list[Path]]) -> float:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(storescu_cmd(port, b), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=modality_env(self.nodelay), stdin=subprocess.DEVNULL) for b in batches]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        dt = time.perf_counter() - t0
        for p, out in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"storescu exited {p.returncode}:\n{out.decode(errors='replace')[-2000:]}")
        return dt


def pynetdicom_association(port: int, files: list[str], start: Barrier) -> None:
    """One pynetdicom association with its defaults (runs in its own process)."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage)  # pynetdicom's default transfer syntaxes
    start.wait(timeout=60)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    if not assoc.is_established:
        raise RuntimeError(f"pynetdicom: no association with 127.0.0.1:{port}")
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            status = rsp.get("Status") if rsp else None
            if status != 0x0000:
                raise RuntimeError(f"pynetdicom: C-STORE of {f} answered {status!r}")
    finally:
        assoc.release()


class Pynetdicom:
    """One spawned process per association; the clock starts once all of them have
    imported pynetdicom and wait to associate (as storescu's start-up is ~ms)."""

    name = "pynetdicom"

    def send(self, port: int, batches: list[list[Path]]) -> float:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(len(batches) + 1)
        procs = [ctx.Process(target=pynetdicom_association, args=(port, list(map(str, b)), start))
                 for b in batches]
        for p in procs:
            p.start()
        try:
            start.wait(timeout=60)
            t0 = time.perf_counter()
            for p in procs:
                p.join(timeout=900)
            dt = time.perf_counter() - t0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"pynetdicom sender(s) exited {failed} (traceback above)")
        return dt


# -- receivers -------------------------------------------------------------------


def wait_port(port: int, timeout: float = 20) -> None:
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


class Receiver(Protocol):
    name: str
    cmd: list[str]

    def start(self, run: int) -> int:
        """Start with a fresh state dir; the DICOM port."""
        ...

    def count(self) -> int:
        ...

    def stop(self) -> None:
        ...


class Storescp:
    name = "storescp"

    def __init__(self, root: Path, fork: bool):
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
            self.peak_rss_kib = max(self.peak_rss_kib, gw.proc_status(self.g.pid)["VmHWM"])
        finally:
            rc = self.g.stop()
            self.g.cleanup()
        if rc != 0:
            raise RuntimeError(f"gatewayd exited {rc}\n{self.g.log_tail()}")

    def step_ms(self, step: str) -> float | None:
        """Mean ms per object of one durable step over all runs, None if never seen."""
        total, count = self.steps.get(step, [0.0, 0.0])
        return 1000 * total / count if count else None


class Orthanc:
    name = "Orthanc"

    def __init__(self, root: Path):
        self.root = root

    def start(self, run: int) -> int:
        self.dir = self.root / f"orthanc-{run}"
        self.dir.mkdir(parents=True)
        self.port = gw.free_port()
        self.http = gw.free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
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
        (self.dir / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self.cmd = ["Orthanc", str(self.dir / "orthanc.json")]
        self.log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/system", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {self.dir / 'orthanc.log'}") from None
                time.sleep(0.2)
        wait_port(self.port)
        return self.port

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as r:
            return int(json.load(r)["CountInstances"])

    def stop(self) -> None:
        stop_pid(self.proc, timeout=60)
        self.log.close()


# -- running ---------------------------------------------------------------------


_RUNS = iter(range(1_000_000))


def bench(target: Receiver, sender: Sender, batches: list[list[Path]], repeats: int) -> list[float]:
    """Wall times of ``repeats`` runs, each into a freshly started ``target``."""
    expect = sum(map(len, batches))
    times = []
    retried = 0
    while len(times) < repeats:
        port = target.start(next(_RUNS))  # a fresh state dir per run
        try:
            took = sender.send(port, batches)
            got = target.count()
            if got != expect:
                raise RuntimeError(f"{target.name}: {got} objects stored, expected {expect}")
            times.append(took)
        except RuntimeError as e:
            # A failed send (storescp --fork once answered a pynetdicom C-STORE with no
            # status here) is run again, once per configuration, and said so.
            if retried or target.name == "gatewayd":
                raise
            retried += 1
            print(f"[bench]   {target.name}: run failed ({e}); running it again", flush=True)
        finally:
            target.stop()
    return times


@dataclass(frozen=True)
class Config:
    dataset: DataSet
    sender: str
    assocs: int


@dataclass
class Results:
    times: dict[tuple[Config, str], list[float]] = field(default_factory=dict)  # (config, receiver) -> s
    fsync: dict[str, list[float]] = field(default_factory=dict)  # data set -> write+fdatasync s
    gatewayd: dict[Config, Gatewayd] = field(default_factory=dict)  # its steps and peak RSS
    cmds: dict[str, str] = field(default_factory=dict)  # receiver kind -> one command line

    def median(self, cfg: Config, receiver: str) -> float:
        return statistics.median(self.times[(cfg, receiver)])

    def floor(self, cfg: Config) -> float:
        return self.median(cfg, "storescp") + statistics.median(self.fsync[cfg.dataset.name])


def run_all(datasets: list[DataSet], root: Path, repeats: int) -> Results:
    senders: list[Sender] = [Storescu(nodelay=False), Storescu(nodelay=True), Pynetdicom()]
    res = Results()
    for ds in datasets:
        print(f"[bench] {ds.name}: write+fdatasync of {len(ds.files)} files, {repeats} runs", flush=True)
        res.fsync[ds.name] = [write_fdatasync_seconds(ds.files, root / f"fsync-{next(_RUNS)}")
                              for _ in range(repeats)]
        for sender in senders:
            for n in (1, PARALLEL):
                cfg = Config(ds, sender.name, n)
                gwd = Gatewayd(root)
                targets: list[Receiver] = [Storescp(root, fork=n > 1), gwd]
                if ds.name == "mixed" and sender is senders[0] and n == 1:
                    targets.append(Orthanc(root))
                for t in targets:
                    print(f"[bench] {ds.name}, {sender.name}, {ds.label(n)} -> {t.name}: {repeats} runs",
                          flush=True)
                    res.times[(cfg, t.name)] = times = bench(t, sender, ds.batches(n), repeats)
                    print(f"[bench]   median {statistics.median(times):.2f} s", flush=True)
                    res.cmds[f"{t.name}, {n} association{'s' if n > 1 else ''}"] = " ".join(t.cmd)
                res.gatewayd[cfg] = gwd
    return res


# -- report ----------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def results_table(res: Results) -> list[str]:
    lines = [
        "| data set | sender | associations x files | receiver | median s | runs (s) | MB/s | objects/s "
        "| vs storescp | vs floor |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    configs = list(dict.fromkeys(cfg for cfg, _ in res.times))
    for cfg in configs:
        scp, floor = res.median(cfg, "storescp"), res.floor(cfg)
        head = f"| {cfg.dataset.name} | {cfg.sender} | {cfg.dataset.label(cfg.assocs)}"
        mb, objects = cfg.dataset.mb, len(cfg.dataset.files)
        for (c, receiver), times in res.times.items():
            if c != cfg:
                continue
            med = statistics.median(times)
            name = f"**{receiver}**" if receiver == "gatewayd" else receiver
            runs = ", ".join(f"{t:.2f}" for t in times)
            lines.append(f"{head} | {name} | {med:.2f} | {runs} | {mb / med:.1f} | {objects / med:.0f} | "
                         f"{ratio(med, scp)} | {ratio(med, floor)} |")
        lines.append(f"{head} | floor: storescp + write+fdatasync | {floor:.2f} | - | {mb / floor:.1f} | "
                     f"{objects / floor:.0f} | {ratio(floor, scp)} | 1.00x |")
    return lines


def gatewayd_table(res: Results) -> list[str]:
    lines = [
        "| data set | sender | associations x files | "
        + " | ".join(f"{s} ms/object" for s in STEPS) + " | peak RSS MiB |",
        "|---|---|---|" + "---:|" * (len(STEPS) + 1),
    ]
    for cfg, gwd in res.gatewayd.items():
        steps = [gwd.step_ms(s) for s in STEPS]
        cells = " | ".join("-" if ms is None else f"{ms:.2f}" for ms in steps)
        lines.append(f"| {cfg.dataset.name} | {cfg.sender} | {cfg.dataset.label(cfg.assocs)} | {cells} | "
                     f"{gwd.peak_rss_kib / 1024:.1f} |")
    return lines


def dcmtk_version(tool: str) -> str:
    """First line of ``tool --version`` (DCMTK's starts with "$dcmtk")."""
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else ""


def render(res: Results, datasets: list[DataSet], args: argparse.Namespace, load0: float, wall_s: float) -> str:
    dcmtk = dcmtk_version("storescu").replace("$dcmtk:", "").replace("$", "").strip()
    parallel_rss = max(g.peak_rss_kib for c, g in res.gatewayd.items() if c.assocs == PARALLEL) * 1024
    fsync_lines = [
        f"- {ds.name}: {statistics.median(res.fsync[ds.name]):.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in res.fsync[ds.name])}; "
        f"{1000 * statistics.median(res.fsync[ds.name]) / len(ds.files):.2f} ms per file)"
        for ds in datasets
    ]
    lines = [
        f"# Ingest benchmark ({datetime.datetime.now().astimezone().isoformat(timespec='seconds')})",
        "",
        f"Host: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; {dcmtk}; "
        f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}; load average at start "
        f"{load0:.2f}, at end {os.getloadavg()[0]:.2f} (other work on the machine skews the numbers). "
        f"Benchmark wall time {wall_s / 60:.1f} min.",
        "",
        "Input (CT Image Storage, Explicit VR Little Endian):",
        *(f"- {ds.name}: {len(ds.files)} files ({ds.description}), {ds.mb:.1f} MB" for ds in datasets),
        "",
        "Senders (one process per association; the parallel rows split the files round-robin):",
        f"- storescu (default): `{' '.join(storescu_cmd(0, [])).replace(' 0', ' PORT')} FILES...` with DCMTK "
        "defaults (TCP_NODELAY unset: Nagle on, as a modality sends).",
        "- storescu TCP_NODELAY=1: the same with `TCP_NODELAY=1` in its environment.",
        "- pynetdicom: `AE(ae_title='CT01')`, `add_requested_context(CTImageStorage)`, `send_c_store(path)` per "
        "file, pynetdicom's defaults (it does not set TCP_NODELAY: Nagle on; each file read and re-encoded by "
        "pydicom); the clock starts when the spawned processes are ready to associate.",
        "",
        f"Median of {args.repeats} runs, fresh receiver state each run. The floor is storescp's median with the "
        "same sender and associations plus the median time to write each file of the set and fdatasync it, "
        "one file at a time, in a temp dir on the same disk:",
        *fsync_lines,
        "",
        *results_table(res),
        "",
        "gatewayd per configuration: where its time goes (`gateway_spool_commit_step_seconds` on its own "
        "/metrics, mean per observation over all runs: per object for journal, sync_blob and publish, per "
        "checkpointer batch for index when objects went through the journal) and its peak RSS (VmHWM, "
        "max over runs):",
        "",
        *gatewayd_table(res),
        "",
        f"Peak RSS under {PARALLEL} associations: {parallel_rss / 1e6:.1f} MB (target: at most {RSS_TARGET_MB} MB, "
        f"{'met' if parallel_rss <= RSS_TARGET_MB * 1e6 else 'NOT met'}). Release binary: "
        f"{os.path.getsize(args.gatewayd) / 1e6:.2f} MB ({args.gatewayd}).",
        "",
        "Receivers (one command line of each kind):",
        *(f"- {kind}: `{cmd}`" for kind, cmd in res.cmds.items()),
        "- storescp ran with `TCP_NODELAY=1` in its environment, and with `--fork` for the parallel runs "
        "(without it storescp serves one association at a time); gatewayd with the development config "
        "(software key store, every object sealed + fsync'd + indexed before its status); Orthanc only for "
        "the mixed set, default storescu, one association.",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 40 mixed + 100 small files")
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--out", default=str(HERE / "last-ingest.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1

    os.environ["GATEWAYD"] = args.gatewayd
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run hw-tests/run-all.sh once (it installs dcmtk and orthanc)")
    for tool in ("storescu", "storescp"):  # an activated venv puts pynetdicom's apps of the same name first
        if not dcmtk_version(tool).startswith("$dcmtk"):
            sys.exit(f"{shutil.which(tool)} is not DCMTK's {tool}: put DCMTK's first on PATH")
    gw.gatewayd_binary()

    # One temp root on the same disk for the receivers' state, the fsync floor and the input sets.
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        datasets = make_data_sets(root / "input", args.quick)
        res = run_all(datasets, root, args.repeats)
        report = render(res, datasets, args, load0, time.monotonic() - t0)
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
