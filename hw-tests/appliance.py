"""The appliance image (image-recipe/) for the QEMU tests: build it once, boot it with an swtpm vTPM.

One home for what every QEMU test needs:
- `build_image(gatewayd_bin)`: image-recipe/build.sh into hw-tests/.cache/appliance-KEY, KEY = sha256 of
  the gatewayd binary, image-recipe/build.sh + files/ + rauc/, config/gatewayd.service and the test update
  CA (`update_ca()`, kept in hw-tests/.cache/update-ca: the image's RAUC keyring); built once per run
  (the `appliance_image` fixture in conftest.py), older builds removed;
- `Vm`: one QEMU boot (TCG, direct kernel boot) with its own swtpm on a shared TPM state folder, the
  console on a file, the HMP monitor on a Unix socket, guest ports forwarded to 127.0.0.1 ports the
  test picks (`forwards`); `power_off()` is a clean Ctrl-Alt-Del, `kill()` a power cut (SIGKILL of
  QEMU: whatever the guest kernel had not written to the disk image is gone); `rtc=rtc_base(s)` boots
  the guest with its clock `s` seconds ahead of the host's (e.g. past an expiry);
- `fresh_state(image, dest, files)`: a fresh state partition (ext4, label gw-state), empty or holding
  `files`, e.g. `config/gatewayd.toml` (the effective config the unit runs with) or a claim credential:
  files are written root-owned; the unit's StateDirectory= gives the whole tree to the gatewayd user;
- `read_state(state_img, dest)`: the files of a state disk as the next boot would find them (e2fsck -f -p
  on a copy, then debugfs rdump), read on the host after a power cut;
- `DnsServer`: dnsmasq on 127.0.0.1 answering only the test's names, the guest's resolver through
  `Vm(cmdline=dns.cmdline())` (never QEMU's 10.0.2.3, which forwards to the host's resolver);
- `RootImage`: read-only view of rootfs.img through debugfs (no mount, no boot);
- `UefiVm`: the A/B disk (disk.img, GPT) booted by OVMF from a per-box copy of its NVRAM (`new_box`),
  the test hooks as SMBIOS OEM strings; `UefiBox`: one box across power-ons, a guest reboot
  being a power cycle (a new QEMU on the same disk, NVRAM and TPM state); `partitions`, `sha256_range`,
  `flip_byte`, `extract_partition`: the disk's partitions read and damaged on the host.

Everything listens on 127.0.0.1 (QEMU's hostfwd; the swtpm and monitor sockets are Unix sockets in the
test's folder); qemu and swtpm are killed by PID at teardown (the `vms` fixture). A missing tool
(mmdebstrap, qemu-system-x86_64, swtpm, mkfs.ext4, debugfs) fails the test.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import gw
import pki
import scu

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "image-recipe"
CACHE = HERE / ".cache"
BUILD_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 420
STATUS_TIMEOUT_S = 60
POWEROFF_TIMEOUT_S = 120
# The test firmware build.sh makes beside the image (OUTDIR/variant-WORD/, GW_VARIANTS): version 2,
# and a version 3 whose `gatewayd run` fails (its update health check fails).
VARIANTS = ("2", "3-broken")
TOOLS = ("mmdebstrap", "mkfs.ext4", "debugfs", "qemu-system-x86_64", "swtpm", "veritysetup", "objcopy",
         "mkfs.fat", "mcopy", "sfdisk")
# OVMF, the UEFI firmware of the A/B disk's VMs: code read-only, a per-box copy of the variables.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Package manager tooling that must not be in the image (image-recipe/build.sh removes it).
PACKAGE_TOOLS = ("apt", "apt-get", "apt-cache", "apt-cdrom", "apt-config", "apt-key", "apt-mark",
                 "dpkg", "dpkg-deb", "dpkg-query", "dpkg-divert", "dpkg-split", "dpkg-trigger",
                 "dpkg-statoverride", "dpkg-maintscript-helper", "dpkg-realpath", "dpkg-reconfigure",
                 "dpkg-preconfigure", "update-alternatives")
PACKAGE_STATE = ("/var/lib/dpkg", "/var/lib/apt", "/var/cache/apt", "/etc/apt", "/var/cache/debconf")
CMDLINE = ("root=/dev/vda ro console=ttyS0 systemd.journald.forward_to_console=1 "
           "systemd.wants=gatewayd-probe.service")


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"not found on PATH: {', '.join(missing)}. Install them with `apt-get install -y "
            "--no-install-recommends mmdebstrap e2fsprogs qemu-system-x86 swtpm cryptsetup-bin binutils "
            "dosfstools mtools fdisk systemd-boot-efi` (hw-tests/run-all.sh does this)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("the appliance image is built with mmdebstrap --mode=root: run as root", pytrace=False)


def update_ca() -> tuple[Path, pki.KeyPair]:
    """The test vendor's update CA (its certificate is the image's RAUC keyring, GW_UPDATE_CA of
    build.sh) and a bundle signing key + certificate it issued (extendedKeyUsage codeSigning), for
    image-recipe/bundle.sh. Made once in hw-tests/.cache/update-ca and kept, so that a cached image
    and the bundles a later run makes agree (the CA is part of the image key)."""
    d = CACHE / "update-ca"
    ca_pem, key, cert = d / "ca.pem", d / "signer.key", d / "signer.pem"
    if not (ca_pem.is_file() and key.is_file() and cert.is_file()):
        shutil.rmtree(d, ignore_errors=True)
        ca = pki.CA(d, name="hw-tests update CA", days=3650)
        pki.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
        key.chmod(0o600)
        csr = d / "signer.csr"
        pki.openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/O=hw-tests/CN=hw-tests update signer")
        ca._sign(csr, cert, ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature",
                             "extendedKeyUsage = codeSigning", "subjectKeyIdentifier = hash"])
    return ca_pem, pki.KeyPair(key, cert)


def image_key(gatewayd_bin: str) -> str:
    """Hash of everything that goes into the image: the binary, the recipe, the unit, the update CA."""
    h = hashlib.sha256()  # (image-recipe/README.md is not in the image)
    files = [Path(gatewayd_bin), REPO / "config" / "gatewayd.service", RECIPE / "build.sh", update_ca()[0]]
    h.update(" ".join(VARIANTS).encode() + b"\0")
    files += sorted(p for p in (RECIPE / "files").rglob("*") if p.is_file())
    files += sorted(p for p in (RECIPE / "rauc").rglob("*") if p.is_file())
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
            env={**os.environ, "GATEWAYD": gatewayd_bin, "GW_UPDATE_CA": str(update_ca()[0]),
                 "GW_VARIANTS": " ".join(VARIANTS)},
            stdin=subprocess.DEVNULL,
            stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
        )
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert r.returncode == 0, f"image-recipe/build.sh exited {r.returncode}\n{tail}"
    (out / ".complete").write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    print(f"image built in {time.monotonic() - t0:.0f} s:\n{tail}")
    return out


class ConsoleWaits:
    """Waits on a serial console's text: `console_text()`, `alive()` (raises when the machine
    behind it is gone) and `tail()` come from the class that mixes this in (`Vm`, or a box
    made of several power-ons)."""

    def console_text(self) -> str:
        raise NotImplementedError

    def alive(self) -> None:
        raise NotImplementedError

    def tail(self, n: int = 60) -> str:
        raise NotImplementedError

    def mark(self) -> int:
        """The console's length now: pass it as `since` to look only at what comes after
        (e.g. the boot after a reboot)."""
        return len(self.console_text())

    def whole_lines(self) -> str:
        """The console text up to its last newline: a line QEMU is still writing may be cut
        short (a CI run read `SLOT: system0 root /dev/mappe` from a half-written line), and a
        pattern ending in `$` (re.M) would take the end of the text for the end of the line."""
        text = self.console_text()
        return text[: text.rfind("\n") + 1]

    def wait_console(self, pattern: str, timeout: float, since: int = 0) -> re.Match:
        """The first match of `pattern` in the whole lines of the console text from offset
        `since` on."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while time.monotonic() < deadline:
            m = rx.search(self.whole_lines(), since)
            if m:
                return m
            self.alive()
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not on the serial console within {timeout} s\n{self.tail()}")

    def spool_status_with(self, pred, timeout: float = STATUS_TIMEOUT_S, since: int = 0) -> dict:
        """The newest `SPOOL-STATUS: {json}` line (after console offset `since`) for which
        pred(status) holds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for m in reversed(list(re.finditer(r"SPOOL-STATUS: (\{.*\})\s*$", self.whole_lines()[since:], re.M))):
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


class Vm(ConsoleWaits):
    """One QEMU boot of the image with its own swtpm process on a shared state folder."""

    def __init__(self, image: Path, work: Path, state_img: Path, tpm_dir: Path, name: str,
                 forwards: tuple[int, ...] = (), cmdline: str = "", state_cache: str | None = None,
                 rtc: str | None = None):
        """`forwards`: guest TCP ports to forward (11112, DICOM, always is) to free 127.0.0.1
        ports (`host_port(guest)`); `cmdline`: appended to CMDLINE; `state_cache`: QEMU's
        cache= mode for the state disk (None: QEMU's default, writeback); `rtc`: the guest's
        real-time clock at power-on as QEMU's `-rtc base=` takes it, UTC, e.g.
        `rtc_base(seconds_ahead)` (None: QEMU's default, the host's UTC time). The image runs
        no time synchronisation, so the guest keeps that clock."""
        self.image, self.work, self.state_img, self.tpm_dir, self.name = image, work, state_img, tpm_dir, name
        self.console = work / f"{name}-console.log"
        self.monitor = work / f"{name}-monitor.sock"
        self.tpm_sock = work / f"{name}-tpm.sock"
        self.ports = {guest: gw.free_port() for guest in dict.fromkeys((11112, *forwards))}
        self.dicom_port = self.ports[11112]
        self.cmdline = f"{CMDLINE} {cmdline}".strip()
        self.state_cache = state_cache
        self.rtc = rtc
        self.swtpm: subprocess.Popen | None = None
        self.qemu: subprocess.Popen | None = None
        self.started = 0.0

    def host_port(self, guest_port: int) -> int:
        """The 127.0.0.1 port that QEMU forwards to `guest_port` in the guest."""
        return self.ports[guest_port]

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
             *(["-rtc", f"base={self.rtc}"] if self.rtc else []),
             "-serial", f"file:{self.console}",
             "-monitor", f"unix:{self.monitor},server=on,wait=off",
             *self.boot_args(),
             "-netdev", "user,id=n0,restrict=off," + ",".join(
                 f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()),
             "-device", "virtio-net-pci,netdev=n0",
             "-chardev", f"socket,id=chrtpm,path={self.tpm_sock}",
             "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"],
            stdin=subprocess.DEVNULL, stdout=open(self.work / f"{self.name}-qemu.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def boot_args(self) -> list[str]:
        """QEMU arguments of the boot: direct kernel boot of rootfs.img, the state disk second."""
        return ["-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", self.cmdline,
                "-drive", f"file={self.image / 'rootfs.img'},if=virtio,format=raw,readonly=on",
                "-drive", f"file={self.state_img},if=virtio,format=raw"
                + (f",cache={self.state_cache}" if self.state_cache else "")]

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

    def kill(self) -> None:
        """A power cut: SIGKILL to QEMU (and its swtpm). What the guest kernel had not yet
        written to the disk images is lost; what it wrote survives (see the cache mode)."""
        self._kill(self.qemu)
        self._kill(self.swtpm)

    def cleanup(self) -> None:
        self.kill()


def rtc_base(seconds_ahead: float) -> str:
    """A `Vm(rtc=...)` value: the host's UTC time now plus `seconds_ahead`, to the second."""
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_ahead)
    return at.strftime("%Y-%m-%dT%H:%M:%S")


def require_tpm_binary(gatewayd_bin: str) -> None:
    """The image's key store is the TPM: the binary must be built with `--features tpm`."""
    ldd = subprocess.run(["ldd", gatewayd_bin], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert "libtss2-esys" in ldd.stdout, (
        f"GATEWAYD={gatewayd_bin} has no TPM back end (no libtss2-esys in ldd): build it with "
        f"`cargo build --release -p gatewayd --features tpm`\n{ldd.stdout}{ldd.stderr}"
    )


def fresh_state(image: Path, dest: Path, files: dict[str, bytes] | None = None) -> Path:
    """A state disk for one test at `dest`: a sparse copy of the image's empty state.img, or,
    with `files` (path relative to the state partition -> bytes), a new ext4 of the same
    size and label holding them (root-owned; StateDirectory= hands the tree to gatewayd)."""
    if not files:
        subprocess.run(["cp", "--sparse=always", str(image / "state.img"), str(dest)], check=True, timeout=120)
        return dest
    size = (image / "state.img").stat().st_size
    with tempfile.TemporaryDirectory(dir=dest.parent) as tree:
        _state_tree(Path(tree), files)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "gw-state", "-m", "0", "-d", tree, str(dest),
                            f"{size // 1024}K"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"mkfs.ext4 -d for the seeded state disk failed: {r.stderr}"
    return dest


def _state_tree(tree: Path, files: dict[str, bytes]) -> None:
    """`files` (path relative to the state partition -> bytes) under `tree`, each 0600."""
    for rel, content in files.items():
        path = tree / rel
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o600)


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




class DnsServer:
    """A real DNS server for the guest: dnsmasq on 127.0.0.1 and a UDP/TCP port picked here,
    answering only the names in `names` (name -> IPv4 address) and nothing else: no upstream
    (--no-resolv), no /etc/hosts (--no-hosts). The guest reaches it at 10.0.2.2:port through
    QEMU's user networking; boot the guest with `Vm(cmdline=dns.cmdline())` so that its
    resolver uses it (image-recipe/files/gatewayd-test-dns.service) instead of QEMU's
    10.0.2.3, which forwards to the host's own resolver. Queries are logged (`log_text()`)."""

    def __init__(self, work: Path, names: dict[str, str]):
        self.dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not Path(self.dnsmasq).is_file():
            pytest.fail("dnsmasq not found: `apt-get install -y --no-install-recommends dnsmasq-base` "
                        "(hw-tests/run-all.sh does this)", pytrace=False)
        self.names = dict(names)
        self.port = gw.free_port()
        self.log = work / "dnsmasq.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DnsServer":
        args = [self.dnsmasq, "--keep-in-foreground", "--log-facility=-", "--log-queries", "--pid-file=",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
                "--no-hosts", "--user=root", "--conf-file=/dev/null"]
        # --local: answered here and only here (an AAAA query gets an empty answer, not REFUSED,
        # which resolved would count against the server).
        args += [f"--local=/{name}/" for name in self.names]
        args += [f"--address=/{name}/{addr}" for name, addr in self.names.items()]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while "started, version" not in self.log_text():
            assert self.proc.poll() is None, f"dnsmasq exited {self.proc.returncode}:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"dnsmasq did not start within 10 s:\n{self.log_text()}"
            time.sleep(0.05)
        return self

    def cmdline(self, resolve: str | None = None) -> str:
        """Kernel command line arguments: the guest resolves through this server (and, with
        `resolve`, the probe prints how the guest resolves that name: `RESOLVE: name addr`)."""
        extra = f" gw.test_resolve={resolve}" if resolve else ""
        return f"systemd.wants=gatewayd-test-dns.service gw.test_dns=10.0.2.2:{self.port}{extra}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        Vm._kill(self.proc)


def read_state(state_img: Path, dest: Path) -> Path:
    """The files of a state disk as the guest would find them at its next boot, read on the
    host without mounting (e.g. after `Vm.kill()`): on a sparse copy of the image, `e2fsck -f
    -p` (what the guest's systemd-fsck runs at boot, `fsck -a`: the ext4 journal replayed, the
    orphan list processed) must end with nothing it could not repair by itself; then `debugfs -R
    "rdump / DEST"` copies every file out (owners are the guest's uids). The copy is deleted;
    `state_img` is not touched. Returns `dest`."""
    if shutil.which("e2fsck") is None:
        pytest.fail("not found on PATH: e2fsck. Install it with `apt-get install -y e2fsprogs`", pytrace=False)
    dest.mkdir(parents=True, exist_ok=False)
    copy = dest.parent / f".{dest.name}-state.img"
    try:
        subprocess.run(["cp", "--sparse=always", str(state_img), str(copy)], check=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        r = subprocess.run(["e2fsck", "-f", "-p", str(copy)], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        # 0: clean; 1: repaired by itself (journal replayed, orphans, free counts); else damage.
        assert r.returncode in (0, 1), (
            f"the state file system of {state_img.name} needs more than an automatic repair "
            f"(e2fsck -f -p exited {r.returncode})\n{r.stdout}{r.stderr}")
        r = subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(copy)], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and (dest / "lost+found").is_dir(), (
            f"debugfs rdump of {state_img.name} failed (exit {r.returncode})\n{r.stdout}{r.stderr}")
    finally:
        copy.unlink(missing_ok=True)
    return dest


# ---- the A/B UEFI disk (image-recipe/build.sh: disk.img, gw-a.efi, gw-b.efi, verity.txt)

# What every UefiVm boot gets as SMBIOS OEM strings (gatewayd-test-hooks in the image turns them
# into the same effect as these words on the kernel command line, which a UKI fixes).
UEFI_HOOKS = ("systemd.journald.forward_to_console=1", "systemd.wants=gatewayd-probe.service")


def require_ovmf() -> None:
    missing = [str(p) for p in (OVMF_CODE, OVMF_VARS) if not p.is_file()]
    if missing:
        pytest.fail(f"OVMF (UEFI firmware for QEMU) not found: {', '.join(missing)}. Install it with "
                    "`apt-get install -y --no-install-recommends ovmf` (hw-tests/run-all.sh does this)",
                    pytrace=False)


def new_box(image: Path, dest: Path) -> tuple[Path, Path]:
    """A factory-fresh box in the folder `dest`: a sparse copy of the image's disk.img and a copy of
    OVMF's empty variable store (the box's NVRAM: boot entries, BootOrder, BootNext). Returns
    (disk, vars)."""
    require_ovmf()
    dest.mkdir(parents=True, exist_ok=True)
    disk, vars_fd = dest / "disk.img", dest / "vars.fd"
    subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True, timeout=300,
                   stdin=subprocess.DEVNULL)
    shutil.copyfile(OVMF_VARS, vars_fd)
    return disk, vars_fd


class UefiVm(Vm):
    """One power-on of a box booted by OVMF from its A/B disk: OVMF_CODE read-only and the box's
    own variable store (`vars_fd`, kept across power-ons like a board's NVRAM), the one `disk`
    (virtio), swtpm on `tpm_dir` as in `Vm`. No `bootindex`/`-boot`: the firmware boots what its
    BootOrder/BootNext say (on a factory disk with empty NVRAM: the fallback EFI/BOOT/BOOTX64.EFI).
    `hooks`: extra test hook words (e.g. `DnsServer.cmdline().split()`), passed with UEFI_HOOKS as
    SMBIOS OEM strings. A reboot ends QEMU as in `Vm` (`UefiBox` powers the box on again).
    `kill()` is a power cut."""

    def __init__(self, image: Path, work: Path, disk: Path, vars_fd: Path, tpm_dir: Path, name: str,
                 forwards: tuple[int, ...] = (), hooks: tuple[str, ...] | list[str] = (),
                 rtc: str | None = None):
        super().__init__(image, work, disk, tpm_dir, name, forwards=forwards, rtc=rtc)
        self.disk, self.vars_fd = disk, vars_fd
        self.hooks = [*UEFI_HOOKS, *hooks]
        for word in self.hooks:
            assert word and "," not in word and " " not in word, f"an SMBIOS hook is one word without commas: {word!r}"

    def boot_args(self) -> list[str]:
        args = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.vars_fd}",
                "-drive", f"file={self.disk},if=virtio,format=raw",
                # The box's hardware watchdog (systemd's RuntimeWatchdogSec): a hung guest resets.
                "-device", "i6300esb"]
        for word in self.hooks:
            args += ["-smbios", f"type=11,value={word}"]
        return args

    def boots(self) -> list[tuple[str, str]]:
        """The UEFI boot entries the firmware started during this power-on, in order:
        [(Boot####, description)] from OVMF's `BdsDxe: starting Boot0003 "system0" ...` lines."""
        return re.findall(r'BdsDxe: starting (Boot[0-9A-F]{4}) "([^"]*)"', self.console_text())

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to end by itself (a reboot or power-off with `reboot=False`)."""
        assert self.qemu is not None
        try:
            rc = self.qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU did not end within {timeout} s\n{self.tail()}") from None
        if self.swtpm is not None:
            try:
                self.swtpm.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill(self.swtpm)
        return rc


def seed_box_state(disk: Path, files: dict[str, bytes]) -> None:
    """A new ext4 (label gw-state) in the gw-state partition of a box's `disk`, holding `files`
    (path relative to the state partition -> bytes, root-owned 0600, as `fresh_state`), e.g. the
    effective config and the factory fleet credentials. Written in place: mkfs.ext4 -E offset."""
    start, size = partitions(disk)["gw-state"]
    with tempfile.TemporaryDirectory(dir=disk.parent) as tree:
        _state_tree(Path(tree), files)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "gw-state", "-m", "0", "-E", f"offset={start}", "-d", tree,
                            str(disk), f"{size // 1024}K"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"mkfs.ext4 -d into gw-state of {disk} failed: {r.stderr}"


class UefiBox(ConsoleWaits):
    """One box on the A/B disk across its power-ons, for flows that reboot by themselves (an
    update's reboot into the new slot, a failed health check's reboot back): a guest reboot
    ends its QEMU (`-no-reboot`) and a new `UefiVm` starts at once on the same disk, NVRAM
    (`vars_fd`) and TPM state, a cold start. Not a warm reset inside QEMU: OVMF under TCG can
    hang in the firmware after one (seen here: a tight loop before its boot manager, the
    guest's last words `reboot: machine restart`); a cold start never did.

    Its console is its power-ons' consoles one after another (offsets from `mark()` stay
    valid); `dicom_port` and `started` are the current power-on's. `kill()` is a power cut: no
    power-on follows until `power_on()`. Every UefiVm goes into `vms` (the fixture's teardown)."""

    def __init__(self, image: Path, work: Path, disk: Path, vars_fd: Path, tpm_dir: Path, vms: list,
                 hooks: tuple[str, ...] | list[str] = ()):
        self.image, self.work, self.disk, self.vars_fd, self.tpm_dir = image, work, disk, vars_fd, tpm_dir
        self.vms, self.hooks = vms, list(hooks)
        self.runs: list[UefiVm] = []
        self._lock = threading.Lock()
        self._cut = True
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="uefibox", daemon=True)

    @property
    def vm(self) -> UefiVm:
        assert self.runs, "the box was never powered on"
        return self.runs[-1]

    @property
    def dicom_port(self) -> int:
        return self.vm.dicom_port

    @property
    def started(self) -> float:
        return self.vm.started

    def power_on(self, name: str) -> "UefiBox":
        with self._lock:
            self._start(name)
            self._cut = False
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def _start(self, name: str) -> None:
        if self.runs:
            # The last power-on's swtpm ends with its QEMU (--terminate); its lock on the
            # state folder must be gone before the next one starts.
            last = self.runs[-1]
            if last.swtpm is not None:
                try:
                    last.swtpm.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    Vm._kill(last.swtpm)
        vm = UefiVm(self.image, self.work, self.disk, self.vars_fd, self.tpm_dir, f"{len(self.runs) + 1}-{name}",
                    hooks=self.hooks)
        self.vms.append(vm)
        self.runs.append(vm)
        vm.start()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self._cut or self._error is not None or not self.runs:
                    continue
                qemu = self.runs[-1].qemu
                if qemu is None or qemu.poll() is None:
                    continue
                if qemu.returncode != 0:
                    self._error = AssertionError(f"qemu exited with {qemu.returncode}, not a reboot")
                    continue
                try:
                    self._start("reboot")
                except BaseException as e:  # noqa: BLE001 - surfaced by alive()
                    self._error = e

    def kill(self) -> None:
        """A power cut (SIGKILL of QEMU and its swtpm); nothing starts again by itself."""
        with self._lock:
            self._cut = True
            if self.runs:
                self.vm.kill()

    def stop(self) -> None:
        self._stop.set()
        self.kill()

    def console_text(self) -> str:
        return "".join(vm.console_text() for vm in self.runs)

    def alive(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the box could not be powered on again after a reboot: {self._error!r}\n{self.tail()}")
        if self._cut:
            raise AssertionError(f"the box is powered off\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return self.vm.tail(n) if self.runs else "(never powered on)"


def partitions(disk: Path) -> dict[str, tuple[int, int]]:
    """PARTLABEL -> (start, size) in bytes of the GPT partitions of a disk image (sfdisk -J)."""
    r = subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"sfdisk -J {disk} failed: {r.stderr}"
    table = json.loads(r.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return {p["name"]: (p["start"] * sector, p["size"] * sector) for p in table["partitions"] if "name" in p}


def sha256_range(path: Path, start: int, size: int) -> str:
    """sha256 of `size` bytes of `path` from byte `start` (e.g. a partition of a disk image)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, f"{path} ends before byte {start + size}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def flip_byte(path: Path, offset: int) -> tuple[int, int]:
    """Inverts the byte at `offset` of `path` in place (a bit rot / tampering stand-in).
    Returns (old, new)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        assert len(old) == 1, f"{path} has no byte {offset}"
        new = bytes([old[0] ^ 0xFF])
        f.seek(offset)
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    return old[0], new[0]


def extract_partition(disk: Path, name: str, dest: Path) -> Path:
    """A sparse copy of the partition `name` of `disk` at `dest` (e.g. gw-state for `read_state`)."""
    start, size = partitions(disk)[name]
    mib = 1 << 20
    assert start % mib == 0 and size % mib == 0, f"{name} is not MiB-aligned: {start} {size}"
    subprocess.run(["dd", f"if={disk}", f"of={dest}", "bs=1M", f"skip={start // mib}", f"count={size // mib}",
                    "conv=sparse", "status=none"], check=True, timeout=300, stdin=subprocess.DEVNULL)
    return dest


def verity_info(image: Path) -> dict[str, str]:
    """OUTDIR/verity.txt of the image (ROOTHASH=..., ...) with lowercase keys: roothash, salt,
    data_blocks, hash_offset, canary_block."""
    info = {}
    for line in (image / "verity.txt").read_text().splitlines():
        key, _, value = line.partition("=")
        if key:
            info[key.lower()] = value
    return info
