"""Patient identity across hospitals (名寄せ) and consent to share (公開同意) on the core
gateway (issue 17), with real peers only: the core `gatewayd` with `[identity]`, its HL7
listener fed by two hospitals' systems over MLLP (DCMTK-free: raw MLLP frames, as a HIS
sends them), a clinic booking through a real mosquitto, and the core's kiosk over HTTPS.

- ADT from two hospitals (A01, A04, A08, A40) creates, updates, merges and links source
  records; a link is visible through the PIXm-like lookup once the patient consented, an
  unlink at the kiosk takes effect at once, a pair the matcher is unsure of waits in the
  review queue and is linked by a physician's decision;
- consent revoked: the cross-hospital lookup (PIXm and `$match`) returns nothing of the other
  hospitals and each refusal is in the audit trail, which still verifies; a consent carried
  in an HL7 CON segment counts like one recorded at the kiosk; a clerk gets 403;
- the patient a clinic booked for is in the registry under the clinic's id;
- no patient data in the gateway's log or metrics, and none in clear under its data folder.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

import browser
import gw
import kiosk
from hl7msg import MllpConnection, msa
from test_booking import broker  # noqa: F401  (the regional broker fixture)
from test_kiosk_page import chromium  # noqa: F401  (headless Chromium)

CORE = "core-1"
HOSP_A = "HOSP-A"
HOSP_B = "HOSP-B"
SYSTEM = "urn:gateway:hospital:"
KINDS = ("identity", "results", "reactions", "dose", "images")

# One person as two hospitals registered her: kana in half-width at one, old kanji forms,
# address notation and phone punctuation differ; the same birth date and insurance.
TARO_A = {"id": "A-0931", "family": "髙橋", "given": "太郎", "family_kana": "タカハシ", "given_kana": "タロウ",
          "birth": "19800102", "sex": "M", "address": "東京都千代田区千代田一丁目2番3号^^千代田区^東京都^1000001",
          "phone": "03-1234-5678"}
TARO_B = {"id": "12345", "family": "高橋", "given": "太郎", "family_kana": "ﾀｶﾊｼ", "given_kana": "ﾀﾛｳ",
          "birth": "19800102", "sex": "M", "address": "千代田区千代田1-2-3^^千代田区^^100-0001",
          "phone": "0312345678"}
# A duplicate registration of the same person at hospital B (merged by A40 into 12345).
TARO_B_DUP = dict(TARO_B, id="12399", phone="")
# Someone else: the same family and address (her mother), another given name and birth date.
HANAKO_A = {"id": "A-0932", "family": "髙橋", "given": "花子", "family_kana": "タカハシ", "given_kana": "ハナコ",
            "birth": "19520315", "sex": "F", "address": TARO_A["address"], "phone": TARO_A["phone"]}


def adt(trigger: str, control: str, facility: str, p: dict, extra: tuple[str, ...] = ()) -> bytes:
    """An ADT^{trigger} in UTF-8 from `facility`'s HIS (JAHIS: kanji and kana name repetitions)."""
    structure = {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A28": "ADT_A05", "A31": "ADT_A05",
                 "A40": "ADT_A39", "A47": "ADT_A30"}[trigger]
    segments = [
        f"MSH|^~\\&|HIS|{facility}|GATEWAYD|{CORE}|20261206090000||ADT^{trigger}^{structure}|{control}|P|2.5"
        "||||||UNICODE UTF-8",
        f"EVN|{trigger}|20261206090000",
        f"PID|1||{p['id']}^^^{facility}^PI||{p['family']}^{p['given']}^^^^^L^I~"
        f"{p['family_kana']}^{p['given_kana']}^^^^^L^P||{p['birth']}|{p['sex']}|||{p['address']}||{p['phone']}",
        *extra,
        "PV1|1|O",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def send(port: int, *messages: bytes) -> None:
    with MllpConnection(port) as c:
        for m in messages:
            ack = c.request(m)
            assert msa(ack)[0] == "AA", ack


def ident(hospital: str, pid: str) -> str:
    return f"{SYSTEM}{hospital}|{pid}"


def pix(k: kiosk.Kiosk, hospital: str, pid: str) -> set[tuple[str, str]]:
    """The identifiers the PIXm-like lookup shows for (hospital, pid), as (hospital, id)."""
    r = k.request("GET", f"/fhir/Patient/$ihe-pix?sourceIdentifier={urllib.parse.quote(ident(hospital, pid))}")
    assert r.status == 200, r
    out = set()
    for p in r.json().get("parameter", []):
        if p.get("name") == "targetIdentifier":
            v = p["valueIdentifier"]
            assert v["system"].startswith(SYSTEM), v
            out.add((v["system"][len(SYSTEM):], v["value"]))
    return out


def match(k: kiosk.Kiosk, p: dict) -> list[tuple[str, str]]:
    """`POST /fhir/Patient/$match` with p's demographics: the (hospital, id) of each answer."""
    patient = {
        "resourceType": "Patient",
        "name": [
            {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                            "valueCode": "IDE"}], "family": p["family"], "given": [p["given"]]},
            {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                            "valueCode": "SYL"}], "family": p["family_kana"], "given": [p["given_kana"]]},
        ],
        "gender": {"M": "male", "F": "female"}[p["sex"]],
        "birthDate": f"{p['birth'][:4]}-{p['birth'][4:6]}-{p['birth'][6:]}",
    }
    r = k.request("POST", "/fhir/Patient/$match",
                  {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]})
    assert r.status == 200, r
    out = []
    for e in r.json().get("entry", []):
        for i in e["resource"].get("identifier", []):
            if i.get("system", "").startswith(SYSTEM):
                out.append((i["system"][len(SYSTEM):], i["value"]))
    return out


def consent_body(hospital: str, pid: str, kinds=KINDS, grantee: str | None = None) -> dict:
    """A FHIR Consent: `grantee` a hospital id, or the whole region."""
    actor = ({"reference": {"identifier": {"system": "urn:gateway:hospital", "value": grantee}}}
             if grantee else {"reference": {"identifier": {"system": "urn:gateway:region", "value": "region"}}})
    body = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": f"{SYSTEM}{hospital}", "value": pid}},
        "provision": {"type": "permit", "actor": [actor],
                      "class": [{"system": "urn:gateway:data-kind", "code": c} for c in kinds]},
    }
    return body


def consent(k: kiosk.Kiosk, hospital: str, pid: str, kinds=KINDS, grantee: str | None = None) -> dict:
    """Records a consent at the kiosk: `grantee` a hospital id, or the whole region."""
    r = k.request("POST", "/fhir/Consent", consent_body(hospital, pid, kinds, grantee))
    assert r.status == 201, r
    return r.json()


def consent_status(k: kiosk.Kiosk, hospital: str, pid: str) -> int:
    return k.request("POST", "/fhir/Consent", consent_body(hospital, pid)).status


def audit_records(g: gw.Gateway) -> list[dict]:
    return [json.loads(line) for line in (g.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]


def needles(*people: dict) -> list[str]:
    out = []
    for p in people:
        out += [p["id"], p["family"] + p["given"], p["family"], p["family_kana"], p["birth"], p["phone"]]
    return [n for n in out if n and len(n) >= 2]


@pytest.fixture
def region(gateway_factory, broker):  # noqa: F811
    hl7_port = gw.free_port()
    r = kiosk.Region(gateway_factory, broker, core=CORE, core_extra={
        "hl7": {"listen": f"127.0.0.1:{hl7_port}"},
        "identity": {"hospital_id": CORE},
    })
    r.hl7_port = hl7_port
    return r.start()


def test_adt_from_two_hospitals_creates_updates_merges_and_links_and_an_unlink_takes_effect_at_once(region):
    core = region.core
    doctor = region.staff_session(CORE, "dr.identity", "physician")
    send(region.hl7_port,
         adt("A01", "a-1", HOSP_A, TARO_A),
         adt("A04", "b-1", HOSP_B, TARO_B),
         adt("A04", "b-2", HOSP_B, TARO_B_DUP),
         adt("A04", "a-2", HOSP_A, HANAKO_A))
    # The patient consents (at the core's kiosk) to share her identity with the region.
    consent(doctor, HOSP_A, TARO_A["id"], kinds=("identity",))
    linked = kiosk.wait_until(lambda: (s := pix(doctor, HOSP_A, TARO_A["id"])) and (HOSP_B, "12345") in s and s,
                              20, "hospital B's record linked to hospital A's")
    assert (HOSP_A, TARO_A["id"]) in linked, linked
    assert (HOSP_A, HANAKO_A["id"]) not in linked, f"the mother was linked to her son: {linked}"
    # A40 at hospital B: the duplicate 12399 merged into 12345.
    send(region.hl7_port, adt("A40", "b-3", HOSP_B, TARO_B, extra=(f"MRG|12399^^^{HOSP_B}^PI",)))
    merged = kiosk.wait_until(lambda: (s := pix(doctor, HOSP_A, TARO_A["id"])) and (HOSP_B, "12399") not in s and s,
                              20, "the merged record gone from the lookup")
    assert (HOSP_B, "12345") in merged, merged
    # A08 at hospital A: an update (new phone) keeps the record and its link.
    send(region.hl7_port, adt("A08", "a-3", HOSP_A, dict(TARO_A, phone="090-1111-2222")))
    time.sleep(1)
    assert (HOSP_B, "12345") in pix(doctor, HOSP_A, TARO_A["id"])
    # Unlink at the kiosk: at once, no waiting.
    r = doctor.request("POST", "/api/identity/unlink", {"hospital_id": HOSP_B, "patient_id": "12345"})
    assert r.status == 204, r
    after = pix(doctor, HOSP_A, TARO_A["id"])
    assert (HOSP_B, "12345") not in after, after
    actions = [rec["action"] for rec in audit_records(core)]
    assert "identity_unlinked" in actions, actions
    assert core.cli("audit", "verify", "--config", str(core.config_path)).returncode == 0


def test_consent_revoked_the_lookup_discloses_nothing_of_other_hospitals_and_the_refusal_is_audited(region):
    core = region.core
    doctor = region.staff_session(CORE, "dr.consent", "physician")
    clerk = region.staff_session(CORE, "clerk.consent", "clerk")
    send(region.hl7_port, adt("A01", "a-1", HOSP_A, TARO_A), adt("A04", "b-1", HOSP_B, TARO_B))
    given = consent(doctor, HOSP_A, TARO_A["id"])
    kiosk.wait_until(lambda: (HOSP_B, "12345") in pix(doctor, HOSP_A, TARO_A["id"]), 20, "the link with consent")
    assert (HOSP_B, "12345") in match(doctor, TARO_A)
    assert clerk.request("GET", f"/fhir/Consent?patient={urllib.parse.quote(ident(HOSP_A, TARO_A['id']))}").status == 403
    before = len(audit_records(core))
    r = doctor.request("POST", f"/fhir/Consent/{given['id']}/$revoke")
    assert r.status == 200 and r.json()["status"] == "inactive", r
    assert pix(doctor, HOSP_A, TARO_A["id"]) == set(), "identifiers disclosed after the consent was revoked"
    assert match(doctor, TARO_A) == [], "records of other hospitals found after the consent was revoked"
    new = audit_records(core)[before:]
    refused = [rec for rec in new if rec["outcome"] == "failure" and "disclos" in rec["action"]]
    assert refused, f"no refused disclosure in the audit trail: {[(x['action'], x['outcome']) for x in new]}"
    for rec in new:
        text = json.dumps(rec, ensure_ascii=False)
        for n in needles(TARO_A, TARO_B):
            assert n not in text, f"audit record holds patient data: {rec['action']}"
    # A consent in an HL7 CON segment (hospital B's system) counts like one recorded at the kiosk.
    send(region.hl7_port, adt("A08", "b-2", HOSP_B, TARO_B, extra=(
        "CON|1|identity^^urn:gateway:data-kind|||||||||A",)))
    kiosk.wait_until(lambda: (HOSP_B, "12345") in pix(doctor, HOSP_A, TARO_A["id"]), 20,
                     "the identifiers disclosed under the CON consent")
    assert core.cli("audit", "verify", "--config", str(core.config_path)).returncode == 0


def test_a_physician_decides_a_review_pair_in_chromium_and_bookings_feed_the_registry_nothing_in_clear(
        region, chromium):
    core = region.core
    doctor_secret = kiosk.add_staff(core, "dr.review", "physician")
    doctor = region.kiosk(CORE)
    assert doctor.login("dr.review", doctor_secret).status == 200
    clerk = region.staff_session("clinic-a", "clerk.review")
    core_clerk = region.staff_session(CORE, "clerk.core")
    # Same name and birth date, nothing else in common: a person must decide.
    unsure = {"id": "B-7", "family": "高橋", "given": "太郎", "family_kana": "タカハシ", "given_kana": "タロウ",
              "birth": "19800102", "sex": "M", "address": "大阪府大阪市北区梅田3-1-1^^大阪市^大阪府^5300001",
              "phone": ""}
    send(region.hl7_port, adt("A01", "a-1", HOSP_A, TARO_A), adt("A04", "b-9", HOSP_B, unsure))
    consent(doctor, HOSP_A, TARO_A["id"], kinds=("identity",))
    kiosk.wait_until(lambda: (r := doctor.request("GET", "/api/identity/review")).status == 200
                     and r.json()["items"], 20, "a pair in the review queue")
    assert core_clerk.request("GET", "/api/identity/review").status == 403
    assert (HOSP_B, "B-7") not in pix(doctor, HOSP_A, TARO_A["id"])
    # The physician sees both records side by side in the kiosk page and decides.
    c = chromium([browser.spki_sha256_b64(core.data_dir / "booking" / "kiosk-cert.pem")])
    page = c.page()
    page.navigate(f"https://127.0.0.1:{region.ports[CORE]}/")
    kiosk.login_in_page(page, "dr.review", doctor_secret)
    page.wait_for("!document.getElementById('identity-view').hidden", what="the identity section")
    page.click("#review-refresh")
    pair = page.wait_for(
        "(() => { const a = document.querySelector('#review-list .review-item'); if (!a) return null;"
        " return [...a.querySelectorAll('tr[data-field]')].map(tr => [tr.dataset.field, tr.className,"
        " tr.cells[1].textContent, tr.cells[2].textContent]); })()", what="the review pair in the page")
    rows = {f: (cls, a, b) for f, cls, a, b in pair}
    assert rows["address"][0] == "diff" and rows["address"][1] != rows["address"][2], rows
    assert rows["birth_date"][0] != "diff" and rows["birth_date"][1] == rows["birth_date"][2], rows
    assert {rows["patient_id"][1], rows["patient_id"][2]} == {TARO_A["id"], "B-7"}, rows
    page.click("#review-list .review-item .review-same")
    page.wait_for("document.getElementById('review-summary').dataset.count === '0'",
                  what="the queue empty after the decision")
    assert (HOSP_B, "B-7") in pix(doctor, HOSP_A, TARO_A["id"]), "the pair decided the same is not linked"
    decided = [r for r in audit_records(core) if r["actor"] == "dr.review" and r["action"] != "login"]
    assert any("review" in r["action"] or "link" in r["action"] for r in decided), decided
    # A clinic's booking puts its patient in the core's registry under the clinic's id.
    bundle = kiosk.wait_until(lambda: (b := clerk.slots("ct-1"))["total"] > 2 and b, 30, "slots")
    patient = {"id": "ZZPID4242", "name": "ZZTEST^HANAKO=山田^花子=やまだ^はなこ", "birth_date": "1961-04-02",
               "gender": "female"}
    assert clerk.book("req-id-1", bundle["entry"][2]["resource"]["id"], patient).status == 201
    # The core sees the clinic's record once the patient consented (recorded against it: the
    # consent is refused as not found until the booking put the record there).
    kiosk.wait_until(lambda: consent_status(doctor, "clinic-a", "ZZPID4242") == 201, 20,
                     "the booked patient in the registry (a consent recorded against the clinic's record)")
    assert ("clinic-a", "ZZPID4242") in match(doctor, {
        "family": "山田", "given": "花子", "family_kana": "やまだ", "given_kana": "はなこ", "birth": "19610402",
        "sex": "F"})
    # Nothing in clear: the data folder, the log, the metrics.
    blob = b"".join(p.read_bytes() for p in core.data_dir.rglob("*") if p.is_file())
    for n in needles(TARO_A, unsure) + ["花子", "ZZPID4242"]:
        assert n.encode() not in blob, f"{n!r} in clear under the data folder"
    log, metrics = core.log_text(), core.metrics_text()
    for n in needles(TARO_A, unsure):
        assert n not in log, f"{n!r} in the gateway's log"
        assert n not in metrics, f"{n!r} in the metrics"
    assert gw.metric_values(gw.parse_metrics(metrics), "gateway_identity_records"), \
        "no gateway_identity_records in the metrics"
