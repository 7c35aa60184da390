"""Signed update bundles with the real RAUC 1.8 on the host (no QEMU).

image-recipe/bundle.sh makes the bundles from a small fake image folder (a few-MiB ext4 with
its dm-verity tree appended by `veritysetup format`, a small FAT image made with
`mkfs.fat -C` + `mcopy`, and the `verity.txt` the image build writes), signed by a test vendor
update CA made here with openssl. Then:

- `rauc info` against the update CA (the image's system.conf: codesign purpose, verity only)
  accepts the good bundle and shows its version and images; a bundle re-signed by another
  CA (`rauc resign`) and bundles with one flipped byte are refused;
- `rauc install` through `rauc service` on a private D-Bus bus, with a test system.conf
  derived from image-recipe/rauc/system.conf (slots are files, or loop devices over them as
  block devices like the box's partitions, `bootloader=custom` with a
  backend script that records every call): the good bundle is written to the inactive slots,
  read back by the bundle's hook, and the target is marked primary last; the pre-install
  handler (image-recipe/rauc/rauc-pre-install, exec'ing a recording stand-in for gatewayd)
  refusing stops the install before any slot changes; a write that does not stick (an
  LD_PRELOAD shim flips one bit of one write(2) RAUC makes to the slot) is caught by the
  read-back and the target is never marked primary;
- the D-Bus policy override lets root and the service user call RAUC, and nobody else.

This host's kernel has no device-mapper (no /dev/mapper/control), so RAUC cannot mount a
verity bundle here (RAUC 1.8 src/dm.c `r_dm_setup`: "Failed to open /dev/mapper/control");
the install tests use `plain` bundles (GW_BUNDLE_FORMAT=plain: same content, detached
signature over the whole file). The verity install path is the QEMU tests'.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import secrets
import select
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import pki

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "image-recipe"
RAUC_DIR = RECIPE / "rauc"
BUNDLE_SH = RECIPE / "bundle.sh"
SYSTEM_CONF = RAUC_DIR / "system.conf"
POLICY = RAUC_DIR / "de.pengutronix.rauc.conf"
PRE_INSTALL = RAUC_DIR / "rauc-pre-install"
HOOK = RAUC_DIR / "bundle-hook.sh"
INSTALL_INTO_ROOT = RAUC_DIR / "install-into-root.sh"

VERSION = 7
MIN_VERSION = 5
CMD_TIMEOUT_S = 120.0
# bundle.sh squashes and hashes a whole root file system (~400 MiB): about a minute alone,
# several when the appliance lanes and the cargo checks share the machine's two cores.
BUNDLE_TIMEOUT_S = 900
SERVICE_START_S = 15.0

# tool -> Debian package
TOOLS = {
    "rauc": "rauc",
    "mksquashfs": "squashfs-tools",
    "veritysetup": "cryptsetup-bin",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "dbus-daemon": "dbus-daemon",
    "setpriv": "util-linux",
    "cc": "gcc",
}

# Debian's rauc-service policy (/usr/share/dbus-1/system.d/de.pengutronix.rauc.conf, RAUC
# v1.8 data/de.pengutronix.rauc.conf): anyone may call RAUC. Ours must override it.
UPSTREAM_POLICY = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow send_destination="de.pengutronix.rauc"/>
  </policy>
  <policy user="root">
    <allow own="de.pengutronix.rauc"/>
  </policy>
</busconfig>
"""

# A write that does not stick: flips one bit in the middle of the first write(2) the `rauc`
# process makes to the file named by GW_LOSSY_SLOT (what a failing disk or a bad driver
# does), and leaves every other write alone.
LOSSY_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int done;
ssize_t write(int fd, const void *buf, size_t n) {
    static ssize_t (*real_write)(int, const void *, size_t);
    if (!real_write) real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    const char *target = getenv("GW_LOSSY_SLOT");
    if (!done && target && n > 0 && strcmp(program_invocation_short_name, "rauc") == 0) {
        char link[64], path[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t l = readlink(link, path, sizeof path - 1);
        if (l > 0) {
            path[l] = 0;
            if (strcmp(path, target) == 0) {
                char *copy = malloc(n);
                if (!copy) { errno = ENOMEM; return -1; }
                memcpy(copy, buf, n);
                copy[n / 2] ^= 0x01;
                done = 1;
                ssize_t r = real_write(fd, copy, n);
                free(copy);
                fprintf(stderr, "lossy-write: flipped one bit of a %zu-byte write to %s\n", n, path);
                return r;
            }
        }
    }
    return real_write(fd, buf, n);
}
"""


def _require_tools() -> None:
    missing = [f"{t} ({pkg})" for t, pkg in TOOLS.items() if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({TOOLS[m.split(" ")[0]] for m in missing}))
        pytest.fail(
            f"tools not found on PATH: {', '.join(missing)}. Install them with "
            f"`apt-get install -y --no-install-recommends {pkgs}`",
            pytrace=False,
        )


def run(args: list[str | Path], check: bool = True, env: dict | None = None,
        timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    if check:
        assert r.returncode == 0, (
            f"`{' '.join(str(a) for a in args)}` exited {r.returncode}\n"
            f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
        )
    return r


def sha256(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# The test vendor PKI, the fake image folder and the bundles


def codesign_cert(ca: pki.CA, name: str) -> pki.KeyPair:
    """A bundle signing key and certificate (extendedKeyUsage codeSigning) issued by ``ca``."""
    key = ca.dir / f"{name}.key"
    csr = ca.dir / f"{name}.csr"
    cert = ca.dir / f"{name}.pem"
    pki.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    key.chmod(0o600)
    pki.openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=hw-tests/CN={name}")
    ext = ca.dir / f"{name}.ext"
    ext.write_text("[v3]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                   "extendedKeyUsage = codeSigning\nsubjectKeyIdentifier = hash\n"
                   "authorityKeyIdentifier = keyid\n")
    pki.openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
                "-set_serial", str(secrets.randbelow(1 << 62) + 2), "-days", "365", "-sha256",
                "-extfile", str(ext), "-extensions", "v3", "-out", str(cert))
    return pki.KeyPair(key, cert)


def make_image_dir(d: Path) -> dict:
    """rootfs.img (4 MiB ext4 + verity tree), efi.vfat (2 MiB FAT with a fake UKI) and
    verity.txt, as the image build writes them. Returns the verity values."""
    d.mkdir(parents=True)
    tree = d.parent / "root-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/os-release").write_text(f"ID=debian\nIMAGE_VERSION={VERSION}\n")
    (tree / "etc/canary").write_bytes(secrets.token_bytes(600_000))
    rootfs = d / "rootfs.img"
    run(["mkfs.ext4", "-q", "-b", "4096", "-O", "^has_journal", "-L", "gw-root", "-d", tree, rootfs, "4M"])
    size = rootfs.stat().st_size
    assert size % 4096 == 0
    fmt = run(["veritysetup", "format", f"--hash-offset={size}", f"--data-blocks={size // 4096}",
               rootfs, rootfs]).stdout
    roothash = re.search(r"^Root hash:\s+([0-9a-f]{64})$", fmt, re.M)
    salt = re.search(r"^Salt:\s+([0-9a-f]+)$", fmt, re.M)
    assert roothash and salt, fmt
    verity = {"roothash": roothash.group(1), "salt": salt.group(1),
              "data_blocks": size // 4096, "hash_offset": size}
    (d / "verity.txt").write_text(
        f"ROOTHASH={verity['roothash']}\nSALT={verity['salt']}\n"
        f"DATA_BLOCKS={verity['data_blocks']}\nDATA_BLOCK_SIZE=4096\nHASH_OFFSET={verity['hash_offset']}\n"
        "CANARY_BLOCK=42\n")
    efi = d / "efi.vfat"
    run(["mkfs.fat", "-C", efi, "2048"])
    uki = d.parent / "gw-a.efi"
    uki.write_bytes(b"MZ" + secrets.token_bytes(300_000))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", efi, "::/EFI", "::/EFI/Linux"], env=env)
    run(["mcopy", "-i", efi, uki, "::/EFI/Linux/gw-a.efi"], env=env)
    return verity


def bundle_sh(image_dir: Path, version: int, min_version: int, signer: pki.KeyPair, out: Path,
              fmt: str = "verity", check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GW_BUNDLE_FORMAT": fmt}
    return run(["bash", BUNDLE_SH, image_dir, str(version), str(min_version), signer.key, signer.cert, out],
               env=env, check=check, timeout=BUNDLE_TIMEOUT_S)


@dataclass
class Kit:
    dir: Path
    ca: pki.CA
    signer: pki.KeyPair
    other_ca: pki.CA
    other_signer: pki.KeyPair
    image_dir: Path
    verity: dict
    bundle: Path  # verity, VERSION/MIN_VERSION
    plain: Path  # plain, same content
    info_conf: Path  # the image's system.conf with the test keyring


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    _require_tools()
    d = tmp_path_factory.mktemp("update-bundle")
    ca = pki.CA(d / "update-ca", name="hw-tests update CA", days=365)
    signer = codesign_cert(ca, "update-signer")
    other_ca = pki.CA(d / "other-ca", name="hw-tests other CA", days=365)
    other_signer = codesign_cert(other_ca, "other-signer")
    image_dir = d / "image"
    verity = make_image_dir(image_dir)
    t0 = time.monotonic()
    bundle = d / "gw-7.raucb"
    bundle_sh(image_dir, VERSION, MIN_VERSION, signer, bundle)
    print(f"bundle.sh (verity, {bundle.stat().st_size} bytes): {time.monotonic() - t0:.1f} s")
    plain = d / "gw-7-plain.raucb"
    bundle_sh(image_dir, VERSION, MIN_VERSION, signer, plain, fmt="plain")
    info_conf = d / "info-system.conf"
    info_conf.write_text(_replace_once(SYSTEM_CONF.read_text(), {
        "path=/etc/rauc/update-ca.pem": f"path={ca.cert}",
        "data-directory=/var/lib/gatewayd/rauc": f"data-directory={d / 'info-data'}",
    }))
    return Kit(d, ca, signer, other_ca, other_signer, image_dir, verity, bundle, plain, info_conf)


def _replace_once(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert text.count(old) == 1, f"expected exactly one `{old}` in {SYSTEM_CONF}"
        text = text.replace(old, new)
    return text


def rauc_info(conf: Path, bundle: Path, keyring: Path | None = None) -> subprocess.CompletedProcess:
    args: list[str | Path] = ["rauc", f"--conf={conf}"]
    if keyring is not None:
        args.append(f"--keyring={keyring}")
    return run([*args, "info", "--output-format=json", bundle], check=False)


def flipped(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------
# rauc info: signature and contents


def test_bundle_sh_makes_a_verity_bundle_that_rauc_info_verifies_with_the_contract_inside(kit: Kit):
    r = rauc_info(kit.info_conf, kit.bundle)
    assert r.returncode == 0, f"rauc info refused the good bundle:\n{r.stderr[-3000:]}"
    assert "Verified inline signature by 'O = hw-tests, CN = update-signer'" in r.stderr, r.stderr
    info = json.loads(r.stdout)
    assert info["compatible"] == "clinic-gateway-x86_64"
    assert info["version"] == str(VERSION)
    images = {cls: img for entry in info["images"] for cls, img in entry.items()}
    assert set(images) == {"rootfs", "efi"}, images
    assert images["rootfs"]["filename"] == "root.ext4"
    assert images["rootfs"]["checksum"] == sha256(kit.image_dir / "rootfs.img")
    assert images["rootfs"]["size"] == (kit.image_dir / "rootfs.img").stat().st_size
    assert images["efi"]["filename"] == "efi.vfat"
    assert images["efi"]["checksum"] == sha256(kit.image_dir / "efi.vfat")
    for img in images.values():
        assert img["hooks"] == ["post-install"], img

    # The payload: gateway-update.json and the hook, as signed (rauc extract checks the
    # payload against the signed verity root hash in user space before unpacking).
    out = kit.dir / "extracted"
    run(["rauc", f"--conf={kit.info_conf}", "extract", kit.bundle, out])
    meta = json.loads((out / "gateway-update.json").read_text())
    assert meta == {"version": VERSION, "min_version": MIN_VERSION, "data_format": 1,
                    "roothash": kit.verity["roothash"], "data_blocks": kit.verity["data_blocks"],
                    "hash_offset": kit.verity["hash_offset"]}, meta
    assert (out / "hook.sh").read_bytes() == HOOK.read_bytes()
    assert os.access(out / "hook.sh", os.X_OK)
    manifest = (out / "manifest.raucm").read_text()
    assert "format=verity" in manifest and "[hooks]\nfilename=hook.sh" in manifest, manifest
    # rauc-pre-install takes RAUC_MF_VERSION from here (RAUC 1.8 does not pass it to handlers).
    assert f"[update]\ncompatible=clinic-gateway-x86_64\nversion={VERSION}\n" in manifest, manifest
    assert sha256(out / "root.ext4") == sha256(kit.image_dir / "rootfs.img")
    shutil.rmtree(out)

    # The image's system.conf takes verity bundles only.
    r = rauc_info(kit.info_conf, kit.plain)
    assert r.returncode != 0, "the image's system.conf accepted a plain bundle (bundle-formats=verity)"
    assert "Bundle format 'plain' not allowed" in r.stderr, r.stderr


def test_rauc_info_refuses_a_bundle_resigned_by_another_ca(kit: Kit):
    resigned = kit.dir / "resigned.raucb"
    resigned.unlink(missing_ok=True)
    run(["rauc", f"--conf={kit.info_conf}", "resign", f"--cert={kit.other_signer.cert}",
         f"--key={kit.other_signer.key}", f"--keyring={kit.ca.cert}", f"--signing-keyring={kit.other_ca.cert}",
         kit.bundle, resigned])
    r = rauc_info(kit.info_conf, resigned)
    assert r.returncode != 0, f"rauc info accepted a bundle signed by another CA:\n{r.stdout}"
    assert "signature verification failed" in r.stderr, r.stderr
    # The re-signed bundle is otherwise sound: the other CA's keyring accepts it.
    r = rauc_info(kit.info_conf, resigned, keyring=kit.other_ca.cert)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["version"] == str(VERSION)
    # Keyring rotation (README): a transition keyring holding both CAs, one PEM after the
    # other, accepts bundles under either.
    both = kit.dir / "transition-keyring.pem"
    both.write_text(kit.ca.cert.read_text() + kit.other_ca.cert.read_text())
    for bundle in (kit.bundle, resigned):
        r = rauc_info(kit.info_conf, bundle, keyring=both)
        assert r.returncode == 0, f"the transition keyring refused {bundle.name}:\n{r.stderr[-3000:]}"


def test_a_bundle_with_one_flipped_byte_is_refused(kit: Kit):
    size = kit.bundle.stat().st_size
    (sig_size,) = struct.unpack(">Q", kit.bundle.read_bytes()[-8:])
    assert 0 < sig_size < size, sig_size

    # In the signed manifest inside the CMS: one bit turns `version=7` into `version=6`.
    data = kit.bundle.read_bytes()
    at = data.rfind(f"version={VERSION}\n".encode())
    assert at > size - 8 - sig_size, "the manifest is not inside the bundle's signature"
    at += len("version=")
    bad = flipped(kit.bundle, kit.dir / "flip-manifest.raucb", at)
    assert bad.read_bytes()[at:at + 1] == str(VERSION - 1).encode()
    r = rauc_info(kit.info_conf, bad)
    assert r.returncode != 0, "rauc info accepted a bundle whose signed manifest was changed"
    assert "signature verification failed" in r.stderr, r.stderr

    # In the signature's own bytes (here: the signer certificate's middle).
    bad = flipped(kit.bundle, kit.dir / "flip-signature.raucb", size - 8 - sig_size // 2)
    r = rauc_info(kit.info_conf, bad)
    assert r.returncode != 0, "rauc info accepted a bundle with a flipped byte in its signature"
    assert ("signature verification failed" in r.stderr or "Signature data is no valid CMS" in r.stderr), r.stderr

    # In the payload (the squashfs with the images). A verity bundle's payload is checked
    # block by block against the signed root hash: by dm-verity while installing on the box,
    # in user space by `rauc extract` (`rauc info` reads the signature only).
    bad = flipped(kit.bundle, kit.dir / "flip-payload.raucb", 4096 * 3 + 100)
    out = kit.dir / "extract-bad"
    r = run(["rauc", f"--conf={kit.info_conf}", "extract", bad, out], check=False)
    assert r.returncode != 0, "rauc extract accepted a bundle with a flipped payload byte"
    assert "bundle payload is corrupted" in r.stderr, r.stderr
    assert not (out / "root.ext4").exists()

    # A plain bundle's signature covers the whole file: rauc info refuses it.
    bad = flipped(kit.plain, kit.dir / "flip-plain.raucb", 4096 * 3 + 100)
    plain_conf = kit.dir / "info-plain.conf"
    plain_conf.write_text(kit.info_conf.read_text().replace("bundle-formats=verity", "bundle-formats=plain verity"))
    assert plain_conf.read_text() != kit.info_conf.read_text()
    r = rauc_info(plain_conf, kit.plain)
    assert r.returncode == 0, r.stderr[-3000:]
    r = rauc_info(plain_conf, bad)
    assert r.returncode != 0, "rauc info accepted a plain bundle with a flipped payload byte"
    assert "signature verification failed" in r.stderr, r.stderr


def test_rauc_info_works_for_the_unprivileged_service_user_and_leaves_the_data_directory_to_root(kit: Kit):
    """gatewayd runs `rauc info` as its own user (not root): with the image's system.conf and
    RAUC's data directory made 0700 root at boot (tmpfiles.d), the check works and the
    directory stays root's. `daemon` stands in for the user gatewayd."""
    pw = pwd.getpwnam("daemon")
    # pytest's folders are 0700 root: a world-readable copy in its own temporary folder.
    d = Path(tempfile.mkdtemp(prefix="gw-rauc-info-"))
    try:
        d.chmod(0o755)
        for src in (kit.bundle, kit.ca.cert):
            shutil.copy(src, d / src.name)
            (d / src.name).chmod(0o644)
        data = d / "rauc-data"
        data.mkdir(mode=0o700)
        conf = d / "system.conf"
        conf.write_text(_replace_once(SYSTEM_CONF.read_text(), {
            "path=/etc/rauc/update-ca.pem": f"path={d / kit.ca.cert.name}",
            "data-directory=/var/lib/gatewayd/rauc": f"data-directory={data}",
        }))
        conf.chmod(0o644)
        r = run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                 "rauc", f"--conf={conf}", "info", "--output-format=json", d / kit.bundle.name], check=False)
        assert r.returncode == 0, f"rauc info as an unprivileged user failed:\n{r.stderr[-3000:]}"
        assert json.loads(r.stdout)["version"] == str(VERSION)
        st = data.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700), "RAUC's data directory changed owner or mode"
        assert not list(data.iterdir()), "an unprivileged rauc info wrote into RAUC's data directory"
    finally:
        shutil.rmtree(d)


def test_bundle_sh_refuses_bad_input_before_signing(kit: Kit):
    out = kit.dir / "refused.raucb"

    def refused(args_dir: Path, version: str, min_version: str, expect: str) -> None:
        r = run(["bash", BUNDLE_SH, args_dir, version, min_version, kit.signer.key, kit.signer.cert, out],
                check=False)
        assert r.returncode != 0, f"bundle.sh accepted {version}/{min_version} from {args_dir}"
        assert expect in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists(), "bundle.sh left a bundle behind after refusing"
        assert not list(kit.dir.glob(".bundle.*")), "bundle.sh left its work folder behind"

    # A signer certificate without extendedKeyUsage codeSigning (the box would refuse it).
    client = kit.ca.other_client_cert("not-a-code-signer", name="client-only")
    r = run(["bash", BUNDLE_SH, kit.image_dir, "7", "5", client.key, client.cert, out], check=False)
    assert r.returncode != 0 and "has no extendedKeyUsage codeSigning" in r.stderr, r.stderr
    assert not out.exists()

    refused(kit.image_dir, "7", "8", "MIN_VERSION (8) is above VERSION (7)")
    refused(kit.image_dir, "7a", "1", "VERSION must be a non-negative integer")
    refused(kit.image_dir, "7", "-1", "MIN_VERSION must be a non-negative integer")

    # verity.txt that does not match rootfs.img: refused before anything is signed.
    wrong = kit.dir / "image-wrong-hash"
    shutil.copytree(kit.image_dir, wrong)
    text = (wrong / "verity.txt").read_text()
    other = "0" * 64 if kit.verity["roothash"] != "0" * 64 else "1" * 64
    (wrong / "verity.txt").write_text(text.replace(kit.verity["roothash"], other))
    refused(wrong, "7", "5", "does not verify against the ROOTHASH in verity.txt")
    (wrong / "verity.txt").write_text(text.replace("ROOTHASH=", "ROOTHASH=zz"))
    refused(wrong, "7", "5", "ROOTHASH must be 64 lowercase hex digits")
    (wrong / "verity.txt").write_text(text + "DATA_BLOCK_SIZE=1024\n")
    refused(wrong, "7", "5", "DATA_BLOCK_SIZE must be 4096")
    (wrong / "verity.txt").write_text(text)
    (wrong / "efi.vfat").unlink()
    refused(wrong, "7", "5", "no efi.vfat in")
    shutil.rmtree(wrong)


# --------------------------------------------------------------------------
# rauc install through rauc service on a private bus, slots in files


class Bus:
    """A private dbus-daemon of type system on an abstract socket, with the usual system bus
    default policy and the given policy files included in order (like /usr/share/dbus-1 then
    /etc/dbus-1 on the box)."""

    def __init__(self, d: Path, policies: list[Path]):
        d.mkdir(parents=True, exist_ok=True)
        name = f"gw-test-rauc-{os.getpid()}-{secrets.token_hex(6)}"
        includes = "\n".join(f"  <include>{p}</include>" for p in policies)
        self.config = d / "bus.conf"
        self.config.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:abstract=/{name}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
{includes}
</busconfig>
""")
        self.log = open(d / "dbus-daemon.log", "w")
        self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address=1"],
                                     stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVICE_START_S)
        self.address = self.proc.stdout.readline().strip() if ready else ""
        if not self.address.startswith("unix:abstract="):
            self.stop()
            pytest.fail(f"dbus-daemon did not print its address within {SERVICE_START_S} s "
                        f"(exit {self.proc.poll()}): {(d / 'dbus-daemon.log').read_text()}", pytrace=False)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return env

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@dataclass
class Slots:
    dir: Path

    NAMES = {"root-a": 8 << 20, "root-b": 8 << 20, "efi-a": 4 << 20, "efi-b": 4 << 20}

    def make(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, size in self.NAMES.items():
            (self.dir / name).write_bytes(secrets.token_bytes(size))

    def path(self, name: str) -> Path:
        return self.dir / name

    def hashes(self) -> dict[str, str]:
        return {name: sha256(self.dir / name) for name in self.NAMES}


class RaucService:
    """`rauc service` (root) with a test system.conf derived from the image's: slots are the
    files in ``slots``, `bootloader=custom` with a backend that appends each call to
    ``calls.log``, the real pre-install wrapper exec'ing a stand-in for gatewayd that records
    its arguments, environment and the bundle's gateway-update.json (and exits with the code in
    ``gatewayd-exit``), bundle formats plain (no device-mapper on this host)."""

    def __init__(self, d: Path, kit: Kit, bus: Bus, loop: bool = False, lossy: tuple[Path, str] | None = None):
        self.dir = d
        self.bus = bus
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.loops: list[str] = []
        self.mnt = d / "mnt"
        try:
            self._start(kit, loop, lossy)
        except BaseException:
            self.stop()
            raise

    def _start(self, kit: Kit, loop: bool, lossy: tuple[Path, str] | None) -> None:
        d = self.dir
        bus = self.bus
        self.slots = Slots(d / "slots")
        self.slots.make()
        # The slots as the box has them (block devices) or as plain files.
        self.devices = {name: str(self.slots.path(name)) for name in Slots.NAMES}
        if loop:
            for name in Slots.NAMES:
                dev = run(["losetup", "--find", "--show", self.slots.path(name)]).stdout.strip()
                assert dev.startswith("/dev/loop"), dev
                self.loops.append(dev)
                self.devices[name] = dev
        self.calls = d / "calls.log"
        self.calls.write_text("")
        self.mnt.mkdir()
        backend = d / "backend.sh"
        backend.write_text(f"""#!/bin/sh
echo "backend $*" >>'{self.calls}'
case "$1" in
    get-primary) echo system0 ;;
    get-state) echo good ;;
esac
""")
        backend.chmod(0o755)
        self.gw_exit = d / "gatewayd-exit"
        self.gw_exit.write_text("0\n")
        self.gw_record = d / "gatewayd-record"
        fake = d / "fake-gatewayd"
        fake.write_text(f"""#!/bin/sh
echo "gatewayd $*" >>'{self.calls}'
mkdir -p '{self.gw_record}'
printf '%s\\n' "$@" >'{self.gw_record}/args'
env | grep '^RAUC_' | sort >'{self.gw_record}/env'
cp "$RAUC_BUNDLE_MOUNT_POINT/gateway-update.json" '{self.gw_record}/gateway-update.json'
rc=$(cat '{self.gw_exit}')
[ "$rc" = 0 ] || echo "update refused: downgrade (stand-in)" >&2
exit "$rc"
""")
        fake.chmod(0o755)
        self.gatewayd_config = d / "gatewayd.toml"
        text = _replace_once(SYSTEM_CONF.read_text(), {
            "bootloader=efi": "bootloader=custom",
            "bundle-formats=verity": "bundle-formats=plain",
            "data-directory=/var/lib/gatewayd/rauc": f"data-directory={d / 'rauc-data'}",
            "mountprefix=/run/rauc": f"mountprefix={self.mnt}",
            "path=/etc/rauc/update-ca.pem": f"path={kit.ca.cert}",
            "pre-install=/usr/libexec/gatewayd/rauc-pre-install":
                f"pre-install={PRE_INSTALL}\nbootloader-custom-backend={backend}",
            "device=/dev/disk/by-partlabel/gw-root-a": f"device={self.devices['root-a']}",
            "device=/dev/disk/by-partlabel/gw-root-b": f"device={self.devices['root-b']}",
            "device=/dev/disk/by-partlabel/gw-efi-a": f"device={self.devices['efi-a']}",
            "device=/dev/disk/by-partlabel/gw-efi-b": f"device={self.devices['efi-b']}",
        })
        self.conf = d / "system.conf"
        self.conf.write_text(text)
        env = bus.env()
        env.update(GATEWAYD=str(fake), GATEWAYD_CONFIG=str(self.gatewayd_config))
        if lossy is not None:
            shim, slot = lossy
            env.update(LD_PRELOAD=str(shim), GW_LOSSY_SLOT=self.devices[slot])
        self.log_path = d / "rauc-service.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["rauc", f"--conf={self.conf}", f"--mount={self.mnt}", "--override-boot-slot=system0", "service"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + SERVICE_START_S
        while True:
            r = self.client(["status", "--output-format=json"])
            if r.returncode == 0:
                break
            assert self.proc.poll() is None, f"rauc service exited {self.proc.returncode}:\n{self.service_log()}"
            assert time.monotonic() < deadline, (
                f"rauc service not answering on the bus after {SERVICE_START_S} s:\n{r.stderr}\n{self.service_log()}")
            time.sleep(0.2)
        # Only what `rauc install` does counts: drop the status calls made while waiting.
        self.calls.write_text("")

    def client(self, args: list[str | Path], user: str | None = None) -> subprocess.CompletedProcess:
        prefix: list[str | Path] = []
        if user is not None:
            pw = pwd.getpwnam(user)
            prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        return run([*prefix, "rauc", *args], check=False, env=self.bus.env())

    def install(self, bundle: Path) -> subprocess.CompletedProcess:
        return self.client(["install", bundle])

    def service_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-6000:]

    def call_lines(self) -> list[str]:
        return [line for line in self.calls.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.close()
        # A bundle left mounted by a failed run must not outlive the test.
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1] for line in f if line.split()[1].startswith(str(self.mnt))]
        for m in sorted(mounted, reverse=True):
            subprocess.run(["umount", m], capture_output=True, timeout=30)
        for dev in self.loops:
            subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)
        self.loops = []


@pytest.fixture
def service(tmp_path, kit):
    made: list[tuple[RaucService, Bus]] = []

    def start(loop: bool = False, lossy: tuple[Path, str] | None = None) -> RaucService:
        bus = Bus(tmp_path / f"bus{len(made)}", [tmp_path / "upstream-policy.conf"])
        svc = None
        try:
            svc = RaucService(tmp_path / f"svc{len(made)}", kit, bus, loop=loop, lossy=lossy)
        finally:
            made.append((svc, bus))  # type: ignore[arg-type]
        return svc

    (tmp_path / "upstream-policy.conf").write_text(UPSTREAM_POLICY)
    yield start
    for svc, bus in made:
        if svc is not None:
            svc.stop()
        bus.stop()


@pytest.mark.parametrize("loop", [False, True], ids=["slot-files", "slot-loop-devices"])
def test_install_writes_the_inactive_slots_reads_them_back_and_marks_the_target_primary_last(service, kit: Kit, loop):
    svc = service(loop=loop)
    before = svc.slots.hashes()
    t0 = time.monotonic()
    r = svc.install(kit.plain)
    took = time.monotonic() - t0
    assert r.returncode == 0, f"rauc install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{svc.service_log()}"
    print(f"rauc install (plain, {kit.plain.stat().st_size} bytes, 2 slots, loop={loop}): {took:.1f} s")

    rootfs, efi = kit.image_dir / "rootfs.img", kit.image_dir / "efi.vfat"
    assert sha256(svc.slots.path("root-b"), rootfs.stat().st_size) == sha256(rootfs), "root-b does not hold rootfs.img"
    assert sha256(svc.slots.path("efi-b"), efi.stat().st_size) == sha256(efi), "efi-b does not hold efi.vfat"
    after = svc.slots.hashes()
    assert after["root-a"] == before["root-a"] and after["efi-a"] == before["efi-a"], "the booted slots changed"

    log = svc.service_log()
    assert "gateway bundle hook: rootfs.1: read-back verified" in log, log
    assert "gateway bundle hook: efi.1: read-back verified" in log, log

    # Order: the pre-install handler, then the target marked bad, then (after both hooks)
    # the target made primary. The booted slot is never touched.
    calls = [c for c in svc.call_lines() if c.startswith(("gatewayd", "backend set-"))]
    assert calls == ["gatewayd update pre-install --config " + str(svc.gatewayd_config),
                     "backend set-state system1 bad",
                     "backend set-primary system1"], calls

    # What the handler saw: RAUC's environment and the signed gateway-update.json in the
    # mounted bundle.
    args = (svc.gw_record / "args").read_text().splitlines()
    assert args == ["update", "pre-install", "--config", str(svc.gatewayd_config)], args
    env = dict(line.split("=", 1) for line in (svc.gw_record / "env").read_text().splitlines())
    assert env["RAUC_CURRENT_BOOTNAME"] == "system0", env
    # RAUC 1.8 does not set it for system handlers; the wrapper takes it from the bundle's
    # manifest.raucm.
    assert env["RAUC_MF_VERSION"] == str(VERSION), env
    assert env["RAUC_BUNDLE_MOUNT_POINT"].startswith(str(svc.mnt)), env
    targets = {env[f"RAUC_SLOT_NAME_{i}"] for i in env["RAUC_TARGET_SLOTS"].split()}
    assert targets == {"rootfs.1", "efi.1"}, env
    meta = json.loads((svc.gw_record / "gateway-update.json").read_text())
    assert (meta["version"], meta["min_version"], meta["roothash"]) == (VERSION, MIN_VERSION, kit.verity["roothash"])

    # What gatewayd reads back through `rauc status`: the booted slot and the version now in
    # the target slot.
    r = svc.client(["status", "--detailed", "--output-format=json"])
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads(r.stdout)
    assert status["booted"] == "system0", status
    slots = {name: slot for entry in status["slots"] for name, slot in entry.items()}
    for name in ("rootfs.1", "efi.1"):
        st = slots[name]["slot_status"]
        assert (st["bundle"]["version"], st["status"]) == (str(VERSION), "ok"), (name, st)
    assert slots["rootfs.1"]["slot_status"]["checksum"]["sha256"] == sha256(rootfs)
    assert slots["rootfs.0"]["state"] == "booted"


def test_pre_install_handler_refusal_stops_the_install_before_any_slot_changes(service, kit: Kit):
    svc = service()
    svc.gw_exit.write_text("12\n")
    before = svc.slots.hashes()
    r = svc.install(kit.plain)
    assert r.returncode != 0, f"rauc install succeeded although the pre-install handler exited 12:\n{r.stdout}"
    print(f"rauc install with the handler refusing: exit {r.returncode}\n{r.stdout}{r.stderr}")
    # The handler's exit code is what reaches `rauc install`'s caller (its output does not).
    assert "Pre-install handler error: Child process exited with code 12" in r.stdout + r.stderr, (
        f"{r.stdout}\n{r.stderr}")
    assert "update refused: downgrade (stand-in)" not in r.stdout + r.stderr
    assert "update refused: downgrade (stand-in)" in svc.service_log()
    assert svc.slots.hashes() == before, "a slot changed although the pre-install handler refused"
    calls = svc.call_lines()
    assert calls and calls[0].startswith("gatewayd update pre-install"), calls
    assert not [c for c in calls if c.startswith("backend set-")], (
        f"RAUC changed boot state after the handler refused: {calls}")


@pytest.mark.parametrize("loop", [False, True], ids=["slot-files", "slot-loop-devices"])
@pytest.mark.parametrize("slot,hook_line", [
    ("root-b", "rootfs.1: read-back failed: the written root does not verify against the bundle's root hash"),
    ("efi-b", "efi.1: read-back failed: sha256 of the first"),
], ids=["root", "efi"])
def test_post_install_read_back_catches_a_write_that_did_not_stick(service, kit: Kit, tmp_path, slot, hook_line, loop):
    shim_c = tmp_path / "lossy-write.c"
    shim_c.write_text(LOSSY_C)
    shim = tmp_path / "lossy-write.so"
    run(["cc", "-shared", "-fPIC", "-O2", "-o", shim, shim_c, "-ldl"])
    svc = service(loop=loop, lossy=(shim, slot))
    r = svc.install(kit.plain)
    log = svc.service_log()
    assert "lossy-write: flipped one bit" in log, f"the shim never saw a write to {slot}:\n{log}"
    assert r.returncode != 0, f"rauc install succeeded with a corrupted write to {slot}:\n{r.stdout}\n{log}"
    assert "failed to run slot hook" in r.stdout + r.stderr, f"{r.stdout}\n{r.stderr}"
    assert hook_line in log, log
    calls = svc.call_lines()
    assert "backend set-state system1 bad" in calls, calls
    assert not [c for c in calls if c.startswith("backend set-primary")], (
        f"the target was made primary after a failed read-back: {calls}")
    assert "backend set-state system1 good" not in calls, calls


# --------------------------------------------------------------------------
# D-Bus policy


def test_dbus_policy_lets_only_root_and_the_service_user_call_rauc(tmp_path, kit: Kit):
    """The override after Debian's allow-everyone policy: root and the service user get
    answers, any other user AccessDenied. The host has no user `gatewayd`, so the policy is
    loaded with that one user name replaced by `daemon` (uid 1); `nobody` stands for any
    other local user."""
    text = POLICY.read_text()
    assert text.count('user="gatewayd"') == 1, "expected one <policy user=\"gatewayd\"> in the policy"
    ours = tmp_path / "de.pengutronix.rauc.conf"
    ours.write_text(text.replace('user="gatewayd"', 'user="daemon"'))
    upstream = tmp_path / "upstream-policy.conf"
    upstream.write_text(UPSTREAM_POLICY)

    def calls_as(users: list[str | None], policies: list[Path]) -> dict:
        bus = Bus(tmp_path / f"bus-{len(policies)}", policies)
        svc = None
        try:
            svc = RaucService(tmp_path / f"svc-{len(policies)}", kit, bus)
            return {u: svc.client(["status", "--output-format=json"], user=u) for u in users}
        finally:
            if svc is not None:
                svc.stop()
            bus.stop()

    # Debian's policy alone: anyone may call RAUC (what the override is for).
    open_bus = calls_as(["nobody"], [upstream])
    assert open_bus["nobody"].returncode == 0, open_bus["nobody"].stderr

    got = calls_as([None, "daemon", "nobody"], [upstream, ours])
    assert got[None].returncode == 0, f"root was refused:\n{got[None].stderr}"
    assert json.loads(got[None].stdout)["booted"] == "system0"
    assert got["daemon"].returncode == 0, f"the service user was refused:\n{got['daemon'].stderr}"
    assert got["nobody"].returncode != 0, "an unprivileged user could call RAUC"
    assert "AccessDenied" in got["nobody"].stderr or "Rejected send message" in got["nobody"].stderr, (
        got["nobody"].stderr)


# --------------------------------------------------------------------------
# install-into-root.sh


def test_install_into_root_places_the_integration_and_refuses_a_bad_keyring(tmp_path, kit: Kit):
    root = tmp_path / "root"
    for f in ("usr/bin/rauc", "lib/systemd/system/rauc.service", "usr/sbin/veritysetup", "usr/bin/efibootmgr"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    r = run(["bash", INSTALL_INTO_ROOT, root, kit.signer.cert], check=False)
    assert r.returncode != 0 and "not a CA certificate" in r.stderr, r.stderr
    ca_then_leaf = tmp_path / "ca-then-leaf.pem"
    ca_then_leaf.write_text(kit.ca.cert.read_text() + kit.signer.cert.read_text())
    r = run(["bash", INSTALL_INTO_ROOT, root, ca_then_leaf], check=False)
    assert r.returncode != 0 and "certificate 2 is not a CA certificate" in r.stderr, r.stderr
    both = tmp_path / "with-key.pem"
    both.write_text(kit.ca.cert.read_text() + kit.ca.key.read_text())
    r = run(["bash", INSTALL_INTO_ROOT, root, both], check=False)
    assert r.returncode != 0 and "private key" in r.stderr, r.stderr
    assert not (root / "etc/rauc").exists(), "install-into-root.sh wrote files before refusing"

    transition = tmp_path / "transition.pem"
    transition.write_text(kit.ca.cert.read_text() + kit.other_ca.cert.read_text())
    run(["bash", INSTALL_INTO_ROOT, root, transition])
    assert (root / "etc/rauc/system.conf").read_bytes() == SYSTEM_CONF.read_bytes()
    assert (root / "etc/rauc/update-ca.pem").read_bytes() == transition.read_bytes()
    assert (root / "etc/dbus-1/system.d/de.pengutronix.rauc.conf").read_bytes() == POLICY.read_bytes()
    handler = root / "usr/libexec/gatewayd/rauc-pre-install"
    assert handler.read_bytes() == PRE_INSTALL.read_bytes() and os.access(handler, os.X_OK)
    dropin = (root / "etc/systemd/system/rauc.service.d/gatewayd.conf").read_text()
    assert "RequiresMountsFor=/var/lib/gatewayd" in dropin
    tmpfiles = (root / "usr/lib/tmpfiles.d/rauc-gatewayd.conf").read_text()
    assert "d /var/lib/gatewayd/rauc 0700 root root -" in tmpfiles, tmpfiles

    (root / "usr/bin/efibootmgr").unlink()
    r = run(["bash", INSTALL_INTO_ROOT, root, kit.ca.cert], check=False)
    assert r.returncode != 0 and "efibootmgr" in r.stderr, r.stderr
