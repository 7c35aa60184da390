#!/usr/bin/env python3
"""Manual HL7 benchmark: durable acceptance by gatewayd vs python-hl7's MLLP server
(not run by run-all.sh).

    cargo build --release -p gatewayd
    cargo build --release -p gateway-mllp --example mllp_load
    hw-tests/.venv/bin/python hw-tests/bench/hl7_bench.py [--repeats 3] [--gatewayd PATH] [--loadgen PATH]

The load generator is `gateway/mllp/examples/mllp_load.rs` (Rust, one tokio thread,
TCP_NODELAY): N connections, each sends its share of M ADT^A08 one at a time (frame,
wait for the ACK, next), each with its own MSH-10; every ACK must be AA with MSA-2 = that
MSH-10. Latency = last byte of the frame written -> whole ACK read. Runs: 1 sender and 8
senders, each after a short warm-up that is not timed, against

  gatewayd      release build, development config, software key store, `[hl7] listen` on a
                free port, data dir in a temp dir under /var/tmp (a real disk, not tmpfs:
                checked with `df`). Every AA only after the message is sealed and
                its group's frame appended to the spool journal and fdatasync'd (group
                commit across connections); the index is written behind it. A FRESH gatewayd and data dir per run. After each run the
                spool must hold warm-up + measured messages, and
                `gateway_hl7_messages_total{ack="AA"}` must say the same.
  python-hl7    python-hl7's own asyncio MLLP server (`hl7.mllp.start_hl7_server`, the
                package's documented pattern: `readmessage()` parses, `create_ack()`
                answers AA) run by this script with `--python-server PORT`; it keeps
                nothing: the non-durable ceiling of a real MLLP stack on this machine.

Median of --repeats (default 3), interleaved so that drifts of the machine hit both alike.
Server CPU = utime + stime from /proc/PID/stat over the load generator's run (warm-up
included), per 1,000 messages. For gatewayd also the durable steps from its own
`gateway_spool_commit_step_seconds` (one `journal` = one group's append + fdatasync, on
the path to the AA; one `index` = one checkpointer round of sled inserts, after the AA). Prints a Markdown report and writes it to
hw-tests/bench/last-hl7.md.

Every server binds 127.0.0.1 on a free port picked here and is stopped by its PID; the temp
dir is removed at the end (each gatewayd data dir right after its run).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import gw  # noqa: E402
from ingest_bench import stop_pid, wait_port  # noqa: E402
from uplink_bench import cpu_seconds  # noqa: E402

REPO = HERE.parent.parent
LOADGEN_TIMEOUT_S = 900
TARGET_RATE = 5000.0  # issue 5: messages/s with 8 senders
TARGET_P99_MS = 20.0
# ext4 without a journal (this VM's root file system) will not reuse an inode deleted less than
# 60 s ago (300 s more while its inode-table block is dirty): every file creation in that block
# group first walks past all of them (fs/ext4/ialloc.c, `recently_deleted`). gatewayd creates one
# file per message, so deleting a run's 40,000 files right before the next run made the next run
# 2-3x slower. Hence: no data dir is deleted before the last run, and the cost of creating a
# file is probed (and reported) before the first run.
PROBE_FILES = 300
BUILD = ("cargo build --release -p gatewayd", "cargo build --release -p gateway-mllp --example mllp_load")


# -- the baseline server (this script with --python-server PORT) ----------------


def serve_python(port: int) -> int:
    """python-hl7's asyncio MLLP server answering AA from memory, storing nothing."""
    import asyncio

    from hl7.mllp import start_hl7_server

    async def handle(reader, writer):
        try:
            while True:
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())  # MSA-1 = AA, MSA-2 = MSH-10
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await start_hl7_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


# -- helpers ---------------------------------------------------------------------


def filesystem(path: Path) -> tuple[str, str, str]:
    """(source, fstype, mount point) of the file system holding ``path``, from df."""
    out = subprocess.run(["df", "--output=source,fstype,target", str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1].split()
    return out[0], out[1], out[2]


def probe_create_us(d: Path, n: int = PROBE_FILES) -> float:
    """Mean microseconds to create, write (300 bytes) and rename one file in a new folder ``d``
    (the files stay, so the probe deletes nothing)."""
    d.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"{i}.part", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, b"x" * 300)
        os.close(fd)
        os.rename(d / f"{i}.part", d / str(i))
    return (time.perf_counter() - t0) / n * 1e6


def has_journal(source: str) -> bool:
    """Whether the block device ``source`` (e.g. /dev/vda) has a jbd2 journal (ext3/ext4)."""
    return any(Path("/proc/fs/jbd2").glob(Path(source).name + "-*"))


def step_totals(samples) -> dict[str, tuple[float, float]]:
    """gateway_spool_commit_step_seconds: step -> (sum seconds, count)."""
    out = {}
    for step in ("journal", "index"):
        s = sum(gw.metric_values(samples, "gateway_spool_commit_step_seconds_sum", step=step))
        c = sum(gw.metric_values(samples, "gateway_spool_commit_step_seconds_count", step=step))
        out[step] = (s, c)
    return out


class Bench:
    def __init__(self, root: Path, args):
        self.root = root
        self.args = args
        self.n = 0
        self.commands: dict[str, str] = {}

    def loadgen(self, port: int, senders: int, messages: int) -> dict:
        cmd = [self.args.loadgen, "--port", str(port), "--senders", str(senders), "--messages", str(messages),
               "--warmup", str(self.args.warmup)]
        self.commands.setdefault(f"load, {senders} sender{'s' if senders > 1 else ''}",
                                 "`" + " ".join(cmd).replace(f"--port {port}", "--port PORT")
                                 .replace(str(self.root), "$TMP") + "`")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=LOADGEN_TIMEOUT_S, stdin=subprocess.DEVNULL)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode not in (0, 1) or not r.stdout.strip():
            raise RuntimeError(f"mllp_load exited {r.returncode}: {r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["loadgen_cpu"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return res

    def gatewayd(self, senders: int, messages: int) -> dict:
        self.n += 1
        port = gw.free_port()
        work = self.root / f"gatewayd-{self.n}"
        g = gw.Gateway(work, {"hl7": {"listen": f"127.0.0.1:{port}"}}, name="bench")
        self.commands.setdefault("gatewayd", f"`{g.binary.replace(str(self.root), '$TMP')} run --config CONFIG` "
                                 "with\n  ```toml\n  "
                                 + gw.to_toml(g.config).strip().replace(str(self.root), "$TMP")
                                 .replace(f"{port}", "PORT").replace("\n", "\n  ") + "\n  ```")
        try:
            g.start()
            cpu0 = cpu_seconds(g.pid)
            load = os.getloadavg()[0]
            res = self.loadgen(port, senders, messages)
            cpu = cpu_seconds(g.pid) - cpu0
            samples = g.metrics()
            total = messages + self.args.warmup
            aa = sum(gw.metric_values(samples, "gateway_hl7_messages_total", ack="AA"))
            objects = g.status()["objects"]
            if aa != total or objects != total:
                raise RuntimeError(f"gatewayd: {aa} AA and {objects} stored for {total} messages sent")
            if g.stop() != 0:
                raise RuntimeError(f"gatewayd did not stop cleanly:\n{g.log_tail()}")
            res.update(cpu=cpu, total=total, load=load, steps=step_totals(samples))
            return res
        finally:
            # The data dir stays until the whole benchmark is over: see PROBE_FILES.
            g.cleanup()

    def python(self, senders: int, messages: int) -> dict:
        port = gw.free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--python-server", str(port)]
        self.commands.setdefault("python-hl7", "`" + " ".join(cmd).replace(str(port), "PORT") + "`")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port)
            cpu0 = cpu_seconds(proc.pid)
            load = os.getloadavg()[0]
            res = self.loadgen(port, senders, messages)
            res.update(cpu=cpu_seconds(proc.pid) - cpu0, total=messages + self.args.warmup, load=load)
            return res
        finally:
            stop_pid(proc)


def fmt_runs(runs: list[dict], key: str, f: str = "{:.0f}") -> str:
    return ", ".join(f.format(r[key]) for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--loadgen", default=str(REPO / "target/release/examples/mllp_load"))
    ap.add_argument("--messages-1", type=int, default=5000, help="messages of a 1-sender run (gatewayd)")
    ap.add_argument("--messages-8", type=int, default=40000, help="messages of an 8-sender run (gatewayd)")
    ap.add_argument("--baseline-messages-1", type=int, default=10000,
                    help="messages of a 1-sender run (python-hl7; it answers faster, each run should last >= 5 s)")
    ap.add_argument("--baseline-messages-8", type=int, default=40000, help="messages of an 8-sender run (python-hl7)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed messages before each run (all senders)")
    ap.add_argument("--out", default=str(HERE / "last-hl7.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--python-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.python_server:
        return serve_python(args.python_server)

    missing = [p for p in (args.gatewayd, args.loadgen) if not os.access(p, os.X_OK)]
    if missing:
        print(f"not executable: {', '.join(missing)}; build them first:\n  " + "\n  ".join(BUILD), file=sys.stderr)
        return 2
    hl7_version = importlib.metadata.version("hl7")

    root = Path(tempfile.mkdtemp(prefix="hl7-bench-", dir="/var/tmp"))
    # Copies: target/ is shared, and a rebuild during the benchmark must not swap the binary.
    built = {"gatewayd": Path(args.gatewayd).resolve(), "mllp_load": Path(args.loadgen).resolve()}
    (root / "bin").mkdir()
    for name, src in built.items():
        shutil.copy2(src, root / "bin" / name)
    digests = {name: hashlib.sha256((root / "bin" / name).read_bytes()).hexdigest()[:12] for name in built}
    args.gatewayd = str(root / "bin" / "gatewayd")
    args.loadgen = str(root / "bin" / "mllp_load")
    os.environ["GATEWAYD"] = args.gatewayd
    fs = filesystem(root)
    if fs[1] in ("tmpfs", "ramfs"):
        print(f"{root} is on {fs[1]}: durability would be free there; use a real disk", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        return 2
    probe0 = probe_create_us(root / "probe-start")
    print(f"creating a file under {root}: {probe0:.0f} us (before the first run)", flush=True)
    if probe0 > 200:
        print("  slow: probably many inodes deleted in the last minutes on an ext4 without journal; "
              "the numbers will be low (wait ~6 min without deleting files there)", file=sys.stderr)
    load0 = os.getloadavg()
    started = datetime.datetime.now().astimezone().replace(microsecond=0)
    try:
        b = Bench(root, args)
        plan = [("gatewayd", 1, args.messages_1, b.gatewayd), ("gatewayd", 8, args.messages_8, b.gatewayd),
                ("python-hl7", 1, args.baseline_messages_1, b.python),
                ("python-hl7", 8, args.baseline_messages_8, b.python)]
        results: dict[tuple[str, int], list[dict]] = {}
        for i in range(args.repeats):
            for name, senders, messages, fn in plan:
                r = fn(senders, messages)
                results.setdefault((name, senders), []).append(r)
                print(f"run {i + 1}: {name} {senders} x: {r['messages']} in {r['seconds']:.2f}s = "
                      f"{r['msgs_per_sec']:.0f}/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"max {r['max_ms']:.1f} ms, non-AA {r['non_aa']}, server CPU {r['cpu']:.2f}s, "
                      f"load {r['load']:.2f}", flush=True)
        load1 = os.getloadavg()
        probe1 = probe_create_us(root / "probe-end")

        def med(name: str, senders: int, key: str) -> float:
            return statistics.median(r[key] for r in results[(name, senders)])

        rows = []
        for name, senders, messages, _ in plan:
            runs = results[(name, senders)]
            rate = med(name, senders, "msgs_per_sec")
            ref = med("python-hl7", senders, "msgs_per_sec")
            cpu_k = statistics.median(1000 * r["cpu"] / r["total"] for r in runs)
            gen_k = statistics.median(1000 * r["loadgen_cpu"] / r["total"] for r in runs)
            label = "**gatewayd** (durable: sealed, journal fdatasync before AA)" if name == "gatewayd" else \
                f"python-hl7 {hl7_version} asyncio server (AA from memory, stores nothing)"
            rows.append(
                f"| {label} | {senders} | {messages} | {med(name, senders, 'seconds'):.2f} | "
                f"**{rate:.0f}** | {fmt_runs(runs, 'msgs_per_sec')} | {med(name, senders, 'p50_ms'):.2f} | "
                f"{med(name, senders, 'p99_ms'):.2f} | {med(name, senders, 'max_ms'):.1f} | "
                f"{sum(r['non_aa'] for r in runs)} | {cpu_k:.3f} | {gen_k:.3f} | {rate / ref:.2f}x |")

        step_rows = []
        for senders in (1, 8):
            runs = results[("gatewayd", senders)]
            groups = statistics.median(r["steps"]["journal"][1] for r in runs)
            per_group = statistics.median(r["total"] / r["steps"]["journal"][1] for r in runs if r["steps"]["journal"][1])
            sync_ms = statistics.median(1000 * r["steps"]["journal"][0] / r["steps"]["journal"][1] for r in runs)
            rounds = statistics.median(r["steps"]["index"][1] for r in runs)
            index_ms = statistics.median(1000 * r["steps"]["index"][0] / r["steps"]["index"][1] for r in runs)
            steps_per_msg = statistics.median(1000 * r["steps"]["journal"][0] / r["total"] for r in runs)
            wall_per_msg = 1000 / med("gatewayd", senders, "msgs_per_sec")
            step_rows.append(f"| {senders} | {groups:.0f} | {per_group:.1f} | {sync_ms:.3f} | {steps_per_msg:.3f} | "
                             f"{rounds:.0f} | {index_ms:.3f} | {wall_per_msg:.3f} |")

        short = [f"{n} {s}x ({r['seconds']:.1f} s)" for (n, s), runs in results.items() for r in runs
                 if r["seconds"] < 5.0]
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "Cargo.toml",
                                "Cargo.lock"], capture_output=True, text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip() and "mllp/examples" not in line]
        rate8 = med("gatewayd", 8, "msgs_per_sec")
        p99_8 = med("gatewayd", 8, "p99_ms")
        met = rate8 >= TARGET_RATE and p99_8 < TARGET_P99_MS
        src, fstype, mnt = fs
        md = [
            f"# HL7 durable acceptance benchmark ({started.isoformat()})",
            "",
            f"Host: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.platform()}; "
            f"Python {platform.python_version()}, python-hl7 {hl7_version}; load generator, servers and everything "
            f"else on the machine share the {os.cpu_count()} cores. Load average (1/5/15 min) at start "
            f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; "
            f"1-min load at the start of each run: "
            + "; ".join(f"{n} {s}x: {fmt_runs(results[(n, s)], 'load', '{:.2f}')}" for n, s, _, _ in plan) + ".",
            f"gatewayd data dirs: {root} on {src} ({fstype}"
            + ("" if fstype not in ("ext3", "ext4") else ", with a journal" if has_journal(src) else ", no journal")
            + f", mounted on {mnt}), a fresh gatewayd and data dir per "
            f"run, all kept until the end (on ext4 without a journal, files deleted in the last 60-360 s make "
            f"every new file's inode allocation slower). Creating + writing + renaming one small file there: "
            f"{probe0:.0f} us before the first run, {probe1:.0f} us after the last. "
            f"Messages: ADT^A08, ~{len(sample_message())} bytes, synthetic (ZZTEST), each with its own MSH-10; "
            f"every run starts after {args.warmup} untimed warm-up messages. Median of {args.repeats} runs.",
            f"Binaries (copied at start): {built['gatewayd']} ({os.path.getsize(args.gatewayd) / 1e6:.1f} MB, "
            f"sha256 {digests['gatewayd']}...) and {built['mllp_load']} (sha256 {digests['mllp_load']}...); "
            f"worktree at {head}" + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "") + ".",
            *([f"Runs shorter than 5 s (less reliable): {', '.join(short)}."] if short else []),
            "",
            "| server | senders | messages per run | median s | median msgs/s | runs (msgs/s) | p50 ms | p99 ms | "
            "max ms | non-AA (all runs) | server CPU s per 1,000 msgs | load generator CPU s per 1,000 msgs | "
            "vs python-hl7 (msgs/s) |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Target of issue 5: >= {TARGET_RATE:.0f} msgs/s with 8 senders and p99 < {TARGET_P99_MS:.0f} ms: "
            f"**{'met' if met else 'not met'}** ({rate8:.0f} msgs/s, p99 {p99_8:.2f} ms).",
            "",
            "gatewayd's durable steps (its `gateway_spool_commit_step_seconds`, whole run incl. warm-up; median of "
            "runs; a group = the messages the committer thread makes durable with one journal append + fdatasync; "
            "an index round = the messages the checkpointer indexes at once, after their AA):",
            "",
            "| senders | groups per run | messages per group | journal ms per group | journal ms per message | "
            "index rounds per run | index ms per round | wall ms per message (1 / median msgs/s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *step_rows,
            "",
            "Latency = from the last byte of a frame written to the last byte of its ACK read, per message "
            "(one outstanding message per connection). Server CPU = utime + stime of the server process over the "
            "load generator's run, divided by warm-up + measured messages.",
            "",
            "Commands (`$TMP` is the benchmark's temp dir; `$TMP/bin/` holds the copies of the binaries):",
            *[f"- {k}: {v}" for k, v in b.commands.items()],
            "",
            "Command: `hw-tests/.venv/bin/python hw-tests/bench/hl7_bench.py"
            + "".join(f" {a}" for a in sys.argv[1:]) + "`",
        ]
        text = "\n".join(md) + "\n"
        print(text)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def sample_message() -> bytes:
    """The size of what mllp_load sends (same layout, typical ids)."""
    return ("MSH|^~\\&|ZZHIS|ZZHOSP|GATEWAY|ZZCLINIC|20261201120000||ADT^A08^ADT_A01|Z1A2B30000000001|P|2.5\r"
            "EVN|A08|20261201120000\r"
            "PID|1||ZZPID0000001^^^ZZHOSP^PI||ZZTEST^TARO||19700101|F|||1-1 ZZTEST^^ZZCITY\r"
            "PV1|1|O\r").encode()


if __name__ == "__main__":
    sys.exit(main())
