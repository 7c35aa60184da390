#!/usr/bin/env python3
"""Manual soak of gatewayd under mixed load: memory, spool index and status latency over
time (not run by run-all.sh or CI).

    hw-tests/.venv/bin/python hw-tests/bench/soak_bench.py --gatewayd PATH \
        [--seconds 3600] [--sample 10] [--dicom-rate 20] [--hl7-rate 20] [--keep] \
        [--spool KEY=VALUE ...]

(--seconds 120 for a quick check; --keep leaves the temp dir with the logs, spool and
Orthanc storage; Orthanc keeps every object, ~2.6 MB/s at the default rate.)

The binary is --gatewayd, else $GATEWAYD, else target/release/gatewayd; it is copied into
the temp dir first, so a rebuild during the soak cannot change the `spool status` CLI
under the running daemon.

Peers, all on 127.0.0.1 on free ports picked here, state in a temp dir under /var/tmp,
stopped by PID at the end (also on Ctrl-C, SIGTERM or an error):
  Orthanc + DICOMweb (`mtls.Orthanc`, plain HTTP) as the cloud archive, with the Lua
      receipt script (`mtls.receipt_lua`) so every STOW-RS receipt, duplicates included,
      is counted from its log;
  mllp_peer.py (`test_hl7_forward.Peer`, plain MLLP) as the EMR;
  gatewayd (`gw.Gateway`: the tests' development config) with `[hl7] listen`, an
      `[[uplink]] kind = "dicomweb"` named cloud to Orthanc and an `[[uplink]]
      kind = "mllp-tls"` named emr to the peer.

Load for --seconds, concurrently:
  DICOM  2 pynetdicom associations (--dicom-associations), each storing --per-connection
         CT objects of one new study (256x256x16-bit, ~128 KiB, from `data.make_ct_file`,
         unique SOP Instance UIDs) before releasing and associating again; together at
         most --dicom-rate objects/s.
  HL7    1 MLLP connection sending ADT^A08 and ORU^R01 in turn (unique MSH-10), reading
         each ACK, reconnecting every --per-connection messages; at most --hl7-rate msg/s.
  uplink gatewayd drains both destinations while the load runs.

Every --sample seconds: gatewayd's VmRSS and VmHWM (/proc/PID/status), objects stored,
HL7 ACKs, `gateway_spool_index_records` / `gateway_spool_index_bytes` from /metrics ("n/a"
while the binary has none), the wall time of `gatewayd spool status --config FILE --json`
(the CLI asks the daemon over its control socket) and the queued counts it reports. The
samples go to /tmp/soak-<UTC time>.csv; one line is printed per minute.

At the end the load stops, the queues must drain (queued == 0 for both destinations
within --drain-timeout), then: every stored object reached Orthanc exactly once (Lua
receipts and /statistics CountInstances), every HL7 message was answered AA or CA and
reached the EMR exactly once, no C-STORE, association or MLLP exchange failed, no dead
letters. Targets (issue): RSS growth over the last half of the load under 5 %, peak RSS
(VmHWM) under 64 MiB, `spool status` under 100 ms at every sample. A Markdown report is
printed and written to hw-tests/bench/last-soak.md. Exit code 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import datetime
import hashlib
import importlib.metadata
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pydicom  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import build_context  # noqa: E402

import data  # noqa: E402
import gw  # noqa: E402
import hl7msg  # noqa: E402
import mtls  # noqa: E402
import results_env  # noqa: E402
import scu  # noqa: E402
from test_hl7_forward import Peer  # noqa: E402

REPO = HERE.parent.parent
CLOUD, EMR = "cloud", "emr"
SIDE = 256  # 256 x 256 x 16-bit = 128 KiB of pixel data
TARGET_GROWTH_PCT = 5.0
TARGET_PEAK_MIB = 64.0
TARGET_STATUS_MS = 100.0
OBJECT_ID = re.compile(r"\b[0-9a-f]{32}\b")
JOIN_TIMEOUT_S = 90  # a C-STORE in flight may take up to pynetdicom's DIMSE timeout (60 s)
CSV_FIELDS = ("elapsed_s", "rss_kib", "hwm_kib", "rss_anon_kib", "rss_file_kib", "threads", "dicom_stored", "hl7_acked", "index_records", "index_bytes",
              "status_ms", "cloud_queued", "emr_queued")


# --------------------------------------------------------------------------
# load


@dataclass
class Tally:
    """What the load threads did; appended to from several threads (list.append is atomic)."""
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs answered 0x0000
    acked: list[str] = field(default_factory=list)  # MSH-10s answered AA/CA
    failures: list[str] = field(default_factory=list)  # one line per thing that went wrong


class Pacer:
    """At most ``rate`` calls of `wait` per second (no catching up after a slow call)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    def wait(self, stop: threading.Event) -> None:
        stop.wait(max(0.0, self.next - time.monotonic()))
        self.next = max(self.next + self.interval, time.monotonic())


def ct_template(dir: Path) -> pydicom.Dataset:
    """A `data.make_ct_file` CT object enlarged to SIDE x SIDE pixels (fixed random bytes)."""
    f = data.make_ct_file(dir / "template.dcm", 0, "small")
    ds = pydicom.dcmread(f.path)
    ds.Rows = ds.Columns = SIDE
    ds.PixelData = random.Random(128).randbytes(SIDE * SIDE * 2)
    return ds


def dicom_sender(port: int, template: pydicom.Dataset, path: Path, rate: float, per_assoc: int,
                 first_patient: int, patient_step: int, tally: Tally, stop: threading.Event) -> None:
    """Associations of ``per_assoc`` C-STOREs each, one new study (and patient) per association."""
    ds = copy.deepcopy(template)
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    pacer = Pacer(rate)
    patient = first_patient
    while not stop.is_set():
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID = data.patient_name(patient), data.patient_id(patient)
        patient += patient_step
        assoc = scu.associate(port, [context])
        if not assoc.is_established:
            tally.failures.append(f"association to gatewayd not established (rejected: {assoc.is_rejected})")
            stop.wait(1)
            continue
        try:
            for k in range(per_assoc):
                pacer.wait(stop)
                if stop.is_set():
                    break
                uid = generate_uid()
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
                ds.InstanceNumber = k + 1
                ds.save_as(path, enforce_file_format=True)
                status = scu.c_store(assoc, path)
                if status == 0:
                    tally.stored.append(uid)
                else:
                    tally.failures.append(f"C-STORE {uid}: {scu.describe(status)}")
                    if status is None:
                        break  # the association is gone
        except Exception as e:  # recorded, and the load goes on: a dead thread would just lower it
            tally.failures.append(f"DICOM sender: {e!r}")
            stop.wait(1)
        finally:
            if assoc.is_established:
                assoc.release()


def hl7_messages(prefix: str):
    """ADT^A08 and ORU^R01 in turn, MSH-10 = ``prefix`` + a counter."""
    for i in range(sys.maxsize):
        cid = f"{prefix}{i:08d}"
        if i % 2 == 0:
            yield hl7msg.adt_a08(cid, patient_id=f"ZZPID{i:08d}")
        else:
            # oru_r01 reads only the booking's appointment id, accession and patient.
            booking = results_env.Booking(clinic="soak", appointment_id=f"ZZAPT{i:08d}", accession=f"ZZACC{i:08d}",
                                          patient={"name": "ZZTEST^HANAKO", "birth_date": "1970-01-01"}, clerk=None)
            yield results_env.oru_r01(booking, cid)


def hl7_sender(port: int, rate: float, per_conn: int, prefix: str, tally: Tally, stop: threading.Event) -> None:
    pacer = Pacer(rate)
    messages = hl7_messages(prefix)
    while not stop.is_set():
        try:
            with hl7msg.MllpConnection(port, timeout=30) as conn:
                for _ in range(per_conn):
                    pacer.wait(stop)
                    if stop.is_set():
                        break
                    m = next(messages)
                    code, ref = hl7msg.msa(conn.request(m.bytes, timeout=30))
                    if code in ("AA", "CA") and ref == m.control_id:
                        tally.acked.append(m.control_id)
                    else:
                        tally.failures.append(f"HL7 {m.control_id}: MSA {code}|{ref}")
        except Exception as e:  # recorded, and the load goes on: a dead thread would just lower it
            tally.failures.append(f"HL7 sender: {e!r}")
            stop.wait(1)


# --------------------------------------------------------------------------
# sampling


def metric_or_none(samples, name: str) -> float | None:
    values = gw.metric_values(samples, name)
    return sum(values) if values else None


def timed_status(g: gw.Gateway) -> tuple[dict, float]:
    """`spool status --json` and its wall time in ms (CLI start to exit)."""
    t0 = time.perf_counter()
    st = g.status()
    return st, (time.perf_counter() - t0) * 1000


def sample(g: gw.Gateway, t0: float, tally: Tally) -> dict:
    ps = gw.proc_status(g.pid)
    metrics = g.metrics()
    st, ms = timed_status(g)
    dests = st["by_destination"]
    return {"elapsed_s": round(time.monotonic() - t0, 1), "rss_kib": ps["VmRSS"], "hwm_kib": ps["VmHWM"],
            "rss_anon_kib": ps["RssAnon"], "rss_file_kib": ps["RssFile"], "threads": ps["Threads"],
            "dicom_stored": len(tally.stored), "hl7_acked": len(tally.acked),
            "index_records": metric_or_none(metrics, "gateway_spool_index_records"),
            "index_bytes": metric_or_none(metrics, "gateway_spool_index_bytes"),
            "status_ms": round(ms, 1), "cloud_queued": dests.get(CLOUD, {}).get("queued", 0),
            "emr_queued": dests.get(EMR, {}).get("queued", 0)}


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def progress_line(s: dict) -> str:
    return (f"{s['elapsed_s']:7.0f}s  RSS {s['rss_kib'] / 1024:6.1f} MiB (anon {s['rss_anon_kib'] / 1024:.1f}, "
            f"file {s['rss_file_kib'] / 1024:.1f}, {s['threads']} threads)  HWM {s['hwm_kib'] / 1024:6.1f} MiB  "
            f"DICOM {s['dicom_stored']:6d}  HL7 {s['hl7_acked']:6d}  index {fmt(s['index_records'])} records / "
            f"{fmt(s['index_bytes'])} B  status {s['status_ms']:.0f} ms  queued {s['cloud_queued']}+{s['emr_queued']}")


# --------------------------------------------------------------------------
# the soak


def drain(g: gw.Gateway, timeout: float) -> tuple[dict, float]:
    """Polls `spool status` until nothing is queued; (last status, seconds waited)."""
    t0 = time.monotonic()
    while True:
        st = g.status()
        if all(st["by_destination"].get(d, {}).get("queued", 0) == 0 for d in (CLOUD, EMR)):
            return st, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the uplink queues did not drain within {timeout:.0f}s: {st['by_destination']}")
        time.sleep(1)


def check_delivery(tally: Tally, orthanc: mtls.Orthanc, peer: Peer, st: dict, pruned: bool) -> list[str]:
    """Problems with what reached Orthanc and the EMR (empty: all good)."""
    problems = list(tally.failures)
    stored = set(tally.stored)
    receipts = orthanc.received_uids()
    missing = stored - set(receipts)
    twice = {u: c for u, c in receipts.items() if c > 1}
    extra = set(receipts) - stored
    count = orthanc.count_instances()
    if missing:
        problems.append(f"{len(missing)} stored objects never reached Orthanc, e.g. {sorted(missing)[:3]}")
    if twice:
        problems.append(f"{len(twice)} objects reached Orthanc more than once, e.g. {list(twice.items())[:3]}")
    if extra:
        problems.append(f"Orthanc received {len(extra)} objects the load never had stored, e.g. {sorted(extra)[:3]}")
    if count != len(stored):
        problems.append(f"Orthanc /statistics CountInstances {count} != {len(stored)} stored")
    received = collections.Counter(cid for cid, _ in peer.received())
    acked = set(tally.acked)
    if set(received) != acked:
        problems.append(f"the EMR received {len(set(received) - acked)} messages not acknowledged and is missing "
                        f"{len(acked - set(received))} acknowledged ones, e.g. {sorted(acked - set(received))[:3]}")
    if any(c > 1 for c in received.values()):
        problems.append(f"{sum(1 for c in received.values() if c > 1)} HL7 messages reached the EMR more than once")
    for d, n in ((CLOUD, len(stored)), (EMR, len(acked))):
        counts = st["by_destination"].get(d, {})
        # Records of delivered objects leave the index after spool.dedupe_window: with a
        # short window the status counts only the most recent ones.
        sent_ok = counts.get("sent", 0) == n or (pruned and counts.get("sent", 0) <= n)
        if counts.get("failed", 0) or counts.get("queued", 0) or not sent_ok:
            problems.append(f"spool status {d}: {counts}, expected sent {n}, failed 0")
    return problems


def log_warnings(g: gw.Gateway) -> collections.Counter[str]:
    """gatewayd's WARN and ERROR log lines counted, without their timestamps and with each
    object id written as `<id>`."""
    return collections.Counter(OBJECT_ID.sub("<id>", line.split(maxsplit=1)[1]) for line in g.log_text().splitlines()
                               if " WARN " in line or " ERROR " in line)


def binary_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def report(args, command: str, started: datetime.datetime, load: tuple[float, float], g: gw.Gateway,
           orthanc: mtls.Orthanc, samples: list[dict], tally: Tally, st: dict, drained_s: float,
           problems: list[str], csv_path: Path, end: dict, binary: Path) -> tuple[str, bool]:
    """The Markdown report of the load's samples and of the state after the drain (``end``:
    VmHWM and the index metrics); and whether all passed."""
    rss = [s["rss_kib"] / 1024 for s in samples]
    mid = min(samples, key=lambda s: abs(s["elapsed_s"] - args.seconds / 2))
    start_mib, mid_mib, end_mib = rss[0], mid["rss_kib"] / 1024, rss[-1]
    growth = 100 * (end_mib - mid_mib) / mid_mib
    peak = end["hwm_kib"] / 1024
    lat = [s["status_ms"] for s in samples]
    lat_med, lat_max = statistics.median(lat), max(lat)
    last = samples[-1]
    system = orthanc.get_json("/system")
    dicomweb = orthanc.get_json("/plugins/dicom-web")
    warnings = log_warnings(g)
    ok_growth, ok_peak = growth < TARGET_GROWTH_PCT, peak < TARGET_PEAK_MIB
    ok_status, ok_delivery = lat_max < TARGET_STATUS_MS, not problems
    passed = ok_growth and ok_peak and ok_status and ok_delivery
    seconds = args.seconds
    md = [
        f"# Soak benchmark ({started.isoformat()})",
        "",
        f"Host: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.platform()}; Python "
        f"{platform.python_version()}, pynetdicom {importlib.metadata.version('pynetdicom')}, python-hl7 "
        f"{importlib.metadata.version('hl7')}; Orthanc {system.get('Version')} + DICOMweb {dicomweb.get('Version')}, "
        f"mllp_peer.py, gatewayd and the load all on loopback sharing the cores; load average at start "
        f"{load[0]:.2f}, at end {load[1]:.2f}.",
        f"gatewayd: `{args.gatewayd}` (sha256 {binary_sha256(binary)[:16]}, run from a copy).",
        f"Load for {seconds} s: {args.dicom_associations} DICOM associations of {args.per_connection} C-STOREs each "
        f"(then release and associate again), CT {SIDE}x{SIDE}x16-bit (~128 KiB) with unique SOP Instance UIDs, "
        f"at most {args.dicom_rate:g} objects/s in total; 1 MLLP connection (reconnecting every "
        f"{args.per_connection} messages) with ADT^A08 and ORU^R01 in turn, at most {args.hl7_rate:g} msg/s; "
        f"the uplinks draining to Orthanc (STOW-RS) and mllp_peer.py meanwhile. Sampled every {args.sample:g} s "
        f"({len(samples)} samples): `{csv_path}`.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| RSS growth over the last half < {TARGET_GROWTH_PCT:g} % | {growth:+.1f} % "
        f"({mid_mib:.1f} MiB at {mid['elapsed_s']:.0f} s -> {end_mib:.1f} MiB at {samples[-1]['elapsed_s']:.0f} s) "
        f"| {verdict(ok_growth)} |",
        f"| peak RSS (VmHWM) < {TARGET_PEAK_MIB:g} MiB | {peak:.1f} MiB | {verdict(ok_peak)} |",
        f"| `spool status` < {TARGET_STATUS_MS:g} ms at every sample | median {lat_med:.0f} ms, max {lat_max:.0f} ms "
        f"| {verdict(ok_status)} |",
        f"| every object in Orthanc exactly once, every HL7 message AA/CA and at the EMR once, no failure "
        f"| {len(problems)} problems | {verdict(ok_delivery)} |",
        "",
        f"RSS: start {start_mib:.1f} MiB, middle {mid_mib:.1f} MiB, end {end_mib:.1f} MiB, max sampled "
        f"{max(rss):.1f} MiB, VmHWM at the end {peak:.1f} MiB. Of it anonymous (heap, stacks): "
        f"{samples[0]['rss_anon_kib'] / 1024:.1f} / {mid['rss_anon_kib'] / 1024:.1f} / "
        f"{last['rss_anon_kib'] / 1024:.1f} MiB; file-backed (binary, libraries): "
        f"{samples[0]['rss_file_kib'] / 1024:.1f} / {mid['rss_file_kib'] / 1024:.1f} / "
        f"{last['rss_file_kib'] / 1024:.1f} MiB; threads {samples[0]['threads']} / {mid['threads']} / "
        f"{last['threads']} (start / middle / end).",
        f"Sent: {len(tally.stored)} DICOM objects stored ({len(tally.stored) / seconds:.1f}/s), "
        f"{len(tally.acked)} HL7 messages acknowledged ({len(tally.acked) / seconds:.1f}/s). Queues drained "
        f"{drained_s:.0f} s after the load stopped; spool status then: "
        + ", ".join(f"{d} sent {st['by_destination'][d]['sent']} failed {st['by_destination'][d]['failed']}"
                    for d in (CLOUD, EMR)) + ".",
        f"Spool index (`gateway_spool_index_records` / `gateway_spool_index_bytes`; n/a = this binary has no such "
        f"metric): at the end of the load {fmt(last['index_records'])} records, {fmt(last['index_bytes'])} bytes; "
        f"after the drain {fmt(end['index_records'])} records, {fmt(end['index_bytes'])} bytes.",
        "",
        *([f"Problems ({len(problems)}):", *[f"- {p}" for p in problems[:20]], ""] if problems else []),
        f"gatewayd WARN/ERROR log lines: {sum(warnings.values())}"
        + (", the most frequent:" if warnings else "."),
        *[f"- {n} x `{line[:300]}`" for line, n in warnings.most_common(8)],
        "",
        "gatewayd config:",
        "```toml",
        g.config_path.read_text().strip(),
        "```",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(md) + "\n", passed


def stop_load(stop: threading.Event, threads: list[threading.Thread], timeout: float) -> list[str]:
    """Stops the load threads; the names of those still running after ``timeout`` s."""
    stop.set()
    for t in threads:
        t.join(timeout)
    return [t.name for t in threads if t.is_alive()]


def soak(args, started: datetime.datetime, root: Path, csv_path: Path, binary: Path) -> tuple[str, bool]:
    with contextlib.ExitStack() as cleanup:  # callbacks run last-in first-out, also on errors
        (root / "receipts.lua").write_text(mtls.receipt_lua())
        orthanc = mtls.Orthanc(root / "orthanc", lua_scripts=[root / "receipts.lua"])
        cleanup.callback(orthanc.cleanup)
        cleanup.callback(orthanc.stop)
        orthanc.start()
        peer = Peer(root / "emr", None)
        cleanup.callback(peer.stop)
        peer.start()
        hl7_port = gw.free_port()
        g = gw.Gateway(root / "gw", {
            "spool": dict(kv.split("=", 1) for kv in args.spool),
            "hl7": {"listen": f"127.0.0.1:{hl7_port}"},
            "uplink": [{"name": CLOUD, "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
                       {"name": EMR, "kind": "mllp-tls", "url": f"mllp://127.0.0.1:{peer.port}"}],
        }, name="soak")
        cleanup.callback(g.cleanup)
        cleanup.callback(g.stop)
        g.start()

        tally = Tally()
        stop = threading.Event()
        template = ct_template(root)
        n = args.dicom_associations
        threads = [threading.Thread(target=dicom_sender, daemon=True, name=f"dicom-{k}",
                                    args=(g.dicom_port, template, root / f"object-{k}.dcm", args.dicom_rate / n,
                                          args.per_connection, k, n, tally, stop))
                   for k in range(n)]
        prefix = "SK" + started.strftime("%H%M%S")
        threads.append(threading.Thread(target=hl7_sender, daemon=True, name="hl7",
                                        args=(hl7_port, args.hl7_rate, args.per_connection, prefix, tally, stop)))
        cleanup.callback(stop_load, stop, threads, 5)
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        for t in threads:
            t.start()

        samples: list[dict] = []
        with open(csv_path, "w", newline="") as f:
            out = csv.DictWriter(f, CSV_FIELDS)
            out.writeheader()
            next_sample, next_print = t0, t0
            while next_sample <= t0 + args.seconds:
                time.sleep(max(0.0, next_sample - time.monotonic()))
                if not g.is_running():
                    raise RuntimeError(f"gatewayd exited with {g.proc.returncode}:\n{g.log_tail(30)}")
                s = sample(g, t0, tally)
                samples.append(s)
                out.writerow({k: ("n/a" if v is None else v) for k, v in s.items()})
                f.flush()
                if time.monotonic() >= next_print:
                    print(progress_line(s), flush=True)
                    next_print += 60
                next_sample += args.sample

        stuck = stop_load(stop, threads, JOIN_TIMEOUT_S)
        if stuck:
            tally.failures.append(f"load threads still running {JOIN_TIMEOUT_S}s after the stop: {stuck}")
        load1 = os.getloadavg()[0]
        print(f"load stopped: {len(tally.stored)} objects, {len(tally.acked)} HL7 messages; draining", flush=True)
        st, drained_s = drain(g, args.drain_timeout)
        time.sleep(2)  # a late duplicate would show in the receipts
        problems = check_delivery(tally, orthanc, peer, st, pruned=any(kv.startswith("dedupe_window=") for kv in args.spool))
        metrics = g.metrics()
        end = {"hwm_kib": gw.proc_status(g.pid)["VmHWM"],
               "index_records": metric_or_none(metrics, "gateway_spool_index_records"),
               "index_bytes": metric_or_none(metrics, "gateway_spool_index_bytes")}
        return report(args, shlex.join([sys.executable, *sys.argv]), started, (load0, load1), g, orthanc,
                      samples, tally, st, drained_s, problems, csv_path, end, binary)


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gatewayd", default=os.environ.get("GATEWAYD", str(REPO / "target/release/gatewayd")))
    ap.add_argument("--seconds", type=int, default=3600, help="load duration (default 3600)")
    ap.add_argument("--sample", type=float, default=10, help="seconds between samples (default 10)")
    ap.add_argument("--dicom-rate", type=float, default=20, help="objects/s cap over all associations (default 20)")
    ap.add_argument("--hl7-rate", type=float, default=20, help="messages/s cap (default 20)")
    ap.add_argument("--dicom-associations", type=int, default=2)
    ap.add_argument("--per-connection", type=int, default=100,
                    help="C-STOREs per association and HL7 messages per MLLP connection (default 100)")
    ap.add_argument("--drain-timeout", type=float, default=600)
    ap.add_argument("--out", default=str(HERE / "last-soak.md"))
    ap.add_argument("--spool", action="append", default=[], metavar="KEY=VALUE",
                    help="a [spool] key for gatewayd, e.g. dedupe_window=10m (default: the config's defaults)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spool, Orthanc storage)")
    args = ap.parse_args()

    if not os.access(args.gatewayd, os.X_OK):
        print(f"{args.gatewayd} is not executable: cargo build --release -p gatewayd", file=sys.stderr)
        return 2
    mtls.orthanc_binary()
    free_gb = shutil.disk_usage("/var/tmp").free / 1e9
    need_gb = args.dicom_rate * args.seconds * (SIDE * SIDE * 2) * 1.2 / 1e9  # Orthanc keeps every object
    if free_gb < need_gb + 2:
        print(f"/var/tmp has {free_gb:.1f} GB free; Orthanc's storage may need {need_gb:.1f} GB", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupted)  # unwinds like Ctrl-C: every server is stopped

    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    csv_path = Path(f"/tmp/soak-{started.strftime('%Y%m%dT%H%M%SZ')}.csv")
    root = Path(tempfile.mkdtemp(prefix="soak-bench-", dir="/var/tmp"))
    try:
        binary = root / "gatewayd"
        shutil.copy2(args.gatewayd, binary)
        os.environ["GATEWAYD"] = str(binary)
        text, passed = soak(args, started, root, csv_path, binary)
        print(text)
        Path(args.out).write_text(text)
        return 0 if passed else 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}): every server stopped, no report; samples so far in {csv_path}",
              file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
