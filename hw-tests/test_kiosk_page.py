"""The kiosk page in a real browser: headless Chromium (Debian's `chromium`) driven over the
DevTools protocol (`browser.py`) books an exam at a clinic gatewayd of a `kiosk.Region` (core +
one clinic on a real mosquitto), the way a clerk at the counter does.

Chromium trusts exactly the clinic kiosk's self-signed development certificate
(``--ignore-certificate-errors-spki-list`` with that certificate's SPKI hash), nothing else.
The patient is made up and marked ZZTEST (with a kanji and a kana name). A missing chromium
or websocket-client is a failure that says what to install, never a skip.

The screenshot of the booked page is kept under the test's tmp_path and copied to
``hw-tests/artifacts/kiosk-booked.png`` (ignored by git) for a person to look at.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

import browser
import kiosk
from conftest import fail_on_assertion
from test_booking import broker  # noqa: F401 - the regional mosquitto fixture

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

PATIENT_ID = "ZZPID-KIOSK-0001"
NAME_ALPHA = "ZZTEST^HANAKO"
NAME_KANJI = "試験^花子"
NAME_KANA = "しけん^はなこ"
BIRTH = "1970-03-04"

# Labels a clerk must see in both languages (Japanese first, as on the page).
LOGIN_LABELS = [("ログイン", "Log in"), ("職員ID", "Staff ID"), ("パスワード", "Password"),
                ("確認コード", "One-time code")]
BOOKING_LABELS = [("空き枠", "Free slots"), ("装置", "Scanner"), ("日付", "Day"), ("患者ID", "Patient ID"),
                  ("氏名 (漢字)", "Name (kanji)"), ("生年月日", "Birth date"), ("予約する", "Book"),
                  ("ログアウト", "Log out")]


def missing_labels(page: browser.Page, labels: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs of which a language is not among the visible text."""
    text = page.evaluate("document.body.innerText")
    return [pair for pair in labels if pair[0] not in text or pair[1] not in text]

JST = dt.timezone(dt.timedelta(hours=9))
# How the page formats an instant for staff (the browser's own locale and time zone).
LOCAL_FORMAT = "new Intl.DateTimeFormat(undefined, {dateStyle: 'medium', timeStyle: 'short'})"


@pytest.fixture
def chromium(tmp_path):
    """A Chromium trusting nothing extra yet; the test calls `trust` then `start`. Killed by
    PID (with its process group) at teardown."""
    made: list[browser.Chromium] = []

    def make(trust_spki: list[str]) -> browser.Chromium:
        c = fail_on_assertion(browser.Chromium, tmp_path / "chromium", trust_spki=trust_spki)
        made.append(c)
        return fail_on_assertion(c.start)

    yield make
    for c in made:
        c.stop()


def test_a_clerk_logs_in_and_books_an_exam_in_headless_chromium(
        tmp_path, gateway_factory, broker, chromium):  # noqa: F811 - broker is the imported fixture
    region = kiosk.Region(gateway_factory, broker).start()
    clinic = region.gateways["clinic-a"]
    port = region.ports["clinic-a"]
    secret = kiosk.add_staff(clinic, "clerk.page")
    # A second clerk checks through the API (the page's TOTP code is used up by its login).
    checker = region.staff_session("clinic-a", "clerk.check")
    day = (dt.datetime.now(JST) + dt.timedelta(days=1)).date().isoformat()
    kiosk.wait_until(lambda: checker.slots("ct-1")["total"] > 0, 30, "free slots at the clinic")

    cert = clinic.data_dir / "booking" / "kiosk-cert.pem"
    spki = browser.spki_sha256_b64(cert)
    c = chromium([spki])
    page = c.page()
    for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
        page.send(domain)
    page.send("Emulation.setDeviceMetricsOverride", width=1000, height=1400, deviceScaleFactor=1, mobile=False)
    origin = f"https://127.0.0.1:{port}"
    page.navigate(origin + "/")

    # The login form is what shows first, labelled in Japanese and English.
    page.wait_for("!document.getElementById('login-view').hidden", what="the login form")
    assert page.evaluate("document.getElementById('booking-view').hidden"), "booking shown before login"
    assert page.evaluate("document.documentElement.lang") == "ja"
    missing = missing_labels(page, LOGIN_LABELS)
    assert not missing, f"login labels missing in Japanese or English: {missing}"

    # The day shown at login has no free slot (late at night, or a day past the core's
    # horizon): the scanners are offered all the same.
    empty_day = "2031-01-01"
    page.evaluate(f"document.getElementById('slot-day').value = '{empty_day}'")

    # Log in with both factors, typed as a person types them.
    page.type_into("#login-name", "clerk.page")
    page.type_into("#login-password", kiosk.PASSWORD)
    page.type_into("#login-code", kiosk.totp(secret))
    page.click("#login-submit")
    page.wait_for("!document.getElementById('booking-view').hidden", what="the booking view after login")
    assert "clerk.page" in page.evaluate("document.getElementById('who-name').textContent")
    missing = missing_labels(page, BOOKING_LABELS)
    assert not missing, f"booking labels missing in Japanese or English: {missing}"

    page.wait_for(f"document.getElementById('slot-summary').dataset.day === '{empty_day}'",
                  what=f"the search of {empty_day} run at login")
    assert page.evaluate("document.querySelectorAll('#slot-list button[data-slot]').length") == 0
    # Pick the CT scanner and tomorrow (JST), search, see free slots.
    page.wait_for("[...document.querySelectorAll('#slot-schedule option')].some(o => o.value === 'ct-1')",
                  what="the CT scanner offered in the scanner list")
    page.choose("#slot-schedule", "ct-1")
    page.choose("#slot-day", day)
    page.click("#slot-search")
    # The list on show is the answer to this search (the page lists today's slots of every
    # scanner right after login), and has a few slots.
    page.wait_for(f"document.getElementById('slot-summary').dataset.day === '{day}' && "
                  "document.getElementById('slot-summary').dataset.schedule === 'ct-1'",
                  what=f"the free slots of ct-1 on {day}")
    page.wait_for("document.querySelectorAll('#slot-list button[data-slot]').length > 2",
                  what="free slots listed")
    summary = page.evaluate("document.getElementById('slot-summary').textContent")
    assert "空き枠" in summary and "free slots" in summary, summary
    assert page.evaluate("document.getElementById('slot-stale').hidden"), "fresh slots shown as stale"
    slots = page.evaluate("[...document.querySelectorAll('#slot-list button[data-slot]')]"
                          ".map(b => [b.dataset.slot, b.textContent])")
    assert all("ct-1" in label for _, label in slots), slots

    # Choose one, fill in the (made-up) patient, book.
    slot_id = slots[2][0]
    page.click(f"#slot-list button[data-slot='{slot_id}']")
    assert page.evaluate(f"document.querySelector(\"#slot-list button[data-slot='{slot_id}']\")"
                         ".getAttribute('aria-pressed')") == "true"
    assert slot_id in page.evaluate("document.getElementById('book-slot').textContent")
    page.type_into("#book-patient-id", PATIENT_ID)
    page.type_into("#book-name-alpha", NAME_ALPHA)
    page.type_into("#book-name-kanji", NAME_KANJI)
    page.type_into("#book-name-kana", NAME_KANA)
    page.choose("#book-birth", BIRTH)
    page.choose("#book-sex", "female")
    page.wait_for("!document.getElementById('book-submit').disabled", what="the Book button enabled")
    page.click("#book-submit")
    status = page.wait_for("document.getElementById('book-result').dataset.status", timeout=30,
                           what="an answer to the booking")
    result = page.evaluate("document.getElementById('book-result').textContent")
    assert status == "booked", f"the page says {result!r}"
    assert "予約しました" in result and "Booked" in result, result

    # The page lists the patient's bookings from the clinic.
    page.type_into("#list-patient-id", PATIENT_ID)
    page.click("#list-submit")
    rows = page.wait_for("[...document.querySelectorAll('#list-table tbody tr')]"
                         ".map(tr => [...tr.cells].map(td => td.textContent))", what="the bookings table")
    assert [(r[0], r[2]) for r in rows] == [(slot_id, "booked")], rows
    # Its results column asks the clinic's results (GET /fhir/ImagingStudy?based-on=...):
    # nothing has come back for an exam just booked, said in both languages, and a clerk
    # gets no button to open a report.
    results = page.wait_for(
        "(() => { const td = document.querySelector('#list-table tbody tr td.results');"
        " return td && td.dataset.state && [td.dataset.state, td.textContent,"
        " td.closest('tr').dataset.appointment]; })()",
        what="the booking's results state")
    assert results[0] == "none" and "結果未着" in results[1] and "No results yet" in results[1], results
    assert page.evaluate("document.querySelectorAll('button.open-report').length") == 0

    shot = page.screenshot(tmp_path / "kiosk-booked.png")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "kiosk-booked.png")

    # It is really booked at the clinic (and so confirmed by the core), as the API says.
    r = checker.request("GET", f"/fhir/Appointment?patient={PATIENT_ID}")
    assert r.status == 200, r
    booked = [e["resource"] for e in r.json()["entry"]]
    assert [(a["status"], a["slot"][0]["reference"]) for a in booked] == [("booked", f"Slot/{slot_id}")], booked
    assert any(i["system"] == "urn:gatewayd:accession" for i in booked[0]["identifier"]), booked
    assert results[2] == booked[0]["id"], (results, booked)
    # Its report is for physicians: the clerk is refused (403), a physician is answered (no
    # report yet: an empty Bundle), and both requests are in the audit trail, by appointment.
    report_query = f"/fhir/DiagnosticReport?based-on=Appointment/{booked[0]['id']}"
    r = checker.request("GET", report_query)
    assert r.status == 403 and r.json()["issue"][0]["code"] == "forbidden", r
    physician = region.staff_session("clinic-a", "dr.check", "physician")
    r = physician.request("GET", report_query)
    assert r.status == 200 and r.json()["total"] == 0, r
    trail = [json.loads(line) for line in (clinic.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    report_reads = [(x["actor"], x["outcome"], x.get("detail")) for x in trail
                    if x["action"] == "patient_record_read" and x.get("subject") == f"appointment:{booked[0]['id']}"]
    assert report_reads == [("clerk.check", "failure", "forbidden"), ("dr.check", "success", "no-report")], \
        report_reads
    # Times are shown in the browser's locale and zone (Intl.DateTimeFormat), never raw.
    start = booked[0]["start"]
    local = page.evaluate(f"{LOCAL_FORMAT}.format(new Date({json.dumps(start)}))")
    assert rows[0][1] == local and rows[0][1] != start, (rows, start)
    # A clerk has no account list.
    assert page.evaluate("document.getElementById('accounts-view').hidden"), "account list shown to a clerk"

    # The Content Security Policy let everything the page needs run: no console error, no
    # uncaught exception, no CSP violation report in the browser log.
    assert "default-src 'self'" in checker.request("GET", "/").headers["content-security-policy"]
    # The one expected entry: Chromium logs the page's session probe (`GET /api/me` -> 401
    # before login) as a failed resource load; that is how the page learns it must show the
    # login form, not a fault.
    problems = [p for p in page.problems() if not (p.startswith("log[network]:") and " 401 " in p + " "
                                                    and p.endswith("/api/me"))]
    assert not problems, "the page logged errors:\n" + "\n".join(problems)
    assert clinic.is_running() and region.core.is_running()


def test_an_admin_sees_a_locked_account_with_its_lock_end_in_local_time(
        tmp_path, gateway_factory, broker, chromium):  # noqa: F811 - broker is the imported fixture
    region = kiosk.Region(gateway_factory, broker).start()
    clinic = region.gateways["clinic-a"]
    port = region.ports["clinic-a"]
    admin_secret = kiosk.add_staff(clinic, "admin.page", "admin")
    kiosk.add_staff(clinic, "clerk.locked")
    # 20 failures from 5 addresses (4 each, below the per-address throttle) lock it.
    for i in range(20):
        r = kiosk.Kiosk(clinic, port, f"127.0.0.{10 + i // 4}").login(
            "clerk.locked", None, password="not the password", code="000000")
        assert r.status == 401, r
    listed = json.loads(kiosk.cli(clinic, "users", "list", "--json").stdout)
    until = next(a for a in listed if a["name"] == "clerk.locked")["locked_until_unix"]

    c = chromium([browser.spki_sha256_b64(clinic.data_dir / "booking" / "kiosk-cert.pem")])
    page = c.page()
    for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
        page.send(domain)
    page.navigate(f"https://127.0.0.1:{port}/")
    page.wait_for("!document.getElementById('login-view').hidden", what="the login form")
    page.type_into("#login-name", "admin.page")
    page.type_into("#login-password", kiosk.PASSWORD)
    page.type_into("#login-code", kiosk.totp(admin_secret))
    page.click("#login-submit")
    row = page.wait_for(
        "(() => { const tr = document.querySelector(\"#accounts-table tr[data-account='clerk.locked']\");"
        " return tr && [...tr.cells].map(td => td.textContent); })()",
        what="the locked account in the administrator's list")
    local = page.evaluate(f"{LOCAL_FORMAT}.format(new Date({until} * 1000))")
    assert "ロック中" in row[2] and "Locked" in row[2], row
    assert row[3] == local and str(until) not in " ".join(row), (row, until)
    admin_row = page.evaluate("[...document.querySelector(\"#accounts-table tr[data-account='admin.page']\").cells]"
                              ".map(td => td.textContent)")
    assert admin_row[3] == "", admin_row
    # A clinic keeps no identity registry: the page neither shows the identity section nor
    # asks its routes (they would answer 404 and log a network error in the console).
    assert page.evaluate("document.getElementById('identity-view').hidden"), "identity section shown at a clinic"
    asked = [p for p in page.problems() if "/api/identity" in p or "/fhir/Consent" in p]
    assert not asked, asked
