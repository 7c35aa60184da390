"""Regional booking: a core and clinic gateways (separate `gatewayd run` processes) on a real
mosquitto (TLS, client certificates, the booking ACL of `kiosk.REGIONAL_ACL`), staff logged
in with both factors through the kiosk's HTTPS API (`kiosk.Kiosk`).

The patient data used here is made up and marked (`ZZTEST`, a kanji name, a fixed birth
date) so that the traffic capture can look for every piece of it.
"""

from __future__ import annotations

import threading
import time

import pytest

import fleet
import gw
import hl7
import kiosk
from conftest import fail_on_assertion

PATIENT = {"id": "ZZPID4242", "name": "ZZTEST^HANAKO=山田^花子=やまだ^はなこ", "birth_date": "1961-04-02",
           "gender": "female"}


@pytest.fixture
def broker(tmp_path, ca):
    fail_on_assertion(fleet.require_tools)
    b = fail_on_assertion(fleet.Broker, tmp_path / "broker", ca, acl=kiosk.REGIONAL_ACL)
    fail_on_assertion(b.start)
    yield b
    b.stop()


@pytest.fixture
def capture(broker):
    """Everything published on the broker, as its admin sees it (`#`)."""
    subs: list[fleet.Subscription] = []

    def make() -> fleet.Subscription:
        s = broker.subscribe("vendor", "#")
        subs.append(s)
        time.sleep(0.5)
        return s

    yield make
    for s in subs:
        s.stop()


def first_free(k: kiosk.Kiosk, schedule: str = "ct-1", skip: int = 2) -> str:
    """A free slot some way ahead (not one that starts while the test runs)."""
    bundle = kiosk.wait_until(lambda: (b := k.slots(schedule))["total"] > skip and b, 30,
                              f"free slots of {schedule} at the clinic")
    return bundle["entry"][skip]["resource"]["id"]


def test_a_booking_made_at_the_clinic_is_booked_at_the_core_and_the_broker_sees_only_ciphertext(
        gateway_factory, broker, capture):
    region = kiosk.Region(gateway_factory, broker).start()
    traffic = capture()
    clerk = region.staff_session("clinic-a", "clerk.sato")
    slots = clerk.slots("ct-1")
    assert "tag" not in slots["meta"], slots["meta"]
    slot = first_free(clerk)

    r = clerk.book("req-0001", slot, PATIENT)
    assert r.status == 201, r
    booked = r.json()
    assert booked["status"] == "booked", booked
    accession = [i["value"] for i in booked["identifier"] if i["system"] == "urn:gatewayd:accession"]
    assert len(accession) == 1 and accession[0].startswith("RB"), booked

    # The clinic sees it booked; the slot is gone from what it serves.
    mine = clerk.request("GET", f"/fhir/Appointment?patient={PATIENT['id']}")
    assert mine.status == 200, mine
    entries = [e["resource"] for e in mine.json()["entry"]]
    assert [(a["status"], a["slot"][0]["reference"]) for a in entries] == [("booked", f"Slot/{slot}")]
    kiosk.wait_until(lambda: slot not in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]], 10,
                     "the booked slot leaving the clinic's list")

    # It is at the core, with the same accession number.
    core_staff = region.staff_session("core-1", "rad.tanaka", "physician")
    at_core = core_staff.request("GET", f"/fhir/Appointment?patient={PATIENT['id']}")
    assert at_core.status == 200, at_core
    core_entries = [e["resource"] for e in at_core.json()["entry"]]
    assert len(core_entries) == 1, core_entries
    core_acc = [i["value"] for i in core_entries[0]["identifier"] if i["system"] == "urn:gatewayd:accession"]
    assert core_acc == accession and core_entries[0]["status"] == "booked"

    # The broker saw the exchange, and nothing of the patient in clear.
    time.sleep(1.0)
    seen = traffic.out.read_bytes()
    assert b"bk/core-1/req/clinic-a/" in seen and b"bk/clinic-a/resp/core-1/" in seen, seen[:500]
    for needle in ("ZZTEST", "HANAKO", "山田", "花子", "やまだ", "ZZPID4242", "1961-04-02", "19610402",
                   "CT chest"):
        assert needle.encode() not in seen, f"{needle!r} crossed the broker in clear"


def test_two_clinics_contest_one_slot_exactly_one_wins_and_a_retry_books_nothing_twice(gateway_factory, broker):
    region = kiosk.Region(gateway_factory, broker, clinics=("clinic-a", "clinic-b")).start()
    a = region.staff_session("clinic-a", "clerk.a")
    b = region.staff_session("clinic-b", "clerk.b")
    slot = first_free(a)
    first_free(b)
    answers: dict[str, kiosk.Response] = {}
    go = threading.Barrier(2)

    def book(name: str, k: kiosk.Kiosk, patient_id: str) -> None:
        go.wait()
        answers[name] = k.book(f"req-{name}", slot, {**PATIENT, "id": patient_id})

    threads = [threading.Thread(target=book, args=("a", a, "ZZPIDA")),
               threading.Thread(target=book, args=("b", b, "ZZPIDB"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(r.status for r in answers.values())
    assert statuses == [201, 409], answers
    loser = next(r for r in answers.values() if r.status == 409)
    assert loser.json()["resourceType"] == "OperationOutcome", loser
    assert loser.json()["issue"][0]["code"] == "conflict", loser
    winner_name = next(n for n, r in answers.items() if r.status == 201)
    winner = {"a": a, "b": b}[winner_name]
    first = answers[winner_name].json()

    # The same request again: the first answer, nothing booked twice.
    again = winner.book(f"req-{winner_name}", slot, {**PATIENT, "id": f"ZZPID{winner_name.upper()}"})
    assert again.status == 200, again
    assert again.json()["id"] == first["id"]
    core_staff = region.staff_session("core-1", "rad.mori", "physician")
    for pid in ("ZZPIDA", "ZZPIDB"):
        r = core_staff.request("GET", f"/fhir/Appointment?patient={pid}")
        assert r.status == 200, r
        n = len(r.json()["entry"])
        assert n == (1 if pid == f"ZZPID{winner_name.upper()}" else 0), (pid, r.json())


def test_core_unreachable_the_clinic_serves_stale_slots_and_refuses_to_confirm(gateway_factory, broker):
    region = kiosk.Region(gateway_factory, broker, request_timeout="3s", stale_after="4s").start()
    clerk = region.staff_session("clinic-a", "clerk.ito")
    slot = first_free(clerk)
    assert "tag" not in clerk.slots("ct-1")["meta"]

    assert region.core.stop() == 0
    stale = kiosk.wait_until(lambda: (b := clerk.slots("ct-1"))["meta"].get("tag") and b, 15,
                             "slots marked stale")
    assert stale["meta"]["tag"][0]["code"] == "stale"
    assert stale["total"] > 0, "the cached slots are still served"
    r = clerk.book("req-offline-1", slot, PATIENT)
    assert r.status == 503, r
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["code"] == "transient", r

    # When the core is back, the expired request is not booked behind the clinic's back.
    region.core.start()
    kiosk.wait_until(lambda: "tag" not in clerk.slots("ct-1")["meta"], 20, "fresh slots again")
    time.sleep(2.0)
    core_staff = region.staff_session("core-1", "rad.abe", "physician")
    r = core_staff.request("GET", f"/fhir/Appointment?patient={PATIENT['id']}")
    assert r.status == 200 and r.json()["entry"] == [], r
    assert slot in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]]


def test_login_needs_both_factors_locks_out_and_roles_are_enforced(gateway_factory, broker):
    region = kiosk.Region(gateway_factory, broker).start()
    g = region.gateways["clinic-a"]
    secret = kiosk.add_staff(g, "clerk.kato")
    admin_secret = kiosk.add_staff(g, "admin.ueda", "admin")
    k = region.kiosk("clinic-a")
    # No session: 401 with an OperationOutcome.
    r = k.request("GET", "/fhir/Slot?status=free")
    assert r.status == 401 and r.json()["resourceType"] == "OperationOutcome", r
    # Password only, a wrong code: refused.
    assert k.login("clerk.kato", None, code="").status == 401
    wrong = "000000" if kiosk.totp(secret) != "000000" else "111111"
    assert k.login("clerk.kato", None, code=wrong).status == 401
    # Both factors: in; a clerk cannot list accounts.
    assert k.login("clerk.kato", secret).status == 200
    assert k.request("GET", "/api/me").json()["role"] == "clerk"
    assert k.request("GET", "/api/accounts").status == 403
    # Repeated failures from one address throttle that address (429 with Retry-After, even
    # for the right credentials) without locking the account.
    other = region.kiosk("clinic-a", source="127.0.0.2")
    for _ in range(5):
        assert other.login("admin.ueda", None, password="not the password", code="123456").status == 401
    throttled = other.login("admin.ueda", admin_secret)
    assert throttled.status == 429 and int(throttled.headers["retry-after"]) > 0, throttled
    # Lockout after repeated failures from many addresses (20 in all, 4 per address): even
    # the right code is then refused, with the same answer as a wrong password.
    for i in range(15):
        source = f"127.0.0.{10 + i // 4}"
        r = region.kiosk("clinic-a", source=source).login("admin.ueda", None, password="not the password",
                                                          code="123456")
        assert r.status == 401, r
    locked = region.kiosk("clinic-a", source="127.0.0.40").login("admin.ueda", admin_secret)
    wrong = region.kiosk("clinic-a", source="127.0.0.41").login("admin.ueda", None, password="not the password",
                                                               code="123456")
    assert locked.status == 401 and locked.body == wrong.body, (locked, wrong)
    assert "locked" not in locked.body.decode(), locked


def test_a_booked_exam_goes_to_the_cores_ris_as_omg_o19(gateway_factory, broker, tmp_path):
    from test_hl7_forward import Peer

    ris = Peer(tmp_path / "ris", None).start()
    try:
        region = kiosk.Region(gateway_factory, broker, core_extra={
            "uplink": [{"name": "ris", "kind": "mllp-tls", "url": f"mllp://127.0.0.1:{ris.port}"}]}).start()
        clerk = region.staff_session("clinic-a", "clerk.omg")
        slot = first_free(clerk)
        r = clerk.book("req-omg-1", slot, PATIENT)
        assert r.status == 201, r
        accession = next(i["value"] for i in r.json()["identifier"] if i["system"] == "urn:gatewayd:accession")
        got = kiosk.wait_until(ris.received, 20, "the OMG^O19 at the RIS")
        assert len(got) == 1, got
        msg = hl7.parse(got[0][1].decode("utf-8").replace("\r\n", "\r"))
        assert str(msg.segment("MSH")[9]) == "OMG^O19^OMG_O19"
        assert str(msg.segment("MSH")[18]) == "UNICODE UTF-8"
        pid = msg.segment("PID")
        assert str(pid[3]).startswith(PATIENT["id"])
        assert "山田" in str(pid[5]) and str(pid[7]) == "19610402"
        assert str(msg.segment("OBR")[18]) == accession
        ipc = msg.segment("IPC")
        assert str(ipc[1]) == accession and str(ipc[5]) == "CT" and str(ipc[9]) == "CT01"
        # The same request again books nothing new and sends nothing new.
        assert clerk.book("req-omg-1", slot, PATIENT).status == 200
        time.sleep(2.0)
        assert len(ris.received()) == 1
    finally:
        ris.stop()


def test_a_clinic_cancels_with_its_etag_and_the_slot_is_free_again(gateway_factory, broker):
    region = kiosk.Region(gateway_factory, broker).start()
    clerk = region.staff_session("clinic-a", "clerk.endo")
    slot = first_free(clerk)
    r = clerk.book("req-cancel-1", slot, PATIENT)
    assert r.status == 201, r
    appointment_id, etag = r.json()["id"], r.headers["etag"]
    assert etag == 'W/"1"', r.headers
    path = f"/fhir/Appointment/{appointment_id}/$cancel"
    assert clerk.request("POST", path).status == 428
    stale = clerk.request("POST", path, headers={"If-Match": 'W/"9"'})
    assert stale.status == 412 and stale.json()["resourceType"] == "OperationOutcome", stale
    done = clerk.request("POST", path, headers={"If-Match": etag})
    assert done.status == 200, done
    assert done.json()["status"] == "cancelled" and done.headers["etag"] == 'W/"2"', done
    # The core has it cancelled; the slot comes back to every clinic.
    core_staff = region.staff_session("core-1", "rad.ono", "physician")
    at_core = core_staff.request("GET", f"/fhir/Appointment?patient={PATIENT['id']}").json()["entry"]
    assert [e["resource"]["status"] for e in at_core] == ["cancelled"], at_core
    kiosk.wait_until(lambda: slot in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]], 10,
                     "the cancelled slot back in the clinic's list")
    # Cancelling again is the same answer.
    again = clerk.request("POST", path, headers={"If-Match": etag})
    assert again.status == 200 and again.json()["status"] == "cancelled", again


def siu(trigger: str, placer: str, start: str, end: str, station: str = "CT01") -> bytes:
    """An SIU from the core's RIS (start/end: HL7 local times of the schedule)."""
    return ("MSH|^~\\&|RIS|CORE-HOSP|GATEWAYD|CORE|20270101000000||SIU^{t}^SIU_{t}|{c}|P|2.5.1\r"
            "SCH|{p}^RIS||||||||||^^^{s}^{e}\r"
            "PID|1||ZZPIDRIS||ZZTEST^RIS\r"
            "RGS|1\r"
            "AIG|1||{st}^^L\r").format(t=trigger, c=f"{placer}-{trigger}", p=placer, s=start, e=end,
                                        st=station).encode()


def test_the_cores_own_ris_bookings_block_slots_for_the_clinics(gateway_factory, broker):
    from hl7msg import MllpConnection, msa

    hl7_port = gw.free_port()
    region = kiosk.Region(gateway_factory, broker,
                          core_extra={"hl7": {"listen": f"127.0.0.1:{hl7_port}"}}).start()
    clerk = region.staff_session("clinic-a", "clerk.siu")
    bundle = kiosk.wait_until(lambda: (b := clerk.slots("ct-1"))["total"] > 3 and b, 30, "slots")
    slot = bundle["entry"][3]["resource"]
    digits = lambda t: "".join(c for c in t[:16] if c.isdigit())  # local YYYYMMDDHHMM
    with MllpConnection(hl7_port) as c:
        assert msa(c.request(siu("S12", "A900", digits(slot["start"]), digits(slot["end"]))))[0] == "AA"
    kiosk.wait_until(lambda: slot["id"] not in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]], 10,
                     "the RIS-booked slot leaving the clinic's list")
    r = clerk.book("req-siu-1", slot["id"], PATIENT)
    assert r.status == 409 and r.json()["issue"][0]["code"] == "conflict", r
    with MllpConnection(hl7_port) as c:
        assert msa(c.request(siu("S15", "A900", digits(slot["start"]), digits(slot["end"]))))[0] == "AA"
    kiosk.wait_until(lambda: slot["id"] in [e["resource"]["id"] for e in clerk.slots("ct-1")["entry"]], 10,
                     "the slot back after the RIS cancelled")
    assert clerk.book("req-siu-2", slot["id"], PATIENT).status == 201
