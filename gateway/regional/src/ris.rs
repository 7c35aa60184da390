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
//! it: the listener hands it over a channel ([`run`] consumes it in a task of its own) and
//! never waits for the ledger. What cannot be used is logged (without content) and ignored.

use std::sync::Arc;

use gateway_booking::{Block, LedgerHandle, Schedule};
use gateway_hl7::parse::Message;
use jiff::Timestamp;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

/// What a SIU asks of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Block { key: String, block: Block },
    Unblock { key: String },
}

/// Applies the SIU messages the HL7 listener hands over (`observed`: the decoded text of each
/// durable message, e.g. from `gateway_mllp::Observer::channel`) to the ledger, one at a time
/// and in order, until the channel closes; `changed` is notified after each change so that
/// the exchange republishes the slots. This task is the only one that waits on the ledger
/// for the RIS: the listener acknowledged each message before it got here.
pub async fn run<M: AsRef<str>>(
    mut observed: mpsc::Receiver<M>,
    ledger: LedgerHandle,
    changed: Arc<Notify>,
) {
    while let Some(message) = observed.recv().await {
        apply_text(&ledger, &changed, message.as_ref()).await;
    }
}

/// One message: a SIU^S12..S17 blocks or frees time; anything else is ignored.
async fn apply_text(ledger: &LedgerHandle, changed: &Notify, text: &str) {
    let Ok(msg) = gateway_hl7::parse::parse(text) else {
        return;
    };
    if msg.get("MSH", 9, 1, 1, 1) != Some("SIU") {
        return;
    }
    let trigger = msg.get("MSH", 9, 1, 2, 1).unwrap_or("").to_owned();
    let change = change(ledger.schedules(), &msg, &trigger);
    drop(msg);
    let applied = match change {
        Ok(None) => Ok(false),
        Ok(Some(Change::Unblock { key })) => match ledger.unblock(&key).await {
            Ok(freed) => {
                if freed {
                    info!(%trigger, "hospital booking from the RIS removed: its time is bookable again");
                }
                Ok(freed)
            }
            Err(_) => Err("the ledger cannot be saved"),
        },
        Ok(Some(Change::Block { key, block })) => {
            let schedule = block.schedule.clone();
            match ledger.block(&key, block).await {
                Ok(()) => {
                    info!(%trigger, %schedule, "hospital booking from the RIS: its time is taken");
                    Ok(true)
                }
                Err(_) => Err("the ledger cannot be saved"),
            }
        }
        Err(why) => Err(why),
    };
    match applied {
        Ok(true) => changed.notify_one(),
        Ok(false) => {}
        Err(why) => warn!(%trigger, why, "SIU from the RIS not applied to the booking ledger"),
    }
}

/// What a SIU with `trigger` asks of the ledger (`None`: nothing).
fn change(
    schedules: &[Schedule],
    msg: &Message<'_>,
    trigger: &str,
) -> Result<Option<Change>, &'static str> {
    let id = msg
        .get("SCH", 1, 1, 1, 1)
        .filter(|v| !v.is_empty())
        .or_else(|| msg.get("SCH", 2, 1, 1, 1).filter(|v| !v.is_empty()))
        .ok_or("no appointment id in SCH-1 or SCH-2")?;
    let source = msg.get("MSH", 3, 1, 1, 1).unwrap_or("");
    let key = format!("ris|{source}|{id}");
    match trigger {
        "S15" | "S17" => Ok(Some(Change::Unblock { key })),
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
            Ok(Some(Change::Block {
                key,
                block: Block {
                    schedule: schedule.id().to_owned(),
                    start: start.as_second(),
                    end,
                },
            }))
        }
        _ => Ok(None),
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
    let (clock, offset) = match text.find(['+', '-']).and_then(|i| text.split_at_checked(i)) {
        Some((clock, offset)) => (clock, Some(offset)),
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

    #[tokio::test]
    async fn siu_s12_blocks_and_s15_frees_the_scanners_time() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = gateway_booking::Ledger::open(
            dir.path(),
            SealKey::derive(&gateway_keystore::MasterKey::from_bytes([1; 32])),
        )
        .unwrap();
        let (service, ledger) = gateway_booking::LedgerService::new(ledger, Arc::new(vec![ct()]));
        service.spawn().unwrap();
        let changed = Arc::new(Notify::new());
        let now: Timestamp = "2027-01-12T00:00:00Z".parse().unwrap();
        let end: Timestamp = "2027-01-12T09:00:00Z".parse().unwrap();
        let free = async || {
            ledger
                .free_slots("ct-1", now, end, now)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        };
        let observe = async |text: &str| apply_text(&ledger, &changed, text).await;
        let before = free().await.len();
        let s12 = "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|1|P|2.5.1\r\
                   SCH|A77^RIS||||||||||^^^202701121000^202701121100\r\
                   PID|1||ZZPID1||ZZTEST^TARO\r\
                   RGS|1\r\
                   AIG|1||CT01^^L\r";
        observe(s12).await;
        let after = free().await;
        assert_eq!(after.len(), before - 2);
        assert!(!after.contains(&"ct-1.20270112T1000".to_string()));
        assert!(!after.contains(&"ct-1.20270112T1030".to_string()));
        let s15 = s12.replace("SIU^S12^SIU_S12", "SIU^S15^SIU_S15");
        observe(&s15).await;
        assert_eq!(free().await.len(), before);
        // Another scanner, no time, or not SIU: nothing changes.
        for other in [
            s12.replace("CT01", "MR09"),
            s12.replace("^^^202701121000^202701121100", ""),
            s12.replace("SIU^S12^SIU_S12", "ADT^A08^ADT_A01"),
        ] {
            observe(&other).await;
            assert_eq!(free().await.len(), before, "{other}");
        }
        // AIS start with a duration, and an explicit offset.
        let ais = "MSH|^~\\&|RIS|HOSP|GW|CORE|20270110120000||SIU^S12^SIU_S12|2|P|2.5.1\r\
                   SCH|B1\r\
                   AIS|1||CT^CT scan|202701120300+0000|||30|min\r\
                   AIL|1||ct01\r";
        observe(ais).await;
        let after = free().await;
        assert_eq!(after.len(), before - 1);
        assert!(!after.contains(&"ct-1.20270112T1200".to_string()));
    }
}
