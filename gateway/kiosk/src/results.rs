//! `GET /fhir/ImagingStudy?based-on=Appointment/{id}` and
//! `GET /fhir/DiagnosticReport?based-on=Appointment/{id}`: how far the results of a booked
//! exam have come back to this clinic, and the report for a physician. The answers come from
//! the [`ResultsSource`] the kiosk was handed ([`crate::Kiosk::with_results`]; `NoResults`
//! when the gateway has no `[results]`).
//!
//! Both answer a FHIR searchset Bundle with 0 or 1 entry (0: nothing has come back for that
//! appointment, or it is not this clinic's). The only search is `based-on=Appointment/{id}`
//! (the id: `gateway_id::is_valid`); any other query is 400. A results store that cannot
//! answer is 503 `transient`.
//!
//! **ImagingStudy** (any logged-in staff; no report text, no patient identity, so not
//! audited): `id` = the appointment id; `status` `registered` until an instance is pulled,
//! then `available`; `basedOn` the Appointment; `identifier` the accession (type `ACSN`,
//! `http://terminology.hl7.org/CodeSystem/v2-0203`) and each Study Instance UID
//! (`urn:dicom:uid`, value `urn:oid:{uid}`); `numberOfInstances` = the instances the core
//! announced; `meta.lastUpdated` the last change. The clinic's own progress is in
//! extensions under [`EXTENSION_BASE`]:
//! - `{base}images-received`, `{base}images-delivered`, `{base}images-failed`
//!   (`valueUnsignedInt`): pulled and sealed here, confirmed by every PACS destination,
//!   dead-lettered at some destination;
//! - `{base}complete` (`valueBoolean`): the core said the study is complete;
//! - `{base}report` (complex, only once a report is known): sub-extensions `status`
//!   (`valueCode`: preliminary, final, corrected, amended), `issued` (`valueDateTime`, if
//!   known), `received` and `delivered` (`valueBoolean`: every HL7 destination, the EMR,
//!   acknowledged it). Never the report's text.
//!
//! **DiagnosticReport** (physicians only: a clerk or an administrator gets 403 `forbidden`;
//! clinical content is for the clinicians, administrators keep accounts): `id` = the
//! appointment id; `status`; `code` LOINC 18748-4 (Diagnostic imaging study); `category`
//! RAD; `basedOn` the Appointment; `issued` if known; the text twice: `presentedForm[0]`
//! (`text/plain; charset=utf-8`, base64 of the lines, each `title: text` or just `text`,
//! joined by LF) for any FHIR client, and one contained Observation per line (`code.text` the
//! OBX-3 title, `valueString` the line; `result` references them) that the page shows line by
//! line. Every request is an audit record before its answer leaves (action
//! `patient_record_read`, subject `appointment:{id}`, never the text or a patient id; detail
//! `diagnostic-report` when text was answered, `no-report` when there was none); a refused one
//! too (outcome failure, detail `forbidden`), and one the store could not answer (failure,
//! `unavailable`). A report whose read cannot be recorded is not answered (503 `transient`).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use gateway_audit::{Action, Outcome};
use gateway_staff::Role;
use serde_json::{Value, json};

use crate::{Authenticated, Kiosk, outcome, searchset};
pub use gateway_booking::results::{
    AppointmentResults, NoResults, ReportState, ReportText, ResultsSource, ResultsUnavailable,
};

/// The base of the kiosk's ImagingStudy extension URLs (`{base}images-received`, ...).
pub const EXTENSION_BASE: &str = "urn:gatewayd:results:";

/// The one search both resources serve.
const SEARCH_ONLY: &str = "search by based-on=Appointment/{id} only";

/// Why a results search is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadSearch {
    Unreadable,
    /// Not exactly one `based-on`.
    NotSupported,
    /// `based-on` that is not `Appointment/{id}`.
    NotAnAppointment,
}

impl BadSearch {
    fn answer(self) -> Response {
        match self {
            BadSearch::Unreadable => outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "unreadable query string",
            ),
            BadSearch::NotSupported => {
                outcome(StatusCode::BAD_REQUEST, "not-supported", SEARCH_ONLY)
            }
            BadSearch::NotAnAppointment => outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "based-on takes Appointment/{id} (1-64 of A-Z a-z 0-9 - _ .)",
            ),
        }
    }
}

/// The appointment id of a `based-on=Appointment/{id}` query.
fn based_on(
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<String, BadSearch> {
    let Ok(Query(pairs)) = params else {
        return Err(BadSearch::Unreadable);
    };
    match pairs.as_slice() {
        [(key, value)] if key == "based-on" => value
            .strip_prefix("Appointment/")
            .filter(|id| gateway_id::is_valid(id))
            .map(str::to_string)
            .ok_or(BadSearch::NotAnAppointment),
        _ => Err(BadSearch::NotSupported),
    }
}

fn unavailable() -> Response {
    outcome(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        "the results store is unavailable; try again",
    )
}

fn extension(name: &str, value_kind: &str, value: Value) -> Value {
    let mut e = serde_json::Map::new();
    e.insert("url".into(), json!(format!("{EXTENSION_BASE}{name}")));
    e.insert(value_kind.into(), value);
    Value::Object(e)
}

/// A sub-extension of a complex extension (its url is the bare name).
fn sub_extension(name: &str, value_kind: &str, value: Value) -> Value {
    let mut e = serde_json::Map::new();
    e.insert("url".into(), json!(name));
    e.insert(value_kind.into(), value);
    Value::Object(e)
}

/// The FHIR ImagingStudy of an appointment's results (counts and report state, no text).
pub fn imaging_study(r: &AppointmentResults) -> Value {
    let mut identifier = Vec::new();
    if let Some(acc) = &r.accession {
        identifier.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": acc,
        }));
    }
    for uid in &r.study_uids {
        identifier.push(json!({"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}));
    }
    let mut extensions = vec![
        extension(
            "images-received",
            "valueUnsignedInt",
            json!(r.images_received),
        ),
        extension(
            "images-delivered",
            "valueUnsignedInt",
            json!(r.images_delivered),
        ),
        extension("images-failed", "valueUnsignedInt", json!(r.images_failed)),
        extension("complete", "valueBoolean", json!(r.complete)),
    ];
    if let Some(report) = &r.report {
        let mut parts = vec![sub_extension("status", "valueCode", json!(report.status))];
        if let Some(issued) = &report.issued {
            parts.push(sub_extension("issued", "valueDateTime", json!(issued)));
        }
        parts.push(sub_extension(
            "received",
            "valueBoolean",
            json!(report.received),
        ));
        parts.push(sub_extension(
            "delivered",
            "valueBoolean",
            json!(report.delivered),
        ));
        extensions.push(json!({"url": format!("{EXTENSION_BASE}report"), "extension": parts}));
    }
    let mut study = json!({
        "resourceType": "ImagingStudy",
        "id": r.appointment_id,
        "extension": extensions,
        "identifier": identifier,
        "status": if r.images_received > 0 { "available" } else { "registered" },
        "basedOn": [{"reference": format!("Appointment/{}", r.appointment_id)}],
        "numberOfInstances": r.images_announced,
    });
    if let (false, Some(obj)) = (r.updated.is_empty(), study.as_object_mut()) {
        obj.insert("meta".into(), json!({"lastUpdated": r.updated}));
    }
    study
}

/// The report's lines as plain text: `title: text` (or `text` without a title), LF-joined.
fn plain_text(t: &ReportText) -> String {
    t.text
        .iter()
        .enumerate()
        .map(
            |(i, line)| match t.titles.get(i).filter(|s| !s.is_empty()) {
                Some(title) => format!("{title}: {line}"),
                None => line.clone(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// The FHIR DiagnosticReport of an appointment's report (its text included).
pub fn diagnostic_report(appointment_id: &str, t: &ReportText) -> Value {
    let observations: Vec<Value> = t
        .text
        .iter()
        .enumerate()
        .map(|(i, line)| {
            json!({
                "resourceType": "Observation",
                "id": format!("line-{}", i + 1),
                "status": t.status,
                "code": {"text": t.titles.get(i).map_or("", String::as_str)},
                "valueString": line,
            })
        })
        .collect();
    let results: Vec<Value> = (1..=observations.len())
        .map(|n| json!({"reference": format!("#line-{n}")}))
        .collect();
    let data = base64::engine::general_purpose::STANDARD.encode(plain_text(t));
    let mut r = json!({
        "resourceType": "DiagnosticReport",
        "id": appointment_id,
        "status": t.status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}], "text": "画像診断報告書 / Imaging report"},
        "basedOn": [{"reference": format!("Appointment/{appointment_id}")}],
        "contained": observations,
        "result": results,
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "data": data}],
    });
    if let (Some(issued), Some(obj)) = (&t.issued, r.as_object_mut()) {
        obj.insert("issued".into(), json!(issued));
    }
    r
}

pub(crate) async fn imaging_studies(
    State(kiosk): State<Kiosk>,
    _who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let id = match based_on(params) {
        Ok(id) => id,
        Err(bad) => return bad.answer(),
    };
    match kiosk.results.results_of(&id).await {
        Ok(found) => searchset(found.as_ref().map(imaging_study)),
        Err(ResultsUnavailable::Unavailable) => unavailable(),
    }
}

pub(crate) async fn diagnostic_reports(
    State(kiosk): State<Kiosk>,
    who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let id = based_on(params);
    let subject = id.as_ref().ok().map(|id| format!("appointment:{id}"));
    if who.0.role != Role::Physician {
        kiosk
            .record_about(
                &who.0.name,
                Action::PatientRecordRead,
                Outcome::Failure,
                subject,
                Some("forbidden"),
            )
            .await;
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "reports are for physicians only",
        );
    }
    let id = match id {
        Ok(id) => id,
        Err(bad) => return bad.answer(),
    };
    let found = kiosk.results.report_text(&id).await;
    let (result, detail) = match &found {
        Ok(Some(_)) => (Outcome::Success, "diagnostic-report"),
        Ok(None) => (Outcome::Success, "no-report"),
        Err(_) => (Outcome::Failure, "unavailable"),
    };
    // The read is on record before any of it leaves; no record, no report.
    let recorded = kiosk
        .record_about(
            &who.0.name,
            Action::PatientRecordRead,
            result,
            subject,
            Some(detail),
        )
        .await;
    if !recorded {
        return outcome(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the read cannot be recorded in the audit trail; try again",
        );
    }
    match found {
        Ok(text) => searchset(text.as_ref().map(|t| diagnostic_report(&id, t))),
        Err(ResultsUnavailable::Unavailable) => unavailable(),
    }
}
