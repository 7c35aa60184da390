"""`gatewayd safety read-rdsr FILE...` on real vendors' CT dose reports (issue 18, acceptance:
"dose extraction from real vendors' CT RDSR files matches the values those files carry").

The files are the sample dose reports in OpenREM's source package on PyPI (GPLv3: never
committed): setup downloads `openrem==0.10.0` with the venv's pip and extracts
`openrem/remapp/tests/test_files/*.dcm` into hw-tests/.cache/openrem-0.10.0/ (git-ignored);
a failed download is a test failure, never a skip. Each CT report is read a second time here
with pydicom, walking the Content Sequence in Python independently of the Rust reader
(TID 10011: CT Acquisition 113819 -> Irradiation Event UID 113769, Target Region 123014,
CT Dose 113829 -> Mean CTDIvol 113830, DLP 113838; CT Accumulated Dose Data 113811 ->
113812, 113813), and every event and total is compared within rounding. Projection X-ray
dose reports, images and a non-dose SR must read as `dose_report: null`; truncated copies of
a real report as an error with exit status 1, never a crash. The output must not carry the
patient's name, id or birth date.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pydicom
import pytest

import gw

OPENREM = "openrem==0.10.0"
CACHE = Path(__file__).resolve().parent / ".cache" / "openrem-0.10.0"
MEMBER_DIR = "openrem/remapp/tests/test_files/"
CT_REPORTS = [
    "CT-RDSR-Siemens-Multi-1.dcm", "CT-RDSR-Siemens-Multi-2.dcm", "CT-RDSR-Siemens-Multi-3.dcm",
    "CT-RDSR-Siemens-Continued-1.dcm", "CT-RDSR-Siemens-Continued-2.dcm",
    "CT-RDSR-Siemens_Flash-TAP-SS.dcm", "CT-RDSR-Siemens_Flash-QA-DS.dcm",
    "CT-RDSR-Toshiba_MultiValSD.dcm", "CT-RDSR-ToshibaPixelMed.dcm", "CT-RDSR-Toshiba_DoseCheck.dcm",
    "CT-RDSR-Philips_BigBore4DCT.dcm", "CT-RDSR-GEPixelMed.dcm",
    # GE's Enhanced SR dose reports (SOP class 88.22, same template).
    "CT-ESR-GE_Optima.dcm", "CT-ESR-GE_VCT.dcm",
]
TIMEOUT_S = 120

# Units to mGy / mGy.cm, as this test understands them (`mGycm`: Siemens Flash, GE ESR).
DOSE_UNITS = {"mGy": 1.0, "Gy": 1000.0, "cGy": 10.0}
DLP_UNITS = {"mGy.cm": 1.0, "mGycm": 1.0, "Gy.cm": 1000.0, "cGy.cm": 10.0}


@pytest.fixture(scope="session")
def openrem_files() -> Path:
    """The OpenREM sample files, downloaded once into the cache."""
    if CACHE.is_dir() and any(CACHE.glob("*.dcm")):
        return CACHE
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", OPENREM, "--no-deps", "--no-binary", ":all:",
               "-d", tmp]
        got = subprocess.run(pip, capture_output=True, text=True, timeout=600)
        if got.returncode != 0:
            pytest.fail(f"cannot download {OPENREM} from the package index (pip exit {got.returncode}): "
                        f"{got.stderr.strip()[-800:]}")
        sdists = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if not sdists:
            pytest.fail(f"pip downloaded no source archive of {OPENREM}: {os.listdir(tmp)}")
        staging = Path(tmp) / "files"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                if m.isfile() and MEMBER_DIR in m.name and m.name.endswith(".dcm"):
                    src = tar.extractfile(m)
                    assert src is not None
                    (staging / Path(m.name).name).write_bytes(src.read())
        if not any(staging.glob("*.dcm")):
            pytest.fail(f"{OPENREM}'s source archive has no {MEMBER_DIR}*.dcm")
        if not CACHE.exists():
            staging.rename(CACHE)
    return CACHE


def read_rdsr(files: list[Path]) -> tuple[int, list[dict], str]:
    """Runs `gatewayd safety read-rdsr` (no config, no daemon); exit status, JSON lines, stdout."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    got = subprocess.run([gw.gatewayd_binary(), "safety", "read-rdsr", *map(str, files)],
                         capture_output=True, timeout=TIMEOUT_S, env=env)
    assert got.returncode >= 0, f"gatewayd died of signal {-got.returncode}: {got.stderr.decode()[-2000:]}"
    out = got.stdout.decode("utf-8")
    lines = []
    for n, line in enumerate(out.splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AssertionError(f"output line {n} is not JSON ({e}): {line[:200]!r}") from None
    assert len(lines) == len(files), f"{len(lines)} lines for {len(files)} files: {out[-2000:]}"
    for line, f in zip(lines, files):
        assert line["file"] == str(f), f"lines out of order: {line['file']} for {f}"
        assert set(line) == {"file", "dose_report", "error"}, line.keys()
    return got.returncode, lines, out


# --- the test's own reading with pydicom -------------------------------------------------

def concept(item) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].get("CodeValue", "")).strip(), str(seq[0].get("CodingSchemeDesignator", "")).strip())


def is_dcm(item, code: str) -> bool:
    return concept(item) == (code, "DCM")


def children(item):
    return list(item.get("ContentSequence") or [])


def number(item, units: dict[str, float], what: str, name: str) -> float | None:
    mvs = item.get("MeasuredValueSequence")
    if not mvs:
        return None
    mv = mvs[0]
    raw = mv.get("NumericValue")
    if raw is None or raw == "":
        return None
    value = float(raw[0] if isinstance(raw, pydicom.multival.MultiValue) else raw)
    unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue).strip()
    assert unit in units, f"{name}: {what} in units {unit!r} this test does not know"
    return value * units[unit]


def pydicom_reading(path: Path) -> dict:
    """Events and totals of a CT dose report, read with pydicom."""
    ds = pydicom.dcmread(path)
    assert is_dcm(ds, "113701"), f"{path.name} is not an X-Ray Radiation Dose Report"
    events, accumulated = [], []

    def walk(item):
        for c in children(item):
            if is_dcm(c, "113819"):
                events.append(c)
            elif is_dcm(c, "113811"):
                accumulated.append(c)
            else:
                walk(c)
    walk(ds)
    out_events = []
    for ev in events:
        e = {"event_uid": None, "ctdivol_mgy": None, "dlp_mgy_cm": None, "target_region": None}
        for c in children(ev):
            if is_dcm(c, "113769"):
                e["event_uid"] = str(c.UID).strip()
            elif is_dcm(c, "123014"):
                seq = c.get("ConceptCodeSequence")
                if seq:
                    e["target_region"] = {"value": str(seq[0].CodeValue).strip(),
                                          "scheme": str(seq[0].CodingSchemeDesignator).strip(),
                                          "meaning": str(seq[0].CodeMeaning).strip()}
            elif is_dcm(c, "113829"):
                for d in children(c):
                    if is_dcm(d, "113830"):
                        e["ctdivol_mgy"] = number(d, DOSE_UNITS, "Mean CTDIvol", path.name)
                    elif is_dcm(d, "113838"):
                        e["dlp_mgy_cm"] = number(d, DLP_UNITS, "DLP", path.name)
        out_events.append(e)
    acc = None
    if accumulated:
        acc = {"total_events": None, "total_dlp_mgy_cm": None}
        for c in children(accumulated[0]):
            if is_dcm(c, "113812"):
                n = number(c, {"{events}": 1.0, "1": 1.0}, "Total Number of Irradiation Events", path.name)
                acc["total_events"] = None if n is None else int(n)
            elif is_dcm(c, "113813"):
                acc["total_dlp_mgy_cm"] = number(c, DLP_UNITS, "CT Dose Length Product Total", path.name)
    return {"events": out_events, "accumulated": acc, "ds": ds}


def json_strings(value):
    """Every string value in a JSON document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# --- tests ---------------------------------------------------------------------------------

def test_ct_dose_reports_of_four_vendors_match_an_independent_reading(openrem_files):
    files = [openrem_files / name for name in CT_REPORTS]
    missing = [f.name for f in files if not f.is_file()]
    assert not missing, f"the OpenREM package lacks {missing}"
    rc, lines, out = read_rdsr(files)
    assert rc == 0, f"exit {rc}: {[(l['file'], l['error']) for l in lines if l['error']]}"
    compared_events, manufacturers = 0, set()
    for f, line in zip(files, lines):
        assert line["error"] is None, f"{f.name}: {line['error']}"
        report = line["dose_report"]
        assert report is not None, f"{f.name}: read as not a dose report"
        want = pydicom_reading(f)
        ds = want["ds"]
        assert report["sop_instance_uid"] == str(ds.SOPInstanceUID), f.name
        assert report["study_instance_uid"] == str(ds.StudyInstanceUID), f.name
        assert report["accession_number"] == (str(ds.get("AccessionNumber", "")).strip() or None), f.name
        manufacturers.add(str(report["manufacturer"]).split()[0].upper())
        assert len(report["events"]) == len(want["events"]), \
            f"{f.name}: {len(report['events'])} events, pydicom finds {len(want['events'])}"
        for i, (got, exp) in enumerate(zip(report["events"], want["events"])):
            where = f"{f.name} event {i + 1}"
            assert got["event_uid"] == exp["event_uid"], f"{where}: UID {got['event_uid']} != {exp['event_uid']}"
            assert same(got["ctdivol_mgy"], exp["ctdivol_mgy"]), \
                f"{where}: CTDIvol {got['ctdivol_mgy']} != {exp['ctdivol_mgy']}"
            assert same(got["dlp_mgy_cm"], exp["dlp_mgy_cm"]), f"{where}: DLP {got['dlp_mgy_cm']} != {exp['dlp_mgy_cm']}"
            assert got["target_region"] == exp["target_region"], \
                f"{where}: target region {got['target_region']} != {exp['target_region']}"
            compared_events += 1
        exp_acc, got_acc = want["accumulated"], report["accumulated"]
        assert (got_acc is None) == (exp_acc is None), f"{f.name}: accumulated {got_acc} vs {exp_acc}"
        if exp_acc is not None:
            assert got_acc["total_events"] == exp_acc["total_events"], f"{f.name}: {got_acc} vs {exp_acc}"
            assert same(got_acc["total_dlp_mgy_cm"], exp_acc["total_dlp_mgy_cm"]), f"{f.name}: {got_acc} vs {exp_acc}"
        # Nothing of the patient module in the output.
        printed = json.dumps(report, ensure_ascii=False)
        assert "patient" not in printed.lower() and "birth" not in printed.lower(), f"{f.name}: {printed[:300]}"
        strings = set(json_strings(line))
        for key in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(key, "")).strip()
            if value:
                assert value not in strings, f"{f.name}: {key} printed"
        assert str(ds.PatientName) not in printed, f"{f.name}: PatientName printed"
    assert manufacturers >= {"SIEMENS", "TOSHIBA", "PHILIPS", "GE"}, manufacturers
    # 14 reports, 67 irradiation events in OpenREM 0.10.0's samples.
    assert compared_events >= 60, compared_events
    print(f"compared {compared_events} events and {len(files)} totals from {sorted(manufacturers)}")


def test_every_other_sample_file_is_not_a_ct_dose_report(openrem_files):
    others = sorted(f for f in openrem_files.glob("*.dcm") if f.name not in CT_REPORTS)
    # Projection X-ray dose reports (DX, RF, MG), images, a secondary capture, a non-dose SR.
    names = {f.name for f in others}
    assert {"ESR_non-dose.dcm", "CT-SC-Philips_Brilliance16P.dcm", "DX-RDSR-Canon_CXDI.dcm",
            "RF-RDSR-Siemens-Zee.dcm", "MG-RDSR-Hologic_2D.dcm", "DX-Im-GE_XR220-1.dcm"} <= names, names
    assert len(others) >= 20, [f.name for f in others]
    rc, lines, _ = read_rdsr(others)
    assert rc == 0, [(l["file"], l["error"]) for l in lines if l["error"]]
    for f, line in zip(others, lines):
        assert line["error"] is None and line["dose_report"] is None, f"{f.name}: {line}"


def test_truncated_copies_of_a_real_report_are_errors_not_crashes(openrem_files, tmp_path):
    good = openrem_files / "CT-RDSR-Siemens_Flash-QA-DS.dcm"
    data = good.read_bytes()
    # Every cut falls inside the Content Sequence (the last top-level element).
    cuts = [len(data) // 3, len(data) // 2, 3 * len(data) // 4, len(data) - 9, len(data) - 1]
    truncated = []
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(data[:cut])
        truncated.append(path)
    rc, lines, _ = read_rdsr([*truncated, good])
    assert rc == 1, f"exit {rc} with truncated files"
    for f, line in zip(truncated, lines[:-1]):
        assert line["dose_report"] is None and line["error"], f"{f.name}: {line}"
        assert "malformed" in line["error"], f"{f.name}: {line['error']}"
    # The good file in the same run is still read.
    assert lines[-1]["error"] is None and lines[-1]["dose_report"]["events"], lines[-1]
    # And alone, the good file exits 0.
    rc, _, _ = read_rdsr([good])
    assert rc == 0


def test_cumulative_reports_carry_each_event_under_one_uid(openrem_files):
    """Siemens sends a growing report per study (Multi-1 has event 1, Multi-2 events 1-2,
    Multi-3 events 1-3): the reader must give each event the same UID and values in every
    report, so de-duplicating by Irradiation Event UID, in any order, gives Multi-3's total."""
    files = [openrem_files / f"CT-RDSR-Siemens-Multi-{n}.dcm" for n in (3, 1, 2)]
    rc, lines, _ = read_rdsr(files)
    assert rc == 0
    by_uid: dict[str, float] = {}
    for f, line in zip(files, lines):
        for e in line["dose_report"]["events"]:
            if e["event_uid"] in by_uid:
                assert same(by_uid[e["event_uid"]], e["dlp_mgy_cm"]), f"{f.name}: {e['event_uid']} changed"
            by_uid[e["event_uid"]] = e["dlp_mgy_cm"]
    assert [len(l["dose_report"]["events"]) for l in lines] == [3, 1, 2]
    assert len(by_uid) == 3, sorted(by_uid)
    total = lines[0]["dose_report"]["accumulated"]["total_dlp_mgy_cm"]
    assert same(sum(by_uid.values()), total), (sum(by_uid.values()), total)
