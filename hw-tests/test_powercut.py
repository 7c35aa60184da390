"""Power cuts in QEMU during mixed DICOM + HL7 ingest: nothing acknowledged is lost.

Pins DESIGN.md's rule "a success status (DICOM 0000, HL7 AA) is sent only after the object is
sealed, fsync'd and indexed" against what `kill -9` cannot show (ADR 0005): the appliance image
boots in QEMU with its vTPM (swtpm) and a state partition seeded with a config that enables
`[hl7]` (0.0.0.0:2575) next to DICOM; the host ingests over both at once and QEMU is SIGKILLed
at a random moment, CUTS (10) times, each on a new boot of the same state disk and TPM state.

Ingest, per boot: one DCMTK `storescu -v` after another, each with a batch of 6 new distinct CT
objects (1 in 5 of 512x512, the rest 16x16), and two MLLP connections each sending ADT^A08
messages with distinct MSH-10s one after another (at most 50 a second each). Acknowledgements
are recorded per object (`storescu -v` prints "Sending file: F" and then "Received Store
Response (Success)" for each 0000) and per message (MSA-1 AA with MSA-2 = its MSH-10). An ack
that reaches the host after the kill was sent by the guest before it (QEMU's user network died
with it), so every ack recorded counts. What was sent but not acknowledged is sent again after
the reboot, as a modality or an EMR would (so resends after a cut must not duplicate).

The cut: `Vm.kill()` (SIGKILL to QEMU) 0.3-4 s after ingest started (seeded RNG: the seed is
printed; replay with HWTESTS_SEED=<seed>).

Disk cache mode: the state disk runs with QEMU `cache=none` (O_DIRECT: each write the guest
submits goes to the host file past the host's page cache, and the guest's flushes, e.g. from
fdatasync, become fdatasync on the host), the mode closest to a disk with a write cache that
honours FLUSH. Killing QEMU does not drop the host's page cache, so what this proves is the
guest side: whatever the guest kernel had not yet written to its disk (its page cache, ext4's
uncommitted journal, sled's unsynced log) is lost, as in a power cut; writes the guest had
already submitted survive, which a real disk without power might still lose from its own
cache (that part rests on the device honouring FLUSH).

How the spool is read after each cut (option (b)): with QEMU stopped, on the host, from the
disk exactly as the cut left it: `appliance.read_state` copies the state image, runs `e2fsck
-f -p` on the copy as the guest's systemd-fsck would at boot (journal replayed, nothing it
cannot repair by itself) and copies the files out with `debugfs rdump` (no mount); the TPM
state folder is copied too and served by a host swtpm. The same `gatewayd` binary then, with a host config whose key store is
that TPM (`tcti = "swtpm:host=127.0.0.1,port=P"`; the guest's config says /dev/tpmrm0):
1. `spool verify --json` on the disk as it was at the cut, before any recovery: no dangling
   index entry and no unseal failure (the orphan blobs and partial files the cut left are
   counted and printed: leftovers of ingest in flight, whose senders got no success);
2. `gatewayd run` on it (which recovers, as the box does at boot), then `spool verify --json`
   exits 0 with no orphan blob, dangling entry, unseal failure or partial file, and counts
   between the number of distinct objects + messages acknowledged so far and the number sent;
3. every object and message acknowledged since the first boot exports (`spool export`)
   byte-identical: the DICOM data set equals the bytes of the file sent, the HL7 message its
   bytes as sent.
Reading in the guest (a probe mode printing exports on the serial console) would read the
disk only after the box's own recovery, through a slow TCG guest; on the host each check
reads exactly what was on the disk at the cut, and it runs on the copies while the box boots
again.

After each cut the box boots again on the same state disk and TPM state without a manual step:
`echoscu` answers, the probe unit's first `spool status` counts exactly what the host found
after recovery, a new HL7 message gets AA (it must survive the later cuts too) and ingest
resumes. After the last cut a final boot checks the same. Bounded: 11 boots of 20-50 s each on
this 2-core machine with TCG, 5.5-8 minutes in all, under the 12 minutes the test allows
itself (plus the image build, once per run by the `appliance_image` fixture, or taken from
hw-tests/.cache).

Seen to fail when durability breaks (gatewayd rebuilt with one fsync removed, the image's binary
swapped, HWTESTS_SEED=7): without the journal's fdatasync before AA, cut 1 found 147 index
entries whose journal bytes were gone; without ADR 0005's fdatasync of sled's log, cut 7 found
one object fewer than acknowledged (an earlier, unpaced version: cut 3, an acknowledged DICOM
object missing).

The seeded config's `[[hl7.peers]]` allows 10.0.2.2 only (QEMU's user-networking gateway, the
address the host's senders arrive from), as production requires of a plain MLLP listener.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

import data
import gw
import hl7msg
import scu
import tpm
from appliance import BUILD_TIMEOUT_S, RECIPE, Vm, fresh_state, read_state

CUTS = 10
CACHE_MODE = "none"
CUT_AFTER_S = (0.3, 4.0)
HL7_PORT = 2575
HL7_SENDERS = 2
# Messages per second and connection at most (an EMR's busy hour is far below): unpaced, the
# box takes ~300/s here and the export of every acknowledged message after every cut, not the
# boots, would decide how long the test takes.
HL7_RATE = 50
DICOM_BATCH = 6
CT_EVERY = 5  # one object in CT_EVERY is 512x512 (~0.5 MB), the others 16x16
STOP_GRACE_S = 10  # a sender that loses its peer waits this long for the test to say "that was the cut"
JOIN_TIMEOUT_S = 90
SERVE_TIMEOUT_S = 60
TEST_TIMEOUT_S = 12 * 60
# The image's factory config with the HL7 listener added (the unit runs the copy on the state partition).
# Production refuses a plain MLLP listener without [[hl7.peers]]: the host's senders reach the
# guest through QEMU's user networking, from its gateway 10.0.2.2, the only address allowed.
SEEDED_CONFIG = ((RECIPE / "files" / "gatewayd.toml").read_text() + '\n[hl7]\nlisten = "0.0.0.0:2575"\n'
                 + '\n[[hl7.peers]]\nhost = "10.0.2.2"\n')
STORESCU_OPTS = ["-v", "-nh", "-to", "10", "-ta", "20", "-td", "60"]


@dataclass
class Ledger:
    """Everything sent and acknowledged since the first boot, and what is still to resend."""

    objects: dict[str, data.SyntheticFile] = field(default_factory=dict)  # SOP Instance UID -> file sent
    messages: dict[str, hl7msg.Msg] = field(default_factory=dict)  # export key -> message sent
    acked: dict[str, int] = field(default_factory=dict)  # uid or export key -> boot whose ingest got 0000/AA
    resend_objects: list[data.SyntheticFile] = field(default_factory=list)
    resend_messages: list[list[hl7msg.Msg]] = field(default_factory=lambda: [[] for _ in range(HL7_SENDERS)])

    def sent_count(self) -> int:
        return len(self.objects) + len(self.messages)

    def at_cut(self) -> "Ledger":
        """A copy of what was sent and acknowledged up to now, for the check of this cut."""
        return Ledger(dict(self.objects), dict(self.messages), dict(self.acked))


class ObjectFactory:
    """New distinct CT objects on demand (one study, one series, a fake patient each)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.study, self.series = generate_uid(), generate_uid()
        self.n = 0
        self.lock = threading.Lock()

    def make(self) -> data.SyntheticFile:
        with self.lock:
            i, self.n = self.n, self.n + 1
        kind = "ct" if i % CT_EVERY == 0 else "small"
        return data.make_ct_file(self.folder / f"pc-{i:06d}.dcm", i, kind, self.study, self.series)


class Sender(threading.Thread):
    """One ingest stream of one boot. Stops at the cut: it loses its peer and `stop` is set
    within STOP_GRACE_S; losing the peer while the box is up is an error."""

    def __init__(self, name: str, stop: threading.Event):
        super().__init__(daemon=True, name=name)
        self.stop = stop
        self.acked: list = []  # items that got 0000 / AA
        self.unacked: list = []  # items handed to the peer (or queued) without 0000 / AA: resent next boot
        self.in_flight = 0  # items whose answer the cut cut off
        self.refused: list[str] = []  # answers other than success (none expected)
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def _lost_peer(self, what: str) -> None:
        """The peer is gone: fine if this is the cut, an error otherwise."""
        if not self.stop.wait(STOP_GRACE_S):
            self.error = f"{what} while the box was up (no power cut within {STOP_GRACE_S} s)"

    def _run(self) -> None:
        raise NotImplementedError


class DicomSender(Sender):
    """`storescu -v` runs, DICOM_BATCH objects each: resends first, then new objects."""

    def __init__(self, port: int, ledger: Ledger, factory: ObjectFactory, stop: threading.Event):
        super().__init__("storescu-sender", stop)
        self.port, self.ledger, self.factory = port, ledger, factory
        self.queue = list(ledger.resend_objects)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self.queue[:DICOM_BATCH]
                del self.queue[:DICOM_BATCH]
                batch += [self.factory.make() for _ in range(DICOM_BATCH - len(batch))]
                for f in batch:
                    self.ledger.objects[f.sop_instance_uid] = f
                proc = subprocess.Popen(
                    scu.storescu_cmd(self.port, [f.path for f in batch], extra=STORESCU_OPTS),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    env=scu.dcmtk_env())
                try:
                    _, log = proc.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, log = proc.communicate(timeout=10)
                ok, answered = parse_storescu(log)
                for f in batch:
                    if str(f.path) in ok:
                        self.acked.append(f)
                    else:
                        self.unacked.append(f)
                        if str(f.path) in answered:
                            self.refused.append(f"{f.sop_instance_uid}: {answered[str(f.path)]}")
                if proc.returncode != 0 or len(ok) < len(batch):
                    self.in_flight += sum(1 for f in batch if str(f.path) not in answered)
                    tail = "\n".join(log.splitlines()[-8:])
                    self._lost_peer(f"storescu exited {proc.returncode} ({len(ok)}/{len(batch)} stored):\n{tail}")
                    return
        finally:
            self.unacked.extend(self.queue)


def parse_storescu(log: str) -> tuple[set[str], dict[str, str]]:
    """From `storescu -v`'s log: the files answered 0000 ("Received Store Response (Success)"
    after "Sending file: F"), and every file answered at all with its answer."""
    ok: set[str] = set()
    answered: dict[str, str] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Sending file: (.+?)\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Received Store Response \((.*)\)\s*$", line)
        if m and current is not None:
            answered[current] = m.group(1)
            if m.group(1) == "Success":
                ok.add(current)
            current = None
    return ok, answered


class Hl7Sender(Sender):
    """One MLLP connection: a message, wait for its answer, the next one."""

    def __init__(self, port: int, index: int, ledger: Ledger, boot: int, stop: threading.Event):
        super().__init__(f"mllp-sender-{index}", stop)
        self.port, self.index, self.ledger, self.boot = port, index, ledger, boot
        self.queue = list(ledger.resend_messages[index])
        self.n = 0

    def _next(self) -> hl7msg.Msg:
        if self.queue:
            return self.queue.pop(0)
        self.n += 1
        control_id = f"PC{self.index}B{self.boot:02d}N{self.n:05d}"
        return hl7msg.adt_a08(control_id, patient_id=f"ZZPID{self.index}{self.boot:02d}{self.n:05d}")

    def _run(self) -> None:
        conn = None
        try:
            try:
                conn = hl7msg.MllpConnection(self.port, timeout=10)
            except OSError as e:
                self._lost_peer(f"MLLP connect failed ({e})")
                return
            t0 = time.monotonic()
            for k in itertools.count():
                if self.stop.wait(max(0.0, t0 + k / HL7_RATE - time.monotonic())):
                    break
                msg = self._next()
                self.ledger.messages[msg.key] = msg
                try:
                    conn.send(msg.bytes)
                    ack = conn.recv_frame(timeout=30)
                except (OSError, AssertionError) as e:
                    ack, err = None, e
                else:
                    err = None
                if ack is None:
                    self.unacked.append(msg)
                    self.in_flight += 1
                    self._lost_peer(f"MLLP connection lost waiting for the answer to {msg.control_id} ({err or 'closed'})")
                    return
                code, control_id = hl7msg.msa(ack)
                if code == "AA" and control_id == msg.control_id:
                    self.acked.append(msg)
                else:
                    self.unacked.append(msg)
                    self.refused.append(f"{msg.control_id}: MSA {code}|{control_id}")
        finally:
            self.unacked.extend(self.queue)
            if conn is not None:
                conn.close()


def serve_check(vm: Vm, boot: int, ledger: Ledger) -> None:
    """The box serves again: `echoscu` already answered (wait_dicom); a new message gets AA."""
    msg = hl7msg.adt_a08(f"PCUP{boot:02d}")
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        vm.alive()
        try:
            with hl7msg.MllpConnection(vm.host_port(HL7_PORT), timeout=10) as c:
                ack = c.request(msg.bytes, timeout=30)
            code, control_id = hl7msg.msa(ack)
            assert (code, control_id) == ("AA", msg.control_id), (
                f"boot {boot}: {msg.control_id} got MSA {code}|{control_id}, not AA\n{vm.tail()}")
            ledger.messages[msg.key] = msg
            ledger.acked[msg.key] = boot
            return
        except (OSError, AssertionError) as e:
            if isinstance(e, AssertionError) and "not AA" in str(e):
                raise
            last = e
            time.sleep(1)
    raise AssertionError(f"boot {boot}: no AA from the HL7 listener (127.0.0.1:{vm.host_port(HL7_PORT)}) within "
                         f"{SERVE_TIMEOUT_S} s after DICOM answered (last: {last!r})\n{vm.tail()}")


def snapshot(state_img: Path, tpm_dir: Path, work: Path) -> None:
    """Right after the cut, before the next boot writes to them: the state disk's files (as
    the guest's kernel would find them at mount) and a copy of the TPM state."""
    read_state(state_img, work / "data")
    shutil.copytree(tpm_dir, work / "tpm")


def check_cut(cut: int, work: Path, ledger: Ledger, vm: Vm) -> dict:
    """The disk as the cut left it, read on the host (see the module docstring) from
    `snapshot`'s copy. Returns {"objects": after recovery, "orphans", "partials": left by the
    cut, "seconds"}."""
    t0 = time.monotonic()
    where = f"cut {cut}"
    swtpm = tpm.Swtpm(work / "tpm", f"swtpm-{where}")
    g = None
    try:
        swtpm.start()
        g = gw.Gateway(work, {
            "node": {"id": "appliance-vm", "role": "clinic", "mode": "production"},
            "dicom": None,
            "spool": {"max_bytes": "1GiB", "min_free_bytes": "16MiB"},
            "keystore": {"backend": "tpm", "tcti": swtpm.tcti, "allow_software_tpm": True},
        }, name=where)
        # 1. As the cut left it, before recovery: nothing indexed without its blob, nothing unreadable.
        rc, raw, r = g.verify()
        assert raw is not None, (f"{where}: `spool verify --json` on the disk at the cut printed no JSON "
                                 f"(exit {rc}): {r.stdout!r} {r.stderr[-2000:]}")
        assert raw.get("dangling_entries") == 0 and raw.get("unseal_failures") == 0, (
            f"{where}: on the disk as the cut left it, `spool verify` finds index entries without a readable "
            f"blob: {raw}\n{r.stderr[-3000:]}\n{vm.tail()}")
        # 2. Recovered as the box recovers at boot, then clean.
        g.start()
        rc, doc, r = g.verify()
        assert doc is not None, f"{where}: `spool verify --json` printed no JSON (exit {rc}): {r.stdout!r} {r.stderr!r}"
        problems = {k: doc.get(k) for k in ("orphan_blobs", "dangling_entries", "unseal_failures", "partial_files")}
        assert problems == dict.fromkeys(problems, 0) and rc == 0, (
            f"{where}: `spool verify` after recovery exited {rc}: {doc}\n{g.log_tail(30)}\n{vm.tail()}")
        acked, sent = len(ledger.acked), ledger.sent_count()
        assert acked <= doc["objects"] <= sent, (
            f"{where}: the spool holds {doc['objects']} objects, but {acked} distinct objects and messages were "
            f"acknowledged and {sent} sent (fewer: loss; more: duplicates from resends)\n{vm.tail()}")
        # 3. Every acknowledged object and message, byte for byte.
        out = work / "out"
        out.mkdir()
        bad = []
        for n, (key, boot) in enumerate(sorted(ledger.acked.items())):
            dest = out / f"{n}.out"
            if key in ledger.objects:
                f = ledger.objects[key]
                r = g.export(key, dest, check=False)
                what = f"object {key} ({f.size_kind}, acknowledged during boot {boot})"
                want = data.dataset_bytes(f.path)
                got = data.split_part10(dest.read_bytes())[1] if r.returncode == 0 and dest.is_file() else None
            else:
                msg = ledger.messages[key]
                r = g.cli("spool", "export", "--config", str(g.config_path), "--hl7-message", key, "--out", str(dest))
                what = f"message {msg.control_id} (acknowledged during boot {boot})"
                want = msg.bytes
                got = dest.read_bytes() if r.returncode == 0 and dest.is_file() else None
            if got is None:
                bad.append(f"{what}: `spool export` exited {r.returncode}: {r.stderr.strip()[-300:]}")
            elif got != want:
                bad.append(f"{what}: exported {len(got)} bytes that differ from the {len(want)} sent")
            dest.unlink(missing_ok=True)
        assert not bad, (f"{where}: {len(bad)} of {len(ledger.acked)} acknowledged objects/messages lost or changed:\n"
                         + "\n".join(bad[:20]) + f"\n{vm.tail()}")
        assert g.stop() == 0, f"{where}: the host gatewayd on the cut's disk did not stop cleanly\n{g.log_tail()}"
        return {"objects": doc["objects"], "orphans": raw.get("orphan_blobs", 0),
                "partials": raw.get("partial_files", 0), "seconds": time.monotonic() - t0}
    finally:
        if g is not None:
            g.cleanup()
        swtpm.stop()
        swtpm.cleanup()


class CutCheck(threading.Thread):
    """`check_cut` while the box boots again (the host check reads copies, the box its disk)."""

    def __init__(self, cut: int, work: Path, ledger: Ledger, vm: Vm):
        super().__init__(daemon=True, name=f"check-cut-{cut}")
        self.args = (cut, work, ledger, vm)
        self.result: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = check_cut(*self.args)
            shutil.rmtree(self.args[1])
        except BaseException as e:  # re-raised by the test
            self.error = e

    def outcome(self) -> dict:
        self.join(JOIN_TIMEOUT_S + 300)
        assert not self.is_alive(), f"the host check of cut {self.args[0]} did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.mark.timeout(BUILD_TIMEOUT_S + TEST_TIMEOUT_S)
def test_power_cuts_during_dicom_and_hl7_ingest_lose_nothing_acknowledged(appliance_image, tmp_path, vms):
    seed = int(os.environ.get("HWTESTS_SEED", str(int(time.time()))))
    print(f"power-cut test seed: HWTESTS_SEED={seed}; state disk cache={CACHE_MODE}")
    rng = random.Random(seed)
    t_start = time.monotonic()
    state_img = fresh_state(appliance_image, tmp_path / "state.img", {"config/gatewayd.toml": SEEDED_CONFIG.encode()})
    tpm_dir = tmp_path / "tpm"
    tpm_dir.mkdir()
    factory = ObjectFactory(tmp_path / "dcm")
    ledger = Ledger()
    expected_objects = 0  # what the host found after recovery at the previous cut (a fresh box: 0)
    history: list[str] = []
    cuts_with_leftovers = 0
    checked = ledger

    pending: CutCheck | None = None  # the host check of the previous cut, running while the box boots
    try:
        for boot in range(1, CUTS + 2):
            vm = Vm(appliance_image, tmp_path, state_img, tpm_dir, f"boot{boot:02d}", forwards=(HL7_PORT,),
                    state_cache=CACHE_MODE)
            vms.append(vm)
            vm.start()
            ready_s = vm.wait_dicom()
            if pending is not None:
                found = pending.outcome()
                pending = None
                expected_objects = found["objects"]
                cuts_with_leftovers += bool(found["orphans"] or found["partials"])
                history[-1] += (f"; the disk at the cut held {found['orphans']} orphan blobs + {found['partials']} "
                                f"partial files; after recovery {found['objects']} objects, all {len(checked.acked)} "
                                f"acknowledged so far export byte-identical (host check {found['seconds']:.0f} s)")
                print(history[-1])
            # The box recovered by itself and counts what the host found on the disk at the cut.
            st = vm.spool_status_with(lambda s: "objects" in s)
            assert st["objects"] == expected_objects, (
                f"boot {boot}: the box's `spool status` counts {st['objects']} objects after the cut, the host found "
                f"{expected_objects} on the same disk (seed {seed})\n" + "\n".join(history) + f"\n{vm.tail()}")
            serve_check(vm, boot, ledger)
            if boot == CUTS + 1:
                history.append(f"boot {boot}: DICOM after {ready_s:.0f} s, {st['objects']} objects, serves again (echo, AA)")
                print(history[-1])
                break

            stop = threading.Event()
            senders: list[Sender] = [DicomSender(vm.dicom_port, ledger, factory, stop)]
            senders += [Hl7Sender(vm.host_port(HL7_PORT), i, ledger, boot, stop) for i in range(HL7_SENDERS)]
            for s in senders:
                s.start()
            delay = rng.uniform(*CUT_AFTER_S)
            time.sleep(delay)
            busy = [s.name for s in senders if s.is_alive()]
            vm.kill()  # the power cut
            stop.set()
            for s in senders:
                s.join(JOIN_TIMEOUT_S)
            assert not any(s.is_alive() for s in senders), f"boot {boot}: a sender did not stop after the cut"
            errors = [f"{s.name}: {s.error}" for s in senders if s.error] + [
                f"{s.name}: {x}" for s in senders for x in s.refused]
            assert not errors, f"boot {boot} (seed {seed}): ingest failed before the cut:\n" + "\n".join(errors) + f"\n{vm.tail()}"
            assert len(busy) == len(senders), f"boot {boot}: senders {busy} were the only ones still sending at the cut"
            for s in senders:
                for item in s.acked:
                    ledger.acked[item.sop_instance_uid if isinstance(item, data.SyntheticFile) else item.key] = boot
            ledger.resend_objects = senders[0].unacked
            ledger.resend_messages = [s.unacked for s in senders[1:]]
            history.append(
                f"cut {boot}/{CUTS} after {delay:.2f} s of ingest (DICOM answered {ready_s:.0f} s after power-on): "
                f"acknowledged {len(senders[0].acked)} objects + {sum(len(s.acked) for s in senders[1:])} messages; "
                f"unanswered at the cut {senders[0].in_flight} objects + {sum(s.in_flight for s in senders[1:])} messages")

            work = tmp_path / f"cut{boot:02d}"
            snapshot(state_img, tpm_dir, work)
            checked = ledger.at_cut()
            pending = CutCheck(boot, work, checked, vm)
            pending.start()
    finally:
        if pending is not None:  # failed during a boot: let the check stop its swtpm and gatewayd
            pending.join(JOIN_TIMEOUT_S + 300)

    total_s = time.monotonic() - t_start
    print(f"{CUTS} power cuts, {len(ledger.acked)} acknowledged ({sum(k in ledger.objects for k in ledger.acked)} "
          f"DICOM objects, {sum(k in ledger.messages for k in ledger.acked)} HL7 messages), "
          f"{cuts_with_leftovers} cuts left partial files or orphan blobs, {total_s:.0f} s")
    assert sum(k in ledger.objects for k in ledger.acked) >= CUTS and sum(
        k in ledger.messages for k in ledger.acked) >= CUTS, "too little was ingested to prove anything"
    assert total_s < TEST_TIMEOUT_S, f"the test took {total_s:.0f} s, more than its {TEST_TIMEOUT_S} s bound"
