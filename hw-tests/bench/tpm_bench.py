#!/usr/bin/env python3
"""Manual TPM key store benchmark (not run by run-all.sh).

    cargo build --release -p gatewayd
    cargo build --release -p gateway-keystore --features tpm --example tpm_ops
    hw-tests/.venv/bin/python hw-tests/bench/tpm_bench.py [--repeats 3]

In one run, against swtpm on loopback:
  1. ingest of the 200-file mixed set (storescu, DCMTK defaults, one association) into
     gatewayd with `keystore.backend = "tpm"` vs `"software"` (the issue's target: tpm
     within 1.5x of software);
  2. TPM operation rates from the `tpm_ops` example (unseal of the spool master key, one
     identity signature);
  3. mutual-TLS handshake + one GET against nginx (`ssl_verify_client on`): `gatewayd keys
     check-tls` signing with the TPM-held key vs `curl` with a software key file. Both are
     whole processes, so each number includes process start.
Writes a Markdown report to stdout and hw-tests/bench/last-tpm.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import gw  # noqa: E402
import mtls  # noqa: E402
import pki  # noqa: E402
import tpm  # noqa: E402
from ingest_bench import timed_storescu  # noqa: E402

REPO = HERE.parent.parent


def ingest_runs(root: Path, files: list[Path], backend: str, swtpm: tpm.Swtpm, repeats: int) -> list[float]:
    times = []
    for run in range(repeats):
        overrides = {"keystore": {"backend": backend}}
        if backend == "tpm":
            overrides["keystore"]["tcti"] = swtpm.tcti
        g = gw.Gateway(root / f"ingest-{backend}-{run}", overrides)
        if backend == "tpm":
            # A fresh TPM per run: keys init needs the SRK handle free.
            swtpm.wipe_state()
            r = g.cli("keys", "init", "--config", str(g.config_path))
            assert r.returncode == 0, r.stderr
        g.start()
        try:
            times.append(timed_storescu(g.dicom_port, [files]))
            assert g.status()["objects"] == len(files)
        finally:
            g.stop()
            g.cleanup()
    return times


def timed(cmd: list[str], n: int, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Median wall time of `n` runs of `cmd`, and the last stdout line."""
    times, out = [], ""
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        assert r.returncode == 0, f"{cmd[0]} failed: {r.stdout}\n{r.stderr}"
        out = (r.stdout.strip().splitlines() or [""])[-1]
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "last-tpm.md"))
    args = ap.parse_args()
    binary = gw.gatewayd_binary()
    tpm_ops = REPO / "target/release/examples/tpm_ops"
    assert tpm_ops.exists(), "build it: cargo build --release -p gateway-keystore --features tpm --example tpm_ops"

    root = Path(tempfile.mkdtemp(prefix="tpm-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    swtpm = tpm.Swtpm(root / "swtpm").start()
    nginx = None
    try:
        files = [f.path for f in data.make_mixed_set(150, 50, root / "input", seed=7)]
        results = {b: ingest_runs(root, files, b, swtpm, args.repeats) for b in ("software", "tpm")}

        # TPM operation rates and handshakes on a freshly initialised TPM.
        swtpm.wipe_state()
        g = gw.Gateway(root / "tls", {"keystore": {"backend": "tpm", "tcti": swtpm.tcti}})
        cfg = str(g.config_path)
        assert g.cli("keys", "init", "--config", cfg).returncode == 0
        ops = subprocess.run([str(tpm_ops), swtpm.tcti, str(g.data_dir), "100"], capture_output=True,
                             text=True, timeout=120, check=True).stdout.strip()

        # Handshakes: TPM signer vs a software key, same nginx, same CA.
        ca = pki.CA(root / "ca")
        csr = root / "device.csr"
        r = g.cli("keys", "csr", "--config", cfg)
        assert r.returncode == 0, r.stderr
        csr.write_text(r.stdout)
        cert = ca.sign_csr(csr, root / "device.pem")
        assert g.cli("keys", "install-cert", "--config", cfg, "--cert", str(cert)).returncode == 0
        soft = ca.other_client_cert("soft-device")
        nginx = mtls.Nginx(root / "nginx", ca, upstream_port=gw.free_port()).start()
        url = nginx.url + "/"
        tpm_hs, tpm_line = timed([binary, "keys", "check-tls", "--config", cfg, "--url", url,
                                  "--ca-file", str(ca.cert)], args.handshakes)
        curl_hs, _ = timed(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca.cert),
                            "--cert", str(soft.cert), "--key", str(soft.key), url], args.handshakes)
        status_hs, _ = timed([binary, "keys", "status", "--config", cfg], args.handshakes)

        sw, tp = statistics.median(results["software"]), statistics.median(results["tpm"])
        lines = [
            f"# TPM key store benchmark ({datetime.datetime.now().astimezone().isoformat(timespec='seconds')})",
            "",
            f"swtpm on loopback; {os.cpu_count()} cores; median of {args.repeats} runs.",
            "",
            "| ingest, 200 files (150 CT + 50 small), storescu defaults, 1 association | median s | runs | vs software |",
            "|---|---:|---|---:|",
            f"| gatewayd, keystore software | {sw:.2f} | {', '.join(f'{t:.2f}' for t in results['software'])} | 1.00x |",
            f"| gatewayd, keystore tpm (swtpm) | {tp:.2f} | {', '.join(f'{t:.2f}' for t in results['tpm'])} | {tp / sw:.2f}x |",
            "",
            "TPM operations (`target/release/examples/tpm_ops TCTI DATA 100`):",
            "",
            "```",
            ops,
            "```",
            "",
            f"| mutual TLS handshake + GET, whole process, median of {args.handshakes} | ms |",
            "|---|---:|",
            f"| `gatewayd keys check-tls` (TPM-held ECDSA P-256 key) | {tpm_hs * 1e3:.1f} |",
            f"| `curl --cert --key` (software ECDSA P-256 key) | {curl_hs * 1e3:.1f} |",
            f"| `gatewayd keys status` (process start + TPM open + unseal, no TLS) | {status_hs * 1e3:.1f} |",
            "",
            f"check-tls answered: `{tpm_line}` (nginx has no upstream here: the handshake is what is timed).",
            "",
            f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        ]
        report = "\n".join(lines) + "\n"
        print(report)
        Path(args.out).write_text(report)
    finally:
        if nginx is not None:
            nginx.stop()
        swtpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
