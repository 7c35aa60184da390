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
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import data
import gw
import scu

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "image-recipe"
CACHE = HERE / ".cache"
BUILD_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 420
STATUS_TIMEOUT_S = 60
POWEROFF_TIMEOUT_S = 120
TOOLS = ("mmdebstrap", "mkfs.ext4", "debugfs", "qemu-system-x86_64", "swtpm")
# Package manager tooling that must not be in the image (image-recipe/build.sh removes it).
PACKAGE_TOOLS = ("apt", "apt-get", "apt-cache", "apt-cdrom", "apt-config", "apt-key", "apt-mark",
                 "dpkg", "dpkg-deb", "dpkg-query", "dpkg-divert", "dpkg-split", "dpkg-trigger",
                 "dpkg-statoverride", "dpkg-maintscript-helper", "dpkg-realpath", "dpkg-reconfigure",
                 "dpkg-preconfigure", "update-alternatives")
PACKAGE_STATE = ("/var/lib/dpkg", "/var/lib/apt", "/var/cache/apt", "/etc/apt", "/var/cache/debconf")
CMDLINE = ("root=/dev/vda ro console=ttyS0 systemd.journald.forward_to_console=1 "
           "systemd.wants=gatewayd-probe.service")


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"not found on PATH: {', '.join(missing)}. Install them with `apt-get install -y "
            "--no-install-recommends mmdebstrap e2fsprogs qemu-system-x86 swtpm` (hw-tests/run-all.sh does this)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("the appliance image is built with mmdebstrap --mode=root: run as root", pytrace=False)


def image_key(gatewayd_bin: str) -> str:
    """Hash of everything that goes into the image: the binary, the recipe, the unit."""
    h = hashlib.sha256()  # (image-recipe/README.md is not in the image)
    files = [Path(gatewayd_bin), REPO / "config" / "gatewayd.service", RECIPE / "build.sh"]
    files += sorted(p for p in (RECIPE / "files").rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p.name).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_image(gatewayd_bin: str) -> Path:
    """The image folder for this binary and recipe: cached, or built now (old builds removed)."""
    key = image_key(gatewayd_bin)
    out = CACHE / f"appliance-{key}"
    if (out / ".complete").is_file():
        return out
    CACHE.mkdir(exist_ok=True)
    for old in CACHE.glob("appliance-*"):
        shutil.rmtree(old, ignore_errors=True)
    out.mkdir()
    log = out / "build.log"
    t0 = time.monotonic()
    with open(log, "wb") as f:
        r = subprocess.run(
            ["bash", str(RECIPE / "build.sh"), str(out)],
            env={**os.environ, "GATEWAYD": gatewayd_bin}, stdin=subprocess.DEVNULL,
            stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
        )
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert r.returncode == 0, f"image-recipe/build.sh exited {r.returncode}\n{tail}"
    (out / ".complete").write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    print(f"image built in {time.monotonic() - t0:.0f} s:\n{tail}")
    return out


class Vm:
    """One QEMU boot of the image with its own swtpm process on a shared state folder."""

    def __init__(self, image: Path, work: Path, state_img: Path, tpm_dir: Path, name: str):
        self.image, self.work, self.state_img, self.tpm_dir, self.name = image, work, state_img, tpm_dir, name
        self.console = work / f"{name}-console.log"
        self.monitor = work / f"{name}-monitor.sock"
        self.tpm_sock = work / f"{name}-tpm.sock"
        self.dicom_port = gw.free_port()
        self.swtpm: subprocess.Popen | None = None
        self.qemu: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        tpm_log = self.work / f"{self.name}-swtpm.log"
        self.swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_dir}",
             "--ctrl", f"type=unixio,path={self.tpm_sock}", "--terminate",
             "--log", f"file={tpm_log},level=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.tpm_sock.exists():
            assert self.swtpm.poll() is None, f"swtpm exited {self.swtpm.returncode}: {tpm_log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "swtpm control socket did not appear within 10 s"
            time.sleep(0.05)
        self.started = time.monotonic()
        self.qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
             "-display", "none", "-no-reboot",
             "-serial", f"file:{self.console}",
             "-monitor", f"unix:{self.monitor},server=on,wait=off",
             "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
             "-append", CMDLINE,
             "-drive", f"file={self.image / 'rootfs.img'},if=virtio,format=raw,readonly=on",
             "-drive", f"file={self.state_img},if=virtio,format=raw",
             "-netdev", f"user,id=n0,restrict=off,hostfwd=tcp:127.0.0.1:{self.dicom_port}-:11112",
             "-device", "virtio-net-pci,netdev=n0",
             "-chardev", f"socket,id=chrtpm,path={self.tpm_sock}",
             "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"],
            stdin=subprocess.DEVNULL, stdout=open(self.work / f"{self.name}-qemu.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def console_text(self) -> str:
        if not self.console.exists():
            return ""
        return self.console.read_bytes().decode("utf-8", errors="replace").replace("\r", "")

    def tail(self, n: int = 60) -> str:
        qlog = self.work / f"{self.name}-qemu.log"
        extra = qlog.read_text(errors="replace") if qlog.exists() else ""
        return f"--- serial console ({self.name}), last {n} lines:\n" + "\n".join(
            self.console_text().splitlines()[-n:]) + (f"\n--- qemu:\n{extra}" if extra.strip() else "")

    def alive(self) -> None:
        assert self.qemu is not None and self.qemu.poll() is None, (
            f"qemu exited with {self.qemu.returncode if self.qemu else None}\n{self.tail()}")

    def wait_dicom(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Seconds from QEMU start until `echoscu` through the forwarded port succeeds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.alive()
            try:
                r = scu.echoscu(self.dicom_port, timeout=20)
                if r.returncode == 0:
                    return time.monotonic() - self.started
                last = r.stdout + r.stderr
            except subprocess.TimeoutExpired:
                last = "echoscu timed out"
            time.sleep(2)
        raise AssertionError(f"DICOM did not answer on 127.0.0.1:{self.dicom_port} within {timeout} s "
                             f"(last echoscu: {last!r})\n{self.tail()}")

    def wait_console(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while time.monotonic() < deadline:
            m = rx.search(self.console_text())
            if m:
                return m
            self.alive()
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not on the serial console within {timeout} s\n{self.tail()}")

    def spool_status_with(self, pred, timeout: float = STATUS_TIMEOUT_S) -> dict:
        """The newest `SPOOL-STATUS: {json}` line for which pred(status) holds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for m in reversed(list(re.finditer(r"SPOOL-STATUS: (\{.*\})\s*$", self.console_text(), re.M))):
                try:
                    last = json.loads(m.group(1))
                except json.JSONDecodeError:
                    continue
                break
            if last is not None and pred(last):
                return last
            self.alive()
            time.sleep(1)
        raise AssertionError(f"no matching spool status within {timeout} s (last: {last})\n{self.tail()}")

    def hmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.monitor))
            s.recv(4096)  # banner
            s.sendall(command.encode() + b"\n")
            time.sleep(0.5)

    def power_off(self, timeout: float = POWEROFF_TIMEOUT_S) -> float:
        """Ctrl-Alt-Del: systemd stops every service and unmounts, the guest reboots and
        QEMU (-no-reboot) exits. Returns the seconds it took."""
        t0 = time.monotonic()
        self.hmp("sendkey ctrl-alt-delete")
        assert self.qemu is not None
        try:
            self.qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the guest did not shut down within {timeout} s of Ctrl-Alt-Del\n{self.tail()}") from None
        if self.swtpm is not None:
            try:
                self.swtpm.wait(timeout=10)  # --terminate: it ends with QEMU's connection
            except subprocess.TimeoutExpired:
                self._kill(self.swtpm)
        return time.monotonic() - t0

    @staticmethod
    def _kill(proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def cleanup(self) -> None:
        self._kill(self.qemu)
        self._kill(self.swtpm)


@pytest.fixture(scope="module")
def appliance_image(gatewayd_bin) -> Path:
    _require_tools()
    # The image's key store is the TPM: the binary must be built with `--features tpm`.
    ldd = subprocess.run(["ldd", gatewayd_bin], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert "libtss2-esys" in ldd.stdout, (
        f"GATEWAYD={gatewayd_bin} has no TPM back end (no libtss2-esys in ldd): build it with "
        f"`cargo build --release -p gatewayd --features tpm`\n{ldd.stdout}{ldd.stderr}"
    )
    return build_image(gatewayd_bin)


class RootImage:
    """Read-only view of an ext4 image through `debugfs -R` (no mount, no boot)."""

    def __init__(self, img: Path):
        self.img = img

    def _run(self, request: str) -> subprocess.CompletedProcess:
        return subprocess.run(["debugfs", "-R", request, str(self.img)], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def ls(self, path: str) -> dict[str, int] | None:
        """name -> mode of the entries of the folder `path`, None if there is no such folder."""
        r = self._run(f"ls -p {path}")
        if r.returncode != 0 or "not found" in r.stderr or "Ext2 inode is not a directory" in r.stderr:
            return None
        entries = {}
        for line in r.stdout.splitlines():  # /inode/mode/uid/gid/name/size/
            parts = line.strip().split("/")
            if len(parts) >= 7 and parts[5] not in (".", ".."):
                entries[parts[5]] = int(parts[2], 8)
        return entries

    def stat(self, path: str) -> tuple[str, str | None] | None:
        """(type, symlink target or None) of `path`, a final symlink not followed; None if absent."""
        r = self._run(f"stat {path}")
        kind = re.search(r"Type:\s+(\w+)", r.stdout)
        if kind is None:
            return None
        target = re.search(r'Fast link dest: "(.*)"', r.stdout)
        return kind.group(1), target.group(1) if target else None

    def resolves_to_file(self, path: str, hops: int = 8) -> bool:
        """Whether `path`, its symlinks followed, ends at a regular file in the image."""
        for _ in range(hops):
            st = self.stat(path)
            if st is None:
                return False
            kind, target = st
            if kind != "symlink":
                return kind == "regular"
            if target is None:  # a slow symlink (target > 60 bytes): not used by alternatives
                return False
            path = target if target.startswith("/") else str(Path(path).parent / target)
        return False


@pytest.fixture
def vms():
    """The VMs a test started; qemu and swtpm killed by PID at teardown."""
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.cleanup()


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
    state_img = tmp_path / "state.img"
    subprocess.run(["cp", "--sparse=always", str(image / "state.img"), str(state_img)], check=True)
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
