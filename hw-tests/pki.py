"""A tiny certificate authority made with the openssl CLI, for mutual-TLS tests.

`CA(dir)` makes an ECDSA P-256 CA key and a self-signed v3 CA certificate in
``dir`` (a pytest temp folder, never the gateway's folders: the tests scan
those for private keys). Then:

- `ca.sign_csr(csr_pem_path, out)` issues a client certificate (clientAuth)
  for a CSR, with the subject the CSR asks for;
- `ca.server_cert("127.0.0.1")` makes a key and a server certificate
  (serverAuth) with `subjectAltName = IP:127.0.0.1`, for nginx;
- `ca.other_client_cert(name)` makes a key and a certificate that belong to
  some other device (for "refuses a certificate for another key").
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT_S = 30.0


def require_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise AssertionError("`openssl` not found on PATH: `apt-get install -y --no-install-recommends openssl`")
    return path


def openssl(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([require_openssl(), *args], input=input, capture_output=True, timeout=OPENSSL_TIMEOUT_S,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, (
            f"`openssl {' '.join(args)}` exited {r.returncode}\n"
            f"stdout: {r.stdout.decode(errors='replace')}\nstderr: {r.stderr.decode(errors='replace')}"
        )
    return r


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


class CA:
    """An ECDSA P-256 CA in ``dir``; every file it makes stays there."""

    def __init__(self, dir: Path | str, name: str = "hw-tests CA", days: int = 30):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.days = days
        self.key = self.dir / "ca.key"
        self.cert = self.dir / "ca.pem"
        self._serial = 1
        self._ec_key(self.key)
        ext = self._ext_file("ca.ext", [
            "basicConstraints = critical, CA:TRUE, pathlen:0",
            "keyUsage = critical, keyCertSign, cRLSign",
            "subjectKeyIdentifier = hash",
        ])
        openssl("req", "-new", "-x509", "-key", str(self.key), "-out", str(self.cert), "-days", str(days),
                "-subj", f"/O=hw-tests/CN={name}", "-sha256", "-extensions", "v3", "-config", str(ext))

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _ec_key(path: Path) -> None:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        path.chmod(0o600)

    def _ext_file(self, name: str, lines: list[str]) -> Path:
        """An openssl config whose [v3] section holds ``lines`` (usable by req and x509)."""
        p = self.dir / name
        p.write_text("[req]\ndistinguished_name = dn\n[dn]\n[v3]\n" + "\n".join(lines) + "\n")
        return p

    def _sign(self, csr: Path, out: Path, ext_lines: list[str]) -> Path:
        self._serial += 1
        ext = self._ext_file(f"{out.stem}.ext", ext_lines)
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                "-set_serial", str(self._serial), "-days", str(self.days), "-sha256",
                "-extfile", str(ext), "-extensions", "v3", "-out", str(out))
        return out

    # -- issuing -----------------------------------------------------------

    def sign_csr(self, csr: Path | str, out: Path | str) -> Path:
        """A client certificate (clientAuth) for the CSR's key and subject. The CSR's
        own signature is checked first (`openssl req -verify`)."""
        csr, out = Path(csr), Path(out)
        openssl("req", "-in", str(csr), "-noout", "-verify")
        return self._sign(csr, out, [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature",
            "extendedKeyUsage = clientAuth",
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid",
        ])

    def sign_csr_as(self, csr: Path | str, out: Path | str, cn: str) -> Path:
        """Like `sign_csr`, but the subject is ``/O=hw-tests/CN=<cn>`` whatever the CSR asked
        for (a provisioning service names the device). `openssl req -x509 -CA` keeps the
        CSR's key and checks its self-signature."""
        csr, out = Path(csr), Path(out)
        self._serial += 1
        ext = self._ext_file(f"{out.stem}.ext", [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature",
            "extendedKeyUsage = clientAuth",
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid",
        ])
        openssl("req", "-in", str(csr), "-verify", "-x509", "-CA", str(self.cert), "-CAkey", str(self.key),
                "-subj", f"/O=hw-tests/CN={cn}", "-set_serial", str(self._serial), "-days", str(self.days),
                "-sha256", "-config", str(ext), "-extensions", "v3", "-out", str(out))
        return out

    def sign_csr_for_server(self, csr: Path | str, out: Path | str, host: str = "127.0.0.1") -> Path:
        """A certificate for the CSR's key and subject that serves TLS for ``host`` (an IP
        in subjectAltName) and is also a client certificate (serverAuth + clientAuth): the
        device identity as a listener's key."""
        csr, out = Path(csr), Path(out)
        openssl("req", "-in", str(csr), "-noout", "-verify")
        return self._sign(csr, out, [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature",
            "extendedKeyUsage = serverAuth, clientAuth",
            f"subjectAltName = IP:{host}",
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid",
        ])

    def server_cert(self, host: str = "127.0.0.1", name: str = "server") -> KeyPair:
        """A key and a serverAuth certificate for ``host`` (an IP or a DNS name) in subjectAltName."""
        key = self.dir / f"{name}.key"
        csr = self.dir / f"{name}.csr"
        cert = self.dir / f"{name}.pem"
        self._ec_key(key)
        openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=hw-tests/CN={host}")
        try:
            ipaddress.ip_address(host)
            san = f"IP:{host}"
        except ValueError:
            san = f"DNS:{host}"
        self._sign(csr, cert, [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature",
            "extendedKeyUsage = serverAuth",
            f"subjectAltName = {san}",
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid",
        ])
        return KeyPair(key, cert)

    def other_client_cert(self, cn: str, name: str = "other-device") -> KeyPair:
        """A client certificate issued by this CA for a key made here (not the TPM's)."""
        key = self.dir / f"{name}.key"
        csr = self.dir / f"{name}.csr"
        cert = self.dir / f"{name}.pem"
        self._ec_key(key)
        openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        return KeyPair(key, self.sign_csr(csr, cert))

    # -- inspection ---------------------------------------------------------

    @staticmethod
    def cert_text(cert: Path | str) -> str:
        return openssl("x509", "-in", str(cert), "-noout", "-text").stdout.decode()

    def verify(self, cert: Path | str, purpose: str = "sslclient") -> subprocess.CompletedProcess:
        return openssl("verify", "-CAfile", str(self.cert), "-purpose", purpose, str(cert), check=False)


# --------------------------------------------------------------------------
# Looking for private keys in files


PEM_PRIVATE_MARKER = b"PRIVATE KEY"
# Prefixes of a DER P-256 private key: SEC1 ECPrivateKey (version 1, 32-byte
# OCTET STRING) and PKCS#8 PrivateKeyInfo with id-ecPublicKey.
DER_EC_PREFIXES = (
    bytes.fromhex("30770201010420"),
    bytes.fromhex("308187020100301306072a8648ce3d0201"),
    bytes.fromhex("3041020100301306072a8648ce3d0201"),
)


def parses_as_private_key(path: Path | str) -> str | None:
    """The openssl command that parsed ``path`` as a private key (PEM or DER,
    SEC1 EC or PKCS#8), or None. Passphrase prompts are answered with an empty
    passphrase so nothing blocks."""
    for args in (
        ("pkey", "-inform", "PEM"),
        ("pkey", "-inform", "DER"),
        ("ec", "-inform", "PEM"),
        ("ec", "-inform", "DER"),
    ):
        r = openssl(*args, "-in", str(path), "-noout", "-passin", "pass:", check=False)
        if r.returncode == 0:
            return "openssl " + " ".join(args)
    return None


def private_key_findings(paths: list[Path]) -> list[str]:
    """Every reason to think one of ``paths`` holds a private key in clear."""
    findings = []
    for p in paths:
        data = p.read_bytes()
        if PEM_PRIVATE_MARKER in data:
            findings.append(f"{p}: contains {PEM_PRIVATE_MARKER.decode()!r}")
        for prefix in DER_EC_PREFIXES:
            at = data.find(prefix)
            if at >= 0:
                findings.append(f"{p}: DER EC private key header {prefix.hex()} at offset {at}")
        # A whole file that is one key is a few KiB at most; bigger files (journal
        # segments are 16 MiB, and OpenSSL 3 tries every decoder on them for many seconds)
        # are covered by the scans above.
        how = parses_as_private_key(p) if len(data) <= 64 * 1024 else None
        if how:
            findings.append(f"{p}: parses as a private key with `{how}`")
    return findings
