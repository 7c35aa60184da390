"""The audit trail as DICOM PS3.15 A.5 audit messages, against a real `gatewayd run`.

Events come from real use: staff accounts through `gatewayd users ...` (added, TOTP
enrolled, invited, disabled), kiosk logins over HTTPS (one right, one wrong password), and
DICOM C-STORE with DCMTK `storescu` (two studies of two patients in one association: one
"DICOM instances transferred" record per study, with the Patient ID and Study UID sealed).
`gatewayd audit export --format a5` prints every record as its RFC 5424 syslog message;
each message's XML is validated against the standard's audit message schema
(hw-tests/schema/dicom-audit-message.rnc, PS3.15 A.5.1.1), converted with Debian's `trang`
to RELAX NG XML and to XSD and checked with `xmllint` against both. The EventID of each
action is asserted; the Patient IDs and Study UIDs appear in the transfer messages only,
and nowhere in clear under the data folder or in the daemon's log.

Outbound: a `kind = "dicomweb"` uplink to Orthanc behind nginx with mutual TLS (the
ingress of test_uplink.py): every confirmed STOW-RS batch gives one "DICOM instances
transferred" record per study (EventActionCode R, the gateway the source, the uplink the
destination), and the instance counts of a study's records add up to what was sent.

Peers: DCMTK (storescu), trang, xmllint (Debian `trang`, `libxml2-utils`), Orthanc and
nginx for the outbound test: a missing one is a failure naming the package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import data
import gw
import kiosk
import scu
from test_staff_accounts import kiosk_gateway
from test_uplink import DEST, client_cert, ingress, ingress_factory, store, uplink_config, wait_delivered  # noqa: F401

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema" / "dicom-audit-message.rnc"

HEADER = re.compile(
    r'^<(8[45])>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) gatewayd - IHE\+RFC-3881 '
    r'\[meta sequenceId="(\d+)"\] (<\?xml .*)$'
)

# action (as the chain names it) -> EventID code (A.5.3)
EVENT_IDS = {
    "account_added": "110113",
    "totp_enrolled": "110113",
    "account_invited": "110113",
    "account_disabled": "110113",
    "login": "110114",
    "dicom_instances_received": "110104",
    "dicom_instances_sent": "110104",
}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory) -> tuple[Path, Path]:
    """The standard's RNC converted to RELAX NG XML and to XSD with trang.

    The standard prints documentation comments (`##`) after the last value of a choice,
    where the compact syntax's grammar does not allow them (trang: "syntax error"); they
    are turned into plain comments (`#`) first, which changes no pattern."""
    for tool, package in (("trang", "trang"), ("xmllint", "libxml2-utils")):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` not found on PATH: apt-get install -y --no-install-recommends {package} "
                        "(hw-tests/run-all.sh does this)", pytrace=False)
    out = tmp_path_factory.mktemp("schema")
    rnc = out / "dicom-audit-message.rnc"
    rnc.write_text(SCHEMA.read_text().replace("##", "# "))
    rng, xsd = out / "audit.rng", out / "audit.xsd"
    for target in (rng, xsd):
        r = subprocess.run(["trang", "-I", "rnc", "-O", target.suffix[1:], str(rnc), str(target)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"trang {target.suffix}: {r.stdout}{r.stderr}"
    return rng, xsd


def validate(schemas: tuple[Path, Path], xml_files: list[Path]) -> None:
    rng, xsd = schemas
    for flag, schema in (("--relaxng", rng), ("--schema", xsd)):
        r = subprocess.run(["xmllint", "--noout", flag, str(schema), *map(str, xml_files)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"xmllint {flag}:\n{r.stderr[-4000:]}"
        assert r.stderr.count(" validates") == len(xml_files), r.stderr[-2000:]


def export(g: gw.Gateway, after: int = 0) -> list[str]:
    r = g.cli("audit", "export", "--config", str(g.config_path), "--format", "a5", "--from", str(after))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_schema_rejects_a_message_that_breaks_it(schemas, tmp_path):
    """The validation can fail: a message without AuditSourceIdentification is refused."""
    bad = tmp_path / "bad.xml"
    bad.write_text('<?xml version="1.0" encoding="UTF-8"?><AuditMessage><EventIdentification '
                   'EventDateTime="2026-01-01T00:00:00Z" EventOutcomeIndicator="0"><EventID csd-code="110114" '
                   'codeSystemName="DCM" originalText="User Authentication"/></EventIdentification>'
                   '<ActiveParticipant UserID="a" UserIsRequestor="true"/></AuditMessage>')
    for flag, schema in (("--relaxng", schemas[0]), ("--schema", schemas[1])):
        r = subprocess.run(["xmllint", "--noout", flag, str(schema), str(bad)], capture_output=True, text=True)
        assert r.returncode != 0 and "fails to validate" in r.stderr, (flag, r.stderr)


def test_every_record_exports_as_a_schema_valid_a5_message(gateway_factory, schemas, tmp_path):
    g, port = kiosk_gateway(gateway_factory)
    secret = kiosk.add_staff(g, "clerk.a")                 # account_added, totp_enrolled
    r = kiosk.cli(g, "users", "invite", "--name", "clerk.b", "--role", "clerk")
    assert r.returncode == 0, r.stderr                     # account_invited
    r = kiosk.cli(g, "users", "disable", "--name", "clerk.b")
    assert r.returncode == 0, r.stderr                     # account_disabled
    g.start()

    k = kiosk.Kiosk(g, port)
    assert k.login("clerk.a", secret).status == 200                     # login, success
    assert kiosk.Kiosk(g, port, "127.0.0.9").login("clerk.a", secret, password="wrong password!").status == 401

    # Two studies of two patients in one association: 3 CT + 2 CT instances.
    files, studies = two_studies(tmp_path)
    r = scu.storescu(g.dicom_port, [f.path for f in files])
    assert r.returncode == 0, r.stderr

    log = g.data_dir / "audit" / "audit.jsonl"

    def records() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()]

    kiosk.wait_until(lambda: sum(r["action"] == "dicom_instances_received" for r in records()) == 2,
                     30, "two DICOM transfer records")
    chain = records()

    lines = export(g)
    assert len(lines) == len(chain), (len(lines), len(chain))
    xml_files = []
    for n, (line, record) in enumerate(zip(lines, chain)):
        m = HEADER.match(line)
        assert m, line[:200]
        pri, _ts, host, seq, xml = m.groups()
        assert host == "core-1"
        assert int(seq) == record["seq"]
        assert pri == ("84" if record["outcome"] == "failure" else "85"), (pri, record)
        want = EVENT_IDS.get(record["action"])
        got = re.search(r'<EventID csd-code="(\d+)" codeSystemName="DCM"', xml)
        assert got, xml
        if want:
            assert got.group(1) == want, (record["action"], got.group(1))
        path = tmp_path / f"msg-{n:04d}.xml"
        path.write_text(xml)
        xml_files.append(path)
    validate(schemas, xml_files)

    actions = [r["action"] for r in chain]
    for a in ("account_added", "totp_enrolled", "account_invited", "account_disabled", "login"):
        assert a in actions, (a, actions)
    logins = [(r["outcome"], line) for r, line in zip(chain, lines) if r["action"] == "login"]
    assert {o for o, _ in logins} == {"success", "failure"}, logins
    assert all(('EventOutcomeIndicator="4"' in l) == (o == "failure") for o, l in logins)

    # The transfer messages carry the Study (110180, with SOP class counts) and the
    # Patient (ID type 2); no other message names them.
    transfers = [line for r, line in zip(chain, lines) if r["action"] == "dicom_instances_received"]
    for study, pid in studies.items():
        carrying = [t for t in transfers if f'ParticipantObjectID="{study}"' in t]
        assert len(carrying) == 1, study
        t = carrying[0]
        assert f'ParticipantObjectID="{pid}" ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"' in t
        assert '<ParticipantObjectIDTypeCode csd-code="110180" codeSystemName="DCM"' in t
        count = 3 if pid == data.patient_id(7) else 2
        assert f'<SOPClass UID="1.2.840.10008.5.1.4.1.1.2" NumberOfInstances="{count}"/>' in t
        assert 'UserID="CT01" UserIsRequestor="true" NetworkAccessPointID="127.0.0.1"' in t
        others = [l for r, l in zip(chain, lines) if r["action"] != "dicom_instances_received"]
        assert not any(study in l or pid in l for l in others)

    # Not in clear anywhere under the data folder (audit chain, spool, indexes) nor in
    # the daemon's log.
    needles = [s.encode() for s in studies] + [p.encode() for p in studies.values()]
    for f in [p for p in g.data_dir.rglob("*") if p.is_file()] + [g.log_path]:
        blob = f.read_bytes()
        for needle in needles:
            assert needle not in blob, f"{needle!r} in clear in {f}"

    # The chain still verifies with the sealed parts in it, and --from continues after a
    # position.
    r = g.cli("audit", "verify", "--config", str(g.config_path), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["problem"] is None, r.stdout + r.stderr
    tail = export(g, chain[-3]["seq"])
    assert tail == lines[-2:]


def two_studies(tmp_path: Path, counts: tuple[int, int] = (3, 2)) -> tuple[list, dict[str, str]]:
    """CT files of two studies of two patients; {study uid: patient id}."""
    files, studies = [], {}
    for patient, count in zip((7, 8), counts):
        study = f"1.2.826.0.1.3680043.8.498.{patient}{patient}{patient}.{patient}"
        studies[study] = data.patient_id(patient)
        for n in range(count):
            path = tmp_path / "dcm" / f"p{patient}-{n}.dcm"
            path.parent.mkdir(exist_ok=True)
            files.append(data.make_ct_file(path, patient, study_uid=study))
    return files, studies


def test_confirmed_stow_batches_are_audited_per_study(gateway_factory, schemas, ca, client_cert, ingress, tmp_path):
    g = gateway_factory(uplink_config(ingress, ca.cert, client_cert))
    files, studies = two_studies(tmp_path, (4, 3))
    store(g, files)
    wait_delivered(g, ingress, len(files), 60)
    log = g.data_dir / "audit" / "audit.jsonl"

    def sent_records() -> list[dict]:
        if not log.exists():  # the first record is written a moment after the batch
            return []
        return [r for r in map(json.loads, log.read_text().splitlines()) if r["action"] == "dicom_instances_sent"]

    # At least one record per study (batches confirmed within a second of each other are
    # merged per study; a study whose batches are further apart gets more than one), until
    # every instance sent is counted.
    def instances_in_sent_messages() -> int:
        if len(sent_records()) < 2:
            return 0
        return sum(int(n) for line in export(g) if 'EventActionCode="R"' in line
                   for n in re.findall(r'NumberOfInstances="(\d+)"', line))

    kiosk.wait_until(lambda: instances_in_sent_messages() == len(files), 30, "every sent instance audited")
    chain = [json.loads(line) for line in log.read_text().splitlines()]
    lines = export(g)
    assert len(lines) == len(chain)
    xml_files = []
    counted: dict[str, int] = {}
    for n, (line, record) in enumerate(zip(lines, chain)):
        m = HEADER.match(line)
        assert m and int(m.group(4)) == record["seq"], line[:200]
        xml = m.group(5)
        path = tmp_path / f"msg-{n:04d}.xml"
        path.write_text(xml)
        xml_files.append(path)
        if record["action"] != "dicom_instances_sent":
            continue
        assert record["actor"] == "system" and record["subject"] == f"destination:{DEST}", record
        assert 'EventActionCode="R"' in xml and 'csd-code="110104"' in xml, xml
        assert ('<ActiveParticipant UserID="test-gw" AlternativeUserID="gatewayd" UserIsRequestor="true">'
                '<RoleIDCode csd-code="110153"') in xml, xml
        assert (f'<ActiveParticipant UserID="{DEST}" UserIsRequestor="false"><RoleIDCode csd-code="110152"') in xml, xml
        study = re.search(r'ParticipantObjectID="([0-9.]+)" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3"', xml)
        assert study and study.group(1) in studies, xml
        assert f'ParticipantObjectID="{studies[study.group(1)]}" ParticipantObjectTypeCode="1"' in xml, xml
        count = re.search(r'<SOPClass UID="1.2.840.10008.5.1.4.1.1.2" NumberOfInstances="(\d+)"/>', xml)
        assert count, xml
        counted[study.group(1)] = counted.get(study.group(1), 0) + int(count.group(1))
    validate(schemas, xml_files)
    want = {s: (4 if p == data.patient_id(7) else 3) for s, p in studies.items()}
    assert counted == want, (counted, want)
    needles = [s.encode() for s in studies] + [p.encode() for p in studies.values()]
    for f in [p for p in g.data_dir.rglob("*") if p.is_file()] + [g.log_path]:
        blob = f.read_bytes()
        for needle in needles:
            assert needle not in blob, f"{needle!r} in clear in {f}"
