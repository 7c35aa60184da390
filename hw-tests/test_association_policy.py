"""Who may associate, how many at once, and what malformed PDUs do.

Pins: with `[[dicom.peers]]` listed, only those calling AE titles (from their
address) are accepted; rejections use the standard result/source/reason
(source 1 reason 3 calling AE not recognized, reason 7 called AE not
recognized; source 3 reason 2 local limit exceeded for `max_associations` and
`max_associations_per_peer`); garbage, a truncated A-ASSOCIATE-RQ and a PDU
claiming 4 GiB are dropped within the ARTIM timeout without hurting the
daemon; an unsupported abstract syntax is rejected per presentation context
while Verification in the same association is accepted.
"""

from __future__ import annotations

import random
import socket
import time

from pynetdicom import build_context

import scu

PEER_CT01 = {"dicom": {"peers": [{"ae_title": "CT01", "host": "127.0.0.1"}]}}

SOURCE_SERVICE_USER = 1
SOURCE_PRESENTATION = 3
REASON_CALLING_AE = 3
REASON_CALLED_AE = 7
REASON_LOCAL_LIMIT = 2


def _assert_rejected(answer: scu.RawAnswer, source: int, reasons: tuple[int, ...], what: str) -> None:
    """`answer` comes from scu.raw_associate (see there why not pynetdicom)."""
    assert not answer.is_accepted, f"{what}: association was accepted"
    assert answer.is_rejected, f"{what}: expected an A-ASSOCIATE-RJ, got {answer!r}"
    assert answer.result in (1, 2), f"{what}: result {answer.result} is not rejected-permanent/transient"
    assert (answer.source, answer.reason) in [(source, r) for r in reasons], (
        f"{what}: rejected with source {answer.source} reason {answer.reason}, expected source {source} reason {reasons}"
    )


# -- calling / called AE title policy ----------------------------------------


def test_listed_peer_is_accepted(gateway_factory):
    g = gateway_factory(PEER_CT01)
    assert scu.c_echo(g.dicom_port, calling="CT01") == 0x0000


def test_unlisted_calling_ae_is_rejected_calling_ae_not_recognized(gateway_factory):
    g = gateway_factory(PEER_CT01)
    answer = scu.raw_associate(g.dicom_port, calling="EVIL")
    _assert_rejected(answer, SOURCE_SERVICE_USER, (REASON_CALLING_AE,), "calling AE EVIL")


def test_listed_ae_from_wrong_address_is_rejected(gateway_factory):
    g = gateway_factory(PEER_CT01)
    answer = scu.raw_associate(g.dicom_port, calling="CT01", bind=("127.0.0.2", 0))
    # Which reason is a choice (1 no-reason-given or 3 calling AE not recognized); the source is not.
    _assert_rejected(answer, SOURCE_SERVICE_USER, (1, REASON_CALLING_AE), "CT01 from 127.0.0.2")


def test_wrong_called_ae_is_rejected_called_ae_not_recognized(gateway_factory):
    g = gateway_factory(PEER_CT01)
    answer = scu.raw_associate(g.dicom_port, calling="CT01", called="NOTGATEWAY")
    _assert_rejected(answer, SOURCE_SERVICE_USER, (REASON_CALLED_AE,), "called AE NOTGATEWAY")


# -- limits ------------------------------------------------------------------


def test_max_associations_rejects_third_with_local_limit_then_recovers(gateway_factory):
    g = gateway_factory({"dicom": {"max_associations": 2, "max_associations_per_peer": 2}})
    held = [scu.associate(g.dicom_port, calling="CT01"), scu.associate(g.dicom_port, calling="CT02")]
    try:
        assert all(a.is_established for a in held), "the first 2 associations must be accepted"
        third = scu.raw_associate(g.dicom_port, calling="CT03")
        _assert_rejected(third, SOURCE_PRESENTATION, (REASON_LOCAL_LIMIT,), "3rd association with max 2")

        held[0].release()
        # The release is answered before the server's task ends: allow it a moment.
        deadline = time.monotonic() + 3.0
        while True:
            again = scu.associate(g.dicom_port, calling="CT03")
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.is_established, f"no association accepted after releasing one (rejected={again.is_rejected})"
        assert again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        for a in held:
            if a.is_established:
                a.release()


def test_max_associations_per_peer_rejects_second_from_same_ae(gateway_factory):
    g = gateway_factory({"dicom": {"max_associations": 4, "max_associations_per_peer": 1}})
    first = scu.associate(g.dicom_port, calling="CT01")
    try:
        assert first.is_established
        second = scu.raw_associate(g.dicom_port, calling="CT01")
        _assert_rejected(second, SOURCE_PRESENTATION, (REASON_LOCAL_LIMIT,), "2nd association from CT01")
    finally:
        if first.is_established:
            first.release()


# -- malformed input -----------------------------------------------------------

ARTIM_S = 2.0


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _wait_closed(s: socket.socket, limit: float) -> tuple[bool, float, bytes]:
    """Read until the peer closes; (closed, seconds waited, bytes received)."""
    start = time.monotonic()
    got = b""
    while True:
        left = limit - (time.monotonic() - start)
        if left <= 0:
            return False, time.monotonic() - start, got
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return False, time.monotonic() - start, got
        except (ConnectionResetError, BrokenPipeError):
            return True, time.monotonic() - start, got
        if not chunk:
            return True, time.monotonic() - start, got
        got += chunk


def _send(s: socket.socket, payload: bytes) -> None:
    try:
        s.sendall(payload)
    except (ConnectionResetError, BrokenPipeError):
        pass  # already dropped: fine


def _assert_only_abort(got: bytes, what: str) -> None:
    # Anything the gateway sends back before closing must be an A-ABORT PDU (type 0x07).
    assert got == b"" or got[0] == 0x07, f"{what}: gateway answered {got[:16].hex()} instead of closing / A-ABORT"


def test_malformed_pdus_are_dropped_and_daemon_keeps_serving(gateway_factory):
    g = gateway_factory({"dicom": {"artim_timeout": f"{ARTIM_S:.0f}s"}})
    margin = 1.5

    # 1. 4 KiB of random bytes.
    rng = random.Random(20240601)
    s = _connect(g.dicom_port)
    _send(s, bytes(rng.getrandbits(8) for _ in range(4096)))
    closed, waited, got = _wait_closed(s, ARTIM_S + margin)
    s.close()
    assert closed, f"random bytes: connection still open after {waited:.1f}s (ARTIM {ARTIM_S}s)"
    _assert_only_abort(got, "random bytes")

    # 2. A-ASSOCIATE-RQ header claiming 200 bytes, then 20 bytes, then silence.
    s = _connect(g.dicom_port)
    body = b"\x00\x01" + b"\x00\x00" + b"GATEWAY".ljust(16)  # protocol version, reserved, called AE (18+2)
    _send(s, b"\x01\x00" + (200).to_bytes(4, "big") + body[:20])
    closed, waited, got = _wait_closed(s, ARTIM_S + margin)
    s.close()
    assert closed, f"truncated A-ASSOCIATE-RQ: connection still open after {waited:.1f}s (ARTIM {ARTIM_S}s)"
    _assert_only_abort(got, "truncated A-ASSOCIATE-RQ")

    # 3. A PDU header claiming a 4 GiB length: refused at once, not buffered.
    s = _connect(g.dicom_port)
    _send(s, b"\x01\x00" + (0xFFFFFFFF).to_bytes(4, "big") + b"\x00\x01\x00\x00")
    closed, waited, got = _wait_closed(s, 1.0)
    s.close()
    assert closed, f"4 GiB PDU length: connection still open after {waited:.1f}s (expected prompt close)"
    _assert_only_abort(got, "4 GiB PDU length")

    assert g.is_running(), f"gatewayd died on malformed PDUs (exit {g.proc.returncode})\n{g.log_tail()}"
    r = scu.echoscu(g.dicom_port)
    assert r.returncode == 0, f"echoscu after malformed PDUs failed: {r.stdout}{r.stderr}"
    assert g.http_get("/healthz")[0] == 200
    assert g.is_running()


def test_unsupported_abstract_syntax_is_rejected_per_context_verification_accepted(gateway):
    contexts = [build_context(scu.STUDY_ROOT_FIND), build_context(scu.VERIFICATION)]
    assoc = scu.associate(gateway.dicom_port, contexts)
    try:
        assert assoc.is_established, "association with Verification + Study Root FIND must be accepted"
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        assert scu.VERIFICATION in accepted, accepted
        assert scu.STUDY_ROOT_FIND not in accepted, accepted
        # 0x03: abstract-syntax-not-supported (provider rejection)
        assert rejected.get(scu.STUDY_ROOT_FIND) == 0x03, rejected
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
