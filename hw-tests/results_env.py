"""The harness of the "results come back to the referring clinic" tests (test_results.py).

`ResultsEnv` builds, on 127.0.0.1 and ports picked here:

- the cloud archive: a real Orthanc (DICOMweb plugin) behind nginx mutual TLS
  (`mtls.Ingress`), with the receipt Lua script (`mtls.receipt_lua`) so that "received
  once" can be told from "received, then again"; optionally nginx caps what it sends per
  connection (``limit_rate``) so that a pull lasts long enough to be interrupted;
- the regional broker (`fleet.Broker`, TLS client certificates, `kiosk.REGIONAL_ACL`);
- a core (`core-1`) and clinics (`kiosk.Region`), each with its own `[[uplink]] name =
  "cloud"` (dicomweb, its own client certificate of the test CA) to the SAME cloud. The
  core listens for HL7 (`[hl7] listen`, the RIS sends the ORU there) and has `[results]
  source = "cloud"`, `complete_after` short. Each clinic has `[results] source = "cloud"`,
  its `patient_id_issuer`, `[[results.deliver]]` kind "dicom" -> its own PACS (DCMTK
  `storescp +uf`: one file per instance received, a resend is a second file) and kind
  "hl7" -> `[[uplink]] name = "emr"` (mllp-tls, `message_types = ["ORU^R01"]`) -> its own
  EMR (`mllp_peer.py` in TLS, requiring the clinic's client certificate);
- with ``results=False`` the `[results]` sections and `message_types` are left out, so a
  binary without the feature still runs everything up to the first results assertion.

Helpers: `book` (a clerk books at the clinic kiosk: appointment id and accession),
`make_study` (N CT instances of one study with the booked accession and the CORE's
Patient ID, a Study Instance UID of our own so matching must go by accession, mixed sizes,
unique SOP Instance UIDs), `send_study` (storescu to the core), `send_oru` (ORU^R01 to the
core's MLLP listener: OBR-18 = accession, OBR-25 = F, Japanese report text),
`wait_*` (bounded, with messages that say how far things got), the kiosk's results
(`imaging_study`, `results_counts`) and the broker capture (`capture`, `assert_no_clear`).

Every name and id is synthetic (ZZ...). Every server stops by its PID at `close`.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

import data
import fleet
import gw
import hl7msg
import kiosk
import mtls
import pki
import scu
from hl7msg import MllpConnection, msa
from test_booking import first_free
from test_hl7_forward import Peer
from test_uplink import poll, store

CORE = "core-1"
CLOUD = "cloud"
PACS_DEST = "pacs"
EMR_UPLINK = "emr"
CORE_PATIENT_ID = "ZZCORE778899"
CORE_ISSUER = "ZZCOREHOSP"
ISSUERS = {"clinic-a": "ZZCLINIC-A", "clinic-b": "ZZCLINIC-B"}
PATIENT = {"id": "ZZPIDR4242", "name": "ZZTEST^HANAKO=山田^花子=やまだ^はなこ", "birth_date": "1961-04-02",
           "gender": "female"}
# (OBX-3, OBX-5) of the report: Japanese text, as a reading radiologist writes it.
REPORT = [("FINDINGS^所見^L", "両肺に結節影なし。縦隔リンパ節腫大なし。"),
          ("IMPRESSION^診断^L", "異常所見なし。造影剤による副作用なし。")]
PACS_AE = "PACS"


# --------------------------------------------------------------------------
# the clinic PACS: DCMTK storescp


class Pacs:
    """`storescp +uf` on a port picked here; every instance received is its own file in
    ``received/`` (a resend of one SOP Instance UID is a second file)."""

    def __init__(self, dir: Path, aet: str = PACS_AE, tls: "PacsTls | None" = None):
        self.tls = tls
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = gw.free_port()
        self.out = self.dir / "received"
        self.out.mkdir(exist_ok=True)
        self.log = self.dir / "storescp.log"
        self.proc: subprocess.Popen | None = None
        self._parsed: dict[str, pydicom.Dataset] = {}

    def start(self, sleep_during: int = 0) -> "Pacs":
        """Starts (or restarts, same port and folder). ``sleep_during``: storescp sleeps that
        many seconds in each reception step (a slow PACS: a delivery lasts long enough to be
        interrupted before the file is written)."""
        missing = scu.missing_dcmtk_tools()
        assert not missing, f"DCMTK tools missing: {missing}; `apt-get install -y dcmtk` (run-all.sh does this)"
        assert not self.is_running(), "storescp already running"
        cmd = ["storescp", "-v", "-aet", self.aet, "+uf", "+xa", "-od", str(self.out)]
        if self.tls:
            cmd += ["+tls", str(self.tls.server.key), str(self.tls.server.cert), "+cf", str(self.tls.ca),
                    "--require-peer-cert"]
        if sleep_during:
            cmd += ["--sleep-during", str(sleep_during)]
        cmd.append(str(self.port))
        with open(self.log, "ab") as log:
            log.write(f"\n===== hw-tests: {' '.join(cmd)} =====\n".encode())
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=scu.dcmtk_env(), start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"storescp exited {self.proc.returncode} at start:\n{self.log_tail()}")
            # storescp serves one association at a time. A slow PACS is started while a
            # gateway is retrying its deliveries: the gateway's association may come first
            # and hold storescp for a minute, so a C-ECHO would wait behind it. Then the
            # listening socket is the sign of readiness.
            if gw.listening_on(self.port) if sleep_during else self._echo().returncode == 0:
                return self
            time.sleep(0.1)
        ready = "was not listening" if sleep_during else "did not answer C-ECHO"
        raise AssertionError(f"storescp {ready} on {self.port} within 10s:\n{self.log_tail()}")

    def _echo(self) -> subprocess.CompletedProcess:
        if not self.tls:
            return scu.echoscu(self.port, calling="HWTESTS", called=self.aet, timeout=5)
        probe = self.tls.probe
        return subprocess.run(
            ["echoscu", "+tls", str(probe.key), str(probe.cert), "-pw", "+cf", str(self.tls.ca), "-aet", "HWTESTS",
             "-aec", self.aet, "127.0.0.1", str(self.port)],
            capture_output=True, text=True, timeout=5, env=scu.dcmtk_env(), stdin=subprocess.DEVNULL)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.is_running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def datasets(self) -> dict[str, pydicom.Dataset]:
        """Every received file, parsed (file name -> dataset); AssertionError naming the
        files storescp left unreadable."""
        bad = []
        for p in self.files():
            if p.name in self._parsed:
                continue
            try:
                self._parsed[p.name] = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception as e:  # a partial or broken file is a finding, reported below
                bad.append(f"{p.name}: {e!r}")
        assert not bad, f"the clinic PACS holds {len(bad)} unreadable files: {bad[:5]}"
        return dict(self._parsed)

    def received(self) -> "collections.Counter[str]":
        """SOP Instance UID -> how many times the PACS received it."""
        return collections.Counter(str(ds.SOPInstanceUID) for ds in self.datasets().values())

    def log_tail(self, n: int = 40) -> str:
        if not self.log.exists():
            return "(no storescp log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------
# what the tests pass around


@dataclass
class Booking:
    clinic: str
    appointment_id: str
    accession: str
    patient: dict
    clerk: kiosk.Kiosk


@dataclass
class Study:
    booking: Booking
    study_uid: str
    files: list[data.SyntheticFile]

    @property
    def uids(self) -> set[str]:
        return {f.sop_instance_uid for f in self.files}


@dataclass
class PacsTls:
    """A PACS in TLS (`storescp +tls ... --require-peer-cert`): its certificate, the CA it
    and its clients' certificates come from, and a client certificate for the start probe."""
    server: pki.KeyPair
    ca: Path
    probe: pki.KeyPair


@dataclass
class Clinic:
    name: str
    pacs: Pacs
    emr: Peer
    issuer: str
    staff: dict[str, kiosk.Kiosk] = field(default_factory=dict)


# --------------------------------------------------------------------------
# HL7


def hl7_now() -> str:
    return dt.datetime.now().strftime("%Y%m%d%H%M%S")


def oru_r01(booking: Booking, control_id: str, status: str = "F", placer: str | None = None) -> hl7msg.Msg:
    """The RIS's report of the booked exam: PID with the core's Patient ID (and the booked
    name, in kanji), ORC/OBR with the placer order number the core's OMG^O19 used
    (``<appointment id>^GATEWAYD``) and the filler = accession, OBR-18 = accession, OBR-25 =
    ``status``, the Japanese text of `REPORT` in OBX TX lines; UTF-8 (MSH-18)."""
    now = hl7_now()
    placer = placer if placer is not None else f"{booking.appointment_id}^GATEWAYD"
    filler = f"{booking.accession}^GATEWAYD"
    obr = [""] * 26
    obr[0], obr[1], obr[2], obr[3] = "OBR", "1", placer, filler
    obr[4] = "CT^CT chest with contrast^L"
    obr[7] = now
    obr[18] = booking.accession
    obr[22] = now
    obr[25] = status
    name = booking.patient["name"]
    birth = booking.patient["birth_date"].replace("-", "")
    segments = [
        f"MSH|^~\\&|ZZRIS|{CORE_ISSUER}|GATEWAYD|CORE|{now}||ORU^R01^ORU_R01|{control_id}|P|2.5.1"
        "|||||JPN|UNICODE UTF-8",
        f"PID|1||{CORE_PATIENT_ID}^^^{CORE_ISSUER}^PI||{name}||{birth}|F",
        f"ORC|RE|{placer}|{filler}||CM",
        "|".join(obr),
    ]
    for i, (code, text) in enumerate(REPORT, start=1):
        segments.append(f"OBX|{i}|TX|{code}||{text}||||||{status}")
    return hl7msg.Msg(control_id, "\r".join(segments) + "\r", "utf-8", sending_app="ZZRIS",
                      sending_facility=CORE_ISSUER)


def pid3_repetitions(raw: bytes) -> list[list[str]]:
    """PID-3 of an HL7 message as [[id, check digit, code, authority, type], ...]."""
    pid = hl7msg.segment(raw.decode("utf-8", errors="replace"), "PID")
    assert pid is not None and len(pid) > 3, f"no PID-3 in {raw[:300]!r}"
    return [rep.split("^") for rep in pid[3].split("~")]


# --------------------------------------------------------------------------
# the kiosk's view (FHIR ImagingStudy / DiagnosticReport)


def _flatten_extensions(exts: list[dict], prefix: str = "") -> dict[str, Any]:
    """``{url tail (dotted under a parent extension): value}`` of FHIR extensions; the tail
    is what follows the url's last ``/``, ``#`` or ``:`` (``urn:gatewayd:results:complete``
    -> ``complete``)."""
    out: dict[str, Any] = {}
    for e in exts or []:
        tail = re.split(r"[/#:]", e.get("url", "").rstrip("/:"))[-1]
        key = f"{prefix}{tail}"
        values = [v for k, v in e.items() if k.startswith("value")]
        if values:
            out[key] = values[0]
        if e.get("extension"):
            out.update(_flatten_extensions(e["extension"], key + "."))
    return out


def imaging_study(k: kiosk.Kiosk, appointment_id: str) -> dict | None:
    """The ImagingStudy the kiosk shows for the appointment, or None (empty Bundle)."""
    r = k.request("GET", f"/fhir/ImagingStudy?based-on=Appointment/{appointment_id}")
    assert r.status == 200, f"GET /fhir/ImagingStudy?based-on=Appointment/{appointment_id}: {r}"
    bundle = r.json()
    entries = [e["resource"] for e in bundle.get("entry", [])]
    assert len(entries) <= 1, f"more than one ImagingStudy for one appointment: {bundle}"
    return entries[0] if entries else None


def results_counts(study: dict | None) -> dict[str, Any]:
    """What an ImagingStudy says about the results: ``announced`` (numberOfInstances),
    ``images_received``, ``images_delivered``, ``report_received``, ``report_delivered``
    (from its extensions, found by the url's last segment, e.g. ``.../images-received``
    or ``.../report`` with sub-extensions ``received``/``delivered``), and ``raw``."""
    if study is None:
        return {}
    flat = _flatten_extensions(study.get("extension", []))

    def pick(*, report: bool, word: str) -> Any:
        hits = [v for k, v in flat.items()
                if word in k.lower() and ("report" in k.lower()) == report and "fail" not in k.lower()]
        return hits[0] if len(hits) == 1 else ("ambiguous" if hits else None)

    return {
        "announced": study.get("numberOfInstances"),
        "images_received": pick(report=False, word="received"),
        "images_delivered": pick(report=False, word="delivered"),
        "report_received": pick(report=True, word="received"),
        "report_delivered": pick(report=True, word="delivered"),
        "status": study.get("status"),
        "raw": flat,
    }


# --------------------------------------------------------------------------
# the environment


def as_core_made(f: "data.SyntheticFile", booking: "Booking", kind: str, edit=None) -> "data.SyntheticFile":
    """Rewrites the CT file ``f`` as the core's modality makes it from the worklist: the booked
    accession and name, the CORE's Patient ID and issuer (``edit(ds)`` may change more, e.g. the
    pixel size, before it is saved)."""
    ds = pydicom.dcmread(f.path)
    if edit is not None:
        edit(ds)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = booking.patient["name"]
    ds.PatientID = CORE_PATIENT_ID
    ds.IssuerOfPatientID = CORE_ISSUER
    ds.PatientBirthDate = booking.patient["birth_date"].replace("-", "")
    ds.PatientSex = "F"
    ds.AccessionNumber = booking.accession
    ds.save_as(f.path, enforce_file_format=True)
    return data.SyntheticFile(f.path, f.sop_instance_uid, f.sop_class_uid, booking.patient["name"],
                              CORE_PATIENT_ID, kind)


class ResultsEnv:
    """See the module docs. ``pacs_running=False`` leaves every PACS stopped (start it with
    ``env.clinics[name].pacs.start()``)."""

    def __init__(self, tmp_path: Path, gateway_factory, ca: pki.CA, clinics: tuple[str, ...] = ("clinic-a",),
                 results: bool = True, complete_after: str = "5s", limit_rate: str | None = None,
                 pacs_tls: bool = False):
        self.tmp_path = Path(tmp_path)
        self.ca = ca
        self.results = results
        self.complete_after = complete_after
        self.root = self.tmp_path / "results-env"
        self.root.mkdir(parents=True, exist_ok=True)
        self.servers: list[Any] = []
        fleet.require_tools()
        mtls.nginx_binary()
        mtls.orthanc_binary()
        missing = scu.missing_dcmtk_tools()
        assert not missing, f"DCMTK tools missing: {missing}; `apt-get install -y dcmtk` (run-all.sh does this)"

        # the cloud
        lua = self.root / "receipts.lua"
        lua.write_text(mtls.receipt_lua())
        self.cloud = mtls.Ingress(self.root / "cloud", ca, lua_scripts=[lua], limit_rate=limit_rate)
        # the regional broker
        self.broker = fleet.Broker(self.root / "broker", ca, acl=kiosk.REGIONAL_ACL)
        # each clinic's PACS and EMR
        self.clinics: dict[str, Clinic] = {}
        for name in clinics:
            tls = None
            if pacs_tls:
                tls = PacsTls(ca.server_cert("127.0.0.1", name=f"pacs-{name}"), ca.cert,
                              ca.other_client_cert(f"{name}-pacs-probe", name=f"pacs-probe-{name}"))
            self.clinics[name] = Clinic(name, Pacs(self.root / f"pacs-{name}", tls=tls),
                                        Peer(self.root / f"emr-{name}", ca), ISSUERS.get(name, f"ZZ-{name}"))
        self.hl7_port = gw.free_port()
        self._staff_n = 0
        self._gateway_factory = gateway_factory
        self.region: kiosk.Region | None = None

    # -- config --------------------------------------------------------------

    def _cloud_uplink(self, who: str) -> dict:
        cert = self.ca.other_client_cert(f"{who}-cloud", name=f"cloud-{who}")
        return {"name": CLOUD, "kind": "dicomweb", "url": self.cloud.dicomweb_url, "ca_file": str(self.ca.cert),
                "client_auth": "files", "cert_file": str(cert.cert), "key_file": str(cert.key)}

    def core_config(self) -> dict:
        cfg: dict[str, Any] = {"uplink": [self._cloud_uplink(CORE)],
                               "hl7": {"listen": f"127.0.0.1:{self.hl7_port}"}}
        if self.results:
            cfg["results"] = {"source": CLOUD, "complete_after": self.complete_after}
            # The identity registry records each referral disclosure (issue 17).
            cfg["identity"] = {}
        return cfg

    def clinic_config(self, c: Clinic) -> dict:
        emr_cert = self.ca.other_client_cert(f"{c.name}-emr", name=f"emr-{c.name}")
        emr = {"name": EMR_UPLINK, "kind": "mllp-tls", "url": f"mllps://127.0.0.1:{c.emr.port}",
               "ca_file": str(self.ca.cert), "client_auth": "files", "cert_file": str(emr_cert.cert),
               "key_file": str(emr_cert.key)}
        cfg: dict[str, Any] = {"uplink": [self._cloud_uplink(c.name), emr]}
        if self.results:
            emr["message_types"] = ["ORU^R01"]
            cfg["results"] = {
                "source": CLOUD,
                "rewrite_patient_id": True,
                "patient_id_issuer": c.issuer,
                "deliver": [
                    {"name": PACS_DEST, "kind": "dicom", "host": "127.0.0.1", "port": c.pacs.port,
                     "called_ae": c.pacs.aet, "calling_ae": "GATEWAY"},
                    {"name": "emr-reports", "kind": "hl7", "uplink": EMR_UPLINK},
                ],
            }
            if c.pacs.tls:
                # DICOM over TLS to the PACS, the clinic's own client certificate.
                client = self.ca.other_client_cert(f"{c.name}-pacs", name=f"pacs-client-{c.name}")
                cfg["results"]["deliver"][0].update({"tls_ca_file": str(c.pacs.tls.ca),
                                                     "tls_cert_file": str(client.cert),
                                                     "tls_key_file": str(client.key)})
        return cfg

    # -- life cycle ----------------------------------------------------------

    def start(self, pacs_running: bool = True) -> "ResultsEnv":
        self.cloud.start()
        self.servers.append(self.cloud)
        self.broker.start()
        self.servers.append(self.broker)
        for c in self.clinics.values():
            c.emr.start()
            self.servers.append(c.emr)
            if pacs_running:
                c.pacs.start()
            self.servers.append(c.pacs)
        self.region = kiosk.Region(self._gateway_factory, self.broker, clinics=tuple(self.clinics),
                                   core=CORE, core_extra=self.core_config())
        for c in self.clinics.values():
            g = self.region.gateways[c.name]
            g.config = gw.deep_merge(g.config, self.clinic_config(c))
            g.config_path.write_text(gw.to_toml(g.config))
        for g in self.region.gateways.values():
            r = g.check_config()
            assert r.returncode == 0, (f"check-config refused {g.name}'s config (exit {r.returncode}):\n"
                                       f"{r.stdout}{r.stderr}\n{g.config_path.read_text()}")
        self.region.start()
        return self

    def close(self) -> None:
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception:  # teardown: keep stopping the others
                pass
            cleanup = getattr(s, "cleanup", None)
            if callable(cleanup):
                cleanup()

    @property
    def core(self) -> gw.Gateway:
        return self.region.gateways[CORE]

    def gateway(self, clinic: str) -> gw.Gateway:
        return self.region.gateways[clinic]

    def staff(self, clinic: str, role: str = "clerk") -> kiosk.Kiosk:
        """A logged-in session of a new staff account with ``role`` at ``clinic``'s kiosk."""
        self._staff_n += 1
        name = f"{role}.r{self._staff_n}"
        k = self.region.staff_session(clinic, name, role)
        k.account = name
        return k

    # -- the exam --------------------------------------------------------------

    def book(self, clinic: str = "clinic-a", patient: dict | None = None, request_id: str = "req-res-1") -> Booking:
        """A clerk at ``clinic`` books a CT exam for ``patient`` (the clinic's own Patient ID)."""
        patient = patient or PATIENT
        clerk = self.staff(clinic, "clerk")
        slot = first_free(clerk)
        r = clerk.book(request_id, slot, patient)
        assert r.status == 201, f"booking at {clinic}'s kiosk: {r}"
        appt = r.json()
        acc = [i["value"] for i in appt.get("identifier", []) if i.get("system") == "urn:gatewayd:accession"]
        assert len(acc) == 1, f"the booked appointment has no accession number: {appt}"
        return Booking(clinic, appt["id"], acc[0], patient, clerk)

    def make_study(self, booking: Booking, n: int, n_ct: int, seed: int = 16) -> Study:
        """``n`` CT instances of one study as the core's modality makes them from the
        worklist: the booked accession and name, but the CORE's Patient ID (and issuer);
        ``n_ct`` of them 512x512, the rest 16x16, in a seeded shuffled order; a Study
        Instance UID generated here (the worklist's is not used: the core must match by
        accession)."""
        d = self.root / f"study-{booking.appointment_id}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        kinds = ["ct"] * n_ct + ["small"] * (n - n_ct)
        random.Random(seed).shuffle(kinds)
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for i, kind in enumerate(kinds):
            f = data.make_ct_file(d / f"{i:05d}.dcm", i, kind, study_uid, series_uid)
            files.append(as_core_made(f, booking, kind))
        assert len({f.sop_instance_uid for f in files}) == n
        return Study(booking, study_uid, files)

    def send_study(self, study: Study) -> None:
        """storescu of every file to the core's DICOM port (the core's modality)."""
        store(self.core, study.files)

    def send_oru(self, booking: Booking, control_id: str = "ZZORU0001", status: str = "F") -> hl7msg.Msg:
        """The core's RIS sends the report over MLLP; the core must answer AA."""
        m = oru_r01(booking, control_id, status)
        with MllpConnection(self.hl7_port) as c:
            ack = c.request(m.bytes)
        assert msa(ack) == ("AA", control_id), f"the core answered the ORU^R01 with {ack!r}"
        return m

    # -- waiting -----------------------------------------------------------------

    def wait_cloud(self, study: Study, timeout: float = 60) -> None:
        """Orthanc has received every instance of the study (through the core's uplink)."""
        def check():
            got = study.uids & set(self.cloud.orthanc.received_uids())
            return len(got) == len(study.uids), f"{len(got)} of {len(study.uids)}"

        try:
            poll("the cloud archive (Orthanc) receiving the study from the core", check, timeout, 0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\ncore spool: {self.core.status()}\ncore log:\n{self.core.log_tail(30)}") from None

    def wait_pacs(self, clinic: str, study: Study, timeout: float, extra_settle: float = 3.0) -> "collections.Counter[str]":
        """Every instance of the study is at ``clinic``'s PACS; then waits ``extra_settle`` s
        more (a duplicate would show) and returns SOP UID -> times received."""
        pacs = self.clinics[clinic].pacs
        n = len(study.uids)
        start = time.monotonic()
        while True:
            files = len(pacs.files())
            if files >= n and study.uids <= set(pacs.received()):
                break
            if time.monotonic() - start > timeout:
                g = self.gateway(clinic)
                raise AssertionError(
                    f"{clinic}'s PACS got {len(study.uids & set(pacs.received()))} of {n} instances "
                    f"({files} files) after {timeout:.0f} s\n{clinic} spool: {self._status(g)}\n"
                    f"storescp log:\n{pacs.log_tail(10)}")
            time.sleep(0.25)
        time.sleep(extra_settle)
        return pacs.received()

    def wait_emr(self, clinic: str, control_id: str, timeout: float, extra_settle: float = 3.0) -> list[bytes]:
        """``clinic``'s EMR received the message ``control_id``; then ``extra_settle`` s more;
        returns every copy it received."""
        emr = self.clinics[clinic].emr
        start = time.monotonic()
        while not [raw for cid, raw in emr.received() if cid == control_id]:
            if time.monotonic() - start > timeout:
                g = self.gateway(clinic)
                raise AssertionError(
                    f"{clinic}'s EMR got no ORU^R01 {control_id} after {timeout:.0f} s "
                    f"(it received {[cid for cid, _ in emr.received()]})\n{clinic} spool: {self._status(g)}")
            time.sleep(0.25)
        time.sleep(extra_settle)
        return [raw for cid, raw in emr.received() if cid == control_id]

    def wait_kiosk(self, k: kiosk.Kiosk, appointment_id: str, what: str, cond, timeout: float) -> dict:
        """Polls the kiosk's ImagingStudy until ``cond(results_counts(...))``."""
        last: dict = {}
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            last = results_counts(imaging_study(k, appointment_id))
            if last and cond(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"the kiosk did not show {what} within {timeout:.0f} s; last: {last or 'no ImagingStudy'}")

    @staticmethod
    def _status(g: gw.Gateway) -> Any:
        try:
            return g.status()
        except AssertionError as e:
            return f"(spool status failed: {e})"

    def spool_objects(self, clinic: str) -> int:
        """Objects in ``clinic``'s spool, from /metrics (fast enough to poll)."""
        return int(sum(gw.metric_values(self.gateway(clinic).metrics(), "gateway_spool_objects")))

    # -- the broker ---------------------------------------------------------------

    def capture(self) -> fleet.Subscription:
        """Everything published on the broker from now on, as its admin sees it (`#`)."""
        s = self.broker.subscribe("vendor", "#")
        self.servers.append(s)
        time.sleep(0.5)
        return s

    def needles(self, study: Study | None, booking: Booking) -> list[str]:
        """Every piece of patient data of the exam, to look for in clear."""
        p = booking.patient
        out = [p["id"], CORE_PATIENT_ID, booking.accession, "ZZTEST", "HANAKO", "山田", "花子", "やまだ",
               p["birth_date"], p["birth_date"].replace("-", "")]
        out += [text for _, text in REPORT]
        if study is not None:
            out.append(study.study_uid)
            out += sorted(study.uids)[:5]
        return out

    # -- logs for failure reports ----------------------------------------------------

    def hwtests_log_sections(self) -> list[tuple[str, str]]:
        out = [("mosquitto log", self.broker.log_tail(40))]
        log = self.cloud.orthanc.log_path
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = [line for line in text.splitlines() if not mtls.RECEIPT_LINE.search(line)]
        received = self.cloud.orthanc.received_uids()
        out += [("nginx logs (cloud)", self.cloud.nginx.log_tail(40)),
                ("Orthanc log (cloud)", "\n".join(lines[-30:] + [
                    f"(receipts: {sum(received.values())} instances received, {len(received)} distinct)"]))]
        for c in self.clinics.values():
            out.append((f"storescp log ({c.name})", c.pacs.log_tail(20)))
        return out


def assert_no_clear(blob: bytes, needles: list[str], where: str) -> None:
    """None of ``needles`` appears in ``blob`` (UTF-8)."""
    found = [n for n in needles if n and n.encode("utf-8") in blob]
    assert not found, f"patient data in clear in {where}: {found}"


class EnvFactory:
    """Makes `ResultsEnv`s for a test; closes them at teardown; offers their logs to
    failure reports (conftest's `hwtests_log_sections`)."""

    def __init__(self, tmp_path: Path, gateway_factory, ca: pki.CA):
        self.tmp_path, self.gateway_factory, self.ca = tmp_path, gateway_factory, ca
        self.made: list[ResultsEnv] = []

    def __call__(self, **kw) -> ResultsEnv:
        """Keywords of `ResultsEnv` (``clinics``, ``results``, ``limit_rate``); not started.
        ``results`` defaults to the ``HWTESTS_RESULTS`` environment variable (``0``: leave
        the feature's config out, to prove the harness against a binary without it)."""
        kw.setdefault("results", os.environ.get("HWTESTS_RESULTS", "1") != "0")
        env = ResultsEnv(self.tmp_path / f"env{len(self.made)}", self.gateway_factory, self.ca, **kw)
        self.made.append(env)
        return env

    def close(self) -> None:
        for env in self.made:
            env.close()

    def hwtests_log_sections(self) -> list[tuple[str, str]]:
        return [s for env in self.made for s in env.hwtests_log_sections()]
