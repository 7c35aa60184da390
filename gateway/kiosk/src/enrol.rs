//! Enrolment at the kiosk: how an invited account (fleet `staff-invite`, `gatewayd users
//! invite`, or an administrator here) gets its password and second factor without a
//! console.
//!
//! - `POST /api/enrol` `{code, password}` (no session): spends the one-time enrolment code
//!   (`gateway_staff::Staff::enrol`), sets the password (policy: a 422 names the rule) and
//!   answers the new TOTP secret as base32 text, as an `otpauth://` URI and as a QR code
//!   (SVG, `qr_svg`). An unknown, used, expired or replaced code gets one answer (401,
//!   `enrolment-code`).
//! - `POST /api/enrol/confirm` `{code, totp}` (no session): the first code from the
//!   authenticator completes the account (`confirm_enrolment`); the person then logs in
//!   with both factors (the confirming code is spent: the next one logs in).
//! - `POST /api/accounts/invite` `{name, role}` (administrators only): invites an account
//!   and answers its code once (201).
//!
//! Every step is an audit record (`account_invited`, `enrolment_code_used`,
//! `enrolment_completed`) written before the answer; no record, log line or error carries
//! a code, a password or a secret. The account file's work (Argon2, lock, fsync) runs on
//! `spawn_blocking`. Enrolment failures (an invalid code, a wrong authenticator code) are
//! throttled per client address like logins ([`crate::throttle`], a bucket of its own):
//! after [`crate::throttle::FAILURES`] that address gets 429 with `Retry-After` on both
//! enrolment routes, right or wrong, for [`crate::throttle::BACKOFF_SECS`] (one audit
//! record per back-off). A refused password is not a failure: the code was valid.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gateway_audit::{Action, Outcome};
use gateway_staff::{EnrolError, Role, StaffError};
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use crate::{Authenticated, Kiosk, Peer, json_body, now_unix, outcome};

/// Actor of enrolment records made before the account is known (a bad code).
const KIOSK_ACTOR: &str = "kiosk-enrolment";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolBody {
    code: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    code: String,
    totp: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    name: String,
    role: String,
}

/// The QR code of an `otpauth://` URI as an SVG document (no XML declaration), or `None`
/// if it does not fit a QR code (it always does: the URI is short).
pub fn qr_svg(uri: &str) -> Option<String> {
    let code =
        qrcode::QrCode::with_error_correction_level(uri.as_bytes(), qrcode::EcLevel::M).ok()?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    Some(match svg.find("<svg") {
        Some(start) => svg.get(start..).unwrap_or(&svg).to_owned(),
        None => svg,
    })
}

fn invalid_code() -> Response {
    outcome(
        StatusCode::UNAUTHORIZED,
        "enrolment-code",
        &EnrolError::InvalidCode.to_string(),
    )
}

fn throttled(retry_after_secs: u64) -> Response {
    let mut r = outcome(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        "too many failed enrolment attempts from this device; wait and try again",
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_secs.to_string()) {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    r
}

/// Counts a failed enrolment from `peer`; audits the back-off it may start.
async fn failed(kiosk: &Kiosk, peer: std::net::IpAddr, action: Action) {
    if let Some(until) = kiosk.enrol_throttle.failure(peer, now_unix()) {
        // One record per address and back-off; the address is a device's, not PHI.
        let detail = format!("address {peer} throttled until {until}");
        kiosk
            .record(KIOSK_ACTOR, action, Outcome::Failure, Some(&detail))
            .await;
    }
}

fn unavailable() -> Response {
    outcome(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        "enrolment is unavailable; try again",
    )
}

pub(crate) async fn enrol(
    State(kiosk): State<Kiosk>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(body) = json_body::<EnrolBody>(&headers, body) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"code\", \"password\"}",
        );
    };
    if let Err(retry_after) = kiosk.enrol_throttle.check(peer, now_unix()) {
        return throttled(retry_after);
    }
    let staff = Arc::clone(&kiosk.staff);
    let issuer = kiosk.issuer.to_string();
    let result = tokio::task::spawn_blocking(move || {
        staff.enrol(&body.code, &body.password, &issuer, now_unix())
    })
    .await;
    match result {
        Ok(Ok(pending)) => {
            kiosk
                .record_about(
                    &pending.name,
                    Action::EnrolmentCodeUsed,
                    Outcome::Success,
                    Some(format!("account:{}", pending.name)),
                    None,
                )
                .await;
            let uri = pending.enrollment.otpauth_uri.as_str();
            let Some(svg) = qr_svg(uri) else {
                return unavailable();
            };
            Json(json!({
                "name": pending.name,
                "role": pending.role.as_str(),
                "secret": pending.enrollment.secret_base32.as_str(),
                "otpauth_uri": uri,
                "qr_svg": svg,
            }))
            .into_response()
        }
        Ok(Err(EnrolError::InvalidCode | EnrolError::BadTotp)) => {
            kiosk
                .record(
                    KIOSK_ACTOR,
                    Action::EnrolmentCodeUsed,
                    Outcome::Failure,
                    Some("invalid-code"),
                )
                .await;
            failed(&kiosk, peer, Action::EnrolmentCodeUsed).await;
            invalid_code()
        }
        Ok(Err(EnrolError::WeakPassword(rule))) => {
            kiosk
                .record(
                    KIOSK_ACTOR,
                    Action::EnrolmentCodeUsed,
                    Outcome::Failure,
                    Some("weak-password"),
                )
                .await;
            outcome(
                StatusCode::UNPROCESSABLE_ENTITY,
                rule.code(),
                &format!("password refused: {rule}"),
            )
        }
        Ok(Err(EnrolError::Storage(e))) => {
            warn!(error = %e, "an enrolment could not be stored");
            unavailable()
        }
        Err(e) => {
            warn!(error = %e, "the enrolment task failed");
            unavailable()
        }
    }
}

pub(crate) async fn confirm(
    State(kiosk): State<Kiosk>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(body) = json_body::<ConfirmBody>(&headers, body) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"code\", \"totp\"}",
        );
    };
    if let Err(retry_after) = kiosk.enrol_throttle.check(peer, now_unix()) {
        return throttled(retry_after);
    }
    let staff = Arc::clone(&kiosk.staff);
    let result = tokio::task::spawn_blocking(move || {
        staff.confirm_enrolment(&body.code, &body.totp, now_unix())
    })
    .await;
    match result {
        Ok(Ok(done)) => {
            kiosk
                .record_about(
                    &done.name,
                    Action::EnrolmentCompleted,
                    Outcome::Success,
                    Some(format!("account:{}", done.name)),
                    None,
                )
                .await;
            Json(json!({"name": done.name, "role": done.role.as_str()})).into_response()
        }
        Ok(Err(EnrolError::BadTotp)) => {
            kiosk
                .record(
                    KIOSK_ACTOR,
                    Action::EnrolmentCompleted,
                    Outcome::Failure,
                    Some("bad-second-factor"),
                )
                .await;
            failed(&kiosk, peer, Action::EnrolmentCompleted).await;
            outcome(
                StatusCode::UNAUTHORIZED,
                "second-factor",
                &EnrolError::BadTotp.to_string(),
            )
        }
        Ok(Err(EnrolError::InvalidCode | EnrolError::WeakPassword(_))) => {
            kiosk
                .record(
                    KIOSK_ACTOR,
                    Action::EnrolmentCompleted,
                    Outcome::Failure,
                    Some("invalid-code"),
                )
                .await;
            failed(&kiosk, peer, Action::EnrolmentCompleted).await;
            invalid_code()
        }
        Ok(Err(EnrolError::Storage(e))) => {
            warn!(error = %e, "an enrolment could not be confirmed");
            unavailable()
        }
        Err(e) => {
            warn!(error = %e, "the enrolment task failed");
            unavailable()
        }
    }
}

// The session is checked after the body is read (see `json_body`).
pub(crate) async fn invite(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<InviteBody>(&headers, body);
    let who = match who {
        Ok(who) => who,
        Err(refused) => return refused,
    };
    if who.0.role != Role::Admin {
        return outcome(StatusCode::FORBIDDEN, "forbidden", "administrators only");
    }
    let Some(body) = body else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"name\", \"role\"}",
        );
    };
    let Ok(role) = body.role.parse::<Role>() else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            &StaffError::BadRole.to_string(),
        );
    };
    let staff = Arc::clone(&kiosk.staff);
    let name = body.name;
    let result = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || staff.invite(&name, role, now_unix())).await
    };
    let subject = gateway_id::is_valid(&name).then(|| format!("account:{name}"));
    match result {
        Ok(Ok(invited)) => {
            kiosk
                .record_about(
                    &who.0.name,
                    Action::AccountInvited,
                    Outcome::Success,
                    subject,
                    Some(role.as_str()),
                )
                .await;
            (
                StatusCode::CREATED,
                Json(json!({
                    "name": invited.name,
                    "role": invited.role.as_str(),
                    "code": invited.code.as_str(),
                    "expires_at": invited.expires_unix,
                })),
            )
                .into_response()
        }
        Ok(Err(e @ (StaffError::BadName | StaffError::Exists))) => {
            let (status, code) = match e {
                StaffError::Exists => (StatusCode::CONFLICT, "duplicate"),
                _ => (StatusCode::BAD_REQUEST, "invalid"),
            };
            kiosk
                .record_about(
                    &who.0.name,
                    Action::AccountInvited,
                    Outcome::Failure,
                    subject,
                    Some(code),
                )
                .await;
            outcome(status, code, &e.to_string())
        }
        Ok(Err(e)) => {
            warn!(error = %e, "an invitation could not be stored");
            unavailable()
        }
        Err(e) => {
            warn!(error = %e, "the invitation task failed");
            unavailable()
        }
    }
}
