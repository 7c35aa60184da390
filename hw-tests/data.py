"""Test data for the real-peer tests.

Two sources:

* pydicom's bundled test files, read straight from
  ``<site-packages>/pydicom/data/test_files``. We never call
  ``pydicom.data.get_testdata_files()``: it may try to download the optional
  pydicom-data set and hang on a machine without that network.
* synthetic CT Image Storage files generated here with pydicom, with fake
  patient names and IDs that are easy to grep for (the privacy test looks for
  them in every byte the gateway writes).
"""

from __future__ import annotations

import array
import random
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

# The family-name part every synthetic patient shares; never a real name.
FAKE_FAMILY_NAME = "ZZTESTPAT"


def testfiles_dir() -> Path:
    """The folder of pydicom's bundled test files (exists in the wheel)."""
    d = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
    if not d.is_dir():
        raise FileNotFoundError(f"pydicom test files folder not found at {d}")
    return d


def testfile(name: str) -> Path:
    """Path of one bundled pydicom test file; raises if it is absent."""
    p = testfiles_dir() / name
    if not p.is_file():
        available = sorted(x.name for x in testfiles_dir().glob("*.dcm"))
        raise FileNotFoundError(f"{name} not in {testfiles_dir()}; available: {available}")
    return p


@dataclass(frozen=True)
class SyntheticFile:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    patient_name: str
    patient_id: str
    size_kind: str

    @property
    def family_name(self) -> str:
        return self.patient_name.split("^", 1)[0]


_PIXEL_CACHE: dict[int, bytes] = {}


def _base_pixels(side: int) -> bytes:
    """A deterministic 16-bit ramp (12 bits stored) of side*side pixels."""
    if side not in _PIXEL_CACHE:
        n = side * side
        _PIXEL_CACHE[side] = array.array("H", (x % 4096 for x in range(n))).tobytes()
    return _PIXEL_CACHE[side]


def _pixels(side: int, shift: int) -> bytes:
    base = _base_pixels(side)
    k = (2 * shift) % len(base)
    return base[k:] + base[:k]


def patient_name(i: int) -> str:
    return f"{FAKE_FAMILY_NAME}^Hanako{i}"


def patient_id(i: int) -> str:
    return f"PID-ZZ-{i:06d}"


def make_ct_file(path: Path, i: int, size_kind: str = "small", study_uid: str | None = None,
                 series_uid: str | None = None) -> SyntheticFile:
    """Write one valid CT Image Storage Part 10 file (Explicit VR Little Endian).

    ``size_kind`` is ``"ct"`` (512x512x16-bit, ~0.5 MB of pixel data),
    ``"large"`` (1536x1536x16-bit, ~4.5 MB: over what the spool holds in memory and
    journals, so it streams to a blob file) or ``"small"`` (16x16).
    """
    if size_kind == "ct":
        side = 512
    elif size_kind == "large":
        side = 1536
    elif size_kind == "small":
        side = 16
    else:
        raise ValueError(f"size_kind must be 'ct' or 'small', not {size_kind!r}")

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HWTESTS_1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.StudyTime = "101010"
    ds.ContentTime = "101010"
    ds.AccessionNumber = f"ACC{i:07d}"
    ds.Modality = "CT"
    ds.Manufacturer = "HWTESTS"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name(i)
    ds.PatientID = patient_id(i)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    ds.ImagePositionPatient = [0, 0, float(i)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = _pixels(side, i)
    # pydicom 3 takes the encoding from the file meta transfer syntax.
    ds.save_as(path, enforce_file_format=True)
    return SyntheticFile(Path(path), sop_uid, CTImageStorage, patient_name(i), patient_id(i), size_kind)


def make_ct_set(n: int, dir: Path | str, size_kind: str = "small", start: int = 0) -> list[SyntheticFile]:
    """``n`` CT files in ``dir``, each with its own SOP Instance UID and its own
    fake patient (``ZZTESTPAT^Hanako{i}``, ``PID-ZZ-{i:06d}``) for i in
    ``start..start+n``."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = generate_uid()
    return [
        make_ct_file(d / f"{size_kind}-{i:06d}.dcm", i, size_kind, study, series)
        for i in range(start, start + n)
    ]


def make_mixed_set(n_ct: int, n_small: int, dir: Path | str, seed: int = 1234, start: int = 0) -> list[SyntheticFile]:
    """``n_ct`` CT-sized and ``n_small`` small files, shuffled with ``seed``."""
    d = Path(dir)
    files = make_ct_set(n_ct, d, "ct", start=start) + make_ct_set(n_small, d, "small", start=start + n_ct)
    random.Random(seed).shuffle(files)
    return files


# --------------------------------------------------------------------------
# Part 10 helpers


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """Split a Part 10 file into (preamble + DICM + file meta group, dataset bytes).

    Walks the group 0002 elements (always Explicit VR Little Endian) instead
    of trusting (0002,0000) alone, so a wrong group length is noticed.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM at offset 128)")
    pos = 132
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while pos + 8 <= len(data):
        group = int.from_bytes(data[pos:pos + 2], "little")
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in long_vrs:
            length = int.from_bytes(data[pos + 8:pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(data[pos + 6:pos + 8], "little")
            pos += 8 + length
    return data[:pos], data[pos:]


def dataset_bytes(path: Path | str) -> bytes:
    """The encoded dataset of a Part 10 file: everything after its file meta."""
    return split_part10(Path(path).read_bytes())[1]


def transfer_syntax(path: Path | str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def write_malformed_ct(path: Path | str) -> str:
    """A file with valid file meta (Explicit VR LE, CT Image Storage) whose
    dataset is a few good elements, then an element header claiming a
    0x7FFF0000-byte value followed by only 10 bytes. Returns its SOP Instance UID."""
    sop_uid = generate_uid()

    def elem_short(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        return (group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr
                + len(value).to_bytes(2, "little") + value)

    def elem_long(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        return (group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + b"\0\0"
                + len(value).to_bytes(4, "little") + value)

    meta_elems = (
        elem_long(0x0002, 0x0001, b"OB", b"\x00\x01")
        + elem_short(0x0002, 0x0002, b"UI", CTImageStorage.encode())
        + elem_short(0x0002, 0x0003, b"UI", sop_uid.encode())
        + elem_short(0x0002, 0x0010, b"UI", ExplicitVRLittleEndian.encode())
        + elem_short(0x0002, 0x0012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode())
    )
    meta = elem_short(0x0002, 0x0000, b"UL", len(meta_elems).to_bytes(4, "little")) + meta_elems
    body = (
        elem_short(0x0008, 0x0016, b"UI", CTImageStorage.encode())
        + elem_short(0x0008, 0x0018, b"UI", sop_uid.encode())
        + elem_short(0x0008, 0x0060, b"CS", b"CT")
        # (7FE0,0010) Pixel Data, OW: a 4-byte length claiming 0x7FFF0000
        # bytes, then only 10 bytes and the end of the stream.
        + (0x7FE0).to_bytes(2, "little") + (0x0010).to_bytes(2, "little") + b"OW\0\0"
        + (0x7FFF0000).to_bytes(4, "little")
        + b"0123456789"
    )
    Path(path).write_bytes(b"\0" * 128 + b"DICM" + meta + body)
    return sop_uid
