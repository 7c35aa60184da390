#!/usr/bin/env python3
"""Manual de-identification benchmark: the uplink drain with and without `deidentify = "basic"`
(not run by run-all.sh).

    hw-tests/.venv/bin/python hw-tests/bench/deid_bench.py [--repeats 1] [--gatewayd PATH]

The cloud is the one the tests use: a real Orthanc (DICOMweb plugin) behind nginx
with `ssl_verify_client on` (hw-tests/mtls.py), client certificates from an openssl
test CA. Input: the 200-object ingest set (`data.make_mixed_set(150, 50)`: 150 x
~0.5 MB CT + 50 small). In one run, for each variant a FRESH gateway (new data dir,
so a new master key) and a FRESH Orthanc (new ingress):

  none    `[[uplink]]` without de-identification (`deidentify = "none"`)
  basic   the same uplink with `deidentify = "basic"` (burned-in objects held; the
          CT set has none)

Both exactly as bench/uplink_bench.py times a drain: the 200 files are sent by
`storescu` while the uplink points at a port nobody listens on (everything queued);
gatewayd is stopped, the URL set to the ingress, and the drain is timed from
`gatewayd run` until `gateway_uplink_sent_total{destination="cloud"}` (all results)
reaches 200; then every one must be `result="sent"` and Orthanc must count 200 (for
`basic`: with (0012,0062) = YES on a sample, so the work was really done). CPU =
utime + stime of the gatewayd process from ready to drained. With --repeats N the
variants are interleaved and the medians reported.

Reports the drain time of each, the ratio basic/none (target <= 1.2x), instances/s
of each drain, and the extra CPU per instance de-identification costs; writes
hw-tests/bench/last-deid.md. The binary: --gatewayd, else $GATEWAYD, else
target/release/gatewayd (the other benches use the release build); the report says
which file and whether it is a debug build.

Every server binds 127.0.0.1 on a free port picked here (Orthanc binds all
addresses whatever it is told; `RemoteAccessAllowed: false`), keeps its state in a
temp dir and is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime
import io
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
sys.path.insert(0, str(HERE))

import pydicom  # noqa: E402

import data  # noqa: E402
import gw  # noqa: E402
import mtls  # noqa: E402
import pki  # noqa: E402
from uplink_bench import cpu_seconds  # noqa: E402

REPO = HERE.parent.parent
DRAIN_TIMEOUT_S = 900
N = 200


class Bench:
    def __init__(self, root: Path, binary: str):
        self.root = root
        self.binary = binary
        self.n = 0
        self.ca = pki.CA(root / "pki")
        self.client = self.ca.other_client_cert("bench-gw", name="client")
        self.files = data.make_mixed_set(150, 50, root / "files")
        assert len(self.files) == N
        self.paths = [f.path for f in self.files]
        self.file_bytes = sum(p.stat().st_size for p in self.paths)
        self.configs: dict[str, str] = {}

    def drain(self, variant: str) -> tuple[float, float]:
        """(drain seconds, gatewayd CPU seconds) for one fresh gateway + fresh Orthanc."""
        self.n += 1
        ing = mtls.Ingress(self.root / f"cloud-{self.n}", self.ca).start()
        os.environ["GATEWAYD"] = self.binary
        uplink = {"name": "cloud", "kind": "dicomweb", "url": f"https://127.0.0.1:{gw.free_port()}/dicom-web",
                  "ca_file": str(self.ca.cert), "client_auth": "files",
                  "cert_file": str(self.client.cert), "key_file": str(self.client.key), "deidentify": variant}
        g = gw.Gateway(self.root / f"gatewayd-{self.n}", {"uplink": [uplink]}, name=f"bench-{variant}")
        try:
            g.start()
            r = subprocess.run(["storescu", "-aet", "CT01", "-aec", "GATEWAY", "127.0.0.1", str(g.dicom_port),
                                *map(str, self.paths)], capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"storescu exited {r.returncode}: {r.stderr[-2000:]}")
            st = g.status()
            if st["by_destination"]["cloud"]["queued"] != N:
                raise RuntimeError(f"expected {N} queued before the drain: {st}")
            if g.stop() != 0:
                raise RuntimeError(f"gatewayd did not stop cleanly:\n{g.log_tail()}")
            g.config["uplink"][0]["url"] = ing.dicomweb_url
            g.config_path.write_text(gw.to_toml(g.config))
            self.configs.setdefault(variant, gw.to_toml({"uplink": g.config["uplink"]}).strip())

            t0 = time.perf_counter()
            g.start(wait=False)
            g.wait_ready()
            cpu0 = cpu_seconds(g.pid)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            polls = 0
            while True:
                done = sum(gw.metric_values(g.metrics(), "gateway_uplink_sent_total", destination="cloud"))
                if done >= N:
                    break
                polls += 1
                if polls % 40 == 0 and g.status()["by_destination"]["cloud"]["failed"] > 0:
                    raise RuntimeError(f"{variant}: dead letters during the drain: {g.status()}\n{g.log_tail(10)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gatewayd did not drain within {DRAIN_TIMEOUT_S}s: {g.status()}\n{g.log_tail()}")
                time.sleep(0.05)
            dt = time.perf_counter() - t0
            cpu = cpu_seconds(g.pid) - cpu0
            sent = sum(gw.metric_values(g.metrics(), "gateway_uplink_sent_total", destination="cloud", result="sent"))
            count = ing.orthanc.count_instances()
            if sent != N or count != N:
                raise RuntimeError(f"{variant}: sent {sent}, Orthanc has {count} of {N}; spool {g.status()}\n"
                                   f"{g.log_tail(20)}")
            if variant == "basic":
                oid = ing.orthanc.get_json("/instances")[0]
                ds = pydicom.dcmread(io.BytesIO(ing.orthanc.get_bytes(f"/instances/{oid}/file")),
                                     stop_before_pixels=True)
                if str(ds.get("PatientIdentityRemoved", "")) != "YES":
                    raise RuntimeError("the basic drain delivered an object without (0012,0062) = YES")
            g.stop()
            return dt, cpu
        finally:
            g.cleanup()
            ing.stop()
            ing.cleanup()


def build_kind(binary: str) -> str:
    parts = Path(binary).resolve().parts
    if "debug" in parts:
        return "debug build (target/debug: unoptimised)"
    if "release" in parts:
        return "release build"
    return "build profile unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--out", default=str(HERE / "last-deid.md"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    for tool in ("storescu", "openssl"):
        if shutil.which(tool) is None:
            print(f"`{tool}` not found on PATH (apt-get install dcmtk openssl)", file=sys.stderr)
            return 2
    mtls.orthanc_binary()
    mtls.nginx_binary()
    if not os.access(args.gatewayd, os.X_OK):
        print(f"{args.gatewayd} is not executable: cargo build --release -p gatewayd --features tpm", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="deid-bench-", dir="/var/tmp"))
    load0 = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    try:
        b = Bench(root, args.gatewayd)
        times: dict[str, list[float]] = {"none": [], "basic": []}
        cpu: dict[str, list[float]] = {"none": [], "basic": []}
        for i in range(args.repeats):
            for variant in ("none", "basic"):
                dt, c = b.drain(variant)
                times[variant].append(dt)
                cpu[variant].append(c)
                print(f"run {i + 1}: {variant}: {dt:.2f}s drain, gatewayd CPU {c:.2f}s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        ratio = med["basic"] / med["none"]
        extra_cpu_ms = (cmed["basic"] - cmed["none"]) / N * 1000
        if cmed["basic"] > cmed["none"]:
            deid_rate = N / (cmed["basic"] - cmed["none"])
            work = (f"De-identification work: {extra_cpu_ms:.2f} ms of gatewayd CPU per instance more than without, "
                    f"i.e. {deid_rate:.0f} instances/s of de-identification per core (target >= 200: "
                    f"{'met' if deid_rate >= 200 else 'NOT met'})")
        else:
            work = (f"De-identification work: not measurable above the run-to-run noise (the basic drain used "
                    f"{-extra_cpu_ms:.2f} ms LESS gatewayd CPU per instance than the plain one)")
        mb = b.file_bytes / 1e6
        ended = os.getloadavg()[0]
        rows = [f"| `deidentify = \"{k}\"` | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in times[k])} | "
                f"{N / med[k]:.0f} | {mb / med[k]:.1f} | {cmed[k]:.2f} |" for k in ("none", "basic")]
        md = [
            f"# De-identification benchmark ({started.isoformat()})",
            "",
            f"Host: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.platform()}; Orthanc 1.10.1 + "
            f"DICOMweb 1.7 behind nginx (mutual TLS), all on loopback and sharing the cores with gatewayd; "
            f"load average at start {load0:.2f}, at end {ended:.2f}.",
            f"gatewayd: `{args.gatewayd}` ({build_kind(args.gatewayd)}, "
            f"modified {datetime.datetime.fromtimestamp(os.path.getmtime(args.gatewayd), datetime.timezone.utc).isoformat(timespec='minutes')}).",
            f"Input: the 200-object ingest set (`data.make_mixed_set(150, 50)`: 150 x 512x512x16-bit CT + 50 x 16x16), "
            f"{mb:.1f} MB. {args.repeats} run(s) of each variant, interleaved; each with a fresh gateway (data dir, "
            f"master key) and a fresh Orthanc; median shown.",
            "",
            "| uplink | drain median s | runs (s) | instances/s | MB/s (files) | gatewayd CPU s (median) |",
            "|---|---:|---|---:|---:|---:|",
            *rows,
            "",
            f"basic / none = **{ratio:.2f}x** drain time (target <= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'}). "
            f"{work}; the basic drain delivered {N / med['basic']:.0f} instances/s end to end.",
            "The drain is timed from `gatewayd run` (spool with 200 queued objects, uplink now pointing at the "
            "ingress) until `gateway_uplink_sent_total{destination=\"cloud\"}` reaches 200 (polled every 50 ms on "
            "/metrics); it includes start-up, unsealing, de-identifying (basic), building the multipart bodies and "
            "the TLS handshake.",
            "",
            "Uplinks:",
            *[f"- {k}:\n  ```toml\n  " + v.replace("\n", "\n  ") + "\n  ```" for k, v in b.configs.items()],
            "",
            "Command: `hw-tests/.venv/bin/python hw-tests/bench/deid_bench.py"
            + (f" --repeats {args.repeats}" if args.repeats != 1 else "") + f" --gatewayd {args.gatewayd}`",
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
