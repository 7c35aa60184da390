"""`gatewayd identity match --pairs FILE` against labelled pairs (issue 17, 名寄せ).

The pairs come from `identity/gen_pairs.py` (synthetic Japanese patients, see
`identity/synth.py`): 6,000 per seed, half the same person recorded by two hospitals with
the variations of real records, half look-alikes of different people. The binary runs with
no config and no daemon, from an empty folder. Acceptance (issue 17): precision of `link`
>= 0.999, true matches ending `link` or `review` >= 0.97, `review` <= 15 % of all pairs.
A failure prints the confusion per phenomenon.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

import gw
from identity import gen_pairs, gen_registry, synth

PAIRS = 6000
SEEDS = [17, 20261206]
MIN_PRECISION = 0.999
MIN_RECALL = 0.97
MAX_REVIEW_SHARE = 0.15
DECISIONS = ("link", "review", "distinct")
TIMEOUT_S = 300


def run_identity(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`gatewayd identity ...` from `cwd`, with a bare environment (no config anywhere)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "LANG": "C.UTF-8"}
    return subprocess.run([gw.gatewayd_binary(), "identity", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=TIMEOUT_S)


def parse_results(stdout: bytes) -> list[dict]:
    out = []
    for n, line in enumerate(stdout.decode("utf-8").splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AssertionError(f"output line {n} is not JSON ({e}): {line[:200]!r}") from None
    return out


def check_shape(results: list[dict], pair_ids: list[str]) -> None:
    assert len(results) == len(pair_ids), f"{len(results)} output lines for {len(pair_ids)} pairs"
    for i, (r, pid) in enumerate(zip(results, pair_ids)):
        assert r.get("pair_id") == pid, f"output line {i + 1}: pair_id {r.get('pair_id')!r}, expected {pid!r} (input order)"
        assert r.get("decision") in DECISIONS, f"output line {i + 1}: decision {r.get('decision')!r}"
        s = r.get("score")
        assert isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s), \
            f"output line {i + 1}: score {s!r} is not a finite number"


def confusion(pairs: list[dict], results: list[dict]) -> dict[tuple[str, str], collections.Counter]:
    c: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for p, r in zip(pairs, results):
        c[(p["label"], p["phenomenon"])][r["decision"]] += 1
    return c


def metrics(pairs: list[dict], results: list[dict]) -> dict[str, float]:
    links = [p["label"] for p, r in zip(pairs, results) if r["decision"] == "link"]
    matches = [r["decision"] for p, r in zip(pairs, results) if p["label"] == "match"]
    reviews = sum(1 for r in results if r["decision"] == "review")
    return {
        "links": len(links),
        "false_links": sum(1 for x in links if x != "match"),
        "precision": (sum(1 for x in links if x == "match") / len(links)) if links else 0.0,
        "recall": sum(1 for d in matches if d in ("link", "review")) / len(matches),
        "link_recall": sum(1 for d in matches if d == "link") / len(matches),
        "review_share": reviews / len(results),
    }


def report(pairs: list[dict], results: list[dict]) -> str:
    m = metrics(pairs, results)
    lines = [
        f"precision(link) {m['precision']:.4f} ({m['false_links']} false links of {m['links']}), "
        f"recall(link|review) {m['recall']:.4f}, link recall {m['link_recall']:.4f}, review share {m['review_share']:.4f}",
        f"{'label':9} {'phenomenon':26} {'link':>6} {'review':>6} {'distinct':>8}",
    ]
    for (label, phen), c in sorted(confusion(pairs, results).items()):
        lines.append(f"{label:9} {phen:26} {c['link']:6d} {c['review']:6d} {c['distinct']:8d}")
    return "\n".join(lines)


def examples(pairs: list[dict], results: list[dict], wrong: str, n: int = 3) -> str:
    """A few misjudged pairs (synthetic people: nothing to hide)."""
    out = []
    for p, r in zip(pairs, results):
        bad = (p["label"] == "nonmatch" and r["decision"] == "link") if wrong == "false_link" else (
            p["label"] == "match" and r["decision"] == "distinct")
        if bad and len(out) < n:
            out.append(f"{p['phenomenon']} score {r['score']}:\n  a {json.dumps(synth.strip_none(p['a']), ensure_ascii=False)}"
                       f"\n  b {json.dumps(synth.strip_none(p['b']), ensure_ascii=False)}")
    return "\n".join(out)


def assert_acceptance(pairs: list[dict], results: list[dict], what: str) -> None:
    m = metrics(pairs, results)
    table = report(pairs, results)
    print(f"{what}\n{table}")
    assert m["links"] > 0, f"{what}: no pair was linked\n{table}"
    problems = []
    if m["precision"] < MIN_PRECISION:
        problems.append(f"precision of link {m['precision']:.4f} < {MIN_PRECISION}\n{examples(pairs, results, 'false_link')}")
    if m["recall"] < MIN_RECALL:
        problems.append(f"recall (link or review) {m['recall']:.4f} < {MIN_RECALL}\n{examples(pairs, results, 'missed')}")
    if m["review_share"] > MAX_REVIEW_SHARE:
        problems.append(f"review share {m['review_share']:.4f} > {MAX_REVIEW_SHARE}")
    assert not problems, f"{what}:\n" + "\n".join(problems) + f"\n{table}"


# --------------------------------------------------------------------------


def test_generator_is_deterministic_and_covers_every_phenomenon(tmp_path):
    a = gen_pairs.write_pairs(tmp_path / "a.jsonl", 17, 1200)
    b = gen_pairs.write_pairs(tmp_path / "b.jsonl", 17, 1200)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = gen_pairs.write_pairs(tmp_path / "c.jsonl", 18, 1200)
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    got = collections.Counter((p["label"], p["phenomenon"]) for p in a)
    for phen in synth.MATCH_PHENOMENA:
        assert got[("match", phen)] > 0, phen
    for phen in synth.NONMATCH_PHENOMENA:
        assert got[("nonmatch", phen)] > 0, phen
    assert sum(1 for p in a if p["label"] == "match") == 600
    assert len({p["pair_id"] for p in a + c}) == 2400
    assert b == a
    # the variations really are there: non-BMP kanji, half-width kana, era dates, full-width digits
    text = (tmp_path / "a.jsonl").read_text(encoding="utf-8")
    for needle in ("𠮷", "髙", "ｶ", "昭和", "平成元年", "０", "－", "　", "丁目", "番地"):
        assert needle in text, needle
    for pattern in (r'"[MTSHR]\d{1,2}\.\d{1,2}\.\d{1,2}"', r'"[1-5]\d{6}"', r'"\d{4}-\d{2}-\d{2}"', r'"[ｦ-ﾟ ]+"',
                    r'"[ぁ-ゖ]+"', r'ー[0-9０-９]'):
        assert re.search(pattern, text), pattern


def test_registry_generator_is_deterministic_and_its_truth_consistent(tmp_path):
    one = gen_registry.generate(5, 45_000, 120, tmp_path / "w1", workers=1)
    two = gen_registry.generate(5, 45_000, 120, tmp_path / "w2", workers=2)
    for k in one["paths"]:
        assert Path(one["paths"][k]).read_bytes() == Path(two["paths"][k]).read_bytes(), k
    truth = {}
    for line in Path(one["paths"]["records_truth"]).read_text().splitlines():
        t = json.loads(line)
        truth[(t["hospital_id"], t["patient_id"])] = t["person"]
    assert len(truth) == 45_000, "a (hospital_id, patient_id) is used twice"
    records = [json.loads(x) for x in Path(one["paths"]["records"]).read_text(encoding="utf-8").splitlines()]
    assert {(r["hospital_id"], r["patient_id"]) for r in records} == set(truth)
    queries = [json.loads(x) for x in Path(one["paths"]["queries"]).read_text(encoding="utf-8").splitlines()]
    qtruth = [json.loads(x) for x in Path(one["paths"]["queries_truth"]).read_text().splitlines()]
    assert len(queries) == len(qtruth) == 120
    kinds = collections.Counter(t["kind"] for t in qtruth)
    assert kinds["existing"] > 60 and kinds["household"] > 5 and kinds["new"] > 5, kinds
    for q, t in zip(queries, qtruth):
        assert (q["hospital_id"], q["patient_id"]) not in truth, "a query reuses a registered key"
        if t["person"] is not None:
            assert t["records"] and all(truth[(k["hospital_id"], k["patient_id"])] == t["person"] for k in t["records"])
            assert q["hospital_id"] not in {k["hospital_id"] for k in t["records"]}, "a query at a hospital the person is at"


@pytest.mark.parametrize("seed", SEEDS)
def test_labelled_pairs_meet_the_acceptance_bar(seed, tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = gen_pairs.write_pairs(path, seed, PAIRS)  # label/phenomenon are extra fields: ignored by the CLI
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_identity(["match", "--pairs", str(path)], work)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    results = parse_results(proc.stdout)
    check_shape(results, [p["pair_id"] for p in pairs])
    assert_acceptance(pairs, results, f"seed {seed}, {PAIRS} pairs")
    # no patient data on stderr, no files left behind (no data dir, no config written)
    for p in pairs[:500]:
        for side in ("a", "b"):
            for key in ("family_name", "given_name", "patient_id", "phone"):
                v = p[side].get(key)
                if v and len(v) >= 2:
                    assert v not in err, f"stderr carries a record's {key}"
    assert list(work.iterdir()) == [], f"identity match left files behind: {list(work.iterdir())}"


def test_same_record_links_and_strangers_are_distinct(tmp_path):
    pm = synth.PairMaker(5)
    lines = []
    for i in range(20):
        p = pm.pop.person(pm.rng)
        r = synth.strip_none(synth.render(p, synth.HOSPITALS[0][1], pm.rng, hospital_id="H1", patient_id=str(i)))
        q = pm.pop.person(pm.rng, sex="F" if p.sex == "M" else "M")
        while q.family_kana == p.family_kana:
            q = pm.pop.person(pm.rng, sex="F" if p.sex == "M" else "M")
        s = synth.strip_none(synth.render(q, synth.HOSPITALS[1][1], pm.rng, hospital_id="H2", patient_id=str(i)))
        lines.append({"pair_id": f"same-{i}", "a": r, "b": dict(r, hospital_id="H2")})
        lines.append({"pair_id": f"other-{i}", "a": r, "b": s})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    proc = run_identity(["match", "--pairs", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
    results = parse_results(proc.stdout)
    check_shape(results, [x["pair_id"] for x in lines])
    for r in results:
        want = "link" if r["pair_id"].startswith("same") else "distinct"
        assert r["decision"] == want, f"{r['pair_id']}: {r['decision']} (score {r['score']})"
    same = min(r["score"] for r in results if r["pair_id"].startswith("same"))
    other = max(r["score"] for r in results if r["pair_id"].startswith("other"))
    assert same > other


def _good_pair(pid: str) -> dict:
    a = {"hospital_id": "H1", "patient_id": "12345", "family_name": "試験", "given_name": "花子",
         "family_kana": "シケン", "given_kana": "ハナコ", "sex": "F", "birth_date": "19800102",
         "address": "神奈川県横浜市港北区日吉1丁目2番3号", "postal_code": "2230061", "phone": "0451234567",
         "insurer_number": "06141234", "insurance_symbol": "1234", "insurance_number": "4567", "insurance_branch": "01"}
    b = dict(a, hospital_id="H2", patient_id="A-0931", family_kana="しけん", given_kana="はなこ",
             birth_date="昭和55年1月2日", phone="045-123-4567")
    return {"pair_id": pid, "a": a, "b": b}


def test_lenient_input_numbers_nulls_and_extra_fields(tmp_path):
    base = _good_pair("strings")
    numbers = json.loads(json.dumps(base))
    numbers["pair_id"] = "numbers"
    for side in ("a", "b"):
        numbers[side]["patient_id"] = 12345 if side == "a" else "A-0931"
        numbers[side]["insurance_symbol"] = 1234
        numbers[side]["insurance_number"] = 4567
        numbers[side]["postal_code"] = 2230061
    numbers["a"]["birth_date"] = 19800102
    nulls = json.loads(json.dumps(base))
    nulls["pair_id"] = "nulls"
    stripped = json.loads(json.dumps(base))
    stripped["pair_id"] = "absent"
    for side in ("a", "b"):
        for k in ("phone", "insurance_branch", "postal_code"):
            nulls[side][k] = None
            del stripped[side][k]
    extra = json.loads(json.dumps(base))
    extra["pair_id"] = "extra"
    extra["label"] = "match"
    extra["note"] = {"nested": [1, 2, {"x": None}]}
    extra["a"]["middle_name"] = "X"
    extra["a"]["visits"] = [1, 2]
    extra["b"]["meta"] = {"source": "test"}
    lines = [base, numbers, nulls, stripped, extra]
    path = tmp_path / "lenient.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    proc = run_identity(["match", "--pairs", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
    results = parse_results(proc.stdout)
    check_shape(results, [x["pair_id"] for x in lines])
    by = {r["pair_id"]: r for r in results}
    assert by["strings"]["decision"] == "link", by["strings"]
    # a number is read as the string of its digits; null is the same as absent; extras are ignored
    assert (by["numbers"]["decision"], by["numbers"]["score"]) == (by["strings"]["decision"], by["strings"]["score"])
    assert (by["nulls"]["decision"], by["nulls"]["score"]) == (by["absent"]["decision"], by["absent"]["score"])
    assert (by["extra"]["decision"], by["extra"]["score"]) == (by["strings"]["decision"], by["strings"]["score"])


@pytest.mark.parametrize("bad_line, bad", [
    (2, "{this is not json, 試験 花子"),
    (3, json.dumps({"pair_id": "no-b", "a": _good_pair("x")["a"]}, ensure_ascii=False)),
    (2, json.dumps({"pair_id": "a-is-text", "a": "試験 花子 19800102", "b": _good_pair("x")["b"]}, ensure_ascii=False)),
])
def test_malformed_line_is_named_by_number_without_content(tmp_path, bad_line, bad):
    good = [_good_pair(f"g{i}") for i in range(4)]
    lines = [json.dumps(g, ensure_ascii=False) for g in good]
    lines.insert(bad_line - 1, bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_identity(["match", "--pairs", str(path)], tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, "a malformed line must make the run fail"
    assert re.search(rf"\bline\D{{0,3}}{bad_line}\b", err), f"stderr does not name line {bad_line}: {err[-1000:]!r}"
    assert "panicked" not in err and "RUST_BACKTRACE" not in err, f"panic: {err[-1000:]}"
    assert proc.returncode not in (-6, 134, 101), f"exit {proc.returncode}: abort/panic"
    for needle in ("試験", "花子", "19800102", "12345"):
        assert needle not in err, f"stderr repeats record content ({needle!r})"
    # whatever is printed is a result for a good line, in order, never for the bad one
    results = parse_results(proc.stdout)
    ids = [g["pair_id"] for g in good]
    got = [r["pair_id"] for r in results]
    assert got == [i for i in ids if i in got], f"printed {got}, good lines were {ids}"
    for r in results:
        assert r["decision"] in DECISIONS


def test_missing_pairs_file_and_bad_model_are_clear_errors(tmp_path):
    proc = run_identity(["match", "--pairs", str(tmp_path / "nope.jsonl")], tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0 and "nope.jsonl" in err and "panicked" not in err, err[-1000:]
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps(_good_pair("g"), ensure_ascii=False) + "\n", encoding="utf-8")
    model = tmp_path / "model.json"
    model.write_text("not a model", encoding="utf-8")
    proc = run_identity(["match", "--pairs", str(pairs), "--model", str(model)], tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0 and "model" in err.lower() and "panicked" not in err, err[-1000:]


def test_config_names_the_model_unless_model_is_given(tmp_path):
    """`--config`: a gatewayd config's `[identity] model` is the model `match` uses (here a
    file that is not there: the error names it); `--model` wins over it; a config without
    one leaves the built-in model (the same answers as no config)."""
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps(_good_pair("g"), ensure_ascii=False) + "\n", encoding="utf-8")
    node = '[node]\nid = "core"\nrole = "core"\ndata_dir = "d"\nmode = "development"\n[booking]\n'
    named = tmp_path / "named.toml"
    named.write_text(node + f'[identity]\nmodel = "{tmp_path / "absent-model.json"}"\n', encoding="utf-8")
    proc = run_identity(["match", "--pairs", str(pairs), "--config", str(named)], tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0 and "absent-model.json" in err, err[-1000:]
    # `--model` wins over the config's: a model learnt from the pair's two records.
    records = tmp_path / "records.jsonl"
    good = _good_pair("g")
    records.write_text("".join(json.dumps(good[k], ensure_ascii=False) + "\n" for k in ("a", "b")),
                       encoding="utf-8")
    learnt = tmp_path / "learnt.json"
    proc = run_identity(["learn", "--records", str(records), "--out", str(learnt)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-1000:]
    proc = run_identity(["match", "--pairs", str(pairs), "--config", str(named), "--model", str(learnt)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-1000:]
    assert len(parse_results(proc.stdout)) == 1
    plain = tmp_path / "plain.toml"
    plain.write_text(node + "[identity]\n", encoding="utf-8")
    bare = run_identity(["match", "--pairs", str(pairs)], tmp_path)
    with_config = run_identity(["match", "--pairs", str(pairs), "--config", str(plain)], tmp_path)
    assert bare.returncode == 0 and with_config.returncode == 0, with_config.stderr.decode("utf-8", "replace")
    assert parse_results(with_config.stdout) == parse_results(bare.stdout)


def test_model_learnt_from_a_registry_meets_the_bar(tmp_path):
    """`identity learn` on 50,000 registry records (EM), then `match --model` on the pairs."""
    reg = gen_registry.generate(17, 50_000, 0, tmp_path / "reg", workers=2)
    model = tmp_path / "model.json"
    proc = run_identity(["learn", "--records", reg["paths"]["records"], "--out", str(model)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
    json.loads(model.read_text(encoding="utf-8"))  # the model is JSON
    path = tmp_path / "pairs.jsonl"
    pairs = gen_pairs.write_pairs(path, SEEDS[0], PAIRS)
    proc = run_identity(["match", "--pairs", str(path), "--model", str(model)], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
    results = parse_results(proc.stdout)
    check_shape(results, [p["pair_id"] for p in pairs])
    assert_acceptance(pairs, results, f"learnt model, seed {SEEDS[0]}")
