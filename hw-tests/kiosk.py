"""Talking to a gateway's kiosk (HTTPS) as staff, and the regional booking setup.

`Kiosk` is a small HTTPS client (the standard library's ``http.client``) that trusts only
the gateway's own kiosk certificate (the development one in
``<data_dir>/booking/kiosk-cert.pem``) and keeps the session cookie. `totp` computes the
RFC 6238 code of a base32 secret as an authenticator app would. `Region` builds a core and
some clinics on one regional mosquitto (`fleet.Broker` with the booking ACL below), each
gateway authenticated by a test-CA certificate whose CN is its node id, with each other's
exchange public keys (`gatewayd keys exchange-public`) in ``[[exchange.peers]]``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import fleet
import gw

PASSWORD = "correct horse battery staple"

# The regional broker's ACL: a gateway (user = its certificate's CN = node id) writes only
# under its own id, reads its own inbox, every core's slots and status; `vendor` is the
# broker's admin (reads everything, for the traffic-capture test).
REGIONAL_ACL = (
    "user vendor\n"
    "topic read #\n"
    "\n"
    "pattern readwrite bk/%u/#\n"
    "pattern write bk/+/req/%u/#\n"
    "pattern write bk/+/resp/%u/#\n"
    "pattern read bk/+/slots/#\n"
    "pattern read bk/+/status\n"
)

EVERY_DAY = {d: "00:00-23:59" for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def totp(secret_b32: str, at: float | None = None, step: int = 30, digits: int = 6) -> str:
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    counter = int((time.time() if at is None else at) // step)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF) % (10 ** digits)
    return str(code).zfill(digits)


def cli(g: gw.Gateway, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([g.binary, *args, "--config", str(g.config_path)], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=g.workdir)


def add_staff(g: gw.Gateway, name: str, role: str = "clerk") -> str:
    """Adds an account with a TOTP second factor; returns the base32 secret."""
    r = cli(g, "users", "add", "--name", name, "--role", role, stdin=PASSWORD + "\n")
    assert r.returncode == 0, f"users add {name}: {r.stderr}"
    r = cli(g, "users", "enroll-totp", "--name", name)
    assert r.returncode == 0, f"users enroll-totp {name}: {r.stderr}"
    return dict(line.split(": ", 1) for line in r.stdout.splitlines())["secret"]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class Kiosk:
    """One browser-less session against ``https://127.0.0.1:<port>``, connecting from
    ``source`` (another loopback address such as ``127.0.0.2``: the kiosk throttles failed
    logins per client address) or from the system's choice. ``cafile``: what to trust
    instead of ``g``'s development kiosk certificate (then ``g`` may be None), e.g. the CA
    of the certificate a kiosk in a QEMU guest serves through a forwarded port."""

    def __init__(self, g: gw.Gateway | None, port: int, source: str | None = None,
                 cafile: Path | None = None):
        self.g, self.port, self.source = g, port, source
        self.cookie: str | None = None
        if cafile is None:
            assert g is not None, "Kiosk: give the gateway or the cafile to trust"
            cafile = g.data_dir / "booking" / "kiosk-cert.pem"
        self.ctx = ssl.create_default_context(cafile=str(cafile))

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float = 30.0) -> Response:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=timeout,
                                           source_address=(self.source, 0) if self.source else None)
        h = {"Accept": "application/fhir+json, application/json"}
        if body is not None:
            h["Content-Type"] = "application/json"
        if self.cookie:
            h["Cookie"] = self.cookie
        h.update(headers or {})
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            payload = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        if "set-cookie" in hdrs:
            self.cookie = hdrs["set-cookie"].split(";", 1)[0]
        return Response(r.status, hdrs, payload)

    def login(self, name: str, secret: str | None, password: str = PASSWORD, code: str | None = None) -> Response:
        if code is None:
            code = totp(secret) if secret else ""
        return self.request("POST", "/api/login", {"name": name, "password": password, "code": code})

    def slots(self, schedule: str | None = None) -> dict:
        q = f"?status=free&schedule={schedule}" if schedule else "?status=free"
        r = self.request("GET", "/fhir/Slot" + q)
        assert r.status == 200, r
        return r.json()

    def book(self, request_id: str, slot_id: str, patient: dict, hold: bool = False,
             ack: list[str] | None = None) -> Response:
        """`$book` (or `$hold`); `ack`: the safety warning ids a physician acknowledges."""
        body = {
            "resourceType": "Appointment",
            "identifier": [{"value": request_id}],
            "slot": [{"reference": f"Slot/{slot_id}"}],
            "serviceType": [{"text": "CT chest with contrast"}],
            "contained": [{
                "resourceType": "Patient", "id": "patient",
                "identifier": [{"value": patient["id"]}],
                "name": [{"text": patient["name"]}],
                "birthDate": patient["birth_date"],
                "gender": patient.get("gender", "female"),
            }],
        }
        if ack:
            body["extension"] = [{"url": ACKNOWLEDGED_WARNING, "valueString": i} for i in ack]
        return self.request("POST", "/fhir/Appointment/$hold" if hold else "/fhir/Appointment/$book", body)


# The extension a physician's acknowledgement of a safety warning travels in.
ACKNOWLEDGED_WARNING = "urn:gatewayd:acknowledged-warning"


def wait_until(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


class Region:
    """A core and clinics on one regional broker (see the module docs)."""

    def __init__(self, gateway_factory, broker: fleet.Broker, clinics: tuple[str, ...] = ("clinic-a",),
                 core: str = "core-1", request_timeout: str = "5s", stale_after: str = "4s",
                 core_extra: dict | None = None):
        self.broker = broker
        self.core_id = core
        self.ports: dict[str, int] = {}
        self.gateways: dict[str, gw.Gateway] = {}
        names = (core, *clinics)
        for name in names:
            port = gw.free_port()
            cert = broker.client_cert(name)
            exchange = {
                "broker": f"mqtts://127.0.0.1:{broker.port}",
                "ca_file": str(broker.ca.cert),
                "client_auth": "files",
                "cert_file": str(cert.cert),
                "key_file": str(cert.key),
            }
            if name == core:
                booking = {"listen": f"127.0.0.1:{port}", "publish_interval": "1s",
                           "schedule": [{"id": "ct-1", "modality": "CT", "station_ae": "CT01", "hours": EVERY_DAY},
                                        {"id": "mr-1", "modality": "MR", "station_ae": "MR01", "hours": EVERY_DAY}]}
                node = {"id": name, "role": "core"}
            else:
                booking = {"listen": f"127.0.0.1:{port}", "request_timeout": request_timeout,
                           "stale_after": stale_after}
                node = {"id": name, "role": "clinic"}
            overrides = {"node": node, "booking": booking, "exchange": exchange}
            if name == core:
                overrides.update(core_extra or {})
            g = gateway_factory(overrides, start=False, name=name)
            r = cli(g, "keys", "init")
            assert r.returncode == 0, r.stderr
            self.ports[name] = port
            self.gateways[name] = g
        public = {}
        for name, g in self.gateways.items():
            r = cli(g, "keys", "exchange-public")
            assert r.returncode == 0, r.stderr
            public[name] = r.stdout.strip()
        for name, g in self.gateways.items():
            peers = [{"id": other, "public_key": public[other]} for other in names if other != name]
            if name != core:
                peers = [p for p in peers if p["id"] == core]
                g.config["booking"]["core"] = core  # valid only once the core is a peer
            g.config["exchange"]["peers"] = peers
            g.config_path.write_text(gw.to_toml(g.config))

    @property
    def core(self) -> gw.Gateway:
        return self.gateways[self.core_id]

    def start(self) -> "Region":
        for g in self.gateways.values():
            g.start()
        return self

    def kiosk(self, name: str, source: str | None = None) -> Kiosk:
        return Kiosk(self.gateways[name], self.ports[name], source)

    def staff_session(self, name: str, account: str, role: str = "clerk") -> Kiosk:
        secret = add_staff(self.gateways[name], account, role)
        k = self.kiosk(name)
        r = k.login(account, secret)
        assert r.status == 200, r
        return k


# --- enrolment of invited accounts (the page and the API), for any host and port ----------


def enrol_api(k: Kiosk, code: str, password: str = PASSWORD) -> Response:
    """``POST /api/enrol``: the first step of an enrolment, without a browser."""
    return k.request("POST", "/api/enrol", {"code": code, "password": password})


def enrol_in_page(page, origin: str, code: str, password: str = PASSWORD, clock_offset: float = 0.0,
                  timeout: float | None = None) -> dict:
    """Completes an enrolment on the kiosk page at ``origin`` (``https://host:port``) in a
    `browser.Page`, as the person with the code does: code and password, then the QR code
    and secret shown, then the authenticator's first code (for the gateway's clock: this
    host's plus ``clock_offset`` seconds). ``timeout``: for each page load and wait instead
    of the defaults (a slow gateway, e.g. one in an emulated guest). Returns what the page
    showed: ``{name, secret, uri, qr_paths, done}``."""
    page.navigate(origin + "/#enrol", **({"timeout": timeout} if timeout else {}))
    page.wait_for("!document.getElementById('enrol-view').hidden", timeout=timeout or 15.0,
                  what="the enrolment form")
    # The page also asks /api/me at load; from a slow gateway its 401 may come after the form
    # is shown. A late answer must leave the form where it is (the login form stays hidden),
    # or a person's click lands on whatever moved under it.
    kept = page.evaluate("refreshMe().then(() => document.getElementById('login-view').hidden"
                         " && !document.getElementById('enrol-view').hidden)", await_promise=True)
    assert kept, "the login form came back over the enrolment form when /api/me answered 401"
    page.type_into("#enrol-code", code)
    page.type_into("#enrol-password", password)
    page.type_into("#enrol-password2", password)
    page.click("#enrol-submit")
    page.wait_for("!document.getElementById('enrol-totp').hidden", timeout=timeout or 30.0,
                  what="the second factor shown after the code and password")
    shown = page.evaluate(
        "({name: document.getElementById('enrol-name').textContent,"
        " secret: document.getElementById('enrol-secret').textContent,"
        " uri: document.getElementById('enrol-uri').textContent,"
        " qr_paths: document.querySelectorAll('#enrol-qr svg path').length,"
        " qr_size: (() => { const s = document.querySelector('#enrol-qr svg');"
        "   if (!s) return 0; const r = s.getBoundingClientRect(); return Math.min(r.width, r.height); })()})")
    page.type_into("#enrol-totp-code", totp(shown["secret"], time.time() + clock_offset))
    page.click("#enrol-confirm")
    page.wait_for("!document.getElementById('enrol-done').hidden", timeout=timeout or 30.0,
                  what="the enrolment confirmed")
    shown["done"] = page.evaluate("document.getElementById('enrol-done').textContent")
    return shown


def login_in_page(page, name: str, secret: str, password: str = PASSWORD, clock_offset: float = 0.0,
                  timeout: float | None = None) -> None:
    """Logs in on the page with both factors. Uses the next TOTP step's code (the code that
    confirmed an enrolment is spent; the gateway accepts one step of skew) of the gateway's
    clock (this host's plus ``clock_offset`` seconds). ``timeout``: as for `enrol_in_page`."""
    page.wait_for("!document.getElementById('login-view').hidden", timeout=timeout or 15.0,
                  what="the login form")
    page.type_into("#login-name", name)
    page.type_into("#login-password", password)
    page.type_into("#login-code", totp(secret, time.time() + clock_offset + 30))
    page.click("#login-submit")
    page.wait_for("!document.getElementById('booking-view').hidden", timeout=timeout or 30.0,
                  what=f"{name} logged in")
