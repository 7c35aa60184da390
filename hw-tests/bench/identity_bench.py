#!/usr/bin/env python3
"""Manual identity-matching benchmark (issue 17, 名寄せ; not run by run-all.sh).

    cargo build --release -p gatewayd
    GATEWAYD=$PWD/target/release/gatewayd hw-tests/.venv/bin/python hw-tests/bench/identity_bench.py \\
        [--records 1000000] [--queries 1000] [--brute-queries 100] [--seed 17] [--keep DIR]

1. Generates a registry of --records synthetic source records across 5 hospitals and
   --queries new records (hw-tests/identity/gen_registry.py: households, nursing homes,
   1-3 records per person with the variations of real records; 70 % of the queries are
   people already registered, 30 % new people, half of those look-alikes from a registered
   household), with the truth in side files. Timed (2 worker processes by default).
2. `gatewayd identity search --records R --queries Q` (the blocking `Index`, built-in
   model): the CLI's own load time, per-query p50/p99/max (candidates + comparisons), mean
   candidates and peak RSS; this script also records the wall time and the child's peak RSS
   (wait4). Then the same with `--learn` (EM on the loaded registry: learn time).
3. `--brute-force` over the SAME full registry for the first --brute-queries queries (every
   query compared with every record: about a second per query at 1 M records, hence a
   subset of the queries, not of the records). Recall of the index vs brute force = share
   of those queries whose brute-force best answer is link/review and for which the index
   run returned the same record (or another record of the same person, per the truth file)
   as link/review.
4. Accuracy of the index run against the truth: registered people linked to a record of
   theirs / sent to review / missed / linked to someone else; new people kept distinct or
   wrongly linked.

Prints a Markdown report and writes it to hw-tests/bench/last-identity.md. Data goes to a
temp dir under /var/tmp (about 0.5 GB at 1 M records), deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from identity import gen_registry  # noqa: E402

TIMEOUT_S = 3 * 3600


def gatewayd_path(arg: str | None) -> str:
    path = arg or os.environ.get("GATEWAYD") or str(HERE.parent.parent / "target" / "release" / "gatewayd")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        sys.exit(f"no gatewayd binary at {path}: build it (cargo build --release -p gatewayd) or set GATEWAYD")
    return path


def run_search(binary: str, records: Path, queries: Path, extra: list[str], out: Path) -> dict:
    """One `identity search`; its JSON plus wall time and peak RSS seen by the kernel."""
    cmd = [binary, "identity", "search", "--records", str(records), "--queries", str(queries), *extra]
    t0 = time.monotonic()
    with open(out, "wb") as fo, open(out.with_suffix(".err"), "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = out.with_suffix(".err").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err}")
    try:
        res = json.loads(out.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{' '.join(cmd)}: output is not one JSON object ({e})") from None
    res["_wall_s"] = wall
    res["_maxrss_kib"] = ru.ru_maxrss
    res["_cmd"] = " ".join(Path(c).name if c == binary else c for c in cmd)
    return res


def key(best: dict | None) -> tuple[str, str] | None:
    if not best:
        return None
    return (str(best.get("hospital_id")), str(best.get("patient_id")))


def load_truth(path: Path, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            k = (t["hospital_id"], t["patient_id"])
            if k in wanted:
                out[k] = t["person"]
    return out


def accuracy(answers: list[dict], qtruth: list[dict], person_of: dict) -> dict[str, int]:
    c = dict.fromkeys(["existing", "existing_link", "existing_review", "existing_missed", "existing_wrong_link",
                       "existing_wrong_review", "new", "new_distinct", "new_review", "new_false_link"], 0)
    for a, t in zip(answers, qtruth):
        d = a.get("decision")
        who = person_of.get(key(a.get("best")) or ("", ""))
        if t["person"] is not None:
            c["existing"] += 1
            if d == "link":
                c["existing_link" if who == t["person"] else "existing_wrong_link"] += 1
            elif d == "review":
                c["existing_review" if who == t["person"] else "existing_wrong_review"] += 1
            else:
                c["existing_missed"] += 1
        else:
            c["new"] += 1
            c[{"link": "new_false_link", "review": "new_review"}.get(d, "new_distinct")] += 1
    return c


def index_vs_brute(index: list[dict], brute: list[dict], person_of: dict) -> tuple[int, int, int]:
    """(queries whose brute-force best is link/review, of those found by the index, same record)."""
    n = found = same = 0
    for a, b in zip(index, brute):
        if b.get("decision") not in ("link", "review"):
            continue
        n += 1
        if a.get("decision") not in ("link", "review"):
            continue
        ka, kb = key(a.get("best")), key(b.get("best"))
        if ka == kb:
            same += 1
            found += 1
        elif ka and kb and person_of.get(ka) is not None and person_of.get(ka) == person_of.get(kb):
            found += 1
    return n, found, same


def fmt_ms(x: float) -> str:
    return f"{x:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--brute-queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--gatewayd", default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the data in this folder")
    ap.add_argument("--no-learn", action="store_true", help="skip the --learn run")
    args = ap.parse_args()
    binary = gatewayd_path(args.gatewayd)

    work = args.keep or Path(tempfile.mkdtemp(prefix="identity-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"generating {args.records:,} records + {args.queries} queries in {work} ...", file=sys.stderr)
        gen = gen_registry.generate(args.seed, args.records, args.queries, work / "data", args.workers)
        paths = {k: Path(v) for k, v in gen["paths"].items()}
        print(f"  {gen['seconds']:.1f} s, {paths['records'].stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
        qtruth = [json.loads(x) for x in paths["queries_truth"].read_text().splitlines()]

        print("identity search (index) ...", file=sys.stderr)
        idx = run_search(binary, paths["records"], paths["queries"], [], work / "index.json")
        learnt = None
        if not args.no_learn:
            print("identity search --learn ...", file=sys.stderr)
            learnt = run_search(binary, paths["records"], paths["queries"], ["--learn"], work / "learn.json")
        nb = min(args.brute_queries, args.queries)
        bq = work / "brute-queries.jsonl"
        with open(paths["queries"], encoding="utf-8") as f, open(bq, "w", encoding="utf-8") as g:
            for _ in range(nb):
                g.write(f.readline())
        print(f"identity search --brute-force ({nb} queries x {args.records:,} records) ...", file=sys.stderr)
        brute = run_search(binary, paths["records"], bq, ["--brute-force"], work / "brute.json")
        bidx = run_search(binary, paths["records"], bq, [], work / "brute-index.json")

        runs = [r for r in (idx, learnt, brute, bidx) if r]
        wanted = {k for r in runs for a in r.get("answers", []) if (k := key(a.get("best")))}
        person_of = load_truth(paths["records_truth"], wanted)

        for r in runs:
            assert len(r.get("answers", [])) == r.get("queries"), f"{r['_cmd']}: {len(r.get('answers', []))} answers"
        n, found, same = index_vs_brute(bidx["answers"], brute["answers"], person_of)
        acc = accuracy(idx["answers"], qtruth, person_of)
        acc_l = accuracy(learnt["answers"], qtruth, person_of) if learnt else None

        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        lines = [
            f"### Identity matching: {args.records:,} records, {args.queries} queries ({now})",
            "",
            f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, load {os.getloadavg()[0]:.1f} at the end; "
            f"binary `{binary}` ({os.path.getsize(binary) / 2**20:.1f} MiB); hw-tests at {rev}; seed {args.seed}.",
            f"Generated in {gen['seconds']:.0f} s ({paths['records'].stat().st_size / 2**20:.0f} MiB of JSON lines).",
            "",
            "| run | load ms | learn ms | p50 µs | p99 µs | max µs | mean candidates | peak RSS MiB (CLI / wait4) | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in (("index, built-in model", idx), ("index, `--learn`", learnt),
                        (f"`--brute-force`, first {nb} queries", brute), (f"index, same {nb} queries", bidx)):
            if not r:
                continue
            lines.append(
                f"| {name} | {fmt_ms(r.get('load_ms', 0))} | {fmt_ms(r.get('learn_ms', 0))} | {r.get('p50_us', 0):,.0f} | "
                f"{r.get('p99_us', 0):,.0f} | {r.get('max_us', 0):,.0f} | {r.get('mean_candidates', 0):,.1f} | "
                f"{r.get('peak_rss_kib', 0) / 1024:,.0f} / {r['_maxrss_kib'] / 1024:,.0f} | {r['_wall_s']:,.1f} |")
        lines += [
            "",
            f"Recall of the index vs brute force ({nb} queries): {n} have a brute-force link/review; the index "
            f"returns the same record for {same} and a record of the same person for {found} "
            f"({(found / n if n else 1):.3f}).",
            "",
            "Against the truth (all queries):",
            "",
            "| model | registered people | linked to theirs | review (theirs) | missed | linked/reviewed to someone else | new people | kept distinct | review | falsely linked |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, a in (("built-in", acc), ("learnt", acc_l)):
            if a:
                lines.append(f"| {name} | {a['existing']} | {a['existing_link']} | {a['existing_review']} | {a['existing_missed']} | "
                             f"{a['existing_wrong_link']} / {a['existing_wrong_review']} | {a['new']} | {a['new_distinct']} | "
                             f"{a['new_review']} | {a['new_false_link']} |")
        cmds = "; ".join(f"`gatewayd {r['_cmd'].split(' ', 1)[1]}`".replace(str(work), "$DIR") for r in runs)
        lines += ["", f"Commands ($DIR = the data folder): {cmds}", ""]
        report = "\n".join(lines)
        print(report)
        (HERE / "last-identity.md").write_text(report + "\n", encoding="utf-8")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
