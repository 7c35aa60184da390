"""The fleet agent against a real mosquitto (TLS, client certificates, per-device ACL).

The vendor side (`fleet.py`) signs commands with an Ed25519 key made by the
openssl CLI and publishes them with mosquitto_pub; mosquitto_sub watches the
device's topics. The gateway authenticates to the broker with a client
certificate of the test CA whose CN is its node id (`client_auth = "files"`,
development mode), so the ACL pattern `gw/%u/#` confines it to its own topics.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

import data
import fleet
import gw
import hl7msg
import scu
from conftest import fail_on_assertion
from hl7msg import MllpConnection, adt_a08, msa
from test_hl7_forward import DEST, Peer

DEVICE = "test-gw"
OTHER = "other-gw"
DISABLE_DEADLINE_S = 5.0


@pytest.fixture
def broker(tmp_path, ca):
    fail_on_assertion(fleet.require_tools)
    b = fail_on_assertion(fleet.Broker, tmp_path / "broker", ca)
    fail_on_assertion(b.start)
    yield b
    b.stop()


@pytest.fixture
def vendor(tmp_path, broker):
    return fleet.Vendor(tmp_path / "vendor", broker)


@pytest.fixture
def watch(broker):
    """The vendor's view of everything the device publishes (and what it is sent)."""
    subs: list[fleet.Subscription] = []

    def make(topic: str = f"gw/{DEVICE}/#", as_user: str = "vendor") -> fleet.Subscription:
        s = broker.subscribe(as_user, topic)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.stop()


def fleet_section(broker: fleet.Broker, vendor: fleet.Vendor, interval: str = "1s") -> dict:
    me = broker.client_cert(DEVICE)
    return {
        "broker": f"mqtts://127.0.0.1:{broker.port}",
        "vendor_public_key": str(vendor.pub),
        "ca_file": str(broker.ca.cert),
        "client_auth": "files",
        "cert_file": str(me.cert),
        "key_file": str(me.key),
        "telemetry_interval": interval,
    }


def fleet_gateway(gateway_factory, broker, vendor, extra: dict | None = None, start: bool = True) -> gw.Gateway:
    hl7_port = gw.free_port()
    overrides = {"hl7": {"listen": f"127.0.0.1:{hl7_port}"}, "fleet": fleet_section(broker, vendor)}
    overrides.update(extra or {})
    g = gateway_factory(overrides, start=start)
    g.hl7_port = hl7_port
    return g


def wait_online(sub: fleet.Subscription, timeout: float = 20.0) -> dict:
    topic = f"gw/{DEVICE}/status"
    return sub.wait_for(lambda s: next((m for m in reversed(s.on(topic)) if m.get("state") in ("online", "disabled")), None),
                        timeout, describe=f"retained status on {topic}")


def command(vendor, sub, op: str, cmd_id: str, payload: bytes | None = None, args: dict | None = None,
            device: str = DEVICE, timeout: float = 15.0, to: str = DEVICE) -> dict:
    """Signs ``op`` for ``device`` and sends it on the command topic of ``to``."""
    payload = payload if payload is not None else vendor.envelope(device, op, cmd_id, args)
    seen = len(sub.on(fleet.state_topic(to, op, cmd_id)))
    vendor.send(to, op, cmd_id, payload)
    return fleet.final_state(sub, to, op, cmd_id, timeout, after=seen)


def echo_ok(g: gw.Gateway) -> bool:
    return scu.echoscu(g.dicom_port, timeout=20).returncode == 0


def hl7_accepts(g: gw.Gateway, control_id: str) -> bool:
    try:
        with MllpConnection(g.hl7_port, timeout=5) as c:
            ack = c.request(adt_a08(control_id).bytes, timeout=5)
            return msa(ack) == ("AA", control_id)
    except (AssertionError, OSError):
        return False


def hl7_refused(g: gw.Gateway) -> bool:
    """The listener closes a new connection without answering (or refuses it)."""
    try:
        with MllpConnection(g.hl7_port, timeout=5) as c:
            try:
                c.send(adt_a08("REFUSED-1").bytes)
            except OSError:
                return True
            return c.is_closed_by_peer(3.0)
    except OSError:
        return True


def assert_disabled_everywhere(g: gw.Gateway) -> None:
    r = scu.echoscu(g.dicom_port, timeout=20)
    assert r.returncode != 0, f"echoscu succeeded on a disabled gateway:\n{r.stdout}{r.stderr}"
    answer = scu.raw_associate(g.dicom_port)
    assert answer.is_rejected, f"association not rejected while disabled: {answer}"
    # rejected-transient (2), service user (1), no reason given (1)
    assert (answer.result, answer.source, answer.reason) == (2, 1, 1), answer
    assert hl7_refused(g), "the HL7 listener still takes connections while disabled"


# --------------------------------------------------------------------------


def test_signed_disable_stops_dicom_hl7_and_uploads_within_5s_survives_restart_and_enable_restores(
        tmp_path, gateway_factory, broker, vendor, watch):
    peer = Peer(tmp_path / "peer", None)  # plain MLLP destination for the uploads
    peer.start()
    try:
        up = {"name": DEST, "kind": "mllp-tls", "url": f"mllp://127.0.0.1:{peer.port}"}
        g = fleet_gateway(gateway_factory, broker, vendor, {"uplink": [up]})
        sub = watch()
        assert wait_online(sub)["state"] == "online"
        assert echo_ok(g)
        assert hl7_accepts(g, "BEFORE-1")
        gw_poll(lambda: [c for c, _ in peer.received()] == ["BEFORE-1"], 30, "first message forwarded")

        # Queue messages while the destination is down, so there is something to upload.
        peer.stop()
        assert hl7_accepts(g, "QUEUED-1") and hl7_accepts(g, "QUEUED-2")

        t0 = time.monotonic()
        final = command(vendor, sub, "disable", "dis-1", args={"reason": "contract ended"})
        assert final["state"] == "successful", final
        assert time.monotonic() - t0 < DISABLE_DEADLINE_S, "disable took longer than 5 s to complete"
        assert_disabled_everywhere(g)
        status = wait_online(sub)
        assert status["state"] == "disabled" and status["reason"] == "contract ended", status

        # The destination comes back: nothing is uploaded while disabled.
        peer.start()
        time.sleep(6)
        assert [c for c, _ in peer.received()] == ["BEFORE-1"], "uploads continued while disabled"
        assert g.status()["by_destination"][DEST]["queued"] == 2

        # Restart: still disabled, before and after the broker connection is up.
        g.restart()
        assert_disabled_everywhere(g)
        time.sleep(3)
        assert [c for c, _ in peer.received()] == ["BEFORE-1"], "uploads resumed after restart while disabled"

        final = command(vendor, sub, "enable", "en-1")
        assert final["state"] == "successful", final
        assert echo_ok(g)
        assert hl7_accepts(g, "AFTER-1")
        gw_poll(lambda: [c for c, _ in peer.received()] == ["BEFORE-1", "QUEUED-1", "QUEUED-2", "AFTER-1"],
                90, "queued messages forwarded after enable")
        assert wait_online(sub)["state"] == "online"
    finally:
        peer.stop()


def gw_poll(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def test_bad_commands_end_failed_with_a_reason_and_change_nothing(tmp_path, gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    impostor = fleet.Vendor(tmp_path / "impostor", broker, name="impostor")

    # A good command first, to have a sequence number to replay.
    good = vendor.envelope(DEVICE, "status", "ok-1")
    assert command(vendor, sub, "status", "ok-1", payload=good)["state"] == "successful"
    last = vendor.seq

    cases = {
        "unsigned": vendor.envelope(DEVICE, "disable", "bad-unsigned", signed=False),
        "bad-signature": vendor.envelope(DEVICE, "disable", "bad-wrongkey", signer=impostor),
        "expired": vendor.envelope(DEVICE, "disable", "bad-expired", expires_at=int(time.time()) - 5),
        "replayed-same": vendor.envelope(DEVICE, "disable", "bad-replay-same", seq=last),
        "replayed-lower": vendor.envelope(DEVICE, "disable", "bad-replay-lower", seq=last - 1),
        "other-device": vendor.envelope(OTHER, "disable", "bad-other"),
    }
    expected_code = {
        "unsigned": "unsigned", "bad-signature": "bad-signature", "expired": "expired",
        "replayed-same": "replayed", "replayed-lower": "replayed", "other-device": "other-device",
    }
    ids = {"unsigned": "bad-unsigned", "bad-signature": "bad-wrongkey", "expired": "bad-expired",
           "replayed-same": "bad-replay-same", "replayed-lower": "bad-replay-lower", "other-device": "bad-other"}
    state_file = g.data_dir / "fleet" / "state.json"
    before = state_file.read_bytes()
    for name, payload in cases.items():
        final = command(vendor, sub, "disable", ids[name], payload=payload)
        assert final["state"] == "failed", (name, final)
        assert final["code"] == expected_code[name], (name, final)
        assert final["reason"], (name, final)
        # Nothing changed: still serving, state file byte-identical.
        assert state_file.read_bytes() == before, name
    assert echo_ok(g)
    assert hl7_accepts(g, "STILL-1")
    # The replayed *successful* command itself is refused too.
    final = command(vendor, sub, "status", "ok-1", payload=good)
    assert (final["state"], final["code"]) == ("failed", "replayed"), final
    assert json.loads(state_file.read_text())["last_seq"] == last
    assert not json.loads(state_file.read_text())["disabled"]


def test_status_publishes_a_snapshot_and_telemetry_flows_on_the_devices_own_topic(gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    telemetry_topic = f"gw/{DEVICE}/telemetry"
    samples = sub.wait_for(lambda s: len(s.on(telemetry_topic)) >= 3 and s.on(telemetry_topic), 15,
                           describe="three telemetry samples (interval 1s)")
    t = samples[-1]
    assert t["version"] and t["uptime_secs"] >= 1
    assert t["keystore"] == {"backend": "software", "tamper": "intact"}
    assert t["disk_free_bytes"] > 0
    # Counters follow real traffic: one HL7 message accepted, one C-ECHO association.
    assert hl7_accepts(g, "TELE-1")
    assert echo_ok(g)
    counted = sub.wait_for(
        lambda s: [m for m in s.on(telemetry_topic)
                   if m["hl7"]["accepted_total"] >= 1 and m["spool"]["objects"] >= 1
                   and m["dicom"]["associations_total"] >= 1],
        15, describe="telemetry counting the HL7 message and the C-ECHO association")
    c = counted[-1]
    assert c["hl7"]["messages_total"] >= 1 and c["hl7"]["rejected_total"] == 0
    assert c["dicom"]["associations_active"] == 0 and c["dicom"]["store_failures_total"] == 0
    # No patient data: the message's name and control id appear nowhere on the broker.
    for topic, payload in sub.messages():
        assert "ZZTEST" not in payload and "TELE-1" not in payload, (topic, payload)
    final = command(vendor, sub, "status", "st-1")
    assert final["state"] == "successful", final
    result = sub.wait_for(lambda s: s.on(f"gw/{DEVICE}/cmd/status/st-1/result"), 10, describe="status result")
    assert result[-1]["state"] == "online" and result[-1]["telemetry"]["version"] == t["version"]
    # No other topics than the scheme's.
    for topic, _ in sub.messages():
        assert topic == f"gw/{DEVICE}/status" or topic == telemetry_topic or topic.startswith(f"gw/{DEVICE}/cmd/"), topic
    g.stop()
    gone = sub.wait_for(lambda s: [m for m in s.on(f"gw/{DEVICE}/status") if m.get("state") == "offline"], 10,
                        describe="offline status after stop")
    assert gone[-1]["reason"] == "shutdown"


def test_a_device_cannot_publish_or_subscribe_to_another_devices_topics(gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    vendor_view = watch()
    wait_online(vendor_view)
    # Another device (its own valid certificate) tries to read this gateway's topics...
    spy = watch(f"gw/{DEVICE}/#", as_user=OTHER)
    # ... and, as a positive control, its own.
    own = watch(f"gw/{OTHER}/#", as_user=OTHER)
    time.sleep(1.0)
    # It replays a validly signed disable onto this gateway's command topic.
    payload = vendor.envelope(DEVICE, "disable", "intruder-1")
    r = broker.publish(OTHER, f"gw/{DEVICE}/cmd/disable/intruder-1", payload)
    assert r.returncode == 0, r.stderr
    assert broker.publish(OTHER, f"gw/{OTHER}/telemetry", b'{"ok":true}').returncode == 0
    own.wait_for(lambda s: s.on(f"gw/{OTHER}/telemetry"), 10, describe="the other device's own telemetry")
    vendor_view.wait_for(lambda s: len(s.on(f"gw/{DEVICE}/telemetry")) >= 3, 15, describe="telemetry samples")
    assert spy.messages() == [], f"another device read this gateway's topics: {spy.messages()[:3]}"
    assert not vendor_view.on(f"gw/{DEVICE}/cmd/disable/intruder-1/state"), "the intruder's publish reached the gateway"
    assert echo_ok(g)
    log = broker.log_text()
    assert f"Denied PUBLISH from" in log and f"'gw/{DEVICE}/cmd/disable/intruder-1'" in log, broker.log_tail()


def test_broker_down_then_up_the_agent_reconnects_and_dicom_hl7_keep_working(gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    sub.stop()
    broker.stop()
    time.sleep(3)
    assert echo_ok(g)
    assert hl7_accepts(g, "DOWN-1")
    time.sleep(5)
    assert echo_ok(g) and g.is_running()
    broker.start()
    sub = watch()
    online = wait_online(sub, timeout=90)  # backoff is at most 60 s
    assert online["state"] == "online"
    final = command(vendor, sub, "status", "after-outage")
    assert final["state"] == "successful", final
    assert hl7_accepts(g, "UP-1")


def test_signed_wipe_shreds_the_keys_leaves_sealed_objects_unreadable_and_refuses_service(
        tmp_path, gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    files = data.make_ct_set(2, tmp_path / "in", "ct")
    r = scu.storescu(g.dicom_port, [f.path for f in files])
    assert r.returncode == 0, r.stdout + r.stderr
    uid = files[0].sop_instance_uid
    g.export(uid, tmp_path / "before.dcm")  # readable before the wipe
    blobs = g.sealed_files()
    assert blobs, "no sealed object on disk to wipe"

    final = command(vendor, sub, "wipe", "wipe-1")
    assert final["state"] == "successful", final
    # The daemon stops by itself (its in-memory master key goes with it).
    gw_poll(lambda: not g.is_running(), 20, "gatewayd exiting after the wipe")
    status = sub.wait_for(lambda s: s.on(f"gw/{DEVICE}/status"), 5, describe="status")[-1]
    assert status["state"] == "wiped", status
    # The sealed blobs are still on disk, and nothing can open them.
    assert all(p.exists() for p in blobs)
    r = g.export(uid, tmp_path / "after.dcm", check=False)
    assert r.returncode != 0, f"spool export still works after the wipe:\n{r.stdout}{r.stderr}"
    assert not (tmp_path / "after.dcm").exists() or (tmp_path / "after.dcm").stat().st_size == 0
    code, _, v = g.verify()
    assert code != 0, f"spool verify passed after the wipe:\n{v.stdout}{v.stderr}"
    # And it refuses to serve again.
    g.start(wait=False)
    gw_poll(lambda: not g.is_running(), 20, "gatewayd refusing to start on a wiped box")
    assert "wiped" in g.log_tail(5), g.log_tail(20)
    assert not echo_ok(g)


def test_config_update_with_an_invalid_config_is_refused_with_the_validation_errors(gateway_factory, broker, vendor,
                                                                                    watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    before = g.config_path.read_bytes()
    bad = (
        "[node]\nid = \"test-gw\"\ndata_dir = \"/tmp/nowhere\"\nmode = \"development\"\n"
        "[dicom]\nlisten = \"not an address\"\n"
        "[spool]\nmax_bytes = \"20 gigs\"\n"
    )
    final = command(vendor, sub, "config-update", "cfg-bad", args={"toml": bad})
    assert (final["state"], final["code"]) == ("failed", "config-invalid"), final
    assert "dicom.listen" in final["reason"] and "spool.max_bytes" in final["reason"], final
    result = sub.wait_for(lambda s: s.on(f"gw/{DEVICE}/cmd/config-update/cfg-bad/result"), 10,
                          describe="config-update result")[-1]
    keys = sorted(p.split(":", 1)[0] for p in result["problems"])
    assert keys == ["dicom.listen", "spool.max_bytes"], result
    # A valid document for another device id is refused too: the id is the identity.
    other = g.config_path.read_text().replace('id = "test-gw"', 'id = "someone-else"')
    assert other != g.config_path.read_text()
    final = command(vendor, sub, "config-update", "cfg-id", args={"toml": other})
    assert (final["state"], final["code"]) == ("failed", "config-invalid"), final
    assert "node.id" in final["reason"], final
    # Nothing changed, and the gateway still serves.
    assert g.config_path.read_bytes() == before
    assert echo_ok(g) and hl7_accepts(g, "CFG-1")


def test_signed_restart_restarts_every_service_in_the_same_process(gateway_factory, broker, vendor, watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    assert hl7_accepts(g, "RST-1")
    pid = g.pid
    readies = g.log_text().count("gatewayd ready")
    final = command(vendor, sub, "restart", "rst-1")
    assert final["state"] == "successful", final
    gw_poll(lambda: g.log_text().count("gatewayd ready") == readies + 1, 30, "a second 'gatewayd ready'")
    assert g.is_running() and g.pid == pid
    # Everything serves again: spool reopened, listeners bound, agent reconnected.
    assert echo_ok(g)
    assert hl7_accepts(g, "RST-2")
    assert hl7_accepts(g, "RST-1")  # a duplicate is recognised: the same spool index
    g.wait_ready()
    assert g.status()["objects"] == 2
    sub.wait_for(lambda s: [m for m in s.on(f"gw/{DEVICE}/status") if m.get("state") == "offline"], 10,
                 describe="offline status during the restart")
    assert wait_online(sub)["state"] == "online"
    # The consumed sequence number survives: replaying the restart is refused.
    payload = vendor.envelope(DEVICE, "status", "rst-replay", seq=vendor.seq)
    final = command(vendor, sub, "status", "rst-replay", payload=payload)
    assert (final["state"], final["code"]) == ("failed", "replayed"), final


def test_config_update_applies_a_valid_config_and_rolls_back_one_that_cannot_bind(gateway_factory, broker, vendor,
                                                                                 watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    original = g.config_path.read_text()
    old_port = g.dicom_port

    # 1. A valid config that moves the DICOM listener: applied, services restarted on it.
    new_port = gw.free_port()
    moved = original.replace(f'listen = "127.0.0.1:{old_port}"', f'listen = "127.0.0.1:{new_port}"')
    assert moved != original
    final = command(vendor, sub, "config-update", "cfg-move", args={"toml": moved}, timeout=40)
    assert final["state"] == "successful", final
    assert g.config_path.read_text() == moved
    g.dicom_port = new_port
    assert echo_ok(g)
    assert scu.echoscu(old_port, timeout=10).returncode != 0, "the old DICOM port still answers"

    # 2. A valid config whose DICOM port is taken: rolled back, reported failed, still serving.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        clash = moved.replace(f'listen = "127.0.0.1:{new_port}"', f'listen = "127.0.0.1:{taken}"')
        final = command(vendor, sub, "config-update", "cfg-clash", args={"toml": clash}, timeout=40)
        assert (final["state"], final["code"]) == ("failed", "config-rollback"), final
        assert str(taken) in final["reason"], final
    assert g.config_path.read_text() == moved, "the previous configuration was not restored"
    assert g.is_running()
    assert echo_ok(g)
    assert hl7_accepts(g, "CFG-ROLLBACK-1")


def test_log_upload_publishes_the_last_lines_of_the_local_log_without_patient_data(gateway_factory, broker, vendor,
                                                                                  watch):
    g = fleet_gateway(gateway_factory, broker, vendor)
    sub = watch()
    wait_online(sub)
    assert hl7_accepts(g, "LOG-1")  # ZZTEST^TARO goes through the gateway
    assert echo_ok(g)
    final = command(vendor, sub, "log-upload", "log-1", args={"lines": 20})
    assert final["state"] == "successful", final
    result = sub.wait_for(lambda s: s.on(f"gw/{DEVICE}/cmd/log-upload/log-1/result"), 10,
                          describe="log-upload result")[-1]
    lines = result["lines"]
    assert 0 < len(lines) <= 20, lines
    assert any("fleet command accepted" in l and "log-1" in l for l in lines), lines
    assert any("association" in l for l in lines), lines  # the C-ECHO just before
    # The same lines as the local log's tail, in order.
    local = [l for l in g.log_text().splitlines() if l.strip()]
    assert lines[0] in local
    assert not any("ZZTEST" in l for l in lines), lines
    # Bounds are enforced by the signed-argument check.
    final = command(vendor, sub, "log-upload", "log-2", args={"lines": 100000})
    assert (final["state"], final["code"]) == ("failed", "bad-args"), final


def test_tpm_identity_authenticates_the_agent_to_the_broker(tmp_path, swtpm, ca, gateway_factory, broker, vendor,
                                                             watch):
    """`client_auth = "keystore"`: the TLS client key is the TPM's identity key (swtpm);
    its certificate comes from `keys csr` signed by the broker's CA and `keys install-cert`."""
    from test_tpm import init_keys, keys_ok, tpm_keystore

    section = fleet_section(broker, vendor)
    for k in ("cert_file", "key_file"):
        section.pop(k)
    section["client_auth"] = "keystore"
    hl7_port = gw.free_port()
    g = gateway_factory({**tpm_keystore(swtpm), "hl7": {"listen": f"127.0.0.1:{hl7_port}"}, "fleet": section},
                        start=False)
    g.hl7_port = hl7_port
    init_keys(g)
    csr = ca.dir / "tpm-device.csr"
    csr.write_text(keys_ok(g, "csr"))
    keys_ok(g, "install-cert", "--cert", str(ca.sign_csr(csr, ca.dir / "tpm-device.pem")))
    g.start()
    sub = watch()
    assert wait_online(sub)["state"] == "online"
    assert f"as {DEVICE} (p2, c0" in broker.log_text() and f"u'{DEVICE}'" in broker.log_text(), broker.log_tail()
    final = command(vendor, sub, "disable", "tpm-dis")
    assert final["state"] == "successful", final
    assert_disabled_everywhere(g)
    final = command(vendor, sub, "enable", "tpm-en")
    assert final["state"] == "successful", final
    assert echo_ok(g)


def test_signed_wipe_on_the_tpm_key_store_evicts_the_keys_while_the_daemon_runs(
        tmp_path, swtpm, gateway_factory, broker, vendor, watch):
    from test_tpm import init_keys, tpm_keystore

    g = fleet_gateway(gateway_factory, broker, vendor, tpm_keystore(swtpm), start=False)
    init_keys(g)
    g.start()
    sub = watch()
    wait_online(sub)
    files = data.make_ct_set(1, tmp_path / "in", "ct")
    r = scu.storescu(g.dicom_port, [f.path for f in files])
    assert r.returncode == 0, r.stdout + r.stderr
    final = command(vendor, sub, "wipe", "tpm-wipe", timeout=30)
    assert final["state"] == "successful", final
    gw_poll(lambda: not g.is_running(), 20, "gatewayd exiting after the wipe")
    r = g.export(files[0].sop_instance_uid, tmp_path / "after.dcm", check=False)
    assert r.returncode != 0, f"spool export still works after a TPM wipe:\n{r.stdout}{r.stderr}"


PROVISIONED = "gw-prov-0001"
CLAIM = "claim-0007"


def test_provisioning_by_claim_ends_with_its_own_certificate_claim_gone_and_telemetry_on_its_own_topics(
        tmp_path, swtpm, ca, gateway_factory, broker, vendor, watch):
    """A factory-fresh box (TPM identity key without a certificate, a claim credential, no
    device id) claims its identity from the vendor's provisioning service (`fleet.Provisioner`)
    on a real mosquitto, refuses the forged answers it is sent first, and reconnects as the
    device the vendor named, with the TPM key."""
    import shutil
    from test_tpm import init_keys, tpm_keystore

    factory = tmp_path / "factory"
    factory.mkdir()
    issued = broker.client_cert(CLAIM)
    claim_cert, claim_key = factory / "claim.pem", factory / "claim.key"
    shutil.copy(issued.cert, claim_cert)
    shutil.copy(issued.key, claim_key)
    section = fleet_section(broker, vendor)
    for k in ("cert_file", "key_file"):
        section.pop(k)
    section.update(client_auth="keystore", claim_cert_file=str(claim_cert), claim_key_file=str(claim_key))
    hl7_port = gw.free_port()
    g = gateway_factory({**tpm_keystore(swtpm), "hl7": {"listen": f"127.0.0.1:{hl7_port}"}, "fleet": section},
                        start=False)
    g.hl7_port = hl7_port
    init_keys(g)
    assert not (g.data_dir / "keys" / "device.crt").exists()

    claim_view = watch(f"prov/{CLAIM}/#")
    device_view = watch(f"gw/{PROVISIONED}/#")
    provisioner = fleet.Provisioner(broker, vendor, ca, [PROVISIONED], bad_answers_first=True)
    try:
        g.start()
        online = device_view.wait_for(lambda s: [m for m in s.on(f"gw/{PROVISIONED}/status")
                                                 if m.get("state") == "online"], 60,
                                      describe="the provisioned device online on its own topic")
        assert online
        provisioner.check()
        assert provisioner.assigned == {CLAIM: PROVISIONED}
    finally:
        provisioner.stop()

    # The forged answers were refused with their reasons; the real one succeeded.
    def final(cmd_id: str) -> dict:
        return claim_view.wait_for(lambda s: [m for m in s.on(f"prov/{CLAIM}/cmd/provision/{cmd_id}/state")
                                              if m.get("state") in ("successful", "failed")], 15,
                                   describe=f"final state of {cmd_id}")[-1]
    assert (final("bad-unsigned")["state"], final("bad-unsigned")["code"]) == ("failed", "unsigned")
    bad_key = final("bad-key")
    assert (bad_key["state"], bad_key["code"]) == ("failed", "certificate-rejected"), bad_key
    assert "identity key" in bad_key["reason"], bad_key
    assert final(f"prov-{PROVISIONED}")["state"] == "successful"

    # Its own certificate: issued by the vendor's CA for the TPM identity key, CN = device id.
    cert = g.data_dir / "keys" / "device.crt"
    assert cert.is_file()
    assert ca.verify(cert).returncode == 0
    assert f"CN = {PROVISIONED}" in ca.cert_text(cert)
    state = json.loads((g.data_dir / "fleet" / "state.json").read_text())
    assert state["device_id"] == PROVISIONED, state
    # The claim credential is gone; the retained CSR was cleared.
    assert not claim_cert.exists() and not claim_key.exists(), sorted(p.name for p in factory.iterdir())
    late = watch(f"prov/{CLAIM}/csr")
    time.sleep(1.0)
    assert [p for _, p in late.messages() if p != "(null)"] == [], f"a CSR is still retained: {late.messages()}"

    # It connected as itself (MQTT user = the certificate's CN, authenticated by the TPM key)
    # and its telemetry flows on its own topics.
    log = broker.log_text()
    assert f"u'{PROVISIONED}'" in log, broker.log_tail()
    samples = device_view.wait_for(lambda s: len(s.on(f"gw/{PROVISIONED}/telemetry")) >= 2 and
                                   s.on(f"gw/{PROVISIONED}/telemetry"), 15, describe="telemetry")
    assert samples[-1]["keystore"]["backend"] == "tpm"

    # Commands signed for the device id, on its topics, reach it.
    final_dis = command(vendor, device_view, "disable", "prov-dis", device=PROVISIONED, to=PROVISIONED)
    assert final_dis["state"] == "successful", final_dis
    assert_disabled_everywhere(g)
    # It cannot publish or subscribe outside gw/<its id>/: the broker knows it only as
    # PROVISIONED, and the ACL confines that user. Another device's certificate is refused
    # on this device's topics, as the claim certificate now is.
    spy = watch(f"gw/{PROVISIONED}/#", as_user=OTHER)
    claim_spy = watch(f"gw/{PROVISIONED}/#", as_user=CLAIM)
    final_en = command(vendor, device_view, "enable", "prov-en", device=PROVISIONED, to=PROVISIONED)
    assert final_en["state"] == "successful", final_en
    assert echo_ok(g)
    device_view.wait_for(lambda s: len(s.on(f"gw/{PROVISIONED}/telemetry")) >= len(samples) + 2, 15,
                         describe="more telemetry")
    assert spy.messages() == [] and claim_spy.messages() == [], (spy.messages()[:2], claim_spy.messages()[:2])

    # Across a restart it stays provisioned: no new claim, same identity.
    csrs_before = len([1 for t, p in claim_view.messages() if t == f"prov/{CLAIM}/csr" and p != "(null)"])
    g.stop()
    g.start()
    device_view.wait_for(lambda s: len([m for m in s.on(f"gw/{PROVISIONED}/status") if m.get("state") == "online"]) >= 2,
                         30, describe="online again after restart")
    assert len([1 for t, p in claim_view.messages() if t == f"prov/{CLAIM}/csr" and p != "(null)"]) == csrs_before
