"""The core's Modality Worklist, queried by DCMTK's `findscu -W` as a scanner would.

Exams are booked through a clinic's kiosk (a core and a clinic `gatewayd` on a real
mosquitto, `kiosk.Region`), then the core's DICOM listener (same port and AE title as for
C-STORE) answers C-FIND for the Modality Worklist information model. Queries are DICOM files
made with pydicom (so that a kanji query is encoded in ISO 2022 IR 87 exactly as a Japanese
scanner sends it); responses are extracted by `findscu -X` and read back with pydicom.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

import fleet
import kiosk
import scu
from conftest import fail_on_assertion

PATIENTS = [
    {"id": "ZZPIDW1", "name": "ZZTEST^HANAKO=山田^花子=やまだ^はなこ", "birth_date": "1961-04-02", "gender": "female"},
    {"id": "ZZPIDW2", "name": "ZZTEST^TARO=鈴木^太郎=すずき^たろう", "birth_date": "1970-01-15", "gender": "male"},
    {"id": "ZZPIDW3", "name": "ZZOTHER^JIRO=佐藤^次郎=さとう^じろう", "birth_date": "1980-12-31", "gender": "male"},
]


@pytest.fixture
def broker(tmp_path, ca):
    fail_on_assertion(fleet.require_tools)
    b = fail_on_assertion(fleet.Broker, tmp_path / "broker", ca, acl=kiosk.REGIONAL_ACL)
    fail_on_assertion(b.start)
    yield b
    b.stop()


@pytest.fixture
def booked(gateway_factory, broker):
    """A region with three exams booked from the clinic: two on CT (different days), one on
    MR. Returns (region, [(patient, appointment resource, slot)])."""
    missing = scu.missing_dcmtk_tools()
    assert not missing, f"DCMTK tools missing: {missing}; hw-tests/run-all.sh installs dcmtk"
    region = kiosk.Region(gateway_factory, broker).start()
    clerk = region.staff_session("clinic-a", "clerk.wl")
    ct = kiosk.wait_until(lambda: (b := clerk.slots("ct-1"))["total"] > 60 and b, 30, "CT slots")["entry"]
    mr = kiosk.wait_until(lambda: (b := clerk.slots("mr-1"))["total"] > 3 and b, 30, "MR slots")["entry"]
    first_ct = ct[2]["resource"]
    # A CT slot on a later local day than the first one.
    later_ct = next(e["resource"] for e in ct if e["resource"]["start"][:10] > first_ct["start"][:10])
    chosen = [(PATIENTS[0], first_ct), (PATIENTS[1], later_ct), (PATIENTS[2], mr[3]["resource"])]
    out = []
    for i, (patient, slot) in enumerate(chosen):
        r = clerk.book(f"req-wl-{i}", slot["id"], patient)
        assert r.status == 201, r
        out.append((patient, r.json(), slot))
    return region, out


def accession(appointment: dict) -> str:
    return next(i["value"] for i in appointment["identifier"] if i["system"] == "urn:gatewayd:accession")


def da(rfc3339: str) -> str:
    return rfc3339[:10].replace("-", "")


def query(tmp_path: Path, name: str, *, charset: list[str] | None = None, patient_name: str = "",
          accession_number: str = "", modality: str = "", date: str = "", station: str = "",
          alert_keys: bool = False) -> Path:
    """A worklist query file with the usual return keys (and, with `alert_keys`, Medical
    Alerts (0010,2000) and Contrast Allergies (0010,2110), zero length: return keys)."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    if alert_keys:
        ds.MedicalAlerts = ""
        ds.Allergies = ""  # (0010,2110): "Contrast Allergies" in older editions
    ds.PatientName = patient_name
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = accession_number
    ds.RequestedProcedureID = ""
    ds.RequestedProcedureDescription = ""
    sps = Dataset()
    sps.Modality = modality
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepStartDate = date
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProcedureStepDescription = ""
    sps.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = [sps]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def findscu(port: int, q: Path, out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["findscu", "-W", "-aet", "CT01", "-aec", "GATEWAY", "-X", "-od", str(out),
                        "127.0.0.1", str(port), str(q)],
                       capture_output=True, text=True, timeout=60, env=scu.dcmtk_env())
    assert r.returncode == 0, f"findscu failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def values(ds: Dataset, keyword: str) -> list[str]:
    """The values of a multi-valued text attribute ([] when zero length); the attribute
    must be in the response."""
    assert keyword in ds, f"{keyword} missing from the worklist response"
    v = ds[keyword].value
    if v is None or (isinstance(v, str) and v == ""):
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def worklist_alerts(port: int, tmp_path: Path, accession_number: str, *,
                    charset: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`findscu -W` for one exam by accession, asking for Medical Alerts (0010,2000) and
    Contrast Allergies (0010,2110) as a scanner does: returns (medical alerts, contrast
    allergies) of the single matching item (each [] when the exam has none). Fails unless
    exactly one item matches and both attributes are in the response."""
    name = f"alerts-{accession_number}-{'-'.join(charset or ['default']).replace(' ', '_')}"
    got = findscu(port, query(tmp_path, name, accession_number=accession_number, charset=charset,
                              alert_keys=True), tmp_path / name)
    assert len(got) == 1, f"{len(got)} worklist items for one accession"
    return values(got[0], "MedicalAlerts"), values(got[0], "Allergies")


def accessions(responses: list[Dataset]) -> list[str]:
    return sorted(str(d.AccessionNumber) for d in responses)


def test_a_booking_made_at_the_clinic_is_on_the_cores_worklist(booked, tmp_path):
    region, exams = booked
    patient, appointment, slot = exams[0]
    got = findscu(region.core.dicom_port, query(tmp_path, "by-acc", accession_number=accession(appointment)),
                  tmp_path / "r1")
    assert len(got) == 1, got
    item = got[0]
    assert item.AccessionNumber == accession(appointment)
    assert item.PatientID == patient["id"]
    assert item.PatientBirthDate == patient["birth_date"].replace("-", "")
    sps = item.ScheduledProcedureStepSequence[0]
    assert (sps.Modality, sps.ScheduledStationAETitle) == ("CT", "CT01")
    assert sps.ScheduledProcedureStepStartDate == da(slot["start"])
    assert sps.ScheduledProcedureStepStartTime.startswith(slot["start"][11:16].replace(":", ""))
    # Safety alerts are return keys only when asked for; this exam was booked without any,
    # so both come back present and empty (in the default and in a Japanese character set).
    assert "MedicalAlerts" not in item and "Allergies" not in item
    port = region.core.dicom_port
    assert worklist_alerts(port, tmp_path, accession(appointment)) == ([], [])
    assert worklist_alerts(port, tmp_path, accession(appointment), charset=["", "ISO 2022 IR 87"]) == ([], [])
    # The clinic sees it booked.
    clerk = region.staff_session("clinic-a", "clerk.wl2")
    mine = clerk.request("GET", f"/fhir/Appointment?patient={patient['id']}").json()["entry"]
    assert [e["resource"]["status"] for e in mine] == ["booked"]


def test_worklist_matching_universal_ranges_wildcards_and_a_kanji_query(booked, tmp_path):
    region, exams = booked
    port = region.core.dicom_port
    acc = [accession(a) for _, a, _ in exams]
    day1, day2 = da(exams[0][2]["start"]), da(exams[1][2]["start"])

    # Universal matching: every booked exam.
    assert accessions(findscu(port, query(tmp_path, "all"), tmp_path / "all")) == sorted(acc)
    # Single value on modality.
    assert accessions(findscu(port, query(tmp_path, "mr", modality="MR"), tmp_path / "mr")) == [acc[2]]
    # Date range: only the first CT day (closed range), and from the second day on (open end).
    assert accessions(findscu(port, query(tmp_path, "d1", modality="CT", date=f"{day1}-{day1}"),
                              tmp_path / "d1")) == [acc[0]]
    assert accessions(findscu(port, query(tmp_path, "d2", modality="CT", date=f"{day2}-"),
                              tmp_path / "d2")) == [acc[1]]
    # Wildcards on the alphabetic name and on the accession number.
    assert accessions(findscu(port, query(tmp_path, "w1", patient_name="ZZTEST*"), tmp_path / "w1")) \
        == sorted(acc[:2])
    assert accessions(findscu(port, query(tmp_path, "w2", accession_number=acc[2][:2] + "?" + acc[2][3:]),
                              tmp_path / "w2")) == [acc[2]]
    assert accessions(findscu(port, query(tmp_path, "w3", accession_number=acc[0][:4] + "*"),
                              tmp_path / "w3")) == sorted(a for a in acc if a.startswith(acc[0][:4]))
    assert findscu(port, query(tmp_path, "none", patient_name="NOBODY*"), tmp_path / "none") == []

    # A Japanese scanner: the query in ISO 2022 IR 87 on the ideographic name.
    out = tmp_path / "kanji"
    got = findscu(port, query(tmp_path, "kanji", charset=["", "ISO 2022 IR 87"], patient_name="=山田*"), out)
    assert accessions(got) == [acc[0]]
    item = got[0]
    assert list(item.SpecificCharacterSet) == ["", "ISO 2022 IR 87"], item.SpecificCharacterSet
    assert item.PatientName.ideographic == "山田^花子", item.PatientName
    assert item.PatientName.alphabetic == "ZZTEST^HANAKO"
    raw = next(out.glob("rsp*.dcm")).read_bytes()
    assert "山田".encode("iso2022_jp") in raw, "the name is ISO 2022 IR 87 on the wire"


def test_alert_values_are_read_one_per_dicom_value(tmp_path):
    """`values` (used by `worklist_alerts`) on a file as findscu writes it: a multi-valued
    LO in ISO 2022 IR 87 comes back one string per alert, a zero-length one as []."""
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.MedicalAlerts = ["Contrast reaction: iohexol (SV)", "Contrast reaction: イオパミドール"]
    ds.Allergies = "造影剤"
    ds.PatientID = ""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "rsp.dcm"
    ds.save_as(path, enforce_file_format=False)
    back = dcmread(path, force=True)
    assert values(back, "MedicalAlerts") == ["Contrast reaction: iohexol (SV)", "Contrast reaction: イオパミドール"]
    assert values(back, "Allergies") == ["造影剤"]
    back.Allergies = ""
    assert values(back, "Allergies") == []
    with pytest.raises(AssertionError):
        values(back, "PatientComments")
