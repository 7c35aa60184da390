"""The kiosk login as a client on the LAN sees it, against a real `gatewayd run`.

- An unknown name, a wrong password, a wrong code and a locked account get the same raw
  answer: status, every header but `Date`, and body bytes; and the locked and unknown
  answers are not visibly faster than a wrong password (each costs one Argon2 check and
  one durable write; `gateway-staff`'s unit test counts them, this checks the clock).
- One client address that keeps failing is throttled (429 with `Retry-After`, even for
  the right credentials) while another address still logs in, and no account is locked by
  it.

Clients use several loopback source addresses (127.0.0.x): the kiosk counts failures per
TCP peer address.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time

import kiosk
from test_staff_accounts import kiosk_gateway

WRONG = "not the password!"
# gateway_staff::MAX_FAILURES and the kiosk's per-address throttle (kiosk::throttle::FAILURES).
LOCK_AFTER = 20
THROTTLE_AFTER = 5
# Rounds of the timing comparison; clerk.a gets one wrong password per round and two
# before, which must stay below LOCK_AFTER.
TIMING_ROUNDS = 15


class Addresses:
    """Fresh loopback source addresses, one batch of attempts each."""

    def __init__(self, first: int):
        self.next = first

    def take(self) -> str:
        n = self.next
        self.next += 1
        return f"127.0.{n // 250}.{1 + n % 250}"


def comparable(r: kiosk.Response) -> tuple:
    headers = {k: v for k, v in r.headers.items() if k != "date"}
    return r.status, sorted(headers.items()), r.body


def test_unknown_wrong_and_locked_answers_are_identical_on_the_wire(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    secret = kiosk.add_staff(g, "clerk.a")
    locked_secret = kiosk.add_staff(g, "clerk.locked")
    g.start()
    addrs = Addresses(100)
    # Lock clerk.locked from several addresses, each below its throttle.
    done = 0
    while done < LOCK_AFTER:
        k = kiosk.Kiosk(g, port, addrs.take())
        for _ in range(min(THROTTLE_AFTER - 1, LOCK_AFTER - done)):
            assert k.login("clerk.locked", None, password=WRONG, code="000000").status == 401
            done += 1
    wrong_code = "000000" if kiosk.totp(secret) != "000000" else "111111"

    def ask(kind: str) -> kiosk.Response:
        k = kiosk.Kiosk(g, port, addrs.take())
        if kind == "unknown":
            return k.login("nobody.here", secret)
        if kind == "wrong-password":
            return k.login("clerk.a", secret, password=WRONG)
        if kind == "wrong-code":
            return k.login("clerk.a", None, code=wrong_code)
        return k.login("clerk.locked", locked_secret)  # the right credentials, but locked

    kinds = ["unknown", "wrong-password", "wrong-code", "locked"]
    answers = {kind: ask(kind) for kind in kinds}
    first = comparable(answers["unknown"])
    assert first[0] == 401, answers["unknown"]
    for kind in kinds:
        assert comparable(answers[kind]) == first, (kind, answers[kind], answers["unknown"])
    assert b"locked" not in first[2] and b"unknown" not in first[2], first

    # Timing: every refusal costs one Argon2 verification (~15 ms here) and one durable
    # write; a path that skipped the verification would answer in a few ms. Each round
    # times the three kinds on one kept-alive connection from a fresh address (below its
    # throttle), so the TLS handshake is not in the times, in an order rotated each round
    # so that a burst of load on the machine falls on every kind alike; the medians over
    # TIMING_ROUNDS rounds are compared with a wide margin.
    code = kiosk.totp(secret)
    bodies = {
        "unknown": {"name": "nobody.here", "password": kiosk.PASSWORD, "code": code},
        "wrong-password": {"name": "clerk.a", "password": WRONG, "code": code},
        "locked": {"name": "clerk.locked", "password": kiosk.PASSWORD,
                   "code": kiosk.totp(locked_secret)},
    }
    timed = list(bodies)
    times: dict[str, list[float]] = {kind: [] for kind in timed}
    ctx = kiosk.Kiosk(g, port).ctx
    for r in range(TIMING_ROUNDS):  # clerk.a stays below its lock (see TIMING_ROUNDS)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30,
                                           source_address=(addrs.take(), 0))
        try:
            conn.request("GET", "/openapi.json")
            assert conn.getresponse().read()
            for kind in timed[r % 3:] + timed[:r % 3]:
                t0 = time.monotonic()
                conn.request("POST", "/api/login", body=json.dumps(bodies[kind]).encode(),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                times[kind].append(time.monotonic() - t0)
                assert resp.status == 401, (kind, resp.status)
        finally:
            conn.close()
    medians = {kind: round(statistics.median(ts) * 1000, 1) for kind, ts in times.items()}
    print("login refusal medians (ms):", medians)
    for kind in ("unknown", "locked"):
        assert medians[kind] > 0.5 * medians["wrong-password"], (
            f"{kind} refusals are answered much faster than wrong passwords (medians in ms: "
            f"{medians}): a path skips the Argon2 verification or the write")

    # The administrator sees the lock and when it ends.
    admin_secret = kiosk.add_staff(g, "admin.a", "admin")
    admin = kiosk.Kiosk(g, port, addrs.take())
    assert admin.login("admin.a", admin_secret).status == 200
    listed = {a["name"]: a for a in admin.request("GET", "/api/accounts").json()}
    assert listed["clerk.locked"]["locked"] is True, listed
    assert listed["clerk.locked"]["locked_until_unix"] > time.time(), listed
    assert listed["clerk.a"]["locked"] is False and "locked_until_unix" not in listed["clerk.a"], listed


def test_one_address_is_throttled_and_no_account_is_locked_by_it(gateway_factory):
    g, port = kiosk_gateway(gateway_factory)
    secret = kiosk.add_staff(g, "clerk.b")
    admin_secret = kiosk.add_staff(g, "admin.b", "admin")
    g.start()
    a = kiosk.Kiosk(g, port, "127.0.0.2")
    for i in range(THROTTLE_AFTER):
        r = a.login("clerk.b", None, password=WRONG, code="000000")
        assert r.status == 401 and "retry-after" not in r.headers, (i, r)
    for _ in range(3):
        r = a.login("clerk.b", secret)
        assert r.status == 429, r
        assert 0 < int(r.headers["retry-after"]) <= 15 * 60, r.headers
        assert r.json()["issue"][0]["code"] == "throttled", r
    # Another address is not throttled, and the account is not locked.
    b = kiosk.Kiosk(g, port, "127.0.0.3")
    assert b.login("clerk.b", secret).status == 200
    admin = kiosk.Kiosk(g, port, "127.0.0.4")
    assert admin.login("admin.b", admin_secret).status == 200
    listed = {x["name"]: x for x in admin.request("GET", "/api/accounts").json()}
    assert listed["clerk.b"]["locked"] is False, listed
