//! The core's own kiosk bookings become RIS orders: `LocalCore` hands every booking the
//! ledger has made durable to its `OnBooked` channel (a hold is handed on too; the order
//! path skips it), and `reoffer_booked` hands every live booked appointment on again at
//! start-up, so an order lost in a crash between the decision and the order's storage is
//! made after all.
//!
//! Real pieces: the ledger service on a temporary folder and the `LocalCore` the kiosk
//! uses; the channel's receiving end stands in for the `booking-orders` thread.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use gateway_booking::{
    AppointmentRequest, AppointmentStatus, BookingBackend, Ledger, LedgerService, SealKey,
    SlotQuery, SlotSource,
};
use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_regional::local::LocalCore;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::{Notify, mpsc};

mod common;
use common::ct;

fn request(request_id: &str, slot_id: &str, hold: bool) -> AppointmentRequest {
    AppointmentRequest {
        acknowledged: Vec::new(),
        request_id: request_id.into(),
        slot_id: slot_id.into(),
        hold,
        patient_id: "ZZPID1".into(),
        patient_name: "ZZTEST^HANAKO".into(),
        birth_date: "19610402".into(),
        sex: "F".into(),
        procedure: "CT chest".into(),
        staff: "clerk.sato".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_kiosk_bookings_go_to_on_booked_and_are_reoffered_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let seal = || SealKey::derive(&MasterKey::from_bytes([9; KEY_LEN]));
    let ledger = Ledger::open(dir.path(), seal()).unwrap();
    let (service, ledger) = LedgerService::new(ledger, Arc::new(vec![ct()]));
    service.spawn().unwrap();
    let now = Timestamp::now();
    let free = ledger
        .free_slots(
            "ct-1",
            now,
            now.checked_add(SignedDuration::from_hours(24 * 14))
                .unwrap(),
            now,
        )
        .await
        .unwrap();
    assert!(
        free.len() >= 2,
        "two weeks of a weekday schedule have slots"
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let local = LocalCore::new(
        "core-1".into(),
        ledger.clone(),
        seal(),
        Arc::new(Notify::new()),
    )
    .with_on_booked(tx);

    // A booking on the core's own kiosk reaches the channel, as decided on the ledger.
    let booked = local
        .request(request("r1", &free[0].id, false))
        .await
        .unwrap();
    let sent = rx.try_recv().expect("the booking was handed to on_booked");
    assert_eq!(sent.id, booked.id);
    assert_eq!(sent.status, AppointmentStatus::Booked);
    assert_eq!(
        ledger.get(&booked.id).await.unwrap().as_ref(),
        Some(&sent),
        "what is handed on is what the ledger holds"
    );

    // A hold is handed on too (the order path makes no order of it); it is not reoffered.
    let held = local
        .request(request("r2", &free[1].id, true))
        .await
        .unwrap();
    assert_eq!(held.status, "pending");
    assert_eq!(rx.try_recv().unwrap().status, AppointmentStatus::Pending);
    assert!(rx.try_recv().is_err());

    // Start-up: every live booked appointment is offered again, the hold is not.
    assert_eq!(local.reoffer_booked().await.unwrap(), 1);
    let again = rx
        .try_recv()
        .expect("the booked appointment was offered again");
    assert_eq!(again.id, booked.id);
    assert!(rx.try_recv().is_err());

    // Without an order path there is nothing to offer.
    let bare = LocalCore::new("core-1".into(), ledger, seal(), Arc::new(Notify::new()));
    assert_eq!(bare.reoffer_booked().await.unwrap(), 0);

    // The core's kiosk offers every schedule of its ledger, also on a day without a free slot
    // (a Sunday: the schedule works weekdays).
    let far = SlotQuery {
        start_ge: Some("2031-01-05T00:00:00+09:00".into()),
        start_lt: Some("2031-01-06T00:00:00+09:00".into()),
        ..SlotQuery::default()
    };
    assert!(bare.free_slots(&far).await.slots.is_empty());
    assert_eq!(bare.schedules().await, ["ct-1"]);
}
