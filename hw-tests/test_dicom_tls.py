"""DICOM over TLS (PS3.15 Annex B, the BCP 195 / RFC 8996 profile) on `[dicom] tls_listen`.

Peers: DCMTK `echoscu` / `storescu` with `+tls` (DCMTK 3.6.7's default "non-downgrading BCP
195" profile), pynetdicom with an `ssl.SSLContext`, and the `openssl s_client` command line
as a testssl-style probe. A test CA (`pki.CA`, ECDSA P-256) issues the listener's
certificate and the modalities' client certificates; a second CA issues a look-alike
certificate the gateway must refuse.

Pins: echo and a 100-file store over TLS succeed and every object is in the spool; a client
certificate from another CA is refused (counted as `reason="tls_handshake"`), nothing is
stored, and the listener keeps serving; a plain client on the TLS port and a TLS client on
the plain port fail within seconds and both listeners keep serving; pynetdicom over
`ssl` stores one file; TLS 1.0 / 1.1 and non-AEAD or non-ECDHE TLS 1.2 suites are refused
while TLS 1.2 ECDHE-ECDSA-AES128-GCM and TLS 1.3 are accepted; an allow-list entry with
`tls_client_name` admits that certificate's name only (over TLS only); in production mode
with the key store on swtpm, a listener without certificate files serves with the device
identity (the TPM signs each handshake) and no private key file exists under the data dir.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from dataclasses import dataclass

import pytest

import data
import gw
import pki
import scu
from results_env import EnvFactory
from test_tpm import init_keys, keys_ok, tpm_keystore

CLIENT_NAME = "ct01.clinic.example"


@dataclass
class Pki:
    ca: pki.CA
    server: pki.KeyPair
    client: pki.KeyPair
    other_client: pki.KeyPair
    stranger: pki.KeyPair


@pytest.fixture
def certs(tmp_path) -> Pki:
    pki.require_openssl()
    ca = pki.CA(tmp_path / "pki", name="clinic CA")
    other = pki.CA(tmp_path / "other-pki", name="some other CA")
    return Pki(
        ca=ca,
        server=ca.server_cert("127.0.0.1", name="gateway"),
        client=ca.other_client_cert(CLIENT_NAME, name="ct01"),
        other_client=ca.other_client_cert("mr01.clinic.example", name="mr01"),
        stranger=other.other_client_cert(CLIENT_NAME, name="stranger"),
    )


def tls_gateway(gateway_factory, certs: Pki, client_ca: bool = True, extra: dict | None = None):
    port = gw.free_port()
    dicom = {
        "tls_listen": f"127.0.0.1:{port}",
        "tls_cert_file": str(certs.server.cert),
        "tls_key_file": str(certs.server.key),
    }
    if client_ca:
        dicom["tls_client_ca_file"] = str(certs.ca.cert)
    g = gateway_factory(gw.deep_merge({"dicom": dicom}, extra or {}))
    g.tls_port = port
    return g


def tls_args(certs: Pki, client: pki.KeyPair | None = None) -> list[str]:
    client = client or certs.client
    return ["+tls", str(client.key), str(client.cert), "-pw", "+cf", str(certs.ca.cert)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=scu.dcmtk_env(),
                          stdin=subprocess.DEVNULL)


def echo(port: int, extra: list[str] | None = None, calling: str = "CT01", timeout: float = 30):
    return run(["echoscu", *(extra or []), "-aet", calling, "-aec", "GATEWAY", "127.0.0.1", str(port)], timeout)


def ok(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def rejected(g, reason: str) -> float:
    return sum(gw.metric_values(g.metrics(), "gateway_dicom_associations_rejected_total", reason=reason))


def test_echo_and_100_files_over_tls_are_stored(gateway_factory, certs, tmp_path):
    g = tls_gateway(gateway_factory, certs)
    ok(echo(g.tls_port, tls_args(certs)), "echoscu +tls")
    files = data.make_mixed_set(50, 50, tmp_path / "in", seed=2020)
    r = scu.storescu(g.tls_port, [f.path for f in files], extra=["-v", *tls_args(certs)])
    ok(r, "storescu +tls of 100 files")
    out = r.stdout + r.stderr
    assert out.count("Requesting Association") == 1, "storescu opened more than one association"
    assert out.count("Received Store Response (Success)") == 100, out[-3000:]
    st = g.status()
    assert st["objects"] == 100, st
    assert st["by_state"]["received"] == 100, st
    # The plain listener is still there, same policy.
    ok(scu.echoscu(g.dicom_port), "plain echoscu beside the TLS listener")


def test_a_client_certificate_from_another_ca_is_refused_and_nothing_is_stored(gateway_factory, certs, tmp_path):
    g = tls_gateway(gateway_factory, certs)
    files = data.make_ct_set(3, tmp_path / "in", "small")
    r = scu.storescu(g.tls_port, [f.path for f in files], extra=tls_args(certs, certs.stranger), timeout=60)
    assert r.returncode != 0, f"storescu with another CA's certificate succeeded:\n{r.stdout}\n{r.stderr}"
    # Without any client certificate: refused as well.
    r = run(["echoscu", "+tla", "+cf", str(certs.ca.cert), "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1",
             str(g.tls_port)], timeout=60)
    assert r.returncode != 0, f"anonymous TLS echo succeeded:\n{r.stdout}\n{r.stderr}"
    assert g.status()["objects"] == 0
    assert rejected(g, "tls_handshake") >= 2, g.metrics_text()
    ok(echo(g.tls_port, tls_args(certs)), "echoscu +tls after the refusals")
    assert g.is_running()


def test_plain_on_the_tls_port_and_tls_on_the_plain_port_fail_cleanly(gateway_factory, certs):
    g = tls_gateway(gateway_factory, certs)
    before = rejected(g, "tls_handshake")
    t0 = time.monotonic()
    r = echo(g.tls_port, timeout=60)
    assert r.returncode != 0, f"plain echoscu on the TLS port succeeded:\n{r.stdout}\n{r.stderr}"
    r = echo(g.dicom_port, tls_args(certs), timeout=60)
    assert r.returncode != 0, f"echoscu +tls on the plain port succeeded:\n{r.stdout}\n{r.stderr}"
    assert time.monotonic() - t0 < 20, "a failing client hung instead of failing fast"
    assert rejected(g, "tls_handshake") >= before + 1, g.metrics_text()
    assert rejected(g, "protocol") >= 1, g.metrics_text()
    ok(echo(g.tls_port, tls_args(certs)), "echoscu +tls afterwards")
    ok(scu.echoscu(g.dicom_port), "plain echoscu afterwards")
    assert g.is_running()


def test_pynetdicom_over_an_ssl_context_stores_one_file(gateway_factory, certs, tmp_path):
    g = tls_gateway(gateway_factory, certs)
    [f] = data.make_ct_set(1, tmp_path / "in", "small")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca.cert))
    ctx.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    ae = scu.make_ae("CT01")
    assoc = ae.associate("127.0.0.1", g.tls_port, contexts=scu.contexts_for_files([f.path]), ae_title="GATEWAY",
                         tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established, "pynetdicom could not associate over TLS"
    try:
        status = scu.c_store(assoc, f.path)
    finally:
        assoc.release()
    assert status == 0x0000, scu.describe(status)
    st = g.status()
    assert st["objects"] == 1, st


def s_client(g, certs: Pki, *args: str) -> subprocess.CompletedProcess:
    return pki.openssl("s_client", "-connect", f"127.0.0.1:{g.tls_port}", "-CAfile", str(certs.ca.cert),
                       "-cert", str(certs.client.cert), "-key", str(certs.client.key), "-brief", *args,
                       input=b"", check=False)


def test_only_tls_1_2_and_1_3_with_the_profile_suites(gateway_factory, certs):
    g = tls_gateway(gateway_factory, certs)
    # The client is allowed to offer what the server must refuse (OpenSSL 3 would not even
    # send TLS 1.0 or SHA-1 suites at its default security level).
    weak = "DEFAULT@SECLEVEL=0"
    refused = {
        "TLS 1.0": ["-tls1", "-cipher", weak],
        "TLS 1.1": ["-tls1_1", "-cipher", weak],
        "TLS 1.2 RSA key exchange, CBC": ["-tls1_2", "-cipher", "AES128-SHA@SECLEVEL=0"],
        "TLS 1.2 RSA key exchange, GCM": ["-tls1_2", "-cipher", "AES128-GCM-SHA256"],
        "TLS 1.2 ECDHE, CBC": ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA@SECLEVEL=0"],
        "TLS 1.2 ECDHE, CBC SHA-256": ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"],
    }
    for what, args in refused.items():
        r = s_client(g, certs, *args)
        out = (r.stdout + r.stderr).decode(errors="replace")
        assert r.returncode != 0, f"{what} was accepted:\n{out}"
        assert "no protocols available" not in out and "no cipher match" not in out, (
            f"{what}: the openssl client itself refused to offer it, so this proves nothing:\n{out}")
        assert "alert" in out, f"{what}: refused without an alert from the gateway:\n{out}"
    r = s_client(g, certs, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    assert "Protocol version: TLSv1.2" in out and "ECDHE-ECDSA-AES128-GCM-SHA256" in out, out
    r = s_client(g, certs, "-tls1_3")
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    assert "Protocol version: TLSv1.3" in out, out
    assert g.is_running()


def test_an_allow_list_entry_with_a_certificate_name_admits_that_certificate_only(gateway_factory, certs):
    g = tls_gateway(gateway_factory, certs, extra={"dicom": {"peers": [
        {"ae_title": "CT01", "host": "127.0.0.1", "tls_client_name": CLIENT_NAME},
    ]}})
    ok(echo(g.tls_port, tls_args(certs)), "echoscu +tls with the named certificate")
    r = echo(g.tls_port, tls_args(certs, certs.other_client), timeout=60)
    assert r.returncode != 0, f"a certificate with another name was admitted:\n{r.stdout}\n{r.stderr}"
    assert "Calling AE Title Not Recognized" in r.stdout + r.stderr, r.stdout + r.stderr
    # The same AE title and address over plain TCP has no certificate: refused too.
    r = scu.echoscu(g.dicom_port)
    assert r.returncode != 0, f"plain CT01 matched a certificate-only entry:\n{r.stdout}\n{r.stderr}"
    assert rejected(g, "calling_ae_title") >= 2, g.metrics_text()


def test_production_listener_with_the_tpm_device_identity(gateway_factory, certs, swtpm, tmp_path):
    port = gw.free_port()
    g = gateway_factory({"node": {"mode": "production"}, **tpm_keystore(swtpm, allow_software_tpm=True),
                         "dicom": {"tls_listen": f"127.0.0.1:{port}", "tls_client_ca_file": str(certs.ca.cert)}},
                        start=False)
    g.tls_port = port
    init_keys(g)
    csr = certs.ca.dir / "device.csr"
    csr.write_text(keys_ok(g, "csr"))
    keys_ok(g, "install-cert", "--cert", str(certs.ca.sign_csr_for_server(csr, certs.ca.dir / "device.pem")))
    g.start()
    ok(echo(port, tls_args(certs)), "echoscu +tls to the TPM-keyed listener")
    files = data.make_ct_set(5, tmp_path / "in", "small")
    ok(scu.storescu(port, [f.path for f in files], extra=tls_args(certs)), "storescu +tls to the TPM-keyed listener")
    assert g.status()["objects"] == 5
    r = s_client(g, certs, "-tls1_3")
    assert r.returncode == 0 and b"Protocol version: TLSv1.3" in r.stdout + r.stderr, r.stdout + r.stderr
    findings = pki.private_key_findings([p for p in g.data_dir.rglob("*") if p.is_file()])
    assert not findings, findings


def test_results_are_delivered_to_a_pacs_in_tls_that_requires_our_client_certificate(tmp_path, gateway_factory, ca):
    """The results harness (test_results.py) with its clinic PACS as `storescp +tls
    --require-peer-cert` and `[[results.deliver]] tls_ca_file/tls_cert_file/tls_key_file`."""
    envs = EnvFactory(tmp_path, gateway_factory, ca)
    try:
        env = envs(pacs_tls=True).start()
        b = env.book("clinic-a")
        study = env.make_study(b, 12, n_ct=2)
        env.send_study(study)
        env.wait_cloud(study)
        got = env.wait_pacs("clinic-a", study, timeout=120)
        assert set(got) == study.uids and all(n == 1 for n in got.values()), got
        d = env.gateway("clinic-a").status()["by_destination"]["pacs"]
        assert (d.get("sent"), d.get("queued"), d.get("failed")) == (12, 0, 0), d
        log = env.clinics["clinic-a"].pacs.log.read_text(errors="replace")
        assert "+tls" in log, "the PACS was not started in TLS"
    finally:
        envs.close()
