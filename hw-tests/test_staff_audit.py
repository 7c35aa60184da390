"""Kiosk staff accounts and the audit trail, through `gatewayd users ...` and `gatewayd audit verify`.

- `users add` reads the password from stdin, refuses weak ones and bad names, stores only an
  Argon2id hash; `users enroll-totp` prints a 160-bit base32 secret and its otpauth URI;
  the accounts file holds neither the password nor the secret; `users list` shows no secret;
- every change is an audit record; `audit verify` says intact, and names the damage after a
  record is edited, two are swapped, one is deleted in the middle or the last one is deleted;
  while the trail is damaged `users add` refuses and changes nothing.

Login itself (both factors, lockout, replay) is unit-tested in gateway/staff; the kiosk that
uses it comes with the booking service.
"""

from __future__ import annotations

import base64
import json
import subprocess

import gw

PASSWORD = "correct horse battery staple"


def users(g: gw.Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [g.binary, "users", *args, "--config", str(g.config_path)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=g.workdir,
    )


def audit_verify(g: gw.Gateway) -> tuple[int, dict, str]:
    r = g.cli("audit", "verify", "--config", str(g.config_path), "--json")
    text = g.cli("audit", "verify", "--config", str(g.config_path)).stdout
    return r.returncode, json.loads(r.stdout), text


def test_accounts_are_added_enrolled_and_disabled_with_an_audit_record_each(gateway):
    g = gateway
    r = users(g, "add", "--name", "clerk.sato", "--role", "clerk", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    bad = users(g, "add", "--name", "clerk.ito", "--role", "clerk", stdin="short\n")
    assert bad.returncode == 1 and "at least 12 characters" in bad.stderr, bad.stderr
    bad = users(g, "add", "--name", "Clerk Ito", "--role", "clerk", stdin=PASSWORD + "\n")
    assert bad.returncode == 1 and "account names are" in bad.stderr, bad.stderr
    bad = users(g, "add", "--name", "root", "--role", "root", stdin=PASSWORD + "\n")
    assert bad.returncode == 1 and "roles are" in bad.stderr, bad.stderr

    r = users(g, "enroll-totp", "--name", "clerk.sato")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    secret, uri = lines["secret"], lines["uri"]
    assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri, uri
    assert len(base64.b32decode(secret + "=" * (-len(secret) % 8))) == 20, "160-bit secret"
    stored = (g.data_dir / "staff" / "accounts.json").read_text()
    assert PASSWORD not in stored and secret not in stored
    assert "$argon2id$" in stored

    r = users(g, "disable", "--name", "clerk.sato")
    assert r.returncode == 0, r.stderr
    listed = json.loads(users(g, "list", "--json").stdout)
    assert listed == [{"name": "clerk.sato", "role": "clerk", "totp_enrolled": True, "disabled": True, "locked": False, "invited": False}]

    rc, report, text = audit_verify(g)
    assert rc == 0 and report == {"records": 3, "problem": None}, (report, text)
    assert "3 records, intact" in text
    records = [json.loads(line) for line in (g.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [r["action"] for r in records] == ["account_added", "totp_enrolled", "account_disabled"]
    assert all(r["actor"] == "local-admin" and r["subject"] == "account:clerk.sato" for r in records)


def test_audit_verify_names_edited_reordered_and_deleted_records(gateway):
    g = gateway
    for name in ("clerk.a", "clerk.b", "clerk.c", "clerk.d"):
        assert users(g, "add", "--name", name, "--role", "clerk", stdin=PASSWORD + "\n").returncode == 0
    log = g.data_dir / "audit" / "audit.jsonl"
    good = log.read_text()
    lines = good.splitlines(keepends=True)
    assert audit_verify(g)[0] == 0

    log.write_text(good.replace("account:clerk.b", "account:clerk.x"))
    rc, report, text = audit_verify(g)
    assert rc == 1 and report["problem"] == {"kind": "edited", "line": 2, "seq": 2}, text
    assert "record 2 (line 2) was changed" in text
    # A damaged trail is not appended to: the account is not added either.
    r = users(g, "add", "--name", "clerk.e", "--role", "clerk", stdin=PASSWORD + "\n")
    assert r.returncode == 1 and "damaged" in r.stderr, r.stderr
    assert "clerk.e" not in users(g, "list").stdout

    log.write_text("".join([lines[0], lines[2], lines[1], lines[3]]))
    rc, report, text = audit_verify(g)
    assert rc == 1 and report["problem"]["kind"] in ("missing", "out_of_order"), text

    log.write_text("".join([lines[0], lines[1], lines[3]]))
    rc, report, text = audit_verify(g)
    assert rc == 1 and report["problem"] == {"kind": "missing", "line": 3, "from_seq": 3, "to_seq": 3}, text

    log.write_text("".join(lines[:3]))
    rc, report, text = audit_verify(g)
    assert rc == 1 and report["problem"] == {"kind": "truncated", "last_seq": 3, "head_seq": 4}, text
    assert "records deleted at the end" in text

    log.write_text(good)
    assert audit_verify(g)[0] == 0
    assert users(g, "add", "--name", "clerk.e", "--role", "clerk", stdin=PASSWORD + "\n").returncode == 0
    rc, report, _ = audit_verify(g)
    assert rc == 0 and report["records"] == 5
