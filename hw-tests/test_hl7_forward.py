"""HL7 forwarding (`kind = "mllp-tls"`) to a downstream system on python-hl7's MLLP server.

The peer (`mllp_peer.py`) runs python-hl7's asyncio MLLP server in TLS, requires a client
certificate from the test CA (`pki.CA`), logs every message it receives (exact bytes) and
acknowledges AA, or AE/101 for the MSH-10s it is told to refuse.

- 20 messages (ASCII, ISO-2022-JP, Shift_JIS) arrive byte-identical and in order over
  mutual TLS; the spool ends sent 20 / queued 0; no patient data in the gateway's log;
- the peer refusing one message (AE, ERR 101): that one is a dead letter, the rest flow;
- the peer down while 30 messages come in, up again later: all 30 arrive, in order,
  without restarting the gateway;
- a client certificate the peer does not trust: nothing delivered, everything queued,
  `last_error` says why;
- kill -9 right after the gateway's AA to the sender, 10 times: after each restart every
  acknowledged message reaches the peer; a message is received again only when a kill
  fell between the peer's ACK and the gateway recording it (at most one resend per kill),
  byte-identical, so the peer recognises it by its MSH-3/MSH-4/MSH-10;
- routing by message type (`message_types`): an EMR (ORU^R01), an accounting system
  (DFT^P03), a RIS (OMG^O19, ORM^O01) and one destination without a filter, each its own
  peer; a mix of ORU^R01, DFT^P03, OMG^O19, ADT^A08 and one whose MSH-9 is in lower
  case (a type no filter matches): each filtered peer receives exactly its types, once each and in order, the
  unfiltered one everything; `spool status --json` counts per destination. Restarted
  with no destination for ADT, an ADT^A08 is still stored and answered AA, held as
  `received`.
"""

from __future__ import annotations

import base64
import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gw
import hl7msg
import pki
from hl7msg import MllpConnection, adt_a08, japanese_a08, msa
from test_uplink import poll

DEST = "ris"
HERE = Path(__file__).resolve().parent


class Peer:
    """mllp_peer.py as a subprocess on a free loopback port."""

    def __init__(self, dir: Path, ca: pki.CA | None, refuse: tuple[str, ...] = ()):
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.port = gw.free_port()
        self.log = dir / "received.log"
        self.ca = ca
        self.server = ca.server_cert("127.0.0.1", name="peer") if ca else None
        self.refuse = refuse
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Peer":
        cmd = [sys.executable, str(HERE / "mllp_peer.py"), "--port", str(self.port), "--log", str(self.log)]
        if self.server:
            cmd += ["--cert", str(self.server.cert), "--key", str(self.server.key), "--ca", str(self.ca.cert)]
        if self.refuse:
            cmd += ["--refuse", ",".join(self.refuse)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.dir / "peer.err", "ab"))
        line = self.proc.stdout.readline()
        assert b"listening" in line, f"mllp_peer did not start: {(self.dir / 'peer.err').read_text()}"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def received(self) -> list[tuple[str, bytes]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            cid, b64 = line.split(" ", 1)
            out.append((cid, base64.b64decode(b64)))
        return out


@pytest.fixture
def peer_factory(tmp_path):
    made: list[Peer] = []

    def make(ca, refuse=()):
        p = Peer(tmp_path / f"peer{len(made)}", ca, refuse)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop()


def forwarding_gateway(gateway_factory, peer: Peer, client: pki.KeyPair | None, ca_file: Path | None):
    port = gw.free_port()
    up = {"name": DEST, "kind": "mllp-tls",
          "url": f"{'mllps' if ca_file else 'mllp'}://127.0.0.1:{peer.port}"}
    if ca_file:
        up.update(ca_file=str(ca_file), client_auth="files", cert_file=str(client.cert), key_file=str(client.key))
    g = gateway_factory({"hl7": {"listen": f"127.0.0.1:{port}"}, "uplink": [up]})
    g.hl7_port = port
    return g


def dest(g: gw.Gateway) -> dict:
    st = g.status()
    return st["by_destination"][DEST]


def send_all(g: gw.Gateway, msgs: list[hl7msg.Msg]) -> None:
    with MllpConnection(g.hl7_port) as c:
        for m in msgs:
            assert msa(c.request(m.bytes)) == ("AA", m.control_id)


def test_messages_arrive_byte_identical_in_order_over_mutual_tls(gateway_factory, peer_factory, ca):
    peer = peer_factory(ca)
    client = ca.other_client_cert("test-gw", name="gw-client")
    g = forwarding_gateway(gateway_factory, peer, client, ca.cert)
    msgs = [adt_a08(f"ZZFWD{i:04d}", patient_id=f"ZZPID{i:05d}") for i in range(18)]
    msgs.insert(5, japanese_a08("ZZFWDJP01", "iso2022_jp"))
    msgs.insert(11, japanese_a08("ZZFWDJP02", "shift_jis"))
    send_all(g, msgs)
    poll("20 delivered", lambda: ((d := dest(g))["sent"] == 20 and d["queued"] == 0, d), 30)
    got = peer.received()
    assert [cid for cid, _ in got] == [m.control_id for m in msgs], "not in order, or not exactly once"
    assert [raw for _, raw in got] == [m.bytes for m in msgs], "a forwarded message differs from what was received"
    log = g.log_text()
    assert "ZZTEST" not in log and "ZZPID" not in log and "放射線" not in log
    assert sum(gw.metric_values(g.metrics(), "gateway_uplink_sent_total", destination=DEST, result="sent")) == 20
    assert g.stop() == 0


def test_peer_refusing_one_message_dead_letters_it_and_the_rest_flow(gateway_factory, peer_factory, ca):
    peer = peer_factory(ca, refuse=("ZZREF0003",))
    client = ca.other_client_cert("test-gw", name="gw-client")
    g = forwarding_gateway(gateway_factory, peer, client, ca.cert)
    msgs = [adt_a08(f"ZZREF{i:04d}") for i in range(8)]
    send_all(g, msgs)
    d = poll("settled", lambda: ((d := dest(g))["queued"] == 0 and d["sent"] + d["failed"] == 8, d), 30)
    assert (d["sent"], d["failed"]) == (7, 1), d
    received = collections.Counter(cid for cid, _ in peer.received())
    assert received["ZZREF0003"] == 1, "a refused message must not be resent"
    assert set(received) == {m.control_id for m in msgs}
    assert "peer refused the message: dead letter" in g.log_text()
    assert g.stop() == 0


def test_peer_down_then_up_gets_everything_in_order_without_restart(gateway_factory, peer_factory, ca):
    peer = peer_factory(ca)
    client = ca.other_client_cert("test-gw", name="gw-client")
    g = forwarding_gateway(gateway_factory, peer, client, ca.cert)
    peer.stop()
    msgs = [adt_a08(f"ZZOUT{i:04d}") for i in range(30)]
    send_all(g, msgs)
    d = poll("the outage noticed", lambda: ((d := dest(g))["last_error"] is not None, d), 15)
    assert d["queued"] == 30 and d["sent"] == 0, d
    time.sleep(3)
    peer.start()  # same port and log
    poll("30 delivered", lambda: ((d := dest(g))["sent"] == 30, d), 60)
    assert [cid for cid, _ in peer.received()] == [m.control_id for m in msgs]
    assert dest(g)["last_error"] is None
    assert g.stop() == 0


def test_untrusted_client_certificate_delivers_nothing_and_says_why(tmp_path, gateway_factory, peer_factory, ca):
    peer = peer_factory(ca)
    other = pki.CA(tmp_path / "other-ca", name="not the hospital's CA")
    client = other.other_client_cert("test-gw", name="gw-client")
    g = forwarding_gateway(gateway_factory, peer, client, ca.cert)
    send_all(g, [adt_a08("ZZUNT0001")])
    d = poll("last_error set", lambda: ((d := dest(g))["last_error"] is not None, d), 15)
    time.sleep(2)
    assert dest(g)["queued"] == 1 and peer.received() == [], d
    assert "forwarding failed; will retry" in g.log_text()
    assert "client certificate" in d["last_error"], d
    print(f"last_error: {d['last_error']}")
    assert g.stop() == 0


def test_kill9_right_after_aa_still_delivers_every_message(gateway_factory, peer_factory, ca):
    peer = peer_factory(ca)
    client = ca.other_client_cert("test-gw", name="gw-client")
    g = forwarding_gateway(gateway_factory, peer, client, ca.cert)
    msgs = [adt_a08(f"ZZK9F{i:04d}") for i in range(10)]
    for m in msgs:
        with MllpConnection(g.hl7_port) as c:
            assert msa(c.request(m.bytes)) == ("AA", m.control_id)
            g.kill9()
        g.start()
    poll("10 delivered", lambda: ((d := dest(g))["sent"] == 10 and d["queued"] == 0, d), 60)
    received = collections.Counter(cid for cid, _ in peer.received())
    print(f"receipts at the peer: {dict(received)}")
    assert set(received) == {m.control_id for m in msgs}, "a message acknowledged to its sender never arrived"
    # The forwarder has one message in flight at a time, so a kill can leave at most one
    # message delivered but not yet recorded as sent: at most one resend per kill (a message
    # can be resent after two kills in a row if both fell in its window).
    resends = sum(n - 1 for n in received.values())
    assert resends <= len(msgs), received
    got = {cid: raw for cid, raw in peer.received()}
    assert all(got[m.control_id] == m.bytes for m in msgs)
    assert g.stop() == 0


def typed_message(control_id: str, msh9: str, body: list[str]) -> hl7msg.Msg:
    """A message of type `msh9` (MSH-9 as written) with `body` segments after MSH; fake,
    ZZ-marked patient data."""
    msh = f"MSH|^~\\&|ZZHIS|ZZHOSP|GATEWAY|ZZCLINIC|20261201120000||{msh9}|{control_id}|P|2.5"
    return hl7msg.Msg(control_id, "\r".join([msh, *body]) + "\r", "ascii")


PID = "PID|1||ZZPIDRT01^^^ZZHOSP^PI||ZZTEST^ROUTE||19700101|F"


def oru_r01(cid: str) -> hl7msg.Msg:
    return typed_message(cid, "ORU^R01^ORU_R01", [
        PID, "OBR|1|ZZPLACER1|ZZFILLER1|CT^CT CHEST", "OBX|1|TX|REPORT||ZZTEST no finding||||||F"])


def dft_p03(cid: str) -> hl7msg.Msg:
    return typed_message(cid, "DFT^P03^DFT_P03", [
        "EVN|P03|20261201120000", PID, "FT1|1|||20261201120000||CG|ZZCHARGE^CT CHEST"])


def omg_o19(cid: str) -> hl7msg.Msg:
    return typed_message(cid, "OMG^O19^OMG_O19", [
        PID, "ORC|NW|ZZPLACER2", "OBR|1|ZZPLACER2||CT^CT CHEST"])


def test_each_destination_gets_exactly_the_message_types_it_takes(gateway_factory, peer_factory, ca):
    client = ca.other_client_cert("test-gw", name="gw-client")
    filters = {
        "emr": ["ORU^R01"],
        "accounting": ["DFT^P03"],
        "ris": ["OMG^O19", "ORM^O01"],
        "all": None,
    }
    peers = {name: peer_factory(ca) for name in filters}
    uplinks = []
    for name, types in filters.items():
        up = {"name": name, "kind": "mllp-tls", "url": f"mllps://127.0.0.1:{peers[name].port}",
              "ca_file": str(ca.cert), "client_auth": "files",
              "cert_file": str(client.cert), "key_file": str(client.key)}
        if types is not None:
            up["message_types"] = types
        uplinks.append(up)
    port = gw.free_port()
    g = gateway_factory({"hl7": {"listen": f"127.0.0.1:{port}"}, "uplink": uplinks})
    g.hl7_port = port

    msgs = []
    for i in range(3):
        msgs += [oru_r01(f"ZZRTO{i}"), dft_p03(f"ZZRTD{i}"), omg_o19(f"ZZRTG{i}"),
                 adt_a08(f"ZZRTA{i}", patient_id="ZZPIDRT01")]
    # MSH-9 in lower case: not a type the filters can match, so only "all" takes it (the
    # EMR's ORU^R01 filter does not guess).
    msgs.append(typed_message("ZZRTX0", "oru^r01^ORU_R01", [PID, "OBR|1|ZZPLACER3||CT^CT CHEST"]))
    send_all(g, msgs)

    def types_of(prefix: str) -> list[str]:
        return [m.control_id for m in msgs if m.control_id.startswith(prefix)]

    want = {
        "emr": types_of("ZZRTO"),
        "accounting": types_of("ZZRTD"),
        "ris": types_of("ZZRTG"),
        "all": [m.control_id for m in msgs],
    }

    def settled():
        st = g.status()["by_destination"]
        return all(st[d]["sent"] == len(w) and st[d]["queued"] == 0 for d, w in want.items()), st

    st = poll("every destination sent its share", settled, 60)
    time.sleep(1)  # anything sent to the wrong peer would have arrived by now
    by_id = {m.control_id: m.bytes for m in msgs}
    for name, ids in want.items():
        got = peers[name].received()
        assert [cid for cid, _ in got] == ids, f"{name} received {[cid for cid, _ in got]}, wants {ids}"
        assert all(raw == by_id[cid] for cid, raw in got), f"{name}: a forwarded message differs"
        assert (st[name]["sent"], st[name]["queued"], st[name]["failed"]) == (len(ids), 0, 0), st[name]
    assert set(st) == set(filters), st
    assert sum(gw.metric_values(g.metrics(), "gateway_uplink_sent_total", destination="emr", result="sent")) == 3
    log = g.log_text()
    assert "ZZTEST" not in log and "ZZPIDRT01" not in log and "ZZPLACER" not in log
    assert g.stop() == 0

    # Restarted without the unfiltered destination and with the RIS also taking ORU^R01:
    # no destination takes ADT now, yet an ADT^A08 is stored durably and answered AA, held
    # as `received`; the messages above keep the destinations chosen when they arrived.
    g.config["uplink"] = [u for u in uplinks if u["name"] != "all"]
    g.config["uplink"][2]["message_types"] = ["OMG^O19", "ORM^O01", "ORU^R01"]
    assert g.config["uplink"][2]["name"] == "ris"
    g.config_path.write_text(gw.to_toml(g.config))
    g.start()
    assert g.status()["by_state"]["received"] == 0
    late = [adt_a08("ZZRTA9", patient_id="ZZPIDRT01"), oru_r01("ZZRTO9")]
    send_all(g, late)
    st = poll("the late ORU delivered to the EMR and the RIS",
              lambda: ((s := g.status())["by_destination"]["emr"]["sent"] == 4
                       and s["by_destination"]["ris"]["sent"] == 4, s), 60)
    assert st["by_state"]["received"] == 1, st
    assert st["by_destination"]["all"]["sent"] == len(msgs), "old records keep their destinations"
    assert [cid for cid, _ in peers["ris"].received()] == want["ris"] + ["ZZRTO9"], "old ORUs are not re-queued"
    assert [cid for cid, _ in peers["emr"].received()] == want["emr"] + ["ZZRTO9"]
    assert [cid for cid, _ in peers["all"].received()] == want["all"]
    out = g.workdir / "adt.hl7"
    r = g.cli("spool", "export", "--config", str(g.config_path), "--hl7-message", late[0].key, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == late[0].bytes
    assert g.stop() == 0
