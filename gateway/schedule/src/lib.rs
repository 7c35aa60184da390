//! A scanner's bookable time: the one home of the `[[booking.schedule]]` rules and of the
//! calendar built on them.
//!
//! A [`ScheduleSpec`] is a schedule as written (id, modality, station AE and optional time
//! zone, slot length, hours per weekday, holidays). [`Schedule::new`] checks it once and
//! either returns a [`Schedule`] or names every problem ([`ScheduleProblem`], field by field
//! in a fixed order); a `Schedule` never needs checking again. `gateway-config` parses
//! `[[booking.schedule]]` into it (`check-config` prints its problems) and the booking
//! domain (`gateway-booking`, which re-exports these types) computes slots with it.
//!
//! - Rules: id 1..=32 of `[A-Za-z0-9_-]`; modality two capital letters (`CT`, `MR`); station
//!   AE 1..=16 printable ASCII without `\` (trimmed); IANA time zone (default
//!   [`DEFAULT_TIME_ZONE`]); slot minutes 5..=480 (default [`DEFAULT_SLOT_MINUTES`]); hours
//!   `mon` .. `sun` -> `HH:MM-HH:MM`, opening before closing (default Monday to Friday
//!   [`DEFAULT_HOURS`]; a day not listed is closed); holidays `YYYY-MM-DD`.
//! - Calendar: [`Schedule::slots_on`] (one local day), [`Schedule::slots_between`] (an
//!   instant range, at most 62 days), [`Schedule::slot`] (a slot by id) and
//!   [`Schedule::local_instant`]. A slot id is `{schedule}.{YYYYMMDDTHHMM}` in local time.
//!
//! Invariants: no panic on any input (slot ids come from the network: no indexing or string
//! slicing); a slot id splits into its schedule and its time one way only and is a
//! topic-safe id of `gateway-id`; problems never quote more than the offending value.
//!
//! This crate is a value type like `gateway-id`: no I/O, no service, no serde.

// Slot ids come from the network: no indexing or string slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// Default time zone of a schedule.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Tokyo";
/// Default slot length.
pub const DEFAULT_SLOT_MINUTES: u32 = 30;
/// Default opening hours, Monday to Friday.
pub const DEFAULT_HOURS: &str = "09:00-17:00";
const WEEKDAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];
/// Longest span `slots_between` looks at.
const MAX_DAYS: i64 = 62;

/// A schedule as configured (`[[booking.schedule]]`); everything but the first three has a
/// default.
#[derive(Debug, Clone, Default)]
pub struct ScheduleSpec {
    pub id: String,
    pub modality: String,
    pub station_ae: String,
    pub time_zone: Option<String>,
    pub slot_minutes: Option<u32>,
    /// Weekday (`mon` .. `sun`) -> `HH:MM-HH:MM`; days not listed are closed. None: Monday
    /// to Friday 09:00-17:00.
    pub hours: Option<BTreeMap<String, String>>,
    /// `YYYY-MM-DD` dates without slots.
    pub holidays: Vec<String>,
}

/// What is wrong with a spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ScheduleProblem {
    pub field: String,
    pub problem: String,
}

/// A scanner's bookable time.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    id: String,
    modality: String,
    station_ae: String,
    tz: TimeZone,
    tz_name: String,
    slot_minutes: u32,
    /// Opening hours by weekday, Monday first.
    hours: Week,
    holidays: BTreeSet<Date>,
}

/// One bookable slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// `{schedule}.{YYYYMMDDTHHMM}`, local start time.
    pub id: String,
    pub schedule: String,
    /// RFC 3339 with the zone's offset, e.g. `2027-01-12T09:00:00+09:00`.
    pub start: String,
    pub end: String,
    /// The start as an instant.
    pub start_ts: Timestamp,
}

fn problem(field: &str, problem: impl Into<String>) -> ScheduleProblem {
    ScheduleProblem {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// A schedule id: a topic-safe id ([`gateway_id::is_valid`]) and, stricter, 1..=32 bytes
/// without `.`. It differs from the general rule on purpose: a slot id is
/// `{schedule}.{YYYYMMDDTHHMM}`, which must split into its schedule and its time in one way
/// only (so the schedule part holds no `.`) and must itself stay a topic-safe id of at most
/// 64 bytes (32 + 1 + 13 fits).
fn valid_id(id: &str) -> bool {
    gateway_id::is_valid(id) && id.len() <= 32 && !id.contains('.')
}

/// Opening hours by weekday, Monday first.
type Week = [Option<(Time, Time)>; 7];

fn day_index(day: Weekday) -> usize {
    usize::try_from(day.to_monday_zero_offset()).unwrap_or(0)
}

/// Sets the opening hours of `day` (every weekday has its place in a [`Week`]).
fn set_hours(week: &mut Week, day: Weekday, hours: (Time, Time)) {
    if let Some(place) = week.get_mut(day_index(day)) {
        *place = Some(hours);
    }
}

/// The opening hours of `day`, if it is open.
fn hours_on(week: &Week, day: Weekday) -> Option<(Time, Time)> {
    week.get(day_index(day)).copied().flatten()
}

fn parse_hours(text: &str) -> Option<(Time, Time)> {
    let (a, b) = text.split_once('-')?;
    let open: Time = a.trim().parse().ok()?;
    let close: Time = b.trim().parse().ok()?;
    (open < close).then_some((open, close))
}

impl Schedule {
    /// Validates a spec; every problem is reported, each naming its field.
    pub fn new(spec: &ScheduleSpec) -> Result<Self, Vec<ScheduleProblem>> {
        let mut problems = Vec::new();
        if !valid_id(&spec.id) {
            problems.push(problem(
                "id",
                "1-32 characters of letters, digits, '-' and '_'",
            ));
        }
        if spec.modality.len() != 2 || !spec.modality.bytes().all(|b| b.is_ascii_uppercase()) {
            problems.push(problem(
                "modality",
                "a DICOM modality code such as CT or MR",
            ));
        }
        let ae = spec.station_ae.trim();
        if ae.is_empty()
            || ae.len() > 16
            || !ae.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
        {
            problems.push(problem("station_ae", "1-16 characters of a DICOM AE title"));
        }
        let tz_name = spec
            .time_zone
            .clone()
            .unwrap_or_else(|| DEFAULT_TIME_ZONE.to_string());
        let tz = TimeZone::get(&tz_name).ok();
        if tz.is_none() {
            problems.push(problem(
                "time_zone",
                format!("unknown IANA time zone {tz_name:?}"),
            ));
        }
        let slot_minutes = spec.slot_minutes.unwrap_or(DEFAULT_SLOT_MINUTES);
        if !(5..=480).contains(&slot_minutes) {
            problems.push(problem("slot_minutes", "between 5 and 480"));
        }
        let mut hours: Week = [None; 7];
        match &spec.hours {
            None => {
                for (_, day) in &WEEKDAYS[..5] {
                    if let Some(h) = parse_hours(DEFAULT_HOURS) {
                        set_hours(&mut hours, *day, h);
                    }
                }
            }
            Some(given) => {
                for (key, text) in given {
                    match (WEEKDAYS.iter().find(|(k, _)| k == key), parse_hours(text)) {
                        (None, _) => problems.push(problem(
                            &format!("hours.{key}"),
                            "weekdays are mon, tue, wed, thu, fri, sat and sun",
                        )),
                        (_, None) => problems.push(problem(
                            &format!("hours.{key}"),
                            "opening hours as HH:MM-HH:MM, opening before closing",
                        )),
                        (Some((_, day)), Some(h)) => {
                            set_hours(&mut hours, *day, h);
                        }
                    }
                }
            }
        }
        let mut holidays = BTreeSet::new();
        for h in &spec.holidays {
            match h.parse::<Date>() {
                Ok(d) => {
                    holidays.insert(d);
                }
                Err(_) => problems.push(problem("holidays", format!("{h:?} is not YYYY-MM-DD"))),
            }
        }
        match tz {
            Some(tz) if problems.is_empty() => Ok(Self {
                id: spec.id.clone(),
                modality: spec.modality.clone(),
                station_ae: ae.to_string(),
                tz,
                tz_name,
                slot_minutes,
                hours,
                holidays,
            }),
            _ => Err(problems),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn modality(&self) -> &str {
        &self.modality
    }
    pub fn station_ae(&self) -> &str {
        &self.station_ae
    }
    pub fn time_zone(&self) -> &str {
        &self.tz_name
    }
    pub fn slot_minutes(&self) -> u32 {
        self.slot_minutes
    }

    /// A local date and time of this schedule's zone as an instant (the earlier one when a
    /// clock change makes it ambiguous).
    pub fn local_instant(&self, dt: jiff::civil::DateTime) -> Option<Timestamp> {
        dt.to_zoned(self.tz.clone()).ok().map(|z| z.timestamp())
    }

    fn slot_at(&self, start: &Zoned) -> Option<Slot> {
        let end = start
            .checked_add(jiff::SignedDuration::from_mins(i64::from(
                self.slot_minutes,
            )))
            .ok()?;
        let rfc3339 = |z: &Zoned| z.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string();
        Some(Slot {
            id: format!("{}.{}", self.id, start.strftime("%Y%m%dT%H%M")),
            schedule: self.id.clone(),
            start: rfc3339(start),
            end: rfc3339(&end),
            start_ts: start.timestamp(),
        })
    }

    /// The slots of one local day, in order (none on holidays and closed weekdays).
    pub fn slots_on(&self, date: Date) -> Vec<Slot> {
        let mut out = Vec::new();
        if self.holidays.contains(&date) {
            return out;
        }
        let Some((open, close)) = &hours_on(&self.hours, date.weekday()) else {
            return out;
        };
        let step = jiff::SignedDuration::from_mins(i64::from(self.slot_minutes));
        let Ok(mut start) = date.to_datetime(*open).to_zoned(self.tz.clone()) else {
            return out;
        };
        let Ok(closing) = date.to_datetime(*close).to_zoned(self.tz.clone()) else {
            return out;
        };
        while let Ok(end) = start.checked_add(step) {
            if end > closing {
                break;
            }
            if let Some(slot) = self.slot_at(&start) {
                out.push(slot);
            }
            start = end;
        }
        out
    }

    /// The slots starting in `[from, to)`, at most 62 days (`MAX_DAYS`) of them.
    pub fn slots_between(&self, from: Timestamp, to: Timestamp) -> Vec<Slot> {
        let first = from.to_zoned(self.tz.clone()).date();
        let mut out = Vec::new();
        let mut day = first;
        for _ in 0..MAX_DAYS {
            if day
                .to_zoned(self.tz.clone())
                .map_or(true, |z| z.timestamp() >= to)
            {
                break;
            }
            out.extend(
                self.slots_on(day)
                    .into_iter()
                    .filter(|s| s.start_ts >= from && s.start_ts < to),
            );
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        out
    }

    /// The slot with this id, if the schedule has it.
    pub fn slot(&self, id: &str) -> Option<Slot> {
        let stamp = id.strip_prefix(&self.id)?.strip_prefix('.')?;
        if stamp.len() != 13 {
            return None;
        }
        let dt = jiff::civil::DateTime::strptime("%Y%m%dT%H%M", stamp).ok()?;
        self.slots_on(dt.date()).into_iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CT schedule with only the required fields.
    fn spec(id: &str, station_ae: &str) -> ScheduleSpec {
        ScheduleSpec {
            id: id.into(),
            modality: "CT".into(),
            station_ae: station_ae.into(),
            ..ScheduleSpec::default()
        }
    }

    fn ct() -> Schedule {
        Schedule::new(&ScheduleSpec {
            holidays: vec!["2027-01-11".into()],
            ..spec("ct-1", "CT01")
        })
        .unwrap()
    }

    #[test]
    fn three_fields_make_a_schedule_with_tokyo_weekday_defaults() {
        let s = ct();
        assert_eq!((s.time_zone(), s.slot_minutes()), ("Asia/Tokyo", 30));
        // Tuesday 2027-01-12: 09:00-17:00 in 30-minute slots.
        let slots = s.slots_on(Date::constant(2027, 1, 12));
        assert_eq!(slots.len(), 16);
        assert_eq!(slots[0].id, "ct-1.20270112T0900");
        assert_eq!(slots[0].start, "2027-01-12T09:00:00+09:00");
        assert_eq!(slots[0].end, "2027-01-12T09:30:00+09:00");
        assert_eq!(slots[0].start_ts.to_string(), "2027-01-12T00:00:00Z");
        assert_eq!(slots[15].start, "2027-01-12T16:30:00+09:00");
        // Saturday, Sunday and the holiday (a Monday) are closed.
        for d in [9, 10, 11] {
            assert!(
                s.slots_on(Date::constant(2027, 1, d)).is_empty(),
                "2027-01-{d}"
            );
        }
        assert_eq!(
            s.slot("ct-1.20270112T0930").unwrap().start,
            "2027-01-12T09:30:00+09:00"
        );
        for bad in [
            "ct-1.20270112T0915",
            "ct-1.20270111T0900",
            "ct-2.20270112T0900",
            "ct-1.",
            "ct-1.2027011",
            "ct-1.20271332T0900",
            "ct-1.20270112T09000",
            "",
        ] {
            assert!(s.slot(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hours_zone_and_length_are_configurable() {
        let s = Schedule::new(&ScheduleSpec {
            id: "mr_2".into(),
            modality: "MR".into(),
            station_ae: "MR01".into(),
            time_zone: Some("Europe/Berlin".into()),
            slot_minutes: Some(45),
            hours: Some(BTreeMap::from([("sat".into(), "08:00-10:00".into())])),
            holidays: vec![],
        })
        .unwrap();
        let sat = s.slots_on(Date::constant(2027, 7, 3));
        assert_eq!(
            sat.iter().map(|x| x.start.as_str()).collect::<Vec<_>>(),
            ["2027-07-03T08:00:00+02:00", "2027-07-03T08:45:00+02:00"]
        );
        assert!(
            s.slots_on(Date::constant(2027, 7, 5)).is_empty(),
            "Monday closed"
        );
    }

    #[test]
    fn defaults_apply_and_the_station_ae_is_trimmed() {
        let s = Schedule::new(&spec("ct-1", " CT01 ")).unwrap();
        assert_eq!(
            (s.time_zone(), s.slot_minutes(), s.station_ae()),
            ("Asia/Tokyo", 30, "CT01")
        );
    }

    /// `check-config` prints these problems in this order: the order is part of the contract.
    #[test]
    fn every_problem_is_named_once_in_field_order() {
        let err = Schedule::new(&ScheduleSpec {
            id: "a.b".into(),
            modality: "ct".into(),
            station_ae: "".into(),
            time_zone: Some("Mars/Olympus".into()),
            slot_minutes: Some(4),
            hours: Some(BTreeMap::from([
                ("mon".into(), "17:00-09:00".into()),
                ("monday".into(), "9-5".into()),
            ])),
            holidays: vec!["2027-13-01".into(), "2027-01-01".into()],
        })
        .unwrap_err();
        let lines: Vec<String> = err.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "id: 1-32 characters of letters, digits, '-' and '_'",
                "modality: a DICOM modality code such as CT or MR",
                "station_ae: 1-16 characters of a DICOM AE title",
                "time_zone: unknown IANA time zone \"Mars/Olympus\"",
                "slot_minutes: between 5 and 480",
                "hours.mon: opening hours as HH:MM-HH:MM, opening before closing",
                "hours.monday: weekdays are mon, tue, wed, thu, fri, sat and sun",
                "holidays: \"2027-13-01\" is not YYYY-MM-DD",
            ]
        );
    }

    #[test]
    fn schedule_ids_are_topic_safe_without_a_dot_and_at_most_32_bytes() {
        let with_id = |id: &str| Schedule::new(&spec(id, "CT01"));
        for good in ["a", "CT_1-b", &"x".repeat(32)] {
            assert!(with_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "a/b", "ü", &"x".repeat(33)] {
            let err = with_id(bad).unwrap_err();
            assert_eq!(err.len(), 1, "{bad}");
            assert_eq!(err[0].field, "id", "{bad}");
        }
    }

    #[test]
    fn slots_between_spans_days_in_local_time() {
        let s = ct();
        let from: Timestamp = "2027-01-12T06:30:00Z".parse().unwrap(); // 15:30 in Tokyo
        let to: Timestamp = "2027-01-13T01:00:00Z".parse().unwrap(); // 10:00 next day
        let ids: Vec<String> = s
            .slots_between(from, to)
            .into_iter()
            .map(|x| x.id)
            .collect();
        assert_eq!(
            ids,
            [
                "ct-1.20270112T1530",
                "ct-1.20270112T1600",
                "ct-1.20270112T1630",
                "ct-1.20270113T0900",
                "ct-1.20270113T0930",
            ]
        );
        assert!(s.slots_between(to, from).is_empty());
    }
}
