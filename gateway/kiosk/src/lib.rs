//! The kiosk API on `booking.listen`: HTTPS only, two-factor staff login (MHLW guideline
//! v6.0), server-side sessions, roles, and FHIR R4-shaped booking resources.
//!
//! Routes (described for clients by `GET /openapi.json`):
//! - `POST /api/login` `{name, password, code}` -> 200 and a session cookie (`Secure`,
//!   `HttpOnly`, `SameSite=Strict`), or 401 with one fixed OperationOutcome
//!   ([`LOGIN_REFUSED`]): an unknown name, a wrong password, a wrong, reused or missing
//!   code, a locked and a disabled account get byte-identical answers, each after one
//!   Argon2 verification. Every attempt is an audit record with its real reason
//!   (`unknown-account`, `wrong-password`, `bad-second-factor`, `locked`, ...).
//! - Throttling ([`throttle`]): failures are counted per TCP peer address; after
//!   [`throttle::FAILURES`] in [`throttle::WINDOW_SECS`] that address gets 429 with
//!   `Retry-After` for every login for [`throttle::BACKOFF_SECS`], without touching any
//!   account (one audit record per back-off). The account lock
//!   (`gateway_staff::MAX_FAILURES`) is a second, higher threshold. Serve the kiosk
//!   through [`Kiosk::service`] (the peer address as `ConnectInfo<PeerAddr>`); without a
//!   peer address every client shares one bucket (fail closed).
//! - The page shows every time (a booking's start, an account's lock end) in the browser's
//!   locale and time zone (`Intl.DateTimeFormat`), never a Unix timestamp.
//! - `POST /api/logout`, `GET /api/me`; `GET /api/accounts` for admins only (403 otherwise),
//!   with each account's `locked_until_unix` while it is locked.
//! - Enrolment of invited accounts, no session needed: `POST /api/enrol` `{code, password}`
//!   and `POST /api/enrol/confirm` `{code, totp}`; `POST /api/accounts/invite` for admins.
//!   Failed enrolments are throttled per address like logins, in a bucket of their own.
//!   See `enrol`.
//! - `GET /fhir/Slot?schedule=&status=free&start=ge..&start=lt..` -> a searchset Bundle from
//!   the [`SlotSource`]; slots served from a cache the core has not refreshed carry the meta
//!   tag `stale`.
//!
//! - `GET /`, `/app.js`, `/identity.js`, `/app.css`, `/favicon.svg`: the kiosk page (`assets/`, plain DOM, no build step;
//!   same-origin Content Security Policy).
//!
//! Every route but the login, the page and the OpenAPI document needs a session (401
//! without). Errors are OperationOutcome resources; no route echoes request content.
//!
//! No handler does file work on an async worker: the login's Argon2 and account file, the
//! staff account reads and every audit append (file lock, `fdatasync`, head replaced) run
//! on `spawn_blocking`. An audited answer is sent only after its audit record is written.
//!
//! - `POST /fhir/Appointment/$hold` and `$book` (a FHIR Appointment with a contained
//!   Patient), `GET /fhir/Appointment?patient=` (each read audited): see [`appointment`].
//!   Safety warnings the core reports (contrast reactions, cumulative CT dose) answer 409
//!   until a physician acknowledges them (403 for anyone else; the acknowledgement that lets
//!   a booking proceed is audited `safety_acknowledged`): see [`safety`].
//! - `GET /fhir/ImagingStudy?based-on=Appointment/{id}` (any staff: images announced,
//!   received, delivered, failed; the report's state, never its text) and
//!   `GET /fhir/DiagnosticReport?based-on=Appointment/{id}` (physicians only, 403 otherwise;
//!   every request audited as a patient record read before it is answered): see [`results`].
//!
//! - On the core gateway ([`Kiosk::with_identity`]), for administrators and physicians:
//!   `POST /fhir/Patient/$match` (PDQm-like), `GET /fhir/Patient/$ihe-pix` (PIXm-like), the
//!   review queue, link and unlink (`/api/identity/...`) and FHIR Consent (`GET`/`POST
//!   /fhir/Consent`, `POST /fhir/Consent/{id}/$revoke`): see [`identity`]. Without a
//!   registry these answer 404 `not-supported`.
//!
//! Module map: [`session`] (tokens, cookie, expiry), [`throttle`] (per-address login
//! back-off), [`tls`] (rustls listener for
//! `axum::serve`, the development self-signed certificate), [`appointment`] (requests,
//! resources, the [`appointment::BookingBackend`]), [`safety`] (the 409 of safety warnings,
//! the dose Observation), [`results`] (ImagingStudy and
//! DiagnosticReport of a booked exam, from a [`results::ResultsSource`]), [`identity`]
//! (the identity registry's routes; [`identity::fhir`] maps FHIR to and from the registry's
//! types), `openapi` (the document). The slot, appointment and results types and the [`SlotSource`] /
//! [`appointment::BookingBackend`] / [`results::ResultsSource`] traits belong to the booking
//! domain (`gateway-booking`) and are re-exported here.

// Handlers read network input: no indexing or string slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]
#![cfg_attr(test, allow(clippy::indexing_slicing, clippy::string_slice))]

pub mod appointment;
mod enrol;
pub mod identity;
mod openapi;
pub mod results;
pub mod safety;
pub mod session;
pub mod throttle;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_audit::{Action, AuditLog, Event, Outcome};
use gateway_staff::{AccountInfo, LoginError, Role, Staff, StaffError};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use session::{Sessions, Staffer};
use throttle::Throttle;

pub use gateway_booking::backend::{SlotAnswer, SlotQuery, SlotSource, SlotView};

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct Kiosk {
    staff: Arc<Staff>,
    audit: Arc<AuditLog>,
    sessions: Arc<Sessions>,
    throttle: Arc<Throttle>,
    /// Failed enrolments per address (a bucket of its own: a mistyped code does not block
    /// logins from the same terminal).
    enrol_throttle: Arc<Throttle>,
    /// The issuer authenticator apps show for secrets enrolled here.
    issuer: Arc<str>,
    slots: Arc<dyn SlotSource>,
    booking: Arc<dyn appointment::BookingBackend>,
    /// How far booked exams' results have come back ([`results::NoResults`] unless
    /// [`Kiosk::with_results`] hands a store).
    results: Arc<dyn results::ResultsSource>,
    /// The identity registry and this gateway's hospital id (`None` unless
    /// [`Kiosk::with_identity`]: the identity routes answer 404 `not-supported`).
    identity: Option<identity::Identity>,
}

impl Kiosk {
    pub fn new(
        staff: Arc<Staff>,
        audit: Arc<AuditLog>,
        slots: Arc<dyn SlotSource>,
        booking: Arc<dyn appointment::BookingBackend>,
    ) -> Self {
        Self {
            staff,
            audit,
            sessions: Arc::new(Sessions::default()),
            throttle: Arc::new(Throttle::default()),
            enrol_throttle: Arc::new(Throttle::default()),
            issuer: Arc::from("gatewayd"),
            slots,
            booking,
            results: Arc::new(results::NoResults),
            identity: None,
        }
    }

    /// The identity registry (名寄せ, 公開同意) on the core gateway: patient search, linked
    /// identifiers, the review queue and consents ([`identity`]). `hospital_id` is the core's
    /// own `[identity] hospital_id`, the requester the registry checks consents against.
    #[must_use]
    pub fn with_identity(
        mut self,
        service: Arc<dyn gateway_registry::IdentityService>,
        hospital_id: &str,
    ) -> Self {
        self.identity = Some(identity::Identity {
            service,
            hospital_id: Arc::from(hospital_id),
        });
        self
    }

    /// The clinic's results of booked exams, served as ImagingStudy and DiagnosticReport
    /// (default [`results::NoResults`]: every search answers an empty Bundle).
    #[must_use]
    pub fn with_results(mut self, results: Arc<dyn results::ResultsSource>) -> Self {
        self.results = results;
        self
    }

    /// What `axum::serve` runs on a [`tls::TlsListener`]: the [`Kiosk::router`] with each
    /// connection's TCP peer address (`ConnectInfo<PeerAddr>`), which the login throttle
    /// counts by.
    pub fn service(
        self,
    ) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, PeerAddr> {
        self.router()
            .into_make_service_with_connect_info::<PeerAddr>()
    }

    /// The issuer name authenticator apps show for secrets enrolled at this kiosk
    /// (default `gatewayd`; the daemon passes `gatewayd <node id>`).
    #[must_use]
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.issuer = Arc::from(issuer);
        self
    }

    /// The routes, with security headers on every response.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/app.js", get(page_js))
            .route("/app.css", get(page_css))
            .route("/favicon.svg", get(page_icon))
            .route("/openapi.json", get(openapi_json))
            .route("/api/login", post(login))
            .route("/api/logout", post(logout))
            .route("/api/me", get(me))
            .route("/api/accounts", get(accounts))
            .route("/api/accounts/invite", post(enrol::invite))
            .route("/api/enrol", post(enrol::enrol))
            .route("/api/enrol/confirm", post(enrol::confirm))
            .route("/enrol.js", get(page_enrol_js))
            .route("/identity.js", get(page_identity_js))
            .route("/fhir/Slot", get(slots))
            .route("/fhir/Schedule", get(schedules))
            .route("/fhir/Appointment/$hold", post(hold))
            .route("/fhir/Appointment/$book", post(book))
            .route("/fhir/Appointment", get(appointments))
            .route("/fhir/Appointment/{id}/$cancel", post(cancel))
            .route("/fhir/ImagingStudy", get(results::imaging_studies))
            .route("/fhir/DiagnosticReport", get(results::diagnostic_reports))
            .route("/fhir/Patient/$match", post(identity::patient_match))
            .route("/fhir/Patient/$ihe-pix", get(identity::patient_pix))
            .route("/api/identity/review", get(identity::review_queue))
            .route("/api/identity/review/{id}", post(identity::review_decide))
            .route("/api/identity/link", post(identity::link))
            .route("/api/identity/unlink", post(identity::unlink))
            .route(
                "/fhir/Consent",
                get(identity::consents).post(identity::record_consent),
            )
            .route("/fhir/Consent/{id}/$revoke", post(identity::revoke_consent))
            .fallback(not_found)
            .layer(axum::middleware::map_response(security_headers))
            .with_state(self)
    }

    /// Appends one audit record on a blocking thread (the append takes the log's file lock,
    /// `fdatasync`s and replaces the head) and waits for it, so the answer still leaves only
    /// after its record is durable. A record that cannot be written is logged (without its
    /// content); [`Kiosk::record_about`] says whether it was written.
    async fn record(&self, actor: &str, action: Action, outcome: Outcome, detail: Option<&str>) {
        self.record_about(actor, action, outcome, None, detail)
            .await;
    }

    async fn record_about(
        &self,
        actor: &str,
        action: Action,
        outcome: Outcome,
        subject: Option<String>,
        detail: Option<&str>,
    ) -> bool {
        let event = Event {
            actor: actor.chars().take(64).collect(),
            action,
            outcome,
            subject,
            detail: detail.map(str::to_string),
        };
        let audit = Arc::clone(&self.audit);
        match tokio::task::spawn_blocking(move || audit.append(event)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "audit record could not be written");
                false
            }
            Err(e) => {
                warn!(error = %e, "audit record could not be written: its task failed");
                false
            }
        }
    }

    /// The staff accounts as the file has them now, read on a blocking thread.
    async fn accounts(&self, now_unix: u64) -> Result<Vec<AccountInfo>, StaffError> {
        let staff = Arc::clone(&self.staff);
        tokio::task::spawn_blocking(move || staff.accounts(now_unix))
            .await
            .unwrap_or_else(|e| {
                Err(StaffError::Io(gateway_durable::Error {
                    action: "read (task failed)",
                    path: "staff accounts".into(),
                    source: std::io::Error::other(e),
                }))
            })
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    response
}

/// A FHIR OperationOutcome with one issue.
fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    });
    fhir_json(status, body)
}

async fn not_found() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such resource or operation",
    )
}

/// Content Security Policy of the page: same-origin scripts, styles and requests only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// The kiosk page (Japanese and English labels, no build step).
async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../assets/index.html"),
    )
}

async fn page_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/app.js"),
    )
}

/// The enrolment page's and the invitation form's script.
async fn page_enrol_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/enrol.js"),
    )
}

/// The identity section's script (review queue, patient search, consents).
async fn page_identity_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/identity.js"),
    )
}

async fn page_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("../assets/app.css"))
}

/// The page's icon (linked from the page, so browsers ask for no `/favicon.ico`).
async fn page_icon() -> Response {
    asset("image/svg+xml", include_str!("../assets/favicon.svg"))
}

async fn openapi_json() -> Json<Value> {
    Json(openapi::document())
}

/// A request with a live session.
#[derive(Debug)]
struct Authenticated(Staffer);

impl FromRequestParts<Kiosk> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, kiosk: &Kiosk) -> Result<Self, Self::Rejection> {
        let refused = || outcome(StatusCode::UNAUTHORIZED, "login", "log in first");
        let Some((token, staffer)) = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::token_from_cookie)
            .and_then(|t| Some((t.to_owned(), kiosk.sessions.check(t, now_unix())?)))
        else {
            return Err(refused());
        };
        // An account disabled since its login (`staff-disable`, `gatewayd users disable`)
        // loses its session at its next request; so does one that cannot be read.
        let active = kiosk
            .accounts(now_unix())
            .await
            .is_ok_and(|all| all.iter().any(|a| a.name == staffer.name && !a.disabled));
        if !active {
            kiosk.sessions.end(&token);
            return Err(refused());
        }
        Ok(Authenticated(staffer))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    name: String,
    password: String,
    code: String,
}

/// True for `application/json` and `application/<something>+json` (parameters ignored).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(essence) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
    else {
        return false;
    };
    let essence = essence.trim().to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// A JSON request body. The body is read to its end (within axum's default limit) before it
/// is judged: answering a wrong content type without reading the body would close the
/// connection on unread bytes, a TCP reset that can make the client lose the answer.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Option<T> {
    let bytes = body.ok()?;
    if !is_json(headers) {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// The one answer to every refused login, whatever the reason (the audit trail has it).
pub const LOGIN_REFUSED: &str = "login refused: check the name, the password and the one-time code";

/// The TCP peer address of a kiosk connection, as `ConnectInfo` (see [`Kiosk::service`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tls::TlsListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tls::TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// The TCP peer of a request (`ConnectInfo`, set by the server). Without one, every such
/// request shares the unspecified address: throttling then fails closed, for all.
#[derive(Debug, Clone, Copy)]
struct Peer(IpAddr);

impl FromRequestParts<Kiosk> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &Kiosk) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<PeerAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.0.ip()),
        ))
    }
}

/// The audit reason code of a refused login.
fn refusal_code(e: &LoginError) -> &'static str {
    match e {
        LoginError::UnknownAccount => "unknown-account",
        LoginError::WrongPassword => "wrong-password",
        LoginError::BadSecondFactor => "bad-second-factor",
        LoginError::NoSecondFactor => "no-second-factor",
        LoginError::Locked { .. } => "locked",
        LoginError::Disabled => "disabled",
        LoginError::Storage(_) => "storage",
    }
}

fn throttled(retry_after_secs: u64) -> Response {
    let mut r = outcome(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        "too many failed logins from this device; wait and try again",
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

async fn login(
    State(kiosk): State<Kiosk>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(body) = json_body::<LoginBody>(&headers, body) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send JSON {\"name\", \"password\", \"code\"}",
        );
    };
    if let Err(retry_after) = kiosk.throttle.check(peer, now_unix()) {
        return throttled(retry_after);
    }
    let staff = Arc::clone(&kiosk.staff);
    let name = body.name.clone();
    let result = tokio::task::spawn_blocking(move || {
        staff.login(&body.name, &body.password, &body.code, now_unix())
    })
    .await
    .unwrap_or(Err(LoginError::Storage("login task failed".into())));
    match result {
        Ok(who) => {
            kiosk
                .record(&who.name, Action::Login, Outcome::Success, None)
                .await;
            let staffer = Staffer {
                name: who.name.clone(),
                role: who.role,
            };
            let Some(token) = kiosk.sessions.start(staffer, now_unix()) else {
                return outcome(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "no randomness for a session",
                );
            };
            let mut r = Json(json!({
                "name": who.name,
                "role": who.role.as_str(),
                "identity": kiosk.identity.is_some(),
            }))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&token)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(LoginError::Storage(detail)) => {
            warn!(error = %detail, "a login could not be checked or recorded");
            kiosk
                .record("kiosk", Action::Login, Outcome::Failure, Some("storage"))
                .await;
            outcome(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "login is unavailable; try again",
            )
        }
        Err(e) => {
            // Unknown names are recorded under a fixed actor: a typo may be a patient's name.
            let actor = match &e {
                LoginError::UnknownAccount => "unknown-account",
                _ => name.as_str(),
            };
            kiosk
                .record(
                    actor,
                    Action::Login,
                    Outcome::Failure,
                    Some(refusal_code(&e)),
                )
                .await;
            if let Some(until) = kiosk.throttle.failure(peer, now_unix()) {
                // One record per address and back-off; the address is a device's, not PHI.
                let detail = format!("address {peer} throttled until {until}");
                kiosk
                    .record("kiosk", Action::Login, Outcome::Failure, Some(&detail))
                    .await;
            }
            outcome(StatusCode::UNAUTHORIZED, "login", LOGIN_REFUSED)
        }
    }
}

async fn logout(State(kiosk): State<Kiosk>, who: Authenticated, headers: HeaderMap) -> Response {
    for token in headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(session::token_from_cookie)
    {
        kiosk.sessions.end(token);
    }
    kiosk
        .record(&who.0.name, Action::Logout, Outcome::Success, None)
        .await;
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// Who is logged in, and whether this gateway keeps an identity registry (the page shows its
/// identity section, and asks its routes, only then).
async fn me(State(kiosk): State<Kiosk>, who: Authenticated) -> Json<Value> {
    Json(json!({
        "name": who.0.name,
        "role": who.0.role.as_str(),
        "identity": kiosk.identity.is_some(),
    }))
}

async fn accounts(State(kiosk): State<Kiosk>, who: Authenticated) -> Response {
    if who.0.role != Role::Admin {
        return outcome(StatusCode::FORBIDDEN, "forbidden", "administrators only");
    }
    match kiosk.accounts(now_unix()).await {
        Ok(all) => Json(json!(all)).into_response(),
        Err(e) => {
            warn!(error = %e, "staff accounts cannot be read");
            outcome(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                "staff accounts cannot be read",
            )
        }
    }
}

#[derive(Debug, Deserialize)]
struct SlotParams {
    schedule: Option<String>,
    status: Option<String>,
    #[serde(default)]
    start: Vec<String>,
}

async fn slots(
    State(kiosk): State<Kiosk>,
    _who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(pairs)) = params else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "unreadable query string",
        );
    };
    let mut p = SlotParams {
        schedule: None,
        status: None,
        start: Vec::new(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "schedule" => p.schedule = Some(v),
            "status" => p.status = Some(v),
            "start" => p.start.push(v),
            _ => {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    "supported search parameters: schedule, status, start",
                );
            }
        }
    }
    if p.status.as_deref().is_some_and(|s| s != "free") {
        return outcome(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "only status=free is served",
        );
    }
    let mut query = SlotQuery {
        schedule: p.schedule,
        ..SlotQuery::default()
    };
    for s in &p.start {
        let bad = || {
            outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "start takes ge<instant> or lt<instant>",
            )
        };
        // By prefix, not by byte offset: a value may start with a multi-byte character.
        if let Some(value) = s.strip_prefix("ge") {
            if value.parse::<jiff::Timestamp>().is_err() {
                return bad();
            }
            query.start_ge = Some(value.to_string());
        } else if let Some(value) = s.strip_prefix("lt") {
            if value.parse::<jiff::Timestamp>().is_err() {
                return bad();
            }
            query.start_lt = Some(value.to_string());
        } else {
            return bad();
        }
    }
    let answer = kiosk.slots.free_slots(&query).await;
    let entries: Vec<Value> = answer
        .slots
        .iter()
        .map(|s| {
            json!({"resource": {
                "resourceType": "Slot",
                "id": s.id,
                "schedule": {"reference": format!("Schedule/{}", s.schedule)},
                "status": "free",
                "start": s.start,
                "end": s.end,
            }})
        })
        .collect();
    let mut meta = json!({"lastUpdated": unix_to_rfc3339(answer.as_of_unix)});
    if answer.stale
        && let Some(meta) = meta.as_object_mut()
    {
        meta.insert(
            "tag".into(),
            json!([{"system": "urn:gatewayd:kiosk", "code": "stale",
                "display": "the core hospital has not confirmed these recently"}]),
        );
    }
    let body = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "meta": meta,
        "entry": entries,
    });
    fhir_json(StatusCode::OK, body)
}

/// `GET /fhir/Schedule`: the scanners that can be booked, so the page offers every one
/// of them whatever day is shown (a day without free slots still lists them all).
async fn schedules(State(kiosk): State<Kiosk>, _who: Authenticated, uri: Uri) -> Response {
    if uri.query().is_some_and(|q| !q.is_empty()) {
        return outcome(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "no search parameters are supported",
        );
    }
    let ids = kiosk.slots.schedules().await;
    searchset(
        ids.into_iter()
            .map(|id| json!({"resourceType": "Schedule", "id": id, "active": true})),
    )
}

// The session is checked after the body is read (see `json_body`).
async fn hold(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    match who {
        Ok(who) => request_appointment(kiosk, who, body, true).await,
        Err(refused) => refused,
    }
}

async fn book(
    State(kiosk): State<Kiosk>,
    who: Result<Authenticated, Response>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = json_body::<Value>(&headers, body);
    match who {
        Ok(who) => request_appointment(kiosk, who, body, false).await,
        Err(refused) => refused,
    }
}

async fn request_appointment(
    kiosk: Kiosk,
    who: Authenticated,
    body: Option<Value>,
    hold: bool,
) -> Response {
    let Some(body) = body else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "send a FHIR Appointment as JSON",
        );
    };
    let req = match appointment::parse_request(&body, hold, &who.0.name) {
        Ok(r) => r,
        Err(problem) => {
            return outcome(StatusCode::BAD_REQUEST, "invalid", &problem.to_string());
        }
    };
    let subject = Some(kiosk.booking.patient_ref(&req.patient_id));
    let action = if hold {
        Action::AppointmentHeld
    } else {
        Action::AppointmentBooked
    };
    let acknowledging = !req.acknowledged.is_empty();
    if acknowledging && who.0.role != Role::Physician {
        kiosk
            .record_about(
                &who.0.name,
                action,
                Outcome::Failure,
                subject,
                Some("forbidden"),
            )
            .await;
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a physician may acknowledge safety warnings",
        );
    }
    let result = kiosk.booking.request(req).await;
    match result {
        Ok(a) => {
            // The acknowledgement is recorded once it let the booking proceed (a repeat
            // answered with its first outcome was not checked again: no report).
            let acknowledged = match &a.safety {
                Some(report) if acknowledging => report.warnings.len(),
                _ => 0,
            };
            if acknowledged > 0 {
                kiosk
                    .record_about(
                        &who.0.name,
                        Action::SafetyAcknowledged,
                        Outcome::Success,
                        subject.clone(),
                        Some(&format!("warnings={acknowledged}")),
                    )
                    .await;
            }
            kiosk
                .record_about(&who.0.name, action, Outcome::Success, subject, None)
                .await;
            let status = if a.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            one_appointment(status, &a)
        }
        Err(e) => {
            let (status, code) = refusal(&e);
            kiosk
                .record_about(&who.0.name, action, Outcome::Failure, subject, Some(code))
                .await;
            match &e {
                appointment::BookingRefused::NeedsAcknowledgement(report) => {
                    fhir_json(status, safety::needs_acknowledgement(report))
                }
                _ => outcome(status, code, &e.to_string()),
            }
        }
    }
}

/// A FHIR JSON answer (`application/fhir+json`).
pub(crate) fn fhir_json(status: StatusCode, body: Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    r
}

/// HTTP status and OperationOutcome code of a refusal.
fn refusal(e: &appointment::BookingRefused) -> (StatusCode, &'static str) {
    use appointment::BookingRefused as R;
    match e {
        R::Conflict => (StatusCode::CONFLICT, "conflict"),
        R::NotFound => (StatusCode::NOT_FOUND, "not-found"),
        R::Expired => (StatusCode::CONFLICT, "business-rule"),
        R::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
        R::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        R::VersionMismatch { .. } => (StatusCode::PRECONDITION_FAILED, "conflict"),
        R::NeedsAcknowledgement(_) => (StatusCode::CONFLICT, "business-rule"),
    }
}

/// One Appointment with its ETag.
fn one_appointment(status: StatusCode, a: &appointment::AppointmentView) -> Response {
    let mut r = (status, Json(appointment::resource(a))).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    if let Ok(v) = HeaderValue::from_str(&appointment::etag(a.version)) {
        h.insert(header::ETAG, v);
    }
    r
}

async fn cancel(
    State(kiosk): State<Kiosk>,
    who: Authenticated,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if !gateway_id::is_valid(&id) {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such appointment");
    }
    let Some(if_match) = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .and_then(appointment::parse_if_match)
    else {
        return outcome(
            StatusCode::PRECONDITION_REQUIRED,
            "required",
            "send If-Match with the appointment's ETag (W/\"versionId\")",
        );
    };
    let result = kiosk
        .booking
        .cancel(id.clone(), if_match, who.0.name.clone())
        .await;
    match result {
        Ok(a) => {
            let subject = Some(kiosk.booking.patient_ref(&a.patient_id));
            kiosk
                .record_about(
                    &who.0.name,
                    Action::AppointmentCancelled,
                    Outcome::Success,
                    subject,
                    None,
                )
                .await;
            one_appointment(StatusCode::OK, &a)
        }
        Err(e) => {
            let (status, code) = refusal(&e);
            kiosk
                .record_about(
                    &who.0.name,
                    Action::AppointmentCancelled,
                    Outcome::Failure,
                    Some(format!("appointment:{id}")),
                    Some(code),
                )
                .await;
            outcome(status, code, &e.to_string())
        }
    }
}

async fn appointments(
    State(kiosk): State<Kiosk>,
    who: Authenticated,
    params: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let patient = match params.as_ref().map(|Query(pairs)| pairs.as_slice()) {
        Ok([(key, value)]) if key == "patient" && !value.is_empty() => value.clone(),
        _ => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                "search Appointment by patient=<identifier> only",
            );
        }
    };
    kiosk
        .record_about(
            &who.0.name,
            Action::PatientRecordRead,
            Outcome::Success,
            Some(kiosk.booking.patient_ref(&patient)),
            None,
        )
        .await;
    let found = kiosk.booking.appointments_of(&patient).await;
    searchset(found.iter().map(appointment::resource))
}

/// A FHIR searchset Bundle of `resources`, as `application/fhir+json`.
fn searchset(resources: impl IntoIterator<Item = Value>) -> Response {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"resource": r}))
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

fn unix_to_rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

#[cfg(test)]
mod tests;
