//! CT dose reports read at a clinic's gateway, carried to the core's safety store: the
//! clinic's sealed `dose-report` (the events of one report and the patient as the clinic
//! knows them) and the core's sealed `dose-ack` once the events are durable there.
//!
//! Topics: reports go to `bk/{core}/req/{clinic}/{msg}`, acknowledgements to
//! `bk/{clinic}/resp/{core}/{msg}` (the booking inboxes), `{msg}` random per message. The
//! clinic's dose task sends a report and waits for its acknowledgement
//! ([`crate::clinic::ClinicExchange::send_dose`]); without one it keeps the report queued in
//! its spool and sends it again later, so a report is never lost and, the events being
//! de-duplicated by Irradiation Event UID at the core, never counted twice.
//! Nothing here is kept on disk.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use gateway_booking::{DoseEventView, PatientRef};

/// `kind` of a sealed dose report (clinic -> core).
pub const KIND_DOSE: &str = "dose-report";
/// `kind` of a sealed acknowledgement of a dose report (core -> clinic).
pub const KIND_DOSE_ACK: &str = "dose-ack";
/// Most events one report may carry; the core refuses a report with more.
pub const MAX_EVENTS: usize = 10_000;

/// The CT events of one dose report received at a clinic.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireDose {
    /// The report's SOP Instance UID (no patient data); its acknowledgement names it.
    pub report_id: String,
    /// The patient as the clinic knows them (its own patient id).
    pub patient: PatientRef,
    /// The report's Accession Number, when it has one.
    #[serde(default)]
    pub accession: Option<String>,
    /// The events (`hospital` = the clinic).
    pub events: Vec<DoseEventView>,
}

impl std::fmt::Debug for WireDose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireDose")
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl WireDose {
    /// Why the core refuses this report, if it does: `report_id` and every `event_uid`
    /// must be a DICOM UID ([`gateway_id::is_dicom_uid`]), at most [`MAX_EVENTS`] events. The reason
    /// names the field, never its value.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if !gateway_id::is_dicom_uid(&self.report_id) {
            Some("report_id is not a UID")
        } else if self.events.len() > MAX_EVENTS {
            Some("too many events")
        } else if self
            .events
            .iter()
            .any(|e| !gateway_id::is_dicom_uid(&e.event_uid))
        {
            Some("an event_uid is not a UID")
        } else {
            None
        }
    }
}

/// The core has the report's events durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireDoseAck {
    pub report_id: String,
}

/// A report a clinic sent, as the core's exchange hands it to the safety task: the clinic's
/// id, the report, and `done` (`true` once the events are durable: then the acknowledgement
/// goes back).
#[derive(Debug)]
pub struct DoseIn {
    pub clinic: String,
    pub dose: WireDose,
    pub done: oneshot::Sender<bool>,
}

/// A dose report was not acknowledged by the core (not connected, no answer in time): it
/// stays queued at the clinic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the core did not acknowledge the dose report; it stays queued")]
pub struct DoseNotSent;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn event(uid: &str) -> DoseEventView {
        DoseEventView {
            event_uid: uid.into(),
            when: Some("20270110093000".into()),
            hospital: "clinic-a".into(),
            ctdivol_mgy: Some(12.5),
            dlp_mgy_cm: Some(480.25),
            target_region: Some("Chest".into()),
            protocol: Some("CHEST ROUTINE".into()),
        }
    }

    fn dose() -> WireDose {
        WireDose {
            report_id: "1.2.392.200036.9116.2.6.1.48.1".into(),
            patient: PatientRef {
                id: "ZZPID1".into(),
                name: "ZZTEST^HANAKO".into(),
                birth_date: "19610402".into(),
                sex: "F".into(),
            },
            accession: Some("RB20270112000001".into()),
            events: vec![event("1.2.3.1"), event("1.2.3.2")],
        }
    }

    #[test]
    fn a_dose_report_and_its_ack_survive_the_wire() {
        let d = dose();
        let back: WireDose = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.problem(), None);
        let ack = WireDoseAck {
            report_id: d.report_id.clone(),
        };
        let back: WireDoseAck = serde_json::from_slice(&serde_json::to_vec(&ack).unwrap()).unwrap();
        assert_eq!(back, ack);
        // No accession: the field may be absent.
        let mut v = serde_json::to_value(&d).unwrap();
        v.as_object_mut().unwrap().remove("accession");
        let back: WireDose = serde_json::from_value(v).unwrap();
        assert_eq!(back.accession, None);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(dose()).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<WireDose>(v).is_err());
        let ack = serde_json::json!({"report_id": "1.2", "more": true});
        assert!(serde_json::from_value::<WireDoseAck>(ack).is_err());
    }

    #[test]
    fn ids_must_be_uids_and_events_bounded() {
        let mut d = dose();
        d.report_id = String::new();
        assert!(d.problem().is_some());
        d.report_id = "../etc".into();
        assert!(d.problem().is_some());
        d.report_id = "1".repeat(65);
        assert!(d.problem().is_some());
        d.report_id = "1".repeat(64);
        assert_eq!(d.problem(), None);
        d.events.push(event("1.2.x"));
        assert!(d.problem().is_some());
        d.events.pop();
        d.events.push(event(""));
        assert!(d.problem().is_some());
        d.events = vec![event("1.2"); MAX_EVENTS];
        assert_eq!(d.problem(), None);
        d.events.push(event("1.2"));
        assert_eq!(d.problem(), Some("too many events"));
    }

    #[test]
    fn debug_shows_no_patient_data() {
        let shown = format!("{:?}", dose());
        assert!(
            !shown.contains("ZZPID1") && !shown.contains("ZZTEST"),
            "{shown}"
        );
    }
}
