"""Who may send HL7: `[[hl7.peers]]` against real senders (python-hl7's `mllp_send`, raw
MLLP sockets from two loopback addresses, Python's `ssl` with client certificates from an
openssl CA).

- a sender whose address is not on the list gets AR with an ERR segment (ERR-3 103, ERR-8
  the gateway's fixed text) for every message, and nothing is stored;
- the listed sender (host + MSH-3 + MSH-4) gets AA and its message exports byte-identical;
  the same host with another MSH-4 (sent by python-hl7's `mllp_send`) gets AR with ERR-2 at
  MSH-4 and is not stored;
- over MLLP/TLS with client certificates: a certificate whose name is an entry's
  `tls_client_name` gets AA, another certificate of the same CA gets AR;
- every refusal is counted in `gateway_hl7_refused_total{reason}` and audited once per
  connection and reason (`hl7_sender_refused`, subject `peer:{address}`), and
  `gatewayd audit verify` still passes;
- `mode = "production"` refuses a plain MLLP listener on a non-loopback address without
  `[[hl7.peers]]`: `check-config` exits 2 naming `hl7.peers`, `run` exits non-zero before
  listening; with an entry the same file passes.

No patient data in the gateway's log (the synthetic names and IDs are grepped for).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path

import gw
import hl7msg
import test_hl7
from hl7msg import MllpConnection, adt_a08, msa
from test_hl7 import assert_no_patient_data_in_log, mllp_send_binary

NOT_ALLOWED = "sender not on this gateway's allow list"
# The one allowed sender of the plain-MLLP tests: this host, as adt_a08's MSH-3 / MSH-4 say.
ALLOWED = {"host": "127.0.0.1", "sending_application": "ZZHIS", "sending_facility": "ZZHOSP"}


class MllpFrom(MllpConnection):
    """An MLLP connection from a chosen loopback source address (the gateway listens on
    127.0.0.1; the whole 127/8 reaches it)."""

    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = b""


def hl7_gateway(gateway_factory, peers: list[dict], **hl7):
    return test_hl7.hl7_gateway(gateway_factory, peers=peers, **hl7)


def with_facility(m: hl7msg.Msg, facility: str) -> hl7msg.Msg:
    text = m.text.replace("|ZZHIS|ZZHOSP|", f"|ZZHIS|{facility}|", 1)
    assert text != m.text
    return hl7msg.Msg(m.control_id, text, m.charset, sending_facility=facility)


def err(ack: bytes) -> list[str]:
    f = hl7msg.segment(ack, "ERR")
    assert f is not None, f"no ERR segment in {ack!r}"
    return f + [""] * (9 - len(f))


def refused(g: gw.Gateway, reason: str) -> float:
    return sum(gw.metric_values(g.metrics(), "gateway_hl7_refused_total", reason=reason))


def exported(g: gw.Gateway, m: hl7msg.Msg, out: Path) -> bytes | None:
    r = g.cli("spool", "export", "--config", str(g.config_path), "--hl7-message", m.key, "--out", str(out))
    return out.read_bytes() if r.returncode == 0 else None


def audit_records(g: gw.Gateway) -> list[dict]:
    log = g.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_audit_verifies(g: gw.Gateway) -> None:
    r = g.cli("audit", "verify", "--config", str(g.config_path), "--json")
    assert r.returncode == 0, f"audit verify exited {r.returncode}: {r.stdout}{r.stderr}"


def test_unlisted_address_gets_ar_and_listed_sender_aa_and_wrong_facility_ar(tmp_path, gateway_factory):
    g = hl7_gateway(gateway_factory, [ALLOWED])

    # Not on the list: 127.0.0.2. Five messages on one connection, each answered AR.
    strangers = [adt_a08(f"ZZSTR{i:04d}", patient_id=f"ZZPID9{i:03d}") for i in range(5)]
    with MllpFrom(g.hl7_port, "127.0.0.2") as c:
        for m in strangers:
            ack = c.request(m.bytes)
            assert msa(ack) == ("AR", m.control_id), ack
            e = err(ack)
            assert e[2] == "", f"an address refusal points at no field: {ack!r}"
            assert e[3].split("^")[0] == "103", ack
            assert e[8] == NOT_ALLOWED, ack
    assert g.status()["objects"] == 0, "a message from an unlisted address was stored"
    assert exported(g, strangers[0], tmp_path / "stranger.hl7") is None

    # On the list: AA, stored byte-identical.
    ok = adt_a08("ZZOK0001")
    with MllpConnection(g.hl7_port) as c:
        assert msa(c.request(ok.bytes)) == ("AA", "ZZOK0001")
    assert exported(g, ok, tmp_path / "ok.hl7") == ok.bytes

    # The listed host with another MSH-4, sent by python-hl7's mllp_send: AR at MSH-4.
    other = with_facility(adt_a08("ZZFAC0001"), "ZZELSEWHERE")
    batch = tmp_path / "other.hl7"
    batch.write_bytes(hl7msg.encode_frame(other.bytes))
    r = subprocess.run([mllp_send_binary(), "-p", str(g.hl7_port), "-f", str(batch), "127.0.0.1"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, f"mllp_send exited {r.returncode}: {r.stderr.decode(errors='replace')}"
    acks = hl7msg.split_frames(r.stdout)
    assert len(acks) == 1, r.stdout
    assert msa(acks[0]) == ("AR", "ZZFAC0001"), acks[0]
    e = err(acks[0])
    assert e[2].split("^")[:3] == ["MSH", "1", "4"], f"ERR-2 should point at MSH-4: {acks[0]!r}"
    assert e[3].split("^")[0] == "103" and e[8] == NOT_ALLOWED, acks[0]

    assert g.status()["objects"] == 1, "only the listed sender's message is stored"
    assert exported(g, other, tmp_path / "other-out.hl7") is None

    assert refused(g, "address") == 5
    assert refused(g, "sending_facility") == 1
    assert refused(g, "sending_application") == 0
    assert sum(gw.metric_values(g.metrics(), "gateway_hl7_messages_total", ack="AR")) == 6

    records = [r for r in audit_records(g) if r["action"] == "hl7_sender_refused"]
    got = sorted((r["subject"], r["detail"], r["outcome"]) for r in records)
    # Once per connection and reason: five refusals on one connection are one record.
    assert got == [("peer:127.0.0.1", "sending_facility", "failure"), ("peer:127.0.0.2", "address", "failure")], got
    assert_audit_verifies(g)
    assert_no_patient_data_in_log(g)
    assert g.stop() == 0


def test_tls_client_name_allows_one_certificate_and_refuses_another_of_the_same_ca(tmp_path, gateway_factory, ca):
    server = ca.server_cert("127.0.0.1", name="hl7-server")
    g = hl7_gateway(gateway_factory, [{"tls_client_name": "emr.zzclinic.test", "sending_facility": "ZZHOSP"}],
                    tls_cert_file=str(server.cert), tls_key_file=str(server.key),
                    tls_client_ca_file=str(ca.cert))

    def context(cn: str, name: str) -> ssl.SSLContext:
        pair = ca.other_client_cert(cn, name=name)
        ctx = ssl.create_default_context(cafile=str(ca.cert))
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
        return ctx

    allowed = adt_a08("ZZTLSOK01")
    with MllpConnection(g.hl7_port, tls=context("emr.zzclinic.test", "emr")) as c:
        assert msa(c.request(allowed.bytes)) == ("AA", "ZZTLSOK01")
    assert exported(g, allowed, tmp_path / "tls-ok.hl7") == allowed.bytes

    # Verified by the same CA, but not the listed name: the handshake succeeds, the message is refused.
    rogue = adt_a08("ZZTLSNO01")
    with MllpConnection(g.hl7_port, tls=context("lab.zzclinic.test", "lab")) as c:
        ack = c.request(rogue.bytes)
    assert msa(ack) == ("AR", "ZZTLSNO01"), ack
    assert err(ack)[8] == NOT_ALLOWED, ack
    assert exported(g, rogue, tmp_path / "tls-no.hl7") is None
    assert g.status()["objects"] == 1
    assert refused(g, "certificate") == 1

    records = [r for r in audit_records(g) if r["action"] == "hl7_sender_refused"]
    assert [(r["subject"], r["detail"]) for r in records] == [("peer:127.0.0.1", "certificate")], records
    assert_audit_verifies(g)
    assert g.stop() == 0


def _production(tmp_path: Path, hl7_port: int, peers: list[dict] | None) -> Path:
    hl7 = {"listen": f"0.0.0.0:{hl7_port}"}
    if peers is not None:
        hl7["peers"] = peers
    cfg = gw.deep_merge(gw.base_config(tmp_path / "data", gw.free_port(), gw.free_port()), {
        "node": {"mode": "production"},
        "keystore": {"backend": "tpm"},
        "hl7": hl7,
    })
    path = tmp_path / ("with-peers.toml" if peers else "no-peers.toml")
    path.write_text(gw.to_toml(cfg))
    return path


def test_production_refuses_plain_mllp_without_peers(tmp_path, gatewayd_bin):
    port = gw.free_port()
    bad = _production(tmp_path, port, None)
    r = subprocess.run([gatewayd_bin, "check-config", "--config", str(bad)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, f"check-config exited {r.returncode}:\n{r.stderr}"
    keys = [ln.split(": ", 1)[0] for ln in r.stderr.splitlines() if ": " in ln]
    assert keys == ["hl7.peers"], f"expected exactly one problem, hl7.peers; stderr:\n{r.stderr}"

    r = subprocess.run([gatewayd_bin, "run", "--config", str(bad)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0, "gatewayd run started a plain MLLP listener without [[hl7.peers]] in production"
    assert "hl7.peers" in r.stderr, r.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the refused MLLP listener was listening"

    good = _production(tmp_path, port, [{"host": "192.0.2.10", "sending_application": "ZZHIS"}])
    r = subprocess.run([gatewayd_bin, "check-config", "--config", str(good)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    # A binary built without the `tpm` feature also says that keystore.backend = "tpm" is not
    # available in it (checked only once the file parses): nothing else may be named.
    keys = [ln.split(": ", 1)[0] for ln in r.stderr.splitlines() if ": " in ln]
    assert r.returncode == 0 or set(keys) == {"keystore.backend"}, \
        f"check-config refused the same file with [[hl7.peers]]:\n{r.stderr}"
