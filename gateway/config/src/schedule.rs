//! `[[booking.schedule]]`: a scanner's bookable time, checked here so that `check-config`
//! names every problem; `gateway-booking` builds its typed schedule from these settings when
//! the booking service starts (this crate does not depend on it).
//!
//! The rules are those of `gateway_booking::Schedule::new`, field by field and in the same
//! order, with the same defaults: a file `check-config` accepts is one the booking service
//! starts from.

use std::collections::BTreeMap;

use jiff::civil::{Date, Time};

/// Default time zone of a schedule.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Tokyo";
/// Default slot length.
pub const DEFAULT_SLOT_MINUTES: u32 = 30;
/// The weekday keys of `hours`.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One checked `[[booking.schedule]]` (core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingSchedule {
    id: String,
    modality: String,
    station_ae: String,
    time_zone: String,
    slot_minutes: u32,
    hours: Option<BTreeMap<String, String>>,
    holidays: Vec<String>,
}

impl BookingSchedule {
    /// 1-32 of letters, digits, `-` and `_`.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// A DICOM modality code (`CT`, `MR`).
    pub fn modality(&self) -> &str {
        &self.modality
    }
    /// The scanner's AE title (trimmed).
    pub fn station_ae(&self) -> &str {
        &self.station_ae
    }
    /// An IANA time zone (default [`DEFAULT_TIME_ZONE`]).
    pub fn time_zone(&self) -> &str {
        &self.time_zone
    }
    /// 5..=480 (default [`DEFAULT_SLOT_MINUTES`]).
    pub fn slot_minutes(&self) -> u32 {
        self.slot_minutes
    }
    /// Weekday (`mon` .. `sun`) -> `HH:MM-HH:MM` as written; `None`: the booking service's
    /// default (Monday to Friday 09:00-17:00).
    pub fn hours(&self) -> Option<&BTreeMap<String, String>> {
        self.hours.as_ref()
    }
    /// `YYYY-MM-DD` dates without slots, as written.
    pub fn holidays(&self) -> &[String] {
        &self.holidays
    }
}

/// A schedule as written, before its check.
pub(crate) struct RawSchedule {
    pub id: String,
    pub modality: String,
    pub station_ae: String,
    pub time_zone: Option<String>,
    pub slot_minutes: Option<u32>,
    pub hours: Option<BTreeMap<String, String>>,
    pub holidays: Vec<String>,
}

fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_hours(text: &str) -> bool {
    let Some((a, b)) = text.split_once('-') else {
        return false;
    };
    match (a.trim().parse::<Time>(), b.trim().parse::<Time>()) {
        (Ok(open), Ok(close)) => open < close,
        _ => false,
    }
}

/// Checks one schedule; every problem is `(field, message)`, in field order.
pub(crate) fn check(raw: RawSchedule) -> Result<BookingSchedule, Vec<(String, String)>> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let mut problem = |field: &str, message: String| problems.push((field.to_owned(), message));
    if !valid_id(&raw.id) {
        problem(
            "id",
            "1-32 characters of letters, digits, '-' and '_'".into(),
        );
    }
    if raw.modality.len() != 2 || !raw.modality.bytes().all(|b| b.is_ascii_uppercase()) {
        problem("modality", "a DICOM modality code such as CT or MR".into());
    }
    let ae = raw.station_ae.trim();
    if ae.is_empty()
        || ae.len() > 16
        || !ae.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
    {
        problem("station_ae", "1-16 characters of a DICOM AE title".into());
    }
    let time_zone = raw
        .time_zone
        .unwrap_or_else(|| DEFAULT_TIME_ZONE.to_owned());
    if jiff::tz::TimeZone::get(&time_zone).is_err() {
        problem("time_zone", format!("unknown IANA time zone {time_zone:?}"));
    }
    let slot_minutes = raw.slot_minutes.unwrap_or(DEFAULT_SLOT_MINUTES);
    if !(5..=480).contains(&slot_minutes) {
        problem("slot_minutes", "between 5 and 480".into());
    }
    for (key, text) in raw.hours.iter().flatten() {
        if !WEEKDAYS.contains(&key.as_str()) {
            problem(
                &format!("hours.{key}"),
                "weekdays are mon, tue, wed, thu, fri, sat and sun".into(),
            );
        } else if !valid_hours(text) {
            problem(
                &format!("hours.{key}"),
                "opening hours as HH:MM-HH:MM, opening before closing".into(),
            );
        }
    }
    for h in &raw.holidays {
        if h.parse::<Date>().is_err() {
            problem("holidays", format!("{h:?} is not YYYY-MM-DD"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(BookingSchedule {
        station_ae: ae.to_owned(),
        id: raw.id,
        modality: raw.modality,
        time_zone,
        slot_minutes,
        hours: raw.hours,
        holidays: raw.holidays,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw() -> RawSchedule {
        RawSchedule {
            id: "ct-1".into(),
            modality: "CT".into(),
            station_ae: " CT01 ".into(),
            time_zone: None,
            slot_minutes: None,
            hours: None,
            holidays: Vec::new(),
        }
    }

    #[test]
    fn defaults_apply_and_the_station_ae_is_trimmed() {
        let s = check(raw()).unwrap();
        assert_eq!(
            (s.time_zone(), s.slot_minutes(), s.station_ae()),
            ("Asia/Tokyo", 30, "CT01")
        );
        assert!(s.hours().is_none() && s.holidays().is_empty());
    }

    #[test]
    fn every_problem_is_named_in_field_order() {
        let bad = RawSchedule {
            id: "a b".into(),
            modality: "ct".into(),
            station_ae: "".into(),
            time_zone: Some("Tokyo".into()),
            slot_minutes: Some(4),
            hours: Some(BTreeMap::from([
                ("mon".into(), "17:00-09:00".into()),
                ("monday".into(), "9-5".into()),
            ])),
            holidays: vec!["2027-13-01".into()],
        };
        let fields: Vec<String> = check(bad).unwrap_err().into_iter().map(|p| p.0).collect();
        assert_eq!(
            fields,
            [
                "id",
                "modality",
                "station_ae",
                "time_zone",
                "slot_minutes",
                "hours.mon",
                "hours.monday",
                "holidays"
            ]
        );
    }
}
