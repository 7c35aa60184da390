"""The appliance image (image-recipe/) booted in QEMU with an swtpm vTPM.

Pins, on one image and one state disk:
- the image builds with `image-recipe/build.sh` (cached in hw-tests/.cache/appliance-KEY,
  KEY = sha256 of the gatewayd binary, image-recipe/build.sh + files/ and config/gatewayd.service);
- it boots (direct kernel boot, TCG) and its hardened gatewayd.service answers DICOM on the
  forwarded port: DCMTK `echoscu` and `storescu` from the host succeed;
- the key store is the TPM (the binary links libtss2-esys, i.e. was built with `--features tpm`;
  gatewayd logs "TPM found"; `keys status` says backend tpm);
- `spool status` (printed on the console by the image's probe unit) counts the stored object;
- writing to / inside the VM fails with EROFS, while the state partition is writable;
- the image has no package manager (read from rootfs.img with debugfs, no boot): no apt*,
  dpkg*, debconf* or update-alternatives in /usr/bin or /usr/sbin, no apt/dpkg/debconf
  state folders, every alternatives symlink still resolves, and OUTDIR/packages.txt lists
  the packages (taken before dpkg was removed);
- after a clean power-off (Ctrl-Alt-Del, systemd stops gatewayd, QEMU exits on the reboot)
  a second boot on the same state.img and the same swtpm state answers again, still counts
  the object and reports the same spool master key fingerprint (the TPM-sealed key unsealed
  again) without a second `keys init`.

Everything listens on 127.0.0.1 (QEMU's hostfwd, the swtpm and monitor sockets are Unix
sockets in tmp_path); qemu and swtpm are killed by PID at teardown. A missing tool
(mmdebstrap, qemu-system-x86_64, swtpm, mkfs.ext4, debugfs) fails the test.
"""

from __future__ import annotations

import hashlib
import re

import pytest

import data
import scu
from appliance import (BOOT_TIMEOUT_S, BUILD_TIMEOUT_S, PACKAGE_STATE, PACKAGE_TOOLS, POWEROFF_TIMEOUT_S,
                       RECIPE, STATUS_TIMEOUT_S, RootImage, Vm, fresh_state)


def _fingerprint(text: str) -> str:
    m = re.search(r"KEYS-STATUS: backend tpm: initialised; spool master key (\S+)", text)
    assert m, "no `KEYS-STATUS: backend tpm: initialised; spool master key ...` line on the console"
    return m.group(1)


def test_appliance_image_has_no_package_manager_and_ships_its_package_list(appliance_image):
    root = RootImage(appliance_image / "rootfs.img")
    for d in ("/usr/bin", "/usr/sbin"):
        names = root.ls(d)
        assert names, f"debugfs cannot list {d} in rootfs.img"
        found = sorted(n for n in names if n in PACKAGE_TOOLS or n.startswith(("dpkg", "apt-", "debconf")))
        assert not found, f"package manager tooling in {d} of the image: {found}"
    for d in PACKAGE_STATE:
        assert root.stat(d) is None, f"{d} is still in the image"
    libs = root.ls("/usr/lib/x86_64-linux-gnu") or {}
    assert "libtss2-esys.so.0" in libs, "debugfs cannot list /usr/lib/x86_64-linux-gnu in rootfs.img"
    assert not [n for n in libs if n.startswith("libapt-")], "apt's library is still in the image"
    # A DNS resolver: systemd-resolved enabled, /etc/resolv.conf its stub in /run (read-only root).
    assert root.stat("/etc/resolv.conf") == ("symlink", "../run/systemd/resolve/stub-resolv.conf"), (
        root.stat("/etc/resolv.conf"))
    assert root.resolves_to_file("/usr/lib/systemd/systemd-resolved"), "no systemd-resolved in the image"
    wants = root.ls("/etc/systemd/system/multi-user.target.wants") or {}
    aliases = root.ls("/etc/systemd/system") or {}
    assert "systemd-resolved.service" in wants or "dbus-org.freedesktop.resolve1.service" in aliases, (
        f"systemd-resolved is not enabled: {sorted(wants)}")
    # The alternatives symlinks keep working without update-alternatives and its database.
    links = {}
    for d in ("/usr/bin", "/usr/sbin"):
        for name, mode in (root.ls(d) or {}).items():
            if mode & 0o170000 == 0o120000:  # S_IFLNK
                st = root.stat(f"{d}/{name}")
                if st is not None and st[1] is not None and st[1].startswith("/etc/alternatives/"):
                    links[f"{d}/{name}"] = st[1]
    assert links, "no command goes through /etc/alternatives (expected at least `which`)"
    broken = sorted(p for p in links if not root.resolves_to_file(p))
    assert not broken, f"alternatives symlinks that no longer resolve: {broken}"
    # The package list, taken before dpkg was removed, is an output of the build.
    lines = (appliance_image / "packages.txt").read_text().splitlines()
    pkgs = dict(line.split(" ", 1) for line in lines if " " in line)
    assert len(pkgs) == len(lines) and len(pkgs) >= 50, f"packages.txt is not `name version` lines: {lines[:5]}"
    for p in ("systemd", "linux-image-amd64", "libtss2-tcti-device0", "dpkg", "apt"):
        assert p in pkgs, f"{p} missing from packages.txt"
    assert any(p.startswith("libtss2-esys") for p in pkgs), "libtss2-esys (gatewayd links it) missing from packages.txt"
    assert "packages.txt" in (appliance_image / "manifest.txt").read_text()
    print(f"image without a package manager: {len(pkgs)} packages in packages.txt, "
          f"{len(links)} commands via /etc/alternatives resolve")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 4 * BOOT_TIMEOUT_S + 2 * POWEROFF_TIMEOUT_S)
def test_appliance_boots_serves_dicom_with_tpm_keys_ro_root_and_keeps_state_across_reboot(
        appliance_image, tmp_path, vms):
    image = appliance_image
    size = sum((image / f).stat().st_size for f in ("rootfs.img", "vmlinuz", "initrd.img"))
    print(f"image {image.name}: rootfs+kernel+initrd {size / 2**20:.0f} MiB")
    # A fresh state disk (sparse copy) and TPM for this test; both survive the reboot.
    state_img = fresh_state(image, tmp_path / "state.img")
    tpm_dir = tmp_path / "tpm"
    tpm_dir.mkdir()
    files = data.make_ct_set(1, tmp_path / "dcm")

    # ---- first boot: keys init, DICOM, TPM, read-only root
    vm = Vm(image, tmp_path, state_img, tpm_dir, "boot1")
    vms.append(vm)
    vm.start()
    ready_s = vm.wait_dicom()
    print(f"boot 1: echoscu answered {ready_s:.0f} s after QEMU started")
    text = vm.console_text()
    assert "TPM found" in text, f"gatewayd did not log 'TPM found'\n{vm.tail()}"
    assert "initialised tpm key store" in text, f"no first-boot `keys init` on the console\n{vm.tail()}"
    r = scu.storescu(vm.dicom_port, [f.path for f in files], timeout=120)
    assert r.returncode == 0, f"storescu exited {r.returncode}\n{r.stdout}\n{r.stderr}\n{vm.tail()}"
    status = vm.spool_status_with(lambda s: s.get("objects", 0) >= 1)
    assert status["objects"] == 1, status
    vm.wait_console(r"KEYS-STATUS: ", STATUS_TIMEOUT_S)
    fp1 = _fingerprint(vm.console_text())
    # The empty state partition got the factory config as its effective config, byte for byte.
    cfg = vm.wait_console(r"CONFIG-SHA256: effective (\S+) factory (\S+) previous (\S+)", STATUS_TIMEOUT_S)
    factory = hashlib.sha256((RECIPE / "files" / "gatewayd.toml").read_bytes()).hexdigest()
    assert (cfg.group(1), cfg.group(2), cfg.group(3)) == (factory, factory, "none"), (
        f"first boot on an empty state partition: {cfg.group(0)} (factory config sha256 {factory})\n{vm.tail()}")
    vm.wait_console(r"ROOTFS-WRITE: \S+ /$", STATUS_TIMEOUT_S)
    text = vm.console_text()
    for d in ("/", "/etc", "/usr"):
        assert re.search(rf"ROOTFS-WRITE: EROFS {re.escape(d)}$", text, re.M), (
            f"writing to {d} inside the VM did not fail with EROFS\n{vm.tail()}")
    assert "STATE-WRITE: OK /var/lib/gatewayd" in text, vm.tail()
    off_s = vm.power_off()
    print(f"boot 1: clean power-off took {off_s:.0f} s")
    assert "gatewayd stopped" in vm.console_text(), f"gatewayd did not drain and stop at power-off\n{vm.tail()}"

    # ---- second boot: same state disk, same TPM state
    vm2 = Vm(image, tmp_path, state_img, tpm_dir, "boot2")
    vms.append(vm2)
    vm2.start()
    ready2_s = vm2.wait_dicom()
    print(f"boot 2: echoscu answered {ready2_s:.0f} s after QEMU started")
    status2 = vm2.spool_status_with(lambda s: "objects" in s)
    assert status2["objects"] == 1, f"the stored object did not survive the reboot: {status2}"
    vm2.wait_console(r"KEYS-STATUS: ", STATUS_TIMEOUT_S)
    fp2 = _fingerprint(vm2.console_text())
    assert fp2 == fp1, f"spool master key changed across the reboot: {fp1} -> {fp2}"
    assert "initialised tpm key store" not in vm2.console_text(), "keys init ran again on the second boot"
    vm2.power_off()
