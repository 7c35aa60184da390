//! The identity registry (名寄せ) and consent (公開同意) at the kiosk: patient search, linked
//! identifiers, the review queue and consents, served from the registry's
//! [`IdentityService`] the kiosk was handed ([`crate::Kiosk::with_identity`]). Without one,
//! every route here answers 404 `not-supported`.
//!
//! Routes (administrators and physicians; a clerk gets 403 `forbidden`, audited):
//! - `POST /fhir/Patient/$match` (IHE PDQm-like): a FHIR `Parameters` with `resource` = a
//!   Patient and optional `count` (1-100, default 10) and `onlyCertainMatches`; answers a
//!   searchset Bundle of Patients, each entry with `search.mode` `match`, `search.score` and
//!   the `match-grade` extension (see [`fhir`] for the mapping of every element and of the
//!   score).
//! - `GET /fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:{h}|{id}` (IHE
//!   PIXm-like), optional `targetSystem`: a `Parameters` with one `targetIdentifier` per
//!   linked record the registry lets this hospital see, and `person` (the person id). Linked
//!   records withheld for want of consent are not shown, nor counted.
//! - `GET /api/identity/review`: the pairs waiting for a person's decision, both records with
//!   every field; `POST /api/identity/review/{id}` `{"verdict": "same"|"not_same"}`;
//!   `POST /api/identity/link` `{"a": {hospital_id, patient_id}, "b": {...}}` (200 with the
//!   person); `POST /api/identity/unlink` `{hospital_id, patient_id}` (204).
//! - `GET /fhir/Consent?patient=urn:gateway:hospital:{h}|{id}`: a Bundle of the person's
//!   consents, newest first; `POST /fhir/Consent` (201 with the recorded Consent and
//!   `Location`); `POST /fhir/Consent/{id}/$revoke` (200 with the Consent, `inactive`).
//!
//! The registry audits its own decisions, lookups and disclosures (the logged-in staff name is
//! the `actor`, the kiosk's `[identity] hospital_id` the requester). The two reads the
//! registry cannot attribute (the review queue, a patient's consents: the trait takes no
//! actor) are audited here as `patient_record_read` (detail `identity-review-queue`,
//! `consents`) before their answer leaves; a read that cannot be recorded is 503. A refused
//! request (a clerk) is recorded (failure, `forbidden`).
//!
//! Registry errors: `NotFound` 404 `not-found`, `Conflict` 409 `conflict` (its fixed text),
//! `Unavailable` 503 `transient`. Bad JSON or shapes are 400 `invalid` naming the element,
//! never echoing a value; no handler logs patient data.

pub mod fhir;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gateway_audit::{Action, Outcome};
use gateway_identity::Decision;
use gateway_registry::{IdentityService, RegistryError, SourceKey, Verdict};
use gateway_staff::Role;
use serde_json::{Value, json};

use crate::{Authenticated, Kiosk, fhir_json, json_body, outcome, searchset};

/// The registry and this kiosk's hospital id (the requester it names).
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) service: Arc<dyn IdentityService>,
    pub(crate) hospital_id: Arc<str>,
}

/// Default and largest `count` of a `$match`.
const DEFAULT_COUNT: usize = 10;
const MAX_COUNT: usize = 100;

fn invalid(problem: &fhir::InvalidResource) -> Response {
    outcome(StatusCode::BAD_REQUEST, "invalid", &problem.to_string())
}

/// HTTP answer of a registry error (fixed texts only).
fn registry_error(e: &RegistryError) -> Response {
    match e {
        RegistryError::NotFound => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such patient record, review item or consent",
        ),
        RegistryError::Conflict(why) => outcome(StatusCode::CONFLICT, "conflict", why),
        RegistryError::Unavailable => outcome(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the identity registry is unavailable; try again",
        ),
    }
}

fn not_recorded() -> Response {
    outcome(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        "the read cannot be recorded in the audit trail; try again",
    )
}

impl Kiosk {
    /// The registry for an identity route, or the refusal: 404 `not-supported` without a
    /// registry, 403 for a clerk (audited).
    async fn identity_for(&self, who: &Authenticated) -> Result<Identity, Response> {
        let Some(identity) = self.identity.clone() else {
            return Err(outcome(
                StatusCode::NOT_FOUND,
                "not-supported",
                "this gateway has no identity registry",
            ));
        };
        if !matches!(who.0.role, Role::Admin | Role::Physician) {
            self.record_about(
                &who.0.name,
                Action::PatientRecordRead,
                Outcome::Failure,
                None,
                Some("forbidden"),
            )
            .await;
            return Err(outcome(
                StatusCode::FORBIDDEN,
                "forbidden",
                "patient identity is for administrators and physicians",
            ));
        }
        Ok(identity)
    }
}

/// The session (checked after the body is read: see `crate::json_body`) and the registry.
async fn access(
    kiosk: &Kiosk,
    who: Result<Authenticated, Response>,
) -> Result<(Authenticated, Identity), Response> {
    let who = who?;
    let identity = kiosk.identity_for(&who).await?;
    Ok((who, identity))
}

/// `count` and `onlyCertainMatches` of a `$match`, with the Patient.
struct MatchRequest {
    patient: Value,
    count: usize,
    only_certain: bool,
}

fn parse_match(body: Option<Value>) -> Result<MatchRequest, fhir::InvalidResource> {
    use fhir::InvalidResource as Bad;
    let body = body.ok_or(Bad("send a FHIR Parameters with a Patient as `resource`"))?;
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(Bad("send a FHIR Parameters with a Patient as `resource`"));
    }
    let params = body
        .get("parameter")
        .and_then(Value::as_array)
        .ok_or(Bad("Parameters.parameter"))?;
    let mut req = MatchRequest {
        patient: Value::Null,
        count: DEFAULT_COUNT,
        only_certain: false,
    };
    for p in params {
        match p.get("name").and_then(Value::as_str) {
            Some("resource") => {
                req.patient = p
                    .get("resource")
                    .cloned()
                    .ok_or(Bad("Parameters.parameter resource"))?;
            }
            Some("count") => {
                req.count = p
                    .get("valueInteger")
                    .and_then(Value::as_u64)
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| (1..=MAX_COUNT).contains(n))
                    .ok_or(Bad("Parameters.parameter count (valueInteger 1-100)"))?;
            }
            Some("onlyCertainMatches") => {
                req.only_certain = p.get("valueBoolean").and_then(Value::as_bool).ok_or(Bad(
                    "Parameters.parameter onlyCertainMatches (valueBoolean)",
                ))?;
            }
            _ => {
                return Err(Bad(
                    "Parameters.parameter (resource, count, onlyCertainMatches)",
                ));
            }
        }
    }
    if req.patient.is_null() {
        return Err(Bad("Parameters.parameter resource (a Patient)"));
    }
    Ok(req)
}

pub(crate) async fn patient_match(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let req = match parse_match(body) {
        Ok(r) => r,
        Err(bad) => return invalid(&bad),
    };
    let query = match fhir::patient_to_record(&req.patient) {
        Ok(r) => r,
        Err(bad) => return invalid(&bad),
    };
    if query == gateway_identity::Record::default() {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the Patient has nothing to search by (name, birthDate, gender, address, telecom, identifier)",
        );
    }
    let found = identity
        .service
        .search(query, &identity.hospital_id, &who.0.name, req.count)
        .await;
    match found {
        Ok(candidates) => {
            let entries: Vec<Value> = candidates
                .iter()
                .filter(|c| !req.only_certain || c.decision == Decision::Link)
                .take(req.count)
                .map(|c| {
                    json!({
                        "resource": fhir::record_to_patient(&c.record),
                        "search": {
                            "mode": "match",
                            "score": fhir::score(c.score),
                            "extension": [
                                {"url": fhir::MATCH_GRADE, "valueCode": fhir::match_grade(c.decision)},
                                {"url": fhir::MATCH_WEIGHT, "valueDecimal": fhir::finite(c.score)},
                            ],
                        },
                    })
                })
                .collect();
            fhir_json(
                StatusCode::OK,
                json!({
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": entries.len(),
                    "entry": entries,
                }),
            )
        }
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn patient_pix(
    State(kiosk): State<Kiosk>,
    who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let identity = match kiosk.identity_for(&who).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let bad = || {
        outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "sourceIdentifier=urn:gateway:hospital:{hospital id}|{patient id} (and optionally targetSystem)",
        )
    };
    let Ok(Query(pairs)) = params else {
        return bad();
    };
    let mut source = None;
    let mut target_systems = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "sourceIdentifier" if source.is_none() => source = Some(v),
            "targetSystem" => target_systems.push(v),
            _ => return bad(),
        }
    }
    let Some(key) = source.as_deref().and_then(fhir::parse_token) else {
        return bad();
    };
    match identity
        .service
        .linked(key, &identity.hospital_id, &who.0.name)
        .await
    {
        Ok(linked) => {
            let mut parameter: Vec<Value> = linked
                .identifiers
                .iter()
                .map(fhir::identifier)
                .filter(|id| {
                    target_systems.is_empty()
                        || id
                            .get("system")
                            .and_then(Value::as_str)
                            .is_some_and(|s| target_systems.iter().any(|t| t == s))
                })
                .map(|id| json!({"name": "targetIdentifier", "valueIdentifier": id}))
                .collect();
            parameter.push(json!({"name": "person", "valueIdentifier":
                {"system": fhir::PERSON_SYSTEM, "value": linked.person.0}}));
            fhir_json(
                StatusCode::OK,
                json!({"resourceType": "Parameters", "parameter": parameter}),
            )
        }
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn review_queue(State(kiosk): State<Kiosk>, who: Authenticated) -> Response {
    let identity = match kiosk.identity_for(&who).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let queue = identity.service.review_queue().await;
    let (result, detail) = match &queue {
        Ok(_) => (Outcome::Success, "identity-review-queue"),
        Err(_) => (Outcome::Failure, "identity-review-queue-unavailable"),
    };
    let recorded = kiosk
        .record_about(
            &who.0.name,
            Action::PatientRecordRead,
            result,
            None,
            Some(detail),
        )
        .await;
    match queue {
        Ok(_) if !recorded => not_recorded(),
        Ok(items) => {
            let items: Vec<Value> = items
                .iter()
                .map(|i| {
                    json!({
                        "id": i.id,
                        "score": fhir::finite(i.score),
                        "probability": fhir::score(i.score),
                        "queued": i.queued,
                        "a": fhir::review_record(&i.a),
                        "b": fhir::review_record(&i.b),
                    })
                })
                .collect();
            Json(json!({"items": items})).into_response()
        }
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn review_decide(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let verdict = body
        .as_ref()
        .and_then(|b| b.get("verdict"))
        .and_then(|v| serde_json::from_value::<Verdict>(v.clone()).ok());
    let Some(verdict) = verdict else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"verdict\": \"same\" | \"not_same\"}",
        );
    };
    if !gateway_id::is_valid(&id) {
        return registry_error(&RegistryError::NotFound);
    }
    match identity.service.decide(&id, verdict, &who.0.name).await {
        Ok(()) => Json(json!({"id": id, "verdict": verdict})).into_response(),
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn link(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(body) = body.filter(Value::is_object) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"a\": {hospital_id, patient_id}, \"b\": {hospital_id, patient_id}}",
        );
    };
    let keys = fhir::key_object(body.get("a"), "a (hospital_id and patient_id)").and_then(|a| {
        Ok((
            a,
            fhir::key_object(body.get("b"), "b (hospital_id and patient_id)")?,
        ))
    });
    let (a, b) = match keys {
        Ok(k) => k,
        Err(bad) => return invalid(&bad),
    };
    if a == b {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "a and b are the same record",
        );
    }
    match identity.service.link(a, b, &who.0.name).await {
        Ok(person) => Json(json!({"person": person.0})).into_response(),
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn unlink(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let key = match fhir::key_object(body.as_ref(), "send JSON {hospital_id, patient_id}") {
        Ok(k) => k,
        Err(bad) => return invalid(&bad),
    };
    match identity.service.unlink(key, &who.0.name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(&e),
    }
}

/// The patient of `?patient=urn:gateway:hospital:{h}|{id}` (the only search).
fn consent_patient(
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Option<SourceKey> {
    let Ok(Query(pairs)) = params else {
        return None;
    };
    match pairs.as_slice() {
        [(k, v)] if k == "patient" => fhir::parse_token(v),
        _ => None,
    }
}

pub(crate) async fn consents(
    State(kiosk): State<Kiosk>,
    who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let identity = match kiosk.identity_for(&who).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let Some(key) = consent_patient(params) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "search Consent by patient=urn:gateway:hospital:{hospital id}|{patient id} only",
        );
    };
    let found = identity.service.consents(key).await;
    let (result, detail) = match &found {
        Ok(_) => (Outcome::Success, "consents"),
        Err(_) => (Outcome::Failure, "consents-unavailable"),
    };
    // A consent's id is the registry's opaque reference; the patient is never named here.
    let subject = found
        .as_ref()
        .ok()
        .and_then(|c| c.first())
        .map(|c| format!("consent:{}", c.id));
    let recorded = kiosk
        .record_about(
            &who.0.name,
            Action::PatientRecordRead,
            result,
            subject,
            Some(detail),
        )
        .await;
    match found {
        Ok(_) if !recorded => not_recorded(),
        Ok(list) => searchset(list.iter().map(fhir::consent_resource)),
        Err(e) => registry_error(&e),
    }
}

pub(crate) async fn record_consent(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(body) = body else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send a FHIR Consent as JSON",
        );
    };
    let new = match fhir::consent_to_new(&body) {
        Ok(n) => n,
        Err(bad) => return invalid(&bad),
    };
    match identity.service.record_consent(new, &who.0.name).await {
        Ok(c) => {
            let mut r = fhir_json(StatusCode::CREATED, fhir::consent_resource(&c));
            if gateway_id::is_valid(&c.id)
                && let Ok(v) = HeaderValue::from_str(&format!("Consent/{}", c.id))
            {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => registry_error(&e),
    }
}

/// The body, if any, is read and ignored (an unread body would reset the connection).
pub(crate) async fn revoke_consent(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    Path(id): Path<String>,
    _body: Result<Bytes, BytesRejection>,
) -> Response {
    let (who, identity) = match access(&kiosk, who).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if !gateway_id::is_valid(&id) {
        return registry_error(&RegistryError::NotFound);
    }
    match identity.service.revoke_consent(&id, &who.0.name).await {
        Ok(c) => fhir_json(StatusCode::OK, fhir::consent_resource(&c)),
        Err(e) => registry_error(&e),
    }
}
