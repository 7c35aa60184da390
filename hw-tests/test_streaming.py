"""A large object is streamed into the spool, never held whole in memory.

Pins issue 2's "objects are streamed to the spool, never held whole in memory":
a 160 MB multi-frame object sent by DCMTK storescu is stored (0x0000 via exit
code and count), gatewayd's peak RSS (VmHWM) stays far below the object's size,
and the exported file's data set is byte-identical (compared by SHA-256 while
reading both files in blocks, so the test itself does not hold it either).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import gw
import scu

FRAMES, ROWS, COLS = 5, 4096, 4096  # 5 x 32 MiB of 16-bit pixels
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
RSS_CEILING_MIB = 64


def _write_big_object(path: Path) -> str:
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = uid
    ds.PatientName = "ZZBIG^Streaming"
    ds.PatientID = "PID-ZZ-BIG"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = FRAMES
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    frame = bytes(range(256)) * (ROWS * COLS * 2 // 256)
    ds.PixelData = frame * FRAMES
    ds.save_as(path, enforce_file_format=True)
    return uid


def _dataset_sha256(path: Path) -> str:
    """SHA-256 of the bytes after the file meta group, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        f.seek(128 + 4)
        group_len_el = f.read(12)  # (0002,0000) UL, explicit VR LE: tag 4, VR 2, len 2, value 4
        group_len = int.from_bytes(group_len_el[8:12], "little")
        f.seek(128 + 4 + 12 + group_len)
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def test_160_mb_object_is_stored_with_small_peak_memory_and_exports_identical(gateway, tmp_path):
    src = tmp_path / "big.dcm"
    uid = _write_big_object(src)
    size_mib = src.stat().st_size / 2**20
    assert size_mib > 150

    r = scu.storescu(gateway.dicom_port, [src])
    assert r.returncode == 0, f"storescu failed:\n{r.stdout}\n{r.stderr}"
    assert gateway.status()["objects"] == 1

    peak = gw.proc_status(gateway.pid)["VmHWM"] / 1024
    assert peak < RSS_CEILING_MIB, f"gatewayd peaked at {peak:.0f} MiB while receiving a {size_mib:.0f} MiB object"

    out = tmp_path / "exported.dcm"
    gateway.export(uid, out)
    assert _dataset_sha256(out) == _dataset_sha256(src), "exported data set differs from what was sent"
    assert pydicom.dcmread(out, stop_before_pixels=True).SOPInstanceUID == uid
