use super::*;
use axum::body::Body;
use axum::http::Request;
use gateway_audit::AuditKey;
use gateway_staff::StaffKey;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

const PW: &str = "correct horse battery";

#[derive(Debug)]
struct FixedSlots(bool);

impl SlotSource for FixedSlots {
    fn free_slots(&self, q: &SlotQuery) -> SlotAnswer {
        let all = [
            ("ct-1.20270112T1000", "ct-1"),
            ("mr-1.20270112T1000", "mr-1"),
        ];
        SlotAnswer {
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
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
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
    let app = Kiosk::new(
        Arc::new(staff),
        Arc::clone(&audit),
        Arc::new(FixedSlots(stale)),
    )
    .router();
    Fixture {
        _dir: dir,
        app,
        audit,
        secrets,
    }
}

impl Fixture {
    fn code(&self, name: &str) -> String {
        let secret = &self.secrets.iter().find(|(n, _)| n == name).unwrap().1;
        gateway_staff::code_at(secret, now_unix()).unwrap()
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let r = self.app.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn login(
        &self,
        name: &str,
        password: &str,
        code: &str,
    ) -> (StatusCode, HeaderMap, Value) {
        let body = json!({"name": name, "password": password, "code": code}).to_string();
        self.send(
            Request::post("/api/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
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
    assert_eq!(body, json!({"name": "clerk.sato", "role": "clerk"}));
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
            json!({"name": "clerk.sato", "role": "clerk"})
        )
    );
}

#[tokio::test]
async fn missing_wrong_and_reused_codes_and_lockout_are_refused_and_audited() {
    let f = fixture(false);
    let code = f.code("clerk.sato");
    let (s, _, b) = f.login("clerk.sato", PW, "").await;
    assert_eq!((s, issue_code(&b)), (StatusCode::UNAUTHORIZED, "login"));
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (s, _, b) = f.login("clerk.sato", PW, wrong).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("one-time code"),
        "{b}"
    );
    let (s, _, b) = f.login("no.totp", PW, &code).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("no second factor")
    );
    let (s, _, _) = f.login("clerk.sato", PW, &code).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = f.login("clerk.sato", PW, &code).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a code works once");
    for _ in 0..5 {
        f.login("clerk.sato", "not the password", &code).await;
    }
    let (s, _, b) = f.login("clerk.sato", PW, &f.code("clerk.sato")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("locked"),
        "{b}"
    );
    // Unknown names are audited under a fixed actor, never as typed.
    f.login("ZZTEST TARO", PW, &code).await;
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
    assert!(records.len() >= 10);
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
