"""DICOM clients used by the tests: pynetdicom associations and DCMTK tools.

pynetdicom is put in "send the file as is" mode: `send_c_store(path)` streams
the encoded dataset bytes that follow the file meta, without decoding and
re-encoding (``STORE_SEND_CHUNKED_DATASET``). That is what makes the byte-exact
round-trip checks meaningful, and it lets a test send a deliberately malformed
dataset. It needs an accepted presentation context with the file's own
transfer syntax, which `contexts_for_files` proposes.
"""

from __future__ import annotations

import os
import socket
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import pydicom
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association

_config.STORE_SEND_CHUNKED_DATASET = True

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
DCMTK_TOOLS = ("echoscu", "storescu", "storescp")
# store_files' result for a file whose presentation context the peer rejected
NO_CONTEXT = -1


def file_context(path: Path | str) -> tuple[str, str]:
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def contexts_for_files(paths: Iterable[Path | str]) -> list:
    """One presentation context per (SOP class, transfer syntax) of the files."""
    pairs = sorted({file_context(p) for p in paths})
    if len(pairs) > 127:
        raise ValueError("more than 127 distinct presentation contexts")
    return [build_context(sop, [ts]) for sop, ts in pairs]


def describe(status: int | None) -> str:
    if status is None:
        return "no response"
    if status == NO_CONTEXT:
        return "presentation context rejected"
    return f"0x{status:04X}"


def make_ae(calling: str = "CT01") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 15
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.connection_timeout = 5
    return ae


def associate(port: int, contexts: list | None = None, calling: str = "CT01", called: str = "GATEWAY",
              host: str = "127.0.0.1") -> Association:
    """An association request from ``calling`` to ``called``; inspect
    ``is_established`` / ``is_rejected`` / ``acceptor.primitive`` on the result."""
    ae = make_ae(calling)
    ctxs = contexts if contexts is not None else [build_context(VERIFICATION)]
    return ae.associate(host, port, contexts=ctxs, ae_title=called)


def c_store(assoc: Association, path: Path | str) -> int | None:
    """C-STORE one file as is; the response status, or None if there was none
    (association aborted, connection lost, DIMSE timeout)."""
    rsp = assoc.send_c_store(Path(path))
    if rsp is None or "Status" not in rsp:
        return None
    return int(rsp.Status)


def store_files(port: int, paths: list[Path], calling: str = "CT01", called: str = "GATEWAY") -> dict[Path, int | None]:
    """Store every file over one association; status per file (None: no
    response; NO_CONTEXT: the peer rejected the file's presentation context)."""
    assoc = associate(port, contexts_for_files(paths), calling, called)
    assert assoc.is_established, f"association to 127.0.0.1:{port} not established (rejected={assoc.is_rejected})"
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    out: dict[Path, int | None] = {}
    try:
        for p in paths:
            out[Path(p)] = c_store(assoc, p) if file_context(p) in accepted else NO_CONTEXT
        return out
    finally:
        if assoc.is_established:
            assoc.release()


def c_echo(port: int, calling: str = "CT01", called: str = "GATEWAY") -> int | None:
    assoc = associate(port, None, calling, called)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()


# --------------------------------------------------------------------------
# DCMTK


def missing_dcmtk_tools() -> list[str]:
    return [t for t in DCMTK_TOOLS if shutil.which(t) is None]


def dcmtk_env(nodelay: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def echoscu(port: int, calling: str = "CT01", called: str = "GATEWAY", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), stdin=subprocess.DEVNULL,
    )


def storescu_cmd(port: int, files: list[Path], calling: str = "CT01", called: str = "GATEWAY",
                 extra: list[str] | None = None) -> list[str]:
    return ["storescu", *(extra or []), "-aet", calling, "-aec", called, "127.0.0.1", str(port),
            *[str(f) for f in files]]


def storescu(port: int, files: list[Path], calling: str = "CT01", called: str = "GATEWAY",
             extra: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        storescu_cmd(port, files, calling, called, extra),
        capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), stdin=subprocess.DEVNULL,
    )


# -- raw association requests --------------------------------------------------
#
# pynetdicom 3.0.4's requestor races a fast rejection: its ACSE thread checks
# `socket._is_connected` after the DUL thread may already have received the
# A-ASSOCIATE-RJ and closed the socket, and then reports "aborted". Rejection
# tests therefore speak the upper layer protocol directly and read the RJ PDU's
# result/source/reason bytes (PS3.8 9.3.4).


def _item(item_type: int, body: bytes) -> bytes:
    return bytes([item_type, 0]) + len(body).to_bytes(2, "big") + body


def associate_rq_bytes(calling: str, called: str, abstract_syntax: str = "1.2.840.10008.1.1") -> bytes:
    """An A-ASSOCIATE-RQ proposing one context (Implicit VR LE)."""
    app_context = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user_info = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")))
    body = (
        (1).to_bytes(2, "big") + b"\x00\x00"
        + called.encode().ljust(16) + calling.encode().ljust(16)
        + b"\x00" * 32 + app_context + pc + user_info
    )
    return bytes([0x01, 0x00]) + len(body).to_bytes(4, "big") + body


class RawAnswer:
    """The first PDU the acceptor answered with."""

    def __init__(self, pdu: bytes):
        self.pdu_type = pdu[0] if pdu else None
        self.is_rejected = self.pdu_type == 0x03
        self.is_accepted = self.pdu_type == 0x02
        # A-ASSOCIATE-RJ: header (6), reserved (1), result, source, reason/diag.
        self.result, self.source, self.reason = (pdu[7], pdu[8], pdu[9]) if self.is_rejected and len(pdu) >= 10 else (None, None, None)

    def __repr__(self) -> str:
        return f"RawAnswer(type={self.pdu_type}, result={self.result}, source={self.source}, reason={self.reason})"


def raw_associate(port: int, calling: str = "CT01", called: str = "GATEWAY", bind: tuple[str, int] | None = None,
                  timeout: float = 10.0) -> RawAnswer:
    """Sends an A-ASSOCIATE-RQ and returns the answer; then releases or closes politely."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=bind) as s:
        s.sendall(associate_rq_bytes(calling, called))
        header = _recv_exact(s, 6)
        body = _recv_exact(s, int.from_bytes(header[2:6], "big")) if len(header) == 6 else b""
        answer = RawAnswer(header + body)
        if answer.is_accepted:
            s.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
            _recv_exact(s, 10)
        return answer


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out
