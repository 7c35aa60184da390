//! What a kiosk asks about the results of a booked exam, and the answers it gets
//! ([`ResultsSource`]): how far the images and the report have come back to this clinic
//! ([`AppointmentResults`], no report text) and, for a physician only, the report's readable
//! content ([`ReportText`]).
//!
//! The kiosk (HTTP, `gateway-kiosk`) serves these; the clinic's results state (in
//! `gateway-regional`) implements them. A gateway without `[results]` (or a core) hands the
//! kiosk [`NoResults`]. Every method returns a future ([`BoxFuture`]); none blocks the
//! caller's thread.

use crate::backend::BoxFuture;

/// How far the results of one appointment have come back (no report text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppointmentResults {
    pub appointment_id: String,
    pub accession: Option<String>,
    /// Study Instance UIDs the core announced.
    pub study_uids: Vec<String>,
    /// Instances the core says the cloud archive has confirmed (its latest notice).
    pub images_announced: u64,
    /// Instances pulled and sealed in this gateway's spool.
    pub images_received: u64,
    /// Instances every PACS destination confirmed.
    pub images_delivered: u64,
    /// Instances dead-lettered at some destination.
    pub images_failed: u64,
    /// The core said the study is complete.
    pub complete: bool,
    pub report: Option<ReportState>,
    /// Last change, RFC 3339 UTC.
    pub updated: String,
}

/// Where the report of one appointment is (no text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportState {
    /// `preliminary`, `final`, `corrected`, `amended` (FHIR DiagnosticReport.status from OBR-25 P/F/C/A).
    pub status: String,
    /// When the report was issued (OBR-22 or MSH-7), RFC 3339, if known.
    pub issued: Option<String>,
    pub received: bool,
    /// Every HL7 destination (the EMR) acknowledged it.
    pub delivered: bool,
}

/// The report's readable content (only for a physician).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportText {
    pub status: String,
    pub issued: Option<String>,
    /// The OBX text lines in order (OBX-5 of TX/FT/ST values, unescaped), e.g. findings and impression.
    pub text: Vec<String>,
    /// OBX-3 text of each line's observation, aligned with `text` (may be empty strings).
    pub titles: Vec<String>,
}

/// The results store could not answer (the kiosk answers 503, `transient`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultsUnavailable {
    #[error("results store is unavailable")]
    Unavailable,
}

/// The results of booked exams as this clinic has them.
pub trait ResultsSource: Send + Sync + std::fmt::Debug {
    /// `None`: nothing has come back for this appointment (or it is not this clinic's).
    fn results_of(
        &self,
        appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<AppointmentResults>, ResultsUnavailable>>;
    /// The report's text; `None` when no report has come back for this appointment.
    fn report_text(
        &self,
        appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<ReportText>, ResultsUnavailable>>;
}

/// No results ever come back (a core, or a clinic without `[results]`): every answer is
/// `Ok(None)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoResults;

impl ResultsSource for NoResults {
    fn results_of(
        &self,
        _appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<AppointmentResults>, ResultsUnavailable>> {
        Box::pin(async { Ok(None) })
    }

    fn report_text(
        &self,
        _appointment_id: &str,
    ) -> BoxFuture<'static, Result<Option<ReportText>, ResultsUnavailable>> {
        Box::pin(async { Ok(None) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_results_answers_none() {
        let source: &dyn ResultsSource = &NoResults;
        assert_eq!(source.results_of("appt-1").await, Ok(None));
        assert_eq!(source.report_text("appt-1").await, Ok(None));
    }
}
