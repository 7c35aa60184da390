"""The first administrator of a box with no console, end to end with real peers.

A gatewayd with `[fleet]` on a real mosquitto (TLS, client certificates, per-device ACL; the
vendor side of `fleet.py` signs commands with an openssl-made Ed25519 key) and its kiosk on
HTTPS:

- the vendor's signed `staff-invite` creates an invited administrator; its one-time
  enrolment code comes back on the command's result topic;
- headless Chromium (`browser.py`) completes the enrolment on the kiosk page as the person
  with the code does (code and password, the QR code and secret shown, the authenticator's
  first code computed from the shown secret), then logs in with both factors and, as an
  administrator, invites a clerk from the page (the code shown once);
- the same code again, and an expired code, are refused with the one answer an unknown code
  gets. Expiry: the invitation's `expires_unix` in `staff/accounts.json` is moved into the
  past under the accounts lock, as 72 hours passing would leave it (the daemon reads the
  file on every call; there is no test clock in the product);
- the vendor's signed `staff-disable` ends the browser's session at its next request and
  makes the next login with valid factors fail;
- the audit trail (`gatewayd audit verify` intact) has each step, and no code appears in
  gatewayd's log, the accounts file, the audit trail or any state message.

A missing mosquitto, chromium or websocket-client is a failure saying what to install.
"""

from __future__ import annotations

import fcntl
import json
import re
import time

import browser
import fleet
import gw
import kiosk
from test_fleet import DEVICE, broker, fleet_section, vendor, wait_online, watch  # noqa: F401 - fixtures
from test_kiosk_page import chromium  # noqa: F401 - the headless Chromium fixture
from test_staff_accounts import kiosk_gateway

CODE_RE = re.compile(r"^[A-Z2-7]{5}-[A-Z2-7]{5}-[A-Z2-7]{5}-[A-Z2-7]{5}$")
ADMIN = "admin.first"


def kiosk_fleet_gateway(gateway_factory, broker, vendor) -> tuple[gw.Gateway, int]:  # noqa: F811
    port = gw.free_port()
    g = gateway_factory({
        "node": {"id": DEVICE, "role": "core"},
        "booking": {"listen": f"127.0.0.1:{port}",
                    "schedule": [{"id": "ct-1", "modality": "CT", "station_ae": "CT01",
                                  "hours": kiosk.EVERY_DAY}]},
        "fleet": fleet_section(broker, vendor),
    }, start=False)
    r = kiosk.cli(g, "keys", "init")
    assert r.returncode == 0, r.stderr
    g.start()
    return g, port


def expire_invitation(g: gw.Gateway, name: str) -> None:
    """Moves ``name``'s invitation expiry into the past, under the accounts lock."""
    staff = g.data_dir / "staff"
    with open(staff / "accounts.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads((staff / "accounts.json").read_text())
        account = next(a for a in doc["accounts"] if a["name"] == name)
        assert "invite" in account, account
        account["invite"]["expires_unix"] = int(time.time()) - 1
        tmp = staff / "accounts.json.test-tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(staff / "accounts.json")


def audit_records(g: gw.Gateway) -> list[dict]:
    return [json.loads(line) for line in (g.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]


def test_staff_invite_over_the_fleet_then_enrolment_and_login_in_chromium_and_staff_disable(
        tmp_path, gateway_factory, broker, vendor, watch, chromium):  # noqa: F811 - fixtures
    g, port = kiosk_fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    assert wait_online(sub)["state"] == "online"

    # The vendor invites the clinic's first administrator; the code comes back on .../result.
    invited = fleet.staff_invite(vendor, sub, DEVICE, ADMIN, "admin", "inv-1")
    code = invited["code"]
    assert CODE_RE.match(code), invited
    assert invited["role"] == "admin"
    assert invited["expires_at"] - time.time() > 71 * 3600, invited

    # Bad arguments are refused by the signed-command checks, nothing is created.
    final, _ = fleet.staff_command(vendor, sub, DEVICE, "staff-invite", "inv-bad",
                                   {"name": "admin first", "role": "admin"})
    assert (final["state"], final.get("code")) == ("failed", "bad-args"), final
    final, _ = fleet.staff_command(vendor, sub, DEVICE, "staff-invite", "inv-bad-role",
                                   {"name": "admin.x", "role": "root"})
    assert (final["state"], final.get("code")) == ("failed", "bad-args"), final

    # The person with the code enrols in a real browser and logs in with both factors.
    cert = g.data_dir / "booking" / "kiosk-cert.pem"
    c = chromium([browser.spki_sha256_b64(cert)])
    page = c.page()
    for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
        page.send(domain)
    page.send("Emulation.setDeviceMetricsOverride", width=1000, height=1400, deviceScaleFactor=1, mobile=False)
    origin = f"https://127.0.0.1:{port}"
    shown = kiosk.enrol_in_page(page, origin, code)
    assert shown["name"] == ADMIN, shown
    assert re.fullmatch(r"[A-Z2-7]{32}", shown["secret"]), shown
    assert shown["uri"].startswith("otpauth://totp/") and f"secret={shown['secret']}" in shown["uri"], shown
    assert shown["qr_paths"] >= 1 and shown["qr_size"] >= 200, f"no QR code image on the page: {shown}"
    assert "Enrolment complete" in shown["done"], shown
    secret = shown["secret"]
    kiosk.login_in_page(page, ADMIN, secret)
    assert ADMIN in page.evaluate("document.getElementById('who-name').textContent")

    # As an administrator, invite a clerk from the page: the code is shown once.
    page.wait_for("!document.getElementById('invite-view').hidden", what="the invitation form for an admin")
    page.type_into("#invite-name", "clerk.second")
    page.click("#invite-submit")
    page.wait_for("!document.getElementById('invite-result').hidden", what="the clerk's code shown")
    clerk_code = page.evaluate("document.getElementById('invite-code').textContent")
    assert CODE_RE.match(clerk_code), clerk_code
    problems = [p for p in page.problems() if not (p.startswith("log[network]:") and " 401 " in p + " "
                                                    and p.endswith("/api/me"))]
    assert not problems, "the page logged errors:\n" + "\n".join(problems)

    # A reused code and an expired code get the one answer an unknown code gets.
    k = kiosk.Kiosk(g, port)
    reused = kiosk.enrol_api(k, code)
    unknown = kiosk.enrol_api(k, "AAAAA-BBBBB-CCCCC-DDDDD")
    assert reused.status == 401 and reused.status == unknown.status, (reused, unknown)
    assert reused.json() == unknown.json(), (reused, unknown)
    late = fleet.staff_invite(vendor, sub, DEVICE, "clerk.late", "clerk", "inv-late")
    expire_invitation(g, "clerk.late")
    expired = kiosk.enrol_api(k, late["code"])
    assert (expired.status, expired.json()) == (401, unknown.json()), expired
    # Re-inviting replaces the code: the old one is refused, the new one works.
    again = fleet.staff_invite(vendor, sub, DEVICE, "clerk.late", "clerk", "inv-late-2")
    assert kiosk.enrol_api(k, late["code"]).status == 401
    fresh = kiosk.enrol_api(k, again["code"])
    assert fresh.status == 200 and fresh.json()["name"] == "clerk.late", fresh
    # An account that completed its enrolment cannot be invited again over the fleet.
    final, _ = fleet.staff_command(vendor, sub, DEVICE, "staff-invite", "inv-again",
                                   {"name": ADMIN, "role": "admin"})
    assert (final["state"], final.get("code")) == ("failed", "exists"), final

    # staff-disable locks the account remotely: valid factors no longer log in.
    final, result = fleet.staff_command(vendor, sub, DEVICE, "staff-disable", "dis-1", {"name": ADMIN})
    assert final["state"] == "successful", final
    assert result == {"name": ADMIN, "disabled": True}, result
    # The browser's session of the disabled account ends at its next request.
    me = page.evaluate("fetch('/api/me', {credentials: 'same-origin'}).then(r => r.status)", await_promise=True)
    assert me == 401, f"the disabled account's session still answers {me}"
    api = kiosk.Kiosk(g, port)
    refused = api.login(ADMIN, secret, code=kiosk.totp(secret, time.time() + 30))
    assert refused.status == 401, refused
    listed = {a["name"]: a for a in json.loads(kiosk.cli(g, "users", "list", "--json").stdout)}
    assert listed[ADMIN]["disabled"] and not listed[ADMIN]["invited"], listed
    assert listed["clerk.second"]["invited"], listed

    # The audit trail has every step, and is intact.
    records = audit_records(g)
    steps = [(r["actor"], r["action"], r["outcome"]) for r in records]
    for expected in [
        ("vendor", "account_invited", "success"),
        (ADMIN, "enrolment_code_used", "success"),
        (ADMIN, "enrolment_completed", "success"),
        (ADMIN, "login", "success"),
        (ADMIN, "account_invited", "success"),
        ("kiosk-enrolment", "enrolment_code_used", "failure"),
        ("vendor", "account_invited", "failure"),
        ("vendor", "account_disabled", "success"),
    ]:
        assert expected in steps, f"{expected} not in the audit trail: {steps}"
    last_login = [r for r in records if r["action"] == "login"][-1]
    assert (last_login["actor"], last_login["outcome"], last_login["detail"]) == (ADMIN, "failure", "disabled"), \
        last_login
    verify = kiosk.cli(g, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # No code anywhere but the result topic and the page that showed it.
    codes = [code, clerk_code, late["code"], again["code"]]
    places = {
        "gatewayd log": g.log_text(),
        "accounts file": (g.data_dir / "staff" / "accounts.json").read_text(),
        "audit trail": (g.data_dir / "audit" / "audit.jsonl").read_text(),
        "state messages": json.dumps([m for t, m in sub.messages() if t.endswith("/state")]),
    }
    for c_ in codes:
        for variant in (c_, c_.replace("-", "")):
            for where, text in places.items():
                assert variant not in text, f"an enrolment code is in the {where}"
    assert g.is_running()


def test_users_invite_prints_a_code_on_a_development_machine(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    r = kiosk.cli(g, "users", "invite", "--name", "admin.dev", "--role", "admin")
    assert r.returncode == 0, r.stderr
    code = r.stdout.split("): ", 1)[1].splitlines()[0].strip()
    assert CODE_RE.match(code), r.stdout
    bad = kiosk.cli(g, "users", "invite", "--name", "admin.dev2", "--role", "root")
    assert bad.returncode != 0 and "roles are clerk, physician and admin" in bad.stderr, bad.stderr
    g.start()
    k = kiosk.Kiosk(g, port)
    weak = kiosk.enrol_api(k, code, password="short")
    assert weak.status == 422 and weak.json()["issue"][0]["code"] == "too-short", weak
    started = kiosk.enrol_api(k, code)
    assert started.status == 200, started
    secret = started.json()["secret"]
    done = k.request("POST", "/api/enrol/confirm", {"code": code, "totp": kiosk.totp(secret)})
    assert done.status == 200, done
    assert k.login("admin.dev", secret, code=kiosk.totp(secret, time.time() + 30)).status == 200
    assert code not in g.log_text() and code not in (g.data_dir / "staff" / "accounts.json").read_text()

    # Guessing codes from one address is throttled (429, Retry-After) after five failures,
    # while logins from the same address still work.
    r = kiosk.cli(g, "users", "invite", "--name", "clerk.dev", "--role", "clerk", "--json")
    assert r.returncode == 0, r.stderr
    clerk_code = json.loads(r.stdout)["code"]
    for _ in range(5):
        assert kiosk.enrol_api(k, "AAAAA-BBBBB-CCCCC-DDDDD").status == 401
    blocked = kiosk.enrol_api(k, clerk_code)
    assert blocked.status == 429 and int(blocked.headers["retry-after"]) > 0, blocked
    # (The login bucket is separate: whatever the code's fate, the answer is not a 429.)
    assert k.login("admin.dev", secret, code=kiosk.totp(secret, time.time() + 60)).status != 429
    assert g.is_running()
