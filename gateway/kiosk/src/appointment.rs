//! `POST /fhir/Appointment/$hold` and `$book`, `GET /fhir/Appointment?patient=`: the kiosk's
//! side of a booking. The [`BookingBackend`] carries requests to the core hospital and keeps
//! the clinic's copy of their outcomes.
//!
//! A request is a FHIR Appointment with:
//! - `identifier[0].value`: the client-made request id (1-64 of `A-Z a-z 0-9 - _ .`); a
//!   repeat with the same id is answered with the first outcome and books nothing twice;
//! - `slot[0].reference`: `Slot/{slot id}`;
//! - a contained Patient (`#patient`) with `identifier[0].value`, `name[0].text` (DICOM PN,
//!   e.g. `YAMADA^TARO=山田^太郎=やまだ^たろう`), `birthDate` (`YYYY-MM-DD`) and `gender`;
//! - `serviceType[0].text`: the procedure.
//!
//! `POST /fhir/Appointment/{id}/$cancel` with `If-Match: W/"{versionId}"` (required: 428
//! without, 412 when the appointment changed since) cancels; every single-Appointment
//! answer carries its `ETag`.
//!
//! Answers: 201 with the Appointment (`status` booked or pending) or 200 for a repeat; 409
//! OperationOutcome `conflict` when the slot went to another request; 404/400 for an unknown
//! slot or a bad request; 503 `transient` when the core cannot be reached (never a pretend
//! booking).

use futures_util::future::BoxFuture;
use serde_json::{Value, json};

/// What the kiosk asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppointmentRequest {
    pub request_id: String,
    pub slot_id: String,
    pub hold: bool,
    pub patient_id: String,
    pub patient_name: String,
    /// `YYYYMMDD`.
    pub birth_date: String,
    /// DICOM sex: `M`, `F`, `O`.
    pub sex: String,
    pub procedure: String,
    /// The staff member asking.
    pub staff: String,
}

/// An appointment as the clinic knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppointmentView {
    pub id: String,
    pub request_id: String,
    pub slot_id: String,
    /// FHIR status: `pending`, `booked`, `cancelled`, ...
    pub status: String,
    pub start: String,
    pub end: String,
    pub accession: Option<String>,
    pub patient_id: String,
    pub procedure: String,
    /// True when this is the first answer to the request (201), false for a repeat (200).
    pub created: bool,
    /// Changes with every status change: `meta.versionId` and the ETag `W/"{version}"`.
    pub version: u64,
}

/// How a request ended when it did not give an appointment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookingRefused {
    #[error("the slot was booked by another request")]
    Conflict,
    #[error("no such slot")]
    NotFound,
    #[error("the slot has already begun")]
    Expired,
    #[error("the request was refused: {0}")]
    Invalid(String),
    #[error("the core hospital cannot be reached; nothing was changed, try again later")]
    Unavailable,
    #[error("the appointment changed since it was read (now version {current}); read it again")]
    VersionMismatch { current: u64 },
}

/// The clinic side of the booking exchange.
pub trait BookingBackend: Send + Sync + std::fmt::Debug {
    fn request(
        &self,
        req: AppointmentRequest,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>>;

    /// Cancels the appointment `id` if it is still at version `if_match`; cancelling a
    /// cancelled appointment again gives it back unchanged.
    fn cancel(
        &self,
        id: String,
        if_match: u64,
        staff: String,
    ) -> BoxFuture<'static, Result<AppointmentView, BookingRefused>>;

    /// The clinic's appointments of one patient.
    fn appointments_of(&self, patient_id: &str) -> Vec<AppointmentView>;

    /// An opaque reference to a patient for the audit trail (e.g. a keyed MAC of the id).
    fn patient_ref(&self, patient_id: &str) -> String;
}

fn token(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Reads a FHIR Appointment request; the error text names the element.
pub fn parse_request(body: &Value, hold: bool, staff: &str) -> Result<AppointmentRequest, String> {
    if body["resourceType"] != "Appointment" {
        return Err("resourceType must be Appointment".into());
    }
    let request_id = body["identifier"][0]["value"]
        .as_str()
        .filter(|s| token(s))
        .ok_or("identifier[0].value: the request id, 1-64 of A-Z a-z 0-9 - _ .")?;
    let slot_id = body["slot"][0]["reference"]
        .as_str()
        .and_then(|r| r.strip_prefix("Slot/"))
        .filter(|s| token(s))
        .ok_or("slot[0].reference: Slot/{id}")?;
    let patient = body["contained"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|r| r["resourceType"] == "Patient" && r["id"] == "patient")
        })
        .ok_or("contained: a Patient with id \"patient\"")?;
    let patient_id = patient["identifier"][0]["value"]
        .as_str()
        .filter(|s| (1..=64).contains(&s.len()) && !s.contains(['\\', '^', '=']))
        .ok_or("Patient.identifier[0].value: 1-64 characters")?;
    let patient_name = patient["name"][0]["text"]
        .as_str()
        .filter(|s| {
            (1..=192).contains(&s.chars().count())
                && !s.contains('\\')
                && !s.chars().any(char::is_control)
        })
        .ok_or("Patient.name[0].text: a DICOM person name")?;
    let birth = patient["birthDate"]
        .as_str()
        .filter(|s| s.parse::<jiff::civil::Date>().is_ok())
        .ok_or("Patient.birthDate: YYYY-MM-DD")?;
    let sex = match patient["gender"].as_str() {
        Some("male") => "M",
        Some("female") => "F",
        Some("other") => "O",
        Some("unknown") | None => "",
        Some(_) => return Err("Patient.gender: male, female, other or unknown".into()),
    };
    let procedure = body["serviceType"][0]["text"]
        .as_str()
        .filter(|s| (1..=64).contains(&s.chars().count()))
        .ok_or("serviceType[0].text: the procedure, 1-64 characters")?;
    Ok(AppointmentRequest {
        request_id: request_id.to_string(),
        slot_id: slot_id.to_string(),
        hold,
        patient_id: patient_id.to_string(),
        patient_name: patient_name.to_string(),
        birth_date: birth.replace('-', ""),
        sex: sex.to_string(),
        procedure: procedure.to_string(),
        staff: staff.to_string(),
    })
}

/// The FHIR Appointment resource of a view (patient by identifier only).
pub fn resource(a: &AppointmentView) -> Value {
    let mut r = json!({
        "resourceType": "Appointment",
        "id": a.id,
        "identifier": [{"system": "urn:gatewayd:request", "value": a.request_id}],
        "status": a.status,
        "slot": [{"reference": format!("Slot/{}", a.slot_id)}],
        "start": a.start,
        "end": a.end,
        "serviceType": [{"text": a.procedure}],
        "participant": [{"actor": {"identifier": {"value": a.patient_id}}, "status": "accepted"}],
        "meta": {"versionId": a.version.to_string()},
    });
    if let (Some(acc), Some(ids)) = (&a.accession, r["identifier"].as_array_mut()) {
        ids.push(json!({"system": "urn:gatewayd:accession", "value": acc}));
    }
    r
}

/// The weak ETag of a version.
pub fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// The version an `If-Match` value names (`W/"3"`, `"3"`); `None` if it names none.
pub fn parse_if_match(value: &str) -> Option<u64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}
