// The tests play a browser: their TLS client is the peer's, not the gateway's, so they build
// their own rustls ClientConfig (the rule that only gateway-tls does is for the gateway).
#![allow(clippy::disallowed_methods)]

use super::*;
use axum::body::Body;
use axum::http::Request;
use base64::Engine as _;
use gateway_audit::AuditKey;
use gateway_staff::StaffKey;
use http_body_util::BodyExt as _;
use sha2::Digest as _;
use tower::ServiceExt as _;

const PW: &str = "correct horse battery";
/// The peer `10.0.0.<n>` requests come from unless a test names another.
const DEFAULT_PEER: u8 = 1;

fn peer(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 40_000))
}

/// The `detail` of each audit record.
fn details(audit: &AuditLog) -> Vec<String> {
    audit
        .records()
        .unwrap()
        .iter()
        .filter_map(|r| {
            serde_json::to_value(r).unwrap()["detail"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[derive(Debug)]
struct FixedSlots(bool);

impl SlotSource for FixedSlots {
    fn free_slots(&self, q: &SlotQuery) -> gateway_booking::BoxFuture<'static, SlotAnswer> {
        let all = [
            ("ct-1.20270112T1000", "ct-1"),
            ("mr-1.20270112T1000", "mr-1"),
        ];
        let answer = SlotAnswer {
            slots: all
                .iter()
                .filter(|(_, s)| q.schedule.as_deref().is_none_or(|w| w == *s))
                .map(|(id, s)| SlotView {
                    id: (*id).into(),
                    schedule: (*s).into(),
                    start: "2027-01-12T10:00:00+09:00".into(),
                    end: "2027-01-12T10:30:00+09:00".into(),
                })
                .collect(),
            as_of_unix: 1_800_000_000,
            stale: self.0,
        };
        Box::pin(std::future::ready(answer))
    }

    fn schedules(&self) -> gateway_booking::BoxFuture<'static, Vec<String>> {
        Box::pin(std::future::ready(vec!["ct-1".into(), "mr-1".into()]))
    }
}

/// The clinic's booking path with the core stubbed in memory (the real one goes through the
/// exchange; see gateway-booking's ledger for the core's rules).
#[derive(Debug, Default)]
struct FakeCore {
    down: std::sync::atomic::AtomicBool,
    /// The core's safety report for every new request, when set: unacknowledged warnings
    /// refuse it (like the core's gate), else it is booked with the report.
    safety: std::sync::Mutex<Option<gateway_booking::SafetyReport>>,
    by_request: std::sync::Mutex<std::collections::HashMap<String, appointment::AppointmentView>>,
}

impl appointment::BookingBackend for FakeCore {
    fn request(
        &self,
        req: appointment::AppointmentRequest,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<appointment::AppointmentView, appointment::BookingRefused>,
    > {
        use appointment::BookingRefused as R;
        let answer = (|| {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(R::Unavailable);
            }
            let mut map = self.by_request.lock().unwrap();
            if let Some(a) = map.get(&req.request_id) {
                return Ok(appointment::AppointmentView {
                    created: false,
                    ..a.clone()
                });
            }
            if !req.slot_id.starts_with("ct-1.") {
                return Err(R::NotFound);
            }
            if map.values().any(|a| a.slot_id == req.slot_id) {
                return Err(R::Conflict);
            }
            let safety = self.safety.lock().unwrap().clone();
            if let Some(report) = &safety
                && report.unacknowledged(&req.acknowledged).next().is_some()
            {
                return Err(R::NeedsAcknowledgement(Box::new(report.clone())));
            }
            let a = appointment::AppointmentView {
                safety: safety.clone(),
                id: format!("apt-{}", map.len() + 1),
                request_id: req.request_id.clone(),
                slot_id: req.slot_id.clone(),
                status: if req.hold { "pending" } else { "booked" }.into(),
                start: "2027-01-12T10:00:00+09:00".into(),
                end: "2027-01-12T10:30:00+09:00".into(),
                accession: Some("RB20270112000001".into()),
                patient_id: req.patient_id.clone(),
                procedure: req.procedure.clone(),
                created: true,
                version: 1,
            };
            map.insert(req.request_id.clone(), a.clone());
            Ok(a)
        })();
        Box::pin(async move { answer })
    }

    fn cancel(
        &self,
        id: String,
        if_match: u64,
        _staff: String,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<appointment::AppointmentView, appointment::BookingRefused>,
    > {
        use appointment::BookingRefused as R;
        let answer = (|| {
            let mut map = self.by_request.lock().unwrap();
            let a = map.values_mut().find(|a| a.id == id).ok_or(R::NotFound)?;
            if a.status == "cancelled" {
                return Ok(a.clone());
            }
            if a.version != if_match {
                return Err(R::VersionMismatch { current: a.version });
            }
            a.status = "cancelled".into();
            a.version += 1;
            Ok(a.clone())
        })();
        Box::pin(async move { answer })
    }

    fn appointments_of(
        &self,
        patient_id: &str,
    ) -> gateway_booking::BoxFuture<'static, Vec<appointment::AppointmentView>> {
        let found = self
            .by_request
            .lock()
            .unwrap()
            .values()
            .filter(|a| a.patient_id == patient_id)
            .cloned()
            .collect();
        Box::pin(std::future::ready(found))
    }

    fn patient_ref(&self, patient_id: &str) -> String {
        format!(
            "patient:{}",
            hex::encode(&sha2::Sha256::digest(patient_id.as_bytes())[..8])
        )
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    staff: Arc<Staff>,
    core: Arc<FakeCore>,
    audit: Arc<AuditLog>,
    secrets: Vec<(String, String)>,
}

fn fixture(stale: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let staff = Staff::open(&dir.path().join("staff"), StaffKey::derive(&[3; 32])).unwrap();
    let mut secrets = Vec::new();
    for (name, role) in [("clerk.sato", Role::Clerk), ("admin.ito", Role::Admin)] {
        staff.add(name, role, PW).unwrap();
        let e = staff.enroll_totp(name, "test").unwrap();
        secrets.push((name.to_string(), e.secret_base32.to_string()));
    }
    staff.add("no.totp", Role::Clerk, PW).unwrap();
    let audit =
        Arc::new(AuditLog::open(&dir.path().join("audit"), AuditKey::derive(&[3; 32])).unwrap());
    let core = Arc::new(FakeCore::default());
    let staff = Arc::new(staff);
    let app = Kiosk::new(
        Arc::clone(&staff),
        Arc::clone(&audit),
        Arc::new(FixedSlots(stale)),
        Arc::clone(&core) as Arc<dyn appointment::BookingBackend>,
    )
    .router();
    Fixture {
        _dir: dir,
        app,
        staff,
        core,
        audit,
        secrets,
    }
}

impl Fixture {
    fn code(&self, name: &str) -> String {
        let secret = &self.secrets.iter().find(|(n, _)| n == name).unwrap().1;
        gateway_staff::code_at(secret, now_unix()).unwrap()
    }

    /// Sends `req` as a TCP peer at [`DEFAULT_PEER`] unless it names its own peer.
    async fn send_raw(&self, mut req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
        if req.extensions().get::<ConnectInfo<PeerAddr>>().is_none() {
            req.extensions_mut()
                .insert(ConnectInfo(PeerAddr(peer(DEFAULT_PEER))));
        }
        let r = self.app.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, headers, bytes)
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let (status, headers, bytes) = self.send_raw(req).await;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// A login from the TCP peer `10.0.0.<from>`, answered as raw bytes.
    async fn login_raw(
        &self,
        from: u8,
        name: &str,
        password: &str,
        code: &str,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let body = json!({"name": name, "password": password, "code": code}).to_string();
        let mut req = Request::post("/api/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(PeerAddr(peer(from))));
        self.send_raw(req).await
    }

    async fn login_from(
        &self,
        from: u8,
        name: &str,
        password: &str,
        code: &str,
    ) -> (StatusCode, HeaderMap, Value) {
        let (status, headers, bytes) = self.login_raw(from, name, password, code).await;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn login(
        &self,
        name: &str,
        password: &str,
        code: &str,
    ) -> (StatusCode, HeaderMap, Value) {
        self.login_from(DEFAULT_PEER, name, password, code).await
    }

    /// `count` wrong passwords for `name` from `10.0.0.<first>` on, one address fewer than
    /// the throttle's limit each (so none is throttled); returns the next unused address.
    async fn fail_spread(&self, name: &str, first: u8, count: u32) -> u8 {
        let mut from = first;
        let mut left = count;
        while left > 0 {
            for _ in 0..(throttle::FAILURES - 1).min(left) {
                let (s, _, _) = self
                    .login_from(from, name, "not the password", "000000")
                    .await;
                assert_eq!(s, StatusCode::UNAUTHORIZED);
                left -= 1;
            }
            from += 1;
        }
        from
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::get(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    async fn session(&self, name: &str) -> String {
        let (status, headers, _) = self.login(name, PW, &self.code(name)).await;
        assert_eq!(status, StatusCode::OK);
        let cookie = headers[header::SET_COOKIE].to_str().unwrap();
        cookie.split(';').next().unwrap().to_string()
    }
}

fn issue_code(body: &Value) -> &str {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["code"].as_str().unwrap()
}

#[tokio::test]
async fn both_factors_give_a_secure_session_cookie() {
    let f = fixture(false);
    let (status, headers, body) = f.login("clerk.sato", PW, &f.code("clerk.sato")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"name": "clerk.sato", "role": "clerk", "identity": false})
    );
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    for attr in ["gw_session=", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let session = cookie.split(';').next().unwrap();
    let (status, _, me) = f.get("/api/me", Some(session)).await;
    assert_eq!(
        (status, me),
        (
            StatusCode::OK,
            json!({"name": "clerk.sato", "role": "clerk", "identity": false})
        )
    );
}

#[tokio::test]
async fn missing_wrong_and_reused_codes_are_refused_and_audited_by_reason() {
    let f = fixture(false);
    let code = f.code("clerk.sato");
    let (s, _, b) = f.login_from(2, "clerk.sato", PW, "").await;
    assert_eq!((s, issue_code(&b)), (StatusCode::UNAUTHORIZED, "login"));
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (s, _, b) = f.login_from(2, "clerk.sato", PW, wrong).await;
    assert_eq!((s, issue_code(&b)), (StatusCode::UNAUTHORIZED, "login"));
    let (s, _, b) = f.login_from(2, "no.totp", PW, &code).await;
    assert_eq!((s, issue_code(&b)), (StatusCode::UNAUTHORIZED, "login"));
    let (s, _, _) = f.login_from(3, "clerk.sato", PW, &code).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.login_from(3, "clerk.sato", PW, &code).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a code works once");
    // Unknown names are audited under a fixed actor, never as typed.
    f.login_from(3, "ZZTEST TARO", PW, &code).await;
    let records = f.audit.records().unwrap();
    assert!(records.iter().all(|r| r.action() == Action::Login));
    assert_eq!(
        records
            .iter()
            .filter(|r| r.outcome() == Outcome::Success)
            .count(),
        1
    );
    assert!(records.iter().any(|r| r.actor() == "unknown-account"));
    assert!(!records.iter().any(|r| r.actor().contains("ZZTEST")));
    assert_eq!(records.len(), 6);
    let details = details(&f.audit);
    assert_eq!(
        details,
        [
            "bad-second-factor",
            "bad-second-factor",
            "no-second-factor",
            "bad-second-factor",
            "unknown-account"
        ]
    );
}

#[tokio::test]
async fn unknown_wrong_password_wrong_code_locked_and_disabled_answer_the_same_bytes() {
    let f = fixture(false);
    f.staff.add("gone.abe", Role::Clerk, PW).unwrap();
    f.staff.enroll_totp("gone.abe", "test").unwrap();
    f.staff.disable("gone.abe").unwrap();
    // Lock admin.ito from many addresses, none of which reaches its own throttle.
    f.fail_spread("admin.ito", 100, gateway_staff::MAX_FAILURES)
        .await;
    let clerk_code = f.code("clerk.sato");
    let wrong = if clerk_code == "000000" {
        "111111"
    } else {
        "000000"
    };
    let answers = [
        f.login_raw(10, "nobody.here", PW, &clerk_code).await,
        f.login_raw(11, "clerk.sato", "not the password", &clerk_code)
            .await,
        f.login_raw(12, "clerk.sato", PW, wrong).await,
        f.login_raw(13, "clerk.sato", PW, "").await,
        f.login_raw(14, "admin.ito", PW, &f.code("admin.ito")).await,
        f.login_raw(15, "gone.abe", PW, "123456").await,
        f.login_raw(16, "no.totp", PW, "123456").await,
    ];
    let (status, headers, body) = &answers[0];
    assert_eq!(*status, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(body).contains(LOGIN_REFUSED));
    for (i, (s, h, b)) in answers.iter().enumerate() {
        assert_eq!((s, h, b), (status, headers, body), "answer {i} differs");
    }
    let details = details(&f.audit);
    let tail = &details[details.len() - answers.len()..];
    assert_eq!(
        tail,
        [
            "unknown-account",
            "wrong-password",
            "bad-second-factor",
            "bad-second-factor",
            "locked",
            "disabled",
            "no-second-factor"
        ]
    );
}

#[tokio::test]
async fn one_address_is_throttled_before_any_account_locks() {
    let f = fixture(false);
    let (a, b, c) = (20, 21, 22);
    for i in 0..throttle::FAILURES {
        let (s, h, _) = f
            .login_from(a, "clerk.sato", "not the password", "000000")
            .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "failure {i} is refused, not throttled"
        );
        assert!(h.get(header::RETRY_AFTER).is_none());
    }
    // Now even the right credentials from A are throttled, and no account is touched.
    for _ in 0..3 {
        let (s, h, body) = f
            .login_from(a, "clerk.sato", PW, &f.code("clerk.sato"))
            .await;
        assert_eq!(
            (s, issue_code(&body)),
            (StatusCode::TOO_MANY_REQUESTS, "throttled")
        );
        let retry: u64 = h[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=throttle::BACKOFF_SECS).contains(&retry), "{retry}");
    }
    let (s, _, _) = f
        .login_from(b, "clerk.sato", PW, &f.code("clerk.sato"))
        .await;
    assert_eq!(s, StatusCode::OK, "another address still logs in");
    let admin = f.login_from(c, "admin.ito", PW, &f.code("admin.ito")).await;
    assert_eq!(admin.0, StatusCode::OK);
    let cookie = admin.1[header::SET_COOKIE].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap();
    let (s, _, list) = f.get("/api/accounts", Some(cookie)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|a| a["locked"] == false),
        "{list}"
    );
    // One audit record for the back-off, however many attempts it refused.
    let throttled: Vec<String> = details(&f.audit)
        .into_iter()
        .filter(|d| d.contains("throttled"))
        .collect();
    assert_eq!(throttled.len(), 1, "{throttled:?}");
    assert!(throttled[0].contains("10.0.0.20"), "{throttled:?}");
}

#[tokio::test]
async fn the_account_locks_only_past_its_own_threshold_and_admins_see_until_when() {
    let f = fixture(false);
    let admin = f.session("admin.ito").await;
    let locked_of = |list: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "clerk.sato")
            .unwrap()
            .clone()
    };
    let from = f
        .fail_spread("clerk.sato", 30, gateway_staff::MAX_FAILURES - 1)
        .await;
    let (_, _, list) = f.get("/api/accounts", Some(&admin)).await;
    assert_eq!(locked_of(&list)["locked"], false, "one failure short");
    let (s, _, _) = f
        .login_from(from, "clerk.sato", "not the password", "000000")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let from = from + 1;
    let (_, _, list) = f.get("/api/accounts", Some(&admin)).await;
    let clerk = locked_of(&list);
    assert_eq!(clerk["locked"], true, "{clerk}");
    let until = clerk["locked_until_unix"].as_u64().unwrap();
    assert!(until > now_unix() && until <= now_unix() + gateway_staff::LOCKOUT_SECS);
    let (s, _, _) = f
        .login_from(from, "clerk.sato", PW, &f.code("clerk.sato"))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "locked, whoever asks");
}

#[tokio::test]
async fn no_session_is_401_and_a_clerk_is_403_on_admin_routes() {
    let f = fixture(false);
    for path in ["/api/me", "/api/accounts", "/fhir/Slot"] {
        let (s, _, b) = f.get(path, None).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::UNAUTHORIZED, "login"),
            "{path}"
        );
        let forged = format!("gw_session={}", "ab".repeat(32));
        let (s, _, _) = f.get(path, Some(&forged)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} with a made-up token");
    }
    let clerk = f.session("clerk.sato").await;
    let (s, _, b) = f.get("/api/accounts", Some(&clerk)).await;
    assert_eq!((s, issue_code(&b)), (StatusCode::FORBIDDEN, "forbidden"));
    let admin = f.session("admin.ito").await;
    let (s, _, b) = f.get("/api/accounts", Some(&admin)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.as_array().unwrap().len(), 3);
    assert!(!b.to_string().contains("argon2"), "no secrets listed");
    // Logout ends the session.
    let r = f
        .send(
            Request::post("/api/logout")
                .header(header::COOKIE, &clerk)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.0, StatusCode::NO_CONTENT);
    assert_eq!(
        f.get("/api/me", Some(&clerk)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn schedules_are_listed_for_staff_only_whatever_slots_are_free() {
    let f = fixture(false);
    assert_eq!(
        f.get("/fhir/Schedule", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let s = f.session("clerk.sato").await;
    let (status, headers, b) = f.get("/fhir/Schedule", Some(&s)).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(
        (b["type"].as_str(), b["total"].as_u64()),
        (Some("searchset"), Some(2))
    );
    let ids: Vec<_> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["resource"]["resourceType"], "Schedule");
            e["resource"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids, ["ct-1", "mr-1"]);
    let (status, _, b) = f.get("/fhir/Schedule?active=true", Some(&s)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
    issue_code(&b);
}

#[tokio::test]
async fn slots_are_a_fhir_bundle_marked_stale_when_the_core_is_silent() {
    let f = fixture(true);
    let s = f.session("clerk.sato").await;
    let (status, headers, b) = f
        .get("/fhir/Slot?schedule=ct-1&status=free&start=ge2027-01-12T00:00:00%2B09:00&start=lt2027-01-13T00:00:00Z", Some(&s))
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(
        (
            b["resourceType"].as_str(),
            b["type"].as_str(),
            b["total"].as_u64()
        ),
        (Some("Bundle"), Some("searchset"), Some(1))
    );
    assert_eq!(b["entry"][0]["resource"]["id"], "ct-1.20270112T1000");
    assert_eq!(
        b["entry"][0]["resource"]["schedule"]["reference"],
        "Schedule/ct-1"
    );
    assert_eq!(b["meta"]["tag"][0]["code"], "stale");
    assert_eq!(b["meta"]["lastUpdated"], "2027-01-15T08:00:00Z");
    for bad in [
        "/fhir/Slot?status=busy",
        "/fhir/Slot?start=2027-01-12",
        "/fhir/Slot?start=geyesterday",
        "/fhir/Slot?patient=1",
        // Multi-byte characters where the ge/lt prefix belongs (a panic before the fix).
        "/fhir/Slot?start=g%C3%A92027-01-12T00:00:00Z",
        "/fhir/Slot?start=%E6%97%A52027-01-12T00:00:00Z",
        "/fhir/Slot?start=%C3%A9",
        "/fhir/Slot?start=g",
        "/fhir/Slot?start=",
    ] {
        let (s2, _, b) = f.get(bad, Some(&s)).await;
        assert_eq!(s2, StatusCode::BAD_REQUEST, "{bad}: {b}");
        issue_code(&b);
    }
    let fresh = fixture(false);
    let s = fresh.session("clerk.sato").await;
    let (_, _, b) = fresh.get("/fhir/Slot", Some(&s)).await;
    assert_eq!(b["total"], 2);
    assert!(b["meta"].get("tag").is_none());
}

#[tokio::test]
async fn bad_bodies_unknown_routes_and_the_openapi_document() {
    let f = fixture(false);
    for body in [
        "",
        "{",
        "[]",
        "{\"name\":1}",
        "{\"name\":\"a\",\"password\":\"b\",\"code\":\"c\",\"x\":1}",
    ] {
        let r = f
            .send(
                Request::post("/api/login")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST, "{body}");
        issue_code(&r.2);
    }
    let (s, _, b) = f.get("/nowhere", None).await;
    assert_eq!((s, issue_code(&b)), (StatusCode::NOT_FOUND, "not-found"));
    let (s, _, doc) = f.get("/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/login",
        "/api/logout",
        "/api/me",
        "/api/accounts",
        "/fhir/Slot",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    // Every reference resolves, so generators (schemathesis) can use the whole document.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(r);
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{r} resolves"
        );
    }
    // The booking request is described down to what `parse_request` reads.
    let schemas = &doc["components"]["schemas"];
    let req = &schemas["AppointmentRequest"]["properties"];
    assert_eq!(
        req["identifier"]["items"]["properties"]["value"]["pattern"],
        "^[A-Za-z0-9._-]{1,64}$"
    );
    assert_eq!(
        req["slot"]["items"]["properties"]["reference"]["pattern"],
        "^Slot/[A-Za-z0-9._-]{1,64}$"
    );
    assert_eq!(
        schemas["ContainedPatient"]["required"],
        json!(["resourceType", "id", "identifier", "name", "birthDate"])
    );
    let book = &doc["paths"]["/fhir/Appointment/$book"]["post"]["responses"];
    for status in ["200", "201", "400", "401", "404", "409", "503"] {
        assert!(book.get(status).is_some(), "$book {status} documented");
    }
}

#[tokio::test]
async fn served_over_tls_with_the_development_certificate_only() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let f = fixture(false);
    let (cert, key) =
        tls::development_certificate(&f._dir.path().join("kiosk"), &["localhost".into()]).unwrap();
    // Made once, then reused.
    let again =
        tls::development_certificate(&f._dir.path().join("kiosk"), &["localhost".into()]).unwrap();
    assert_eq!(again.0, cert);
    let config = tls::server_config(&cert, &key).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listener = tls::TlsListener::new(tcp, config).unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let server = tokio::spawn(axum::serve(listener, f.app.clone()).into_future());

    // Plain HTTP gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut buf),
    )
    .await;
    assert!(
        !buf.starts_with(b"HTTP/1.1"),
        "plaintext must not be served"
    );

    // A client trusting the development certificate gets the document.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"openapi\":\"3.1.0\""));
    server.abort();
}

fn appointment_body(request_id: &str, slot: &str) -> Value {
    json!({
        "resourceType": "Appointment",
        "identifier": [{"system": "urn:gatewayd:request", "value": request_id}],
        "slot": [{"reference": format!("Slot/{slot}")}],
        "serviceType": [{"text": "CT chest"}],
        "contained": [{
            "resourceType": "Patient", "id": "patient",
            "identifier": [{"value": "ZZPID0001"}],
            "name": [{"text": "ZZTEST^TARO=山田^太郎=やまだ^たろう"}],
            "birthDate": "1970-01-01", "gender": "male"
        }],
        "participant": [{"actor": {"reference": "#patient"}, "status": "needs-action"}]
    })
}

impl Fixture {
    async fn post(&self, path: &str, cookie: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
        self.send(
            Request::post(path)
                .header(header::COOKIE, cookie)
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }
}

#[tokio::test]
async fn booking_is_idempotent_conflicts_are_outcomes_and_an_unreachable_core_books_nothing() {
    let f = fixture(false);
    let s = f.session("clerk.sato").await;
    let body = appointment_body("req-0001", "ct-1.20270112T1000");
    let (status, _, a) = f.post("/fhir/Appointment/$book", &s, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert_eq!(
        (a["resourceType"].as_str(), a["status"].as_str()),
        (Some("Appointment"), Some("booked"))
    );
    assert_eq!(a["identifier"][1]["value"], "RB20270112000001");
    assert!(
        !a.to_string().contains("ZZTEST"),
        "the response names the patient by identifier only"
    );
    let (status, _, again) = f.post("/fhir/Appointment/$book", &s, &body).await;
    assert_eq!(
        (status, &again["id"]),
        (StatusCode::OK, &a["id"]),
        "a retry books nothing twice"
    );
    let (status, _, o) = f
        .post(
            "/fhir/Appointment/$book",
            &s,
            &appointment_body("req-0002", "ct-1.20270112T1000"),
        )
        .await;
    assert_eq!((status, issue_code(&o)), (StatusCode::CONFLICT, "conflict"));
    let (status, _, h) = f
        .post(
            "/fhir/Appointment/$hold",
            &s,
            &appointment_body("req-0003", "ct-1.20270112T1030"),
        )
        .await;
    assert_eq!(
        (status, h["status"].as_str()),
        (StatusCode::CREATED, Some("pending"))
    );
    let (status, _, o) = f
        .post(
            "/fhir/Appointment/$book",
            &s,
            &appointment_body("req-0004", "mr-9.20270112T1000"),
        )
        .await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::NOT_FOUND, "not-found")
    );
    f.core.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, _, o) = f
        .post(
            "/fhir/Appointment/$book",
            &s,
            &appointment_body("req-0005", "ct-1.20270112T1100"),
        )
        .await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::SERVICE_UNAVAILABLE, "transient")
    );
    assert!(
        o["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("nothing was changed")
    );
    // The patient's appointments; the read is audited without the patient's id.
    let (status, _, b) = f.get("/fhir/Appointment?patient=ZZPID0001", Some(&s)).await;
    assert_eq!(
        (status, b["total"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{b}"
    );
    let records = f.audit.records().unwrap();
    let reads: Vec<_> = records
        .iter()
        .filter(|r| r.action() == Action::PatientRecordRead)
        .collect();
    assert_eq!(reads.len(), 1);
    assert!(reads[0].subject().unwrap().starts_with("patient:"));
    let booked = records
        .iter()
        .filter(|r| r.action() == Action::AppointmentBooked)
        .count();
    assert_eq!(booked, 5, "every booking attempt, refused or not");
    let trail = std::fs::read_to_string(f._dir.path().join("audit/audit.jsonl")).unwrap();
    assert!(!trail.contains("ZZPID") && !trail.contains("ZZTEST"));
}

#[tokio::test]
async fn malformed_appointment_requests_name_the_element_and_need_a_session() {
    let f = fixture(false);
    let s = f.session("clerk.sato").await;
    let good = appointment_body("req-1", "ct-1.20270112T1000");
    type Change = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "resourceType",
            Box::new(|v: &mut Value| v["resourceType"] = "Patient".into()),
        ),
        (
            "identifier",
            Box::new(|v: &mut Value| v["identifier"][0]["value"] = "bad id!".into()),
        ),
        (
            "slot",
            Box::new(|v: &mut Value| v["slot"][0]["reference"] = "ct-1.20270112T1000".into()),
        ),
        (
            "contained",
            Box::new(|v: &mut Value| v["contained"] = json!([])),
        ),
        (
            "birthDate",
            Box::new(|v: &mut Value| v["contained"][0]["birthDate"] = "01/01/1970".into()),
        ),
        (
            "gender",
            Box::new(|v: &mut Value| v["contained"][0]["gender"] = "x".into()),
        ),
        (
            "name",
            Box::new(|v: &mut Value| v["contained"][0]["name"][0]["text"] = "A\\B".into()),
        ),
        (
            "serviceType",
            Box::new(|v: &mut Value| v["serviceType"] = json!([])),
        ),
    ];
    for (element, change) in cases {
        let mut body = good.clone();
        change(&mut body);
        let (status, _, o) = f.post("/fhir/Appointment/$book", &s, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{element}");
        let text = o["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.contains(element), "{element}: {text}");
    }
    let (status, _, _) = f
        .post("/fhir/Appointment/$book", "gw_session=none", &good)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for q in [
        "/fhir/Appointment",
        "/fhir/Appointment?patient=",
        "/fhir/Appointment?name=x",
    ] {
        assert_eq!(f.get(q, Some(&s)).await.0, StatusCode::BAD_REQUEST, "{q}");
    }
    assert!(
        f.core.by_request.lock().unwrap().is_empty(),
        "nothing reached the core"
    );
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let f = fixture(false);
    for (path, ty, needle) in [
        ("/", "text/html", "id=\"login-form\""),
        ("/app.js", "text/javascript", "/fhir/Appointment/$book"),
        ("/app.css", "text/css", "#slot-list"),
        ("/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = f
            .app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers().clone();
        assert!(
            h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty),
            "{path}"
        );
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        let text =
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(text.contains(needle), "{path}");
    }
    // Labels in both languages; no inline script for the policy to forbid.
    let r = f
        .app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let html =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(html.contains("ログイン") && html.contains("Log in") && html.contains("予約"));
    assert!(!html.contains("<script>") && !html.contains("onclick="));
}

#[tokio::test]
async fn cancel_needs_the_current_etag_and_is_idempotent() {
    let f = fixture(false);
    let s = f.session("clerk.sato").await;
    let body = appointment_body("req-c1", "ct-1.20270112T1000");
    let (status, headers, a) = f.post("/fhir/Appointment/$book", &s, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert_eq!(headers[header::ETAG], "W/\"1\"");
    assert_eq!(a["meta"]["versionId"], "1");
    let id = a["id"].as_str().unwrap().to_string();
    let cancel = |if_match: Option<&'static str>, who: String| {
        let mut req =
            Request::post(format!("/fhir/Appointment/{id}/$cancel")).header(header::COOKIE, who);
        if let Some(m) = if_match {
            req = req.header(header::IF_MATCH, m);
        }
        req.body(Body::empty()).unwrap()
    };
    let (status, _, o) = f.send(cancel(None, s.clone())).await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::PRECONDITION_REQUIRED, "required")
    );
    let (status, _, o) = f.send(cancel(Some("W/\"7\""), s.clone())).await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::PRECONDITION_FAILED, "conflict")
    );
    let (status, headers, c) = f.send(cancel(Some("W/\"1\""), s.clone())).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(
        (c["status"].as_str(), c["meta"]["versionId"].as_str()),
        (Some("cancelled"), Some("2"))
    );
    assert_eq!(headers[header::ETAG], "W/\"2\"");
    // Again with the old ETag: already cancelled, the same answer.
    let (status, _, again) = f.send(cancel(Some("W/\"1\""), s.clone())).await;
    assert_eq!(
        (status, again["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let (status, _, _) = f
        .send(cancel(Some("W/\"2\""), "gw_session=none".into()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, o) = f
        .send(
            Request::post("/fhir/Appointment/apt-404/$cancel")
                .header(header::COOKIE, &s)
                .header(header::IF_MATCH, "W/\"1\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::NOT_FOUND, "not-found")
    );
    assert_eq!(appointment::parse_if_match("\"3\""), Some(3));
    assert_eq!(appointment::parse_if_match("W/3"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_is_read_before_the_answer_so_the_client_gets_it() {
    // Answering without reading the body closed the connection on unread bytes: a TCP
    // reset, and the client often never saw the 400 (found by schemathesis's content-type
    // probes against the running daemon).
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let f = fixture(false);
    let s = f.session("clerk.sato").await;
    let (cert, key) =
        tls::development_certificate(&f._dir.path().join("kiosk"), &["localhost".into()]).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listener = tls::TlsListener::new(tcp, tls::server_config(&cert, &key).unwrap()).unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let server = tokio::spawn(axum::serve(listener, f.app.clone()).into_future());
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    for (path, content_type, cookie, want) in [
        (
            "/fhir/Appointment/$book",
            "text/plain",
            s.as_str(),
            "HTTP/1.1 400",
        ),
        (
            "/fhir/Appointment/$hold",
            "application/xml",
            s.as_str(),
            "HTTP/1.1 400",
        ),
        (
            "/fhir/Appointment/$hold",
            "application/fhir+json",
            "",
            "HTTP/1.1 401",
        ),
        ("/api/login", "text/plain", "", "HTTP/1.1 400"),
    ] {
        let body = vec![b'x'; 64 * 1024];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = connector.connect(name, tcp).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nCookie: {cookie}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // The body arrives in pieces, as over a real network: the answer must wait for it.
        let mut sent = Ok(());
        for piece in body.chunks(4096) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            sent = conn.write_all(piece).await;
            if sent.is_err() {
                break;
            }
        }
        let mut response = Vec::new();
        let read = conn.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response);
        assert!(
            sent.is_ok() && read.is_ok() && text.starts_with(want),
            "{path} {content_type}: sent {sent:?}, read {read:?}: {text}"
        );
    }
    // A JSON media type with parameters is JSON.
    let (status, _, b) = f
        .send(
            Request::post("/fhir/Appointment/$book")
                .header(header::COOKIE, &s)
                .header(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")
                .body(Body::from(
                    appointment_body("req-ct-1", "nowhere").to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_ne!(status, StatusCode::BAD_REQUEST, "{b}");
    server.abort();
}

/// An audit append waiting for the log's file lock (another process holds it) waits on a
/// blocking thread: on a one-thread runtime another request is still answered at once, and
/// the audited answer leaves only after its record is written.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_audit_append_does_not_stall_other_requests_and_precedes_its_answer() {
    let f = fixture(false);
    let session = f.session("clerk.sato").await;
    let audit_dir = f._dir.path().join("audit");
    let before = f.audit.records().unwrap().len();
    let held = gateway_durable::LockedFile::lock(
        &audit_dir.join("head"),
        &audit_dir.join("audit.lock"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let hold_for = std::time::Duration::from_millis(1500);
    let release = std::thread::spawn(move || {
        std::thread::sleep(hold_for);
        drop(held);
    });
    let started = std::time::Instant::now();
    let logout = {
        let app = f.app.clone();
        let cookie = session.clone();
        tokio::spawn(async move {
            let r = app
                .oneshot(
                    Request::post("/api/logout")
                        .header(header::COOKIE, cookie)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            (r.status(), started.elapsed())
        })
    };
    // Let the logout reach its audit append.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, _, me) = f.get("/api/me", Some(&session)).await;
    let me_took = started.elapsed();
    assert!(
        me_took < std::time::Duration::from_millis(1000),
        "another request waited {me_took:?} for a blocked audit append"
    );
    // The logout already ended the session or not: either way it was answered at once.
    assert!(
        status == StatusCode::OK || status == StatusCode::UNAUTHORIZED,
        "{status} {me}"
    );
    let (status, logout_took) = logout.await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        logout_took >= hold_for,
        "the logout answered after {logout_took:?}, before its audit record could be written"
    );
    release.join().unwrap();
    let records = f.audit.records().unwrap();
    assert_eq!(records.len(), before + 1);
    assert_eq!(records.last().unwrap().action(), Action::Logout);
}

/// Accepted kiosk connections have Nagle off: with it, a small write that followed one the
/// client had not acknowledged yet waited for its delayed ACK (up to 40 ms): login answers
/// took 18 ms or 44 ms at random, whatever their outcome.
#[tokio::test]
async fn accepted_connections_send_without_nagle_delay() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tls::development_certificate(dir.path(), &["localhost".into()]).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut listener =
        tls::TlsListener::new(tcp, tls::server_config(&cert, &key).unwrap()).unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    });
    let (stream, _) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        axum::serve::Listener::accept(&mut listener),
    )
    .await
    .unwrap();
    assert!(stream.get_ref().0.nodelay().unwrap(), "TCP_NODELAY is off");
    drop(client.await.unwrap());
}

// --- enrolment of invited accounts ------------------------------------------------------

impl Fixture {
    async fn post_json(
        &self,
        path: &str,
        body: Value,
        cookie: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        let (status, _, body) = self
            .send(req.body(Body::from(body.to_string())).unwrap())
            .await;
        (status, body)
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("audit").join("audit.jsonl")).unwrap()
    }
}

#[tokio::test]
async fn an_invited_account_enrols_with_its_code_and_then_logs_in_with_both_factors() {
    let f = fixture(false);
    let admin = f.session("admin.ito").await;
    let (s, invited) = f
        .post_json(
            "/api/accounts/invite",
            json!({"name": "clerk.new", "role": "clerk"}),
            Some(&admin),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{invited}");
    assert_eq!(invited["name"], "clerk.new");
    assert_eq!(invited["role"], "clerk");
    let code = invited["code"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 23, "{code}");
    assert!(invited["expires_at"].as_u64().unwrap() > now_unix() + 71 * 3600);

    // An invited account cannot log in.
    let (s, _, _) = f.login("clerk.new", "", "000000").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The password policy names the rule and does not spend the code.
    for (pw, rule) in [
        ("short", "too-short"),
        ("I am clerk.new at work", "contains-name"),
        ("xxxxxxxxxxxxxxxx", "one-character"),
    ] {
        let (s, b) = f
            .post_json("/api/enrol", json!({"code": code, "password": pw}), None)
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
        assert_eq!(issue_code(&b), rule);
    }
    let (s, enrolment) = f
        .post_json(
            "/api/enrol",
            json!({"code": code.to_lowercase(), "password": PW}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{enrolment}");
    assert_eq!(enrolment["name"], "clerk.new");
    let secret = enrolment["secret"].as_str().unwrap().to_string();
    let uri = enrolment["otpauth_uri"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/") && uri.contains(&secret),
        "{uri}"
    );
    let svg = enrolment["qr_svg"].as_str().unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<path"), "{svg}");

    // Single use: the same code again is refused with the one answer an unknown code gets.
    let (s, reused) = f
        .post_json("/api/enrol", json!({"code": code, "password": PW}), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s2, unknown) = f
        .post_json(
            "/api/enrol",
            json!({"code": "AAAAA-BBBBB-CCCCC-DDDDD", "password": PW}),
            None,
        )
        .await;
    assert_eq!((s2, &unknown), (s, &reused));
    assert_eq!(issue_code(&reused), "enrolment-code");

    // Not usable before the authenticator proves itself.
    let now_code = gateway_staff::code_at(&secret, now_unix()).unwrap();
    let (s, _, _) = f.login("clerk.new", PW, &now_code).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let wrong = if now_code == "000000" {
        "111111"
    } else {
        "000000"
    };
    let (s, b) = f
        .post_json(
            "/api/enrol/confirm",
            json!({"code": code, "totp": wrong}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, b) = f
        .post_json(
            "/api/enrol/confirm",
            json!({"code": code, "totp": now_code}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"name": "clerk.new", "role": "clerk"}));

    // Both factors now log in (the next code: the confirming one is spent).
    let next = gateway_staff::code_at(&secret, now_unix() + 30).unwrap();
    let (s, _, b) = f.login("clerk.new", PW, &next).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The code is gone for good.
    let (s, _) = f
        .post_json(
            "/api/enrol/confirm",
            json!({"code": code, "totp": next}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Each step is audited; no code, password or secret is in the trail.
    let actions: Vec<(String, String, String)> = f
        .audit
        .records()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.actor().to_string(),
                serde_json::to_value(r.action())
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string(),
                serde_json::to_value(r.outcome())
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    for expected in [
        ("admin.ito", "account_invited", "success"),
        ("clerk.new", "enrolment_code_used", "success"),
        ("kiosk-enrolment", "enrolment_code_used", "failure"),
        ("clerk.new", "enrolment_completed", "success"),
        ("clerk.new", "login", "success"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()) == expected),
            "{expected:?} in {actions:?}"
        );
    }
    let trail = f.audit_text();
    let canonical = code.replace('-', "");
    for secret_text in [code.as_str(), canonical.as_str(), PW, secret.as_str()] {
        assert!(
            !trail.contains(secret_text),
            "{secret_text} in the audit trail"
        );
    }
}

#[tokio::test]
async fn only_an_administrator_invites_and_names_and_roles_are_checked() {
    let f = fixture(false);
    let body = json!({"name": "clerk.x", "role": "clerk"});
    let (s, _) = f
        .post_json("/api/accounts/invite", body.clone(), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let clerk = f.session("clerk.sato").await;
    let (s, _) = f
        .post_json("/api/accounts/invite", body.clone(), Some(&clerk))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let admin = f.session("admin.ito").await;
    for bad in [
        json!({"name": "Clerk X", "role": "clerk"}),
        json!({"name": "clerk.x", "role": "root"}),
        json!({"name": "clerk.x"}),
        json!({"name": "clerk.x", "role": "clerk", "password": "x"}),
    ] {
        let (s, b) = f
            .post_json("/api/accounts/invite", bad.clone(), Some(&admin))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {b}");
    }
    let (s, b) = f
        .post_json(
            "/api/accounts/invite",
            json!({"name": "clerk.sato", "role": "clerk"}),
            Some(&admin),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    // Re-inviting a pending account replaces its code.
    let (_, first) = f
        .post_json("/api/accounts/invite", body.clone(), Some(&admin))
        .await;
    let (_, second) = f
        .post_json("/api/accounts/invite", body.clone(), Some(&admin))
        .await;
    let (s, _) = f
        .post_json(
            "/api/enrol",
            json!({"code": first["code"], "password": PW}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = f
        .post_json(
            "/api/enrol",
            json!({"code": second["code"], "password": PW}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Bad bodies are 400s, never a crash.
    let (s, _) = f.post_json("/api/enrol", json!({"code": 5}), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f
        .post_json("/api/enrol/confirm", json!({"code": "x"}), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_enrolment_page_is_served_and_in_the_openapi_document() {
    let f = fixture(false);
    let (s, _, _) = f.get("/enrol.js", None).await;
    assert_eq!(s, StatusCode::OK);
    let r = f
        .app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let html =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for id in [
        "enrol-form",
        "enrol-qr",
        "enrol-secret",
        "enrol-uri",
        "invite-form",
        "/enrol.js",
    ] {
        assert!(html.contains(id), "{id}");
    }
    let (_, _, doc) = f.get("/openapi.json", None).await;
    for path in ["/api/enrol", "/api/enrol/confirm", "/api/accounts/invite"] {
        assert!(doc["paths"][path]["post"].is_object(), "{path}");
    }
    assert!(doc["components"]["schemas"]["Enrolment"].is_object());
    assert!(
        doc["components"]["schemas"]["Login"].is_object(),
        "the base document is kept"
    );
}

#[tokio::test]
async fn a_session_ends_at_its_next_request_once_the_account_is_disabled() {
    let f = fixture(false);
    let clerk = f.session("clerk.sato").await;
    let (s, _, _) = f.get("/api/me", Some(&clerk)).await;
    assert_eq!(s, StatusCode::OK);
    // `staff-disable` (another handle on the same accounts file, as the fleet agent has).
    Staff::open(&f._dir.path().join("staff"), StaffKey::derive(&[3; 32]))
        .unwrap()
        .disable("clerk.sato")
        .unwrap();
    let (s, _, _) = f.get("/api/me", Some(&clerk)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = f.get("/fhir/Slot", Some(&clerk)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn failed_enrolments_are_throttled_per_address_apart_from_logins() {
    let f = fixture(false);
    let admin = f.session("admin.ito").await;
    let (_, invited) = f
        .post_json(
            "/api/accounts/invite",
            json!({"name": "clerk.t", "role": "clerk"}),
            Some(&admin),
        )
        .await;
    for _ in 0..throttle::FAILURES {
        let (s, _) = f
            .post_json(
                "/api/enrol",
                json!({"code": "AAAAA-BBBBB-CCCCC-DDDDD", "password": PW}),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // The address backs off: even the valid code is answered 429, on both routes.
    let (status, headers, _) = f
        .send_raw(
            Request::post("/api/enrol")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    json!({"code": invited["code"], "password": PW}).to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key(header::RETRY_AFTER));
    let (s, _) = f
        .post_json(
            "/api/enrol/confirm",
            json!({"code": invited["code"], "totp": "123456"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Logins from the same address are not blocked by enrolment failures.
    let (s, _, _) = f.login("clerk.sato", PW, &f.code("clerk.sato")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        f.audit_text().contains("throttled until"),
        "the back-off is audited"
    );
}

// ---- Results at the kiosk: ImagingStudy and DiagnosticReport ----

/// The clinic's results state, in memory (the real one is the exchange's sealed file).
#[derive(Debug, Default)]
struct FakeResults {
    down: std::sync::atomic::AtomicBool,
    results: std::sync::Mutex<std::collections::HashMap<String, results::AppointmentResults>>,
    texts: std::sync::Mutex<std::collections::HashMap<String, results::ReportText>>,
}

impl results::ResultsSource for FakeResults {
    fn results_of(
        &self,
        appointment_id: &str,
    ) -> gateway_booking::BoxFuture<
        'static,
        Result<Option<results::AppointmentResults>, results::ResultsUnavailable>,
    > {
        let answer = if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(results::ResultsUnavailable::Unavailable)
        } else {
            Ok(self.results.lock().unwrap().get(appointment_id).cloned())
        };
        Box::pin(std::future::ready(answer))
    }

    fn report_text(
        &self,
        appointment_id: &str,
    ) -> gateway_booking::BoxFuture<
        'static,
        Result<Option<results::ReportText>, results::ResultsUnavailable>,
    > {
        let answer = if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(results::ResultsUnavailable::Unavailable)
        } else {
            Ok(self.texts.lock().unwrap().get(appointment_id).cloned())
        };
        Box::pin(std::future::ready(answer))
    }
}

/// Words of the fake report: none may reach the audit trail or the ImagingStudy.
const FINDINGS: &str = "ZZFINDING no focal consolidation; 肺野に異常なし";
const IMPRESSION: &str = "ZZIMPRESSION normal chest CT";

struct ResultsFixture {
    f: Fixture,
    results: Arc<FakeResults>,
}

/// The kiosk with a results store holding `apt-1` (48 of 50 instances received, 40
/// delivered, 2 failed, a final report received and delivered) and `apt-2` (announced,
/// nothing pulled), and a physician account `dr.suzuki`.
fn results_fixture() -> ResultsFixture {
    let mut f = fixture(false);
    f.staff.add("dr.suzuki", Role::Physician, PW).unwrap();
    let e = f.staff.enroll_totp("dr.suzuki", "test").unwrap();
    f.secrets
        .push(("dr.suzuki".into(), e.secret_base32.to_string()));
    let results = Arc::new(FakeResults::default());
    results.results.lock().unwrap().insert(
        "apt-1".into(),
        results::AppointmentResults {
            appointment_id: "apt-1".into(),
            accession: Some("RB20270112000001".into()),
            study_uids: vec!["1.2.392.200036.9116.2.1.1".into()],
            images_announced: 50,
            images_received: 48,
            images_delivered: 40,
            images_failed: 2,
            complete: true,
            report: Some(results::ReportState {
                status: "final".into(),
                issued: Some("2027-01-12T03:30:00Z".into()),
                received: true,
                delivered: true,
            }),
            updated: "2027-01-12T03:31:00Z".into(),
        },
    );
    results.results.lock().unwrap().insert(
        "apt-2".into(),
        results::AppointmentResults {
            appointment_id: "apt-2".into(),
            accession: None,
            study_uids: vec!["1.2.3.4".into()],
            images_announced: 3,
            images_received: 0,
            images_delivered: 0,
            images_failed: 0,
            complete: false,
            report: None,
            // Not known: no meta.lastUpdated rather than an invalid instant.
            updated: String::new(),
        },
    );
    results.texts.lock().unwrap().insert(
        "apt-1".into(),
        results::ReportText {
            status: "final".into(),
            issued: Some("2027-01-12T03:30:00Z".into()),
            text: vec![FINDINGS.into(), IMPRESSION.into()],
            titles: vec!["所見 / Findings".into(), String::new()],
        },
    );
    f.app = Kiosk::new(
        Arc::clone(&f.staff),
        Arc::clone(&f.audit),
        Arc::new(FixedSlots(false)),
        Arc::clone(&f.core) as Arc<dyn appointment::BookingBackend>,
    )
    .with_results(Arc::clone(&results) as Arc<dyn results::ResultsSource>)
    .router();
    ResultsFixture { f, results }
}

/// The extension of `resource` with the url `{EXTENSION_BASE}{name}`.
fn ext<'a>(resource: &'a Value, name: &str) -> &'a Value {
    let url = format!("{}{name}", results::EXTENSION_BASE);
    resource["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == url.as_str())
        .unwrap_or_else(|| panic!("extension {url} in {resource}"))
}

fn report_reads(audit: &AuditLog) -> Vec<gateway_audit::Record> {
    audit
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.action() == Action::PatientRecordRead)
        .collect()
}

#[tokio::test]
async fn imaging_study_shows_counts_and_report_state_without_its_text() {
    let r = results_fixture();
    let s = r.f.session("clerk.sato").await;
    let (status, headers, b) =
        r.f.get("/fhir/ImagingStudy?based-on=Appointment/apt-1", Some(&s))
            .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(
        (b["type"].as_str(), b["total"].as_u64()),
        (Some("searchset"), Some(1))
    );
    let study = &b["entry"][0]["resource"];
    assert_eq!(study["resourceType"], "ImagingStudy");
    assert_eq!(study["status"], "available");
    assert_eq!(
        study["basedOn"],
        json!([{"reference": "Appointment/apt-1"}])
    );
    assert_eq!(study["numberOfInstances"], 50);
    assert_eq!(study["meta"]["lastUpdated"], "2027-01-12T03:31:00Z");
    assert_eq!(study["identifier"][0]["type"]["coding"][0]["code"], "ACSN");
    assert_eq!(study["identifier"][0]["value"], "RB20270112000001");
    assert_eq!(
        study["identifier"][1],
        json!({"system": "urn:dicom:uid", "value": "urn:oid:1.2.392.200036.9116.2.1.1"})
    );
    assert_eq!(ext(study, "images-received")["valueUnsignedInt"], 48);
    assert_eq!(ext(study, "images-delivered")["valueUnsignedInt"], 40);
    assert_eq!(ext(study, "images-failed")["valueUnsignedInt"], 2);
    assert_eq!(ext(study, "complete")["valueBoolean"], true);
    let report = ext(study, "report");
    let part = |name: &str| {
        report["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    assert_eq!(part("status")["valueCode"], "final");
    assert_eq!(part("issued")["valueDateTime"], "2027-01-12T03:30:00Z");
    assert_eq!(part("received")["valueBoolean"], true);
    assert_eq!(part("delivered")["valueBoolean"], true);
    let text = b.to_string();
    assert!(
        !text.contains("ZZFINDING") && !text.contains("ZZIMPRESSION"),
        "no report text in an ImagingStudy: {text}"
    );

    // Announced, nothing pulled yet: registered, zero received, no report extension.
    let (_, _, b) =
        r.f.get("/fhir/ImagingStudy?based-on=Appointment/apt-2", Some(&s))
            .await;
    let study = &b["entry"][0]["resource"];
    assert_eq!(study["status"], "registered");
    assert_eq!(study["numberOfInstances"], 3);
    assert_eq!(ext(study, "images-received")["valueUnsignedInt"], 0);
    assert_eq!(ext(study, "complete")["valueBoolean"], false);
    assert!(
        !study["extension"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["url"].as_str().unwrap().ends_with("report"))
    );
    assert_eq!(
        study["identifier"].as_array().unwrap().len(),
        1,
        "no accession"
    );
    assert!(study.get("meta").is_none(), "{study}");

    // An appointment nothing came back for: an empty Bundle, not an error.
    let (status, _, b) =
        r.f.get("/fhir/ImagingStudy?based-on=Appointment/apt-9", Some(&s))
            .await;
    assert_eq!((status, b["total"].as_u64()), (StatusCode::OK, Some(0)));
    assert_eq!(b["entry"], json!([]));

    // Any staff role, but a session.
    let admin = r.f.session("admin.ito").await;
    let (status, _, _) =
        r.f.get(
            "/fhir/ImagingStudy?based-on=Appointment/apt-1",
            Some(&admin),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, b) =
        r.f.get("/fhir/ImagingStudy?based-on=Appointment/apt-1", None)
            .await;
    assert_eq!(
        (status, issue_code(&b)),
        (StatusCode::UNAUTHORIZED, "login")
    );
}

#[tokio::test]
async fn a_physician_reads_the_report_a_clerk_and_an_admin_get_403_and_every_read_is_audited() {
    let r = results_fixture();
    let clerk = r.f.session("clerk.sato").await;
    let (status, _, b) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-1",
            Some(&clerk),
        )
        .await;
    assert_eq!(
        (status, issue_code(&b)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(!b.to_string().contains("ZZFINDING"));
    let admin = r.f.session("admin.ito").await;
    let (status, _, _) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-1",
            Some(&admin),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let refused = report_reads(&r.f.audit);
    assert_eq!(refused.len(), 2, "each refused read is on record");
    for (rec, actor) in refused.iter().zip(["clerk.sato", "admin.ito"]) {
        assert_eq!(
            (rec.actor(), rec.outcome(), rec.subject()),
            (actor, Outcome::Failure, Some("appointment:apt-1"))
        );
    }

    let dr = r.f.session("dr.suzuki").await;
    let (status, headers, b) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-1",
            Some(&dr),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(b["total"], 1);
    let report = &b["entry"][0]["resource"];
    assert_eq!(report["resourceType"], "DiagnosticReport");
    assert_eq!(report["status"], "final");
    assert_eq!(report["issued"], "2027-01-12T03:30:00Z");
    assert_eq!(
        report["basedOn"],
        json!([{"reference": "Appointment/apt-1"}])
    );
    assert_eq!(report["code"]["coding"][0]["code"], "18748-4");
    let form = &report["presentedForm"][0];
    assert_eq!(form["contentType"], "text/plain; charset=utf-8");
    let plain = base64::engine::general_purpose::STANDARD
        .decode(form["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(plain).unwrap(),
        format!("所見 / Findings: {FINDINGS}\n{IMPRESSION}")
    );
    let lines: Vec<(&str, &str)> = report["contained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["code"]["text"].as_str().unwrap(),
                o["valueString"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        [("所見 / Findings", FINDINGS), ("", IMPRESSION)],
        "the lines in order with their titles"
    );
    assert_eq!(
        report["result"],
        json!([{"reference": "#line-1"}, {"reference": "#line-2"}])
    );

    // The read is on record: who, an opaque subject, no content.
    let reads = report_reads(&r.f.audit);
    assert_eq!(reads.len(), 3);
    let read = reads.last().unwrap();
    assert_eq!(
        (read.actor(), read.outcome(), read.subject()),
        ("dr.suzuki", Outcome::Success, Some("appointment:apt-1"))
    );
    assert_eq!(details(&r.f.audit).last().unwrap(), "diagnostic-report");

    // No report yet: an empty Bundle, and that read is on record too.
    let (status, _, b) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-2",
            Some(&dr),
        )
        .await;
    assert_eq!((status, b["total"].as_u64()), (StatusCode::OK, Some(0)));
    let reads = report_reads(&r.f.audit);
    assert_eq!(reads.len(), 4);
    assert_eq!(reads.last().unwrap().subject(), Some("appointment:apt-2"));
    assert_eq!(details(&r.f.audit).last().unwrap(), "no-report");

    let trail = std::fs::read_to_string(r.f._dir.path().join("audit/audit.jsonl")).unwrap();
    for secret in [
        "ZZFINDING",
        "ZZIMPRESSION",
        "肺野",
        "Findings",
        "ZZPID",
        "ZZTEST",
    ] {
        assert!(!trail.contains(secret), "{secret} in the audit trail");
    }
}

#[tokio::test]
async fn results_searches_take_only_based_on_an_appointment() {
    let r = results_fixture();
    let dr = r.f.session("dr.suzuki").await;
    for resource in ["ImagingStudy", "DiagnosticReport"] {
        for query in [
            "",
            "?based-on=",
            "?based-on=apt-1",
            "?based-on=Patient/apt-1",
            "?based-on=Appointment/",
            "?based-on=Appointment/a%20b",
            "?based-on=Appointment/%E5%B1%B1",
            "?based-on=Appointment/apt-1/x",
            "?based-on=Appointment/apt-1&based-on=Appointment/apt-2",
            "?based-on=Appointment/apt-1&patient=ZZPID0001",
            "?patient=ZZPID0001",
            "?basedon=Appointment/apt-1",
        ] {
            let (status, _, b) =
                r.f.get(&format!("/fhir/{resource}{query}"), Some(&dr))
                    .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{resource}{query}: {b}");
            let code = issue_code(&b);
            assert!(code == "invalid" || code == "not-supported", "{code}");
            assert!(
                !b.to_string().contains("ZZPID"),
                "the answer echoes no request content"
            );
        }
        let long = format!("/fhir/{resource}?based-on=Appointment/{}", "x".repeat(65));
        let (status, _, _) = r.f.get(&long, Some(&dr)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{long}");
    }
    // The bad searches of a physician read nothing: none is on record as a read.
    assert!(report_reads(&r.f.audit).is_empty());
}

#[tokio::test]
async fn an_unavailable_results_store_is_503_transient() {
    let r = results_fixture();
    r.results
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dr = r.f.session("dr.suzuki").await;
    for resource in ["ImagingStudy", "DiagnosticReport"] {
        let (status, _, b) =
            r.f.get(
                &format!("/fhir/{resource}?based-on=Appointment/apt-1"),
                Some(&dr),
            )
            .await;
        assert_eq!(
            (status, issue_code(&b)),
            (StatusCode::SERVICE_UNAVAILABLE, "transient"),
            "{resource}"
        );
    }
    let reads = report_reads(&r.f.audit);
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].outcome(), Outcome::Failure);
    assert_eq!(details(&r.f.audit).last().unwrap(), "unavailable");
}

#[tokio::test]
async fn without_a_results_store_every_search_is_an_empty_bundle() {
    let f = fixture(false);
    let s = f.session("clerk.sato").await;
    let (status, _, b) = f
        .get("/fhir/ImagingStudy?based-on=Appointment/apt-1", Some(&s))
        .await;
    assert_eq!(
        (status, b["total"].as_u64()),
        (StatusCode::OK, Some(0)),
        "{b}"
    );
}

/// A report is not answered when its read cannot be put on record: the audit log's lock is
/// held by another process past the log's lock wait.
#[tokio::test]
async fn a_report_whose_read_cannot_be_audited_is_not_answered() {
    let mut r = results_fixture();
    let audit_dir = r.f._dir.path().join("audit");
    let audit = Arc::new(
        AuditLog::open(&audit_dir, AuditKey::derive(&[3; 32]))
            .unwrap()
            .with_lock_wait(std::time::Duration::from_millis(200)),
    );
    r.f.app = Kiosk::new(
        Arc::clone(&r.f.staff),
        Arc::clone(&audit),
        Arc::new(FixedSlots(false)),
        Arc::clone(&r.f.core) as Arc<dyn appointment::BookingBackend>,
    )
    .with_results(Arc::clone(&r.results) as Arc<dyn results::ResultsSource>)
    .router();
    let dr = r.f.session("dr.suzuki").await;
    let held = gateway_durable::LockedFile::lock(
        &audit_dir.join("head"),
        &audit_dir.join("audit.lock"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let (status, _, b) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-1",
            Some(&dr),
        )
        .await;
    drop(held);
    assert_eq!(
        (status, issue_code(&b)),
        (StatusCode::SERVICE_UNAVAILABLE, "transient")
    );
    assert!(!b.to_string().contains("ZZFINDING"), "{b}");
    assert!(report_reads(&audit).is_empty());
    // Once the trail can be written again the physician reads it.
    let (status, _, b) =
        r.f.get(
            "/fhir/DiagnosticReport?based-on=Appointment/apt-1",
            Some(&dr),
        )
        .await;
    assert_eq!((status, b["total"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(report_reads(&audit).len(), 1);
}

#[tokio::test]
async fn the_openapi_document_describes_the_results_searches() {
    let f = fixture(false);
    let (_, _, doc) = f.get("/openapi.json", None).await;
    for (path, statuses) in [
        ("/fhir/ImagingStudy", &["200", "400", "401", "503"][..]),
        (
            "/fhir/DiagnosticReport",
            &["200", "400", "401", "403", "503"][..],
        ),
    ] {
        let get = &doc["paths"][path]["get"];
        assert_eq!(get["parameters"][0]["name"], "based-on", "{path}");
        assert_eq!(get["parameters"][0]["required"], true);
        for status in statuses {
            assert!(get["responses"].get(*status).is_some(), "{path} {status}");
        }
    }
    let schemas = &doc["components"]["schemas"];
    for name in ["ImagingStudy", "DiagnosticReport", "ReportStateExtension"] {
        assert!(schemas.get(name).is_some(), "{name}");
    }
    assert_eq!(
        schemas["ReportStateExtension"]["properties"]["url"]["const"],
        format!("{}report", results::EXTENSION_BASE)
    );
}

mod identity;

// --- safety warnings at booking ---------------------------------------------------------

fn safety_report() -> gateway_booking::SafetyReport {
    use gateway_booking::{
        ContrastClass, DoseEventView, DoseSummary, SafetyReport, SafetyWarning, WarningKind,
    };
    SafetyReport {
        warnings: vec![
            SafetyWarning {
                id: "w-react-1".into(),
                kind: WarningKind::ContrastReaction,
                contrast: Some(ContrastClass::Iodinated),
                agent: Some("Iopamidol".into()),
                severity: Some("SV".into()),
                reactions: vec!["蕁麻疹".into(), "anaphylaxis".into()],
                when: Some("20240105".into()),
                hospital: "hosp-a".into(),
                text_en: "Severe reaction to iodinated contrast".into(),
                text_ja: "ヨード造影剤に重度の反応".into(),
            },
            SafetyWarning {
                id: "w-dose-365".into(),
                kind: WarningKind::CumulativeDose,
                contrast: None,
                agent: None,
                severity: None,
                reactions: Vec::new(),
                when: None,
                hospital: "core-1".into(),
                text_en: "Cumulative DLP over the threshold".into(),
                text_ja: "累積DLPが閾値を超えています".into(),
            },
        ],
        dose: Some(DoseSummary {
            window_days: 365,
            total_dlp_mgy_cm: 2412.5,
            threshold_dlp_mgy_cm: Some(2000.0),
            events: vec![DoseEventView {
                event_uid: "1.2.392.200036.9116.2.6.1.48.1215.1".into(),
                when: Some("20260412101500".into()),
                hospital: "hosp-b".into(),
                ctdivol_mgy: Some(12.3),
                dlp_mgy_cm: Some(2412.5),
                target_region: Some("Chest".into()),
                protocol: Some("Chest routine".into()),
            }],
            label: gateway_booking::safety::DOSE_LABEL.into(),
        }),
    }
}

/// The fixture with a physician `dr.suzuki` and a core that reports [`safety_report`].
fn safety_fixture() -> Fixture {
    let mut f = fixture(false);
    f.staff.add("dr.suzuki", Role::Physician, PW).unwrap();
    let e = f.staff.enroll_totp("dr.suzuki", "test").unwrap();
    f.secrets
        .push(("dr.suzuki".into(), e.secret_base32.to_string()));
    *f.core.safety.lock().unwrap() = Some(safety_report());
    f
}

fn acknowledging(mut body: Value, ids: &[&str]) -> Value {
    body["extension"] = ids
        .iter()
        .map(|id| json!({"url": appointment::ACKNOWLEDGED_WARNING, "valueString": id}))
        .collect();
    body
}

/// The ids a 409 asks to acknowledge.
fn warning_ids(o: &Value) -> Vec<String> {
    o["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["details"]["coding"][0]["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn unacknowledged_warnings_answer_409_with_each_warning_in_both_languages_and_the_dose() {
    let f = safety_fixture();
    let s = f.session("clerk.sato").await;
    let body = appointment_body("req-s1", "ct-1.20270112T1000");
    let (status, headers, o) = f.post("/fhir/Appointment/$book", &s, &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{o}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(o["resourceType"], "OperationOutcome");
    assert_eq!(warning_ids(&o), vec!["w-react-1", "w-dose-365"]);
    let first = &o["issue"][0];
    assert_eq!(first["severity"], "warning");
    assert_eq!(first["code"], "business-rule");
    assert_eq!(
        first["diagnostics"],
        "Severe reaction to iodinated contrast"
    );
    assert_eq!(first["details"]["text"], "ヨード造影剤に重度の反応");
    assert_eq!(
        first["details"]["coding"][0]["system"],
        safety::WARNING_SYSTEM
    );
    let ext = &first["extension"][0];
    assert_eq!(ext["url"], safety::WARNING_SYSTEM);
    let sub = |url: &str| -> Vec<Value> {
        ext["extension"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["url"] == url)
            .cloned()
            .collect()
    };
    assert_eq!(sub("kind")[0]["valueCode"], "contrast-reaction");
    assert_eq!(sub("contrast")[0]["valueCode"], "iodinated");
    assert_eq!(sub("agent")[0]["valueString"], "Iopamidol");
    assert_eq!(sub("severity")[0]["valueString"], "SV");
    assert_eq!(sub("when")[0]["valueString"], "20240105");
    assert_eq!(sub("hospital")[0]["valueString"], "hosp-a");
    assert_eq!(sub("reaction").len(), 2);
    assert_eq!(o["issue"][1]["severity"], "warning");
    // The dose: a contained Observation labelled as scanner output, with its event.
    let dose = &o["contained"][0];
    assert_eq!(dose["resourceType"], "Observation");
    assert_eq!(dose["valueQuantity"]["value"], 2412.5);
    assert_eq!(dose["valueQuantity"]["code"], "mGy.cm");
    assert_eq!(dose["referenceRange"][0]["high"]["value"], 2000.0);
    assert_eq!(dose["note"][0]["text"], gateway_booking::safety::DOSE_LABEL);
    assert_eq!(dose["note"][1]["text"], safety::DOSE_LABEL_JA);
    assert_eq!(dose["extension"][0]["valueUnsignedInt"], 365);
    assert_eq!(
        dose["component"][0]["code"]["coding"][0]["code"],
        "1.2.392.200036.9116.2.6.1.48.1215.1"
    );
    assert_eq!(dose["component"][0]["valueQuantity"]["value"], 2412.5);
    // Nothing was booked; the refusal is audited without patient data.
    assert!(f.core.by_request.lock().unwrap().is_empty());
    let records = f.audit.records().unwrap();
    let refused = records
        .iter()
        .filter(|r| r.action() == Action::AppointmentBooked && r.outcome() == Outcome::Failure)
        .count();
    assert_eq!(refused, 1);
    assert!(!f.audit_text().contains("ZZTEST"));
}

#[tokio::test]
async fn only_a_physician_may_acknowledge_and_the_acknowledgement_is_audited() {
    let f = safety_fixture();
    let clerk = f.session("clerk.sato").await;
    let all = ["w-react-1", "w-dose-365"];
    let body = acknowledging(appointment_body("req-s2", "ct-1.20270112T1000"), &all);
    let (status, _, o) = f.post("/fhir/Appointment/$book", &clerk, &body).await;
    assert_eq!(
        (status, issue_code(&o)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(
        f.core.by_request.lock().unwrap().is_empty(),
        "nothing sent to the core"
    );

    let dr = f.session("dr.suzuki").await;
    // One of two acknowledged: still 409.
    let partial = acknowledging(appointment_body("req-s2", "ct-1.20270112T1000"), &all[..1]);
    let (status, _, o) = f.post("/fhir/Appointment/$book", &dr, &partial).await;
    assert_eq!(status, StatusCode::CONFLICT, "{o}");
    assert!(
        !f.audit
            .records()
            .unwrap()
            .iter()
            .any(|r| r.action() == Action::SafetyAcknowledged),
        "no acknowledgement recorded while the booking did not proceed"
    );
    // All acknowledged: booked; the Appointment carries the acknowledged ids and the dose.
    let (status, _, a) = f.post("/fhir/Appointment/$book", &dr, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    assert_eq!(a["status"], "booked");
    let acked: Vec<&str> = a["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["url"] == appointment::ACKNOWLEDGED_WARNING)
        .map(|e| e["valueString"].as_str().unwrap())
        .collect();
    assert_eq!(acked, all);
    assert_eq!(a["contained"][0]["id"], "cumulative-dose");
    assert_eq!(a["contained"][0]["valueQuantity"]["value"], 2412.5);
    let records = f.audit.records().unwrap();
    let acks: Vec<_> = records
        .iter()
        .filter(|r| r.action() == Action::SafetyAcknowledged)
        .collect();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].outcome(), Outcome::Success);
    assert!(acks[0].subject().unwrap().starts_with("patient:"));
    assert!(details(&f.audit).contains(&"warnings=2".to_string()));
    assert!(details(&f.audit).contains(&"forbidden".to_string()));
}

#[tokio::test]
async fn acknowledged_warning_ids_are_checked_as_input() {
    let f = safety_fixture();
    let dr = f.session("dr.suzuki").await;
    let base = appointment_body("req-s3", "ct-1.20270112T1000");
    let mut not_array = base.clone();
    not_array["extension"] = json!({"url": appointment::ACKNOWLEDGED_WARNING});
    let mut no_value = base.clone();
    no_value["extension"] = json!([{"url": appointment::ACKNOWLEDGED_WARNING}]);
    let control = acknowledging(base.clone(), &["w\u{1}"]);
    let many_ids: Vec<String> = (0..33).map(|i| format!("w{i}")).collect();
    let many = acknowledging(
        base.clone(),
        &many_ids.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for bad in [not_array, no_value, control, many] {
        let (status, _, o) = f.post("/fhir/Appointment/$book", &dr, &bad).await;
        assert_eq!(
            (status, issue_code(&o)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{bad}"
        );
    }
    // Extensions of other urls are ignored: no acknowledgement, so still 409.
    let mut other = base;
    other["extension"] = json!([{"url": "urn:example:other", "valueString": "w-react-1"}]);
    let (status, _, _) = f.post("/fhir/Appointment/$book", &dr, &other).await;
    assert_eq!(status, StatusCode::CONFLICT);
}
