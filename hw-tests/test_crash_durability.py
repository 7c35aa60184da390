"""kill -9 at random moments while a modality is sending: nothing acknowledged is lost.

Pins DESIGN.md's rule "a success status is sent only after the object is
sealed, fsync'd and indexed; a process killed at any instant after that loses
nothing", and that resends after a crash do not duplicate.

Sender threads store a 210-file mixed set (150 CT-sized and 50 small objects, which
the spool journals, and 10 of ~4.5 MB, which stream to blob files) one file per
C-STORE over pynetdicom associations, split across three senders at once (so that kills
also land while several associations share one journal frame: the group commit), and
records every SOP Instance UID answered 0x0000.
gatewayd is SIGKILLed 3 times, each 0.3-3 s after it became ready (seeded:
set HWTESTS_SEED to replay; the seed is printed). Each sender sees the abort,
reconnects once the daemon is back and resends the file whose answer it did not
get. Finally: clean stop, `spool verify` reports no problem, the count equals
the distinct objects sent, and every acknowledged object exports to the bytes
that were sent.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pydicom

import data
import scu

N_CT, N_SMALL, N_LARGE = 150, 50, 10
SENDERS = 3
KILLS = 3
SENDER_DEADLINE_S = 400


class Sender(threading.Thread):
    def __init__(self, port: int, files: list[data.SyntheticFile], lock: threading.Lock, n: int):
        super().__init__(daemon=True, name=f"c-store-sender-{n}")
        self.port = port
        self.files = files
        # Shared by every sender: the test holds it across a kill and its snapshot.
        self.lock = lock
        self.acked: dict[str, data.SyntheticFile] = {}
        self.aborts = 0
        self.failed_connects = 0
        self.other_statuses: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.done.set()

    def _run(self) -> None:
        contexts = scu.contexts_for_files([self.files[0].path])  # all are CT, Explicit VR LE
        deadline = time.monotonic() + SENDER_DEADLINE_S
        i, assoc = 0, None
        while i < len(self.files):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sender gave up after {SENDER_DEADLINE_S}s at file {i}/{len(self.files)}")
            if assoc is None or not assoc.is_established:
                assoc = scu.associate(self.port, contexts)
                if not assoc.is_established:
                    self.failed_connects += 1
                    assoc = None
                    time.sleep(0.1)
                    continue
            f = self.files[i]
            try:
                status = scu.c_store(assoc, f.path)
            except Exception:  # socket errors surface here on some paths
                status = None
            if status == 0x0000:
                with self.lock:
                    self.acked[f.sop_instance_uid] = f
                i += 1
            elif status is None:
                self.aborts += 1
                try:
                    assoc.abort()
                except Exception:
                    pass
                assoc = None
            else:
                self.other_statuses.append((f.sop_instance_uid, status))
                if len(self.other_statuses) > 50:
                    raise AssertionError(f"too many non-success statuses: {self.other_statuses[-5:]}")
                time.sleep(0.2)
        if assoc is not None and assoc.is_established:
            assoc.release()


def test_kill9_during_ingest_loses_no_acknowledged_object(gateway_factory, tmp_path):
    seed = int(os.environ.get("HWTESTS_SEED", str(int(time.time()))))
    print(f"crash test seed: HWTESTS_SEED={seed}")
    rng = random.Random(seed)
    files = data.make_mixed_set(N_CT, N_SMALL, tmp_path / "in", seed=seed)
    files += data.make_ct_set(N_LARGE, tmp_path / "in", "large", start=N_CT + N_SMALL)
    rng.shuffle(files)

    g = gateway_factory()
    lock = threading.Lock()
    senders = [Sender(g.dicom_port, files[n::SENDERS], lock, n) for n in range(SENDERS)]
    for sender in senders:
        sender.start()

    def acked() -> dict[str, data.SyntheticFile]:
        return {uid: f for sender in senders for uid, f in sender.acked.items()}

    history = []
    for k in range(KILLS):
        delay = rng.uniform(0.3, 3.0)
        time.sleep(delay)
        with lock:  # no ack is recorded between the kill and the snapshot
            g.kill9()
            acked_before = acked()
        history.append(f"kill #{k + 1} after {delay:.2f}s: {len(acked_before)} acknowledged so far")
        print(history[-1])
        g.start()
        st = g.status()
        assert st["objects"] >= len(acked_before), (
            f"after kill #{k + 1}: spool has {st['objects']} objects but {len(acked_before)} were acknowledged\n"
            + "\n".join(history)
        )

    for sender in senders:
        assert sender.done.wait(SENDER_DEADLINE_S), f"{sender.name} did not finish"
        assert sender.error is None, f"{sender.name} failed: {sender.error!r}\n" + "\n".join(history)
        print(f"{sender.name}: {len(sender.acked)} acked, {sender.aborts} aborts seen, "
              f"{sender.failed_connects} refused connects, other statuses {sender.other_statuses[:10]}")
    assert len(acked()) == len(files)

    assert g.stop() == 0, f"clean stop after the crashes did not exit 0\n{g.log_tail()}"

    rc, doc, r = g.verify()
    assert doc is not None, f"`spool verify --json` printed no JSON: {r.stdout!r} {r.stderr!r}"
    for key in ("objects", "orphan_blobs", "dangling_entries", "unseal_failures"):
        assert key in doc, f"`spool verify` JSON lacks {key!r}: {doc}"
    problems = {k: doc[k] for k in ("orphan_blobs", "dangling_entries", "unseal_failures")}
    assert problems == {"orphan_blobs": 0, "dangling_entries": 0, "unseal_failures": 0}, doc
    assert rc == 0, f"`spool verify` exited {rc} with {doc}"
    assert doc["objects"] == len(files), f"expected {len(files)} distinct objects, verify says {doc}"
    if "ok" in doc:
        assert doc["ok"] == doc["objects"], doc

    st = g.status()
    assert st["objects"] == len(files), st

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mismatches = []
    for uid, f in sorted(acked().items()):
        out = out_dir / f"{uid}.dcm"
        g.export(uid, out)
        if data.split_part10(out.read_bytes())[1] != data.dataset_bytes(f.path):
            mismatches.append(uid)
        elif pydicom.dcmread(out) != pydicom.dcmread(f.path):
            mismatches.append(uid)
    assert not mismatches, f"{len(mismatches)} exported objects differ from what was sent: {mismatches[:5]}"
