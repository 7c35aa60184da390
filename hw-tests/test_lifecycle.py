"""Start, serve, observe, stop.

Pins: SIGTERM on an idle gateway exits 0 within 10 s; SIGTERM while storescu
is sending 100 files exits 0 within shutdown_grace + 5 s and every object
that got a success status before is exported fine after a restart on the same
data dir; /healthz answers 200; /metrics is Prometheus text with `# TYPE` lines
for the metrics of DESIGN.md; `spool status --json` works while `run` holds
the spool and after it stopped, with the contract's JSON shape.
"""

from __future__ import annotations

import re
import subprocess
import time

import pydicom

import data
import gw
import scu

GRACE_S = 10.0


def test_sigterm_on_idle_gateway_exits_0_within_10s(gateway):
    t0 = time.monotonic()
    rc = gateway.stop(timeout=10)
    assert rc == 0, f"exit code {rc} on SIGTERM\n{gateway.log_tail()}"
    assert time.monotonic() - t0 <= 10


def test_sigint_on_idle_gateway_exits_0(gateway):
    import signal
    gateway.proc.send_signal(signal.SIGINT)
    assert gateway.proc.wait(timeout=10) == 0, gateway.log_tail()


def _acked_files(storescu_output: str) -> list[str]:
    """Files that got a success C-STORE response, from `storescu -v` output:
    each "Sending file: F" is followed by its "Received Store Response (...)"."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
            continue
        if "Received Store Response" in line:
            if "(Success)" in line and current is not None:
                acked.append(current)
            current = None
    return acked


def test_sigterm_during_storescu_exits_0_and_keeps_acknowledged(gateway_factory, tmp_path):
    g = gateway_factory({"dicom": {"shutdown_grace": f"{GRACE_S:.0f}s"}})
    files = data.make_ct_set(100, tmp_path / "in", "ct")
    by_path = {str(f.path): f for f in files}
    out_path = tmp_path / "storescu.out"
    with open(out_path, "w") as out:
        p = subprocess.Popen(scu.storescu_cmd(g.dicom_port, [f.path for f in files], extra=["-v"]),
                             stdout=out, stderr=subprocess.STDOUT, env=scu.dcmtk_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while out_path.read_text().count("Received Store Response (Success)") < 3:
            assert p.poll() is None, f"storescu ended early:\n{out_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no 3 successful stores within 60 s"
            time.sleep(0.02)
        in_flight = p.poll() is None
        acked_at_term = out_path.read_text().count("Received Store Response (Success)")
        t0 = time.monotonic()
        rc = g.stop(timeout=GRACE_S + 5)
        took = time.monotonic() - t0
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert in_flight and acked_at_term < 100, "storescu finished before SIGTERM: the test did not test in-flight"
    assert rc == 0, f"gatewayd exited {rc} on SIGTERM during ingest\n{g.log_tail()}"
    print(f"SIGTERM after {acked_at_term} acks; gatewayd exited in {took:.2f}s; storescu rc {p.returncode}")

    acked = _acked_files(out_path.read_text())
    print(f"storescu got {len(acked)} success responses in all")
    assert len(acked) >= acked_at_term, (len(acked), acked_at_term)
    g.start()
    st = g.status()
    assert st["objects"] >= len(acked), (st, len(acked))
    for name in acked:
        f = by_path[name]
        out = tmp_path / "out" / f"{f.sop_instance_uid}.dcm"
        out.parent.mkdir(exist_ok=True)
        g.export(f.sop_instance_uid, out)
        assert pydicom.dcmread(out) == pydicom.dcmread(f.path), f"{name} differs after export"


def test_healthz_200_and_metrics_exposition_has_design_metrics(gateway, tmp_path):
    code, body = gateway.http_get("/healthz")
    assert code == 200, (code, body)
    f = data.make_ct_set(1, tmp_path / "in", "small")[0]
    assert scu.store_files(gateway.dicom_port, [f.path])[f.path] == 0x0000

    text = gateway.metrics_text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M))
    assert types, "no `# TYPE` lines in /metrics"
    samples = gw.parse_metrics(text)
    names = {n for n, _, _ in samples}
    for name in ("gateway_spool_objects", "gateway_spool_bytes", "gateway_dicom_associations_active",
                 "gateway_dicom_stored_total"):
        # OpenMetrics writes a counter's TYPE line without the _total suffix.
        family = name.removesuffix("_total")
        assert name in types or family in types, f"no `# TYPE {name}` line in /metrics:\n{text[:2000]}"
        assert name in names, f"no {name} sample in /metrics"


def test_spool_status_json_while_running_and_after_stop(gateway, tmp_path):
    files = data.make_ct_set(3, tmp_path / "in", "small")
    statuses = scu.store_files(gateway.dicom_port, [f.path for f in files])
    assert all(s == 0x0000 for s in statuses.values()), statuses

    running = gateway.status()  # the daemon holds the spool: this goes through its control socket
    assert gateway.is_running()
    for key in ("objects", "bytes", "by_state", "by_destination", "oldest_age_seconds"):
        assert key in running, f"status JSON lacks {key!r}: {running}"
    assert running["objects"] == 3, running
    assert running["bytes"] > 0, running
    assert set(running["by_state"]) >= {"received", "queued", "sent"}, running
    assert running["by_state"]["received"] == 3, running
    assert running["by_destination"] == {}, f"no uplink is configured: {running}"
    age = running["oldest_age_seconds"]
    assert isinstance(age, (int, float)) and age >= 0, running

    assert gateway.stop() == 0
    stopped = gateway.status()
    assert stopped["objects"] == 3, stopped
    assert stopped["bytes"] == running["bytes"], (running, stopped)
    assert stopped["by_state"]["received"] == 3, stopped


def test_status_of_empty_spool_has_null_oldest_age(gateway):
    st = gateway.status()
    assert st["objects"] == 0 and st["bytes"] == 0, st
    assert st["oldest_age_seconds"] is None, st
