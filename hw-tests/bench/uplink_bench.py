#!/usr/bin/env python3
"""Manual uplink benchmark: gatewayd's drain vs curl STOW-RS (not run by run-all.sh).

    hw-tests/.venv/bin/python hw-tests/bench/uplink_bench.py [--repeats 3] [--gatewayd PATH]

The cloud is the one the tests use: a real Orthanc (DICOMweb plugin) behind
nginx with `ssl_verify_client on` (hw-tests/mtls.py), client certificates from an
openssl test CA. Input: 200 mixed files (`data.make_mixed_set(150, 50)`: 150 x
~0.5 MB CT + 50 small, ~79 MB). Each measurement gets a FRESH Orthanc storage
(a new ingress) and, for gatewayd, a fresh spool:

  gatewayd      the 200 files are sent by `storescu` into gatewayd while its
                `[[uplink]]` points at a port nobody listens on (everything
                queued); gatewayd is stopped, the URL set to the ingress, and the
                drain is timed from `gatewayd run` until
                `gateway_uplink_sent_total{result="sent"}` = 200 (Orthanc's
                CountInstances checked = 200). CPU = utime + stime of the gatewayd
                process (/proc/PID/stat) from ready to drained, per GB of request
                body (`gateway_uplink_body_bytes_total`).
  gatewayd 1MiB the same with `max_bytes_per_sec = "1MiB"`.
  curl (a)      one STOW-RS request per file: ONE curl process, 200 requests with
                `--next` over a kept-alive connection (`curl -K a.cfg`).
  curl (b)      all 200 files in ONE multipart/related request.

The curl bodies are built before the clock starts (gatewayd builds its own
bodies inside the timed drain). Median of --repeats (default 3). Prints a
Markdown table with ratios vs curl (b) and the exact commands; writes it to
hw-tests/bench/last-uplink.md.

Every server binds 127.0.0.1 on a free port picked here (Orthanc binds all
addresses whatever it is told; `RemoteAccessAllowed: false`), keeps its state
in a temp dir and is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
import gw  # noqa: E402
import mtls  # noqa: E402
import pki  # noqa: E402

REPO = HERE.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BOUNDARY = "uplink-bench-7f3a91c2e5"
DRAIN_TIMEOUT_S = 900


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def multipart(paths: list[Path], out: Path) -> Path:
    with open(out, "wb") as f:
        for p in paths:
            f.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            f.write(p.read_bytes())
            f.write(b"\r\n")
        f.write(f"--{BOUNDARY}--\r\n".encode())
    return out


def curl_block(url: str, ca: Path, client: pki.KeyPair, body: Path) -> list[str]:
    """One request's options in a curl config file (`-K`)."""
    return [
        "silent", "show-error", "fail-with-body",
        f'cacert = "{ca}"', f'cert = "{client.cert}"', f'key = "{client.key}"',
        f'header = "Content-Type: multipart/related; type=\\"application/dicom\\"; boundary={BOUNDARY}"',
        'header = "Accept: application/dicom+json"', 'header = "Expect:"',
        f'data-binary = "@{body}"', 'output = "/dev/null"', 'write-out = "%{http_code}\\n"', f'url = "{url}"',
    ]


class Bench:
    def __init__(self, root: Path, binary: str, repeats: int):
        self.root = root
        self.binary = binary
        self.repeats = repeats
        self.n = 0
        self.ca = pki.CA(root / "pki")
        self.client = self.ca.other_client_cert("bench-gw", name="client")
        self.files = data.make_mixed_set(150, 50, root / "files")
        self.paths = [f.path for f in self.files]
        self.file_bytes = sum(p.stat().st_size for p in self.paths)
        self.commands: dict[str, str] = {}

    def ingress(self) -> mtls.Ingress:
        self.n += 1
        return mtls.Ingress(self.root / f"cloud-{self.n}", self.ca).start()

    # -- gatewayd --------------------------------------------------------

    def gatewayd(self, rate: str | None) -> tuple[float, float, float]:
        """(drain seconds, gatewayd CPU seconds, body bytes) for one fresh run."""
        ing = self.ingress()
        self.n += 1
        os.environ["GATEWAYD"] = self.binary
        dead = gw.free_port()
        uplink = {"name": "cloud", "kind": "dicomweb", "url": f"https://127.0.0.1:{dead}/dicom-web",
                  "ca_file": str(self.ca.cert), "client_auth": "files",
                  "cert_file": str(self.client.cert), "key_file": str(self.client.key)}
        if rate:
            uplink["max_bytes_per_sec"] = rate
        g = gw.Gateway(self.root / f"gatewayd-{self.n}", {"uplink": [uplink]}, name="bench")
        try:
            g.start()
            r = subprocess.run(["storescu", "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1", str(g.dicom_port),
                                *map(str, self.paths)], capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"storescu exited {r.returncode}: {r.stderr[-2000:]}")
            st = g.status()
            if st["by_destination"]["cloud"]["queued"] != 200:
                raise RuntimeError(f"expected 200 queued before the drain: {st}")
            if g.stop() != 0:
                raise RuntimeError(f"gatewayd did not stop cleanly:\n{g.log_tail()}")
            g.config["uplink"][0]["url"] = ing.dicomweb_url
            g.config_path.write_text(gw.to_toml(g.config))
            self.commands.setdefault(f"gatewayd{' ' + rate if rate else ''}",
                                     f"`{self.binary} run --config {g.config_path}` with\n  ```toml\n  "
                                     + gw.to_toml({"uplink": g.config["uplink"]}).strip().replace("\n", "\n  ")
                                     + "\n  ```")

            t0 = time.perf_counter()
            g.start(wait=False)
            g.wait_ready()
            cpu0 = cpu_seconds(g.pid)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while True:
                sent = sum(gw.metric_values(g.metrics(), "gateway_uplink_sent_total", destination="cloud", result="sent"))
                if sent >= 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gatewayd did not drain within {DRAIN_TIMEOUT_S}s: {g.status()}\n{g.log_tail()}")
                time.sleep(0.05)
            dt = time.perf_counter() - t0
            cpu = cpu_seconds(g.pid) - cpu0
            body = sum(gw.metric_values(g.metrics(), "gateway_uplink_body_bytes_total", destination="cloud"))
            count = ing.orthanc.count_instances()
            st = g.status()
            if count != 200 or st["by_destination"]["cloud"]["sent"] != 200:
                raise RuntimeError(f"after the drain Orthanc has {count}, spool {st}")
            g.stop()
            return dt, cpu, body
        finally:
            g.cleanup()
            ing.stop()
            ing.cleanup()

    # -- curl --------------------------------------------------------------

    def curl(self, mode: str) -> float:
        ing = self.ingress()
        d = self.root / f"curl-{self.n}"
        d.mkdir()
        try:
            url = ing.dicomweb_url + "/studies"
            if mode == "a":
                blocks = [curl_block(url, self.ca.cert, self.client, multipart([p], d / f"body-{i:03d}.bin"))
                          for i, p in enumerate(self.paths)]
            else:
                blocks = [curl_block(url, self.ca.cert, self.client, multipart(self.paths, d / "body-all.bin"))]
            cfg = d / f"{mode}.cfg"
            cfg.write_text("\nnext\n".join("\n".join(b) for b in blocks) + "\n")
            cmd = ["curl", "-K", str(cfg)]
            self.commands.setdefault(f"curl ({mode})", f"`{' '.join(cmd)}`; the config, one block per request "
                                     f"({len(blocks)} blocks, separated by `next`), first block:\n  ```\n  "
                                     + "\n  ".join(blocks[0]) + "\n  ```")
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=DRAIN_TIMEOUT_S, stdin=subprocess.DEVNULL)
            dt = time.perf_counter() - t0
            codes = r.stdout.split()
            if r.returncode != 0 or codes != ["200"] * len(blocks):
                raise RuntimeError(f"curl ({mode}) exited {r.returncode}, codes {sorted(set(codes))}: {r.stderr[-1000:]}")
            count = ing.orthanc.count_instances()
            if count != 200:
                raise RuntimeError(f"after curl ({mode}) Orthanc has {count} instances")
            return dt
        finally:
            ing.stop()
            ing.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--out", default=str(HERE / "last-uplink.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    for tool in ("storescu", "curl", "openssl"):
        if shutil.which(tool) is None:
            print(f"`{tool}` not found on PATH (apt-get install dcmtk curl openssl)", file=sys.stderr)
            return 2
    mtls.orthanc_binary()
    mtls.nginx_binary()
    if not os.access(args.gatewayd, os.X_OK):
        print(f"{args.gatewayd} is not executable: cargo build --release -p gatewayd", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="uplink-bench-", dir="/var/tmp"))
    load0 = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    try:
        b = Bench(root, args.gatewayd, args.repeats)
        results: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        body: dict[str, list[float]] = {}
        for i in range(args.repeats):
            # Interleaved, so slow drifts of the machine hit every variant alike.
            for name, fn in (("curl (b)", lambda: b.curl("b")), ("curl (a)", lambda: b.curl("a")),
                             ("gatewayd", lambda: b.gatewayd(None))):
                out = fn()
                if isinstance(out, tuple):
                    results.setdefault(name, []).append(out[0])
                    cpu.setdefault(name, []).append(out[1])
                    body.setdefault(name, []).append(out[2])
                else:
                    results.setdefault(name, []).append(out)
                print(f"run {i + 1}: {name}: {results[name][-1]:.2f}s", flush=True)
        for i in range(args.repeats):
            dt, c, by = b.gatewayd("1MiB")
            results.setdefault("gatewayd 1MiB", []).append(dt)
            cpu.setdefault("gatewayd 1MiB", []).append(c)
            body.setdefault("gatewayd 1MiB", []).append(by)
            print(f"run {i + 1}: gatewayd 1MiB: {dt:.2f}s", flush=True)

        ref = statistics.median(results["curl (b)"])
        mb = b.file_bytes / 1e6
        rows = []
        labels = {
            "gatewayd": "gatewayd drain (default batch 16, no limit)",
            "gatewayd 1MiB": 'gatewayd drain, `max_bytes_per_sec = "1MiB"`',
            "curl (a)": "curl (a): 1 request per file, 1 connection",
            "curl (b)": "curl (b): 1 request, 200 parts",
        }
        for name in ("gatewayd", "curl (a)", "curl (b)", "gatewayd 1MiB"):
            med = statistics.median(results[name])
            cpu_col = "-"
            if name in cpu:
                gb = statistics.median(body[name]) / 1e9
                cpu_col = f"{statistics.median(cpu[name]):.2f} s ({statistics.median(cpu[name]) / gb:.1f} s/GB)"
            rows.append(f"| {labels[name]} | {med:.2f} | {', '.join(f'{x:.2f}' for x in results[name])} | "
                        f"{mb / med:.1f} | {med / ref:.2f}x | {cpu_col} |")
        lim = statistics.median(body["gatewayd 1MiB"]) / statistics.median(results["gatewayd 1MiB"])
        ended = os.getloadavg()[0]
        md = [
            f"# Uplink benchmark ({started.isoformat()})",
            "",
            f"Host: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.platform()}; "
            f"{' '.join(subprocess.run(['curl', '--version'], capture_output=True, text=True).stdout.split()[:2])}; "
            f"Orthanc 1.10.1 + DICOMweb 1.7 behind nginx 1.22 (mutual TLS, `proxy_request_buffering off`), all on "
            f"loopback and sharing the {os.cpu_count()} cores with gatewayd; load average at start {load0:.2f}, at end {ended:.2f}.",
            f"Input: 200 CT Image Storage files (`data.make_mixed_set(150, 50)`: 150 x 512x512x16-bit + 50 x 16x16), "
            f"{mb:.1f} MB. Median of {args.repeats} runs, each with a fresh Orthanc storage (new Orthanc + nginx) "
            f"and, for gatewayd, a fresh spool.",
            "",
            "| sender | median s | runs (s) | MB/s (files) | vs curl (b) | gatewayd CPU (median; per GB of body) |",
            "|---|---:|---|---:|---:|---|",
            *rows,
            "",
            f"gatewayd/(b) = {statistics.median(results['gatewayd']) / ref:.2f}x (drain time). "
            f"With the 1 MiB/s limit the body rate over the whole drain (incl. start-up and gaps between requests) "
            f"was {lim / 1024:.0f} KiB/s.",
            "gatewayd's drain is timed from `gatewayd run` (spool with 200 queued objects, uplink now pointing at the "
            "ingress) until `gateway_uplink_sent_total{result=\"sent\"}` reaches 200 (polled every 50 ms on /metrics); "
            "it includes start-up, unsealing, building the multipart bodies and the TLS handshake. "
            "curl's bodies were written before the clock started.",
            "",
            "Commands:",
            *[f"- {k}: {v}" for k, v in b.commands.items()],
            "",
            "Command: `hw-tests/.venv/bin/python hw-tests/bench/uplink_bench.py"
            + (f" --repeats {args.repeats}`" if args.repeats != 3 else "`"),
        ]
        text = "\n".join(md) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
