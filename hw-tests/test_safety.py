"""Safety before the exam (issue 18), end to end with real peers: the core `gatewayd` with
`[identity]` and `[safety]`, its HL7 listener fed by a hospital's HIS over MLLP (ADT^A01,
ADT^A60 IAM), a clinic gateway booking through a real mosquitto, the core's RIS as a real
MLLP peer (OMG^O19), DCMTK `findscu -W` as the scanner asking for its worklist, and real
vendors' CT dose reports (OpenREM's sample RDSRs, fetched in setup, never committed) sent
with DCMTK `storescu` to the core's DICOM listener.

- a contrast reaction recorded at hospital A over HL7 is a warning when clinic B books the
  linked patient; the booking does not proceed until a physician acknowledges it (a clerk
  cannot); the acknowledgement is audited; the RIS order carries it as AL1 and the worklist
  item as Contrast Allergies / Medical Alerts; an IAM delete removes it; with the consent
  revoked nothing is shown and the suppression is in the core's audit trail;
- dose reports from several vendors, sent in another order, twice, and as a study continued
  over two reports, add up to the same cumulative DLP, each event once, shown with the next
  CT booking and warned about over the threshold; a malformed SR is stored (C-STORE success:
  it is durable) and reported, not crashed on;
- `gatewayd safety show` answers an operator by the person's opaque reference, audited;
- no patient data in the gateway's log, and none in clear under its data folder.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest
from pydicom import dcmread

import gw
import hl7
import kiosk
import scu
from hl7msg import MllpConnection, msa
from test_booking import broker  # noqa: F401  (the regional broker fixture)
from test_identity import adt, audit_records, consent
from test_safety_rdsr import openrem_files, pydicom_reading  # noqa: F401  (the real RDSRs, fetched)
from test_kiosk_page import JST, chromium  # noqa: F401  (headless Chromium)
from test_worklist import worklist_alerts

CORE = "core-1"
CLINIC = "clinic-a"
HOSP_A = "HOSP-A"
PERSON_SYSTEM = "urn:gateway:person"
THRESHOLD = 1000.0  # mGy·cm

TARO_A = {"id": "A-0931", "family": "髙橋", "given": "太郎", "family_kana": "タカハシ", "given_kana": "タロウ",
          "birth": "19800102", "sex": "M", "address": "東京都千代田区千代田一丁目2番3号^^千代田区^東京都^1000001",
          "phone": "03-1234-5678"}
# The same man at the clinic (its own id), as its kiosk books him.
TARO_CLINIC = {"id": "C-0077", "name": "TAKAHASHI^TARO=高橋^太郎=タカハシ^タロウ", "birth_date": "1980-01-02",
               "gender": "male"}


def a60(control: str, p: dict, iam: list[str]) -> bytes:
    segments = [
        f"MSH|^~\\&|HIS|{HOSP_A}|GATEWAYD|{CORE}|20261206090000||ADT^A60^ADT_A60|{control}|P|2.5"
        "||||||UNICODE UTF-8",
        "EVN|A60|20261206090000",
        f"PID|1||{p['id']}^^^{HOSP_A}^PI||{p['family']}^{p['given']}^^^^^L^I||{p['birth']}|{p['sex']}",
        *iam,
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def iam(set_id: int, action: str, uid: str, allergen: str = "^イオヘキソール（オムニパーク）^L",
        severity: str = "SV", reaction: str = "蕁麻疹~呼吸困難", onset: str = "20240301") -> str:
    """IAM: type DA (drug), allergen, severity, reactions, action (A/U/D), unique id, onset."""
    return f"IAM|{set_id}|DA|{allergen}|{severity}|{reaction}|{action}|{uid}||||{onset}"


def send(port: int, *messages: bytes) -> list[bytes]:
    acks = []
    with MllpConnection(port) as c:
        for m in messages:
            acks.append(c.request(m))
    return acks


@pytest.fixture
def region(gateway_factory, broker, tmp_path):  # noqa: F811
    from test_hl7_forward import Peer

    missing = scu.missing_dcmtk_tools()
    assert not missing, f"DCMTK tools missing: {missing}; hw-tests/run-all.sh installs dcmtk"
    ris = Peer(tmp_path / "ris", None).start()
    hl7_port = gw.free_port()
    r = kiosk.Region(gateway_factory, broker, clinics=(CLINIC,), core=CORE, core_extra={
        "hl7": {"listen": f"127.0.0.1:{hl7_port}"},
        "identity": {"hospital_id": CORE},
        "safety": {"dose_window_days": 36500, "dlp_threshold_mgy_cm": THRESHOLD},
        "uplink": [{"name": "ris", "kind": "mllp-tls", "url": f"mllp://127.0.0.1:{ris.port}"}],
    })
    r.hl7_port = hl7_port
    r.ris = ris
    try:
        yield r.start()
    finally:
        ris.stop()


def free_slots(k: kiosk.Kiosk, schedule: str, n: int) -> list[str]:
    got = kiosk.wait_until(lambda: (b := k.slots(schedule))["total"] >= n + 2 and b, 30, f"{schedule} slots")
    return [e["resource"]["id"] for e in got["entry"][2:2 + n]]


def warnings_of(r: kiosk.Response) -> list[dict]:
    """The warnings of a 409 answer: one OperationOutcome issue per warning."""
    assert r.status == 409, r
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return [i for i in body["issue"] if i["severity"] == "warning"]


def warning_ids(r: kiosk.Response) -> list[str]:
    return [i["details"]["coding"][0]["code"] for i in warnings_of(r)]


def person_of(doctor: kiosk.Kiosk, hospital: str, pid: str) -> str:
    ident = urllib.parse.quote(f"urn:gateway:hospital:{hospital}|{pid}")
    r = doctor.request("GET", f"/fhir/Patient/$ihe-pix?sourceIdentifier={ident}")
    assert r.status == 200, r
    for p in r.json().get("parameter", []):
        v = p.get("valueIdentifier", {})
        if v.get("system") == PERSON_SYSTEM:
            return v["value"]
    raise AssertionError(f"no person in {r.json()}")


def link(doctor: kiosk.Kiosk, a: tuple[str, str], b: tuple[str, str]) -> None:
    r = doctor.request("POST", "/api/identity/link", {"a": {"hospital_id": a[0], "patient_id": a[1]},
                                                      "b": {"hospital_id": b[0], "patient_id": b[1]}})
    assert r.status == 200, r


def reaction_at_hospital_a(region, clerk: kiosk.Kiosk, core_doctor: kiosk.Kiosk) -> None:
    """Hospital A registers the man; the clinic books him once on MR (no reaction known
    anywhere yet): both are now source records, linked by a physician at the core; he consents
    to share reactions and dose; then hospital A's HIS records a severe reaction to iohexol
    (ADT^A60, IAM action A)."""
    acks = send(region.hl7_port, adt("A01", "a-1", HOSP_A, TARO_A))
    assert msa(acks[0])[0] == "AA", acks
    mr = free_slots(clerk, "mr-1", 1)
    r = clerk.book("req-s-0", mr[0], TARO_CLINIC)
    assert r.status == 201, r
    link(core_doctor, (HOSP_A, TARO_A["id"]), (CLINIC, TARO_CLINIC["id"]))
    consent(core_doctor, HOSP_A, TARO_A["id"], kinds=("reactions", "dose"))
    acks = send(region.hl7_port, a60("a-2", TARO_A, [iam(1, "A", "ALG-1")]))
    assert msa(acks[0])[0] == "AA", acks


def test_a_reaction_at_hospital_a_is_a_warning_at_clinic_b_acknowledged_by_a_physician_and_carried_to_ris_and_worklist(
        region, tmp_path):
    core = region.core
    core_doctor = region.staff_session(CORE, "dr.core", "physician")
    clerk = region.staff_session(CLINIC, "clerk.b")
    doctor = region.staff_session(CLINIC, "dr.b", "physician")
    ct = free_slots(clerk, "ct-1", 6)
    reaction_at_hospital_a(region, clerk, core_doctor)
    first = kiosk.wait_until(lambda: (r := clerk.book("req-s-1", ct[0], TARO_CLINIC)).status == 409 and r, 20,
                             "the contrast reaction warned about at the clinic")
    issues = warnings_of(first)
    assert len(issues) == 1, issues
    text = json.dumps(issues, ensure_ascii=False)
    assert "イオヘキソール" in text and HOSP_A in text and "2024" in text, text
    ids = warning_ids(first)
    # Not booked: the slot is still free, and a clerk cannot acknowledge.
    assert ct[0] in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]]
    assert clerk.book("req-s-1", ct[0], TARO_CLINIC, ack=ids).status == 403
    # A physician acknowledges: booked, audited at the clinic.
    done = doctor.book("req-s-1", ct[0], TARO_CLINIC, ack=ids)
    assert done.status == 201, done
    accession = next(i["value"] for i in done.json()["identifier"] if i["system"] == "urn:gatewayd:accession")
    clinic_actions = [rec["action"] for rec in audit_records(region.gateways[CLINIC])]
    assert "safety_acknowledged" in clinic_actions, clinic_actions

    # The core's RIS gets the order with the reaction as AL1.
    omg = kiosk.wait_until(lambda: [m for _, m in region.ris.received() if accession.encode() in m], 20,
                           "the OMG^O19 of the acknowledged booking at the RIS")
    msg = hl7.parse(omg[0].decode("utf-8").replace("\r\n", "\r"))
    al1 = msg.segment("AL1")
    assert str(al1[2]) == "DA" and "イオヘキソール" in str(al1[3]) and str(al1[4]) == "SV", str(al1)
    # The scanner's worklist item carries the allergy flag.
    alerts, allergies = worklist_alerts(core.dicom_port, tmp_path, accession)
    assert any("イオヘキソール" in a for a in allergies), allergies
    assert len(alerts) == 1 and "contrast" in alerts[0].lower(), alerts

    # IAM delete at hospital A: no warning any more.
    send(region.hl7_port, a60("a-3", TARO_A, [iam(1, "D", "ALG-1")]))
    kiosk.wait_until(lambda: clerk.book("req-s-2", ct[1], TARO_CLINIC).status == 201, 20,
                     "a booking without warning after the IAM delete")
    # A new reaction (gadolinium, by its Japanese brand name) warns again ...
    send(region.hl7_port, a60("a-4", TARO_A, [iam(1, "A", "ALG-2", allergen="^ガドビスト^L", severity="MO",
                                                   reaction="嘔吐")]))
    kiosk.wait_until(lambda: clerk.book("req-s-3", ct[2], TARO_CLINIC).status == 409, 20,
                     "the gadolinium reaction warned about")
    # ... until the patient revokes the consent: then nothing is shown, and the suppression is audited.
    cons = core_doctor.request("GET", "/fhir/Consent?patient=" + urllib.parse.quote(
        f"urn:gateway:hospital:{HOSP_A}|{TARO_A['id']}"))
    assert cons.status == 200, cons
    for e in cons.json().get("entry", []):
        r = core_doctor.request("POST", f"/fhir/Consent/{e['resource']['id']}/$revoke")
        assert r.status == 200, r
    before = len([x for x in audit_records(core) if x["action"] == "disclosure_refused"])
    r = clerk.book("req-s-4", ct[3], TARO_CLINIC)
    assert r.status == 201, r
    refused = [x for x in audit_records(core) if x["action"] == "disclosure_refused"]
    assert len(refused) > before, "the suppressed warning is not in the core's audit trail"
    assert core.cli("audit", "verify", "--config", str(core.config_path)).returncode == 0
    # Nothing of the patient in the logs or in clear on disk.
    needles = [TARO_A["id"], TARO_CLINIC["id"], "髙橋", "高橋", "タカハシ", "イオヘキソール", "ガドビスト", "蕁麻疹"]
    for g in (core, region.gateways[CLINIC]):
        log = g.log_text()
        assert not [n for n in needles if n in log], [n for n in needles if n in log]
        for f in g.data_files():
            data = f.read_bytes()
            leaked = [n for n in needles if n.encode("utf-8") in data]
            assert not leaked, (f, leaked)


# The real reports sent to the core: several vendors, a study continued over two reports, and
# Siemens' growing per-study reports (event 1, events 1-2, events 1-3) in another order.
DOSE_FILES = ("CT-RDSR-Siemens-Multi-2.dcm", "CT-RDSR-Siemens-Multi-1.dcm", "CT-RDSR-Siemens-Multi-3.dcm",
              "CT-RDSR-GEPixelMed.dcm", "CT-RDSR-Toshiba_DoseCheck.dcm",
              "CT-RDSR-Philips_BigBore4DCT.dcm", "CT-RDSR-Siemens-Continued-1.dcm",
              "CT-RDSR-Siemens-Continued-2.dcm")


def for_exam(src: Path, out: Path, accession: str, patient_id: str) -> Path:
    """A copy of a real report as the core's scanner would send it for a booked exam: the
    worklist's Accession Number and Patient ID (the dose content untouched)."""
    ds = dcmread(src)
    ds.AccessionNumber = accession
    ds.PatientID = patient_id
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


def dose_summary(r: kiosk.Response) -> dict:
    """The cumulative dose the kiosk answered with (409 or 201): its contained Observation
    `cumulative-dose`, as {total_dlp_mgy_cm, events: [event uid]}."""
    body = r.json()
    for c in body.get("contained", []):
        if c.get("resourceType") == "Observation" and c.get("id") == "cumulative-dose":
            assert c["valueQuantity"]["code"] == "mGy.cm", c
            return {"total_dlp_mgy_cm": c["valueQuantity"]["value"],
                    "events": [comp["code"]["coding"][0]["code"] for comp in c.get("component", [])],
                    "note": json.dumps(c.get("note", []), ensure_ascii=False)}
    raise AssertionError(f"no dose summary in {body}")


def test_dose_reports_of_several_vendors_add_up_each_event_once_and_are_shown_with_the_next_ct_booking(
        region, openrem_files, tmp_path):  # noqa: F811
    core = region.core
    clerk = region.staff_session(CLINIC, "clerk.d")
    core_doctor = region.staff_session(CORE, "dr.core.d", "physician")
    ct = free_slots(clerk, "ct-1", 3)
    r = clerk.book("req-d-0", ct[0], TARO_CLINIC)
    assert r.status == 201, r
    accession = next(i["value"] for i in r.json()["identifier"] if i["system"] == "urn:gatewayd:accession")
    files = [for_exam(openrem_files / name, tmp_path / "rdsr" / name, accession, TARO_CLINIC["id"])
             for name in DOSE_FILES]
    # The reference: each event once, by the test's own reading of the files (pydicom).
    expected: dict[str, float] = {}
    for f in files:
        for e in pydicom_reading(f)["events"]:
            expected[e["event_uid"]] = e["dlp_mgy_cm"] or 0.0
    total = sum(expected.values())
    assert total > THRESHOLD, total
    # Sent once in order, then again in reverse (twice, another order).
    for batch in (files, list(reversed(files))):
        res = scu.storescu(core.dicom_port, batch)
        assert res.returncode == 0, res.stderr
    person = person_of(core_doctor, CLINIC, TARO_CLINIC["id"])

    def shown():
        r = core.cli("safety", "show", "--config", str(core.config_path), "--patient", f"person:{person}")
        if r.returncode != 0:
            return None
        dose = json.loads(r.stdout)["report"].get("dose") or {}
        return dose if len(dose.get("events", [])) == len(expected) else None

    dose = kiosk.wait_until(shown, 60, "every dose event recorded")
    assert sorted(e["event_uid"] for e in dose["events"]) == sorted(expected), dose
    assert dose["total_dlp_mgy_cm"] == pytest.approx(total, rel=1e-6), (dose["total_dlp_mgy_cm"], total)
    assert "not patient dose" in dose["label"]
    assert "safety_shown" in [x["action"] for x in audit_records(core)]
    # The next CT booking: the cumulative DLP with its events, over the threshold a warning.
    r = clerk.book("req-d-1", ct[1], TARO_CLINIC)
    ids = warning_ids(r)
    assert len(ids) == 1, r.json()
    summary = dose_summary(r)
    assert summary["total_dlp_mgy_cm"] == pytest.approx(total, rel=1e-6)
    assert sorted(summary["events"]) == sorted(expected), summary
    assert "not patient dose" in summary["note"] and "患者被ばく線量ではありません" in summary["note"], summary

    # A report whose events lost their UIDs: stored (durable: success), reported, not counted.
    bad = dcmread(files[0])
    for item in bad.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "113819":
            item.ContentSequence = [c for c in item.ContentSequence
                                    if c.ConceptNameCodeSequence[0].CodeValue != "113769"]
    bad.SOPInstanceUID = bad.SOPInstanceUID + ".9"
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path)
    res = scu.storescu(core.dicom_port, [bad_path])
    assert res.returncode == 0, res.stderr
    kiosk.wait_until(lambda: gw.metric_values(core.metrics(), "gateway_safety_dose_reports_total",
                                              outcome="malformed") == [1.0], 30,
                     "the malformed report counted")
    assert core.is_running()
    again = kiosk.wait_until(shown, 10, "the earlier events intact")
    assert again["total_dlp_mgy_cm"] == pytest.approx(total, rel=1e-6)


def test_a_malformed_allergy_message_gets_an_hl7_error_and_changes_nothing(region):
    """IAM-6 outside HL7 table 0323: AE with ERR 103 at IAM-6, the earlier reaction kept."""
    clerk = region.staff_session(CLINIC, "clerk.m")
    core_doctor = region.staff_session(CORE, "dr.core.m", "physician")
    ct = free_slots(clerk, "ct-1", 1)
    reaction_at_hospital_a(region, clerk, core_doctor)
    ack = send(region.hl7_port, a60("a-9", TARO_A, [iam(1, "Q", "ALG-1")]))[0]
    assert msa(ack)[0] == "AE", ack
    assert b"IAM^1^6" in ack and b"|103" in ack, ack
    assert region.core.is_running()
    kiosk.wait_until(lambda: clerk.book("req-m-1", ct[0], TARO_CLINIC).status == 409, 20,
                     "the earlier reaction still warned about")


def test_a_physician_sees_the_warning_in_japanese_and_english_and_acknowledges_it_in_chromium(
        region, chromium):  # noqa: F811
    import browser
    import datetime as dt

    clinic = region.gateways[CLINIC]
    clerk = region.staff_session(CLINIC, "clerk.p")
    core_doctor = region.staff_session(CORE, "dr.core.p", "physician")
    reaction_at_hospital_a(region, clerk, core_doctor)
    secret = kiosk.add_staff(clinic, "dr.page", "physician")
    day = (dt.datetime.now(JST) + dt.timedelta(days=1)).date().isoformat()
    c = chromium([browser.spki_sha256_b64(clinic.data_dir / "booking" / "kiosk-cert.pem")])
    page = c.page()
    for domain in ("Page.enable", "Runtime.enable"):
        page.send(domain)
    page.navigate(f"https://127.0.0.1:{region.ports[CLINIC]}/")
    kiosk.login_in_page(page, "dr.page", secret)
    page.wait_for("[...document.querySelectorAll('#slot-schedule option')].some(o => o.value === 'ct-1')",
                  what="the CT scanner offered")
    page.choose("#slot-schedule", "ct-1")
    page.choose("#slot-day", day)
    page.click("#slot-search")
    page.wait_for(f"document.getElementById('slot-summary').dataset.day === '{day}' && "
                  "document.querySelectorAll('#slot-list button[data-slot]').length > 2",
                  what="free CT slots listed")
    slot = page.evaluate("[...document.querySelectorAll('#slot-list button[data-slot]')][1].dataset.slot")
    page.click(f"#slot-list button[data-slot='{slot}']")
    alpha, kanji, kana = TARO_CLINIC["name"].split("=")
    page.type_into("#book-patient-id", TARO_CLINIC["id"])
    page.type_into("#book-name-alpha", alpha)
    page.type_into("#book-name-kanji", kanji)
    page.type_into("#book-name-kana", kana)
    page.choose("#book-birth", TARO_CLINIC["birth_date"])
    page.choose("#book-sex", "male")
    page.wait_for("!document.getElementById('book-submit').disabled", what="the Book button enabled")
    page.click("#book-submit")
    status = page.wait_for("document.getElementById('book-result').dataset.status", timeout=30,
                           what="an answer to the booking")
    assert status == "warnings", page.evaluate("document.getElementById('book-result').textContent")
    shown = page.evaluate("document.getElementById('safety-view').innerText")
    for want in ("イオヘキソール", HOSP_A, "造影剤", "Contrast reaction", "蕁麻疹"):
        assert want in shown, (want, shown)
    assert page.evaluate("document.querySelectorAll('#safety-warnings li[data-warning]').length") == 1
    assert not page.evaluate("document.getElementById('safety-acknowledge').hidden"), \
        "no acknowledge button for a physician"
    page.click("#safety-acknowledge")
    page.wait_for("document.getElementById('book-result').dataset.status === 'booked'", timeout=30,
                  what="booked after the acknowledgement")
    actions = [rec["action"] for rec in audit_records(clinic)]
    assert "safety_acknowledged" in actions, actions
    booked = [e["resource"] for e in clerk.request(
        "GET", f"/fhir/Appointment?patient={TARO_CLINIC['id']}").json()["entry"]]
    assert any(a["slot"][0]["reference"] == f"Slot/{slot}" and a["status"] == "booked" for a in booked), booked


def test_dose_reports_received_at_a_clinic_reach_the_core_even_when_it_was_down(
        gateway_factory, broker, openrem_files, tmp_path):  # noqa: F811
    """A clinic's own CT sends its dose reports to the clinic's gateway: they are carried to
    the core over the sealed exchange, acknowledged only once durable there, kept queued
    while the core is down, and counted once."""
    missing = scu.missing_dcmtk_tools()
    assert not missing, f"DCMTK tools missing: {missing}; hw-tests/run-all.sh installs dcmtk"
    region = kiosk.Region(gateway_factory, broker, clinics=(CLINIC,), core=CORE, core_extra={
        "identity": {"hospital_id": CORE},
        "safety": {"dose_window_days": 36500},
    })
    clinic = region.gateways[CLINIC]
    clinic.config["safety"] = {}
    clinic.config_path.write_text(gw.to_toml(clinic.config))
    region.start()
    core = region.core
    names = ("CT-RDSR-Siemens-Multi-3.dcm", "CT-RDSR-Siemens-Multi-1.dcm", "CT-RDSR-GEPixelMed.dcm")
    files = []
    for name in names:
        ds = dcmread(openrem_files / name)
        ds.PatientID = TARO_CLINIC["id"]
        ds.PatientName = TARO_CLINIC["name"].split("=")[0]
        ds.PatientBirthDate = TARO_CLINIC["birth_date"].replace("-", "")
        ds.PatientSex = "M"
        ds.AccessionNumber = ""
        out = tmp_path / "clinic-rdsr" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
        files.append(out)
    expected = {e["event_uid"]: e["dlp_mgy_cm"] or 0.0 for f in files for e in pydicom_reading(f)["events"]}
    # The core is down: the clinic stores the reports (durable: success) and keeps them queued.
    core.stop()
    res = scu.storescu(clinic.dicom_port, files)
    assert res.returncode == 0, res.stderr
    time.sleep(3)
    queued = clinic.status()["by_destination"]["safety-dose"]["queued"]
    assert queued == len(files), clinic.status()
    core.start()
    # (Kiosk sessions do not outlive a restart: log in now.)
    core_doctor = region.staff_session(CORE, "dr.core.f", "physician")
    person = kiosk.wait_until(lambda: _person_or_none(core_doctor, CLINIC, TARO_CLINIC["id"]), 90,
                              "the clinic's patient known at the core from its dose reports")

    def shown():
        r = core.cli("safety", "show", "--config", str(core.config_path), "--patient", f"person:{person}")
        if r.returncode != 0:
            return None
        dose = json.loads(r.stdout)["report"].get("dose") or {}
        return dose if len(dose.get("events", [])) == len(expected) else None

    dose = kiosk.wait_until(shown, 90, "the clinic's dose events at the core")
    assert sorted(e["event_uid"] for e in dose["events"]) == sorted(expected), dose
    assert {e["hospital"] for e in dose["events"]} == {CLINIC}, dose
    assert dose["total_dlp_mgy_cm"] == pytest.approx(sum(expected.values()), rel=1e-6)
    kiosk.wait_until(lambda: clinic.status()["by_destination"]["safety-dose"]["queued"] == 0, 30,
                     "the clinic's dose queue drained once acknowledged")
    needles = [TARO_CLINIC["id"], "TAKAHASHI"]
    for g in (core, clinic):
        assert not [n for n in needles if n in g.log_text()], g.name


def _person_or_none(doctor: kiosk.Kiosk, hospital: str, pid: str) -> str | None:
    try:
        return person_of(doctor, hospital, pid)
    except AssertionError:
        return None
