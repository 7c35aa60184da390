"""A mutual-TLS cloud ingress for the tests: nginx in front of a real Orthanc.

Orthanc's own HTTPS resets every connection on this Debian build, so, as a
real cloud does, nginx terminates TLS and requires a client certificate
(`ssl_verify_client on` against the test CA) and proxies to Orthanc's plain
HTTP on loopback:

    ingress = mtls.Ingress(tmp_path / "cloud", ca).start()
    ingress.url            # https://127.0.0.1:PORT (server cert for IP 127.0.0.1 from `ca`)
    ingress.orthanc.url    # http://127.0.0.1:HTTP_PORT (Orthanc directly, no TLS)
    ingress.access_log()   # nginx access log: status, ssl_client_verify, client subject
    ingress.stop()

`Orthanc` and `Nginx` can be used on their own. Every server binds a port
picked by binding 127.0.0.1:0 (Orthanc binds 0.0.0.0 whatever it is told, so
its ports are picked the same way and it refuses remote access), keeps all of
its state, logs, pid and temp files under the folder it was given, and is
stopped by its PID.
"""

from __future__ import annotations

import collections
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import gw
import pki

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_READY_TIMEOUT_S = 60.0
NGINX_READY_TIMEOUT_S = 15.0


def _find(names: tuple[str, ...]) -> str | None:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        for n in names:
            p = Path(d) / n
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def orthanc_binary() -> str:
    p = _find(("Orthanc",))
    if p is None:
        raise AssertionError("`Orthanc` not found (PATH, /usr/sbin): `apt-get install -y --no-install-recommends "
                             "orthanc orthanc-dicomweb` (hw-tests/run-all.sh does this)")
    if not DICOMWEB_PLUGIN.is_file():
        raise AssertionError(f"Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} missing: `apt-get install -y orthanc-dicomweb`")
    return p


def nginx_binary() -> str:
    p = _find(("nginx",))
    if p is None:
        raise AssertionError("`nginx` not found (PATH, /usr/sbin): `apt-get install -y --no-install-recommends nginx`")
    return p


def _stop_pid(proc: subprocess.Popen | None, timeout: float, name: str) -> int | None:
    """SIGTERM by PID, SIGKILL if it lingers; the exit code (None if never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError(f"{name} (pid {proc.pid}) ignored SIGTERM for {timeout}s and was SIGKILLed") from None
    return proc.returncode


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return f"(no {path.name})"
    return "\n".join(path.read_bytes().decode("utf-8", errors="replace").splitlines()[-n:])


RECEIPT_LINE = re.compile(r"Lua says: hw-tests received (\S+)")


def receipt_lua(error_patient_id: str | None = None) -> str:
    """An Orthanc Lua script whose `ReceivedInstanceFilter` logs every instance Orthanc
    receives (duplicates included: the filter runs before Orthanc looks for an existing
    copy), read back by `Orthanc.received_uids()`. With ``error_patient_id`` it raises a
    Lua error for instances of that PatientID. (Returning false would not do as a refusal:
    Orthanc's STOW-RS then reports the instance as stored.)"""
    lines = ["function ReceivedInstanceFilter(dicom, origin, info)",
             '   print("hw-tests received " .. tostring(dicom.SOPInstanceUID))']
    if error_patient_id is not None:
        lines += [f"   if dicom.PatientID == {json.dumps(error_patient_id)} then",
                  '      error("hw-tests: this archive refuses the instance")', "   end"]
    lines += ["   return true", "end", ""]
    return "\n".join(lines)


class Orthanc:
    """A real Orthanc with the DICOMweb plugin; its storage and index in ``dir``."""

    def __init__(self, dir: Path | str, aet: str = "ORTHANC", lua_scripts: list[Path | str] | None = None):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = gw.free_port()
        self.dicom_port = gw.free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = gw.free_port()
        self.aet = aet
        self.config_path = self.dir / "orthanc.json"
        self.log_path = self.dir / "orthanc.log"
        self.config = {
            "Name": "hw-tests-cloud",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if lua_scripts:
            self.config["LuaScripts"] = [str(p) for p in lua_scripts]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        assert self.proc is None or self.proc.poll() is not None, "Orthanc already running"
        binary = orthanc_binary()
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, cwd=self.dir, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + ORTHANC_READY_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode} at start\nlog tail:\n{self.log_tail()}")
            try:
                code, body = self.get("/system", timeout=1.0)
                if code == 200:
                    return
                last = f"HTTP {code}: {body[:200]}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.2)
        raise AssertionError(f"Orthanc {self.url}/system not 200 within {ORTHANC_READY_TIMEOUT_S}s ({last})\n"
                             f"log tail:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", errors="replace")

    def get_json(self, path: str):
        code, body = self.get(path)
        assert code == 200, f"Orthanc GET {path}: HTTP {code}: {body[:500]}"
        return json.loads(body)

    def stop(self, timeout: float = 30.0) -> int | None:
        return _stop_pid(self.proc, timeout, "Orthanc")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def count_instances(self) -> int:
        """`CountInstances` from `/statistics`."""
        return int(self.get_json("/statistics")["CountInstances"])

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post(self, path: str, body: bytes, timeout: float = 30.0) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", errors="replace")

    def instance_id(self, sop_instance_uid: str) -> str:
        """Orthanc's id of the instance with this SOP Instance UID (`POST /tools/lookup`)."""
        code, body = self.post("/tools/lookup", sop_instance_uid.encode())
        assert code == 200, f"Orthanc /tools/lookup {sop_instance_uid}: HTTP {code}: {body[:300]}"
        hits = [h for h in json.loads(body) if h.get("Type") == "Instance"]
        assert len(hits) == 1, f"Orthanc /tools/lookup {sop_instance_uid}: {body[:300]}"
        return hits[0]["ID"]

    def received_uids(self) -> "collections.Counter[str]":
        """How many times Orthanc received each SOP Instance UID (duplicates included),
        from the lines `receipt_lua()` makes it log; needs that script in `LuaScripts`."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return collections.Counter(m.group(1) for m in RECEIPT_LINE.finditer(text))

    def cleanup(self) -> None:
        _kill(self.proc)

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)


NGINX_CONF = """\
# hw-tests: mutual-TLS ingress (written by hw-tests/mtls.py)
{user}daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    log_format mtls '$remote_addr [$time_local] "$request" $status '
                    'client_verify=$ssl_client_verify client_dn="$ssl_client_s_dn" '
                    'request_length=$request_length content_length=$content_length request_time=$request_time msec=$msec '
                    'upstream_status=$upstream_status';
    access_log {dir}/access.log mtls;
    client_body_temp_path {dir}/temp/client_body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name 127.0.0.1;

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 2;

        client_max_body_size 0;

        location / {{
{limit_rate}            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
            proxy_set_header X-SSL-Client-S-DN $ssl_client_s_dn;
        }}
    }}
}}
"""


class Nginx:
    """nginx terminating mutual TLS on 127.0.0.1 and proxying to ``upstream_port``."""

    def __init__(self, dir: Path | str, ca: pki.CA, upstream_port: int, client_ca: pki.CA | None = None,
                 limit_rate: str | None = None):
        """``limit_rate``: nginx's per-connection cap on what it sends to a client (e.g.
        ``"2m"`` = 2 MB/s), to make a download last long enough to interrupt."""
        self.dir = Path(dir)
        self.limit_rate = limit_rate
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        # The CA client certificates must chain to (default: ``ca``); change it and
        # restart to model a cloud that rotated its client CA.
        self.client_ca = client_ca or ca
        self.upstream_port = upstream_port
        self.port = gw.free_port()
        self.conf_path = self.dir / "nginx.conf"
        self.error_log = self.dir / "error.log"
        self.access_log = self.dir / "access.log"
        self.stdout_path = self.dir / "nginx.stdout.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        server = self.ca.server_cert("127.0.0.1", name="ingress")
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "temp" / sub).mkdir(parents=True, exist_ok=True)
        # As root the workers would switch to `nobody`, who cannot enter pytest's
        # 0700 temp folders: keep them as the current user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(NGINX_CONF.format(
            user=user, dir=self.dir, port=self.port, cert=server.cert, key=server.key, ca=self.client_ca.cert,
            upstream_port=self.upstream_port,
            limit_rate=f"            limit_rate {self.limit_rate};\n" if self.limit_rate else "",
        ))

    def command(self, *extra: str) -> list[str]:
        return [nginx_binary(), "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.conf_path), *extra]

    def start(self) -> "Nginx":
        assert self.proc is None or self.proc.poll() is not None, "nginx already running"
        self.write_conf()
        t = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert t.returncode == 0, f"`nginx -t` refused {self.conf_path}:\n{t.stderr}\n{self.conf_path.read_text()}"
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd=self.dir, start_new_session=True)
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + NGINX_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode} at start\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx not listening on 127.0.0.1:{self.port} within {NGINX_READY_TIMEOUT_S}s\n"
                             f"{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the master by PID (it stops its workers)."""
        return _stop_pid(self.proc, timeout, "nginx")

    def cleanup(self) -> None:
        _kill(self.proc)

    def access_log_text(self) -> str:
        return self.access_log.read_text(errors="replace") if self.access_log.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return f"error.log:\n{_tail(self.error_log, n)}\naccess.log:\n{_tail(self.access_log, n)}"


class Ingress:
    """nginx (mutual TLS, client certificates issued by ``ca``) in front of Orthanc.

    ``dir`` gets two subfolders, ``orthanc`` and ``nginx``; ``url`` is the
    https base URL (no trailing slash) whose server certificate ``ca`` issued for
    IP 127.0.0.1, so ``ca.cert`` is the CA file a client verifies it with.
    """

    def __init__(self, dir: Path | str, ca: pki.CA, lua_scripts: list[Path | str] | None = None,
                 limit_rate: str | None = None):
        self.dir = Path(dir)
        self.ca = ca
        self.orthanc = Orthanc(self.dir / "orthanc", lua_scripts=lua_scripts)
        self.nginx = Nginx(self.dir / "nginx", ca, self.orthanc.http_port, limit_rate=limit_rate)

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def port(self) -> int:
        return self.nginx.port

    @property
    def ca_file(self) -> Path:
        return self.ca.cert

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    def start(self) -> "Ingress":
        try:
            self.orthanc.start()
            self.nginx.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def stop(self) -> None:
        """Stops nginx then Orthanc by PID (both are stopped even if one fails)."""
        try:
            self.nginx.stop()
        finally:
            self.orthanc.stop()

    def cleanup(self) -> None:
        """Fixture teardown: SIGKILL whatever is still alive."""
        self.nginx.cleanup()
        self.orthanc.cleanup()

    def __enter__(self) -> "Ingress":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    def access_log(self) -> str:
        return self.nginx.access_log_text()

    def get(self, path: str, cert: pki.KeyPair | None = None, timeout: float = 10.0) -> tuple[int, str]:
        """GET through the ingress from Python (optionally with a client certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout, context=ctx) as r:
                return r.status, r.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return f"--- nginx ---\n{self.nginx.log_tail(n)}\n--- Orthanc ---\n{self.orthanc.log_tail(n)}"

    def hwtests_log_sections(self) -> list[tuple[str, str]]:
        return [("nginx logs", self.nginx.log_tail()), ("Orthanc log", self.orthanc.log_tail())]
