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
//! - `serviceType[0].text`: the procedure;
//! - optionally, one `extension` with url [`ACKNOWLEDGED_WARNING`] and `valueString` = a
//!   safety warning's id per warning a physician acknowledges (the ids come with a 409, see
//!   [`crate::safety`]); only a physician may send them (403 otherwise).
//!
//! `POST /fhir/Appointment/{id}/$cancel` with `If-Match: W/"{versionId}"` (required: 428
//! without, 412 when the appointment changed since) cancels; every single-Appointment
//! answer carries its `ETag`.
//!
//! Answers: 201 with the Appointment (`status` booked or pending) or 200 for a repeat; 409
//! OperationOutcome `conflict` when the slot went to another request; 404/400 for an unknown
//! slot or a bad request; 503 `transient` when the core cannot be reached (never a pretend
//! booking).

use serde_json::{Value, json};

pub use gateway_booking::backend::{
    AppointmentRequest, AppointmentView, BookingBackend, BookingRefused,
};

/// A malformed appointment request; the text names the element (never its value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub &'static str);

/// Extension url of one acknowledged safety warning id on a `$hold` / `$book` request.
pub const ACKNOWLEDGED_WARNING: &str = "urn:gatewayd:acknowledged-warning";
/// At most this many acknowledged ids in one request.
pub const MAX_ACKNOWLEDGED: usize = 32;

/// The first element of the array `v[key]` (what `v[key][0]` reads, without indexing).
fn first<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    v.get(key)?.as_array()?.first()
}

/// Reads a FHIR Appointment request; the error text names the element.
pub fn parse_request(
    body: &Value,
    hold: bool,
    staff: &str,
) -> Result<AppointmentRequest, InvalidRequest> {
    if body["resourceType"] != "Appointment" {
        return Err(InvalidRequest("resourceType must be Appointment"));
    }
    let request_id = first(body, "identifier")
        .and_then(|i| i["value"].as_str())
        .filter(|s| gateway_id::is_valid(s))
        .ok_or(InvalidRequest(
            "identifier[0].value: the request id, 1-64 of A-Z a-z 0-9 - _ .",
        ))?;
    let slot_id = first(body, "slot")
        .and_then(|s| s["reference"].as_str())
        .and_then(|r| r.strip_prefix("Slot/"))
        .filter(|s| gateway_id::is_valid(s))
        .ok_or(InvalidRequest("slot[0].reference: Slot/{id}"))?;
    let patient = body["contained"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|r| r["resourceType"] == "Patient" && r["id"] == "patient")
        })
        .ok_or(InvalidRequest("contained: a Patient with id \"patient\""))?;
    let patient_id = first(patient, "identifier")
        .and_then(|i| i["value"].as_str())
        .filter(|s| (1..=64).contains(&s.len()) && !s.contains(['\\', '^', '=']))
        .ok_or(InvalidRequest(
            "Patient.identifier[0].value: 1-64 characters",
        ))?;
    let patient_name = first(patient, "name")
        .and_then(|n| n["text"].as_str())
        .filter(|s| {
            (1..=192).contains(&s.chars().count())
                && !s.contains('\\')
                && !s.chars().any(char::is_control)
        })
        .ok_or(InvalidRequest("Patient.name[0].text: a DICOM person name"))?;
    let birth = patient["birthDate"]
        .as_str()
        .filter(|s| s.parse::<jiff::civil::Date>().is_ok())
        .ok_or(InvalidRequest("Patient.birthDate: YYYY-MM-DD"))?;
    let sex = match patient["gender"].as_str() {
        Some("male") => "M",
        Some("female") => "F",
        Some("other") => "O",
        Some("unknown") | None => "",
        Some(_) => {
            return Err(InvalidRequest(
                "Patient.gender: male, female, other or unknown",
            ));
        }
    };
    let procedure = first(body, "serviceType")
        .and_then(|t| t["text"].as_str())
        .filter(|s| (1..=64).contains(&s.chars().count()))
        .ok_or(InvalidRequest(
            "serviceType[0].text: the procedure, 1-64 characters",
        ))?;
    let acknowledged = acknowledged(body)?;
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
        acknowledged,
    })
}

/// The acknowledged warning ids of a request (extensions with another url are ignored).
fn acknowledged(body: &Value) -> Result<Vec<String>, InvalidRequest> {
    let Some(extensions) = body.get("extension") else {
        return Ok(Vec::new());
    };
    let extensions = extensions
        .as_array()
        .ok_or(InvalidRequest("extension: an array"))?;
    let mut ids: Vec<String> = Vec::new();
    for e in extensions
        .iter()
        .filter(|e| e["url"] == ACKNOWLEDGED_WARNING)
    {
        let id = e["valueString"]
            .as_str()
            .filter(|s| (1..=128).contains(&s.chars().count()) && !s.chars().any(char::is_control))
            .ok_or(InvalidRequest(
                "extension[acknowledged-warning].valueString: a warning id, 1-128 characters",
            ))?;
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }
    if ids.len() > MAX_ACKNOWLEDGED {
        return Err(InvalidRequest(
            "extension: at most 32 acknowledged warnings",
        ));
    }
    Ok(ids)
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
    if let (Some(acc), Some(ids)) = (
        &a.accession,
        r.get_mut("identifier").and_then(Value::as_array_mut),
    ) {
        ids.push(json!({"system": "urn:gatewayd:accession", "value": acc}));
    }
    if let (Some(report), Some(obj)) = (&a.safety, r.as_object_mut()) {
        let acknowledged: Vec<Value> = report
            .warnings
            .iter()
            .map(|w| json!({"url": ACKNOWLEDGED_WARNING, "valueString": w.id}))
            .collect();
        if !acknowledged.is_empty() {
            obj.insert("extension".into(), Value::Array(acknowledged));
        }
        if let Some(dose) = &report.dose {
            obj.insert(
                "contained".into(),
                json!([crate::safety::dose_observation(dose)]),
            );
        }
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
