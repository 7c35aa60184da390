"""The TPM 2.0 key store against a real TPM simulator (swtpm), and the TPM-held
device identity in mutual TLS against a real ingress (nginx + Orthanc).

Pins (config `[keystore] backend = "tpm"`, `tcti`, `pcrs`, `allow_software_tpm`):

- `keys init` creates TPM-wrapped blobs only; objects sealed under them
  survive a gatewayd restart *and* a TPM power cycle (swtpm restarted on the
  same state), and export byte-identical;
- `keys csr` -> CA -> `keys install-cert` -> `keys check-tls` completes a
  mutual-TLS handshake with nginx (`ssl_verify_client on`) in front of Orthanc;
  nginx answers 400 without a client certificate; a certificate for another
  key is refused; no file the gateway wrote holds a private key in clear;
- a cleared / replaced TPM (swtpm state deleted and recreated) is a tamper:
  `run` refuses, naming the storage root key;
- with `pcrs = [16]`, an extended PCR 16 makes `run` refuse naming the PCRs;
  a TPM power cycle (PCRs reset) makes it start and serve old objects again;
- `keys wipe --yes` crypto-shreds: blobs stay on disk but nothing opens them,
  `run` asks for `gatewayd keys init`, and restoring the old key files does
  not help (the storage root key is gone from the TPM);
- production mode refuses a software TPM unless `allow_software_tpm = true`,
  which starts with a WARN naming the SOFTWARE TPM.

Missing swtpm / tpm2-tools / openssl / nginx / Orthanc / curl is a failure
naming the package, never a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import fail_on_assertion

import data
import gw
import mtls
import pki
import scu
import tpm

REFUSE_TIMEOUT_S = 10.0
KEY_FILES = ("tpm-state.json", "identity.pub", "identity.priv", "spool-master.pub", "spool-master.priv")


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def ingress(tmp_path, ca):
    """nginx (mutual TLS, clients of `ca`) in front of a real Orthanc."""
    fail_on_assertion(mtls.nginx_binary)
    fail_on_assertion(mtls.orthanc_binary)
    ing = mtls.Ingress(tmp_path / "cloud", ca)
    try:
        fail_on_assertion(ing.start)
        yield ing
    finally:
        try:
            ing.stop()
        finally:
            ing.cleanup()


# --------------------------------------------------------------------------
# helpers


def tpm_keystore(t: tpm.Swtpm, **extra) -> dict:
    return {"keystore": {"backend": "tpm", "tcti": t.tcti, **extra}}


def keys(g: gw.Gateway, *args: str) -> subprocess.CompletedProcess:
    """`gatewayd keys ARGS... --config FILE`."""
    return g.cli("keys", *args, "--config", str(g.config_path))


def keys_ok(g: gw.Gateway, *args: str) -> str:
    r = keys(g, *args)
    assert r.returncode == 0, f"`gatewayd keys {' '.join(args)}` exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def init_keys(g: gw.Gateway) -> str:
    """`keys init`; checks its output and the key files; returns the master key fingerprint."""
    out = keys_ok(g, "init").strip()
    m = re.fullmatch(r"initialised tpm key store; spool master key ([0-9a-f]{16})", out)
    assert m, f"unexpected `keys init` output: {out!r}"
    kdir = g.data_dir / "keys"
    missing = [f for f in KEY_FILES if not (kdir / f).is_file()]
    assert not missing, f"`keys init` did not create {missing} in {kdir} (has {sorted(p.name for p in kdir.iterdir())})"
    return m.group(1)


def last_start_log(g: gw.Gateway) -> str:
    """The daemon's stderr and stdout since its last start."""
    text = g.log_path.read_text(errors="replace") if g.log_path.exists() else ""
    marker = f"===== hw-tests: start #{g.starts} of {g.name} ====="
    return text[text.rfind(marker):] if marker in text else text


def run_refused(g: gw.Gateway, timeout: float = REFUSE_TIMEOUT_S) -> str:
    """`run` must exit non-zero within ``timeout`` s; returns what it logged."""
    g.start(wait=False)
    t0 = time.monotonic()
    try:
        rc = g.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"`gatewayd run` still running {timeout}s after start: expected a refusal\nlog tail:\n{g.log_tail(30)}"
        ) from None
    log = last_start_log(g)
    assert rc != 0, f"`gatewayd run` exited 0: expected a refusal\nlog:\n{log}"
    assert "gatewayd ready" not in log and "DICOM service listening" not in log, (
        f"`gatewayd run` got ready before refusing\nlog:\n{log}"
    )
    print(f"run refused in {time.monotonic() - t0:.2f}s with exit {rc}")
    return log


def store(g: gw.Gateway, files: list[data.SyntheticFile]) -> None:
    r = scu.storescu(g.dicom_port, [f.path for f in files])
    assert r.returncode == 0, f"storescu exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{g.log_tail(20)}"


def assert_exports_identical(g: gw.Gateway, files: list[data.SyntheticFile], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    different = []
    for f in files:
        out = out_dir / f"{f.sop_instance_uid}.dcm"
        g.export(f.sop_instance_uid, out)
        if data.dataset_bytes(out) != data.dataset_bytes(f.path):
            different.append(f.sop_instance_uid)
    assert not different, f"{len(different)}/{len(files)} objects exported with different dataset bytes: {different[:5]}"


def write_config(g: gw.Gateway, overrides: dict) -> None:
    """Change a stopped gateway's config in place (same ports and data dir)."""
    assert not g.is_running()
    g.config = gw.deep_merge(g.config, overrides)
    g.config_path.write_text(gw.to_toml(g.config))


# --------------------------------------------------------------------------
# tests


def test_objects_sealed_under_tpm_keys_survive_gateway_stop_and_tpm_power_cycle(tmp_path, swtpm, gateway_factory):
    g = gateway_factory(tpm_keystore(swtpm), start=False)
    # Development mode does not create TPM keys by itself.
    log = run_refused(g)
    assert "gatewayd keys init" in log, f"`run` before `keys init` should say to run it\n{log}"

    fingerprint = init_keys(g)
    g.start()
    files = data.make_ct_set(20, tmp_path / "ct", "ct")
    store(g, files)
    assert g.status()["objects"] == 20
    assert g.stop() == 0

    old_pid = swtpm.pid
    swtpm.restart()
    assert swtpm.pid != old_pid

    g.start()
    st = g.status()
    assert st["objects"] == 20, f"spool status after both restarts: {st}"
    assert_exports_identical(g, files, tmp_path / "export")
    assert fingerprint in keys_ok(g, "status"), "the spool master key changed across restarts"
    assert g.stop() == 0


def test_mutual_tls_to_orthanc_behind_nginx_with_tpm_identity_and_no_private_key_on_disk(
        tmp_path, swtpm, ca, ingress, gateway_factory):
    g = gateway_factory(tpm_keystore(swtpm), start=False)
    init_keys(g)

    # CSR signed by the TPM-held identity key, subject CN = node id.
    csr_pem = keys_ok(g, "csr")
    assert "-----BEGIN CERTIFICATE REQUEST-----" in csr_pem, csr_pem
    csr = ca.dir / "device.csr"
    csr.write_text(csr_pem)
    pki.openssl("req", "-in", str(csr), "-noout", "-verify")
    subject = pki.openssl("req", "-in", str(csr), "-noout", "-subject").stdout.decode()
    assert re.search(r"CN\s*=\s*test-gw\b", subject), f"CSR subject is not CN = node id: {subject!r}"
    text = pki.openssl("req", "-in", str(csr), "-noout", "-text").stdout.decode()
    assert "prime256v1" in text or "P-256" in text, f"CSR key is not ECDSA P-256:\n{text}"

    cert = ca.sign_csr(csr, ca.dir / "device.pem")
    keys_ok(g, "install-cert", "--cert", str(cert))
    installed = g.data_dir / "keys" / "device.crt"
    assert installed.is_file(), f"install-cert did not write {installed}"

    # The ingress really requires a client certificate: curl without one gets 400.
    curl = shutil.which("curl")
    assert curl, "`curl` not found on PATH: `apt-get install -y --no-install-recommends curl`"
    r = subprocess.run([curl, "-sS", "--max-time", "20", "--cacert", str(ca.cert), "-o", "/dev/null",
                        "-w", "%{http_code}", ingress.url + "/system"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.stdout.strip() == "400", f"curl without client cert: exit {r.returncode}, status {r.stdout!r}, {r.stderr}"

    # Mutual TLS with the TPM-held key to the real Orthanc.
    r = keys(g, "check-tls", "--url", ingress.url + "/system", "--ca-file", str(ca.cert))
    assert r.returncode == 0, f"check-tls exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{ingress.log_tail()}"
    assert re.match(r"HTTP/1\.[01] 200\b", r.stdout.strip()), f"check-tls printed {r.stdout!r}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "client_verify=SUCCESS" not in ingress.access_log():
        time.sleep(0.1)
    access = ingress.access_log()
    assert re.search(r'"GET /system HTTP/1\.[01]" 200 client_verify=SUCCESS client_dn="[^"]*CN=test-gw', access), (
        f"nginx did not log a verified client certificate for CN=test-gw:\n{access}"
    )

    # check-tls fails cleanly against a server its CA file does not vouch for.
    stranger = pki.CA(tmp_path / "stranger-ca", name="stranger CA")
    r = keys(g, "check-tls", "--url", ingress.url + "/system", "--ca-file", str(stranger.cert))
    assert r.returncode == 1 and r.stderr.strip(), f"check-tls with the wrong CA: exit {r.returncode}, {r.stderr!r}"

    # A certificate for another key is refused, and the installed one is kept.
    before = installed.read_bytes()
    other = ca.other_client_cert("test-gw")
    r = keys(g, "install-cert", "--cert", str(other.cert))
    assert r.returncode == 1, f"install-cert of a cert for another key exited {r.returncode}: {r.stdout} {r.stderr}"
    assert "does not certify this device's identity key" in r.stderr, r.stderr
    assert installed.read_bytes() == before, "a refused install-cert changed device.crt"

    # Give the data dir some spool content too, then look for private keys everywhere.
    g.start()
    store(g, data.make_ct_set(3, tmp_path / "ct", "small"))
    assert g.stop() == 0

    assert pki.private_key_findings([ca.key]), "the private key scanner does not recognise the CA's key"
    files = sorted(p for p in g.workdir.rglob("*") if p.is_file())
    assert any(p.parent == g.data_dir / "keys" for p in files) and len(files) > len(KEY_FILES)
    findings = pki.private_key_findings(files)
    assert not findings, "private key material in clear:\n" + "\n".join(findings)


def test_run_refuses_when_tpm_state_was_wiped_and_recreated(tmp_path, swtpm, gateway_factory):
    g = gateway_factory(tpm_keystore(swtpm), start=False)
    init_keys(g)
    g.start()
    store(g, data.make_ct_set(2, tmp_path / "ct", "small"))
    assert g.stop() == 0

    swtpm.wipe_state()
    log = run_refused(g)
    assert "TPM tamper check failed" in log, log
    assert "storage root key" in log, log
    assert re.search(r"is missing|Name mismatch", log), log
    assert "tamper" in log.lower(), log


def test_pcr_policy_refuses_run_after_pcr_extend_until_tpm_power_cycle(tmp_path, swtpm, gateway_factory):
    g = gateway_factory(tpm_keystore(swtpm, pcrs=[16]), start=False)
    init_keys(g)
    g.start()
    files = data.make_ct_set(3, tmp_path / "ct", "small")
    store(g, files)
    assert g.stop() == 0

    before = swtpm.read_pcr(16)
    swtpm.extend_pcr(16, "5a" * 32)
    assert swtpm.read_pcr(16) != before, "tpm2_pcrextend did not change PCR 16"

    log = run_refused(g)
    assert "PCRs [16]" in log, f"the refusal does not name the PCRs:\n{log}"

    swtpm.restart()
    assert swtpm.read_pcr(16) == before, "PCR 16 not reset by the swtpm restart"
    g.start()
    assert_exports_identical(g, files, tmp_path / "export")
    assert g.stop() == 0


def test_keys_wipe_makes_sealed_blobs_unreadable_even_with_old_key_files_restored(tmp_path, swtpm, gateway_factory):
    g = gateway_factory(tpm_keystore(swtpm), start=False)
    init_keys(g)
    g.start()
    files = data.make_ct_set(3, tmp_path / "ct", "small")
    store(g, files)
    assert g.stop() == 0
    uid = files[0].sop_instance_uid
    g.export(uid, tmp_path / "before-wipe.dcm")  # readable before the wipe

    kdir = g.data_dir / "keys"
    backup = tmp_path / "keys-backup"  # outside the gateway's folder
    shutil.copytree(kdir, backup)
    blobs = g.sealed_files()
    assert blobs, f"no sealed object (blob or journal segment) under {g.data_dir / 'spool'}"

    r = keys(g, "wipe")
    assert r.returncode != 0, "keys wipe without --yes must refuse"
    assert (kdir / "tpm-state.json").is_file(), "keys wipe without --yes deleted keys"
    out = keys_ok(g, "wipe", "--yes")
    assert "wiped" in out, out
    left = [f for f in KEY_FILES if (kdir / f).exists()]
    assert not left, f"keys wipe left {left} in {kdir}"
    assert all(p.is_file() for p in blobs), "keys wipe removed sealed blobs (they should stay, unreadable)"

    r = g.export(uid, tmp_path / "after-wipe.dcm", check=False)
    assert r.returncode != 0, f"spool export after keys wipe exited 0: {r.stdout} {r.stderr}"
    print(f"spool export after wipe: exit {r.returncode}: {r.stderr.strip()}")
    log = run_refused(g)
    assert "gatewayd keys init" in log, f"`run` after wipe does not tell the operator to run `gatewayd keys init`:\n{log}"

    # The old key files back in place do not help: the storage root key they
    # were wrapped under is gone from the TPM.
    shutil.rmtree(kdir, ignore_errors=True)
    shutil.copytree(backup, kdir)
    log = run_refused(g)
    assert "TPM tamper check failed" in log and "storage root key" in log and "is missing" in log, log
    r = g.export(uid, tmp_path / "after-restore.dcm", check=False)
    assert r.returncode != 0, f"spool export with restored key files exited 0: {r.stdout} {r.stderr}"
    print(f"spool export with restored key files: exit {r.returncode}: {r.stderr.strip()}")
    assert not (tmp_path / "after-restore.dcm").exists(), "a failed export left a file behind"


def test_production_mode_refuses_software_tpm_unless_explicitly_allowed(tmp_path, swtpm, gateway_factory):
    g = gateway_factory({"node": {"mode": "production"}, **tpm_keystore(swtpm)}, start=False)
    init_keys(g)

    log = run_refused(g)
    assert "software TPM" in log, f"production refusal does not name the software TPM:\n{log}"

    write_config(g, {"keystore": {"allow_software_tpm": True}})
    g.start()
    log = last_start_log(g)
    warn = [line for line in log.splitlines() if "SOFTWARE TPM" in line]
    assert warn, f"no log line with 'SOFTWARE TPM':\n{log}"
    assert any("WARN" in line for line in warn), f"the SOFTWARE TPM line is not a WARN: {warn}"
    r = scu.echoscu(g.dicom_port)
    assert r.returncode == 0, f"echoscu to the production gateway failed: {r.stderr}"
    assert g.stop() == 0
