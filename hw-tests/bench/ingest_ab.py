#!/usr/bin/env python3
"""Two gatewayd builds head to head on ingest_bench.py's data sets.

    hw-tests/.venv/bin/python hw-tests/bench/ingest_ab.py BUILD_A BUILD_B [RUNS]

storescu with TCP_NODELAY=1 (a sender that does not stall), the mixed and the small set, one
and four associations; for each configuration the two builds run alternately, RUNS times
each (default 5), each run into a fresh state dir. Prints the median and every run per build.
For a change too small for the run-to-run spread of separate ingest_bench.py runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ingest_bench as ib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_a")
    ap.add_argument("build_b")
    ap.add_argument("runs", type=int, nargs="?", default=5)
    args = ap.parse_args()
    builds = {"A": args.build_a, "B": args.build_b}
    root = Path(tempfile.mkdtemp(prefix="ingest-ab-", dir="/var/tmp"))
    try:
        for ds in ib.make_data_sets(root / "data", quick=False):
            for assocs in (1, 4):
                times: dict[str, list[float]] = {k: [] for k in builds}
                for run in range(args.runs):
                    for name, build in builds.items():
                        os.environ["GATEWAYD"] = build
                        target = ib.Gatewayd(root / f"{name}-{ds.name}-{assocs}-{run}")
                        times[name] += ib.bench(target, ib.Storescu(nodelay=True), ds.batches(assocs), 1)
                for name, t in times.items():
                    runs = ", ".join(f"{x:.3f}" for x in t)
                    print(f"{ds.name} {ds.label(assocs)} {name} ({builds[name]}): "
                          f"median {statistics.median(t):.3f} s  runs {runs}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
