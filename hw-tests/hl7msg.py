"""HL7 v2 test messages and a raw MLLP client for hw-tests.

Every name, ID and address here is synthetic (ZZTEST...). Messages are built as text and
encoded in the character set their MSH-18 names; `encode_frame` wraps them in MLLP.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def encode_frame(payload: bytes) -> bytes:
    return SB + payload + EB + CR


def split_frames(data: bytes) -> list[bytes]:
    """The payloads of the MLLP frames in ``data`` (what the gateway answered)."""
    out = []
    for chunk in data.split(SB)[1:]:
        end = chunk.find(EB)
        if end >= 0:
            out.append(chunk[:end])
    return out


def fields(segment: str) -> list[str]:
    return segment.split("|")


def segment(message: bytes | str, name: str) -> list[str] | None:
    """Fields of the first segment ``name`` (field 0 is the name; MSH-1 is not counted)."""
    text = message.decode("ascii", errors="replace") if isinstance(message, bytes) else message
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith(name + "|"):
            return fields(seg)
    return None


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an acknowledgement."""
    f = segment(ack, "MSA")
    assert f is not None, f"no MSA segment in {ack!r}"
    return f[1], f[2] if len(f) > 2 else ""


def err3(ack: bytes) -> str | None:
    """ERR-3.1 (table 0357 code) of an acknowledgement, if it has an ERR segment."""
    f = segment(ack, "ERR")
    return f[3].split("^")[0] if f and len(f) > 3 else None


@dataclass
class Msg:
    control_id: str
    text: str
    charset: str  # Python codec for the bytes
    sending_app: str = "ZZHIS"
    sending_facility: str = "ZZHOSP"

    @property
    def bytes(self) -> bytes:
        return self.text.encode(self.charset)

    @property
    def key(self) -> str:
        """The `gatewayd spool export --hl7-message` key."""
        return f"{self.sending_app}|{self.sending_facility}|{self.control_id}"


def adt_a08(control_id: str, *, name: str = "ZZTEST^TARO", kana: str | None = None,
            address: str = "1-1 ZZTEST^^ZZCITY", msh18: str = "", charset: str = "ascii",
            accept_ack: str = "", app_ack: str = "", patient_id: str = "ZZPID0001",
            version: str = "2.5") -> Msg:
    name_field = name if kana is None else f"{name}~{kana}"
    msh = (f"MSH|^~\\&|ZZHIS|ZZHOSP|GATEWAY|ZZCLINIC|20261201120000||ADT^A08^ADT_A01|{control_id}|P|{version}"
           f"|||{accept_ack}|{app_ack}|JPN|{msh18}")
    text = "\r".join([
        msh,
        "EVN|A08|20261201120000",
        f"PID|1||{patient_id}^^^ZZHOSP^PI||{name_field}||19700101|F|||{address}",
        "PV1|1|O",
    ]) + "\r"
    return Msg(control_id, text, charset)


def japanese_a08(control_id: str, charset: str) -> Msg:
    """An ADT^A08 whose name and address hold kanji (放射線, 造影剤, 東京) and kana, in
    ISO-2022-JP (MSH-18 `~ISO IR87`) or Shift_JIS (表 and ソ end in 0x5C, HL7's escape)."""
    msh18 = {"iso2022_jp": "~ISO IR87", "shift_jis": "SHIFT_JIS"}[charset]
    return adt_a08(control_id, name="放射線^造影剤太郎^^^^^^I", kana="ホウシャセン^ゾウエイザイタロウソ^^^^^^P",
                   address="東京都ZZ区表町1-1^^東京", msh18=msh18, charset=charset)


class MllpConnection:
    """A raw MLLP connection: send frames, read acknowledgements."""

    def __init__(self, port: int, timeout: float = 10.0, tls=None):
        """``tls``: an `ssl.SSLContext` to speak MLLP in TLS."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.send_raw(encode_frame(payload))

    def recv_frame(self, timeout: float = 10.0) -> bytes | None:
        """The next acknowledgement, or None if the peer closed (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            start = self.buf.find(SB)
            end = self.buf.find(EB, start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0:
                frame = self.buf[start + 1:end]
                self.buf = self.buf[end + 1:].lstrip(CR)
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no MLLP answer within {timeout}s (buffered {self.buf[:80]!r})")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not data:
                return None
            self.buf += data

    def request(self, payload: bytes, timeout: float = 10.0) -> bytes:
        self.send(payload)
        ack = self.recv_frame(timeout)
        assert ack is not None, "the gateway closed the connection instead of answering"
        return ack

    def is_closed_by_peer(self, timeout: float) -> bool:
        """True if the peer closes the connection within ``timeout`` s (nothing else arriving)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        self.buf += data
        return data == b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "MllpConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
