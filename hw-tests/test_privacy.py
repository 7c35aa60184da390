"""No patient data at rest in clear, none in logs or metrics.

Pins: after storing a synthetic set with distinctive fake patient names and
IDs, no byte of any file under data_dir (blobs, index, temp files, WAL) holds
any PatientName, its family-name part or any PatientID as ASCII, neither while
the daemon runs nor after a clean stop; the daemon's log and /metrics hold
none of them either.
"""

from __future__ import annotations

from pathlib import Path

import data
import scu


def _needles(files: list[data.SyntheticFile]) -> list[bytes]:
    out = {data.FAKE_FAMILY_NAME.encode()}
    for f in files:
        out.add(f.patient_name.encode())
        out.add(f.patient_id.encode())
    return sorted(out)


def _leaks_in_dir(root: Path, needles: list[bytes]) -> list[str]:
    leaks = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        blob = p.read_bytes()
        for n in needles:
            if n in blob:
                leaks.append(f"{p.relative_to(root)} contains {n.decode()!r}")
    return leaks


def _store_set(gateway, tmp_path) -> list[data.SyntheticFile]:
    files = data.make_ct_set(20, tmp_path / "small", "small", start=500)
    files += data.make_ct_set(5, tmp_path / "ct", "ct", start=600)
    r = scu.storescu(gateway.dicom_port, [f.path for f in files[:15]])
    assert r.returncode == 0, r.stdout + r.stderr
    statuses = scu.store_files(gateway.dicom_port, [f.path for f in files[15:]])
    assert all(s == 0x0000 for s in statuses.values()), statuses
    assert gateway.status()["objects"] == len(files)
    return files


def test_data_dir_holds_no_patient_name_or_id_in_clear(gateway, tmp_path):
    files = _store_set(gateway, tmp_path)
    needles = _needles(files)
    files_seen = gateway.data_files()
    assert files_seen, f"nothing written under {gateway.data_dir}"
    leaks = _leaks_in_dir(gateway.data_dir, needles)
    assert not leaks, "patient data in clear under data_dir while running:\n" + "\n".join(leaks[:50])

    assert gateway.stop() == 0
    leaks = _leaks_in_dir(gateway.data_dir, needles)
    assert not leaks, "patient data in clear under data_dir after stop:\n" + "\n".join(leaks[:50])


def test_log_and_metrics_hold_no_patient_name_or_id(gateway, tmp_path):
    files = _store_set(gateway, tmp_path)
    needles = _needles(files)
    metrics = gateway.metrics_text().encode()
    assert gateway.stop() == 0
    log = gateway.log_bytes()
    own = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith(b"===== hw-tests")]
    assert own, "gatewayd logged nothing at all, so this check would be vacuous (expected start/stop lines)"
    in_log = [n.decode() for n in needles if n in log]
    assert not in_log, f"patient data in the gatewayd log: {in_log[:20]}"
    in_metrics = [n.decode() for n in needles if n in metrics]
    assert not in_metrics, f"patient data in /metrics: {in_metrics[:20]}"
