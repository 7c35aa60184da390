//! Safety findings shown before an exam is booked: contrast reactions recorded at any
//! linked hospital (with the patient's consent) and the cumulative CT dose of the last
//! months, as the core's safety service ([`SafetyCheck`], implemented by `gateway-safety`)
//! reports them for one booking.
//!
//! The core asks [`SafetyCheck::check`] before it decides a `$hold` or `$book`. A report
//! with warnings that the request has not acknowledged (by [`SafetyWarning::id`]) refuses
//! the request with [`crate::Refusal::NeedsAcknowledgement`] and the report; a physician
//! then re-sends the request with the ids acknowledged. A booked appointment keeps the
//! contrast reactions it was booked with ([`crate::Appointment::alerts`]), so the RIS order
//! (AL1) and the worklist item (Medical Alerts, Contrast Allergies) carry them.
//!
//! Dose is the scanner's output (CTDIvol, DLP), never the patient's dose: every value says
//! so ([`DoseSummary::label`]).
//!
//! These types carry patient data (agents, reactions, dates): their `Debug` is redacted.

use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::ledger::PatientRef;

/// The class of a contrast agent (the table is `gateway_safety::contrast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastClass {
    /// Iodinated contrast media (CT, angiography).
    Iodinated,
    /// Gadolinium-based contrast agents (MR).
    Gadolinium,
}

impl ContrastClass {
    /// English name.
    pub fn en(self) -> &'static str {
        match self {
            Self::Iodinated => "iodinated contrast",
            Self::Gadolinium => "gadolinium contrast",
        }
    }
    /// Japanese name.
    pub fn ja(self) -> &'static str {
        match self {
            Self::Iodinated => "ヨード造影剤",
            Self::Gadolinium => "ガドリニウム造影剤",
        }
    }
}

/// What a warning is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// A recorded reaction to (or allergy against) a contrast agent.
    ContrastReaction,
    /// The cumulative DLP of the window passed the configured threshold.
    CumulativeDose,
}

/// One finding a physician must acknowledge before the booking proceeds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetyWarning {
    /// Stable for the same finding (the acknowledgement names it); opaque, no patient data.
    pub id: String,
    pub kind: WarningKind,
    /// Contrast reactions: the class of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrast: Option<ContrastClass>,
    /// The agent as the source hospital named it (code and text as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Severity as sent (HL7 table 0128: `SV`, `MO`, `MI`, `U`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Reactions as sent (e.g. `蕁麻疹`, `anaphylaxis`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<String>,
    /// When (onset or identification date, `YYYYMMDD` or as precise as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The hospital that recorded it (its id).
    pub hospital: String,
    /// One line in English and one in Japanese, for the OperationOutcome and the RIS.
    pub text_en: String,
    pub text_ja: String,
}

impl std::fmt::Debug for SafetyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetyWarning")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("contrast", &self.contrast)
            .finish_non_exhaustive()
    }
}

/// One CT irradiation event as the scanner reported it (RDSR, TID 10013).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DoseEventView {
    /// Irradiation Event UID (DICOM UID; no patient data).
    pub event_uid: String,
    /// When (DICOM DT as sent), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The hospital whose scanner reported it.
    pub hospital: String,
    /// Mean CTDIvol (mGy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctdivol_mgy: Option<f64>,
    /// DLP (mGy·cm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlp_mgy_cm: Option<f64>,
    /// Target region (code meaning as sent, e.g. `Chest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_region: Option<String>,
    /// Acquisition protocol as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl std::fmt::Debug for DoseEventView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoseEventView").finish_non_exhaustive()
    }
}

/// The cumulative CT dose of a window, with its events.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DoseSummary {
    /// The window (days before the request).
    pub window_days: u32,
    /// Sum of the events' DLP (mGy·cm), each event once.
    pub total_dlp_mgy_cm: f64,
    /// The configured threshold, when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_dlp_mgy_cm: Option<f64>,
    /// The events counted, oldest first.
    pub events: Vec<DoseEventView>,
    /// Always "scanner output (CTDIvol/DLP), not patient dose".
    pub label: String,
}

/// [`DoseSummary::label`].
pub const DOSE_LABEL: &str = "scanner output (CTDIvol/DLP), not patient dose";

impl std::fmt::Debug for DoseSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoseSummary")
            .field("window_days", &self.window_days)
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// What the safety service says about one booking.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SafetyReport {
    /// Findings to acknowledge (empty: nothing to warn about).
    #[serde(default)]
    pub warnings: Vec<SafetyWarning>,
    /// For CT: the cumulative dose of the window (also when under the threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose: Option<DoseSummary>,
}

impl SafetyReport {
    /// The warnings whose ids are not in `acknowledged`.
    pub fn unacknowledged<'a>(
        &'a self,
        acknowledged: &'a [String],
    ) -> impl Iterator<Item = &'a SafetyWarning> + 'a {
        self.warnings
            .iter()
            .filter(move |w| !acknowledged.iter().any(|a| a == &w.id))
    }

    /// The contrast reactions among the warnings (kept with a booked appointment).
    pub fn reactions(&self) -> Vec<SafetyWarning> {
        self.warnings
            .iter()
            .filter(|w| w.kind == WarningKind::ContrastReaction)
            .cloned()
            .collect()
    }
}

/// The safety service could not answer (the booking is then refused as unavailable: it
/// never proceeds unchecked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the safety check is unavailable")]
pub struct SafetyUnavailable;

/// What the core asks before deciding a booking.
pub trait SafetyCheck: Send + Sync + std::fmt::Debug {
    /// The findings for `patient` as booked by `clinic` (its id) on a schedule of
    /// `modality` (e.g. `CT`: the dose summary is included). Disclosures across hospitals
    /// are gated by consent and audited by the implementation; `actor` names the requester
    /// in the audit trail.
    fn check(
        &self,
        clinic: &str,
        patient: &PatientRef,
        modality: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<SafetyReport, SafetyUnavailable>>;
}
