"""The fleet flow on the appliance image in QEMU: provisioned by claim, configured remotely, and
the new configuration still in force after a reboot.

Pins, on one image, one state disk and one swtpm state:
- the factory state on the state partition (the effective config with a `[fleet]` section
  pointing at `mqtts://broker.gw-test:PORT` with `client_auth = "keystore"`, the claim
  certificate + key, the vendor's command key and the broker CA) is all a box needs: it boots,
  `keys init` makes its TPM identity key, and it is provisioned by claim (`fleet.Provisioner`)
  through a real mosquitto on the host;
- the broker is a HOST NAME: the guest's systemd-resolved asks a real dnsmasq on the host
  (127.0.0.1, a port picked here, reached from the guest at 10.0.2.2 through QEMU user
  networking; never the host's own resolver nor QEMU's 10.0.2.3, see appliance.DnsServer), and
  the broker's certificate names broker.gw-test (rustls checks it);
- a signed `config-update` that adds `[hl7]` (0.0.0.0:2575, forwarded to a host port, with
  `[[hl7.peers]]` naming QEMU's 10.0.2.2, as production requires) is
  applied and reported successful; an MLLP message from the host then gets AA;
- the update wrote the effective config on the state partition and kept the previous one
  beside it (`CONFIG-SHA256:` from the probe: effective = the update, previous = the factory
  state's config);
- after a clean reboot (Ctrl-Alt-Del, a new QEMU on the same state.img and TPM state) the new
  configuration is still in force (AA again, same hashes) and the update is not reported again
  (its marker was committed before the first READY=1).

The first administrator of such a box (a second QEMU test, its own state disk and TPM; see its
docstring): a `config-update` turns the kiosk on, the vendor's signed `staff-invite` through the
broker returns a one-time code, headless Chromium on the host enrols at the box's kiosk (password
+ TOTP) and logs in; the spent code is refused, and so is an unused one in a boot whose clock is
73 h ahead (`Vm(rtc=...)`).

Without QEMU, with a real `gatewayd run` here: the files a power cut leaves in the middle of a
config-update (`FILE.previous`, the marker `FILE.update`, the new `FILE`) are finished at the
next start: a new file that cannot start (its DICOM port taken) is rolled back to the previous
bytes and the gateway serves; one that starts is kept and its marker removed; a cut before the
new file was in place leaves the old one serving and the marker cleared.

Bounded: every wait has a timeout and says what it waited for; qemu, swtpm, dnsmasq,
mosquitto and Chromium are killed by PID at teardown. A missing peer fails the test.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import re
import socket
import time

import pytest

import browser
import fleet
import gw
import kiosk
import pki
import scu
from appliance import (BOOT_TIMEOUT_S, BUILD_TIMEOUT_S, POWEROFF_TIMEOUT_S, RECIPE, STATUS_TIMEOUT_S, DnsServer, Vm,
                       fresh_state, rtc_base)
from hl7msg import MllpConnection, adt_a08, msa
from test_kiosk_page import chromium  # noqa: F401 - the headless Chromium fixture

BROKER_HOST = "broker.gw-test"
CLAIM = "claim-appliance-01"
PROVISIONED = "gw-appliance-0001"
STATE = "/var/lib/gatewayd"
HL7_GUEST_PORT = 2575
# Under TCG the in-process restart for a config-update (drain, TPM unseal, spool reopen) takes
# tens of seconds.
APPLY_TIMEOUT_S = 180


def broker_with_host_name(tmp_path, ca) -> fleet.Broker:
    """fleet.Broker whose server certificate names BROKER_HOST (what the guest connects to)
    and 127.0.0.1 (what the host's mosquitto_pub/sub connect to)."""
    broker = fleet.Broker(tmp_path / "broker", ca)
    key, csr, cert = (ca.dir / f"broker-dns.{ext}" for ext in ("key", "csr", "pem"))
    ca._ec_key(key)
    pki.openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=hw-tests/CN={BROKER_HOST}")
    ca._sign(csr, cert, [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        "extendedKeyUsage = serverAuth",
        f"subjectAltName = DNS:{BROKER_HOST}, IP:127.0.0.1",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
    ])
    conf = broker.conf.read_text()
    conf = conf.replace(f"certfile {broker.server.cert}\n", f"certfile {cert}\n")
    conf = conf.replace(f"keyfile {broker.server.key}\n", f"keyfile {key}\n")
    assert str(cert) in conf and str(key) in conf, conf
    broker.conf.write_text(conf)
    broker.server = pki.KeyPair(key, cert)
    return broker


def factory_config(image_config: str, broker_port: int) -> str:
    """The image's factory config plus the fleet section of a box that is not yet provisioned."""
    return image_config + (
        "\n[fleet]\n"
        f'broker = "mqtts://{BROKER_HOST}:{broker_port}"\n'
        f'vendor_public_key = "{STATE}/factory/vendor.pub"\n'
        f'ca_file = "{STATE}/factory/fleet-ca.pem"\n'
        'client_auth = "keystore"\n'
        f'claim_cert_file = "{STATE}/factory/claim.pem"\n'
        f'claim_key_file = "{STATE}/factory/claim.key"\n'
        'telemetry_interval = "5s"\n'
    )


def factory_files(factory: str, claim: pki.KeyPair, vendor: fleet.Vendor, ca: pki.CA) -> dict[str, bytes]:
    """The factory state of a box that is not yet provisioned, for `fresh_state`."""
    return {
        "config/gatewayd.toml": factory.encode(),
        "factory/claim.pem": claim.cert.read_bytes(),
        "factory/claim.key": claim.key.read_bytes(),
        "factory/vendor.pub": vendor.pub.read_bytes(),
        "factory/fleet-ca.pem": ca.cert.read_bytes(),
    }


def wait_online_by_claim(vm: Vm, device: fleet.Subscription, dns: DnsServer, broker: fleet.Broker, timeout: float) -> None:
    """The guest uses the test's DNS server and comes online as PROVISIONED (by claim)."""
    vm.wait_console(r"TEST-DNS: resolver set to 10\.0\.2\.2:\d+", timeout)
    try:
        device.wait_for(lambda s: [m for m in s.on(f"gw/{PROVISIONED}/status") if m.get("state") == "online"],
                        timeout, describe=f"{PROVISIONED} online after provisioning by claim")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{vm.tail()}\n--- dnsmasq:\n{dns.log_text()[-3000:]}\n"
                             f"--- mosquitto:\n{broker.log_tail(40)}") from None


def _hl7_ack(port: int, control_id: str) -> tuple[str, str] | str:
    try:
        with MllpConnection(port, timeout=20) as c:
            return msa(c.request(adt_a08(control_id).bytes, timeout=30))
    except (AssertionError, OSError) as e:
        return repr(e)


def _wait_aa(vm: Vm, control_id: str, timeout: float) -> float:
    port = vm.host_port(HL7_GUEST_PORT)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        vm.alive()
        last = _hl7_ack(port, control_id)
        if last == ("AA", control_id):
            return time.monotonic() - vm.started
        time.sleep(2)
    raise AssertionError(f"no AA for {control_id} on 127.0.0.1:{port} (guest {HL7_GUEST_PORT}) within "
                         f"{timeout} s (last: {last!r})\n{vm.tail()}")


def _config_hashes(vm: Vm) -> dict[str, str]:
    m = vm.wait_console(r"CONFIG-SHA256: effective (\S+) factory (\S+) previous (\S+)", STATUS_TIMEOUT_S)
    return {"effective": m.group(1), "factory": m.group(2), "previous": m.group(3)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.timeout(BUILD_TIMEOUT_S + 2 * BOOT_TIMEOUT_S + APPLY_TIMEOUT_S + POWEROFF_TIMEOUT_S + 300)
def test_appliance_is_provisioned_by_claim_configured_remotely_and_keeps_the_config_across_reboot(
        appliance_image, tmp_path, ca, vms):
    image = appliance_image
    broker = broker_with_host_name(tmp_path, ca)
    dns = DnsServer(tmp_path, {BROKER_HOST: "10.0.2.2"})
    provisioner = None
    subs: list[fleet.Subscription] = []
    try:
        broker.start()
        dns.start()
        vendor = fleet.Vendor(tmp_path / "vendor", broker)
        claim = broker.client_cert(CLAIM)
        factory = factory_config((RECIPE / "files" / "gatewayd.toml").read_text(), broker.port)
        state_img = fresh_state(image, tmp_path / "state.img", factory_files(factory, claim, vendor, ca))
        tpm_dir = tmp_path / "tpm"
        tpm_dir.mkdir()
        device = broker.subscribe("vendor", f"gw/{PROVISIONED}/#")
        subs.append(device)
        provisioner = fleet.Provisioner(broker, vendor, ca, [PROVISIONED])
        cmdline = dns.cmdline(resolve=BROKER_HOST)

        # ---- boot 1: the factory state; provisioning by claim through a host name
        vm = Vm(image, tmp_path, state_img, tpm_dir, "fleet1", forwards=(HL7_GUEST_PORT,), cmdline=cmdline)
        vms.append(vm)
        vm.start()
        wait_online_by_claim(vm, device, dns, broker, BOOT_TIMEOUT_S)
        provisioner.check()
        assert provisioner.assigned == {CLAIM: PROVISIONED}, provisioner.assigned
        online_s = time.monotonic() - vm.started
        print(f"boot 1: provisioned by claim and online {online_s:.0f} s after QEMU started")
        # The broker's host name was resolved by the test's DNS server, and only by it.
        resolved = vm.wait_console(rf"RESOLVE: {re.escape(BROKER_HOST)} (\S*) resolv\.conf (\S+)", STATUS_TIMEOUT_S)
        assert resolved.group(1) == "10.0.2.2", f"the guest resolved {BROKER_HOST} to {resolved.group(1)!r}\n{vm.tail()}"
        assert resolved.group(2) == "../run/systemd/resolve/stub-resolv.conf", resolved.group(0)
        assert f"query[A] {BROKER_HOST}" in dns.log_text(), dns.log_text()
        # resolved knows only the test's server: not QEMU's 10.0.2.3 that DHCP offers.
        servers = vm.wait_console(r"RESOLVE-SERVERS: (.*)$", STATUS_TIMEOUT_S).group(1)
        assert f"10.0.2.2:{dns.port}" in servers and "10.0.2.3" not in servers, f"resolvectl dns: {servers}"
        print(f"boot 1: {resolved.group(0)}; resolvectl dns: {servers.strip()}")
        assert f"u'{PROVISIONED}'" in broker.log_text(), "the box did not reconnect as the provisioned device"
        hashes = _config_hashes(vm)
        assert hashes["effective"] == _sha(factory) and hashes["previous"] == "none", hashes
        # No HL7 listener yet.
        assert _hl7_ack(vm.host_port(HL7_GUEST_PORT), "FLEET-0") != ("AA", "FLEET-0")

        # ---- the signed config-update that enables [hl7]
        # Production refuses a plain MLLP listener without an allow list: the host's sender
        # reaches the guest through QEMU's user networking, from its gateway 10.0.2.2.
        new_config = factory + (f'\n[hl7]\nlisten = "0.0.0.0:{HL7_GUEST_PORT}"\n'
                                '\n[[hl7.peers]]\nhost = "10.0.2.2"\n')
        cmd = "cfg-hl7-on"
        vendor.send(PROVISIONED, "config-update", cmd, vendor.envelope(PROVISIONED, "config-update", cmd,
                                                                       {"toml": new_config}))
        final = fleet.final_state(device, PROVISIONED, "config-update", cmd, timeout=APPLY_TIMEOUT_S)
        assert final["state"] == "successful", f"{final}\n{vm.tail()}"
        aa_s = _wait_aa(vm, "FLEET-1", APPLY_TIMEOUT_S)
        print(f"boot 1: config-update reported successful; HL7 AA {aa_s:.0f} s after QEMU started")
        reports = len(device.on(fleet.state_topic(PROVISIONED, "config-update", cmd)))
        status_topic = f"gw/{PROVISIONED}/status"
        onlines = len([m for m in device.on(status_topic) if m.get("state") == "online"])
        off_s = vm.power_off()
        print(f"boot 1: clean power-off took {off_s:.0f} s")

        # ---- boot 2: same state disk and TPM: the new config is still in force
        vm2 = Vm(image, tmp_path, state_img, tpm_dir, "fleet2", forwards=(HL7_GUEST_PORT,), cmdline=cmdline)
        vms.append(vm2)
        vm2.start()
        aa2_s = _wait_aa(vm2, "FLEET-2", BOOT_TIMEOUT_S)
        print(f"boot 2: HL7 AA {aa2_s:.0f} s after QEMU started")
        hashes2 = _config_hashes(vm2)
        assert hashes2 == {"effective": _sha(new_config), "factory": hashes["factory"],
                           "previous": _sha(factory)}, (
            f"the effective config after the reboot is not the update (previous kept): {hashes2}")
        assert hashes2["effective"] != hashes2["factory"]
        device.wait_for(lambda s: len([m for m in s.on(status_topic) if m.get("state") == "online"]) > onlines,
                        STATUS_TIMEOUT_S, describe="the device online again after the reboot")
        time.sleep(5)
        again = device.on(fleet.state_topic(PROVISIONED, "config-update", cmd))
        assert len(again) == reports, f"the config-update was reported again after the reboot: {again[reports:]}"
        vm2.power_off()
    finally:
        if provisioner is not None:
            provisioner.stop()
        for s in subs:
            s.stop()
        dns.stop()
        broker.stop()


# ---- the first administrator of a box with no console, on the image in QEMU

KIOSK_GUEST_PORT = 8443
ADMIN = "admin.first"
LATE = "clerk.late"
ENROL_CODE_RE = re.compile(r"^[A-Z2-7]{5}-[A-Z2-7]{5}-[A-Z2-7]{5}-[A-Z2-7]{5}$")
UNKNOWN_CODE = "AAAAA-BBBBB-CCCCC-DDDDD"
INVITE_VALID_S = 72 * 3600
# Boot 2's clock: an hour past the end of an invitation made in boot 1.
CLOCK_AHEAD_S = INVITE_VALID_S + 3600
# Under TCG an Argon2 hash (the invitation's secret, the password) takes seconds, a page load
# through the forwarded port several.
ENROL_STEP_TIMEOUT_S = 120


def _kiosk_me(port: int, cafile) -> kiosk.Response | str:
    """GET /api/me without a session (401 once the kiosk serves), or why it did not answer."""
    try:
        return kiosk.Kiosk(None, port, cafile=cafile).request("GET", "/api/me", timeout=20)
    except (OSError, http.client.HTTPException) as e:
        return repr(e)


def _wait_kiosk(vm: Vm, cafile, timeout: float) -> kiosk.Response:
    port = vm.host_port(KIOSK_GUEST_PORT)
    deadline = time.monotonic() + timeout
    last: kiosk.Response | str | None = None
    while time.monotonic() < deadline:
        vm.alive()
        last = _kiosk_me(port, cafile)
        if isinstance(last, kiosk.Response) and last.status == 401:
            return last
        time.sleep(2)
    raise AssertionError(f"the kiosk did not answer GET /api/me on https://127.0.0.1:{port} (guest "
                         f"{KIOSK_GUEST_PORT}) within {timeout} s (last: {last!r})\n{vm.tail()}")


@contextlib.contextmanager
def _console_on_failure(vm: Vm):
    """An AssertionError inside says what the guest's serial console (gatewayd's journal) ended with."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{e}\n{vm.tail()}") from None


def _guest_clock_offset(answer: kiosk.Response) -> float:
    """The guest's clock minus this host's, from the `Date` header of a kiosk answer (1 s)."""
    assert "date" in answer.headers, f"the kiosk's answer has no Date header: {answer.headers}"
    return email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp() - time.time()


@pytest.mark.timeout(BUILD_TIMEOUT_S + 2 * BOOT_TIMEOUT_S + APPLY_TIMEOUT_S + POWEROFF_TIMEOUT_S + 300)
def test_appliance_first_administrator_is_invited_over_the_fleet_and_enrols_at_the_kiosk_in_chromium(
        appliance_image, tmp_path, ca, vms, chromium):  # noqa: F811 - chromium is the imported fixture
    """The first administrator of a box in a clinic, with no console, on the image in QEMU.

    Boot 1 (the factory state, as in the test above, plus the kiosk's TLS certificate and key
    on the state partition under kiosk/; the certificate is the test CA's for 127.0.0.1, where
    the host reaches the forwarded kiosk): provisioned by claim; no kiosk yet; a signed
    `config-update` adds `[booking]` on 0.0.0.0:8443 with that certificate (production mode
    requires one) and the kiosk answers through the forwarded port; the vendor's signed
    `staff-invite` (admin) through the broker returns a one-time code on the result topic;
    headless Chromium on the host opens the box's kiosk page, enrols (code, password, the QR
    code and secret shown, the first TOTP code computed from the shown secret) and logs in with
    both factors; the same code again gets the answer an unknown code gets. A second invitation
    (a clerk) is made and left unused.

    Boot 2 (same state disk and TPM, clean power-off between): the guest's real-time clock is
    73 h ahead (`Vm(rtc=...)`; the image has no time synchronisation, and the kiosk's `Date`
    header shows the guest's clock), past the clerk's invitation's `expires_at`: its code gets
    the unknown-code answer, while the administrator enrolled in boot 1 still logs in with both
    factors, the TOTP code computed for the guest's clock.

    Neither code nor the TOTP secret is in the guest's journal (forwarded to the serial
    console) of either boot; the page logs no error but the 401 of /api/me before login.
    """
    image = appliance_image
    broker = broker_with_host_name(tmp_path, ca)
    dns = DnsServer(tmp_path, {BROKER_HOST: "10.0.2.2"})
    provisioner = None
    subs: list[fleet.Subscription] = []
    try:
        broker.start()
        dns.start()
        vendor = fleet.Vendor(tmp_path / "vendor", broker)
        claim = broker.client_cert(CLAIM)
        factory = factory_config((RECIPE / "files" / "gatewayd.toml").read_text(), broker.port)
        kiosk_tls = ca.server_cert("127.0.0.1", name="kiosk")
        files = factory_files(factory, claim, vendor, ca)
        files["kiosk/kiosk.pem"] = kiosk_tls.cert.read_bytes()
        files["kiosk/kiosk.key"] = kiosk_tls.key.read_bytes()
        state_img = fresh_state(image, tmp_path / "state.img", files)
        tpm_dir = tmp_path / "tpm"
        tpm_dir.mkdir()
        device = broker.subscribe("vendor", f"gw/{PROVISIONED}/#")
        subs.append(device)
        provisioner = fleet.Provisioner(broker, vendor, ca, [PROVISIONED])
        cmdline = dns.cmdline()

        # ---- boot 1: provisioned by claim, then the kiosk turned on remotely
        vm = Vm(image, tmp_path, state_img, tpm_dir, "enrol1", forwards=(KIOSK_GUEST_PORT,), cmdline=cmdline)
        vms.append(vm)
        vm.start()
        wait_online_by_claim(vm, device, dns, broker, BOOT_TIMEOUT_S)
        provisioner.check()
        assert provisioner.assigned == {CLAIM: PROVISIONED}, provisioner.assigned
        print(f"boot 1: provisioned by claim and online {time.monotonic() - vm.started:.0f} s after QEMU started")
        port = vm.host_port(KIOSK_GUEST_PORT)
        before = _kiosk_me(port, ca.cert)
        assert not isinstance(before, kiosk.Response), f"a kiosk answered before [booking] was configured: {before}"

        kiosk_config = factory + (
            "\n[booking]\n"
            f'listen = "0.0.0.0:{KIOSK_GUEST_PORT}"\n'
            f'cert_file = "{STATE}/kiosk/kiosk.pem"\n'
            f'key_file = "{STATE}/kiosk/kiosk.key"\n'
        )
        cmd = "cfg-kiosk-on"
        vendor.send(PROVISIONED, "config-update", cmd, vendor.envelope(PROVISIONED, "config-update", cmd,
                                                                       {"toml": kiosk_config}))
        final = fleet.final_state(device, PROVISIONED, "config-update", cmd, timeout=APPLY_TIMEOUT_S)
        assert final["state"] == "successful", f"{final}\n{vm.tail()}"
        offset1 = _guest_clock_offset(_wait_kiosk(vm, ca.cert, APPLY_TIMEOUT_S))
        print(f"boot 1: config-update successful; the kiosk answers {time.monotonic() - vm.started:.0f} s after "
              f"QEMU started; guest clock {offset1:+.0f} s")

        with _console_on_failure(vm):
            # The vendor invites the clinic's first administrator; the code comes back on .../result.
            t0 = time.monotonic()
            invited = fleet.staff_invite(vendor, device, PROVISIONED, ADMIN, "admin", "inv-admin",
                                         timeout=ENROL_STEP_TIMEOUT_S)
            code = invited["code"]
            assert ENROL_CODE_RE.match(code), invited
            assert invited["role"] == "admin", invited
            assert invited["expires_at"] - (time.time() + offset1) > INVITE_VALID_S - 3600, invited
            print(f"boot 1: staff-invite answered with a code in {time.monotonic() - t0:.1f} s")

            # The person with the code enrols at the box's kiosk in a real browser, then logs in.
            t0 = time.monotonic()
            c = chromium([browser.spki_sha256_b64(kiosk_tls.cert)])
            page = c.page()
            for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
                page.send(domain)
            page.send("Emulation.setDeviceMetricsOverride", width=1000, height=1400, deviceScaleFactor=1, mobile=False)
            shown = kiosk.enrol_in_page(page, f"https://127.0.0.1:{port}", code, clock_offset=offset1,
                                        timeout=ENROL_STEP_TIMEOUT_S)
            assert shown["name"] == ADMIN, shown
            assert re.fullmatch(r"[A-Z2-7]{32}", shown["secret"]), shown
            assert shown["uri"].startswith("otpauth://totp/") and f"secret={shown['secret']}" in shown["uri"], shown
            assert shown["qr_paths"] >= 1 and shown["qr_size"] >= 200, f"no QR code image on the page: {shown}"
            assert "Enrolment complete" in shown["done"], shown
            secret = shown["secret"]
            kiosk.login_in_page(page, ADMIN, secret, clock_offset=offset1, timeout=ENROL_STEP_TIMEOUT_S)
            assert ADMIN in page.evaluate("document.getElementById('who-name').textContent")
            print(f"boot 1: enrolled and logged in with both factors in Chromium in {time.monotonic() - t0:.1f} s")
            page.screenshot(tmp_path / "kiosk-logged-in.png")  # kept in the test's folder, for a look
            problems = [p for p in page.problems() if not (p.startswith("log[network]:") and " 401 " in p + " "
                                                            and p.endswith("/api/me"))]
            assert not problems, "the page logged errors:\n" + "\n".join(problems)

            # The code is spent: the answer an unknown code gets.
            k = kiosk.Kiosk(None, port, cafile=ca.cert)
            reused = kiosk.enrol_api(k, code)
            unknown = kiosk.enrol_api(k, UNKNOWN_CODE)
            assert unknown.status == 401, unknown
            assert (reused.status, reused.json()) == (unknown.status, unknown.json()), (reused, unknown)

            # An invitation left unused until it expires (boot 2).
            late = fleet.staff_invite(vendor, device, PROVISIONED, LATE, "clerk", "inv-late",
                                      timeout=ENROL_STEP_TIMEOUT_S)
            assert ENROL_CODE_RE.match(late["code"]), late
        off_s = vm.power_off()
        print(f"boot 1: clean power-off took {off_s:.0f} s")

        # ---- boot 2: the same box, its clock past the invitation's 72 h
        vm2 = Vm(image, tmp_path, state_img, tpm_dir, "enrol2", forwards=(KIOSK_GUEST_PORT,), cmdline=cmdline,
                 rtc=rtc_base(CLOCK_AHEAD_S))
        vms.append(vm2)
        vm2.start()
        offset2 = _guest_clock_offset(_wait_kiosk(vm2, ca.cert, BOOT_TIMEOUT_S))
        print(f"boot 2: the kiosk answers {time.monotonic() - vm2.started:.0f} s after QEMU started; "
              f"guest clock {offset2:+.0f} s")
        assert time.time() + offset2 > late["expires_at"], (
            f"the guest's clock ({offset2:+.0f} s) is not past the invitation's expiry {late['expires_at']}")
        with _console_on_failure(vm2):
            port2 = vm2.host_port(KIOSK_GUEST_PORT)
            k2 = kiosk.Kiosk(None, port2, cafile=ca.cert)
            expired = kiosk.enrol_api(k2, late["code"])
            unknown2 = kiosk.enrol_api(k2, UNKNOWN_CODE)
            assert unknown2.status == 401, unknown2
            assert (expired.status, expired.json()) == (unknown2.status, unknown2.json()), (expired, unknown2)
            # The administrator enrolled in boot 1 logs in, the TOTP code for the guest's clock.
            login = k2.login(ADMIN, secret, code=kiosk.totp(secret, time.time() + offset2))
            assert login.status == 200, f"the enrolled administrator cannot log in after the reboot: {login}"
            me = k2.request("GET", "/api/me")
            assert me.status == 200 and ADMIN in me.body.decode(errors="replace"), me
        vm2.power_off()
        # gatewayd's journal goes to the serial console: no enrolment code nor TOTP secret in it.
        for name, text in (("boot 1", vm.console_text()), ("boot 2", vm2.console_text())):
            assert "gatewayd" in text, f"no gatewayd lines on the {name} console"
            for what, value in (("enrolment code", code), ("enrolment code", late["code"]),
                                ("TOTP secret", secret)):
                for variant in (value, value.replace("-", "")):
                    assert variant not in text, f"the {what} is in the guest's journal ({name} console)"
    finally:
        if provisioner is not None:
            provisioner.stop()
        for s in subs:
            s.stop()
        dns.stop()
        broker.stop()


# ---- the same rules with a real `gatewayd run` on this machine (no QEMU): what a power cut in
# the middle of a config-update leaves on disk (gateway_config::update), and the next start.

def _leave_interrupted_update(g, previous: str, new: str, written: bool, cmd_id: str = "cfg-cut") -> None:
    """The files ConfigFile::apply leaves when the power goes after the marker (`written`:
    also after the new file replaced the old one), before the services started from it."""
    path = g.config_path
    path.with_name(path.name + ".previous").write_text(previous)
    path.with_name(path.name + ".update").write_text(f"{cmd_id}\n{new}")
    path.write_text(new if written else previous)


def test_an_interrupted_update_that_cannot_start_is_rolled_back_at_the_next_start(gateway_factory):
    g = gateway_factory(start=False)
    previous = g.config_path.read_text()
    marker = g.config_path.with_name(g.config_path.name + ".update")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        new = previous.replace(f'listen = "127.0.0.1:{g.dicom_port}"', f'listen = "127.0.0.1:{taken}"')
        assert new != previous
        _leave_interrupted_update(g, previous, new, written=True)
        g.start()
        assert g.config_path.read_text() == previous, "the previous config was not restored"
        assert not marker.exists(), "the update marker survived the rollback"
        assert "restoring the previous one" in g.log_text(), g.log_tail()
        assert scu.echoscu(g.dicom_port, timeout=20).returncode == 0, g.log_tail()
    g.stop()


def test_an_interrupted_update_that_starts_is_kept_and_its_marker_committed(gateway_factory):
    g = gateway_factory(start=False)
    previous = g.config_path.read_text()
    marker = g.config_path.with_name(g.config_path.name + ".update")
    port = gw.free_port()
    new = previous.replace(f'listen = "127.0.0.1:{g.dicom_port}"', f'listen = "127.0.0.1:{port}"')
    _leave_interrupted_update(g, previous, new, written=True)
    g.start()
    assert g.config_path.read_text() == new
    assert not marker.exists(), "the marker was not removed once every service started"
    assert scu.echoscu(port, timeout=20).returncode == 0, g.log_tail()
    g.stop()
    # Cut before the new file was in place: the old one serves, the marker is cleared.
    _leave_interrupted_update(g, new, previous, written=False)
    g.dicom_port = port
    g.start()
    assert g.config_path.read_text() == new and not marker.exists()
    assert scu.echoscu(port, timeout=20).returncode == 0, g.log_tail()
    g.stop()
