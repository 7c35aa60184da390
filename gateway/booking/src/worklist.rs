//! Modality Worklist items made from booked appointments, and the C-FIND matching rules of
//! DICOM PS3.4 C.2.2.2 that select them (the DIMSE side lives in the DICOM service).
//!
//! Matching, per attribute of the query identifier:
//! - **universal**: an empty value, or `*` alone, matches every item;
//! - **single value**: equal after trailing spaces are removed;
//! - **wildcard**: `*` (any run, also empty) and `?` (exactly one character) in string
//!   attributes (not dates or times);
//! - **range** for DA and TM: `A-B`, `-B`, `A-` inclusive, compared as digits (`HHMM` and
//!   `HHMMSS` are aligned to seconds);
//! - **PN**: the value's component groups (alphabetic `=` ideographic `=` phonetic) are
//!   matched group by group, each non-empty group of the query against the same group of
//!   the item, so a kanji query `=山田*` matches on the ideographic name.
//!
//! An item matches a query when every attribute the query constrains matches.
//!
//! Safety alerts: an item carries the alerts its booking was acknowledged with
//! ([`Appointment::alerts`]) as Medical Alerts (0010,2000), one English line per alert
//! ([`medical_alert`]), and Contrast Allergies (0010,2110, named "Allergies" in current
//! editions of DICOM) with the agent of each contrast reaction ([`contrast_allergy`]). Both
//! are LO values of at most 64 characters without backslash (the DICOM value separator),
//! so each alert is one value. They are return keys only: a query value given for them is
//! not matched on (PS3.4 K.6 makes them optional matching keys; universal matching).

use serde::Serialize;

use crate::ledger::{Appointment, AppointmentStatus};
use crate::safety::{SafetyWarning, WarningKind};

/// One Scheduled Procedure Step on the worklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorklistItem {
    /// DICOM PN with up to three component groups.
    pub patient_name: String,
    pub patient_id: String,
    /// DA, `YYYYMMDD`.
    pub birth_date: String,
    pub sex: String,
    pub accession: String,
    pub requested_procedure_id: String,
    pub requested_procedure_description: String,
    pub modality: String,
    pub station_ae: String,
    /// DA and TM of the step's start, local to the schedule.
    pub start_date: String,
    pub start_time: String,
    pub step_id: String,
    pub step_description: String,
    /// Medical Alerts (0010,2000): one value per alert, in English ([`medical_alert`]).
    pub medical_alerts: Vec<String>,
    /// Contrast Allergies (0010,2110): the agent of each contrast reaction
    /// ([`contrast_allergy`]).
    pub contrast_allergies: Vec<String>,
}

impl WorklistItem {
    /// The worklist entry of a booked appointment on a scanner; None unless `booked`.
    pub fn from_appointment(a: &Appointment, modality: &str, station_ae: &str) -> Option<Self> {
        if a.status != AppointmentStatus::Booked {
            return None;
        }
        // `start` is `YYYY-MM-DDTHH:MM:SS+hh:mm` in the schedule's zone.
        let date: String = a
            .start
            .get(..10)?
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        let time: String = a
            .start
            .get(11..19)?
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        Some(Self {
            patient_name: a.patient.name.clone(),
            patient_id: a.patient.id.clone(),
            birth_date: a.patient.birth_date.clone(),
            sex: a.patient.sex.clone(),
            accession: a.accession.clone(),
            requested_procedure_id: a.accession.clone(),
            requested_procedure_description: a.procedure.clone(),
            modality: modality.to_string(),
            station_ae: station_ae.to_string(),
            start_date: date,
            start_time: time,
            step_id: a.id.clone(),
            step_description: a.procedure.clone(),
            medical_alerts: a.alerts.iter().map(medical_alert).collect(),
            contrast_allergies: a.alerts.iter().filter_map(contrast_allergy).fold(
                Vec::new(),
                |mut out, v| {
                    if !out.contains(&v) {
                        out.push(v);
                    }
                    out
                },
            ),
        })
    }
}

/// Longest LO value (characters).
const LO_MAX: usize = 64;

/// One LO value: no backslash (the value separator, replaced by `/`), no control
/// characters, surrounding spaces trimmed, at most [`LO_MAX`] characters.
fn lo_value(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\\' => '/',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect::<String>()
        .trim()
        .chars()
        .take(LO_MAX)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// The components of [`SafetyWarning::agent`] as the source sent them: `code^text^system`
/// (an HL7 CE with its components separated by `^`), or the text alone when there is no
/// `^`. Returns (code, text, system); absent components are empty.
pub fn agent_parts(agent: &str) -> (&str, &str, &str) {
    if !agent.contains('^') {
        return ("", agent, "");
    }
    let mut parts = agent.splitn(4, '^');
    let code = parts.next().unwrap_or("");
    let text = parts.next().unwrap_or("");
    let system = parts.next().unwrap_or("");
    (code, text, system)
}

/// A readable name of a warning's agent: the text as sent, else the code, else the
/// contrast class (`iodinated contrast`); None when none is known.
pub fn agent_name(w: &SafetyWarning) -> Option<String> {
    let (code, text, _) = w.agent.as_deref().map(agent_parts).unwrap_or_default();
    let name = [text, code]
        .into_iter()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| w.contrast.map(|c| c.en().to_string()))?;
    Some(name)
}

/// The Medical Alerts value of one alert, in English: `Contrast reaction: iohexol (SV)`
/// (the severity when known), `Cumulative CT dose over threshold`.
pub fn medical_alert(w: &SafetyWarning) -> String {
    let text = match w.kind {
        WarningKind::ContrastReaction => {
            let agent = agent_name(w).unwrap_or_else(|| "contrast agent".to_string());
            match w
                .severity
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                Some(sv) => format!("Contrast reaction: {agent} ({sv})"),
                None => format!("Contrast reaction: {agent}"),
            }
        }
        WarningKind::CumulativeDose => "Cumulative CT dose over threshold".to_string(),
    };
    lo_value(&text)
}

/// The Contrast Allergies value of one alert: the agent (or its class) of a contrast
/// reaction; None for other alerts.
pub fn contrast_allergy(w: &SafetyWarning) -> Option<String> {
    if w.kind != WarningKind::ContrastReaction {
        return None;
    }
    let name = agent_name(w).unwrap_or_else(|| "contrast agent".to_string());
    Some(lo_value(&name)).filter(|v| !v.is_empty())
}

/// The matching keys of a worklist C-FIND; None = not asked for (matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorklistQuery {
    pub patient_name: Option<String>,
    pub patient_id: Option<String>,
    pub accession: Option<String>,
    pub modality: Option<String>,
    pub station_ae: Option<String>,
    pub start_date: Option<String>,
    pub start_time: Option<String>,
}

impl WorklistQuery {
    pub fn matches(&self, item: &WorklistItem) -> bool {
        let string =
            |q: &Option<String>, v: &str| q.as_deref().is_none_or(|q| string_matches(q, v));
        string(&self.patient_id, &item.patient_id)
            && string(&self.accession, &item.accession)
            && string(&self.modality, &item.modality)
            && string(&self.station_ae, &item.station_ae)
            && self
                .patient_name
                .as_deref()
                .is_none_or(|q| name_matches(q, &item.patient_name))
            && self
                .start_date
                .as_deref()
                .is_none_or(|q| range_matches(q, &item.start_date, 8))
            && self
                .start_time
                .as_deref()
                .is_none_or(|q| range_matches(q, &item.start_time, 6))
    }

    /// The items matching, in start order.
    pub fn select<'a>(&self, items: &'a [WorklistItem]) -> Vec<&'a WorklistItem> {
        let mut out: Vec<&WorklistItem> = items.iter().filter(|i| self.matches(i)).collect();
        out.sort_by(|a, b| (&a.start_date, &a.start_time).cmp(&(&b.start_date, &b.start_time)));
        out
    }
}

fn trim(v: &str) -> &str {
    v.trim_end_matches([' ', '\0'])
}

fn is_universal(q: &str) -> bool {
    let q = trim(q);
    q.is_empty() || q == "*"
}

/// Single value or wildcard matching of one string.
fn string_matches(query: &str, value: &str) -> bool {
    if is_universal(query) {
        return true;
    }
    let (q, v) = (trim(query), trim(value));
    if q.contains(['*', '?']) {
        wildcard(
            &q.chars().collect::<Vec<_>>(),
            &v.chars().collect::<Vec<_>>(),
        )
    } else {
        q == v
    }
}

/// `*` and `?` matching without recursion blow-up (greedy with backtracking to the last star).
fn wildcard(p: &[char], v: &[char]) -> bool {
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, vi));
                pi += 1;
            }
            Some(c) if *c == '?' || v.get(vi) == Some(c) => {
                pi += 1;
                vi += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    pi = sp + 1;
                    vi = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|c| *c == '*')
}

/// PN matching group by group.
fn name_matches(query: &str, value: &str) -> bool {
    if is_universal(query) {
        return true;
    }
    let values: Vec<&str> = trim(value).split('=').collect();
    trim(query)
        .split('=')
        .enumerate()
        .all(|(i, q)| q.is_empty() || string_matches(q, values.get(i).copied().unwrap_or("")))
}

/// DA (`width` 8) or TM (`width` 6) single value or range matching.
fn range_matches(query: &str, value: &str, width: usize) -> bool {
    if is_universal(query) {
        return true;
    }
    let norm = |s: &str| -> Option<String> {
        let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
        let digits = digits.split('.').next().unwrap_or("").to_string();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > width
        {
            return None;
        }
        Some(format!("{digits:0<width$}"))
    };
    let Some(v) = norm(value) else {
        return false;
    };
    match trim(query).split_once('-') {
        None => norm(query).is_some_and(|q| {
            if width == 6 {
                v.starts_with(trim_zeros(&q, trim(query)))
            } else {
                q == v
            }
        }),
        Some((lo, hi)) => {
            let lo_ok = lo.trim().is_empty() || norm(lo).is_some_and(|lo| v >= lo);
            // An upper bound given to the minute covers that whole minute.
            let hi_ok = hi.trim().is_empty() || norm(hi).is_some_and(|h| v <= upper(&h, hi));
            lo_ok && hi_ok && !(lo.trim().is_empty() && hi.trim().is_empty())
        }
    }
}

/// The significant prefix of a normalised single TM value (as many digits as given).
fn trim_zeros<'a>(normalised: &'a str, given: &str) -> &'a str {
    let n = given
        .chars()
        .filter(char::is_ascii_digit)
        .count()
        .min(normalised.len());
    // `normalised` is ASCII digits: every `n` up to its length is a character boundary.
    normalised.get(..n).unwrap_or(normalised)
}

/// The inclusive upper bound: unspecified trailing digits become 9s.
fn upper(normalised: &str, given: &str) -> String {
    let n = given
        .chars()
        .filter(char::is_ascii_digit)
        .count()
        .min(normalised.len());
    // `normalised` is ASCII digits: every `n` up to its length is a character boundary.
    let kept = normalised.get(..n).unwrap_or(normalised);
    format!(
        "{kept}{}",
        "9".repeat(normalised.len().saturating_sub(kept.len()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, id: &str, acc: &str, date: &str, time: &str, ae: &str) -> WorklistItem {
        WorklistItem {
            patient_name: name.into(),
            patient_id: id.into(),
            birth_date: "19700101".into(),
            sex: "M".into(),
            accession: acc.into(),
            requested_procedure_id: acc.into(),
            requested_procedure_description: "CT chest".into(),
            modality: "CT".into(),
            station_ae: ae.into(),
            start_date: date.into(),
            start_time: time.into(),
            step_id: "apt-1".into(),
            step_description: "CT chest".into(),
            medical_alerts: Vec::new(),
            contrast_allergies: Vec::new(),
        }
    }

    fn items() -> Vec<WorklistItem> {
        vec![
            item(
                "YAMADA^TARO=山田^太郎=やまだ^たろう",
                "P1",
                "RB20270112000001",
                "20270112",
                "093000",
                "CT01",
            ),
            item(
                "SATO^HANAKO=佐藤^花子=さとう^はなこ",
                "P2",
                "RB20270112000002",
                "20270112",
                "140000",
                "CT01",
            ),
            item(
                "YAMAMOTO^JIRO",
                "P3",
                "RB20270113000003",
                "20270113",
                "090000",
                "CT02",
            ),
        ]
    }

    fn ids(q: &WorklistQuery) -> Vec<String> {
        q.select(&items())
            .into_iter()
            .map(|i| i.patient_id.clone())
            .collect()
    }

    #[test]
    fn universal_single_value_and_wildcards() {
        assert_eq!(ids(&WorklistQuery::default()), ["P1", "P2", "P3"]);
        let q = |f: fn(&mut WorklistQuery)| {
            let mut q = WorklistQuery::default();
            f(&mut q);
            ids(&q)
        };
        assert_eq!(q(|q| q.patient_id = Some("".into())), ["P1", "P2", "P3"]);
        assert_eq!(q(|q| q.patient_id = Some("*".into())), ["P1", "P2", "P3"]);
        assert_eq!(q(|q| q.accession = Some("RB20270112000002".into())), ["P2"]);
        assert_eq!(
            q(|q| q.accession = Some("RB20270112000002 ".into())),
            ["P2"],
            "trailing pad"
        );
        assert!(
            q(|q| q.accession = Some("RB2027011200000".into())).is_empty(),
            "no prefix match"
        );
        assert_eq!(q(|q| q.patient_name = Some("YAMA*".into())), ["P1", "P3"]);
        assert_eq!(q(|q| q.patient_name = Some("YAMA?A*".into())), ["P1"]);
        assert_eq!(q(|q| q.patient_name = Some("*TARO".into())), ["P1"]);
        assert!(
            q(|q| q.patient_name = Some("yamada*".into())).is_empty(),
            "case-sensitive"
        );
        assert_eq!(q(|q| q.station_ae = Some("CT01".into())), ["P1", "P2"]);
        assert_eq!(
            q(|q| {
                q.station_ae = Some("CT0?".into());
                q.modality = Some("CT".into())
            }),
            ["P1", "P2", "P3"]
        );
        assert!(q(|q| q.modality = Some("MR".into())).is_empty());
    }

    #[test]
    fn person_names_match_group_by_group_in_kanji_and_kana() {
        let q = |name: &str| {
            ids(&WorklistQuery {
                patient_name: Some(name.into()),
                ..WorklistQuery::default()
            })
        };
        assert_eq!(q("=山田*"), ["P1"]);
        assert_eq!(q("=佐藤^花子"), ["P2"]);
        assert_eq!(q("==さとう*"), ["P2"]);
        assert_eq!(q("YAMADA*=山田*"), ["P1"]);
        assert!(q("SATO*=山田*").is_empty(), "both groups must match");
        assert!(q("=山本*").is_empty(), "P3 has no ideographic group");
    }

    #[test]
    fn date_and_time_ranges() {
        let q = |date: Option<&str>, time: Option<&str>| {
            ids(&WorklistQuery {
                start_date: date.map(Into::into),
                start_time: time.map(Into::into),
                ..WorklistQuery::default()
            })
        };
        assert_eq!(q(Some("20270112"), None), ["P1", "P2"]);
        assert_eq!(q(Some("20270112-20270113"), None), ["P1", "P2", "P3"]);
        assert_eq!(q(Some("-20270112"), None), ["P1", "P2"]);
        assert_eq!(q(Some("20270113-"), None), ["P3"]);
        assert!(q(Some("20270114-"), None).is_empty());
        assert!(q(Some("2027-01-12"), None).is_empty(), "not a DA range");
        assert_eq!(q(Some("20270112"), Some("0900-1200")), ["P1"]);
        assert_eq!(
            q(None, Some("-0930")),
            ["P1", "P3"],
            "to the minute includes 09:30:00"
        );
        assert_eq!(q(None, Some("14")), ["P2"], "single TM to the hour");
        assert_eq!(q(None, Some("1400-")), ["P2"]);
        assert_eq!(q(None, Some("")), ["P1", "P2", "P3"]);
        assert!(q(None, Some("-")).is_empty(), "a range needs one bound");
    }

    #[test]
    fn a_booked_appointment_becomes_an_item_in_local_time() {
        use crate::ledger::{BookingRequest, Decision, Ledger, PatientRef};
        use crate::schedule::{Schedule, ScheduleSpec};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            dir.path(),
            crate::sealed::SealKey::derive(&gateway_keystore::MasterKey::from_bytes([9; 32])),
        )
        .unwrap();
        let s = Schedule::new(&ScheduleSpec {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: "CT01".into(),
            ..ScheduleSpec::default()
        })
        .unwrap();
        let req = |id: &str, slot: &str, hold: bool| BookingRequest {
            alerts: Vec::new(),
            request_id: id.into(),
            clinic: "clinic-001".into(),
            slot_id: slot.into(),
            hold,
            patient: PatientRef {
                id: "P1".into(),
                name: "YAMADA^TARO=山田^太郎".into(),
                birth_date: "19700101".into(),
                sex: "M".into(),
            },
            procedure: "CT chest".into(),
        };
        let now = "2027-01-12T00:00:00Z".parse().unwrap();
        let Decision::Booked { appointment_id, .. } = ledger
            .decide(
                &req("r1", "ct-1.20270112T1430", false),
                std::slice::from_ref(&s),
                now,
                300,
            )
            .unwrap()
        else {
            panic!()
        };
        let Decision::Booked {
            appointment_id: held,
            ..
        } = ledger
            .decide(
                &req("r2", "ct-1.20270112T1500", true),
                std::slice::from_ref(&s),
                now,
                300,
            )
            .unwrap()
        else {
            panic!()
        };
        let a = ledger.get(&appointment_id).unwrap();
        let item = WorklistItem::from_appointment(&a, s.modality(), s.station_ae()).unwrap();
        assert_eq!(
            (item.start_date.as_str(), item.start_time.as_str()),
            ("20270112", "143000")
        );
        assert_eq!(item.accession, a.accession);
        assert_eq!(item.patient_name, "YAMADA^TARO=山田^太郎");
        assert_eq!(
            (item.modality.as_str(), item.station_ae.as_str()),
            ("CT", "CT01")
        );
        let pending = ledger.get(&held).unwrap();
        assert!(
            WorklistItem::from_appointment(&pending, "CT", "CT01").is_none(),
            "holds are not on the worklist"
        );
    }

    fn warning(agent: Option<&str>, severity: Option<&str>) -> SafetyWarning {
        SafetyWarning {
            id: "w1".into(),
            kind: WarningKind::ContrastReaction,
            contrast: Some(crate::safety::ContrastClass::Iodinated),
            agent: agent.map(Into::into),
            severity: severity.map(Into::into),
            reactions: vec!["urticaria".into()],
            when: Some("20250314".into()),
            hospital: "hosp-a".into(),
            text_en: "Reaction to iodinated contrast".into(),
            text_ja: "ヨード造影剤の副作用歴".into(),
        }
    }

    #[test]
    fn alerts_of_a_booking_become_medical_alerts_and_contrast_allergies() {
        use crate::ledger::PatientRef;
        let dose = SafetyWarning {
            kind: WarningKind::CumulativeDose,
            contrast: None,
            agent: None,
            severity: None,
            ..warning(None, None)
        };
        let a = Appointment {
            alerts: vec![
                warning(Some("C0001^iohexol^L"), Some("SV")),
                warning(Some("イオパミドール"), None),
                // Same agent from another hospital: one Contrast Allergies value.
                warning(Some("C0001^iohexol^L"), Some("MO")),
                warning(None, Some("MI")),
                dose,
            ],
            id: "apt-1".into(),
            slot_id: "ct-1.20270112T0930".into(),
            schedule: "ct-1".into(),
            start: "2027-01-12T09:30:00+09:00".into(),
            end: "2027-01-12T10:00:00+09:00".into(),
            clinic: "clinic-a".into(),
            request_id: "r1".into(),
            patient: PatientRef::default(),
            procedure: "CT chest".into(),
            accession: "RB1".into(),
            status: AppointmentStatus::Booked,
            hold_expires_unix: None,
            version: 1,
        };
        let item = WorklistItem::from_appointment(&a, "CT", "CT01").unwrap();
        assert_eq!(
            item.medical_alerts,
            [
                "Contrast reaction: iohexol (SV)",
                "Contrast reaction: イオパミドール",
                "Contrast reaction: iohexol (MO)",
                "Contrast reaction: iodinated contrast (MI)",
                "Cumulative CT dose over threshold",
            ]
        );
        assert_eq!(
            item.contrast_allergies,
            ["iohexol", "イオパミドール", "iodinated contrast"]
        );
        // No alerts: both empty.
        let plain = Appointment {
            alerts: Vec::new(),
            ..a
        };
        let item = WorklistItem::from_appointment(&plain, "CT", "CT01").unwrap();
        assert!(item.medical_alerts.is_empty() && item.contrast_allergies.is_empty());
    }

    #[test]
    fn alert_values_are_single_lo_values() {
        // A backslash would split the value; control characters and length are bounded.
        let long = format!("a\\b\r\n{}", "x".repeat(100));
        let v = medical_alert(&warning(Some(&long), Some("SV")));
        assert!(!v.contains('\\') && !v.chars().any(char::is_control));
        assert_eq!(v.chars().count(), 64);
        assert!(v.starts_with("Contrast reaction: a/b  xxx"), "{v}");
        let v = contrast_allergy(&warning(Some(&"造".repeat(80)), None)).unwrap();
        assert_eq!(v.chars().count(), 64);
        // Code only: the code is the name.
        assert_eq!(
            contrast_allergy(&warning(Some("C0001^^L"), None)).as_deref(),
            Some("C0001")
        );
        assert_eq!(agent_parts("C1^iohexol^L^x"), ("C1", "iohexol", "L"));
        assert_eq!(agent_parts("iohexol"), ("", "iohexol", ""));
    }

    #[test]
    fn wildcard_matcher_has_no_blow_up() {
        let long: Vec<char> = "a".repeat(5000).chars().collect();
        let pattern: Vec<char> = "*a*a*a*a*a*a*a*a*b".chars().collect();
        assert!(!wildcard(&pattern, &long));
        assert!(wildcard(&['*'], &[]));
        assert!(!wildcard(&['?'], &[]));
        assert!(wildcard(&['a', '*', 'c'], &['a', 'b', 'b', 'c']));
    }

    #[test]
    fn hostile_query_values_match_nothing_and_never_panic() {
        // Multi-byte characters, stray wildcards and separators, out-of-range widths.
        for q in [
            "山*",
            "*田",
            "??",
            "**?*",
            "\u{0}",
            "=",
            "==",
            "^=^",
            "ﾔﾏﾀﾞ*",
            "-",
            "--",
            "1-2-3",
            "0930-",
            "-0930",
            "09:30:00.5-",
            "093000000000",
            "２０２７",
            "20270112-2027011",
        ] {
            let _ = string_matches(q, "ZZTEST^HANAKO=山田^花子");
            let _ = name_matches(q, "ZZTEST^HANAKO=山田^花子=やまだ^はなこ");
            let _ = range_matches(q, "20270112", 8);
            let _ = range_matches(q, "093000", 6);
        }
        assert!(string_matches("山*", "山田"));
        assert!(!string_matches("山?", "山田花"));
        assert!(range_matches("09-0930", "093059", 6));
        assert!(!range_matches("２０２７", "20270112", 8));
        assert_eq!(upper("093000", "0930"), "093099");
        assert_eq!(trim_zeros("093000", "09"), "09");
    }
}
