"""pynetdicom as the modality: every transfer syntax family is stored and comes
back out of the sealed spool exactly as received.

Pins: C-STORE status 0x0000 for Explicit/Implicit VR Little Endian, Explicit
VR Big Endian, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 (lossless
and lossy), RLE, Deflated and multi-frame objects; `spool export` gives back a
Part 10 file with the original transfer syntax whose dataset bytes are the
bytes sent; resending an object is 0x0000 and does not add a second copy.

The files are sent "as is" (pynetdicom streams the bytes after the file meta),
so the byte comparison is against exactly what went over the wire. Several of
pydicom's test files share a SOP Instance UID (the MR_small_* family, the
SC_rgb_rle_* family): the selection below uses one file per SOP Instance UID
so that dedupe by UID cannot interfere, and the test asserts that. Not in
the selection: files whose file meta names another SOP Instance UID than
their dataset (rtdose.dcm, rtplan.dcm; sent as is, the C-STORE command and
the dataset disagree, which a receiver must refuse, pinned below), and
rtdose_rle.dcm, which DCMTK's storescp calls a bad DICOM file.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

import data
import gw
import scu

# file name -> what it covers
SELECTION = {
    "CT_small.dcm": "Explicit VR Little Endian",
    "SC_rgb_jpeg_dcmd.dcm": "Implicit VR Little Endian (~200 KB RGB)",
    "SC_rgb_small_odd.dcm": "Explicit VR Little Endian, odd rows/columns (padded pixel data)",
    "ExplVR_BigEnd.dcm": "Explicit VR Big Endian (retired)",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG Baseline (Process 1)",
    "JPEG-lossy.dcm": "JPEG Extended (Process 2 & 4)",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG Lossless (Process 14)",
    "JPEGLSNearLossless_16.dcm": "JPEG-LS near-lossless",
    "GDCMJ2K_TextGBR.dcm": "JPEG 2000 lossless",
    "693_J2KI.dcm": "JPEG 2000",
    "MR_small_RLE.dcm": "RLE Lossless",
    "image_dfl.dcm": "Deflated Explicit VR Little Endian",
    "examples_ybr_color.dcm": "JPEG Baseline, multi-frame (30 frames)",
    "test-SR.dcm": "Explicit VR Little Endian, structured report (no pixels)",
}

EXPECTED_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.5": "RLE",
}


def _wire_ready(name: str, folder: Path) -> Path:
    """The file to send for ``name``. pydicom's image_dfl.dcm has an odd-length
    deflated stream; DICOM wants even-length values and PDV fragments (DCMTK's
    storescp aborts with "Odd Fragment Length"), so it is sent with the single
    trailing NUL pad byte a conformant writer adds. Everything else as shipped."""
    src = data.testfile(name)  # raises naming the missing file
    if len(data.dataset_bytes(src)) % 2 == 0:
        return src
    padded = folder / name
    padded.write_bytes(src.read_bytes() + b"\0")
    assert pydicom.dcmread(padded) == pydicom.dcmread(src)
    return padded


@pytest.fixture(scope="module")
def selection(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("selection")
    paths = {name: _wire_ready(name, folder) for name in SELECTION}
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths.values()]
    assert len(set(uids)) == len(uids), "selection must have one file per SOP Instance UID"
    covered = {data.transfer_syntax(p) for p in paths.values()}
    missing = {ts: name for ts, name in EXPECTED_SYNTAXES.items() if ts not in covered}
    assert not missing, f"selection does not cover {missing}"
    multi = [p for p in paths.values()
             if int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) > 1]
    assert multi, "selection has no multi-frame object"
    return paths


@pytest.fixture(scope="module")
def stored(tmp_path_factory, selection, gatewayd_bin):
    """One gateway for the module with the whole selection stored over one association."""
    g = gw.Gateway(tmp_path_factory.mktemp("pynetdicom") / "gw")
    try:
        g.start()
        statuses = scu.store_files(g.dicom_port, list(selection.values()))
        yield g, statuses
    finally:
        g.cleanup()


def test_every_transfer_syntax_gets_success_status(stored, selection):
    g, statuses = stored
    bad = {p.name: scu.describe(s) for p, s in statuses.items() if s != 0x0000}
    assert not bad, f"C-STORE not 0x0000 for {bad}\nlog tail:\n{g.log_tail(40)}"
    st = g.status()
    assert st["objects"] == len(selection), st
    assert st["by_state"]["received"] == len(selection), st


@pytest.mark.parametrize("name", list(SELECTION))
def test_export_returns_the_object_as_received(stored, selection, tmp_path, name):
    g, statuses = stored
    src = selection[name]
    assert statuses.get(src) == 0x0000, f"{name} was not stored ({scu.describe(statuses.get(src))})"
    orig = pydicom.dcmread(src)
    out = tmp_path / f"export-{name}"
    g.export(str(orig.SOPInstanceUID), out)

    exported = pydicom.dcmread(out)  # no force: must be a proper Part 10 file
    raw = out.read_bytes()
    assert raw[128:132] == b"DICM"
    ts_orig = str(orig.file_meta.TransferSyntaxUID)
    ts_exp = str(exported.file_meta.TransferSyntaxUID)
    assert ts_exp == ts_orig, f"transfer syntax changed: {ts_orig} -> {ts_exp}"
    assert str(exported.file_meta.MediaStorageSOPClassUID) == str(orig.SOPClassUID)
    assert str(exported.file_meta.MediaStorageSOPInstanceUID) == str(orig.SOPInstanceUID)

    assert exported == orig, f"{name}: exported dataset differs from the original"
    # Transfer syntax unchanged -> the dataset bytes must be exactly those sent.
    sent = data.dataset_bytes(src)
    got = data.split_part10(raw)[1]
    if got != sent:
        first = next((i for i, (a, b) in enumerate(zip(got, sent)) if a != b), min(len(got), len(sent)))
        raise AssertionError(
            f"{name}: exported dataset bytes differ from those sent: {len(got)} vs {len(sent)} bytes, "
            f"first difference at offset {first}"
        )


def test_resend_same_object_is_success_and_not_duplicated(stored, selection):
    # CT_small.dcm was stored by the module fixture; resending must not add a copy.
    g, statuses = stored
    src = selection["CT_small.dcm"]
    assert statuses[src] == 0x0000, f"first store of CT_small.dcm: {scu.describe(statuses[src])}"
    before = g.status()
    # Twice on one association, then once more on a new association.
    assoc = scu.associate(g.dicom_port, scu.contexts_for_files([src]))
    assert assoc.is_established
    try:
        first, second = scu.c_store(assoc, src), scu.c_store(assoc, src)
    finally:
        assoc.release()
    third = scu.store_files(g.dicom_port, [src])[src]
    assert (first, second, third) == (0x0000, 0x0000, 0x0000), (first, second, third)
    after = g.status()
    assert after["objects"] == before["objects"], (before, after)
    assert after["bytes"] == before["bytes"], (before, after)


def test_dataset_not_matching_command_uid_is_refused(stored, tmp_path):
    """rtdose.dcm's file meta says SOP Instance UID 1.2.999..., its dataset says
    1.9.999...: sent as is, the C-STORE command and the dataset disagree.
    DCMTK's storescp answers 0xA900; the gateway must refuse too (0xA900 or
    0xC000-0xCFFF) and store nothing under either UID."""
    g, _ = stored
    src = data.testfile("rtdose.dcm")
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    meta_uid, ds_uid = str(ds.file_meta.MediaStorageSOPInstanceUID), str(ds.SOPInstanceUID)
    assert meta_uid != ds_uid
    before = g.status()["objects"]
    status = scu.store_files(g.dicom_port, [src])[src]
    assert status is not None, "no C-STORE response"
    assert status == 0xA900 or 0xC000 <= status <= 0xCFFF, f"answered 0x{status:04X}"
    assert g.status()["objects"] == before
    for uid in (meta_uid, ds_uid):
        r = g.export(uid, tmp_path / f"{uid}.dcm", check=False)
        assert r.returncode != 0, f"refused object exported under {uid}"
