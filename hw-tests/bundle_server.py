"""The update bundle server of the update tests: HTTPS with a client certificate required,
HTTP Range, an optional slow pace (a window for a power cut mid-download). Used by
test_update_command.py (a gateway on this host) and test_appliance_update.py (a QEMU guest)."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from pathlib import Path


class BundleServer:
    """HTTPS on 127.0.0.1 with a required client certificate issued by `ca`; GET with Range;
    counts requests per path. `host`: the name in its certificate and URLs (a QEMU guest
    reaches 127.0.0.1 as 10.0.2.2). Stops in `stop()` (the fixture's teardown)."""

    def __init__(self, dir: Path, ca, files: dict[str, bytes], host: str = "127.0.0.1"):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        # Bytes sent per 50 ms (None: unpaced); bytes sent in all.
        self.chunk: int | None = None
        self.sent = 0
        self.host = host
        server_pair = ca.server_cert(host, name="bundles")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(server_pair.cert), str(server_pair.key))
        ctx.load_verify_locations(str(ca.cert))
        ctx.verify_mode = ssl.CERT_REQUIRED
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                # Paced: `chunk` bytes per 50 ms; else 1 MiB writes, so `sent` tracks the transfer.
                step = outer.chunk or (1 << 20)
                try:
                    for i in range(0, len(rest), step):
                        self.wfile.write(rest[i:i + step])
                        self.wfile.flush()
                        outer.sent += len(rest[i:i + step])
                        if outer.chunk:
                            time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the gateway went away mid-body (the power cut under test)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
