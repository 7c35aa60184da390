#!/usr/bin/env python3
"""Manual results-return benchmark (issue 16): a 500-instance study from the cloud archive
to the clinic PACS, gatewayd's pull + sealed store + C-STORE vs the two-step manual route
(`curl` WADO-RS, then DCMTK `storescu`). Not run by run-all.sh.

    GATEWAYD=/path/to/release/gatewayd hw-tests/.venv/bin/python hw-tests/bench/results_bench.py \
        [--repeats 3] [--instances 500]

Each run builds a FRESH region with `results_env.ResultsEnv` (the harness of
test_results.py): Orthanc + DICOMweb behind nginx mutual TLS as the cloud, mosquitto as the
regional broker, a core and a clinic gatewayd, DCMTK `storescp +uf` as the clinic PACS. All
on 127.0.0.1, ports picked here, every server stopped by its PID at the end of the run.

1. A clerk books a CT at the clinic's kiosk; the clinic gatewayd is STOPPED.
2. The study (500 CT Image Storage instances, Explicit VR LE, fixed seed: 350 x 512x512,
   100 x 256x256, 50 x 1024x1024, 16-bit, shuffled) goes the product's way: `storescu` ->
   core -> STOW-RS to the cloud. Once Orthanc holds all 500 and the core has matched them
   (`core-results` handled), the script waits `complete_after` + a margin so the core's
   final ("complete") notice is published; the clinic's persistent MQTT session holds it.
3. Manual route, timed, against the same cloud with the clinic's own client certificate,
   into a fresh `storescp +uf` (same flags as the clinic PACS):
   - (a) `curl` QIDO-RS of the study's instances, then ONE `curl` process fetching each
     instance by WADO-RS (`--next`, one kept-alive connection), each response split out
     of its multipart/related envelope to a .dcm file;
   - (b) `curl` QIDO-RS, then the whole study in ONE WADO-RS request, split into files;
   then `storescu` (default settings, one association, all files). Wall time from the first
   curl to storescu's exit; splitting (in this process) is inside the clock.
4. gatewayd route, timed: the clinic gatewayd starts; the clock runs from the timestamp of
   its first "results notice recorded" log line until the PACS folder holds all N files
   (polled every 20 ms; storescp writes each file before it answers). Also from the
   clinic's start (`gatewayd run`) to the same end. Afterwards: exactly N files at the PACS,
   each SOP Instance UID of the study once; the clinic's `spool status` says N sent to
   the `pacs` destination; the clinic's peak RSS (VmHWM) is read from /proc.

Median of --repeats; prints a Markdown table with ratios gatewayd / manual and writes it
to hw-tests/bench/last-results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pydicom.uid import generate_uid  # noqa: E402

import data  # noqa: E402
import gw  # noqa: E402
import mtls  # noqa: E402
import pki  # noqa: E402
import results_env  # noqa: E402
import scu  # noqa: E402
from results_env import PACS_DEST, Pacs, ResultsEnv, Study  # noqa: E402

REPO = HERE.parent.parent
CLINIC = "clinic-a"
COMPLETE_AFTER_S = 5
# (kind, side, share of the study): 350/100/50 of 500.
SIZES = (("ct512", 512, 0.70), ("ct256", 256, 0.20), ("ct1024", 1024, 0.10))
TIMEOUT_S = 600
ORIG_DCMTK_ENV = scu.dcmtk_env
NOTICE_LINE = "results notice recorded"
PULLED_LINE = "announced results pulled into the spool"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# the study


def make_study(env: ResultsEnv, booking: results_env.Booking, n: int, seed: int, dir: Path) -> Study:
    """``n`` CT instances of one study with the booked accession and the core's Patient ID
    (as `ResultsEnv.make_study`), in three sizes; pixel data from ``seed`` (the same bytes
    every run), UIDs new each run."""
    dir.mkdir(parents=True)
    rng = random.Random(seed)
    counts = [round(n * share) for _, _, share in SIZES]
    counts[0] += n - sum(counts)
    kinds = [(name, side) for (name, side, _), c in zip(SIZES, counts) for _ in range(c)]
    rng.shuffle(kinds)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i, (kind, side) in enumerate(kinds):
        f = data.make_ct_file(dir / f"{i:05d}.dcm", i, "small", study_uid, series_uid)

        def resize(ds, side=side):
            ds.Rows = side
            ds.Columns = side
            ds.PixelData = rng.randbytes(side * side * 2)
        files.append(results_env.as_core_made(f, booking, kind, resize))
    return Study(booking, study_uid, files)


# --------------------------------------------------------------------------
# the manual route


def split_multipart(body: bytes | mmap.mmap, out_dir: Path, start: int) -> int:
    """Writes each part of a multipart/related body (boundary from its first line) to
    ``out_dir/{start + k}.dcm``; returns the number of parts."""
    first = body.find(b"\r\n")
    if first <= 2 or body[:2] != b"--":
        raise RuntimeError(f"not a multipart body: {bytes(body[:80])!r}")
    delim = b"\r\n" + bytes(body[:first])
    pos = first + 2
    k = 0
    while True:
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise RuntimeError("multipart part without a header end")
        end = body.find(delim, head_end + 4)
        if end < 0:
            raise RuntimeError("multipart part without a closing boundary")
        (out_dir / f"{start + k:05d}.dcm").write_bytes(body[head_end + 4:end])
        k += 1
        pos = end + len(delim)
        if body[pos:pos + 2] == b"--":
            return k
        pos += 2  # CRLF after the boundary


def curl_tls(env: ResultsEnv) -> list[str]:
    """curl config lines: the clinic's own client certificate for the cloud (its uplink)."""
    up = env.gateway(CLINIC).config["uplink"][0]
    return ["silent", "show-error", "fail", f'cacert = "{up["ca_file"]}"', f'cert = "{up["cert_file"]}"',
            f'key = "{up["key_file"]}"']


MULTIPART_ACCEPT = 'header = "Accept: multipart/related; type=\\"application/dicom\\"; transfer-syntax=*"'


def manual(env: ResultsEnv, study: Study, mode: str, work: Path, commands: dict[str, str]) -> tuple[float, float]:
    """The manual route ``mode`` ("a": per instance, "b": one request) into a fresh
    storescp; returns (wall time, of which curl + split) in s after checking the PACS folder."""
    work.mkdir(parents=True)
    parts = work / "parts"
    parts.mkdir()
    files = work / "files"
    files.mkdir()
    pacs = Pacs(work / "pacs").start()
    try:
        base = env.cloud.dicomweb_url
        qido_cfg = work / "qido.cfg"
        qido_cfg.write_text("\n".join(curl_tls(env) + ['header = "Accept: application/dicom+json"',
                                                       f'url = "{base}/studies/{study.study_uid}/instances"']) + "\n")
        n = len(study.files)
        t0 = time.perf_counter()
        r = subprocess.run(["curl", "-K", str(qido_cfg)], capture_output=True, timeout=TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"curl QIDO-RS exited {r.returncode}: {r.stderr[-1000:]!r}\n{env.cloud.log_tail(20)}")
        listed = json.loads(r.stdout)
        if len(listed) != n:
            raise RuntimeError(f"QIDO-RS listed {len(listed)} instances, expected {n}")
        if mode == "a":
            blocks = []
            for k, inst in enumerate(listed):
                series = inst["0020000E"]["Value"][0]
                sop = inst["00080018"]["Value"][0]
                blocks.append("\n".join(curl_tls(env) + [
                    MULTIPART_ACCEPT, f'output = "{parts / f"{k:05d}.mpart"}"',
                    f'url = "{base}/studies/{study.study_uid}/series/{series}/instances/{sop}"']))
            cfg = work / "wado-a.cfg"
            cfg.write_text("\nnext\n".join(blocks) + "\n")
        else:
            cfg = work / "wado-b.cfg"
            cfg.write_text("\n".join(curl_tls(env) + [
                MULTIPART_ACCEPT, f'output = "{parts / "study.mpart"}"',
                f'url = "{base}/studies/{study.study_uid}"']) + "\n")
        r = subprocess.run(["curl", "-K", str(cfg)], capture_output=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"curl WADO-RS ({mode}) exited {r.returncode}: {r.stderr[-1000:]!r}\n"
                               f"{env.cloud.log_tail(20)}")
        got = 0
        for p in sorted(parts.iterdir()):
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                got += split_multipart(m, files, got)
        if got != n:
            raise RuntimeError(f"WADO-RS ({mode}) gave {got} instances, expected {n}")
        paths = sorted(files.iterdir())
        t_fetched = time.perf_counter()
        cmd = scu.storescu_cmd(pacs.port, paths, calling="GATEWAY", called=pacs.aet)
        # storescu with DCMTK's defaults, whatever the PACS was started with.
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=ORIG_DCMTK_ENV(),
                           stdin=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        if r.returncode != 0 or re.search(r"Store Failed|Status: [1-9A-F]", r.stdout + r.stderr):
            raise RuntimeError(f"storescu exited {r.returncode}: {(r.stdout + r.stderr)[-2000:]}")
        commands.setdefault(f"manual ({mode})", (
            f"`curl -K qido.cfg` (QIDO-RS `GET {{base}}/studies/{{study}}/instances`, Accept application/dicom+json), "
            f"then `curl -K {cfg.name}` ({'one block per instance, separated by `next`: `GET .../studies/{study}/series/{series}/instances/{sop}`' if mode == 'a' else 'one request: `GET .../studies/{study}`'}, "
            f"Accept `multipart/related; type=\"application/dicom\"; transfer-syntax=*`, the client certificate "
            f"of the clinic's cloud uplink), split in Python, then `storescu -aet GATEWAY -aec PACS 127.0.0.1 PORT "
            f"<{n} files>` (DCMTK defaults) to `storescp -aet PACS +uf +xa -od DIR PORT`"))
        received = pacs.received()
        if len(pacs.files()) != n or set(received) != study.uids:
            raise RuntimeError(f"manual ({mode}): storescp holds {len(pacs.files())} files, "
                               f"{len(set(received) & study.uids)} of the study's {n} instances")
        return dt, t_fetched - t0
    finally:
        pacs.stop()
        pacs.cleanup()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# the gatewayd route


def log_time(line: str) -> float:
    """Unix time of a gatewayd log line (tracing's RFC 3339 UTC timestamp first)."""
    stamp = line.split(maxsplit=1)[0]
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def count_files(d: Path) -> int:
    with os.scandir(d) as it:
        return sum(1 for e in it if e.is_file())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def commit_steps(g: gw.Gateway) -> dict[str, tuple[float, float]]:
    """``gateway_spool_commit_step_seconds`` of a gatewayd: step -> (sum s, count)."""
    out: dict[str, list[float]] = {}
    for name, labels, v in g.metrics():
        for suffix, idx in (("_sum", 0), ("_count", 1)):
            if name == "gateway_spool_commit_step_seconds" + suffix:
                out.setdefault(labels.get("step", "?"), [0.0, 0.0])[idx] += v
    return {k: (v[0], v[1]) for k, v in out.items()}


def gatewayd_route(env: ResultsEnv, study: Study) -> dict:
    g = env.gateway(CLINIC)
    pacs = env.clinics[CLINIC].pacs
    n = len(study.files)
    if count_files(pacs.out):
        raise RuntimeError("the clinic PACS is not empty before the clinic starts")
    log_before = g.log_path.stat().st_size
    t_start = time.time()
    g.start(wait=False)
    deadline = time.monotonic() + TIMEOUT_S
    hwm = 0
    last_hwm = 0.0
    while count_files(pacs.out) < n:
        if not g.is_running():
            raise RuntimeError(f"the clinic gatewayd exited:\n{g.log_tail(30)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the clinic PACS holds {count_files(pacs.out)} of {n} after {TIMEOUT_S}s\n"
                               f"{g.log_tail(30)}")
        if time.monotonic() - last_hwm > 1:
            hwm = max(hwm, gw.proc_status(g.pid)["VmHWM"])
            last_hwm = time.monotonic()
        time.sleep(0.02)
    t_end = time.time()
    hwm = max(hwm, gw.proc_status(g.pid)["VmHWM"])
    cpu = cpu_seconds(g.pid)
    with open(g.log_path, "rb") as f:
        f.seek(log_before)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    notices = [line for line in lines if NOTICE_LINE in line]
    if not notices:
        raise RuntimeError(f"no {NOTICE_LINE!r} line in the clinic's log")
    t_notice = log_time(notices[0])
    pulled = [log_time(line) for line in lines if PULLED_LINE in line]
    # Settle: a duplicate or a late file would show.
    time.sleep(2)
    received = pacs.received()
    files = len(pacs.files())
    twice = sum(c - 1 for c in received.values())
    if files != n or set(received) != study.uids or twice:
        raise RuntimeError(f"gatewayd route: the PACS holds {files} files, {len(set(received) & study.uids)} of "
                           f"{n} instances, {twice} duplicates")
    st = g.status()
    dest = st.get("by_destination", {}).get(PACS_DEST, {})
    if dest.get("sent") != n:
        raise RuntimeError(f"the clinic's spool does not say {n} sent to {PACS_DEST!r}: {st}")
    steps = commit_steps(g)
    return {"from_notice": t_end - t_notice, "pulled": (pulled[0] - t_notice) if pulled else float("nan"),
            "pulls": len(pulled), "cpu": cpu, "steps": steps, "from_start": t_end - t_start, "start_to_notice": t_notice - t_start,
            "hwm_mib": hwm / 1024, "notices": len(notices), "first_notice": notices[0].split(NOTICE_LINE, 1)[1].strip(),
            "status": dest}


# --------------------------------------------------------------------------
# one run


def gateway_factory(root: Path):
    made: list[gw.Gateway] = []

    def make(overrides: dict | None = None, start: bool = True, name: str | None = None) -> gw.Gateway:
        name = name or f"gw{len(made)}"
        g = gw.Gateway(root / name, overrides, name=name)
        made.append(g)
        if start:
            g.start()
        return g

    return make, made


def wait_core_matched(env: ResultsEnv, n: int) -> dict:
    """The core handled all ``n`` objects for its results route (matched and counted)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        st = env.core.status()
        route = st.get("by_destination", {}).get("core-results", {})
        if route.get("sent", 0) >= n:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"the core did not match the study within {TIMEOUT_S}s: {st}")
        time.sleep(0.5)


def one_run(i: int, root: Path, ca: pki.CA, n: int, seed: int, order: list[str]) -> dict:
    run_dir = root / f"run-{i}"
    make, made = gateway_factory(run_dir / "gw")
    env = ResultsEnv(run_dir, make, ca, clinics=(CLINIC,), complete_after=f"{COMPLETE_AFTER_S}s")
    out: dict = {"commands": {}}
    try:
        env.start()
        b = env.book(CLINIC)
        clinic = env.gateway(CLINIC)
        if clinic.stop() != 0:
            raise RuntimeError(f"the clinic did not stop cleanly:\n{clinic.log_tail(20)}")
        study = make_study(env, b, n, seed, run_dir / "study")
        out["study_bytes"] = sum(f.path.stat().st_size for f in study.files)
        t0 = time.perf_counter()
        env.send_study(study)
        out["core_ingest"] = time.perf_counter() - t0
        env.wait_cloud(study, timeout=TIMEOUT_S)
        out["to_cloud"] = time.perf_counter() - t0
        wait_core_matched(env, n)
        time.sleep(COMPLETE_AFTER_S + 6)  # the quiet period, the core's next pass, the publish
        for name in order:
            if name == "gatewayd":
                out["gatewayd"] = gatewayd_route(env, study)
            else:
                mode = name[-2]
                out[name], out[name + " fetch"] = manual(env, study, mode, run_dir / f"manual-{mode}",
                                                         out["commands"])
            print(f"run {i + 1}: {name}: "
                  f"{out[name]['from_notice'] if name == 'gatewayd' else out[name]:.2f}s", flush=True)
        out["clinic_config"] = gw.to_toml({"uplink": [env.gateway(CLINIC).config["uplink"][0]],
                                           "results": env.gateway(CLINIC).config["results"]})
        return out
    finally:
        env.close()
        for g in made:
            g.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--out", default=str(HERE / "last-results.md"))
    ap.add_argument("--pacs-nodelay", action="store_true",
                    help="start both storescp PACS with TCP_NODELAY=1 (storescu keeps DCMTK's defaults)")
    args = ap.parse_args()

    for tool in ("storescu", "storescp", "curl", "openssl", "mosquitto"):
        if shutil.which(tool) is None:
            print(f"`{tool}` not found on PATH (hw-tests/run-all.sh installs the peers)", file=sys.stderr)
            return 2
    mtls.orthanc_binary()
    mtls.nginx_binary()
    if not os.access(args.gatewayd, os.X_OK):
        print(f"{args.gatewayd} is not executable: cargo build --release -p gatewayd", file=sys.stderr)
        return 2
    os.environ["GATEWAYD"] = args.gatewayd
    if args.pacs_nodelay:
        scu.dcmtk_env = lambda nodelay=False: ORIG_DCMTK_ENV(nodelay=True)

    root = Path(tempfile.mkdtemp(prefix="results-bench-", dir="/var/tmp"))
    load0 = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    wall0 = time.monotonic()
    try:
        ca = pki.CA(root / "pki")
        runs = []
        for i in range(args.repeats):
            # Alternate which route goes first, so page cache and drift favour neither.
            order = ["manual (b)", "manual (a)", "gatewayd"] if i % 2 == 0 else ["gatewayd", "manual (a)", "manual (b)"]
            runs.append(one_run(i, root, ca, args.instances, args.seed, order))
        n = args.instances
        mb = statistics.median(r["study_bytes"] for r in runs) / 1e6

        def med(key: str, sub: str | None = None) -> float:
            return statistics.median(r[key][sub] if sub else r[key] for r in runs)

        def each(key: str, sub: str | None = None) -> str:
            return ", ".join(f"{(r[key][sub] if sub else r[key]):.2f}" for r in runs)

        ma, mbv = med("manual (a)"), med("manual (b)")
        ref_name = "manual (a)" if ma <= mbv else "manual (b)"
        ref = min(ma, mbv)
        gn, gs = med("gatewayd", "from_notice"), med("gatewayd", "from_start")
        rows = [
            f"| manual (a): curl QIDO-RS + 1 WADO-RS request per instance (1 curl, 1 connection), split, storescu "
            f"| {ma:.2f} | {each('manual (a)')} | {mb / ma:.1f} | {ma / ref:.2f}x |",
            f"| manual (b): curl QIDO-RS + 1 WADO-RS request for the study, split, storescu "
            f"| {mbv:.2f} | {each('manual (b)')} | {mb / mbv:.1f} | {mbv / ref:.2f}x |",
            f"| **gatewayd**: notice recorded -> pull (QIDO+WADO-RS), rewrite PID, sealed+fsync'd spool, C-STORE "
            f"| {gn:.2f} | {each('gatewayd', 'from_notice')} | {mb / gn:.1f} | **{gn / ref:.2f}x** |",
            f"| gatewayd, from `gatewayd run` of the stopped clinic "
            f"| {gs:.2f} | {each('gatewayd', 'from_start')} | {mb / gs:.1f} | {gs / ref:.2f}x |",
        ]
        ended = os.getloadavg()[0]
        counts = [round(n * share) for _, _, share in SIZES]
        counts[0] += n - sum(counts)
        mix = ", ".join(f"{c} x {side}x{side}" for (_, side, _), c in zip(SIZES, counts))
        hwm = ", ".join(f"{r['gatewayd']['hwm_mib']:.1f}" for r in runs)
        dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        dcmtk = "DCMTK " + (re.search(r"v(\d[\d.]*)", dcmtk) or re.search(r"(.*)", dcmtk)).group(1)
        steps: dict[str, list[float]] = {}
        for r in runs:
            for k, (total, count) in r["gatewayd"]["steps"].items():
                acc = steps.setdefault(k, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        tails = ", ".join(f"{r['gatewayd']['from_notice'] - r['gatewayd']['pulled']:.2f}" for r in runs)
        pulls = ", ".join(str(r["gatewayd"]["pulls"]) for r in runs)
        notices = ", ".join(str(r["gatewayd"]["notices"]) for r in runs)
        step_text = ", ".join(f"{k} {1000 * t / c:.2f} ms" for k, (t, c) in sorted(steps.items()) if c) or "none"
        md = [
            f"# Results-return benchmark ({started.isoformat()})",
            "",
            f"Host: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.platform()}; "
            f"{' '.join(subprocess.run(['curl', '--version'], capture_output=True, text=True).stdout.split()[:2])}; "
            f"{dcmtk.strip()}; Orthanc + DICOMweb behind nginx (mutual TLS), mosquitto, a core and a clinic gatewayd, "
            f"storescp, all on loopback sharing the cores; load average at start {load0:.2f}, at end {ended:.2f}; "
            f"gatewayd `{args.gatewayd}`.",
            f"Input: one study of {n} CT Image Storage instances (Explicit VR LE, 16-bit random pixels, seed {args.seed}: "
            f"{mix}), {mb:.1f} MB, sent by storescu to the core and by the "
            f"core to the cloud (STOW-RS) before the clocks start. Median of {args.repeats} runs, each a fresh "
            f"region (cloud, broker, core, clinic, PACS folders).",
            "",
            f"| route | median s | runs (s) | MB/s | vs {ref_name} |",
            "|---|---:|---|---:|---:|",
            *rows,
            "",
            f"gatewayd / {ref_name} = {gn / ref:.2f}x (target of issue 16: at most 1.2x); "
            f"gatewayd / manual (a) = {gn / ma:.2f}x, gatewayd / manual (b) = {gn / mbv:.2f}x.",
            f"Clinic start to its first \"results notice recorded\" line: {each('gatewayd', 'start_to_notice')} s "
            f"(the notice waits in the clinic's persistent MQTT session). First notice recorded: "
            f"{runs[0]['gatewayd']['first_notice']}. Peak RSS (VmHWM) of the clinic gatewayd: "
            f"{hwm} MiB.",
            f"Where the gatewayd time goes: all {n} in the clinic's spool (its first \"{PULLED_LINE}\" line) "
            f"{each('gatewayd', 'pulled')} s after the notice, so the C-STORE tail after the pull is "
            f"{tails} s; pulls per run {pulls}, notices recorded {notices}; clinic CPU (utime+stime from start to the "
            f"last file) {each('gatewayd', 'cpu')} s; spool commit steps, mean per object over all runs: {step_text}.",
            f"Manual route split: curl + split {each('manual (a) fetch')} s (a), {each('manual (b) fetch')} s (b); "
            f"the rest of each is storescu.",
            f"PACS: `storescp +uf +xa`{' with TCP_NODELAY=1 (both PACS; storescu keeps its defaults)' if args.pacs_nodelay else ' with DCMTK defaults (Nagle on its answers)'}.",
            f"Before the clocks: storescu -> core {each('core_ingest')} s, until the cloud held all {n}: "
            f"{each('to_cloud')} s.",
            f"Checked each run: the PACS folder holds exactly {n} files, each SOP Instance UID of the study once; the "
            f"clinic's `spool status` `{PACS_DEST}`: {runs[-1]['gatewayd']['status']}.",
            "",
            "Clinic config (results part):",
            "```toml",
            runs[0]["clinic_config"].strip(),
            "```",
            "",
            "Manual commands:",
            *[f"- {k}: {v}" for k, v in runs[0]["commands"].items()],
            "",
            f"Command: `GATEWAYD={args.gatewayd} hw-tests/.venv/bin/python hw-tests/bench/results_bench.py"
            + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
            + (f" --instances {n}" if n != 500 else "") + (" --pacs-nodelay" if args.pacs_nodelay else "") + "`",
            f"Whole benchmark: {time.monotonic() - wall0:.0f} s.",
        ]
        text = "\n".join(md) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
