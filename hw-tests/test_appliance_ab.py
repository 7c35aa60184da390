"""The A/B UEFI disk of the appliance image (image-recipe/build.sh: disk.img) booted by OVMF in QEMU.

Pins, on the factory disk.img with a fresh copy of OVMF's variable store per box (its NVRAM) and
an swtpm vTPM:
- the factory disk boots slot A with empty NVRAM (the removable-media fallback on gw-efi-a),
  through the unified kernel image gw-a.efi: its built-in command line names the slot
  (`rauc.slot=system0`) and the root's dm-verity hash; the initramfs opens gw-root-a as the
  verity device /dev/mapper/gw-root (`veritysetup status`: verified, the image's root hash),
  / is read-only, gatewayd answers DICOM through QEMU's hostfwd and stores an object;
- gw-boot-entries.service makes the two UEFI boot entries (system0 first in BootOrder, system1
  not in it) and they survive a clean power-off and a power cut: the next two power-ons start
  `Boot#### "system0"` from NVRAM, with the stored object still there;
- a flipped byte in a file of the active root (an inert canary shipped in the image) is an I/O
  error on read, with the kernel naming the corrupted data block, never the wrong bytes, and
  the box still serves DICOM; a flipped byte in the root's first block makes the slot refuse
  to boot (the initramfs panics before mounting it, panic=10 reboots; bounded);
- RAUC (image-recipe/rauc): a version 2 bundle made by image-recipe/bundle.sh (signed by the test
  update signer, hw-tests/.cache/update-ca) is installed from inside slot A with `rauc install`
  (gatewayd-test-rauc.service copies it from a third, read-only virtio disk): gw-root-b and
  gw-efi-b then hold the bundle's images byte for byte and BootNext is system1, BootOrder still
  system0 first; the next power-on runs slot B (verity over /dev/vda4); a power cut in that
  unconfirmed trial boot brings the box back to slot A (the rollback); after `rauc status
  mark-active other` the next boot is B again, `rauc status mark-good booted` puts system1 first
  in BootOrder, and B stays the boot after a power-off. The bundle's pre-install handler runs
  `gatewayd update pre-install`: GATEWAYD must be a build with the update command.

Everything listens on 127.0.0.1 (QEMU's hostfwd; swtpm and monitor on Unix sockets in tmp_path);
qemu and swtpm are killed by PID at teardown. A missing tool or OVMF fails the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import data
import scu
from appliance import (BOOT_TIMEOUT_S, POWEROFF_TIMEOUT_S, RECIPE, STATUS_TIMEOUT_S, UefiVm, flip_byte, new_box,
                       partitions, sha256_range, update_ca, verity_info)

# A boot that must fail: firmware + kernel + initramfs + panic=10 under TCG.
REFUSED_BOOT_TIMEOUT_S = 240
CANARY = "/usr/share/gatewayd/verity-canary"
CANARY_LINE = b"gatewayd verity canary: this file is never used; tests flip a byte of it on disk\n"


def _canary_sha256() -> str:
    """sha256 of the canary file build.sh ships: `yes LINE | head -c 65536`."""
    content = (CANARY_LINE * (65536 // len(CANARY_LINE) + 1))[:65536]
    return hashlib.sha256(content).hexdigest()


def _efi_entries(vm: UefiVm) -> tuple[dict[str, str], list[str]]:
    """(label -> Boot number, BootOrder) from the probe's `EFI-BOOT: ` line (efibootmgr)."""
    line = vm.wait_console(r"EFI-BOOT: (.*)$", STATUS_TIMEOUT_S).group(1)
    entries = dict((label, num) for num, label in re.findall(r"Boot([0-9A-Fa-f]{4})\*? ([^;\t]+?)\s*(?:\t|;)", line))
    order = re.search(r"BootOrder: ([0-9A-Fa-f,]+)", line)
    return entries, (order.group(1).split(",") if order else [])


def _assert_slot_a_verified(vm: UefiVm, image) -> None:
    info = verity_info(image)
    text = vm.console_text()
    cmd = re.search(r"Command line: (.*)$", text, re.M)
    assert cmd, f"no kernel command line on the console\n{vm.tail()}"
    assert "rauc.slot=system0" in cmd.group(1) and f"gw.verity=PARTLABEL=gw-root-a," in cmd.group(1), cmd.group(1)
    assert info["roothash"] in cmd.group(1), f"the UKI's command line lacks the image's root hash: {cmd.group(1)}"
    assert "gw-verity: /dev/disk/by-partlabel/gw-root-a opened as /dev/mapper/gw-root" in text, vm.tail()
    slot = vm.wait_console(r"SLOT: (\S+) root (\S+)$", STATUS_TIMEOUT_S)
    assert slot.groups() == ("system0", "/dev/mapper/gw-root"), slot.group(0)
    verity = vm.wait_console(r"VERITY: (.*)$", STATUS_TIMEOUT_S).group(1)
    assert "status: verified" in verity and info["roothash"] in verity, f"veritysetup status gw-root: {verity}"
    assert vm.wait_console(r"IMAGE-VERSION: (\S+)$", STATUS_TIMEOUT_S).group(1) == "1"
    assert re.search(r"ROOTFS-WRITE: EROFS /$", vm.console_text(), re.M), vm.tail()


@pytest.mark.timeout(3 * BOOT_TIMEOUT_S + 2 * POWEROFF_TIMEOUT_S)
def test_factory_disk_boots_slot_a_with_a_verity_root_and_its_boot_entries_survive_power_cycles(
        appliance_image, tmp_path, vms):
    image = appliance_image
    disk, vars_fd = new_box(image, tmp_path / "box")
    tpm_dir = tmp_path / "tpm"
    tpm_dir.mkdir()
    files = data.make_ct_set(1, tmp_path / "dcm")

    # ---- first power-on: empty NVRAM, the fallback BOOTX64.EFI (= gw-a.efi) on gw-efi-a
    vm = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "boot1")
    vms.append(vm)
    vm.start()
    ready = vm.wait_dicom()
    print(f"UEFI boot 1 (factory, keys init): echoscu answered {ready:.0f} s after QEMU started")
    _assert_slot_a_verified(vm, image)
    canary = vm.wait_console(r"VERITY-CANARY: (.*)$", STATUS_TIMEOUT_S).group(1)
    assert canary == f"OK {_canary_sha256()}", f"the intact canary reads wrong: {canary}"
    assert "gw-boot-entries: created Boot" in vm.console_text(), vm.tail()
    entries, order = _efi_entries(vm)
    assert "system0" in entries and "system1" in entries, f"boot entries after boot 1: {entries}"
    assert order and order[0] == entries["system0"], f"BootOrder {order} does not start with system0 {entries}"
    assert entries["system1"] not in order, f"system1 ({entries['system1']}) is in BootOrder {order} before any install"
    r = scu.storescu(vm.dicom_port, [f.path for f in files], timeout=120)
    assert r.returncode == 0, f"storescu exited {r.returncode}\n{r.stdout}\n{r.stderr}\n{vm.tail()}"
    assert vm.spool_status_with(lambda s: s.get("objects", 0) >= 1)["objects"] == 1
    off = vm.power_off()
    print(f"UEFI boot 1: clean power-off took {off:.0f} s")

    # ---- second power-on: the firmware starts system0 from NVRAM; then a power cut
    vm2 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "boot2")
    vms.append(vm2)
    vm2.start()
    ready2 = vm2.wait_dicom()
    print(f"UEFI boot 2 (entries in NVRAM): echoscu answered {ready2:.0f} s after QEMU started")
    assert vm2.boots() and vm2.boots()[-1][1] == "system0", f"boot 2 started {vm2.boots()}, not system0\n{vm2.tail()}"
    _assert_slot_a_verified(vm2, image)
    assert "gw-boot-entries: created" not in vm2.console_text(), "the boot entries were made again on boot 2"
    assert vm2.spool_status_with(lambda s: "objects" in s)["objects"] == 1
    vm2.kill()

    # ---- third power-on after the power cut: same entries, same BootOrder, same data
    vm3 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "boot3")
    vms.append(vm3)
    vm3.start()
    ready3 = vm3.wait_dicom()
    print(f"UEFI boot 3 (after a power cut): echoscu answered {ready3:.0f} s after QEMU started")
    assert vm3.boots() and vm3.boots()[-1][1] == "system0", f"boot 3 started {vm3.boots()}\n{vm3.tail()}"
    entries3, order3 = _efi_entries(vm3)
    assert (entries3["system0"], entries3["system1"]) == (entries["system0"], entries["system1"]), (entries, entries3)
    assert order3[0] == entries["system0"] and entries["system1"] not in order3, order3
    assert vm3.spool_status_with(lambda s: "objects" in s)["objects"] == 1
    vm3.power_off()


@pytest.mark.timeout(BOOT_TIMEOUT_S + REFUSED_BOOT_TIMEOUT_S + POWEROFF_TIMEOUT_S + 120)
def test_flipped_byte_in_the_active_root_is_an_io_error_and_a_flipped_first_block_refuses_the_slot(
        appliance_image, tmp_path, vms):
    image = appliance_image
    info = verity_info(image)
    disk, vars_fd = new_box(image, tmp_path / "box")
    tpm_dir = tmp_path / "tpm"
    tpm_dir.mkdir()
    root_a, _ = partitions(disk)["gw-root-a"]

    # ---- one byte of the canary file's first block, on the disk, before the box is powered on
    block = int(info["canary_block"])
    old, new = flip_byte(disk, root_a + block * 4096 + 123)
    print(f"flipped byte {block * 4096 + 123} of gw-root-a (canary block {block}): {old:#04x} -> {new:#04x}")
    vm = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "canary")
    vms.append(vm)
    t0 = time.monotonic()
    vm.start()
    vm.wait_dicom()
    canary = vm.wait_console(r"VERITY-CANARY: (.*)$", STATUS_TIMEOUT_S).group(1)
    assert canary == "EIO", f"reading the corrupted canary gave {canary!r}, not an I/O error\n{vm.tail()}"
    m = vm.wait_console(r"device-mapper: verity: \S+: data block (\d+) is corrupted", STATUS_TIMEOUT_S)
    assert int(m.group(1)) == block, f"the kernel reported block {m.group(1)}, the flipped one is {block}"
    verity = vm.wait_console(r"VERITY: (.*)$", STATUS_TIMEOUT_S).group(1)
    assert "/dev/mapper/gw-root" in vm.console_text() and "status:" in verity, verity
    print(f"corrupted canary: EIO and the kernel names data block {block} ({time.monotonic() - t0:.0f} s)")
    vm.power_off()

    # ---- one byte of the root's first block: the initramfs refuses the slot before mounting it
    flip_byte(disk, root_a + 7)
    vm2 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "block0")
    vms.append(vm2)
    t0 = time.monotonic()
    vm2.start()
    vm2.wait_console(r"gw-verity: the first block of /dev/disk/by-partlabel/gw-root-a fails verification",
                     REFUSED_BOOT_TIMEOUT_S)
    vm2.wait_console(r"Rebooting automatically due to panic= boot argument", 60)
    vm2.wait_exit(60)
    text = vm2.console_text()
    assert "Reached target" not in text, f"the corrupted slot got past the initramfs\n{vm2.tail()}"
    assert not re.search(r"EXT4-fs \(dm-0\): mounted", text), f"the corrupted root was mounted\n{vm2.tail()}"
    print(f"corrupted first block: slot refused, QEMU ended {time.monotonic() - t0:.0f} s after power-on")


def _bundle(image, tmp_path, version: int) -> tuple[Path, int, float]:
    """image-recipe/bundle.sh of this image as firmware `version`, signed by the test update
    signer; returned as a raw disk image (padded to whole MiB) with the bundle's size and the
    seconds bundle.sh took."""
    for tool in ("rauc", "mksquashfs"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: `apt-get install -y --no-install-recommends rauc squashfs-tools` "
                        "(hw-tests/run-all.sh does this)", pytrace=False)
    _, signer = update_ca()
    bundle = tmp_path / f"gateway-{version}.raucb"
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(RECIPE / "bundle.sh"), str(image), str(version), str(version),
                        str(signer.key), str(signer.cert), str(bundle)],
                       capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    assert r.returncode == 0, f"bundle.sh exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    size = bundle.stat().st_size
    raw = tmp_path / "bundle.disk"
    bundle.rename(raw)
    with open(raw, "r+b") as f:
        f.truncate((size + (1 << 20) - 1) // (1 << 20) * (1 << 20))
    return raw, size, took


def _rauc_lines(vm: UefiVm, timeout: float) -> tuple[str, str]:
    """(RAUC-STATUS, EFI-BOOT) printed by gatewayd-test-rauc.service at the end of its run."""
    m = vm.wait_console(r"RAUC-STATUS: (.*)$", timeout)
    deadline = time.monotonic() + 30
    while True:
        after = re.findall(r"EFI-BOOT: (.*)$", vm.console_text()[m.end():], re.M)
        if after:
            return m.group(1), after[0]
        assert time.monotonic() < deadline, f"no EFI-BOOT line after RAUC-STATUS\n{vm.tail()}"
        time.sleep(0.5)


def _boot_vars(efi_line: str) -> tuple[dict[str, str], list[str], str | None]:
    entries = dict((label, num) for num, label in re.findall(r"Boot([0-9A-Fa-f]{4})\*? ([^;\t]+?)\s*(?:\t|;)", efi_line))
    order = re.search(r"BootOrder: ([0-9A-Fa-f,]+)", efi_line)
    nxt = re.search(r"BootNext: ([0-9A-Fa-f]{4})", efi_line)
    return entries, (order.group(1).split(",") if order else []), (nxt.group(1) if nxt else None)


@pytest.mark.timeout(1200 + 5 * BOOT_TIMEOUT_S)
def test_rauc_install_boots_slot_b_once_rolls_back_to_a_unless_marked_good(appliance_image, tmp_path, vms):
    image = appliance_image
    raw, size, took = _bundle(image, tmp_path, version=2)
    print(f"bundle.sh: version 2 bundle {size / 2**20:.0f} MiB in {took:.0f} s")
    disk, vars_fd = new_box(image, tmp_path / "box")
    tpm_dir = tmp_path / "tpm"
    tpm_dir.mkdir()
    parts = partitions(disk)
    rootfs, efi = image / "rootfs.img", image / "efi.vfat"
    root_b, efi_b = parts["gw-root-b"], parts["gw-efi-b"]
    rauc_hooks = ["systemd.wants=gatewayd-test-rauc.service"]

    # ---- boot 1 (factory, slot A): rauc install of the bundle from the third disk
    vm = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "install", bundle_disk=raw,
                hooks=[*rauc_hooks, f"gw.test_bundle={size}"])
    vms.append(vm)
    vm.start()
    vm.wait_dicom()
    m = vm.wait_console(r"RAUC-INSTALL: (OK (\d+) s|FAILED.*)$", 900)
    assert m.group(1).startswith("OK"), (
        f"rauc install of the version 2 bundle failed: {m.group(1)} (its pre-install handler runs `gatewayd update "
        f"pre-install`: GATEWAYD must have the update command)\n{vm.tail()}")
    install_s = int(m.group(2))
    print(f"rauc install (slot B: {rootfs.stat().st_size / 2**20:.0f} MiB root + {efi.stat().st_size / 2**20:.0f} MiB efi, "
          f"read back) took {install_s} s in the guest")
    status, efi_line = _rauc_lines(vm, 60)
    entries, order, nxt = _boot_vars(efi_line)
    assert nxt == entries["system1"], f"rauc install did not set BootNext to system1: {efi_line}"
    assert order[0] == entries["system0"] and entries["system1"] not in order, f"BootOrder after install: {efi_line}"
    vm.power_off()
    assert sha256_range(disk, root_b[0], rootfs.stat().st_size) == hashlib.sha256(rootfs.read_bytes()).hexdigest(), \
        "gw-root-b does not hold the bundle's root image"
    assert sha256_range(disk, efi_b[0], efi.stat().st_size) == hashlib.sha256(efi.read_bytes()).hexdigest(), \
        "gw-efi-b does not hold the bundle's efi image"

    # ---- boot 2: BootNext -> slot B, once; not marked good; power cut
    vm2 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "trial")
    vms.append(vm2)
    vm2.start()
    ready = vm2.wait_dicom()
    assert vm2.boots()[-1][1] == "system1", f"the boot after install started {vm2.boots()}\n{vm2.tail()}"
    slot = vm2.wait_console(r"SLOT: (\S+) root (\S+)$", STATUS_TIMEOUT_S)
    assert slot.groups() == ("system1", "/dev/mapper/gw-root"), slot.group(0)
    verity = vm2.wait_console(r"VERITY: (.*)$", STATUS_TIMEOUT_S).group(1)
    assert "status: verified" in verity and "data device: /dev/vda4" in verity, verity
    print(f"trial boot of slot B: DICOM answered {ready:.0f} s after power-on")
    vm2.kill()

    # ---- boot 3: not marked good -> the firmware takes BootOrder: slot A (the rollback);
    #      then RAUC makes B the next boot again (mark-active other = BootNext)
    vm3 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "rollback", hooks=[*rauc_hooks, "gw.test_rauc=mark-active-other"])
    vms.append(vm3)
    vm3.start()
    vm3.wait_dicom()
    assert vm3.boots()[-1][1] == "system0", f"after a power cut in the trial boot the box started {vm3.boots()}"
    assert vm3.wait_console(r"SLOT: (\S+) root", STATUS_TIMEOUT_S).group(1) == "system0"
    status, efi_line = _rauc_lines(vm3, 120)
    entries, order, nxt = _boot_vars(efi_line)
    assert nxt == entries["system1"] and entries["system1"] not in order, f"after mark-active other: {efi_line}"
    vm3.power_off()

    # ---- boot 4: slot B again; `rauc status mark-good booted` puts it first in BootOrder
    vm4 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "markgood", hooks=[*rauc_hooks, "gw.test_rauc=mark-good"])
    vms.append(vm4)
    vm4.start()
    vm4.wait_dicom()
    assert vm4.boots()[-1][1] == "system1", f"BootNext did not start system1: {vm4.boots()}"
    assert "RAUC-ACTION: mark-good" in vm4.wait_console(r"RAUC-ACTION: mark-good.*$", 120).group(0)
    status, efi_line = _rauc_lines(vm4, 120)
    entries, order, nxt = _boot_vars(efi_line)
    assert order[0] == entries["system1"] and nxt is None, f"after mark-good: {efi_line}"
    vm4.power_off()

    # ---- boot 5 after a power-off: slot B stays primary
    vm5 = UefiVm(image, tmp_path, disk, vars_fd, tpm_dir, "stays")
    vms.append(vm5)
    vm5.start()
    vm5.wait_console(r"Command line: .*rauc\.slot=system1", BOOT_TIMEOUT_S)
    assert vm5.boots()[-1][1] == "system1", f"after mark-good the box started {vm5.boots()}"
    vm5.kill()
