"""DCMTK as the modality: echoscu and storescu against gatewayd, then /metrics.

Pins: C-ECHO works; C-STORE of one file, of 100 files over one association and
of 4 parallel associations all succeed with DCMTK's default settings, and
`spool status` counts exactly what was sent; /metrics exposes the DICOM and
spool metrics of DESIGN.md with values that match.
"""

from __future__ import annotations

import subprocess

import data
import gw
import scu


def _assert_ok(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def test_echoscu_gets_success(gateway):
    _assert_ok(scu.echoscu(gateway.dicom_port), "echoscu")


def test_storescu_single_file_is_stored(gateway, tmp_path):
    files = data.make_ct_set(1, tmp_path / "in", "ct")
    _assert_ok(scu.storescu(gateway.dicom_port, [f.path for f in files]), "storescu")
    st = gateway.status()
    assert st["objects"] == 1, st
    assert st["by_state"]["received"] == 1, st
    assert st["bytes"] > 0, st


def test_storescu_100_files_over_one_association_all_counted(gateway, tmp_path):
    files = data.make_mixed_set(50, 50, tmp_path / "in", seed=100)
    r = scu.storescu(gateway.dicom_port, [f.path for f in files], extra=["-v"])
    _assert_ok(r, "storescu of 100 files")
    out = r.stdout + r.stderr
    assert out.count("Requesting Association") == 1, "storescu opened more than one association"
    assert out.count("Received Store Response (Success)") == 100, out[-3000:]
    st = gateway.status()
    assert st["objects"] == 100, st
    assert st["by_state"]["received"] == 100, st


def test_four_parallel_storescu_associations_all_stored(gateway, tmp_path):
    procs = []
    for k in range(4):
        files = data.make_ct_set(25, tmp_path / f"in{k}", "ct" if k % 2 == 0 else "small", start=1000 * (k + 1))
        cmd = scu.storescu_cmd(gateway.dicom_port, [f.path for f in files], calling=f"CT0{k + 1}")
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=scu.dcmtk_env(), stdin=subprocess.DEVNULL)))
    failures = []
    for cmd, p in procs:
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            failures.append(f"{' '.join(cmd[:8])} ... exited {p.returncode}:\n{out[-2000:]}")
    assert not failures, "\n".join(failures)
    st = gateway.status()
    assert st["objects"] == 100, st
    assert st["by_state"]["received"] == 100, st


def test_metrics_count_stores_and_spool(gateway, tmp_path):
    files = data.make_ct_set(10, tmp_path / "in", "small")
    _assert_ok(scu.storescu(gateway.dicom_port, [f.path for f in files]), "storescu")
    samples = gateway.metrics()

    stored_ok = gw.metric_values(samples, "gateway_dicom_stored_total", status="success")
    assert stored_ok, "no gateway_dicom_stored_total{status=\"success\"} sample"
    assert sum(stored_ok) >= 10, stored_ok

    in_spool = gw.metric_values(samples, "gateway_spool_objects", state="received") + gw.metric_values(
        samples, "gateway_spool_objects", state="queued")
    assert in_spool, "no gateway_spool_objects{state=\"received\"|\"queued\"} sample"
    assert sum(in_spool) >= 10, in_spool

    spool_bytes = gw.metric_values(samples, "gateway_spool_bytes")
    assert spool_bytes, "no gateway_spool_bytes sample"
    assert spool_bytes[0] > 0, spool_bytes

    active = gw.metric_values(samples, "gateway_dicom_associations_active")
    assert active, "no gateway_dicom_associations_active sample"
    assert active[0] >= 0
