"""The fleet `update` command against real peers: a real `gatewayd run` connected to a real
mosquitto (TLS, client certificates), an HTTPS bundle server on 127.0.0.1 that requires the
gateway's client certificate and serves HTTP Range, and the real `rauc` CLI checking real
bundles made here with `rauc bundle` (plain format, a test signing certificate as keyring).

What is covered: a wrong SHA-256 is refused `hash-mismatch` after the download; a bundle
signed by a certificate outside the keyring is refused `bundle-signature` by `rauc info`; a
bundle whose signed version is not the command's is refused `version-mismatch`; none of them
ever reaches `rauc install`; the state messages come in order (`init`, `downloading`,
`installing`, `failed`; no `executing`); a replayed `update` envelope is refused `replayed`;
a size above `update.max_bundle_bytes` is `bad-args`; a download cut by kill -9 of gatewayd
resumes with a Range request after the restart. The trial boot: `gatewayd update
health-check` marks the slot good and `successful` is published once connected; a failed
check exits 1 and the old slot reports `rolled-back` `health-failed`; `boot-failed` and
`interrupted`. `rauc status` and `mark-good` need the RAUC D-Bus service and a boot loader,
which a host has neither of: a twin in the `rauc` wrapper answers them from files. Writing
slots, the reboot and the firmware's own rollback are the appliance tests' (QEMU) business.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

import fleet
import gw
from bundle_server import BundleServer
from conftest import fail_on_assertion
from test_fleet import broker, wait_online  # noqa: F401  (broker: the mosquitto fixture)

DEVICE = "test-gw"
COMPATIBLE = "clinic-gateway-x86_64"


def require_rauc() -> None:
    missing = [t for t in ("rauc", "mksquashfs") if shutil.which(t) is None]
    assert not missing, (f"{', '.join(missing)} not found: install the Debian packages rauc and "
                         "squashfs-tools (hw-tests/run-all.sh does)")


def openssl_self_signed(dir: Path, name: str) -> tuple[Path, Path]:
    key, cert = dir / f"{name}.key", dir / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return key, cert


def rauc_bundle(dir: Path, name: str, version: int, key: Path, cert: Path) -> bytes:
    src = dir / f"{name}-src"
    src.mkdir()
    (src / "root.ext4").write_bytes(os.urandom(64 * 1024))
    (src / "gateway-update.json").write_text(json.dumps({"version": version, "min_version": version,
                                                         "data_format": 1}))
    (src / "manifest.raucm").write_text(f"[update]\ncompatible={COMPATIBLE}\nversion={version}\n\n"
                                        "[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=root.ext4\n")
    out = dir / f"{name}.raucb"
    r = subprocess.run(["rauc", "bundle", f"--cert={cert}", f"--key={key}", str(src), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"rauc bundle failed: {r.stderr}"
    return out.read_bytes()


@pytest.fixture
def rig(tmp_path, ca, broker, gateway_factory):
    """Bundles, the bundle server, a `rauc` wrapper with the test keyring that logs its
    calls, and a gateway for the broker (not started: each test starts it)."""
    fail_on_assertion(require_rauc)
    work = tmp_path / "bundles"
    work.mkdir()
    key, cert = openssl_self_signed(work, "update-signer")
    rogue_key, rogue_cert = openssl_self_signed(work, "rogue-signer")
    files = {
        "/good-8.raucb": rauc_bundle(work, "good-8", 8, key, cert),
        "/rogue-8.raucb": rauc_bundle(work, "rogue-8", 8, rogue_key, rogue_cert),
    }
    server = BundleServer(work, ca, files)
    system_conf = work / "system.conf"
    system_conf.write_text(f"[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n\n[keyring]\npath={cert}\n\n"
                           "[slot.rootfs.0]\ndevice=/dev/null\ntype=raw\nbootname=system0\n\n"
                           "[slot.rootfs.1]\ndevice=/dev/null\ntype=raw\nbootname=system1\n")
    calls = work / "rauc-calls.log"
    wrapper = work / "rauc"
    # `rauc info` is the real one; `status` and `mark-good` need the RAUC D-Bus service
    # and a boot loader, which a host test has neither of: a twin answers them from files
    # (`booted`: the boot name of the running slot; `good`: system1 was marked good).
    (work / "booted").write_text("system0")
    wrapper.write_text(
        "#!/bin/sh\n"
        f"D={work}\n"
        f"echo \"$*\" >> {calls}\n"
        'case "$*" in\n'
        '"status --output-format=json")\n'
        '  g=bad; [ -e "$D/good" ] && g=good\n'
        f'  printf \'{{"compatible":"{COMPATIBLE}","booted":"%s","boot_primary":"rootfs.0","slots":['
        '{"rootfs.0":{"bootname":"system0","boot_status":"good"}},'
        '{"rootfs.1":{"bootname":"system1","boot_status":"%s"}}]}\\n\' "$(cat $D/booted)" "$g" ;;\n'
        '"status mark-good booted") touch "$D/good" ;;\n'
        f'*) exec rauc --conf={system_conf} "$@" ;;\n'
        "esac\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    vendor = fleet.Vendor(tmp_path / "vendor", broker)
    me = broker.client_cert(DEVICE)
    g = gateway_factory(start=False, overrides={
        "fleet": {
            "broker": f"mqtts://127.0.0.1:{broker.port}",
            "vendor_public_key": str(vendor.pub),
            "ca_file": str(broker.ca.cert),
            "client_auth": "files",
            "cert_file": str(me.cert),
            "key_file": str(me.key),
            "telemetry_interval": "60s",
        },
        "update": {
            "rauc_command": str(wrapper),
            "reboot_request_file": str(tmp_path / "reboot-request"),
            "download_deadline": "1m",
        },
    })
    sub = broker.subscribe("vendor", f"gw/{DEVICE}/#")

    yield {"gw": g, "vendor": vendor, "server": server, "files": files, "calls": calls, "sub": sub,
           "reboot": tmp_path / "reboot-request", "work": work}
    sub.stop()
    server.stop()


def send_update(rig, cmd_id: str, path: str, sha256: str, version: int, size: int, seq: int | None = None) -> bytes:
    args = {"url": rig["server"].url(path), "sha256": sha256, "version": version, "size": size}
    env = rig["vendor"].envelope(DEVICE, "update", cmd_id, args, seq=seq)
    rig["vendor"].send(DEVICE, "update", cmd_id, env)
    return env


def states(rig, cmd_id: str) -> list[dict]:
    return rig["sub"].on(fleet.state_topic(DEVICE, "update", cmd_id))


def final(rig, cmd_id: str, timeout: float = 60.0) -> dict:
    return fleet.final_state(rig["sub"], DEVICE, "update", cmd_id, timeout=timeout)


def rauc_calls(rig) -> list[str]:
    p = rig["calls"]
    return p.read_text().splitlines() if p.exists() else []


def test_update_with_wrong_hash_or_signature_or_version_is_refused_before_install_with_its_code(rig, gatewayd_bin):
    good = rig["files"]["/good-8.raucb"]
    rogue = rig["files"]["/rogue-8.raucb"]
    rig["gw"].start()
    wait_online(rig["sub"])  # its command subscription is in place before it says online

    # (a) the right bytes, a wrong SHA-256: downloaded, then refused before rauc is asked
    send_update(rig, "u-hash", "/good-8.raucb", "0" * 64, 8, len(good))
    m = final(rig, "u-hash")
    assert (m["state"], m["code"]) == ("failed", "hash-mismatch"), m
    assert [s["state"] for s in states(rig, "u-hash")] == ["init", "downloading", "failed"]
    assert ("/good-8.raucb", None) in rig["server"].requests, "the bundle was never downloaded"
    # `rauc status` (which slot runs) is all rauc was asked: never info, never install
    assert all(c.startswith("status ") for c in rauc_calls(rig)), f"rauc checked a bundle with a wrong hash: {rauc_calls(rig)}"

    # (b) signed by a certificate outside the keyring: rauc info refuses it
    send_update(rig, "u-sig", "/rogue-8.raucb", hashlib.sha256(rogue).hexdigest(), 8, len(rogue))
    m = final(rig, "u-sig")
    assert (m["state"], m["code"]) == ("failed", "bundle-signature"), m
    assert "signature" in m["reason"], m
    assert "/" not in m["reason"], f"the reason names files: {m}"
    assert [s["state"] for s in states(rig, "u-sig")] == ["init", "downloading", "installing", "failed"]

    # (c) well signed, but its signed version is not the command's
    send_update(rig, "u-ver", "/good-8.raucb", hashlib.sha256(good).hexdigest(), 9, len(good))
    m = final(rig, "u-ver")
    assert (m["state"], m["code"]) == ("failed", "version-mismatch"), m
    assert m["reason"] == "the bundle's signed version 8 is not the command's 9", m

    calls = rauc_calls(rig)
    infos = [c for c in calls if c.startswith("info --output-format=json ")]
    assert rig["work"].joinpath("booted").read_text() == "system0"
    assert len(infos) == 2, calls
    assert all(c.startswith(("info ", "status ")) for c in calls), calls
    assert not any(c.startswith("install") for c in calls), f"rauc install ran: {calls}"
    assert not rig["reboot"].exists(), "a reboot was requested"

    # the last outcome is kept for `gatewayd update status`
    g = rig["gw"]
    r = subprocess.run([str(gatewayd_bin), "update", "status", "--config", str(g.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["in_progress"] is False
    assert status["record"]["cmd_id"] == "u-ver"
    assert status["record"]["outcome"] == {"state": "failed", "code": "version-mismatch",
                                           "reason": "the bundle's signed version 8 is not the command's 9"}


def test_replayed_update_envelope_is_refused_replayed_and_oversized_is_bad_args(rig):
    good = rig["files"]["/good-8.raucb"]
    rig["gw"].start()
    wait_online(rig["sub"])
    env = send_update(rig, "u-1", "/good-8.raucb", "0" * 64, 8, len(good))
    assert final(rig, "u-1")["code"] == "hash-mismatch"
    downloads = len(rig["server"].requests)
    n = len(states(rig, "u-1"))
    rig["vendor"].send(DEVICE, "update", "u-1", env)
    m = fleet.final_state(rig["sub"], DEVICE, "update", "u-1", timeout=15, after=n)
    assert (m["state"], m["code"]) == ("failed", "replayed"), m
    assert len(rig["server"].requests) == downloads, "a replayed command downloaded again"

    # above the box's update.max_bundle_bytes (default 1 GiB): refused at once, nothing fetched
    send_update(rig, "u-big", "/good-8.raucb", "0" * 64, 8, 2 << 30)
    m = final(rig, "u-big", timeout=15)
    assert (m["state"], m["code"]) == ("failed", "bad-args"), m
    assert [s["state"] for s in states(rig, "u-big")] == ["init", "failed"]
    assert len(rig["server"].requests) == downloads


def trial_record(rig, phase: str, health_failed: bool = False) -> Path:
    """The update record as the old firmware left it before the reboot into system1."""
    d = rig["gw"].data_dir / "update"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"format": 1, "cmd_id": "u-trial", "url": "https://127.0.0.1/b", "sha256": "ab" * 32,
              "version": 8, "size": 10, "phase": phase, "from_slot": "system0", "target_slot": "system1",
              "install_attempts": 1, "reboot_boot_id": "the-boot-before", "health_failed": health_failed,
              "outcome": None, "at": int(time.time())}
    (d / "record.json").write_text(json.dumps(record))
    (d / "bundle-meta.json").write_text(json.dumps({"version": 8, "min_version": 8, "data_format": 1}))
    (d / "trial").write_text("u-trial")
    return d


def test_trial_boot_health_check_marks_good_and_the_final_state_is_published_once_connected(rig, gatewayd_bin):
    g = rig["gw"]
    d = trial_record(rig, "rebooting")
    rig["work"].joinpath("booted").write_text("system1")  # BootNext took the new slot
    g.start()
    started = time.monotonic()
    r = subprocess.run([str(gatewayd_bin), "update", "health-check", "--config", str(g.config_path),
                        "--timeout", "60"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, f"health check failed: {r.stdout}{r.stderr}\n{g.log_tail()}"
    assert "slot marked good" in r.stdout, r.stdout
    assert rig["work"].joinpath("good").exists(), "rauc status mark-good booted was not called"
    m = final(rig, "u-trial", timeout=30)
    assert m["state"] == "successful", m
    assert [s["state"] for s in states(rig, "u-trial")] == ["successful"]
    # the result body on .../result, published before the final state
    results = rig["sub"].on(fleet.result_topic(DEVICE, "update", "u-trial"))
    assert len(results) == 1, results
    assert {k: results[0][k] for k in ("state", "code", "bundle_version", "from_slot", "target_slot")} == {
        "state": "successful", "code": None, "bundle_version": 8, "from_slot": "system0",
        "target_slot": "system1"}, results
    fleet_wait = time.monotonic() - started
    assert fleet_wait < 60, fleet_wait
    # published, then archived: the record is last.json, the trial marker is gone
    deadline = time.monotonic() + 10
    while (d / "record.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (d / "record.json").exists()
    assert not (d / "trial").exists()
    assert json.loads((d / "last.json").read_text())["outcome"] == {"state": "successful"}
    # a normal boot afterwards: the health check does nothing and succeeds
    r = subprocess.run([str(gatewayd_bin), "update", "health-check", "--config", str(g.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "not a trial boot" in r.stdout, r


def test_failed_health_check_exits_1_and_the_old_slot_reports_rolled_back_health_failed(rig, gatewayd_bin):
    g = rig["gw"]
    g.start()  # the box's first life: key store, spool
    g.stop()
    d = trial_record(rig, "rebooting")
    rig["work"].joinpath("booted").write_text("system1")
    # the new firmware's gatewayd never gets READY (it is not running at all)
    r = subprocess.run([str(gatewayd_bin), "update", "health-check", "--config", str(g.config_path),
                        "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "health check ready" in r.stderr, r.stderr
    assert not rig["work"].joinpath("good").exists(), "an unhealthy slot was marked good"
    assert json.loads((d / "record.json").read_text())["health_failed"] is True
    # FailureAction=reboot: the firmware takes BootOrder, i.e. the old slot
    rig["work"].joinpath("booted").write_text("system0")
    g.start()
    m = final(rig, "u-trial", timeout=30)
    assert (m["state"], m["code"], m["reason"]) == ("rolled-back", "health-failed", "health-failed"), m


@pytest.mark.parametrize("phase,reason", [("rebooting", "boot-failed"), ("trial", "interrupted")])
def test_back_on_the_old_slot_after_the_reboot_reports_rolled_back_with_the_reason(rig, phase, reason):
    g = rig["gw"]
    trial_record(rig, phase)
    rig["work"].joinpath("booted").write_text("system0")
    g.start()
    m = final(rig, "u-trial", timeout=30)
    assert (m["state"], m["code"]) == ("rolled-back", reason), m


def test_power_cut_mid_download_resumes_from_the_partial_file_with_a_range_request(rig):
    rogue = rig["files"]["/rogue-8.raucb"]
    g = rig["gw"]
    g.start()
    wait_online(rig["sub"])
    rig["server"].chunk = 4096  # ~80 KiB/s: the download takes about a second
    send_update(rig, "u-cut", "/rogue-8.raucb", hashlib.sha256(rogue).hexdigest(), 8, len(rogue))
    rig["sub"].wait_for(lambda s: [m for m in states(rig, "u-cut") if m["state"] == "downloading"],
                        15, "downloading")
    deadline = time.monotonic() + 15
    while rig["server"].sent < len(rogue) // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    g.kill9()  # the power cut
    part = g.data_dir / "update" / "bundle.part"
    assert part.exists() and 0 < part.stat().st_size < len(rogue), "no partial download to resume"
    record = json.loads((g.data_dir / "update" / "record.json").read_text())
    assert record["phase"] == "downloading"
    rig["server"].chunk = None
    g.start()
    m = final(rig, "u-cut", timeout=60)
    # resumed where the file ended, the whole file hashed, then rauc info refused the signature
    ranges = [r for p, r in rig["server"].requests if p == "/rogue-8.raucb"]
    assert ranges[0] is None and len(ranges) == 2, ranges
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].rstrip("-")) > 0, ranges
    assert (m["state"], m["code"]) == ("failed", "bundle-signature"), m
    assert [s["state"] for s in states(rig, "u-cut")] == ["init", "downloading", "downloading", "installing",
                                                           "failed"]
