"""Results come back to the referring clinic: images to its PACS, the report to its EMR, both
at the kiosk (issue 16), with real peers only.

Two `gatewayd` processes or more (a core, clinics) on a real mosquitto, a real Orthanc
behind nginx mutual TLS as the cloud archive (each gateway with its own client
certificate), DCMTK `storescp` as each clinic's PACS, python-hl7's MLLP server in TLS as
each clinic's EMR (`results_env.ResultsEnv`). The core's modality is `storescu`; the core's
RIS sends an ORU^R01 over MLLP.

- end to end: 60 instances of a booked exam (mixed sizes, the core's Patient ID, a Study
  Instance UID the worklist never saw) and a final report: the clinic PACS gets each
  instance exactly once with the clinic's Patient ID and issuer and the core's in Other
  Patient IDs Sequence; the EMR gets the ORU once with the clinic's ID first in PID-3 and
  the Japanese text intact; the cloud received each instance once (nothing bounced back
  from the clinic); the kiosk shows 60 received / 60 delivered and the report
  received/delivered; the broker, mosquitto's log and both gateways' logs hold no patient
  name, id, accession, study UID or report text in clear;
- kill -9 of the clinic during the pull (nginx paces the cloud's answers so the pull lasts;
  the PACS is down then, so the pull is all that runs) and again during the delivery:
  everything arrives, pulled once into the spool, delivered once but for at most one resend.
  The delivery kill lands as soon as the PACS has written its first file, i.e. in the window
  between the PACS's write and the gateway recording its success, the worst moment: the
  delivery is at-least-once across a crash (the PACS dedupes by SOP Instance UID), so the
  instance in flight may come twice, nothing else;
- the cloud (Orthanc) down when the clinic pulls, the PACS down, the broker down while the
  core notifies: each its own test, everything exactly once in the end, nothing restarted
  by hand but the peer that was down;
- a second clinic that did not book receives nothing: its PACS and EMR stay empty, its spool
  holds nothing, the core never published to its inbox, its kiosk shows nothing;
- a physician reads the report at the kiosk (DiagnosticReport), a clerk gets 403, the read
  is in the audit trail (without the text) and `gatewayd audit verify` passes.

`HWTESTS_RESULTS=0` leaves the feature's config out (`[results]`, `message_types`): the
tests then run up to their first results assertion and fail there, which proves the
harness on a binary without the feature.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

import gw
import results_env
from results_env import (CORE, CORE_ISSUER, CORE_PATIENT_ID, PACS_DEST, PATIENT, REPORT, EnvFactory,
                         assert_no_clear, imaging_study, pid3_repetitions)
from test_uplink import poll

A = "clinic-a"
B = "clinic-b"


@pytest.fixture
def envs(tmp_path, gateway_factory, ca):
    f = EnvFactory(tmp_path, gateway_factory, ca)
    try:
        yield f
    finally:
        f.close()


def pacs_dest(g) -> dict:
    st = g.status()
    return st.get("by_destination", {}).get(PACS_DEST, {}), st


def assert_once(got, study, allowed_resends: int = 0) -> None:
    """``got`` (SOP UID -> times at the PACS) holds exactly the study, each once (up to
    ``allowed_resends`` second copies)."""
    missing = study.uids - set(got)
    foreign = set(got) - study.uids
    twice = {u: n for u, n in got.items() if n > 1}
    assert not missing, f"the PACS never got {len(missing)} of {len(study.uids)} instances"
    assert not foreign, f"the PACS got {len(foreign)} instances that are not of the study"
    extra = sum(n - 1 for n in twice.values())
    assert extra <= allowed_resends, (
        f"the PACS received {len(twice)} instances more than once ({extra} extra copies, "
        f"{allowed_resends} allowed): {list(twice.items())[:5]}")


def assert_clinic_ids(ds, clinic: str, study) -> None:
    issuer = results_env.ISSUERS[clinic]
    assert str(ds.PatientID) == PATIENT["id"], f"PatientID {ds.PatientID!r} at the PACS, not the clinic's"
    assert str(ds.get("IssuerOfPatientID", "")) == issuer, f"IssuerOfPatientID {ds.get('IssuerOfPatientID')!r}"
    others = [(str(i.get("PatientID", "")), str(i.get("IssuerOfPatientID", "")))
              for i in ds.get("OtherPatientIDsSequence", [])]
    assert (CORE_PATIENT_ID, CORE_ISSUER) in others, f"the core's ID is not in OtherPatientIDsSequence: {others}"
    assert str(ds.AccessionNumber) == study.booking.accession
    assert str(ds.StudyInstanceUID) == study.study_uid


# --------------------------------------------------------------------------


def test_a_booked_study_and_its_report_come_back_once_with_the_clinics_patient_id(envs):
    env = envs().start()
    traffic = env.capture()
    b = env.book(A)
    study = env.make_study(b, 60, n_ct=6)
    env.send_study(study)
    env.wait_cloud(study)
    oru = env.send_oru(b, "ZZORU0001", "F")

    got = env.wait_pacs(A, study, timeout=120)
    assert_once(got, study)
    datasets = env.clinics[A].pacs.datasets()
    assert len(datasets) == 60, f"{len(datasets)} files at the PACS for 60 instances"
    for ds in datasets.values():
        assert_clinic_ids(ds, A, study)

    copies = env.wait_emr(A, oru.control_id, timeout=60)
    assert len(copies) == 1, f"the EMR received the ORU^R01 {len(copies)} times"
    reps = pid3_repetitions(copies[0])
    assert reps[0][0] == PATIENT["id"] and reps[0][3:4] == [results_env.ISSUERS[A]], f"PID-3: {reps}"
    assert any(r[0] == CORE_PATIENT_ID for r in reps[1:]), f"the core's ID left PID-3: {reps}"
    text = copies[0].decode("utf-8")
    for _, line in REPORT:
        assert line in text, f"report text {line!r} not intact at the EMR"
    # Only the ORU went to the EMR (message_types), once.
    assert [cid for cid, _ in env.clinics[A].emr.received()] == [oru.control_id]

    # The cloud got each instance once: the clinic pulled, it did not upload them again.
    received = env.cloud.orthanc.received_uids()
    assert all(received[u] == 1 for u in study.uids), {u: received[u] for u in study.uids if received[u] != 1}

    g = env.gateway(A)
    d, st = pacs_dest(g)
    assert (d.get("sent"), d.get("queued"), d.get("failed")) == (60, 0, 0), st

    state = env.wait_kiosk(b.clerk, b.appointment_id, "60 images received / 60 delivered, the report delivered",
                           lambda s: (s["images_received"], s["images_delivered"], s["report_received"],
                                      s["report_delivered"]) == (60, 60, True, True), 30)
    assert state["announced"] == 60 and state["status"] == "available", state
    # "complete": the final report (OBR-25 = F) or `complete_after` (5 s) without new instances.
    env.wait_kiosk(b.clerk, b.appointment_id, "the study complete", lambda s: s["raw"].get("complete") is True, 30)
    shown = json.dumps(imaging_study(b.clerk, b.appointment_id))
    assert f"urn:oid:{study.study_uid}" in shown and b.accession in shown, f"the kiosk's ImagingStudy: {shown}"

    # /metrics: results by state at the clinic (refreshed every 30 s at the latest), what the
    # core sent and had acknowledged; `spool status` names the results queues.
    def clinic_instances():
        m = g.metrics()
        got = {s: gw.metric_values(m, "gateway_results_instances", state=s)
               for s in ("announced", "received", "delivered", "failed")}
        return got == {"announced": [60.0], "received": [60.0], "delivered": [60.0], "failed": [0.0]}, got
    poll("gateway_results_instances at the clinic", clinic_instances, 45)
    core_m = env.core.metrics()
    for kind in ("notice", "report"):
        assert gw.metric_values(core_m, "gateway_results_messages_total", kind=kind, outcome="acknowledged"), kind
        assert gw.metric_values(core_m, "gateway_results_pending", kind=kind) == [0.0], kind
    recorded = gw.metric_values(g.metrics(), "gateway_results_messages_total", kind="report", outcome="recorded")
    assert recorded == [1.0], recorded
    core_dest = env.core.status().get("by_destination", {})
    assert core_dest.get("core-results", {}).get("queued") == 0 and core_dest["core-results"].get("sent") == 60, core_dest
    assert core_dest.get("core-reports", {}).get("sent") == 1, core_dest
    # The core's identity registry recorded the results going to the booking clinic as a
    # referral (no consent needed): once for the images, once for the report.
    trail = [json.loads(line) for line in (env.core.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    referrals = [r for r in trail if r["action"] == "disclosure_allowed" and "referral" in (r.get("detail") or "")]
    assert len(referrals) == 2 and all(r["actor"] == "results" for r in referrals), \
        [(r["action"], r.get("detail")) for r in trail if "disclos" in r["action"]]

    # Nothing of the patient in clear: on the broker, in mosquitto's log (topics), in the logs.
    time.sleep(1.0)
    seen = traffic.out.read_bytes()
    assert f"bk/{A}/resp/{CORE}/".encode() in seen, "no core -> clinic traffic captured at all"
    needles = env.needles(study, b)
    assert_no_clear(seen, needles, "the broker traffic")
    assert_no_clear(env.broker.log_text().encode(), needles, "mosquitto's log")
    for gw_ in (env.core, g):
        assert_no_clear(gw_.log_bytes(), [PATIENT["id"], CORE_PATIENT_ID, "ZZTEST", "山田", "花子"]
                        + [t for _, t in REPORT], f"{gw_.name}'s log")


def test_clinic_killed_during_the_pull_and_during_the_delivery_still_gets_everything_once(envs):
    # nginx sends at most 512 KB/s per connection: a 512x512 CT instance takes a second to pull.
    env = envs(limit_rate="512k").start(pacs_running=False)
    b = env.book(A)
    study = env.make_study(b, 40, n_ct=12)
    n = len(study.uids)
    env.send_study(study)
    env.wait_cloud(study)
    g = env.gateway(A)

    # Kill 1: some but not all instances pulled into the clinic's spool.
    start = time.monotonic()
    while True:
        k = env.spool_objects(A)
        if 0 < k < n:
            break
        assert k < n, f"the pull finished ({k} of {n}) before the kill could land: pace the cloud slower"
        assert time.monotonic() - start < 120, (
            f"{A} pulled {k} of {n} instances into its spool after 120 s\nspool: {g.status()}")
        time.sleep(0.05)
    g.kill9()
    print(f"kill -9 during the pull with {k} of {n} in the spool")
    g.start()
    d = poll(f"all {n} instances in {A}'s spool after the restart",
             lambda: ((d := pacs_dest(g)[0]).get("queued", 0) + d.get("sent", 0) >= n, d), 120, 0.5)
    time.sleep(2.0)
    d, st = pacs_dest(g)
    assert d.get("queued") == n and st["objects"] == n, f"pulled twice into the spool? {st}"

    # Kill 2: the PACS comes up; kill while some but not all are delivered.
    # A slow PACS (storescp sleeps a second in each reception): the gateway delivers 40
    # instances in well under the 20 ms between two looks otherwise, and the kill would miss.
    pacs = env.clinics[A].pacs
    pacs.start(sleep_during=1)
    start = time.monotonic()
    while True:
        k = len(pacs.files())
        if 0 < k < n:
            break
        assert k < n, f"the delivery finished ({k} of {n}) before the kill could land"
        assert time.monotonic() - start < 90, f"the PACS got {k} of {n} after 90 s\nspool: {g.status()}"
        time.sleep(0.02)
    g.kill9()
    print(f"kill -9 during the delivery with {k} of {n} files at the PACS")
    pacs.stop()
    pacs.start()
    g.start()
    got = env.wait_pacs(A, study, timeout=120)
    print(f"receipts at the PACS: {sum(got.values())} for {n} instances")
    assert_once(got, study, allowed_resends=1)
    for ds in pacs.datasets().values():
        assert_clinic_ids(ds, A, study)
    d, st = pacs_dest(g)
    assert (d.get("sent"), d.get("queued"), d.get("failed")) == (n, 0, 0), st
    rc, report, r = g.verify()
    assert rc == 0, f"spool verify after two kills: {r.stdout}{r.stderr}"


def test_cloud_down_when_the_clinic_pulls_then_up_everything_arrives_once(envs):
    env = envs().start()
    b = env.book(A)
    g = env.gateway(A)
    assert g.stop() == 0  # the clinic is off while the core uploads
    study = env.make_study(b, 30, n_ct=3)
    env.send_study(study)
    env.wait_cloud(study)
    assert env.cloud.orthanc.stop() == 0  # the archive goes down; nginx answers 502
    g.start()
    dn = f"{A}-cloud"
    poll(f"{A} trying to pull while the archive is down (a 502 in nginx's log for its certificate)",
         lambda: (any(" 502 " in line and dn in line for line in env.cloud.access_log().splitlines()), None),
         90, 0.5)
    time.sleep(5.0)
    assert env.clinics[A].pacs.files() == [], "the PACS got instances while the archive was down"
    env.cloud.orthanc.start()
    got = env.wait_pacs(A, study, timeout=120)
    assert_once(got, study)
    d, st = pacs_dest(g)
    assert (d.get("sent"), d.get("queued"), d.get("failed")) == (30, 0, 0), st


def test_pacs_down_then_up_everything_arrives_once(envs):
    env = envs().start(pacs_running=False)
    b = env.book(A)
    study = env.make_study(b, 30, n_ct=3)
    env.send_study(study)
    env.wait_cloud(study)
    g = env.gateway(A)
    d = poll(f"all 30 instances pulled into {A}'s spool (PACS down)",
             lambda: ((d := pacs_dest(g)[0]).get("queued") == 30, d), 120, 0.5)
    time.sleep(5.0)
    d, st = pacs_dest(g)
    assert (d.get("queued"), d.get("sent"), d.get("failed")) == (30, 0, 0), f"while the PACS is down: {st}"
    print(f"while the PACS is down, last_error: {d.get('last_error')}")
    env.clinics[A].pacs.start()
    got = env.wait_pacs(A, study, timeout=120)
    assert_once(got, study)
    d, st = pacs_dest(g)
    assert (d.get("sent"), d.get("queued"), d.get("failed")) == (30, 0, 0), st


def test_broker_down_while_the_core_notifies_then_up_everything_arrives_once(envs):
    env = envs().start()
    b = env.book(A)
    env.broker.stop()
    study = env.make_study(b, 30, n_ct=3)
    env.send_study(study)
    oru = env.send_oru(b, "ZZORU0301", "F")
    env.wait_cloud(study)
    time.sleep(8.0)  # the core has tried to notify and to send the report: the broker is down
    assert env.clinics[A].pacs.files() == [] and env.clinics[A].emr.received() == []
    env.broker.start()
    got = env.wait_pacs(A, study, timeout=150)
    assert_once(got, study)
    copies = env.wait_emr(A, oru.control_id, timeout=60)
    assert len(copies) == 1, f"the EMR received the ORU^R01 {len(copies)} times"
    d, st = pacs_dest(env.gateway(A))
    assert (d.get("sent"), d.get("queued"), d.get("failed")) == (30, 0, 0), st


def test_a_clinic_that_did_not_book_receives_nothing(envs):
    env = envs(clinics=(A, B)).start()
    traffic = env.capture()
    b = env.book(A)
    study = env.make_study(b, 20, n_ct=2)
    env.send_study(study)
    oru = env.send_oru(b, "ZZORU0401", "F")
    env.wait_cloud(study)
    # The booking clinic gets everything: the flow works in this region.
    assert_once(env.wait_pacs(A, study, timeout=120), study)
    assert len(env.wait_emr(A, oru.control_id, timeout=60)) == 1
    time.sleep(5.0)
    gb = env.gateway(B)
    assert env.clinics[B].pacs.files() == [], f"{B}'s PACS received results of {A}'s exam"
    assert env.clinics[B].emr.received() == [], f"{B}'s EMR received {A}'s report"
    st = gb.status()
    assert st["objects"] == 0, f"{B}'s spool holds results it did not book: {st}"
    topics = [t for t, _ in traffic.messages()]
    to_b = [t for t in topics if t.startswith(f"bk/{B}/resp/")]
    assert not to_b, f"the core published to {B}'s inbox: {to_b[:5]}"
    published = [line for line in env.broker.log_text().splitlines()
                 if "Received PUBLISH" in line and f"'bk/{B}/resp/" in line]
    assert not published, f"mosquitto logged publishes to {B}'s inbox: {published[:3]}"
    assert any("Received PUBLISH" in line and f"'bk/{A}/resp/" in line for line in env.broker.log_text().splitlines()), \
        "mosquitto's log shows no publish to the booking clinic's inbox: the check above would prove nothing"
    assert imaging_study(env.staff(B, "clerk"), b.appointment_id) is None, f"{B}'s kiosk shows {A}'s results"


def test_a_physician_reads_the_report_a_clerk_cannot_and_the_read_is_audited(envs):
    env = envs().start()
    b = env.book(A)
    oru = env.send_oru(b, "ZZORU0501", "F")
    env.wait_emr(A, oru.control_id, timeout=90, extra_settle=0.5)
    g = env.gateway(A)
    physician = env.staff(A, "physician")
    audit_path = g.data_dir / "audit" / "audit.jsonl"

    def reads() -> list[dict]:
        records = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("action") == "patient_record_read" and r.get("actor") == physician.account]

    before = len(reads())
    path = f"/fhir/DiagnosticReport?based-on=Appointment/{b.appointment_id}"
    r = physician.request("GET", path)
    assert r.status == 200, r
    bundle = r.json()
    reports = [e["resource"] for e in bundle.get("entry", [])]
    assert len(reports) == 1 and reports[0]["resourceType"] == "DiagnosticReport", bundle
    rep = reports[0]
    assert rep["status"] == "final", rep
    assert {"reference": f"Appointment/{b.appointment_id}"} in rep.get("basedOn", []), rep
    shown = json.dumps(rep, ensure_ascii=False)
    for form in rep.get("presentedForm", []):
        if form.get("data"):
            shown += base64.b64decode(form["data"]).decode("utf-8", errors="replace")
    for _, line in REPORT:
        assert line in shown, f"the report text {line!r} is not in what the physician got: {rep}"

    refused = b.clerk.request("GET", path)
    assert refused.status == 403 and refused.json()["resourceType"] == "OperationOutcome", refused

    after = reads()
    assert len(after) == before + 1, f"the physician's read is not in the audit trail ({before} -> {len(after)})"
    assert after[-1]["outcome"] == "success", after[-1]
    audit_text = audit_path.read_text()
    assert_no_clear(audit_text.encode(), [PATIENT["id"], CORE_PATIENT_ID, "山田"] + [t for _, t in REPORT],
                    "the audit trail")
    v = g.cli("audit", "verify", "--config", str(g.config_path), "--json")
    assert v.returncode == 0 and json.loads(v.stdout).get("problem") is None, f"audit verify: {v.stdout}{v.stderr}"
