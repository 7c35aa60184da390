//! The values the rewriter writes: dummies per VR, shifted dates, mapped UID lists, and
//! the text test of the Clean action. Pure functions over bytes; nothing here panics.

use crate::pseudonym::DestinationKey;

/// Whether a VR is one of the text VRs the Clean action looks into.
pub(super) fn is_text(vr: [u8; 2]) -> bool {
    matches!(&vr, b"SH" | b"LO" | b"ST" | b"LT" | b"UT" | b"UC" | b"PN")
}

/// A non-empty dummy value of a VR (not UI: a dummy UID is the pseudonym of the original,
/// not SQ: a dummy sequence keeps its items), padded to even length.
pub(super) fn dummy(vr: [u8; 2]) -> &'static [u8] {
    match &vr {
        b"DA" => b"19000101",
        b"TM" => b"000000.00 ",
        b"DT" => b"19000101000000",
        b"AS" => b"000Y",
        b"DS" | b"IS" => b"0 ",
        b"US" | b"SS" | b"OB" | b"OW" | b"UN" => &[0, 0],
        b"UL" | b"SL" | b"FL" | b"AT" | b"OF" | b"OL" => &[0, 0, 0, 0],
        b"FD" | b"SV" | b"UV" | b"OD" | b"OV" => &[0; 8],
        // AE, CS, SH (16 characters) and every longer text VR; PN.
        _ => b"ANONYMIZED",
    }
}

/// Pads a value to even length (UI with NUL, binary VRs with 0, text with a space).
pub(super) fn pad(vr: [u8; 2], value: &mut Vec<u8>) {
    if value.len() % 2 == 1 {
        value.push(match &vr {
            b"UI" | b"OB" | b"UN" => 0,
            _ => b' ',
        });
    }
}

/// Root of the UIDs the standard itself defines (SOP classes, transfer syntaxes, coding
/// schemes): they name no patient, study or device.
const STANDARD_UID_ROOT: &str = "1.2.840.10008.";

/// Each value of a (multi-valued) UI replaced by its pseudonym; empty values stay empty.
pub(super) fn map_uids(value: &[u8], key: &DestinationKey) -> Vec<u8> {
    map_uids_where(value, key, |_| true)
}

/// Like [`map_uids`], but the UIDs the standard defines (`1.2.840.10008.…`) are kept: for
/// values no table row names (a Referenced SOP Class UID inside content keeps its class).
pub(super) fn map_instance_uids(value: &[u8], key: &DestinationKey) -> Vec<u8> {
    map_uids_where(value, key, |uid| !uid.starts_with(STANDARD_UID_ROOT))
}

fn map_uids_where(value: &[u8], key: &DestinationKey, map: impl Fn(&str) -> bool) -> Vec<u8> {
    let text = String::from_utf8_lossy(value);
    let text = text.trim_end_matches(['\0', ' ']);
    let mut out = Vec::with_capacity(text.len() + 8);
    for (i, uid) in text.split('\\').enumerate() {
        if i > 0 {
            out.push(b'\\');
        }
        let uid = uid.trim_matches([' ', '\0']);
        if !uid.is_empty() && map(uid) {
            out.extend_from_slice(key.uid(uid).as_bytes());
        } else {
            out.extend_from_slice(uid.as_bytes());
        }
    }
    pad(*b"UI", &mut out);
    out
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    days_from_civil(
        if m == 12 { y + 1 } else { y },
        if m == 12 { 1 } else { m + 1 },
        1,
    ) - days_from_civil(y, m, 1)
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY`, `YYYYMM` or `YYYYMMDD` moved back `days` days, at the same precision (a
/// partial date moves its first day and keeps the precision). `None`: not a date.
fn shift_date(s: &str, days: u32) -> Option<String> {
    let (y, m, d) = match s.len() {
        4 => (digits(s)?, 1, 1),
        6 => (digits(s.get(..4)?)?, digits(s.get(4..6)?)?, 1),
        8 => (
            digits(s.get(..4)?)?,
            digits(s.get(4..6)?)?,
            digits(s.get(6..8)?)?,
        ),
        _ => return None,
    };
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) - i64::from(days));
    if y < 0 {
        return None;
    }
    Some(match s.len() {
        4 => format!("{y:04}"),
        6 => format!("{y:04}{m:02}"),
        _ => format!("{y:04}{m:02}{d:02}"),
    })
}

/// The part of a DT after its date: `HH[MM[SS[.F{1,6}]]]` and an optional `&ZZXX` offset.
fn dt_rest_ok(rest: &str) -> bool {
    let b = rest.as_bytes();
    let time = b.iter().take(6).take_while(|c| c.is_ascii_digit()).count();
    if time % 2 == 1 {
        return false;
    }
    let mut i = time;
    if time == 6 && b.get(i) == Some(&b'.') {
        let frac = b
            .iter()
            .skip(i + 1)
            .take(6)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if frac == 0 {
            return false;
        }
        i += 1 + frac;
    }
    match b.get(i) {
        None => true,
        Some(b'+' | b'-') => b.len() == i + 5 && b.iter().skip(i + 1).all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// One DA or DT value (or a range `a-b` of them; either side may be empty) shifted back;
/// in a DT only the date part moves (time, fraction and UTC offset are kept). A value
/// that is not a date becomes the VR's dummy.
fn shift_one(value: &str, dt: bool, days: u32) -> String {
    let shift = |v: &str| -> Option<String> {
        if v.is_empty() {
            return Some(String::new());
        }
        if !dt {
            return shift_date(v, days);
        }
        let date_len = v.bytes().take(8).take_while(u8::is_ascii_digit).count();
        let (date, rest) = v.split_at_checked(date_len)?;
        if !matches!(date_len, 4 | 6 | 8) {
            return None;
        }
        if date_len < 8 && !rest.is_empty() && !rest.starts_with(['+', '-']) {
            return None;
        }
        dt_rest_ok(rest).then_some(())?;
        Some(format!("{}{rest}", shift_date(date, days)?))
    };
    let whole = shift(value);
    if let Some(v) = whole {
        return v;
    }
    // A range: a DA range has one '-'; a DT range is split at the '-' that is followed
    // by a date (an offset '-' follows the time).
    let split = value
        .char_indices()
        .filter(|(_, c)| *c == '-')
        .find_map(|(i, _)| {
            let (a, b) = (value.get(..i)?, value.get(i + 1..)?);
            Some((shift(a)?, shift(b)?))
        });
    match split {
        Some((a, b)) if !(a.is_empty() && b.is_empty()) => format!("{a}-{b}"),
        _ => {
            let d = dummy(if dt { *b"DT" } else { *b"DA" });
            String::from_utf8_lossy(d).trim_end().to_string()
        }
    }
}

/// A DA or DT value (all its values) with every date moved back `days` days.
pub(super) fn shift_dates(value: &[u8], dt: bool, days: u32) -> Vec<u8> {
    let text = String::from_utf8_lossy(value);
    let text = text.trim_end_matches(['\0', ' ']);
    let mut out = String::with_capacity(text.len());
    for (i, v) in text.split('\\').enumerate() {
        if i > 0 {
            out.push('\\');
        }
        out.push_str(&shift_one(v.trim_matches(' '), dt, days));
    }
    let mut out = out.into_bytes();
    pad(if dt { *b"DT" } else { *b"DA" }, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_move_back_across_month_ends_and_leap_years() {
        assert_eq!(shift_date("20240301", 1).as_deref(), Some("20240229"));
        assert_eq!(shift_date("20230301", 1).as_deref(), Some("20230228"));
        assert_eq!(shift_date("20000301", 1).as_deref(), Some("20000229"));
        assert_eq!(shift_date("19000301", 1).as_deref(), Some("19000228"));
        assert_eq!(shift_date("20250101", 1).as_deref(), Some("20241231"));
        assert_eq!(shift_date("20250101", 366).as_deref(), Some("20240101"));
        assert_eq!(shift_date("20241231", 365).as_deref(), Some("20240101"));
        assert_eq!(shift_date("2024", 1).as_deref(), Some("2023"));
        assert_eq!(shift_date("202403", 1).as_deref(), Some("202402"));
        assert_eq!(shift_date("20240230", 1), None);
        assert_eq!(shift_date("2024013", 1), None);
    }

    #[test]
    fn values_ranges_and_date_times() {
        assert_eq!(
            shift_dates(b"20240301\\20250101", false, 1),
            b"20240229\\20241231 "
        );
        assert_eq!(
            shift_dates(b"20240301-20240310", false, 1),
            b"20240229-20240309 "
        );
        assert_eq!(shift_dates(b"-20240310", false, 1), b"-20240309 ");
        assert_eq!(
            shift_dates(b"20240301123000.5-0500", true, 1),
            b"20240229123000.5-0500 "
        );
        assert_eq!(
            shift_dates(b"20240301120000+0100-20240302", true, 1),
            b"20240229120000+0100-20240301"
        );
        assert_eq!(shift_dates(b"garbage ", false, 3), b"19000101");
        assert_eq!(shift_dates(b"", false, 3), b"");
    }

    #[test]
    fn dummies_are_non_empty_and_even() {
        for vr in [
            b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST",
            b"TM", b"UC", b"UT", b"US", b"SS", b"UL", b"SL", b"FL", b"FD", b"OB", b"OW", b"AT",
        ] {
            let d = dummy(*vr);
            assert!(!d.is_empty() && d.len().is_multiple_of(2), "{vr:?}");
        }
        assert!(dummy(*b"AE").len() <= 16 && dummy(*b"SH").len() <= 16);
    }
}
