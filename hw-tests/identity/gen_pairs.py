#!/usr/bin/env python3
"""Labelled record pairs for `gatewayd identity match --pairs FILE`.

    python3 hw-tests/identity/gen_pairs.py --seed 17 --pairs 6000 --out pairs.jsonl [--stats]

Writes JSON lines `{"pair_id", "a", "b", "label": "match"|"nonmatch", "phenomenon"}`
(`a`/`b` are records with the 15 string fields, missing ones left out); `label` and
`phenomenon` are extra fields the matcher's CLI ignores. The same seed gives the same file.
`--stats` prints the count per label and phenomenon to stderr. See synth.py for the people
and the variations.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from identity import synth  # noqa: E402


def write_pairs(path: Path, seed: int, n: int) -> list[dict]:
    pairs = synth.make_pairs(seed, n)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            line = dict(p, a=synth.strip_none(p["a"]), b=synth.strip_none(p["b"]))
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return pairs


def stats(pairs: list[dict]) -> str:
    c = collections.Counter((p["label"], p["phenomenon"]) for p in pairs)
    lines = [f"{label:9} {phen:26} {n:6d}" for (label, phen), n in sorted(c.items())]
    by_label = collections.Counter(p["label"] for p in pairs)
    lines.append(f"total {len(pairs)}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_label.items())))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stats", action="store_true", help="count per label and phenomenon on stderr")
    args = ap.parse_args()
    if args.pairs < 2:
        ap.error("--pairs must be at least 2")
    pairs = write_pairs(args.out, args.seed, args.pairs)
    if args.stats:
        print(stats(pairs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
