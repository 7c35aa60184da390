"""Signed A/B updates of the appliance end to end: the fleet `update` command through a real
mosquitto, the bundle over mutual TLS, RAUC writing the inactive slot, the trial boot through
UEFI BootNext, the health check, the firmware's own rollback (docs/adr/0013).

One box (the A/B disk.img of the image, OVMF with its own NVRAM, swtpm; a reboot is a power
cycle, appliance.UefiBox: OVMF can hang in a warm reset under TCG), provisioned by claim
through the broker (test_appliance_fleet.py's factory state), with 3 CT objects stored over
DICOM before the first update. Bundles are made by image-recipe/bundle.sh, signed by the test
update signer (hw-tests/.cache/update-ca, the image's RAUC keyring); the firmware versions 2
and 3-broken are build.sh's GW_VARIANTS of the same tree (appliance.VARIANTS): 3-broken's
`gatewayd run` exits 1, so its health check fails. Bundles are served by bundle_server.py over
HTTPS on 127.0.0.1 (the guest's 10.0.2.2), which requires the box's device certificate.

`test_update_refusals_success_downgrade_replay_and_rollback` pins, in order:
- refused, each `failed` with its code and with the inactive slot (gw-root-b, gw-efi-b) byte
  for byte unchanged: a bundle signed outside the keyring (`bundle-signature`), a wrong SHA-256
  (`hash-mismatch`);
- version 1 -> 2: `downloading`, `installing`, `rebooting`, the box reboots by itself into
  slot B (BootNext), whose health check marks it good: `successful`; slot B runs IMAGE_VERSION
  2 on a verified dm-verity root, the 3 objects and the effective configuration are intact;
  the result on `.../result` says `successful` and firmware version 2;
  gw-root-b holds the bundle's root image byte for byte; the health check raised the
  version floor (TPM NV counter) to the bundle's minimum, 2;
- a version 1 bundle (validly signed) is then refused `downgrade` and the replayed envelope of
  the version 2 command `replayed`, with gw-root-a / gw-efi-a (now inactive) unchanged;
- version 2 -> 3-broken: installed into slot A, the trial boot's health check fails within
  [update] health_timeout, the unit's FailureAction reboots, the firmware boots slot B again
  and its gatewayd reports `rolled-back` (`health-failed`); B still runs version 2 with the
  objects intact.

Bounded: every wait has a timeout and says what it waited for; qemu, swtpm, dnsmasq, mosquitto
and the bundle server are stopped at teardown. A missing peer fails the test.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

import data
import fleet
import pki
import scu
from appliance import (BOOT_TIMEOUT_S, RECIPE, STATUS_TIMEOUT_S, DnsServer, UefiBox, new_box, partitions,
                       seed_box_state, sha256_range, update_ca)
from bundle_server import BundleServer
from test_appliance_fleet import (BROKER_HOST, CLAIM, PROVISIONED, broker_with_host_name, factory_config,
                                  factory_files, wait_online_by_claim)
from test_update_bundle import bundle_sh, codesign_cert, make_image_dir

OP = "update"
# The trial boot's bound (update.health_timeout): long enough for a healthy firmware under TCG
# (READY, spool verify and the broker reached come within about 30 s of gatewayd's start).
HEALTH_TIMEOUT_S = 90
# Download + verify + `rauc install` of a full bundle (about 200 MiB) under TCG, then the reboot.
INSTALL_TIMEOUT_S = 600


def slot_hashes(disk: Path, names: tuple[str, ...]) -> dict[str, str]:
    parts = partitions(disk)
    return {n: sha256_range(disk, *parts[n]) for n in names}


class Box:
    """The box under test (`machine`, a UefiBox: a reboot is a power cycle) with its broker,
    DNS server, bundle server and vendor."""

    def __init__(self, image: Path, tmp_path: Path, ca: pki.CA, vms: list, config_extra: str = ""):
        self.image, self.tmp, self.ca, self.vms = image, tmp_path, ca, vms
        self.broker = broker_with_host_name(tmp_path, ca)
        self.dns = DnsServer(tmp_path, {BROKER_HOST: "10.0.2.2"})
        self.broker.start()
        self.dns.start()
        self.vendor = fleet.Vendor(tmp_path / "vendor", self.broker)
        claim = self.broker.client_cert(CLAIM)
        self.factory = factory_config((RECIPE / "files" / "gatewayd.toml").read_text(), self.broker.port) + (
            f'\n[update]\nhealth_timeout = "{HEALTH_TIMEOUT_S}s"\n{config_extra}')
        self.disk, self.vars_fd = new_box(image, tmp_path / "box")
        seed_box_state(self.disk, factory_files(self.factory, claim, self.vendor, ca))
        self.tpm_dir = tmp_path / "tpm"
        self.tpm_dir.mkdir()
        self.sub = self.broker.subscribe("vendor", f"gw/{PROVISIONED}/#")
        self.provisioner = fleet.Provisioner(self.broker, self.vendor, ca, [PROVISIONED])
        self.server = BundleServer(tmp_path / "bundles", ca, {}, host="10.0.2.2")
        self.machine = UefiBox(image, tmp_path, self.disk, self.vars_fd, self.tpm_dir, vms,
                               hooks=self.dns.cmdline().split())

    def power_on(self, name: str) -> UefiBox:
        return self.machine.power_on(name)

    def serve(self, path: str, bundle: bytes) -> str:
        self.server.files[path] = bundle
        return self.server.url(path)

    def send(self, cmd_id: str, path: str, bundle: bytes, version: int, sha256: str | None = None) -> bytes:
        args = {"url": self.server.url(path), "sha256": sha256 or hashlib.sha256(bundle).hexdigest(),
                "version": version, "size": len(bundle)}
        # Valid for an hour: an update takes minutes, and the test replays this envelope after
        # the update finished (300 s, the default, ran out before that on a loaded machine and
        # the replay was refused `expired` before it could be refused `replayed`).
        env = self.vendor.envelope(PROVISIONED, OP, cmd_id, args, expires_in=3600)
        self.vendor.send(PROVISIONED, OP, cmd_id, env)
        return env

    def states(self, cmd_id: str) -> list[dict]:
        return self.sub.on(fleet.state_topic(PROVISIONED, OP, cmd_id))

    def final(self, cmd_id: str, timeout: float, after: int = 0) -> dict:
        try:
            return fleet.final_state(self.sub, PROVISIONED, OP, cmd_id, timeout=timeout, after=after)
        except AssertionError as e:
            raise AssertionError(f"{e}\nstates so far: {self.states(cmd_id)}\n{self.machine.tail(80)}") from None

    def wait_state(self, cmd_id: str, state: str, timeout: float) -> float:
        """Seconds until `state` is on the command's state topic."""
        t0 = time.monotonic()
        self.sub.wait_for(lambda s: [m for m in s.on(fleet.state_topic(PROVISIONED, OP, cmd_id))
                                     if m.get("state") == state],
                          timeout, describe=f"{cmd_id} {state}")
        return time.monotonic() - t0

    def stop(self) -> None:
        for stop in (self.machine.stop, self.sub.stop, self.server.stop, self.provisioner.stop, self.dns.stop,
                     self.broker.stop):
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - teardown goes on with the rest
                print(f"teardown: {e!r}")


def make_bundles(image: Path, work: Path) -> dict[str, tuple[bytes, float]]:
    """name -> (bundle bytes, seconds bundle.sh took): the variants 2 and 3-broken, a small
    validly signed version 1 bundle and a small one signed outside the keyring."""
    _, signer = update_ca()
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[bytes, float]] = {}

    def make(name: str, image_dir: Path, version: int, key: pki.KeyPair) -> None:
        t0 = time.monotonic()
        bundle = work / f"{name}.raucb"
        bundle_sh(image_dir, version, version, key, bundle)
        out[name] = (bundle.read_bytes(), time.monotonic() - t0)

    make("v2", image / "variant-2", 2, signer)
    make("v3-broken", image / "variant-3-broken", 3, signer)
    small = work / "small-image"
    make_image_dir(small)
    make("small-v1", small, 1, signer)
    rogue_ca = pki.CA(work / "rogue-ca")
    make("rogue-v2", small, 2, codesign_cert(rogue_ca, "rogue-signer"))
    return out


def boot_facts(vm: UefiBox, since: int) -> dict[str, str]:
    """What the probe printed of the boot after console offset `since`."""
    slot = vm.wait_console(r"SLOT: (\S+) root (\S+)$", BOOT_TIMEOUT_S, since=since)
    version = vm.wait_console(r"IMAGE-VERSION: (\S+)$", STATUS_TIMEOUT_S, since=since).group(1)
    verity = vm.wait_console(r"VERITY: (.*)$", STATUS_TIMEOUT_S, since=since).group(1)
    return {"slot": slot.group(1), "root": slot.group(2), "version": version, "verity": verity}


@pytest.mark.timeout(1500 + 4 * BOOT_TIMEOUT_S + 2 * INSTALL_TIMEOUT_S)
def test_update_refusals_success_downgrade_replay_and_rollback(appliance_image, tmp_path, ca, vms):
    image = appliance_image
    t_bundles = time.monotonic()
    bundles = make_bundles(image, tmp_path / "bundles")
    for name, (b, took) in bundles.items():
        print(f"bundle {name}: {len(b) / 2**20:.1f} MiB, bundle.sh {took:.0f} s")
    print(f"bundles made in {time.monotonic() - t_bundles:.0f} s")
    box = Box(image, tmp_path, ca, vms)
    try:
        _run_update_story(box, image, bundles, tmp_path)
    finally:
        box.stop()


def _run_update_story(box: Box, image: Path, bundles: dict, tmp_path: Path) -> None:
    files = data.make_ct_set(3, tmp_path / "dcm")
    v2, _ = bundles["v2"]
    broken, _ = bundles["v3-broken"]
    small_v1, _ = bundles["small-v1"]
    rogue, _ = bundles["rogue-v2"]
    for path, b in (("/v2.raucb", v2), ("/v3.raucb", broken), ("/small-v1.raucb", small_v1),
                    ("/rogue-v2.raucb", rogue)):
        box.serve(path, b)

    # ---- boot 1: factory slot A, version 1; provisioned by claim; 3 objects stored
    vm = box.power_on("v1")
    wait_online_by_claim(vm, box.sub, box.dns, box.broker, BOOT_TIMEOUT_S)
    box.provisioner.check()
    facts = boot_facts(vm, 0)
    assert (facts["slot"], facts["version"]) == ("system0", "1"), facts
    watchdog = vm.wait_console(r"WATCHDOG: (.*)$", STATUS_TIMEOUT_S).group(1)
    print(f"boot 1: online {time.monotonic() - vm.started:.0f} s after power-on; watchdog: {watchdog}")
    assert watchdog.startswith("i6300ESB"), f"no hardware watchdog in the guest: {watchdog}"
    r = scu.storescu(vm.dicom_port, [f.path for f in files], timeout=120)
    assert r.returncode == 0, f"storescu exited {r.returncode}\n{r.stdout}\n{r.stderr}\n{vm.tail()}"
    assert vm.spool_status_with(lambda s: s.get("objects", 0) >= 3)["objects"] == 3
    config_sha = vm.wait_console(r"CONFIG-SHA256: effective (\S+)", STATUS_TIMEOUT_S).group(1)
    assert config_sha == hashlib.sha256(box.factory.encode()).hexdigest()
    slot_b = ("gw-root-b", "gw-efi-b")
    before = slot_hashes(box.disk, slot_b)

    # ---- refusals, before any write to the inactive slot
    box.send("u-rogue", "/rogue-v2.raucb", rogue, 2)
    m = box.final("u-rogue", 300)
    assert (m["state"], m.get("code")) == ("failed", "bundle-signature"), m
    box.send("u-hash", "/small-v1.raucb", small_v1, 2, sha256="ab" * 32)
    m = box.final("u-hash", 300)
    assert (m["state"], m.get("code")) == ("failed", "hash-mismatch"), m
    assert slot_hashes(box.disk, slot_b) == before, "a refused bundle changed the inactive slot"
    print("refused: bundle-signature, hash-mismatch; gw-root-b and gw-efi-b unchanged")

    # ---- version 2 through the broker: install into B, reboot into it, health check, successful
    t0 = time.monotonic()
    mark = vm.mark()
    env_v2 = box.send("u-v2", "/v2.raucb", v2, 2)
    box.wait_state("u-v2", "rebooting", INSTALL_TIMEOUT_S)
    install_s = time.monotonic() - t0
    m = box.final("u-v2", BOOT_TIMEOUT_S + HEALTH_TIMEOUT_S + 120)
    update_s = time.monotonic() - t0
    assert m["state"] == "successful", m
    assert [s["state"] for s in box.states("u-v2")] == ["init", "downloading", "installing", "rebooting",
                                                        "successful"], box.states("u-v2")
    boot_b = vm.wait_console(r'BdsDxe: starting Boot[0-9A-F]{4} "system1"', 60, since=mark).start()
    facts = boot_facts(vm, boot_b)
    assert (facts["slot"], facts["version"]) == ("system1", "2"), facts
    assert "status: verified" in facts["verity"] and "/dev/vda4" in facts["verity"], facts
    assert vm.spool_status_with(lambda s: "objects" in s, since=boot_b)["objects"] == 3
    assert vm.wait_console(r"CONFIG-SHA256: effective (\S+)", STATUS_TIMEOUT_S, since=boot_b).group(1) == config_sha
    result = box.sub.on(fleet.result_topic(PROVISIONED, OP, "u-v2"))
    assert [(r["state"], r["firmware_version"]) for r in result] == [("successful", 2)], result
    healthy = vm.wait_console(r"the new firmware is healthy .*; version floor (\S+)$", STATUS_TIMEOUT_S, since=boot_b)
    assert healthy.group(1) == "2", f"the version floor after marking version 2 good: {healthy.group(0)}"
    print(f"update 1 -> 2: download + install + `rebooting` {install_s:.0f} s, `successful` {update_s:.0f} s "
          f"after the command ({len(v2) / 2**20:.0f} MiB bundle)")
    rootfs = image / "variant-2" / "rootfs.img"
    parts = partitions(box.disk)
    assert sha256_range(box.disk, parts["gw-root-b"][0], rootfs.stat().st_size) == \
        hashlib.sha256(rootfs.read_bytes()).hexdigest(), "gw-root-b does not hold version 2's root image"

    # ---- downgrade and replay, with slot A (now inactive) unchanged
    slot_a = ("gw-root-a", "gw-efi-a")
    before_a = slot_hashes(box.disk, slot_a)
    box.send("u-down", "/small-v1.raucb", small_v1, 1)
    m = box.final("u-down", 300)
    assert (m["state"], m.get("code")) == ("failed", "downgrade"), m
    n = len(box.states("u-v2"))
    box.vendor.send(PROVISIONED, OP, "u-v2", env_v2)
    m = box.final("u-v2", 60, after=n)
    assert (m["state"], m.get("code")) == ("failed", "replayed"), m
    assert slot_hashes(box.disk, slot_a) == before_a, "a refused command changed the inactive slot A"
    print("refused: downgrade (version 1 below the floor 2), replayed; gw-root-a and gw-efi-a unchanged")

    # ---- version 3, broken: trial boot of slot A fails its health check, back to B by itself
    t0 = time.monotonic()
    mark = vm.mark()
    box.send("u-v3", "/v3.raucb", broken, 3)
    box.wait_state("u-v3", "rebooting", INSTALL_TIMEOUT_S)
    m = box.final("u-v3", 2 * BOOT_TIMEOUT_S + HEALTH_TIMEOUT_S + 120)
    rollback_s = time.monotonic() - t0
    assert (m["state"], m.get("code")) == ("rolled-back", "health-failed"), m
    result = box.sub.on(fleet.result_topic(PROVISIONED, OP, "u-v3"))
    assert [(r["state"], r["firmware_version"]) for r in result] == [("rolled-back", 2)], result
    trial = vm.wait_console(r'BdsDxe: starting Boot[0-9A-F]{4} "system0"', 60, since=mark).start()
    assert "broken test firmware" in vm.console_text()[trial:], vm.tail(80)
    back = vm.wait_console(r'BdsDxe: starting Boot[0-9A-F]{4} "system1"', 60, since=trial).start()
    facts = boot_facts(vm, back)
    assert (facts["slot"], facts["version"]) == ("system1", "2"), facts
    assert vm.spool_status_with(lambda s: "objects" in s, since=back)["objects"] == 3
    print(f"update 2 -> 3-broken: rolled-back (health-failed) {rollback_s:.0f} s after the command; "
          f"slot B, version 2, 3 objects")


# The power-cut runs: phases in turn, at least 10 cuts (the acceptance), then the update
# is let through. In the trial boot the cut comes within TRIAL_CUT_S of the firmware starting the
# new slot: under TCG gatewayd is not READY that early, so the slot is never marked good first.
POWER_CUTS = 10
PHASES = ("download", "install", "trial")
TRIAL_CUT_S = 20.0
# In the install the cut comes within INSTALL_CUT_S of `installing`: the checks and `rauc
# install` of a full slot take 40 s and more under TCG, so it lands before `rebooting`.
INSTALL_CUT_S = 25.0
# The download is paced ([update] max_bytes_per_sec) so that it lasts long enough to be cut.
PACE_BYTES = 6 << 20


@pytest.mark.timeout(2400 + POWER_CUTS * (BOOT_TIMEOUT_S // 2))
def test_power_cuts_in_download_install_and_trial_boot_always_end_in_a_verified_slot(
        appliance_image, tmp_path, ca, vms):
    image = appliance_image
    seed = int(os.environ.get("GW_POWERCUT_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    print(f"power cut seed {seed} (GW_POWERCUT_SEED={seed} repeats the cut points)")
    _, signer = update_ca()
    bundle_file = tmp_path / "bundles" / "v2.raucb"
    bundle_file.parent.mkdir(parents=True)
    bundle_sh(image / "variant-2", 2, 2, signer, bundle_file)
    v2 = bundle_file.read_bytes()
    box = Box(image, tmp_path, ca, vms, config_extra=f'max_bytes_per_sec = "{PACE_BYTES >> 20}MiB"\n')
    try:
        _run_power_cuts(box, v2, rng, tmp_path)
    finally:
        box.stop()


def _run_power_cuts(box: Box, v2: bytes, rng: random.Random, tmp_path: Path) -> None:
    box.serve("/v2.raucb", v2)
    files = data.make_ct_set(3, tmp_path / "dcm")
    vm = box.power_on("factory")
    wait_online_by_claim(vm, box.sub, box.dns, box.broker, BOOT_TIMEOUT_S)
    box.provisioner.check()
    r = scu.storescu(vm.dicom_port, [f.path for f in files], timeout=120)
    assert r.returncode == 0, f"storescu exited {r.returncode}\n{r.stdout}\n{r.stderr}\n{vm.tail()}"
    assert vm.spool_status_with(lambda s: s.get("objects", 0) >= 3)["objects"] == 3

    cmd_no = 0
    cmd = ""
    seen = 0  # state messages of `cmd` before the current power-on
    log: list[str] = []
    for run in range(POWER_CUTS):
        phase = PHASES[run % len(PHASES)]
        t0 = time.monotonic()
        if phase == "download":
            # A new command (the previous one ended rolled-back, or none was sent yet).
            cmd_no += 1
            cmd = f"u-cut-{cmd_no}"
            box.send(cmd, "/v2.raucb", v2, 2)
            box.wait_state(cmd, "downloading", 120)
            sent0 = box.server.sent
            # Somewhere in the paced download: it needs about len(v2) / PACE seconds.
            time.sleep(rng.uniform(1.0, 0.8 * len(v2) / PACE_BYTES))
            point = f"download, {(box.server.sent - sent0) / 2**20:.0f} of {len(v2) / 2**20:.0f} MiB sent"
        elif phase == "install":
            # After the cut in the download the box resumes it by itself, then installs.
            box.sub.wait_for(lambda s: [m for m in s.on(fleet.state_topic(PROVISIONED, OP, cmd))[seen:]
                                        if m.get("state") == "installing"],
                             INSTALL_TIMEOUT_S, describe=f"{cmd} installing again")
            wait = rng.uniform(0.0, INSTALL_CUT_S)
            time.sleep(wait)
            point = f"install, {wait:.0f} s after `installing`"
            late = [m for m in box.states(cmd)[seen:] if m.get("state") == "rebooting"]
            assert not late, (f"the install finished within {wait:.0f} s, before the cut meant for it "
                              f"(INSTALL_CUT_S = {INSTALL_CUT_S} is too long for this machine)")
        else:
            # After the cut in the install the box installs again, then reboots into B.
            mark = vm.mark()
            vm.wait_console(r'BdsDxe: starting Boot[0-9A-F]{4} "system1"', INSTALL_TIMEOUT_S, since=mark)
            wait = rng.uniform(0.0, TRIAL_CUT_S)
            time.sleep(wait)
            point = f"trial boot of slot B, {wait:.1f} s after the firmware started it"
        vm.alive()
        vm.kill()
        seen = len(box.states(cmd))
        log.append(f"cut {run + 1}: {point} ({time.monotonic() - t0:.0f} s into the run)")
        print(log[-1])

        # ---- the next power-on: a verified slot, version 1 or 2, the spool intact
        since = vm.mark()
        vm = box.power_on(f"after-cut-{run + 1}")
        facts = boot_facts(vm, since)
        assert facts["slot"] in ("system0", "system1") and facts["version"] in ("1", "2"), facts
        assert facts["root"] == "/dev/mapper/gw-root" and "status: verified" in facts["verity"], facts
        status = vm.spool_status_with(lambda s: "objects" in s, timeout=BOOT_TIMEOUT_S, since=since)
        assert status["objects"] == 3, f"after cut {run + 1} ({point}): {status}\n{vm.tail()}"
        log.append(f"  boot after cut {run + 1}: {facts['slot']} version {facts['version']}, verified, "
                   f"{status['objects']} objects")
        print(log[-1])
        if phase == "trial":
            # Back in slot A: the trial never finished, the box says so.
            assert facts["slot"] == "system0", f"after a cut in the trial boot the box runs {facts}"
            # (it published that, so it is connected for the next command)
            m = box.final(cmd, BOOT_TIMEOUT_S + 120)
            assert m["state"] == "rolled-back", m

    # ---- then the update is let through: version 2 in slot B, successful, the spool intact
    m = box.final(cmd, 2 * INSTALL_TIMEOUT_S + HEALTH_TIMEOUT_S)
    assert m["state"] == "successful", m
    boot_b = vm.wait_console(r'BdsDxe: starting Boot[0-9A-F]{4} "system1"', 60, since=since).start()
    facts = boot_facts(vm, boot_b)
    assert (facts["slot"], facts["version"]) == ("system1", "2"), facts
    assert vm.spool_status_with(lambda s: "objects" in s, since=boot_b)["objects"] == 3
    print("\n".join(log))
    print(f"after {POWER_CUTS} power cuts the update finished `successful`: slot B, version 2, 3 objects")
