"""HL7 v2 over MLLP against real senders: python-hl7's `mllp_send` and raw sockets.

- a batch of 50 ADT^A08 sent by `mllp_send` (python-hl7, a real MLLP client): every
  one answered AA with MSA-2 = its MSH-10, all 50 in the spool, each exporting
  byte-identical, `gateway_hl7_messages_total{ack="AA"}` = 50;
- ISO-2022-JP (`~ISO IR87`) and Shift_JIS ADT^A08 with 放射線 / 造影剤 / 東京 and kana:
  AA, stored byte-identical; ISO IR159 (JIS X 0212) text: AE with ERR 102, not stored;
- kill -9 right after the AA of each of 30 messages sent on one connection: after
  restart all 30 export byte-identical and `spool verify` is consistent;
- kill -9 in the middle of 8 connections sending as fast as they can (group commit
  through the journal under load): after restart every acknowledged message is there
  once, the last ones of each connection export byte-identical, resending everything
  stores nothing new, and `spool verify` is consistent;
- bad input: garbage before a frame, a frame without MSH, an oversized frame, and
  10,000 seeded mutations of valid messages: NAKs or a closed connection, the daemon
  alive, a valid message afterwards answered AA, earlier messages intact;
- MSH-15 = NE: no accept acknowledgement, stored all the same; a duplicate MSH-10 from
  the same sender: the same AA, stored once; a full spool: AE with ERR 207, never AA;
- idle timeout and connection limit close connections.

No patient data in the gateway's log (the synthetic names and IDs are grepped for).
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

import gw
import hl7msg
from hl7msg import MllpConnection, adt_a08, japanese_a08, msa, err3


def hl7_gateway(gateway_factory, **hl7):
    port = gw.free_port()
    g = gateway_factory({"hl7": {"listen": f"127.0.0.1:{port}", **hl7}})
    g.hl7_port = port
    return g


def export(g: gw.Gateway, msg: hl7msg.Msg, out: Path) -> bytes:
    r = g.cli("spool", "export", "--config", str(g.config_path), "--hl7-message", msg.key, "--out", str(out))
    assert r.returncode == 0, f"export of {msg.control_id} failed: {r.stdout}{r.stderr}"
    return out.read_bytes()


def hl7_metric(g: gw.Gateway, ack: str) -> float:
    return sum(gw.metric_values(g.metrics(), "gateway_hl7_messages_total", ack=ack))


def assert_no_patient_data_in_log(g: gw.Gateway) -> None:
    log = g.log_text()
    for needle in ("ZZTEST", "ZZPID", "放射線", "造影剤", "ZZCITY"):
        assert needle not in log, f"{needle!r} in the gateway log"


def mllp_send_binary() -> str:
    venv_bin = Path(__file__).resolve().parent / ".venv" / "bin" / "mllp_send"
    assert venv_bin.exists(), "python-hl7's mllp_send is missing: hw-tests/run-all.sh installs hl7 into hw-tests/.venv"
    return str(venv_bin)


def test_mllp_send_batch_gets_aa_with_matching_msa2_and_all_are_in_the_spool(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory)
    msgs = [adt_a08(f"ZZCTL{i:05d}", patient_id=f"ZZPID{i:05d}") for i in range(50)]
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"".join(hl7msg.encode_frame(m.bytes) for m in msgs))
    r = subprocess.run([mllp_send_binary(), "-p", str(g.hl7_port), "-f", str(batch), "127.0.0.1"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, f"mllp_send exited {r.returncode}: {r.stderr.decode(errors='replace')}"
    acks = hl7msg.split_frames(r.stdout)
    assert len(acks) == 50, f"{len(acks)} acknowledgements for 50 messages: {r.stdout[:300]!r}"
    for m, ack in zip(msgs, acks):
        assert msa(ack) == ("AA", m.control_id), ack
    st = g.status()
    assert st["objects"] == 50, st
    # mllp_send strips the segment terminator after the last segment from what it sends:
    # the spool holds exactly the bytes that came in the frame.
    for m in (msgs[0], msgs[17], msgs[49]):
        assert export(g, m, tmp_path / f"{m.control_id}.hl7") == m.bytes.rstrip(b"\r")
    assert hl7_metric(g, "AA") == 50
    assert_no_patient_data_in_log(g)
    assert g.stop() == 0


@pytest.mark.parametrize("charset", ["iso2022_jp", "shift_jis"])
def test_japanese_adt_is_accepted_and_stored_byte_identical(tmp_path, gateway_factory, charset):
    g = hl7_gateway(gateway_factory)
    m = japanese_a08(f"ZZJP-{charset}", charset)
    raw = m.bytes
    if charset == "iso2022_jp":
        assert b"\x1b$B" in raw and b"J|" in raw, "放 (0x4A7C) must put a '|' byte inside the JIS text"
    else:
        assert b"\x95\x5c" in raw and b"\x83\x5c" in raw, "表 and ソ must end in 0x5C (HL7's escape byte)"
    with MllpConnection(g.hl7_port) as c:
        ack = c.request(raw)
    assert msa(ack) == ("AA", m.control_id), ack
    assert export(g, m, tmp_path / "jp.hl7") == raw
    assert_no_patient_data_in_log(g)
    assert g.stop() == 0


def test_undecodable_jis_x0212_text_gets_ae_with_err_and_is_not_stored(gateway_factory):
    g = hl7_gateway(gateway_factory)
    good = adt_a08("ZZJIS0001", msh18="~ISO IR87", charset="iso2022_jp")
    # JIS X 0212 (ISO IR159, ESC $ ( D) in PID-5: not in ISO-2022-JP as HL7 Japan uses it.
    bad = good.bytes.replace(b"ZZTEST^TARO", b"\x1b$(D\x30\x21\x1b(B^TARO")
    with MllpConnection(g.hl7_port) as c:
        ack = c.request(bad)
    code, control = msa(ack)
    assert (code, control) == ("AE", "ZZJIS0001"), ack
    assert err3(ack) == "102", ack
    assert g.status()["objects"] == 0
    assert g.stop() == 0


def test_kill9_right_after_each_aa_loses_nothing(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory)
    msgs = [adt_a08(f"ZZKILL{i:04d}", patient_id=f"ZZPID{i:05d}") for i in range(30)]
    acked = []
    for round_ in range(3):
        with MllpConnection(g.hl7_port) as c:
            for m in msgs[round_ * 10:(round_ + 1) * 10]:
                assert msa(c.request(m.bytes)) == ("AA", m.control_id)
                acked.append(m)
            g.kill9()  # right after the last AA of the round reached us
        g.start()
    for m in acked:
        assert export(g, m, tmp_path / f"{m.control_id}.hl7") == m.bytes, f"{m.control_id} lost after kill -9"
    rc, report, proc = g.verify()
    assert rc == 0 and report and report["orphan_blobs"] == 0 and report["dangling_entries"] == 0, proc.stdout
    assert g.status()["objects"] == 30
    assert g.stop() == 0


def test_kill9_under_load_from_eight_connections_loses_and_duplicates_nothing(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory)
    senders, per_sender = 8, 4000
    msgs = [[adt_a08(f"ZZLD{s}{i:05d}", patient_id=f"ZZPID{s}{i:04d}") for i in range(per_sender)]
            for s in range(senders)]
    acked: list[list[hl7msg.Msg]] = [[] for _ in range(senders)]
    stop = threading.Event()

    problems: list[str] = []

    def send(s: int) -> None:
        try:
            with MllpConnection(g.hl7_port, timeout=10) as c:
                for m in msgs[s]:
                    if stop.is_set():
                        return
                    c.send(m.bytes)
                    ack = c.recv_frame(10)
                    if ack is None:
                        return  # the daemon died under us: what was acknowledged counts
                    if msa(ack) != ("AA", m.control_id):
                        problems.append(f"{m.control_id}: {msa(ack)}")
                        return
                    acked[s].append(m)
        except OSError:
            return  # refused or reset by the kill
        except AssertionError as e:  # no answer within 10 s: a hang
            problems.append(str(e))

    threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while sum(map(len, acked)) < 1500 and time.monotonic() < deadline:
        time.sleep(0.01)
    g.kill9()
    stop.set()
    for t in threads:
        t.join(15)
    total = sum(map(len, acked))
    assert not problems, problems
    assert total >= 1500, f"only {total} acknowledged before the kill"
    assert all(len(a) < per_sender for a in acked), "the kill came after a sender had finished"
    g.start()
    # Each connection had at most one message in flight: durable, or not, when the kill came.
    objects = g.status()["objects"]
    assert total <= objects <= total + senders, (objects, total)
    for s in range(senders):
        for m in acked[s][-3:]:
            assert export(g, m, tmp_path / f"{m.control_id}.hl7") == m.bytes, f"{m.control_id} lost"
    # Resending the last 50 acknowledged and the one in flight of each connection: AA for
    # all; the acknowledged are duplicates, so exactly one new message per connection.
    with MllpConnection(g.hl7_port) as c:
        for s in range(senders):
            for m in acked[s][-50:] + [msgs[s][len(acked[s])]]:
                assert msa(c.request(m.bytes)) == ("AA", m.control_id)
    total += senders
    assert g.status()["objects"] == total
    rc, report, proc = g.verify()
    assert rc == 0 and report and report["objects"] == total and report["ok"] == total, proc.stdout
    assert_no_patient_data_in_log(g)
    assert g.stop() == 0


def test_bad_frames_get_naks_or_close_and_earlier_messages_stay_intact(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory, max_frame_bytes="64KiB")
    first = adt_a08("ZZBAD0001")
    with MllpConnection(g.hl7_port) as c:
        assert msa(c.request(first.bytes)) == ("AA", "ZZBAD0001")
        # Garbage before a frame: skipped, the frame after it answered.
        c.send_raw(b"GET / HTTP/1.1\r\n\r\n\x00\xff" + hl7msg.encode_frame(adt_a08("ZZBAD0002").bytes))
        assert msa(c.recv_frame()) == ("AA", "ZZBAD0002")
        # A frame that is not a message: a reject without MSA-2.
        nak = c.request(b"PID|1||X\r")
        assert msa(nak) == ("AR", ""), nak
        # Pipelined frames: both answered, in order.
        c.send_raw(hl7msg.encode_frame(adt_a08("ZZBAD0003").bytes) + hl7msg.encode_frame(adt_a08("ZZBAD0004").bytes))
        assert msa(c.recv_frame())[1] == "ZZBAD0003"
        assert msa(c.recv_frame())[1] == "ZZBAD0004"
        # A frame without the trailing CR is accepted.
        c.send_raw(hl7msg.SB + adt_a08("ZZBAD0005").bytes + hl7msg.EB + hl7msg.SB + adt_a08("ZZBAD0006").bytes + hl7msg.EB + hl7msg.CR)
        assert msa(c.recv_frame())[1] == "ZZBAD0005"
        assert msa(c.recv_frame())[1] == "ZZBAD0006"
    with MllpConnection(g.hl7_port) as c:
        # Oversized: a reject, then the connection is closed.
        c.send_raw(hl7msg.SB + b"MSH|^~\\&|" + b"X" * (100 * 1024) + hl7msg.EB + hl7msg.CR)
        nak = c.recv_frame()
        assert nak is not None and msa(nak)[0] == "AR", nak
        assert c.recv_frame(timeout=5) is None, "connection not closed after an oversized frame"
    assert g.is_running()
    with MllpConnection(g.hl7_port) as c:
        assert msa(c.request(adt_a08("ZZBAD0007").bytes)) == ("AA", "ZZBAD0007")
    assert export(g, first, tmp_path / "first.hl7") == first.bytes
    assert g.status()["objects"] == 7
    assert g.stop() == 0


def test_ten_thousand_mutated_messages_never_crash_or_hang_the_listener(tmp_path, gateway_factory):
    seed = int(__import__("os").environ.get("HWTESTS_SEED", "5150"))
    print(f"seed {seed} (HWTESTS_SEED replays)")
    rng = random.Random(seed)
    g = hl7_gateway(gateway_factory, max_frame_bytes="16KiB")
    first = adt_a08("ZZMUT00001")
    with MllpConnection(g.hl7_port) as c:
        assert msa(c.request(first.bytes)) == ("AA", first.control_id)
    templates = [adt_a08("ZZMUT", msh18="~ISO IR87", charset="iso2022_jp").bytes,
                 japanese_a08("ZZMUTJP", "shift_jis").bytes, adt_a08("ZZMUT2", accept_ack="AL").bytes]

    def mutate(b: bytes) -> bytes:
        b = bytearray(b)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(b) + 1)
            if op < 0.4 and b:
                b[min(pos, len(b) - 1)] = rng.randrange(256)
            elif op < 0.6:
                b[pos:pos] = bytes([rng.choice(b"|^~\\&\r\x1b\x0b\x1c$(BJ")])
            elif op < 0.8 and b:
                del b[pos:pos + rng.randint(1, 20)]
            else:
                b[pos:pos] = b[rng.randrange(len(b)):][:rng.randint(1, 40)]
        return bytes(b)

    frames = [hl7msg.encode_frame(mutate(rng.choice(templates))) for _ in range(10_000)]
    sent = b"".join(frames)
    answers = []
    done = threading.Event()
    conn = socket.create_connection(("127.0.0.1", g.hl7_port), timeout=60)

    def reader():
        conn.settimeout(60)
        try:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                answers.append(data)
        except OSError:
            pass
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        conn.sendall(sent)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the gateway may close a connection that sent an oversized frame
    assert done.wait(120), "the listener neither answered nor closed within 120 s: hang"
    elapsed = time.monotonic() - t0
    conn.close()
    acks = hl7msg.split_frames(b"".join(answers))
    codes = {}
    for a in acks:
        f = hl7msg.segment(a, "MSA")
        codes[f[1] if f else "?"] = codes.get(f[1] if f else "?", 0) + 1
    print(f"{len(frames)} mutated frames ({len(sent)} bytes) in {elapsed:.1f}s: {len(acks)} answers {codes}")
    assert g.is_running(), "gatewayd died"
    with MllpConnection(g.hl7_port) as c:
        assert msa(c.request(adt_a08("ZZMUT99999").bytes)) == ("AA", "ZZMUT99999")
    assert export(g, first, tmp_path / "first.hl7") == first.bytes
    rc, report, proc = g.verify()
    assert rc == 0, proc.stdout + proc.stderr
    assert_no_patient_data_in_log(g)
    assert g.stop() == 0


def test_msh15_ne_gets_no_ack_and_duplicate_control_id_gets_the_same_ack_once_stored(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory)
    with MllpConnection(g.hl7_port) as c:
        ne = adt_a08("ZZNE0001", accept_ack="NE", app_ack="NE")
        c.send(ne.bytes)
        assert not c.is_closed_by_peer(1.5) and c.buf == b"", f"an acknowledgement for MSH-15 = NE: {c.buf!r}"
        al = adt_a08("ZZAL0001", accept_ack="AL", app_ack="NE")
        assert msa(c.request(al.bytes)) == ("CA", "ZZAL0001")
        first = c.request(adt_a08("ZZDUP0001").bytes)
        again = c.request(adt_a08("ZZDUP0001").bytes)
    assert msa(first) == msa(again) == ("AA", "ZZDUP0001")
    assert export(g, ne, tmp_path / "ne.hl7") == ne.bytes
    assert g.status()["objects"] == 3, "NE, AL and one copy of the duplicate"
    assert "already stored" in g.log_text()
    assert g.stop() == 0


def test_full_spool_answers_ae_with_err_207_never_aa(gateway_factory):
    port = gw.free_port()
    g = gateway_factory({"hl7": {"listen": f"127.0.0.1:{port}"},
                         "spool": {"min_free_bytes": "1000000GiB"}})
    with MllpConnection(port) as c:
        ack = c.request(adt_a08("ZZFULL0001").bytes)
        enhanced = c.request(adt_a08("ZZFULL0002", accept_ack="AL").bytes)
    assert msa(ack) == ("AE", "ZZFULL0001"), ack
    assert err3(ack) == "207"
    assert b"storage full" in ack
    assert msa(enhanced)[0] == "CE", enhanced
    assert g.status()["objects"] == 0
    assert g.stop() == 0


def test_idle_timeout_and_connection_limit_close_connections(gateway_factory):
    g = hl7_gateway(gateway_factory, idle_timeout="1s", max_connections=2)
    a = MllpConnection(g.hl7_port)
    b = MllpConnection(g.hl7_port)
    assert msa(a.request(adt_a08("ZZLIM0001").bytes))[0] == "AA"
    assert msa(b.request(adt_a08("ZZLIM0002").bytes))[0] == "AA"
    third = MllpConnection(g.hl7_port)
    assert third.is_closed_by_peer(2), "a third connection over hl7.max_connections = 2 stayed open"
    third.close()
    t0 = time.monotonic()
    assert a.is_closed_by_peer(5), "an idle connection stayed open past hl7.idle_timeout = 1s"
    assert time.monotonic() - t0 < 3
    a.close()
    b.close()
    assert sum(gw.metric_values(g.metrics(), "gateway_hl7_connections_rejected_total", reason="limit")) == 1
    assert g.stop() == 0


def test_tls_listener_with_client_certificates_accepts_trusted_senders_only(tmp_path, gateway_factory, ca):
    server = ca.server_cert("127.0.0.1", name="hl7-server")
    g = hl7_gateway(gateway_factory, tls_cert_file=str(server.cert), tls_key_file=str(server.key),
                    tls_client_ca_file=str(ca.cert))
    trusted = ca.other_client_cert("emr", name="emr")
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.load_cert_chain(str(trusted.cert), str(trusted.key))
    m = adt_a08("ZZTLS0001")
    with MllpConnection(g.hl7_port, tls=ctx) as c:
        assert msa(c.request(m.bytes)) == ("AA", "ZZTLS0001")
    assert export(g, m, tmp_path / "tls.hl7") == m.bytes
    # Without a client certificate: the handshake is refused, nothing is stored.
    bare = ssl.create_default_context(cafile=str(ca.cert))
    refused = False
    try:
        with MllpConnection(g.hl7_port, tls=bare) as c:
            c.send(adt_a08("ZZTLS0002").bytes)
            refused = c.recv_frame(timeout=5) is None
    except (ssl.SSLError, ConnectionError):
        refused = True
    assert refused, "a sender without client certificate got an answer"
    # Plain MLLP on a TLS listener gets nothing either.
    with MllpConnection(g.hl7_port) as c:
        c.send(adt_a08("ZZTLS0003").bytes)
        assert c.recv_frame(timeout=5) is None
    assert g.status()["objects"] == 1
    assert sum(gw.metric_values(g.metrics(), "gateway_hl7_connections_rejected_total", reason="tls")) >= 2
    assert g.stop() == 0
