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
- RAUC installs, the trial boot through BootNext, mark-good, the rollback and power cuts in the
  middle of all of them are test_appliance_update.py's (through gatewayd and the fleet broker).

Everything listens on 127.0.0.1 (QEMU's hostfwd; swtpm and monitor on Unix sockets in tmp_path);
qemu and swtpm are killed by PID at teardown. A missing tool or OVMF fails the test.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest

import data
import scu
from appliance import (BOOT_TIMEOUT_S, POWEROFF_TIMEOUT_S, STATUS_TIMEOUT_S, UefiVm, flip_byte, new_box, partitions,
                       verity_info)

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
