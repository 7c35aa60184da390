//! The regional booking exchange between clinic gateways and the core hospital's gateway,
//! through the regional MQTT broker (rumqttc, TLS).
//!
//! Topics (every id 1..=64 of `[A-Za-z0-9._-]`, node ids of the gateways; no patient data):
//!
//! | topic | from -> to | QoS / retained | payload |
//! |---|---|---|---|
//! | `bk/{core}/status` | core -> all | 1 / retained; also the core's last will | `{"state":"online"\|"offline","at"}` |
//! | `bk/{core}/slots/{schedule}` | core -> all | 1 / retained | [`wire::SlotsMessage`]: free slots, no patient data |
//! | `bk/{core}/req/{clinic}/{msg}` | clinic -> core | 1 / no | sealed [`wire::WireRequest`] (`kind` `booking-request`) |
//! | `bk/{clinic}/resp/{core}/{msg}` | core -> clinic | 1 / no | sealed [`wire::WireDecision`] (`kind` `booking-decision`) |
//!
//! The same two inboxes carry results return ([`results`]: `result-notice` /
//! `result-report` to the clinic, `result-ack` to the core) and dose reports ([`dose`]:
//! `dose-report` to the core, `dose-ack` to the clinic).
//!
//! `{msg}` is a random id made per message (never the kiosk's request id, which the sealed
//! body carries). The broker's ACL should confine a gateway (MQTT user = its certificate's
//! CN = its node id) to writing `bk/{itself}/#`, `bk/+/req/{itself}/#` and
//! `bk/+/resp/{itself}/#`, and reading `bk/{itself}/#` and `bk/+/slots/#`, `bk/+/status`.
//!
//! Sealing: requests and decisions carry patient identity, so each is HPKE-sealed
//! (`gateway-exchange`, Auth mode) to the recipient's X25519 key from `[[exchange.peers]]`
//! and authenticated as the sender's; the routing header is bound to the ciphertext. The
//! broker operator sees ids and ciphertext only.
//!
//! Roles:
//! - [`core::CoreExchange`] on the core: publishes the free slots of every schedule (on
//!   start, on every change, every `booking.publish_interval`), decides each request with the
//!   ledger ([`gateway_booking::LedgerHandle`]; durable before the answer is sealed and
//!   sent) and answers.
//!   A request that arrives after its `expires_at` is refused without touching the ledger,
//!   so a clinic that gave up waiting never finds it booked later.
//! - [`clinic::ClinicExchange`] on a clinic: caches the core's slot publications and serves
//!   them with their age (stale when older than `booking.stale_after`, or when the core's
//!   status is `offline` or the broker is unreachable); sends booking requests and waits at
//!   most `booking.request_timeout` for the decision, else refuses (503) without pretending.
//!   It keeps a sealed copy of its own appointments (`<data_dir>/booking/clinic.sealed`), so
//!   a repeated request id is answered locally with its first outcome.
//! - [`local::LocalCore`]: the core's own kiosk, booking directly on its ledger.
//! - [`ris`]: the core hospital's own bookings from its RIS (SIU^S12..S17 on the HL7
//!   listener) block the scanner's time on the ledger; a task of its own consumes them from
//!   the listener's observer channel, so no HL7 acknowledgement waits on the ledger.
//!
//! The ledger itself is a service (`gateway_booking::LedgerService`, one thread doing its
//! file work); every role here holds a `gateway_booking::LedgerHandle` and awaits it. New
//! bookings go to the [`OnBooked`] channel (the OMG^O19 for the RIS), never through a call
//! on the deciding path. The kiosk-facing traits ([`gateway_booking::SlotSource`],
//! [`gateway_booking::BookingBackend`]) are the booking domain's: this crate does not depend
//! on the kiosk's HTTP face.
//!
//! Invariants: nothing read from the broker is trusted before it opens with the named
//! peer's key; nothing patient-related is logged or put in a topic; no `unwrap` on any
//! broker input; the MQTT event loop never waits on the ledger's disk writes for longer than
//! one decision.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod clinic;
pub mod core;
pub mod dose;
pub mod local;
mod mqtt;
pub mod results;
pub mod ris;
pub mod wire;

pub use mqtt::Connection;

/// True for 1..=64 characters of `[A-Za-z0-9._-]` (the gateway's one id rule).
pub use gateway_id::is_valid as valid_id;

/// Where the core sends each appointment it has just booked (e.g. to become an OMG^O19 for
/// the RIS, `gateway_booking::order::ris_order`). A channel, so the deciding path never
/// waits on what is done with it; unbounded because every item is one human booking that
/// the ledger has already made durable (its rate is bounded by the ledger's own `fsync`), and
/// dropping one would lose the RIS order without a trace.
pub type OnBooked = tokio::sync::mpsc::UnboundedSender<gateway_booking::Appointment>;

/// Hands a new booking to `on_booked`, if any; a receiver that is gone is logged.
fn booked(on_booked: Option<&OnBooked>, appointment: gateway_booking::Appointment) {
    if let Some(tx) = on_booked
        && tx.send(appointment).is_err()
    {
        tracing::warn!("booked appointment not handed on: its consumer has stopped");
    }
}

/// The core's safety check, when `[safety]` is configured (see [`gateway_booking::safety`]).
pub type Safety = std::sync::Arc<dyn gateway_booking::SafetyCheck>;

/// Longest the core waits for its safety check on one request; then the request is refused
/// as unavailable (the exchange's session, which awaits the check, never stalls on it).
pub const SAFETY_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the safety check says about a request before the ledger decides it.
#[derive(Debug)]
enum Gate {
    /// Decide it, keeping `alerts` with the appointment; the answer carries `report`.
    Decide {
        alerts: Vec<gateway_booking::SafetyWarning>,
        report: Option<gateway_booking::SafetyReport>,
    },
    /// Refuse it without recording anything (warnings to acknowledge, or no check).
    Refuse {
        decision: gateway_booking::Decision,
        report: Option<gateway_booking::SafetyReport>,
    },
}

/// Asks `safety` (if any) about a request before the ledger decides it.
///
/// A request the ledger has decided before is not checked again: the ledger answers its
/// first decision, and a `book` confirming a hold keeps the alerts the hold was
/// acknowledged with. A slot of no schedule is not checked (the ledger refuses it). A check
/// that fails, or does not answer within [`SAFETY_CHECK_TIMEOUT`], refuses the request as
/// `Unavailable`; warnings not in `acknowledged` refuse it
/// as `NeedsAcknowledgement` with the report. Neither refusal is recorded, so the request
/// may be sent again under the same id.
async fn safety_gate(
    safety: Option<&Safety>,
    ledger: &gateway_booking::LedgerHandle,
    clinic: &str,
    request: &gateway_booking::BookingRequest,
    acknowledged: &[String],
    actor: &str,
) -> Result<Gate, gateway_booking::LedgerError> {
    use gateway_booking::{Decision, Refusal};
    let unchecked = Gate::Decide {
        alerts: Vec::new(),
        report: None,
    };
    let Some(safety) = safety else {
        return Ok(unchecked);
    };
    if ledger.decided(clinic, &request.request_id).await?.is_some() {
        return Ok(unchecked);
    }
    let Some(modality) = ledger
        .schedules()
        .iter()
        .find(|s| s.slot(&request.slot_id).is_some())
        .map(|s| s.modality().to_owned())
    else {
        return Ok(unchecked);
    };
    let check = safety.check(clinic, &request.patient, &modality, actor);
    match tokio::time::timeout(SAFETY_CHECK_TIMEOUT, check)
        .await
        .unwrap_or(Err(gateway_booking::SafetyUnavailable))
    {
        Err(gateway_booking::SafetyUnavailable) => {
            tracing::warn!(%clinic, "safety check unavailable: booking request refused, nothing recorded");
            Ok(Gate::Refuse {
                decision: Decision::Refused {
                    code: Refusal::Unavailable,
                    reason: "the safety check is unavailable; nothing was booked, try again later"
                        .into(),
                },
                report: None,
            })
        }
        Ok(report) => {
            let open = report.unacknowledged(acknowledged).count();
            if open > 0 {
                tracing::info!(%clinic, warnings = open, "booking request refused: safety warnings to acknowledge, nothing recorded");
                Ok(Gate::Refuse {
                    decision: Decision::Refused {
                        code: Refusal::NeedsAcknowledgement,
                        reason: "safety warnings must be acknowledged by a physician".into(),
                    },
                    report: Some(report),
                })
            } else {
                Ok(Gate::Decide {
                    alerts: report.reactions(),
                    report: Some(report),
                })
            }
        }
    }
}

/// A fresh random message id (32 hex digits).
fn message_id() -> String {
    let mut b = [0u8; 16];
    // A failed random source gives a time-based id: unique enough for routing only.
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = t.to_be_bytes();
    }
    hex::encode(b)
}

/// The core's answer to a cancel, as a decision and the appointment's version.
fn cancel_decision(
    result: Result<gateway_booking::Appointment, gateway_booking::LedgerError>,
) -> Result<(gateway_booking::Decision, u64), gateway_booking::LedgerError> {
    use gateway_booking::{Decision, LedgerError, Refusal};
    let refuse = |code, reason: &str, version| {
        Ok((
            Decision::Refused {
                code,
                reason: reason.to_owned(),
            },
            version,
        ))
    };
    match result {
        Ok(a) => Ok((
            Decision::Booked {
                appointment_id: a.id,
                accession: a.accession,
                status: a.status,
            },
            a.version,
        )),
        Err(LedgerError::NoSuchAppointment(_)) => {
            refuse(Refusal::NotFound, "no such appointment of this clinic", 0)
        }
        Err(LedgerError::VersionMismatch { current, .. }) => refuse(
            Refusal::VersionMismatch,
            "the appointment changed since it was read",
            current,
        ),
        Err(LedgerError::Transition { .. }) => refuse(
            Refusal::Conflict,
            "the appointment cannot be cancelled in its state",
            0,
        ),
        Err(e) => Err(e),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Topic builders and parsers.
pub mod topics {
    /// Prefix of every booking topic.
    pub const PREFIX: &str = "bk";

    pub fn status(core: &str) -> String {
        format!("{PREFIX}/{core}/status")
    }

    pub fn slots(core: &str, schedule: &str) -> String {
        format!("{PREFIX}/{core}/slots/{schedule}")
    }

    pub fn request(core: &str, clinic: &str, msg: &str) -> String {
        format!("{PREFIX}/{core}/req/{clinic}/{msg}")
    }

    pub fn decision(clinic: &str, core: &str, msg: &str) -> String {
        format!("{PREFIX}/{clinic}/resp/{core}/{msg}")
    }

    /// `bk/{me}/{kind}/{peer}/{msg}` -> `(peer, msg)` when every level is a valid id.
    pub fn parse_inbox<'t>(me: &str, kind: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let mut l = topic.split('/');
        let (Some(p), Some(m), Some(k), Some(peer), Some(msg), None) =
            (l.next(), l.next(), l.next(), l.next(), l.next(), l.next())
        else {
            return None;
        };
        (p == PREFIX && m == me && k == kind && super::valid_id(peer) && super::valid_id(msg))
            .then_some((peer, msg))
    }

    /// `bk/{core}/slots/{schedule}` -> schedule.
    pub fn parse_slots<'t>(core: &str, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(core)?.strip_prefix("/slots/")?;
        super::valid_id(rest).then_some(rest)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn inbox_topics_parse_only_for_this_gateway() {
            let t = request("core-1", "clinic-a", "m1");
            assert_eq!(t, "bk/core-1/req/clinic-a/m1");
            assert_eq!(parse_inbox("core-1", "req", &t), Some(("clinic-a", "m1")));
            assert_eq!(parse_inbox("core-2", "req", &t), None);
            assert_eq!(parse_inbox("core-1", "resp", &t), None);
            assert_eq!(parse_inbox("core-1", "req", "bk/core-1/req/a+b/m1"), None);
            assert_eq!(parse_inbox("core-1", "req", "bk/core-1/req/a/m1/x"), None);
            assert_eq!(
                parse_slots("core-1", &slots("core-1", "ct-1")),
                Some("ct-1")
            );
            assert_eq!(parse_slots("core-1", "bk/core-1/slots/a/b"), None);
            assert_eq!(parse_slots("core-1", "bk/core-2/slots/ct-1"), None);
        }
    }
}
