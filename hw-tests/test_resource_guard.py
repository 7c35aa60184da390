"""Out of room or bad input: the failure is said in DICOM's words, nothing earlier is lost.

Pins: with `min_free_bytes` above the disk's free space every C-STORE answers
0xA700 (never 0x0000 and never a dropped connection); with `max_bytes` reached
the store that does not fit answers 0xA700 while everything stored before
stays exportable and counted; a dataset that cannot be parsed answers
0xC000-0xCFFF or 0xA900, is not stored, and the daemon keeps serving.
"""

from __future__ import annotations

import pydicom

import data
import scu


def test_below_min_free_bytes_every_store_answers_a700(gateway_factory, tmp_path):
    g = gateway_factory({"spool": {"min_free_bytes": "100000TiB"}})
    files = data.make_ct_set(2, tmp_path / "in", "small")
    statuses = scu.store_files(g.dicom_port, [f.path for f in files])
    assert list(statuses.values()) == [0xA700, 0xA700], {p.name: s for p, s in statuses.items()}
    assert g.status()["objects"] == 0
    assert g.is_running()
    assert scu.c_echo(g.dicom_port) == 0x0000


def test_max_bytes_reached_answers_a700_and_keeps_earlier_objects(gateway_factory, tmp_path):
    g = gateway_factory({"spool": {"max_bytes": "1MiB"}})
    # ~0.5 MB objects: the spool must say A700 within a few of them.
    files = data.make_ct_set(12, tmp_path / "in", "ct")
    assoc = scu.associate(g.dicom_port, scu.contexts_for_files([files[0].path]))
    assert assoc.is_established
    stored: list[data.SyntheticFile] = []
    refused = None
    try:
        for f in files:
            status = scu.c_store(assoc, f.path)
            if status == 0x0000:
                stored.append(f)
                continue
            refused = (f, status)
            break
    finally:
        if assoc.is_established:
            assoc.release()
    assert refused is not None, f"all {len(files)} objects (~6 MB) accepted with max_bytes = 1MiB"
    f_refused, status = refused
    assert status == 0xA700, f"store over max_bytes answered {status and hex(status)}, expected 0xA700"

    st = g.status()
    assert st["objects"] == len(stored), (st, len(stored))
    # One more attempt still refused, and the count does not drop.
    assert scu.store_files(g.dicom_port, [f_refused.path])[f_refused.path] == 0xA700
    assert g.status()["objects"] == len(stored)
    r = g.export(f_refused.sop_instance_uid, tmp_path / "refused.dcm", check=False)
    assert r.returncode != 0, "an object answered 0xA700 can be exported: it was stored after all"

    for f in stored:
        out = tmp_path / f"out-{f.sop_instance_uid}.dcm"
        g.export(f.sop_instance_uid, out)
        assert pydicom.dcmread(out) == pydicom.dcmread(f.path)
        assert data.split_part10(out.read_bytes())[1] == data.dataset_bytes(f.path)


def test_malformed_dataset_answers_failure_and_daemon_keeps_serving(gateway, tmp_path):
    good_before = data.make_ct_set(1, tmp_path / "before", "small", start=10)[0]
    assert scu.store_files(gateway.dicom_port, [good_before.path])[good_before.path] == 0x0000

    bad = tmp_path / "malformed.dcm"
    bad_uid = data.write_malformed_ct(bad)
    assoc = scu.associate(gateway.dicom_port, scu.contexts_for_files([good_before.path]))
    assert assoc.is_established
    try:
        status = scu.c_store(assoc, bad)
    finally:
        if assoc.is_established:
            assoc.release()
    assert status is not None, "no C-STORE response to a malformed dataset (connection dropped?)"
    assert status != 0x0000, "malformed dataset answered 0x0000"
    assert 0xC000 <= status <= 0xCFFF or status == 0xA900, f"malformed dataset answered 0x{status:04X}"

    assert gateway.is_running(), f"gatewayd died on a malformed dataset\n{gateway.log_tail()}"
    good_after = data.make_ct_set(1, tmp_path / "after", "small", start=11)[0]
    assert scu.store_files(gateway.dicom_port, [good_after.path])[good_after.path] == 0x0000
    assert gateway.status()["objects"] == 2
    r = gateway.export(bad_uid, tmp_path / "bad-out.dcm", check=False)
    assert r.returncode != 0, "the malformed object was stored"
    gateway.export(good_before.sop_instance_uid, tmp_path / "before-out.dcm")
