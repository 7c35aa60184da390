//! MSH-7 timestamps and MSH-10 control ids of the acknowledgements the gateway sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Control ids `GW` + 8 hex digits of the start time + a counter: unique across restarts
/// (one start per second at most) and at most 20 characters (HL7 ST length of MSH-10).
#[derive(Debug)]
pub struct ControlIds {
    prefix: String,
    next: AtomicU64,
}

impl ControlIds {
    pub fn new() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            prefix: format!("GW{:08X}", started as u32),
            next: AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % 100_000_000;
        format!("{}{n:08}", self.prefix)
    }
}

/// Now as an HL7 DTM in UTC: `YYYYMMDDHHMMSS+0000`.
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    dtm(secs)
}

fn dtm(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtm_formats_known_instants() {
        assert_eq!(dtm(0), "19700101000000+0000");
        // 2024-02-29T23:59:59Z (a leap day)
        assert_eq!(dtm(1_709_251_199), "20240229235959+0000");
        // 2026-12-01T13:45:00Z
        assert_eq!(dtm(1_796_132_700), "20261201134500+0000");
    }

    #[test]
    fn control_ids_are_unique_and_short() {
        let ids = ControlIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert!(a.len() <= 20, "{a}");
        assert!(a.starts_with("GW"));
    }
}
