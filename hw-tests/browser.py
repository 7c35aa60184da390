"""A real headless Chromium (Debian's `chromium` package) driven over the DevTools protocol.

`Chromium(dir, trust_spki=[...])` starts the browser with its own throw-away profile in
``dir``, DevTools on 127.0.0.1 and a port picked here, and trusts exactly the certificates
whose SubjectPublicKeyInfo SHA-256 (base64) is listed (`spki_sha256_b64(cert_pem)` computes
it with the openssl CLI): no blanket ``--ignore-certificate-errors``. `Chromium.page()`
attaches to the first page target through a websocket (PyPI `websocket-client`) and returns
a `Page`: `send(method, **params)` for any DevTools command, `evaluate(js)`, `wait_for(js)`,
`click(css)` (a real mouse press and release at the element's centre), `type_into(css, text)`
(focus, then `Input.insertText`, so kanji arrive as typed text), `screenshot(path)`, and
`problems()`: every console error, uncaught exception and browser log entry of level error
(CSP violations among them) seen so far. `stop()` kills the browser by its PID (and its
process group: the renderer and GPU helpers).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import gw

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_binary() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        "chromium not found on PATH: install Debian's package with "
        "`apt-get install -y --no-install-recommends chromium` (hw-tests/run-all.sh does this)"
    )


def require_websocket_client() -> None:
    try:
        import websocket  # noqa: F401
    except ImportError:
        raise AssertionError(
            "the PyPI package websocket-client is missing from the venv: "
            "`hw-tests/.venv/bin/pip install -r hw-tests/requirements.txt` (run-all.sh does this)"
        ) from None


def spki_sha256_b64(cert_pem: Path) -> str:
    """base64(SHA-256(DER SubjectPublicKeyInfo)) of a PEM certificate, as
    ``--ignore-certificate-errors-spki-list`` takes it."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_pem), "-noout", "-pubkey"],
                         capture_output=True, check=True, timeout=30).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                         capture_output=True, check=True, timeout=30).stdout
    import hashlib
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Chromium:
    def __init__(self, dir: Path, trust_spki: list[str] | None = None,
                 window: tuple[int, int] = (1000, 1400)):
        self.binary = chromium_binary()
        require_websocket_client()
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.profile = self.dir / "profile"
        self.profile.mkdir(exist_ok=True)
        self.log_path = self.dir / "chromium.log"
        self.port = gw.free_port()
        self.trust_spki = list(trust_spki or [])
        self.window = window
        self.proc: subprocess.Popen | None = None
        self._pages: list[Page] = []

    def args(self) -> list[str]:
        a = [
            self.binary,
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={self.port}",
            "--no-first-run", "--no-default-browser-check", "--disable-default-apps",
            "--disable-extensions", "--mute-audio", "--lang=ja-JP",
            f"--window-size={self.window[0]},{self.window[1]}",
        ]
        if self.trust_spki:
            a.append("--ignore-certificate-errors-spki-list=" + ",".join(self.trust_spki))
        a.append("about:blank")
        return a

    def start(self, timeout: float = 30.0) -> "Chromium":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.dir, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode} at start\n{self.log_tail()}")
            try:
                self.targets()
                return self
            except OSError as e:
                last = repr(e)
            time.sleep(0.2)
        raise AssertionError(f"chromium DevTools on 127.0.0.1:{self.port} not up within {timeout}s ({last})\n"
                             f"{self.log_tail()}")

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
            return json.loads(r.read())

    def page(self) -> "Page":
        deadline = time.monotonic() + 15
        while True:
            pages = [t for t in self.targets() if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                break
            assert time.monotonic() < deadline, f"no page target in chromium: {self.targets()}"
            time.sleep(0.2)
        p = Page(pages[0]["webSocketDebuggerUrl"])
        self._pages.append(p)
        return p

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_bytes().decode("utf-8", "replace").splitlines()[-n:])

    def hwtests_log_sections(self):
        return [("chromium log", self.log_tail())]

    def stop(self) -> None:
        for p in self._pages:
            p.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The browser's PID leads its own session (start_new_session): its renderer, GPU and
            # zygote helpers are in that process group, so they go with it.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One page target: DevTools commands, events kept for inspection."""

    def __init__(self, ws_url: str):
        import websocket
        # Chromium refuses DevTools websockets with an Origin it was not told to allow.
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing a socket the browser may have dropped
            pass

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise AssertionError(f"DevTools {method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
            assert time.monotonic() < deadline, f"DevTools {method}: no answer within {timeout}s"

    def pump(self, seconds: float = 0.2) -> None:
        """Collect events for a while."""
        import websocket
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                return
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r:
            raise AssertionError(f"page script failed: {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0, what: str | None = None) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.evaluate(expression)
            if last:
                return last
            self.pump(0.2)
        raise AssertionError(f"{what or expression} not within {timeout}s (last: {last!r}); "
                             f"console problems: {self.problems()}")

    def navigate(self, url: str, timeout: float = 20.0) -> None:
        r = self.send("Page.navigate", url=url)
        assert not r.get("errorText"), f"navigating to {url}: {r['errorText']}"
        self.wait_for("document.readyState === 'complete'", timeout, f"{url} loaded")

    def _centre(self, css: str) -> tuple[float, float]:
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(css)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; })()")
        assert box, f"no element {css!r} on the page"
        assert box[2] > 0 and box[3] > 0, f"element {css!r} is not visible (box {box})"
        return box[0], box[1]

    def click(self, css: str) -> None:
        x, y = self._centre(css)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {} if kind == "mouseMoved" else {"button": "left", "clickCount": 1}
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def type_into(self, css: str, text: str) -> None:
        self.click(css)
        self.evaluate(f"document.querySelector({json.dumps(css)}).select && "
                      f"document.querySelector({json.dumps(css)}).select()")
        self.send("Input.insertText", text=text)
        got = self.evaluate(f"document.querySelector({json.dumps(css)}).value")
        assert got == text, f"typed {text!r} into {css!r}, the field holds {got!r}"

    def choose(self, css: str, value: str) -> None:
        """Sets a <select> or date <input> as a person picking a value does (input + change events)."""
        ok = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(css)}); if (!e) return false;"
            f" e.focus(); e.value = {json.dumps(value)};"
            " e.dispatchEvent(new Event('input', {bubbles: true}));"
            " e.dispatchEvent(new Event('change', {bubbles: true}));"
            f" return e.value === {json.dumps(value)}; }})()")
        assert ok, f"could not set {css!r} to {value!r}"

    def screenshot(self, path: Path) -> Path:
        r = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(r["data"])
        assert data[:8] == b"\x89PNG\r\n\x1a\n", "captureScreenshot did not return a PNG"
        Path(path).write_bytes(data)
        return Path(path)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations included)."""
        self.pump(0.1)
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("uncaught: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.append(f"log[{entry.get('source')}]: {entry.get('text')} {entry.get('url', '')}".strip())
        return out
