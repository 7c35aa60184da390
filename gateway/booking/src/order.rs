//! The HL7 v2.5.1 order a booked exam becomes for the core's RIS: OMG^O19 (general clinical
//! order) with the imaging segments, UTF-8 (`MSH-18` = `UNICODE UTF-8`).
//!
//! Segments: `MSH`, `PID` (identifier, names as XPN repetitions: alphabetic `A`,
//! ideographic `I`, phonetic `P` per JAHIS, birth date, sex), `ORC` (`NW`, placer order
//! number = appointment id, filler = accession), `TQ1` (start and end), `OBR` (procedure,
//! accession in OBR-18, modality in OBR-24, scheduled time in OBR-36) and `IPC` (accession,
//! requested procedure id, study instance UID, scheduled procedure step id, modality,
//! scheduled station AE title) - the same identifiers the worklist serves.
//!
//! Safety alerts: each contrast reaction the booking was acknowledged with
//! ([`Appointment::alerts`]) is one `AL1` segment in the PATIENT group, after `PID` (where
//! OMG_O19 puts it: `PID [PD1] [NTE] [PV1] [IN1] [GT1] [AL1]`, before the ORDER group):
//! AL1-1 set id, AL1-2 `DA` (drug allergy: contrast media are drugs), AL1-3 the allergen
//! `code^text^system` as the source sent it (`^text` when only text was sent, `^iodinated
//! contrast` when only the class is known), AL1-4 severity (table 0128 `SV`/`MO`/`MI`/`U`:
//! a known code as sent, `U` for any other value, empty when none was sent), AL1-5 the
//! reactions (repetitions), AL1-6 identification date (`YYYY[MM[DD]]`) when known. Japanese
//! text goes as it is, the message being UTF-8. No alerts: no `AL1`.
//!
//! Every value is escaped (`\F\ \S\ \T\ \R\ \E\`), so no text can add a field or segment.

use jiff::Timestamp;

use crate::ledger::Appointment;
use crate::safety::{SafetyWarning, WarningKind};
use crate::schedule::Schedule;
use crate::worklist::agent_parts;

/// HL7 escape of one value (encoding characters `|^~\&`, and CR/LF dropped).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '~' => out.push_str("\\R\\"),
            '\\' => out.push_str("\\E\\"),
            '&' => out.push_str("\\T\\"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `YYYYMMDDHHMMSS` of an RFC 3339 local time (`2027-01-12T09:30:00+09:00`), keeping the
/// schedule's local clock time; empty if it is not one.
fn hl7_time(rfc3339: &str) -> String {
    let digits: String = rfc3339
        .get(..19)
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    if digits.len() == 14 {
        digits
    } else {
        String::new()
    }
}

/// XPN repetitions of a DICOM PN (`alpha=ideographic=phonetic`, components `^`).
fn names(pn: &str) -> String {
    pn.split('=')
        .zip(["A", "I", "P"])
        .filter(|(group, _)| !group.is_empty())
        .map(|(group, code)| {
            let mut parts = group.split('^');
            let family = escape(parts.next().unwrap_or(""));
            let given = escape(parts.next().unwrap_or(""));
            format!("{family}^{given}^^^^^L^{code}")
        })
        .collect::<Vec<_>>()
        .join("~")
}

/// A DICOM UID for the study of an appointment: `2.25.` and a decimal number made from the
/// accession and appointment id (stable, so a resend is the same study).
pub fn study_uid(a: &Appointment) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{}|{}", a.accession, a.id).as_bytes());
    let mut n: u128 = 0;
    for b in digest.iter().take(16) {
        n = (n << 8) | u128::from(*b);
    }
    // 2.25 UIDs are a UUID-sized integer; keep under 39 digits.
    format!("2.25.{}", n >> 2)
}

/// HL7 DT (`YYYY`, `YYYYMM` or `YYYYMMDD`) of a date as sent (`20250314`, `2025-03-14`,
/// `202503141020`); empty when it does not start with a year.
fn hl7_date(when: &str) -> String {
    let digits: String = when
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .filter(char::is_ascii_digit)
        .collect();
    let n = match digits.len() {
        0..=3 => 0,
        4 | 5 => 4,
        6 | 7 => 6,
        _ => 8,
    };
    // `digits` is ASCII: every index is a character boundary.
    digits.get(..n).unwrap_or("").to_string()
}

/// AL1-4: a table 0128 code as sent, `U` for any other value, empty when none.
fn al1_severity(severity: Option<&str>) -> &'static str {
    match severity.map(|s| s.trim().to_ascii_uppercase()).as_deref() {
        None | Some("") => "",
        Some("SV") => "SV",
        Some("MO") => "MO",
        Some("MI") => "MI",
        Some(_) => "U",
    }
}

/// AL1-3: the allergen as the source sent it (`code^text^system`), each component escaped.
fn al1_allergen(w: &SafetyWarning) -> String {
    match w.agent.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        Some(agent) => {
            let (code, text, system) = agent_parts(agent);
            let mut out = format!("{}^{}^{}", escape(code), escape(text), escape(system));
            while out.ends_with('^') {
                out.pop();
            }
            out
        }
        None => match w.contrast {
            Some(class) => format!("^{}", escape(class.en())),
            None => String::new(),
        },
    }
}

/// The `AL1` segments of an appointment's contrast reactions (set ids from 1).
fn al1_segments(alerts: &[SafetyWarning]) -> Vec<String> {
    alerts
        .iter()
        .filter(|w| w.kind == WarningKind::ContrastReaction)
        .enumerate()
        .map(|(i, w)| {
            let reactions = w
                .reactions
                .iter()
                .map(|r| escape(r.trim()))
                .filter(|r| !r.is_empty())
                .collect::<Vec<_>>()
                .join("~");
            segment(
                "AL1",
                &[
                    (1, (i + 1).to_string()),
                    (2, "DA".into()),
                    (3, al1_allergen(w)),
                    (4, al1_severity(w.severity.as_deref()).into()),
                    (5, reactions),
                    (6, w.when.as_deref().map(hl7_date).unwrap_or_default()),
                ],
            )
        })
        .collect()
}

/// A segment with the given fields (by HL7 field number) and the rest empty.
fn segment(name: &str, fields: &[(usize, String)]) -> String {
    let last = fields.iter().map(|(n, _)| *n).max().unwrap_or(0);
    let mut out = vec![String::new(); last.saturating_add(1)];
    if let Some(first) = out.first_mut() {
        name.clone_into(first);
    }
    for (n, v) in fields {
        // `last` is the largest field number, so every one has its place.
        if let Some(field) = out.get_mut(*n) {
            field.clone_from(v);
        }
    }
    out.join("|")
}

/// The OMG^O19 of a booked appointment (segments separated by CR).
pub fn omg_o19(
    a: &Appointment,
    schedule: &Schedule,
    facility: &str,
    control_id: &str,
    now: Timestamp,
) -> String {
    let e = escape;
    let at = now.strftime("%Y%m%d%H%M%S").to_string();
    let start = hl7_time(&a.start);
    let end = hl7_time(&a.end);
    let sex = match a.patient.sex.as_str() {
        "M" | "F" | "O" => a.patient.sex.as_str(),
        _ => "U",
    };
    let head = [
        format!(
            "MSH|^~\\&|GATEWAYD|{f}|RIS|{f}|{at}||OMG^O19^OMG_O19|{c}|P|2.5.1|||AL|NE||UNICODE UTF-8",
            f = e(facility),
            c = e(control_id)
        ),
        format!(
            "PID|1||{pid}^^^{clinic}||{names}||{birth}|{sex}",
            pid = e(&a.patient.id),
            clinic = e(&a.clinic),
            names = names(&a.patient.name),
            birth = e(&a.patient.birth_date),
        ),
    ];
    let order = [
        format!(
            "ORC|NW|{id}^GATEWAYD|{acc}^GATEWAYD||SC||||{at}",
            id = e(&a.id),
            acc = e(&a.accession)
        ),
        segment("TQ1", &[(1, "1".into()), (7, start.clone()), (8, end)]),
        segment(
            "OBR",
            &[
                (1, "1".into()),
                (2, format!("{}^GATEWAYD", e(&a.id))),
                (3, format!("{}^GATEWAYD", e(&a.accession))),
                (4, format!("^{}", e(&a.procedure))),
                (18, e(&a.accession)),
                (19, e(&a.id)),
                (24, e(schedule.modality())),
                (36, start.clone()),
            ],
        ),
        segment(
            "IPC",
            &[
                (1, e(&a.accession)),
                (2, e(&a.accession)),
                (3, study_uid(a)),
                (4, e(&a.id)),
                (5, e(schedule.modality())),
                (9, e(schedule.station_ae())),
            ],
        ),
    ];
    let segments: Vec<String> = head
        .into_iter()
        .chain(al1_segments(&a.alerts))
        .chain(order)
        .collect();
    let mut out = segments.join("\r");
    out.push('\r');
    out
}

/// The OMG^O19 of a booked appointment as it goes into the spool for the RIS, with the
/// message key that makes a repeat of the same booking one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RisOrder {
    /// Spool message key: `GATEWAYD|{facility}|{control id}` (MSH-3, MSH-4, MSH-10).
    pub key: String,
    /// MSH-10: `OMG-{appointment id}`.
    pub control_id: String,
    /// `OMG^O19`.
    pub message_type: &'static str,
    /// `UTF-8` (MSH-18 `UNICODE UTF-8`).
    pub charset: &'static str,
    /// The message, segments separated by CR.
    pub text: String,
}

/// The order for the RIS of a booked appointment on one of `schedules` (`facility`: this
/// gateway's node id, MSH-4 and MSH-6); `None` unless the appointment is `booked` and its
/// schedule is known.
pub fn ris_order(
    a: &Appointment,
    schedules: &[Schedule],
    facility: &str,
    now: Timestamp,
) -> Option<RisOrder> {
    if a.status != crate::ledger::AppointmentStatus::Booked {
        return None;
    }
    let schedule = schedules.iter().find(|s| s.id() == a.schedule)?;
    let control_id = format!("OMG-{}", a.id);
    let text = omg_o19(a, schedule, facility, &control_id, now);
    Some(RisOrder {
        key: format!("GATEWAYD|{facility}|{control_id}"),
        control_id,
        message_type: "OMG^O19",
        charset: "UTF-8",
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AppointmentStatus, PatientRef};
    use crate::schedule::ScheduleSpec;

    fn appointment() -> Appointment {
        Appointment {
            alerts: Vec::new(),
            id: "apt-00000007".into(),
            slot_id: "ct-1.20270112T0930".into(),
            schedule: "ct-1".into(),
            start: "2027-01-12T09:30:00+09:00".into(),
            end: "2027-01-12T10:00:00+09:00".into(),
            clinic: "clinic-a".into(),
            request_id: "r1".into(),
            patient: PatientRef {
                id: "ZZPID1".into(),
                name: "ZZTEST^HANAKO=山田^花子=やまだ^はなこ".into(),
                birth_date: "19610402".into(),
                sex: "F".into(),
            },
            procedure: "CT chest | contrast ^ 1".into(),
            accession: "RB20270112000007".into(),
            status: AppointmentStatus::Booked,
            hold_expires_unix: None,
            version: 1,
        }
    }

    #[test]
    fn omg_o19_carries_the_worklist_identifiers_and_escapes_text() {
        let schedule = Schedule::new(&ScheduleSpec {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            ..ScheduleSpec::default()
        })
        .unwrap();
        let now: Timestamp = "2027-01-10T00:00:00Z".parse().unwrap();
        let msg = omg_o19(&appointment(), &schedule, "core-1", "OMG-apt-00000007", now);
        let seg: Vec<&str> = msg.trim_end_matches('\r').split('\r').collect();
        assert_eq!(
            seg.iter().map(|s| &s[..3]).collect::<Vec<_>>(),
            ["MSH", "PID", "ORC", "TQ1", "OBR", "IPC"]
        );
        let fields = |s: &str| s.split('|').map(str::to_owned).collect::<Vec<_>>();
        let msh = fields(seg[0]);
        assert_eq!(msh[8], "OMG^O19^OMG_O19");
        assert_eq!(msh[9], "OMG-apt-00000007");
        assert_eq!(msh[17], "UNICODE UTF-8");
        let pid = fields(seg[1]);
        assert_eq!(pid[3], "ZZPID1^^^clinic-a");
        assert_eq!(
            pid[5],
            "ZZTEST^HANAKO^^^^^L^A~山田^花子^^^^^L^I~やまだ^はなこ^^^^^L^P"
        );
        assert_eq!((pid[7].as_str(), pid[8].as_str()), ("19610402", "F"));
        let obr = fields(seg[4]);
        assert_eq!(obr[4], "^CT chest \\F\\ contrast \\S\\ 1");
        assert_eq!(obr[18], "RB20270112000007");
        assert_eq!(obr[24], "CT");
        assert_eq!(obr[36], "20270112093000");
        let ipc = fields(seg[5]);
        assert_eq!(ipc[1], "RB20270112000007");
        assert!(ipc[3].starts_with("2.25.") && ipc[3].len() <= 64);
        assert_eq!((ipc[5].as_str(), ipc[9].as_str()), ("CT", "CT01"));
        assert_eq!(fields(seg[3])[7], "20270112093000");
        // Nothing in the text made a new field or segment.
        assert_eq!(seg.len(), 6);
        // The order for the spool: same text, keyed by sender, facility and control id.
        let order = ris_order(
            &appointment(),
            std::slice::from_ref(&schedule),
            "core-1",
            now,
        )
        .unwrap();
        assert_eq!(order.text, msg);
        assert_eq!(order.key, "GATEWAYD|core-1|OMG-apt-00000007");
        assert_eq!((order.message_type, order.charset), ("OMG^O19", "UTF-8"));
        let held = Appointment {
            status: AppointmentStatus::Pending,
            ..appointment()
        };
        assert!(ris_order(&held, std::slice::from_ref(&schedule), "core-1", now).is_none());
        assert!(ris_order(&appointment(), &[], "core-1", now).is_none());
        assert_eq!(
            escape("a|b^c~d\\e&f\rg"),
            "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g"
        );
    }

    fn reaction(agent: Option<&str>, severity: Option<&str>, when: Option<&str>) -> SafetyWarning {
        SafetyWarning {
            id: "w1".into(),
            kind: WarningKind::ContrastReaction,
            contrast: Some(crate::safety::ContrastClass::Iodinated),
            agent: agent.map(Into::into),
            severity: severity.map(Into::into),
            reactions: vec!["蕁麻疹".into(), "wheeze | rash".into()],
            when: when.map(Into::into),
            hospital: "hosp-a".into(),
            text_en: "Reaction to iodinated contrast".into(),
            text_ja: "ヨード造影剤の副作用歴".into(),
        }
    }

    fn ct() -> Schedule {
        Schedule::new(&ScheduleSpec {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            ..ScheduleSpec::default()
        })
        .unwrap()
    }

    #[test]
    fn each_contrast_reaction_is_an_al1_after_pid_that_gateway_hl7_reads_back() {
        let now: Timestamp = "2027-01-10T00:00:00Z".parse().unwrap();
        let dose = SafetyWarning {
            kind: WarningKind::CumulativeDose,
            contrast: None,
            agent: None,
            ..reaction(None, None, None)
        };
        let a = Appointment {
            alerts: vec![
                reaction(Some("C0001^iohexol^L"), Some("SV"), Some("20250314")),
                reaction(
                    Some("イオパミドール^造影剤"),
                    Some("severe"),
                    Some("2024-11"),
                ),
                dose,
                reaction(None, None, None),
            ],
            ..appointment()
        };
        let order = ris_order(&a, &[ct()], "core-1", now).unwrap();
        let msg = gateway_hl7::parse(&order.text).unwrap();
        let names: Vec<&str> = msg.segments().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "MSH", "PID", "AL1", "AL1", "AL1", "ORC", "TQ1", "OBR", "IPC"
            ],
            "AL1 in the PATIENT group, one per contrast reaction, not for the dose warning"
        );
        assert_eq!(msg.get("MSH", 18, 1, 1, 1), Some("UNICODE UTF-8"));
        let al1: Vec<_> = msg.segments_named("AL1").collect();
        let field = |i: usize, n: usize| al1[i].field(n).map(|f| f.value()).unwrap_or_default();
        let comp = |i: usize, n: usize, c: usize| {
            al1[i]
                .field(n)
                .and_then(|f| f.repetition(1))
                .map(|r| r.value(c))
                .unwrap_or_default()
        };
        assert_eq!(
            (0..3).map(|i| field(i, 1)).collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert!((0..3).all(|i| field(i, 2) == "DA"));
        // AL1-3 as the source sent it.
        assert_eq!(
            (comp(0, 3, 1), comp(0, 3, 2), comp(0, 3, 3)),
            ("C0001".into(), "iohexol".into(), "L".into())
        );
        assert_eq!(
            (comp(1, 3, 1), comp(1, 3, 2)),
            ("イオパミドール".into(), "造影剤".into())
        );
        assert_eq!(al1[2].raw(3), "^iodinated contrast", "class only");
        // AL1-4: table 0128; unknown values are U; none sent: empty.
        assert_eq!(
            (field(0, 4), field(1, 4), field(2, 4)),
            ("SV".into(), "U".into(), String::new())
        );
        // AL1-5: one repetition per reaction, delimiters escaped.
        let reactions: Vec<String> = al1[0]
            .field(5)
            .unwrap()
            .repetitions()
            .map(|r| r.value(1))
            .collect();
        assert_eq!(reactions, ["蕁麻疹", "wheeze | rash"]);
        // AL1-6: the date as precise as known.
        assert_eq!(
            (field(0, 6), field(1, 6), field(2, 6)),
            ("20250314".into(), "202411".into(), String::new())
        );
        // Without alerts: no AL1.
        let plain = ris_order(&appointment(), &[ct()], "core-1", now).unwrap();
        assert_eq!(
            gateway_hl7::parse(&plain.text)
                .unwrap()
                .segments_named("AL1")
                .count(),
            0
        );
    }

    #[test]
    fn allergen_text_cannot_add_fields_or_segments() {
        let hostile = reaction(Some("X|Y^io~hex&ol\\z^L\rPID|evil"), Some(" mo "), None);
        let a = Appointment {
            alerts: vec![hostile],
            ..appointment()
        };
        let now: Timestamp = "2027-01-10T00:00:00Z".parse().unwrap();
        let order = ris_order(&a, &[ct()], "core-1", now).unwrap();
        let msg = gateway_hl7::parse(&order.text).unwrap();
        assert_eq!(msg.segments().count(), 7);
        let al1 = msg.segment("AL1").unwrap();
        assert_eq!(al1.field_count(), 6, "AL1-1..AL1-6");
        let rep = al1.field(3).unwrap().repetition(1).unwrap();
        assert_eq!(
            (rep.value(1), rep.value(2), rep.value(3)),
            ("X|Y".into(), "io~hex&ol\\z".into(), "L PID|evil".into())
        );
        assert_eq!(al1.field(4).unwrap().value(), "MO");
        assert_eq!(hl7_date("20250314102000"), "20250314");
        assert_eq!(hl7_date("2025"), "2025");
        assert_eq!(hl7_date("unknown"), "");
        assert_eq!(hl7_date("２０２５"), "");
    }
}
