//! The core hospital's own bookings, fed by its RIS as HL7 SIU messages on the core's HL7
//! listener: SIU^S12 (new), S13 (rescheduled), S14 (modified) block the scanner's time on the
//! ledger, so clinics can no longer book it; S15 (cancelled) and S17 (deleted) free it.
//!
//! Read from the message (raw HL7 values; only identifiers and times are used, nothing of
//! the patient):
//! - the appointment: SCH-1 (placer appointment id), else SCH-2 (filler), with MSH-3 as
//!   its source: the ledger key is `ris|{MSH-3}|{id}`;
//! - the scanner: AIG-3 or AIL-3 (first component), matched against each schedule's
//!   `station_ae`, then its `id` (ASCII case-insensitive);
//! - the time: SCH-11 component 4 and 5 (TQ start and end), else AIS-4/AIG-8/AIL-6 (start)
//!   with AIS-7/AIG-11/AIL-9 duration in minutes, else one slot. Times without an offset are
//!   local to the schedule.
//!
//! The message is already durable and acknowledged by the listener whatever this makes of
//! it; what cannot be used is logged (without content) and ignored.

use std::sync::Arc;

use gateway_booking::{Block, Ledger, Schedule};
use gateway_hl7::parse::Message;
use jiff::Timestamp;
use tokio::sync::Notify;
use tracing::{info, warn};

/// What the HL7 listener calls with every durable message (see `gateway_mllp::Observer`).
pub type Observer = Arc<dyn Fn(&Message<'_>) + Send + Sync>;

/// The observer that applies SIU messages to `ledger`; `changed` is notified so that the
/// exchange republishes the slots.
pub fn observer(
    ledger: Arc<Ledger>,
    schedules: Arc<Vec<Schedule>>,
    changed: Arc<Notify>,
) -> Observer {
    Arc::new(move |msg: &Message<'_>| {
        if msg.get("MSH", 9, 1, 1, 1) != Some("SIU") {
            return;
        }
        let trigger = msg.get("MSH", 9, 1, 2, 1).unwrap_or("");
        match apply(&ledger, &schedules, msg, trigger) {
            Ok(true) => changed.notify_one(),
            Ok(false) => {}
            Err(why) => warn!(%trigger, why, "SIU from the RIS not applied to the booking ledger"),
        }
    })
}

fn apply(
    ledger: &Ledger,
    schedules: &[Schedule],
    msg: &Message<'_>,
    trigger: &str,
) -> Result<bool, &'static str> {
    let id = msg
        .get("SCH", 1, 1, 1, 1)
        .filter(|v| !v.is_empty())
        .or_else(|| msg.get("SCH", 2, 1, 1, 1).filter(|v| !v.is_empty()))
        .ok_or("no appointment id in SCH-1 or SCH-2")?;
    let source = msg.get("MSH", 3, 1, 1, 1).unwrap_or("");
    let key = format!("ris|{source}|{id}");
    match trigger {
        "S15" | "S17" => {
            let freed = ledger
                .unblock(&key)
                .map_err(|_| "the ledger cannot be saved")?;
            if freed {
                info!(%trigger, "hospital booking from the RIS removed: its time is bookable again");
            }
            Ok(freed)
        }
        "S12" | "S13" | "S14" => {
            let schedule = scanner(schedules, msg).ok_or("no schedule matches AIG-3 or AIL-3")?;
            let start = msg
                .get("SCH", 11, 1, 4, 1)
                .and_then(|t| instant(schedule, t))
                .or_else(|| {
                    [("AIS", 4), ("AIG", 8), ("AIL", 6)]
                        .iter()
                        .find_map(|(seg, f)| {
                            msg.get(seg, *f, 1, 1, 1).and_then(|t| instant(schedule, t))
                        })
                })
                .ok_or("no start time in SCH-11 or AIS/AIG/AIL")?;
            let end = msg
                .get("SCH", 11, 1, 5, 1)
                .and_then(|t| instant(schedule, t))
                .map(|t| t.as_second())
                .or_else(|| {
                    [("AIS", 7), ("AIG", 11), ("AIL", 9)]
                        .iter()
                        .find_map(|(seg, f)| {
                            msg.get(seg, *f, 1, 1, 1)
                                .and_then(|m| m.parse::<i64>().ok())
                                .filter(|m| (1..=24 * 60).contains(m))
                                .map(|m| start.as_second() + m * 60)
                        })
                })
                .unwrap_or(start.as_second() + i64::from(schedule.slot_minutes()) * 60);
            if end <= start.as_second() {
                return Err("the appointment ends before it starts");
            }
            ledger
                .block(
                    &key,
                    Block {
                        schedule: schedule.id().to_owned(),
                        start: start.as_second(),
                        end,
                    },
                )
                .map_err(|_| "the ledger cannot be saved")?;
            info!(%trigger, schedule = schedule.id(), "hospital booking from the RIS: its time is taken");
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The schedule a SIU names in AIG-3 or AIL-3.
fn scanner<'s>(schedules: &'s [Schedule], msg: &Message<'_>) -> Option<&'s Schedule> {
    [("AIG", 3), ("AIL", 3)].iter().find_map(|(seg, f)| {
        let name = msg.get(seg, *f, 1, 1, 1)?;
        schedules
            .iter()
            .find(|s| s.station_ae().eq_ignore_ascii_case(name))
            .or_else(|| schedules.iter().find(|s| s.id().eq_ignore_ascii_case(name)))
    })
}

/// An HL7 DTM (`YYYYMMDDHHMM[SS][+hhmm]`) as an instant; local to the schedule without an
/// offset.
fn instant(schedule: &Schedule, text: &str) -> Option<Timestamp> {
    let (clock, offset) = match text.find(['+', '-']) {
        Some(i) => (&text[..i], Some(&text[i..])),
        None => (text, None),
    };
    let clock = clock.split('.').next()?;
    let padded = match clock.len() {
        12 => format!("{clock}00"),
        14 => clock.to_owned(),
        _ => return None,
    };
    if let Some(off) = offset {
        Timestamp::strptime("%Y%m%d%H%M%S%z", format!("{padded}{off}")).ok()
    } else {
        let dt = jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", &padded).ok()?;
        schedule.local_instant(dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_booking::{ScheduleSpec, SealKey};

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
    fn siu_s12_blocks_and_s15_frees_the_scanners_time() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(dir.path(), SealKey::derive(&[1; 32])).unwrap());
        let schedules = Arc::new(vec![ct()]);
        let changed = Arc::new(Notify::new());
        let observe = observer(Arc::clone(&ledger), Arc::clone(&schedules), changed);
        let now: Timestamp = "2027-01-12T00:00:00Z".parse().unwrap();
        let end: Timestamp = "2027-01-12T09:00:00Z".parse().unwrap();
        let free = || {
            ledger
                .free_slots(&schedules[0], now, end, now)
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        };
        let before = free().len();
        let s12 = "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|1|P|2.5.1\r\
                   SCH|A77^RIS||||||||||^^^202701121000^202701121100\r\
                   PID|1||ZZPID1||ZZTEST^TARO\r\
                   RGS|1\r\
                   AIG|1||CT01^^L\r";
        observe(&gateway_hl7::parse::parse(s12).unwrap());
        let after = free();
        assert_eq!(after.len(), before - 2);
        assert!(!after.contains(&"ct-1.20270112T1000".to_string()));
        assert!(!after.contains(&"ct-1.20270112T1030".to_string()));
        let s15 = s12.replace("SIU^S12^SIU_S12", "SIU^S15^SIU_S15");
        observe(&gateway_hl7::parse::parse(&s15).unwrap());
        assert_eq!(free().len(), before);
        // Another scanner, no time, or not SIU: nothing changes.
        for other in [
            s12.replace("CT01", "MR09"),
            s12.replace("^^^202701121000^202701121100", ""),
            s12.replace("SIU^S12^SIU_S12", "ADT^A08^ADT_A01"),
        ] {
            observe(&gateway_hl7::parse::parse(&other).unwrap());
            assert_eq!(free().len(), before, "{other}");
        }
        // AIS start with a duration, and an explicit offset.
        let ais = "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|2|P|2.5.1\r\
                   SCH|B1\r\
                   AIS|1||CT^CT scan|202701120300+0000|||30|min\r\
                   AIL|1||ct01\r";
        observe(&gateway_hl7::parse::parse(ais).unwrap());
        let after = free();
        assert_eq!(after.len(), before - 1);
        assert!(!after.contains(&"ct-1.20270112T1200".to_string()));
    }
}
