#!/usr/bin/env python3
"""A synthetic identity registry and queries against it, with the truth beside them.

    python3 hw-tests/identity/gen_registry.py --seed 17 --records 1000000 --queries 1000 \\
        --out-dir DIR [--workers 2]

Writes, in DIR:
  records.jsonl        N source records (JSON lines, the 15 string fields, missing ones
                       left out) across 5 hospitals (`synth.HOSPITALS[:5]`, each with its
                       own style): people in households and nursing homes, each person with
                       1-3 records at different hospitals; between two records a person may
                       have moved, changed job or married, and a record may carry a typing
                       error or miss fields.
  records.truth.jsonl  per record {"hospital_id", "patient_id", "person"}.
  queries.jsonl        M new records: 70 % of people already in the registry (at a hospital
                       they had no record at yet, with the same kinds of variation), 15 % of
                       new members of a registered household (same family name, address
                       and landline: a look-alike), 15 % of new people.
  queries.truth.jsonl  per query {"query": i, "person", "kind": "existing"|"household"|"new",
                       "records": [{"hospital_id", "patient_id"}...] (the person's records
                       in the registry, empty for a new person)}.

Chunks of 20,000 records are made in parallel (`--workers`, default all CPUs), each from
its own seed, and written in chunk order: the same seed gives the same files whatever the
number of workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from identity import synth  # noqa: E402

CHUNK = 20_000
REGISTRY_HOSPITALS = synth.HOSPITALS[:5]
_POP: synth.Population | None = None


def _pop() -> synth.Population:
    global _POP
    if _POP is None:
        _POP = synth.Population()
    return _POP


def _vary(pop: synth.Population, p: synth.Person, rng: random.Random) -> synth.Person:
    """What may have changed since the last record of `p`."""
    x = rng.random()
    if x < 0.04:
        return synth.move(pop, p, rng)
    if x < 0.07 and 18 < p.age() < 75:
        return synth.change_job(pop, p, rng)
    if x < 0.085 and p.sex == "F" and 22 <= p.age() <= 60:
        return synth.marry(pop, p, rng)
    return p


def _slip(r: dict, rng: random.Random) -> None:
    """Typing errors and missing fields of one record."""
    x = rng.random()
    if x < 0.015:
        synth.typo_kana(r, rng)
    elif x < 0.025:
        synth.typo_phone(r, rng)
    elif x < 0.03:
        synth.typo_kanji(r, rng)
    if rng.random() < 0.05:
        synth.drop_fields(r, rng, 1)


def _chunk(args: tuple[int, int, int, int]) -> tuple[str, str, list[dict], list[dict]]:
    seed, c, n_records, n_queries = args
    pop = _pop()
    rng = random.Random(synth.stable_hash("registry", seed, c))
    counters = [c * CHUNK * 2 + 1 for _ in REGISTRY_HOSPITALS]

    def new_id(h: int) -> str:
        pid = REGISTRY_HOSPITALS[h][1].id_format.format(counters[h])
        counters[h] += 1
        return pid

    recs: list[str] = []
    truth: list[str] = []
    people: list[tuple[str, synth.Person, list[int], list[dict]]] = []  # id, last state, hospitals, keys
    households: list[list[synth.Person]] = []
    n_person = 0
    while len(recs) < n_records:
        group = pop.nursing_home(rng, rng.randint(20, 60)) if rng.random() < 0.004 else pop.household(rng)
        households.append(group)
        for p in group:
            k = rng.choices([1, 2, 3], weights=[55, 30, 15])[0]
            hs = rng.sample(range(len(REGISTRY_HOSPITALS)), k)
            person_id = f"{seed}-{c}-{n_person}"
            n_person += 1
            state = p
            keys = []
            for j, h in enumerate(hs):
                if j:
                    state = _vary(pop, state, rng)
                hid, style = REGISTRY_HOSPITALS[h]
                pid = new_id(h)
                r = synth.render(state, style, rng, hospital_id=hid, patient_id=pid)
                _slip(r, rng)
                recs.append(json.dumps(synth.strip_none(r), ensure_ascii=False))
                truth.append(json.dumps({"hospital_id": hid, "patient_id": pid, "person": person_id}))
                keys.append({"hospital_id": hid, "patient_id": pid})
                if len(recs) >= n_records:
                    break
            people.append((person_id, state, hs, keys))
            if len(recs) >= n_records:
                break

    queries: list[dict] = []
    qtruth: list[dict] = []
    for _ in range(n_queries):
        x = rng.random()
        if x < 0.70:
            person_id, state, hs, keys = rng.choice(people)
            free = [h for h in range(len(REGISTRY_HOSPITALS)) if h not in hs]
            h = rng.choice(free)
            state = _vary(pop, state, rng)
            kind = "existing"
        elif x < 0.85:
            group = rng.choice(households)
            head = group[0]
            p = pop.person(rng, family=(head.family, head.family_kana), address=head.address,
                           landline=head.landline, insurance=pop.dependent_insurance(rng, head.insurance, 30))
            person_id, state, keys, kind = None, p, [], "household"
            h = rng.randrange(len(REGISTRY_HOSPITALS))
        else:
            person_id, state, keys, kind = None, pop.person(rng), [], "new"
            h = rng.randrange(len(REGISTRY_HOSPITALS))
        hid, style = REGISTRY_HOSPITALS[h]
        r = synth.render(state, style, rng, hospital_id=hid, patient_id=new_id(h))
        _slip(r, rng)
        queries.append(synth.strip_none(r))
        qtruth.append({"person": person_id, "kind": kind, "records": keys})
    return "\n".join(recs) + "\n", "\n".join(truth) + "\n", queries, qtruth


def generate(seed: int, n_records: int, n_queries: int, out_dir: Path, workers: int | None = None) -> dict:
    """Writes the four files; returns their paths and the time taken."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = max(1, -(-n_records // CHUNK))
    jobs = []
    for c in range(n_chunks):
        nr = min(CHUNK, n_records - c * CHUNK)
        nq = n_queries // n_chunks + (1 if c < n_queries % n_chunks else 0)
        jobs.append((seed, c, nr, nq))
    t0 = time.monotonic()
    paths = {k: out_dir / f"{k.replace('_', '.')}.jsonl" for k in ("records", "records_truth", "queries", "queries_truth")}
    workers = workers or os.cpu_count() or 1
    with open(paths["records"], "w", encoding="utf-8") as fr, open(paths["records_truth"], "w") as ft, \
            open(paths["queries"], "w", encoding="utf-8") as fq, open(paths["queries_truth"], "w") as fqt:
        qi = 0
        if workers > 1 and n_chunks > 1:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers) as pool:
                results = pool.imap(_chunk, jobs)
                for recs, truth, qs, qts in results:
                    fr.write(recs)
                    ft.write(truth)
                    for q, t in zip(qs, qts):
                        fq.write(json.dumps(q, ensure_ascii=False) + "\n")
                        fqt.write(json.dumps(dict(query=qi, **t)) + "\n")
                        qi += 1
        else:
            for job in jobs:
                recs, truth, qs, qts = _chunk(job)
                fr.write(recs)
                ft.write(truth)
                for q, t in zip(qs, qts):
                    fq.write(json.dumps(q, ensure_ascii=False) + "\n")
                    fqt.write(json.dumps(dict(query=qi, **t)) + "\n")
                    qi += 1
    return {"paths": {k: str(v) for k, v in paths.items()}, "seconds": time.monotonic() - t0,
            "records": n_records, "queries": n_queries}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    if args.records < 1 or args.queries < 0:
        ap.error("--records must be >= 1 and --queries >= 0")
    info = generate(args.seed, args.records, args.queries, args.out_dir, args.workers)
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
