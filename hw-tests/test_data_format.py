"""The data format version of the data folder (`<data_dir>/FORMAT`) at `gatewayd run`.

Pins issue 21's rule "the data format version is checked so a newer firmware can migrate
and an older one refuses a newer format": a real gatewayd writes `FORMAT` (the number 1) on
the first start of a new data folder, starts again on it unchanged, and refuses a folder
whose `FORMAT` says 2 (a newer firmware wrote it; this box then rolled back) with a clear
message naming the file and the numbers, a non-zero exit, and without touching anything
under the data folder: every file keeps its bytes and its modification time, none is added
or removed. Back on format 1 the same spool opens and verifies with every object.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import data
import scu

START_REFUSAL_TIMEOUT_S = 20.0


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: relative path -> (sha256, mtime in ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def wait_exit(g, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = g.proc.poll()
        if rc is not None:
            return rc
        time.sleep(0.1)
    raise AssertionError(
        f"gatewayd did not exit within {timeout}s on a newer data format\nlog tail:\n{g.log_tail()}"
    )


def test_format_is_written_on_first_start_kept_and_a_newer_one_is_refused_untouched(gateway_factory, tmp_path):
    g = gateway_factory(start=False)
    fmt = g.data_dir / "FORMAT"
    assert not g.data_dir.exists(), "the data folder must be new for this test"

    # First start of a new data folder: FORMAT is written, before the spool serves.
    g.start()
    assert fmt.is_file(), f"no {fmt} after the first start\n{g.log_tail()}"
    assert fmt.read_text() == "1\n", f"FORMAT says {fmt.read_text()!r}"
    files = data.make_ct_set(3, tmp_path / "in", "small")
    statuses = scu.store_files(g.dicom_port, [f.path for f in files])
    assert all(s == 0x0000 for s in statuses.values()), statuses
    assert g.stop() == 0

    # Second start on the same folder: same format, nothing rewritten.
    written = fmt.stat().st_mtime_ns
    g.start()
    assert fmt.read_text() == "1\n"
    assert fmt.stat().st_mtime_ns == written, "FORMAT was rewritten on a start that found it"
    assert g.status()["objects"] == 3
    assert g.stop() == 0

    # A newer firmware's format: refused, nothing under the data folder touched.
    fmt.write_text("2\n")
    before = snapshot(g.data_dir)
    assert any(k.startswith("spool") or "/" in k for k in before), f"no spool files to watch: {sorted(before)}"
    log_start = len(g.log_text())
    g.start(wait=False)
    rc = wait_exit(g, START_REFUSAL_TIMEOUT_S)
    log = g.log_text()[log_start:]
    assert rc == 1, f"gatewayd exited {rc} on a newer data format (start-up refusals exit 1)\n{log}"
    assert f"{fmt} says data format 2, newer than this firmware's 1" in log, (
        f"no clear refusal naming the file and both formats in the log:\n{log}"
    )
    after = snapshot(g.data_dir)
    assert after == before, (
        "the refused start touched the data folder: "
        f"added {sorted(set(after) - set(before))}, removed {sorted(set(before) - set(after))}, "
        f"changed {sorted(k for k in before if k in after and before[k] != after[k])}"
    )
    assert fmt.read_text() == "2\n", "the refused start rewrote FORMAT"

    # Back on format 1 (the firmware that wrote it): every object is still there and verifies.
    fmt.write_text("1\n")
    rc, doc, r = g.verify()
    assert rc == 0 and doc is not None, f"spool verify exited {rc}: {r.stdout}\n{r.stderr}"
    g.start()
    assert g.status()["objects"] == 3
    assert g.stop() == 0
