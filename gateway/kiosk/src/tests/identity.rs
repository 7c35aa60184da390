//! The identity routes (名寄せ, 公開同意) against a fake registry that records every call.

use super::*;
use gateway_identity::{Decision, Record};
use gateway_registry::{
    BoxFuture, Consent, ConsentSource, ConsentStatus, DataKind, Disclosure, Grant, Grantee,
    IdentityService, Linked, MatchCandidate, NewConsent, Permit, PersonId, Refused, RegistryError,
    ReviewItem, SourceKey, SourceRecord, Verdict,
};
use std::sync::Mutex;

/// This kiosk's hospital (the requester it names).
const CORE: &str = "core-h";
/// Words of the fake records: none may reach the audit trail.
const KANJI_FAMILY: &str = "ZZ髙橋";

fn key(h: &str, p: &str) -> SourceKey {
    SourceKey {
        hospital_id: h.into(),
        patient_id: p.into(),
    }
}

/// A record with every field set.
fn full_record(h: &str, p: &str) -> Record {
    Record {
        hospital_id: Some(h.into()),
        patient_id: Some(p.into()),
        family_name: Some(KANJI_FAMILY.into()),
        given_name: Some("太郎".into()),
        family_kana: Some("タカハシ".into()),
        given_kana: Some("タロウ".into()),
        sex: Some("M".into()),
        birth_date: Some("1975-01-02".into()),
        address: Some("東京都千代田区千代田1-1".into()),
        postal_code: Some("100-0001".into()),
        phone: Some("03-1234-5678".into()),
        insurer_number: Some("06130012".into()),
        insurance_symbol: Some("記号1".into()),
        insurance_number: Some("123".into()),
        insurance_branch: Some("01".into()),
    }
}

fn source(h: &str, p: &str, person: &str, record: Record) -> SourceRecord {
    SourceRecord {
        key: key(h, p),
        person: PersonId(person.into()),
        record,
        updated: "2026-12-01T00:00:00Z".into(),
    }
}

fn consent(id: &str, patient: SourceKey, grants: Vec<Grant>) -> Consent {
    Consent {
        id: id.into(),
        patient,
        grants,
        status: ConsentStatus::Active,
        source: ConsentSource::Kiosk,
        recorded_by: "dr.suzuki".into(),
        recorded_at: "2026-12-01T00:00:00Z".into(),
        revoked_by: None,
        revoked_at: None,
    }
}

/// The registry, in memory: fixed answers, every call written down as a line.
#[derive(Debug, Default)]
struct FakeIdentity {
    calls: Mutex<Vec<String>>,
    /// The last query of `search` and consent of `record_consent`.
    query: Mutex<Option<Record>>,
    new_consent: Mutex<Option<NewConsent>>,
    /// What every method answers instead, when set.
    fail: Mutex<Option<RegistryError>>,
    candidates: Mutex<Vec<MatchCandidate>>,
}

impl FakeIdentity {
    fn call(&self, line: String) -> Result<(), RegistryError> {
        self.calls.lock().unwrap().push(line);
        match self.fail.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn failing(&self, e: Option<RegistryError>) {
        *self.fail.lock().unwrap() = e;
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl IdentityService for FakeIdentity {
    fn search(
        &self,
        query: Record,
        requester_hospital: &str,
        actor: &str,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<MatchCandidate>, RegistryError>> {
        *self.query.lock().unwrap() = Some(query);
        let r = self
            .call(format!("search {requester_hospital} {actor} {limit}"))
            .map(|()| self.candidates.lock().unwrap().clone());
        ready(r)
    }

    fn linked(
        &self,
        key: SourceKey,
        requester_hospital: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Linked, RegistryError>> {
        let r = self
            .call(format!(
                "linked {}|{} {requester_hospital} {actor}",
                key.hospital_id, key.patient_id
            ))
            .map(|()| Linked {
                person: PersonId("person-7".into()),
                identifiers: vec![key.clone(), self::key("clinic-a", "A-0931")],
                withheld: 1,
            });
        ready(r)
    }

    fn review_queue(&self) -> BoxFuture<'static, Result<Vec<ReviewItem>, RegistryError>> {
        let mut b = full_record("clinic-a", "A-0931");
        b.family_name = Some("高橋".into());
        b.phone = None;
        let r = self.call("review_queue".into()).map(|()| {
            vec![ReviewItem {
                id: "rv-1".into(),
                a: source(CORE, "12345", "person-1", full_record(CORE, "12345")),
                b: source("clinic-a", "A-0931", "person-2", b),
                score: 4.5,
                queued: "2026-12-02T00:00:00Z".into(),
            }]
        });
        ready(r)
    }

    fn decide(
        &self,
        review_id: &str,
        verdict: Verdict,
        actor: &str,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        ready(self.call(format!("decide {review_id} {verdict:?} {actor}")))
    }

    fn link(
        &self,
        a: SourceKey,
        b: SourceKey,
        actor: &str,
    ) -> BoxFuture<'static, Result<PersonId, RegistryError>> {
        let r = self
            .call(format!(
                "link {}|{} {}|{} {actor}",
                a.hospital_id, a.patient_id, b.hospital_id, b.patient_id
            ))
            .map(|()| PersonId("person-9".into()));
        ready(r)
    }

    fn unlink(&self, key: SourceKey, actor: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        ready(self.call(format!(
            "unlink {}|{} {actor}",
            key.hospital_id, key.patient_id
        )))
    }

    fn consents(&self, key: SourceKey) -> BoxFuture<'static, Result<Vec<Consent>, RegistryError>> {
        let r = self
            .call(format!("consents {}|{}", key.hospital_id, key.patient_id))
            .map(|()| {
                let mut old = consent(
                    "c-1",
                    key.clone(),
                    vec![Grant {
                        grantee: Grantee::Region,
                        kinds: vec![DataKind::Identity],
                    }],
                );
                old.status = ConsentStatus::Revoked;
                old.revoked_by = Some("admin.ito".into());
                old.revoked_at = Some("2026-12-03T00:00:00Z".into());
                let new = consent(
                    "c-2",
                    key.clone(),
                    vec![Grant {
                        grantee: Grantee::Hospital("clinic-a".into()),
                        kinds: vec![DataKind::Results, DataKind::Dose],
                    }],
                );
                vec![new, old]
            });
        ready(r)
    }

    fn record_consent(
        &self,
        new: NewConsent,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>> {
        *self.new_consent.lock().unwrap() = Some(new.clone());
        let r = self
            .call(format!("record_consent {actor}"))
            .map(|()| Consent {
                recorded_by: actor.into(),
                ..consent("c-3", new.patient, new.grants)
            });
        ready(r)
    }

    fn revoke_consent(
        &self,
        consent_id: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>> {
        let r = self
            .call(format!("revoke_consent {consent_id} {actor}"))
            .map(|()| Consent {
                status: ConsentStatus::Revoked,
                revoked_by: Some(actor.into()),
                revoked_at: Some("2026-12-04T00:00:00Z".into()),
                ..consent(
                    consent_id,
                    key(CORE, "12345"),
                    vec![Grant {
                        grantee: Grantee::Region,
                        kinds: vec![DataKind::Results],
                    }],
                )
            });
        ready(r)
    }

    fn may_disclose(
        &self,
        _disclosure: Disclosure,
        actor: &str,
    ) -> BoxFuture<'static, Result<Result<Permit, Refused>, RegistryError>> {
        ready(
            self.call(format!("may_disclose {actor}"))
                .map(|()| Err(Refused)),
        )
    }
}

struct IdentityFixture {
    f: Fixture,
    registry: Arc<FakeIdentity>,
}

/// The kiosk with the fake registry and a physician account `dr.suzuki`.
fn identity_fixture() -> IdentityFixture {
    let mut f = fixture(false);
    f.staff.add("dr.suzuki", Role::Physician, PW).unwrap();
    let e = f.staff.enroll_totp("dr.suzuki", "test").unwrap();
    f.secrets
        .push(("dr.suzuki".into(), e.secret_base32.to_string()));
    let registry = Arc::new(FakeIdentity::default());
    f.app = Kiosk::new(
        Arc::clone(&f.staff),
        Arc::clone(&f.audit),
        Arc::new(FixedSlots(false)),
        Arc::clone(&f.core) as Arc<dyn appointment::BookingBackend>,
    )
    .with_identity(Arc::clone(&registry) as Arc<dyn IdentityService>, CORE)
    .router();
    IdentityFixture { f, registry }
}

fn match_body(patient: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]})
}

fn patient_query() -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [
            {"system": "urn:oid:1.2.3", "value": "ignored"},
            {"system": "urn:gateway:hospital:clinic-a", "value": "A-0931"}
        ],
        "name": [
            {"extension": [{"url": fhir::REPRESENTATION, "valueCode": "IDE"}], "family": "髙橋", "given": ["太郎"]},
            {"extension": [{"url": fhir::REPRESENTATION, "valueCode": "SYL"}], "family": "ﾀｶﾊｼ", "given": ["ﾀﾛｳ"]},
            {"extension": [{"url": fhir::REPRESENTATION, "valueCode": "ABC"}], "family": "TAKAHASHI", "given": ["TARO"]}
        ],
        "gender": "male",
        "birthDate": "1975-01-02",
        "address": [{"postalCode": "100-0001", "state": "東京都", "city": "千代田区", "line": ["千代田１丁目１番"]}],
        "telecom": [{"system": "email", "value": "x@example.org"}, {"system": "phone", "value": "03 1234 5678"}],
        "extension": [{"url": fhir::INSURANCE, "extension": [
            {"url": "insurer-number", "valueString": "06130012"},
            {"url": "symbol", "valueString": "記号1"},
            {"url": "number", "valueString": "123"},
            {"url": "branch", "valueString": "01"}
        ]}]
    })
}

use crate::identity::fhir;

/// Every identity route: method, path, body.
fn identity_routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        (
            "POST",
            "/fhir/Patient/$match",
            Some(match_body(patient_query())),
        ),
        (
            "GET",
            "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:core-h%7C12345",
            None,
        ),
        ("GET", "/api/identity/review", None),
        (
            "POST",
            "/api/identity/review/rv-1",
            Some(json!({"verdict": "same"})),
        ),
        (
            "POST",
            "/api/identity/link",
            Some(json!({"a": {"hospital_id": CORE, "patient_id": "12345"},
                        "b": {"hospital_id": "clinic-a", "patient_id": "A-0931"}})),
        ),
        (
            "POST",
            "/api/identity/unlink",
            Some(json!({"hospital_id": "clinic-a", "patient_id": "A-0931"})),
        ),
        (
            "GET",
            "/fhir/Consent?patient=urn:gateway:hospital:core-h%7C12345",
            None,
        ),
        ("POST", "/fhir/Consent", Some(consent_body())),
        ("POST", "/fhir/Consent/c-2/$revoke", None),
    ]
}

fn consent_body() -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "patient": {"identifier": {"system": "urn:gateway:hospital:core-h", "value": "12345"}},
        "provision": {"type": "deny", "provision": [
            {"type": "permit",
             "actor": [{"reference": {"identifier": {"system": "urn:gateway:hospital", "value": "clinic-a"}}}],
             "class": [{"system": "urn:gateway:data-kind", "code": "results"}, {"system": "urn:gateway:data-kind", "code": "dose"}]},
            {"type": "permit",
             "actor": [{"reference": {"identifier": {"system": "urn:gateway:region", "value": "region"}}}],
             "class": [{"system": "urn:gateway:data-kind", "code": "identity"}]}
        ]}
    })
}

impl Fixture {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        cookie: Option<&str>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/fhir+json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        self.send(req.body(body).unwrap()).await
    }
}

#[tokio::test]
async fn identity_is_for_physicians_and_admins_a_clerk_gets_403_and_no_session_401() {
    let r = identity_fixture();
    let clerk = r.f.session("clerk.sato").await;
    let dr = r.f.session("dr.suzuki").await;
    let admin = r.f.session("admin.ito").await;
    for (method, path, body) in identity_routes() {
        let (s, _, b) = r.f.call(method, path, body.as_ref(), None).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::UNAUTHORIZED, "login"),
            "{path}"
        );
        let (s, _, b) = r.f.call(method, path, body.as_ref(), Some(&clerk)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}"
        );
    }
    assert!(
        r.registry.calls().is_empty(),
        "a refused request reaches no registry: {:?}",
        r.registry.calls()
    );
    let refused =
        r.f.audit
            .records()
            .unwrap()
            .into_iter()
            .filter(|x| x.actor() == "clerk.sato" && x.outcome() == Outcome::Failure)
            .count();
    assert_eq!(refused, identity_routes().len(), "every refusal is audited");
    for cookie in [&dr, &admin] {
        for (method, path, body) in identity_routes() {
            let (s, _, b) = r.f.call(method, path, body.as_ref(), Some(cookie)).await;
            assert!(s.is_success(), "{path}: {s} {b}");
        }
    }
    assert_eq!(r.registry.calls().len(), 2 * identity_routes().len());
    // /api/me tells the page that this gateway keeps the registry (it shows the section).
    let (s, _, me) = r.f.call("GET", "/api/me", None, Some(&dr)).await;
    assert_eq!((s, &me["identity"]), (StatusCode::OK, &json!(true)), "{me}");
}

#[tokio::test]
async fn without_a_registry_every_identity_route_is_404_not_supported() {
    let f = fixture(false);
    let admin = f.session("admin.ito").await;
    for (method, path, body) in identity_routes() {
        let (s, _, b) = f.call(method, path, body.as_ref(), Some(&admin)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::NOT_FOUND, "not-supported"),
            "{path}"
        );
    }
    // The page asks none of them: /api/me says there is no registry here.
    let (s, _, me) = f.call("GET", "/api/me", None, Some(&admin)).await;
    assert_eq!(
        (s, &me["identity"]),
        (StatusCode::OK, &json!(false)),
        "{me}"
    );
}

#[tokio::test]
async fn match_reads_a_jp_core_patient_into_the_query_record() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let mut body = match_body(patient_query());
    body["parameter"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "count", "valueInteger": 3}));
    let (s, headers, b) =
        r.f.call("POST", "/fhir/Patient/$match", Some(&body), Some(&dr))
            .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(r.registry.calls(), ["search core-h dr.suzuki 3"]);
    let q = r.registry.query.lock().unwrap().clone().unwrap();
    let expected = Record {
        hospital_id: Some("clinic-a".into()),
        patient_id: Some("A-0931".into()),
        family_name: Some("髙橋".into()),
        given_name: Some("太郎".into()),
        family_kana: Some("ﾀｶﾊｼ".into()),
        given_kana: Some("ﾀﾛｳ".into()),
        sex: Some("M".into()),
        birth_date: Some("1975-01-02".into()),
        address: Some("東京都千代田区千代田１丁目１番".into()),
        postal_code: Some("100-0001".into()),
        phone: Some("03 1234 5678".into()),
        insurer_number: Some("06130012".into()),
        insurance_symbol: Some("記号1".into()),
        insurance_number: Some("123".into()),
        insurance_branch: Some("01".into()),
    };
    assert!(q == expected, "the query record differs from the Patient");

    // Names without the representation extension: kana is told from kanji; an unsplit
    // name (text only) goes to the family field; the address text wins over its parts.
    let p = json!({"resourceType": "Patient",
        "name": [{"text": "やまだ はなこ"}, {"family": "山田", "given": ["花", "子"]}],
        "gender": "female",
        "address": [{"text": "大阪市北区1-2-3", "city": "ignored"}]});
    let (s, _, b) =
        r.f.call(
            "POST",
            "/fhir/Patient/$match",
            Some(&match_body(p)),
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let q = r.registry.query.lock().unwrap().clone().unwrap();
    assert_eq!(q.family_kana.as_deref(), Some("やまだ はなこ"));
    assert_eq!(q.given_kana, None);
    assert_eq!(
        (q.family_name.as_deref(), q.given_name.as_deref()),
        (Some("山田"), Some("花 子"))
    );
    assert_eq!(q.sex.as_deref(), Some("F"));
    assert_eq!(q.address.as_deref(), Some("大阪市北区1-2-3"));
    assert_eq!(
        r.registry.calls().last().unwrap(),
        "search core-h dr.suzuki 10"
    );
}

#[tokio::test]
async fn match_answers_scored_graded_patients_with_their_person() {
    let r = identity_fixture();
    let mut era = full_record("clinic-a", "A-0931");
    era.birth_date = Some("S50.1.2".into());
    era.sex = Some("女".into());
    era.family_kana = None;
    era.given_kana = None;
    *r.registry.candidates.lock().unwrap() = vec![
        MatchCandidate {
            record: source(CORE, "12345", "person-1", full_record(CORE, "12345")),
            score: 14.0,
            decision: Decision::Link,
        },
        MatchCandidate {
            record: source("clinic-a", "A-0931", "person-2", era),
            score: 2.0,
            decision: Decision::Review,
        },
        MatchCandidate {
            record: source("clinic-b", "B-1", "person-3", Record::default()),
            score: -6.0,
            decision: Decision::Distinct,
        },
    ];
    let dr = r.f.session("dr.suzuki").await;
    let (s, _, b) =
        r.f.call(
            "POST",
            "/fhir/Patient/$match",
            Some(&match_body(patient_query())),
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["resourceType"].as_str(), b["type"].as_str()),
        (Some("Bundle"), Some("searchset"))
    );
    assert_eq!(b["total"], 3);
    let grade = |i: usize| {
        b["entry"][i]["search"]["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == fhir::MATCH_GRADE)
            .unwrap()["valueCode"]
            .clone()
    };
    assert_eq!(
        (grade(0), grade(1), grade(2)),
        (json!("certain"), json!("probable"), json!("possible"))
    );
    let score = |i: usize| b["entry"][i]["search"]["score"].as_f64().unwrap();
    assert_eq!(score(0), 0.9999);
    assert_eq!(score(1), 0.8);
    assert!(score(2) < 0.02);
    assert_eq!(b["entry"][0]["search"]["mode"], "match");

    let p = &b["entry"][0]["resource"];
    assert_eq!(p["resourceType"], "Patient");
    assert_eq!(
        p["identifier"],
        json!([{"system": "urn:gateway:hospital:core-h", "value": "12345"}])
    );
    assert_eq!(
        p["extension"][0],
        json!({"url": fhir::PERSON, "valueIdentifier": {"system": fhir::PERSON_SYSTEM, "value": "person-1"}})
    );
    assert_eq!(p["name"][0]["extension"][0]["valueCode"], "IDE");
    assert_eq!(p["name"][0]["family"], KANJI_FAMILY);
    assert_eq!(p["name"][0]["given"], json!(["太郎"]));
    assert_eq!(p["name"][1]["extension"][0]["valueCode"], "SYL");
    assert_eq!(p["name"][1]["family"], "タカハシ");
    assert_eq!(p["gender"], "male");
    assert_eq!(p["birthDate"], "1975-01-02");
    assert_eq!(
        p["address"],
        json!([{"text": "東京都千代田区千代田1-1", "postalCode": "100-0001"}])
    );
    assert_eq!(
        p["telecom"],
        json!([{"system": "phone", "value": "03-1234-5678"}])
    );
    assert_eq!(p["meta"]["lastUpdated"], "2026-12-01T00:00:00Z");

    // An era date is no FHIR date: it is answered as recorded, in an extension.
    let p = &b["entry"][1]["resource"];
    assert!(p.get("birthDate").is_none(), "{p}");
    assert!(
        p["extension"]
            .as_array()
            .unwrap()
            .contains(&json!({"url": fhir::BIRTH_DATE_AS_RECORDED, "valueString": "S50.1.2"}))
    );
    assert_eq!(p["gender"], "female");
    assert_eq!(
        p["name"].as_array().unwrap().len(),
        1,
        "no kana, no SYL name"
    );
    // A record with nothing but its key is still a Patient with its identifier.
    assert_eq!(b["entry"][2]["resource"]["identifier"][0]["value"], "B-1");

    // Every Patient answered reads back into the record it came from.
    for (i, c) in r.registry.candidates.lock().unwrap().iter().enumerate() {
        if i == 1 {
            continue; // the era date and 女 are answered in FHIR's forms
        }
        let back = fhir::patient_to_record(&b["entry"][i]["resource"]).unwrap();
        // The identifier is the source key, whatever the record's own id fields say.
        let expected = Record {
            hospital_id: Some(c.record.key.hospital_id.clone()),
            patient_id: Some(c.record.key.patient_id.clone()),
            ..c.record.record.clone()
        };
        assert!(back == expected, "entry {i} does not read back");
    }

    // onlyCertainMatches: the link only.
    let mut body = match_body(patient_query());
    body["parameter"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "onlyCertainMatches", "valueBoolean": true}));
    let (_, _, b) =
        r.f.call("POST", "/fhir/Patient/$match", Some(&body), Some(&dr))
            .await;
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["resource"]["identifier"][0]["value"], "12345");
}

#[tokio::test]
async fn malformed_match_requests_are_400_naming_the_element_without_echoing_it() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let with = |patch: Value| {
        let mut p = patient_query();
        for (k, v) in patch.as_object().unwrap() {
            p[k] = v.clone();
        }
        match_body(p)
    };
    let cases = [
        (json!({"resourceType": "Patient"}), "Parameters"),
        (
            json!({"resourceType": "Parameters"}),
            "Parameters.parameter",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": []}),
            "resource",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Observation"}}]}),
            "Patient",
        ),
        (with(json!({"gender": "SECRETVALUE"})), "Patient.gender"),
        (
            with(json!({"birthDate": "SECRETVALUE"})),
            "Patient.birthDate",
        ),
        (with(json!({"name": "SECRETVALUE"})), "Patient.name"),
        (
            with(json!({"name": [{"family": 7}]})),
            "Patient.name.family",
        ),
        (
            with(
                json!({"name": [{"family": "x", "extension": [{"url": fhir::REPRESENTATION, "valueCode": "SECRETVALUE"}]}]}),
            ),
            "Patient.name.extension",
        ),
        (
            with(
                json!({"identifier": [{"system": "urn:gateway:hospital:", "value": "SECRETVALUE"}]}),
            ),
            "Patient.identifier",
        ),
        (
            with(json!({"telecom": {"value": "SECRETVALUE"}})),
            "Patient.telecom",
        ),
        (
            with(json!({"name": [{"family": "S".repeat(300)}]})),
            "Patient.name.family",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient"}}]}),
            "nothing to search by",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient_query()}, {"name": "count", "valueInteger": 0}]}),
            "count",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient_query()}, {"name": "count", "valueInteger": 1000}]}),
            "count",
        ),
        (
            json!({"resourceType": "Parameters", "parameter": [{"name": "SECRETVALUE"}]}),
            "Parameters.parameter",
        ),
    ];
    for (body, names) in cases {
        let (s, _, b) =
            r.f.call("POST", "/fhir/Patient/$match", Some(&body), Some(&dr))
                .await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{body}"
        );
        let diagnostics = b["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains(names),
            "{diagnostics} should name {names}"
        );
        assert!(!b.to_string().contains("SECRETVALUE"), "{b}");
    }
    // Not JSON at all.
    let (s, _, b) =
        r.f.send(
            Request::post("/fhir/Patient/$match")
                .header(header::COOKIE, &dr)
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!((s, issue_code(&b)), (StatusCode::BAD_REQUEST, "invalid"));
    assert!(r.registry.calls().is_empty(), "{:?}", r.registry.calls());
}

#[tokio::test]
async fn pix_answers_the_linked_identifiers_and_the_person() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let (s, headers, b) =
        r.f.get(
            "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:core-h%7C12345",
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(r.registry.calls(), ["linked core-h|12345 core-h dr.suzuki"]);
    assert_eq!(
        b,
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "targetIdentifier", "valueIdentifier": {"system": "urn:gateway:hospital:core-h", "value": "12345"}},
            {"name": "targetIdentifier", "valueIdentifier": {"system": "urn:gateway:hospital:clinic-a", "value": "A-0931"}},
            {"name": "person", "valueIdentifier": {"system": fhir::PERSON_SYSTEM, "value": "person-7"}}
        ]})
    );
    assert!(
        !b.to_string().contains("withheld"),
        "withheld records are not even counted"
    );
    // targetSystem keeps the identifiers of that system.
    let (_, _, b) = r
        .f
        .get(
            "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:core-h%7C12345&targetSystem=urn:gateway:hospital:clinic-a",
            Some(&dr),
        )
        .await;
    let targets: Vec<&Value> = b["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "targetIdentifier")
        .collect();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["valueIdentifier"]["value"], "A-0931");
    for bad in [
        "/fhir/Patient/$ihe-pix",
        "/fhir/Patient/$ihe-pix?sourceIdentifier=12345",
        "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:oid:1.2%7C12345",
        "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:core-h%7C",
        "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:gateway:hospital:core-h%7C1&other=x",
    ] {
        let (s, _, b) = r.f.get(bad, Some(&dr)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{bad}"
        );
    }
    assert_eq!(r.registry.calls().len(), 2);
}

#[tokio::test]
async fn the_review_queue_shows_both_records_and_is_audited_without_patient_data() {
    let r = identity_fixture();
    let admin = r.f.session("admin.ito").await;
    let (s, _, b) = r.f.get("/api/identity/review", Some(&admin)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let item = &b["items"][0];
    assert_eq!(item["id"], "rv-1");
    assert_eq!(item["score"], 4.5);
    assert!(item["probability"].as_f64().unwrap() > 0.95);
    assert_eq!(item["a"]["hospital_id"], CORE);
    assert_eq!(item["a"]["person"], "person-1");
    assert_eq!(item["b"]["patient_id"], "A-0931");
    // Every field of both records, side by side.
    for field in [
        "hospital_id",
        "patient_id",
        "family_name",
        "given_name",
        "family_kana",
        "given_kana",
        "sex",
        "birth_date",
        "address",
        "postal_code",
        "phone",
        "insurer_number",
        "insurance_symbol",
        "insurance_number",
        "insurance_branch",
    ] {
        assert!(item["a"]["record"].get(field).is_some(), "{field}");
        assert!(item["b"]["record"].get(field).is_some(), "{field}");
    }
    assert_eq!(item["a"]["record"]["family_name"], KANJI_FAMILY);
    assert_eq!(item["b"]["record"]["family_name"], "高橋");
    assert_eq!(item["b"]["record"]["phone"], Value::Null);
    let reads: Vec<_> = report_reads(&r.f.audit)
        .into_iter()
        .filter(|x| x.actor() == "admin.ito")
        .collect();
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].outcome(), Outcome::Success);
    assert!(details(&r.f.audit).contains(&"identity-review-queue".to_string()));
    let trail = r.f.audit_text();
    assert!(
        !trail.contains("ZZ") && !trail.contains("A-0931"),
        "{trail}"
    );
}

#[tokio::test]
async fn review_decisions_links_and_unlinks_pass_the_staff_member_and_the_records() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let (s, b) =
        r.f.post_json(
            "/api/identity/review/rv-1",
            json!({"verdict": "not_same"}),
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"id": "rv-1", "verdict": "not_same"}));
    let (s, _) =
        r.f.post_json(
            "/api/identity/review/rv-2",
            json!({"verdict": "same"}),
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) =
        r.f.post_json(
            "/api/identity/link",
            json!({"a": {"hospital_id": CORE, "patient_id": "12345"},
                   "b": {"hospital_id": "clinic-a", "patient_id": "A-0931"}}),
            Some(&dr),
        )
        .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"person": "person-9"})));
    let (s, _) =
        r.f.post_json(
            "/api/identity/unlink",
            json!({"hospital_id": "clinic-a", "patient_id": "A-0931"}),
            Some(&dr),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        r.registry.calls(),
        [
            "decide rv-1 NotSame dr.suzuki",
            "decide rv-2 Same dr.suzuki",
            "link core-h|12345 clinic-a|A-0931 dr.suzuki",
            "unlink clinic-a|A-0931 dr.suzuki",
        ]
    );
    // Bad bodies reach no registry.
    for (path, body) in [
        ("/api/identity/review/rv-1", json!({"verdict": "maybe"})),
        ("/api/identity/review/rv-1", json!({})),
        (
            "/api/identity/link",
            json!({"a": {"hospital_id": CORE, "patient_id": "1"}}),
        ),
        (
            "/api/identity/link",
            json!({"a": {"hospital_id": CORE, "patient_id": "1"}, "b": {"hospital_id": CORE, "patient_id": "1"}}),
        ),
        ("/api/identity/link", json!({"a": "x", "b": "y"})),
        (
            "/api/identity/unlink",
            json!({"hospital_id": "", "patient_id": "1"}),
        ),
        (
            "/api/identity/unlink",
            json!({"hospital_id": "h", "patient_id": "a|b"}),
        ),
        ("/api/identity/unlink", json!([1])),
    ] {
        let (s, b) = r.f.post_json(path, body.clone(), Some(&dr)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{path} {body}"
        );
    }
    // A review id that cannot be one is no such review item.
    let (s, b) =
        r.f.post_json(
            "/api/identity/review/a%20b",
            json!({"verdict": "same"}),
            Some(&dr),
        )
        .await;
    assert_eq!((s, issue_code(&b)), (StatusCode::NOT_FOUND, "not-found"));
    assert_eq!(r.registry.calls().len(), 4);
}

#[tokio::test]
async fn a_posted_consent_becomes_grants_and_is_answered_as_recorded() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let (s, headers, b) =
        r.f.call("POST", "/fhir/Consent", Some(&consent_body()), Some(&dr))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(headers[header::LOCATION], "Consent/c-3");
    assert_eq!(r.registry.calls(), ["record_consent dr.suzuki"]);
    let new = r.registry.new_consent.lock().unwrap().clone().unwrap();
    assert_eq!(
        new,
        NewConsent {
            patient: key(CORE, "12345"),
            grants: vec![
                Grant {
                    grantee: Grantee::Hospital("clinic-a".into()),
                    kinds: vec![DataKind::Results, DataKind::Dose],
                },
                Grant {
                    grantee: Grantee::Region,
                    kinds: vec![DataKind::Identity],
                },
            ],
            source: ConsentSource::Kiosk,
        }
    );
    assert_eq!(b["resourceType"], "Consent");
    assert_eq!(b["id"], "c-3");
    assert_eq!(b["status"], "active");
    assert_eq!(b["scope"]["coding"][0]["code"], "patient-privacy");
    assert_eq!(b["category"][0]["coding"][0]["code"], "59284-0");
    assert_eq!(
        b["patient"]["identifier"],
        json!({"system": "urn:gateway:hospital:core-h", "value": "12345"})
    );
    assert_eq!(b["performer"][0]["display"], "dr.suzuki");
    assert_eq!(b["dateTime"], "2026-12-01T00:00:00Z");
    assert_eq!(b["provision"]["type"], "deny");
    let permits = b["provision"]["provision"].as_array().unwrap();
    assert_eq!(permits[0]["type"], "permit");
    assert_eq!(
        permits[0]["actor"][0]["reference"]["identifier"],
        json!({"system": "urn:gateway:hospital", "value": "clinic-a"})
    );
    assert_eq!(
        permits[0]["class"],
        json!([{"system": "urn:gateway:data-kind", "code": "results"}, {"system": "urn:gateway:data-kind", "code": "dose"}])
    );
    assert_eq!(
        permits[1]["actor"][0]["reference"]["identifier"]["system"],
        "urn:gateway:region"
    );
    // What the kiosk answers, it reads back.
    assert_eq!(fhir::consent_to_new(&b).unwrap(), new);

    // One grant as a top-level permit; `all` is every kind.
    let one = json!({"resourceType": "Consent",
        "patient": {"identifier": {"system": "urn:gateway:hospital:clinic-a", "value": "A-0931"}},
        "provision": {"type": "permit",
            "actor": [{"reference": {"identifier": {"system": "urn:gateway:region", "value": "region"}}}],
            "class": [{"system": "urn:gateway:data-kind", "code": "all"}]}});
    let (s, _, b) =
        r.f.call("POST", "/fhir/Consent", Some(&one), Some(&dr))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let new = r.registry.new_consent.lock().unwrap().clone().unwrap();
    assert_eq!(new.patient, key("clinic-a", "A-0931"));
    assert_eq!(
        new.grants,
        vec![Grant {
            grantee: Grantee::Region,
            kinds: vec![
                DataKind::Identity,
                DataKind::Results,
                DataKind::Reactions,
                DataKind::Dose,
                DataKind::Images
            ],
        }]
    );
}

#[tokio::test]
async fn malformed_consents_are_400_and_reach_no_registry() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    let with = |pointer: &str, v: Value| {
        let mut c = consent_body();
        *c.pointer_mut(pointer).unwrap() = v;
        c
    };
    let cases = [
        json!({"resourceType": "Patient"}),
        json!([1, 2]),
        with("/status", json!("inactive")),
        with("/patient", json!({"reference": "Patient/1"})),
        with(
            "/patient/identifier",
            json!({"system": "urn:oid:1", "value": "1"}),
        ),
        with("/provision", Value::Null),
        with("/provision/provision", json!([])),
        with("/provision/type", json!("SECRETVALUE")),
        with("/provision/provision/0/type", json!("deny")),
        with("/provision/provision/0/actor", json!([])),
        with(
            "/provision/provision/0/actor/0/reference/identifier/system",
            json!("urn:oid:SECRETVALUE"),
        ),
        with(
            "/provision/provision/0/actor/0/reference/identifier/value",
            json!(""),
        ),
        with("/provision/provision/0/class", json!([])),
        with("/provision/provision/0/class/0/code", json!("SECRETVALUE")),
        with(
            "/provision/provision/0/class/0/system",
            json!("http://loinc.org"),
        ),
    ];
    for body in cases {
        let (s, _, b) =
            r.f.call("POST", "/fhir/Consent", Some(&body), Some(&dr))
                .await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{body}"
        );
        assert!(!b.to_string().contains("SECRETVALUE"), "{b}");
    }
    assert!(r.registry.calls().is_empty(), "{:?}", r.registry.calls());
}

#[tokio::test]
async fn consents_are_listed_newest_first_and_revoked_ones_are_inactive() {
    let r = identity_fixture();
    let admin = r.f.session("admin.ito").await;
    let (s, _, b) =
        r.f.get(
            "/fhir/Consent?patient=urn:gateway:hospital:core-h%7C12345",
            Some(&admin),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["type"].as_str(), b["total"].as_u64()),
        (Some("searchset"), Some(2))
    );
    let first = &b["entry"][0]["resource"];
    let second = &b["entry"][1]["resource"];
    assert_eq!(
        (first["id"].as_str(), first["status"].as_str()),
        (Some("c-2"), Some("active"))
    );
    assert_eq!(
        (second["id"].as_str(), second["status"].as_str()),
        (Some("c-1"), Some("inactive"))
    );
    let ext = |c: &Value, url: &str| {
        c["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == url)
            .cloned()
    };
    assert_eq!(
        ext(second, fhir::REVOKED_BY).unwrap()["valueString"],
        "admin.ito"
    );
    assert!(ext(first, fhir::REVOKED_BY).is_none());
    assert_eq!(
        ext(first, fhir::CONSENT_SOURCE).unwrap()["valueCode"],
        "kiosk"
    );
    assert_eq!(r.registry.calls(), ["consents core-h|12345"]);
    assert!(details(&r.f.audit).contains(&"consents".to_string()));
    for bad in [
        "/fhir/Consent",
        "/fhir/Consent?patient=12345",
        "/fhir/Consent?patient=urn:gateway:hospital:core-h%7C12345&status=active",
    ] {
        let (s, _, b) = r.f.get(bad, Some(&admin)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::BAD_REQUEST, "invalid"),
            "{bad}"
        );
    }

    let (s, headers, b) =
        r.f.call("POST", "/fhir/Consent/c-2/$revoke", None, Some(&admin))
            .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/fhir+json");
    assert_eq!(
        (b["id"].as_str(), b["status"].as_str()),
        (Some("c-2"), Some("inactive"))
    );
    assert_eq!(
        ext(&b, fhir::REVOKED_AT).unwrap()["valueDateTime"],
        "2026-12-04T00:00:00Z"
    );
    assert_eq!(
        r.registry.calls().last().unwrap(),
        "revoke_consent c-2 admin.ito"
    );
    let (s, _, b) =
        r.f.call(
            "POST",
            "/fhir/Consent/no%20such/$revoke",
            None,
            Some(&admin),
        )
        .await;
    assert_eq!((s, issue_code(&b)), (StatusCode::NOT_FOUND, "not-found"));
}

#[tokio::test]
async fn registry_errors_are_404_409_and_503() {
    let r = identity_fixture();
    let dr = r.f.session("dr.suzuki").await;
    for (error, status, code) in [
        (RegistryError::NotFound, StatusCode::NOT_FOUND, "not-found"),
        (
            RegistryError::Conflict("the review item was decided already"),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            RegistryError::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
        ),
    ] {
        r.registry.failing(Some(error.clone()));
        for (method, path, body) in identity_routes() {
            let (s, _, b) = r.f.call(method, path, body.as_ref(), Some(&dr)).await;
            assert_eq!((s, issue_code(&b)), (status, code), "{path} {error:?}");
            if let RegistryError::Conflict(why) = &error {
                assert_eq!(b["issue"][0]["diagnostics"], *why);
            }
        }
    }
    // A review queue or consent list the registry could not give is audited as a failure.
    let failures = report_reads(&r.f.audit)
        .into_iter()
        .filter(|x| x.outcome() == Outcome::Failure)
        .count();
    assert_eq!(failures, 6);
}

/// Reads the registry cannot attribute are not answered when they cannot be audited.
#[tokio::test]
async fn a_review_queue_whose_read_cannot_be_audited_is_not_answered() {
    let mut r = identity_fixture();
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
    .with_identity(Arc::clone(&r.registry) as Arc<dyn IdentityService>, CORE)
    .router();
    let dr = r.f.session("dr.suzuki").await;
    let held = gateway_durable::LockedFile::lock(
        &audit_dir.join("head"),
        &audit_dir.join("audit.lock"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    for path in [
        "/api/identity/review",
        "/fhir/Consent?patient=urn:gateway:hospital:core-h%7C12345",
    ] {
        let (s, _, b) = r.f.get(path, Some(&dr)).await;
        assert_eq!(
            (s, issue_code(&b)),
            (StatusCode::SERVICE_UNAVAILABLE, "transient"),
            "{path}"
        );
        assert!(!b.to_string().contains("髙橋"), "{b}");
    }
    drop(held);
}

#[tokio::test]
async fn the_openapi_document_describes_the_identity_routes() {
    let f = fixture(false);
    let (_, _, doc) = f.get("/openapi.json", None).await;
    for (path, method, statuses) in [
        (
            "/fhir/Patient/$match",
            "post",
            &["200", "400", "401", "403", "404", "503"][..],
        ),
        (
            "/fhir/Patient/$ihe-pix",
            "get",
            &["200", "400", "401", "403", "404", "503"][..],
        ),
        (
            "/api/identity/review",
            "get",
            &["200", "401", "403", "404", "503"][..],
        ),
        (
            "/api/identity/review/{id}",
            "post",
            &["200", "400", "401", "403", "404", "409", "503"][..],
        ),
        (
            "/api/identity/link",
            "post",
            &["200", "400", "401", "403", "404", "409", "503"][..],
        ),
        (
            "/api/identity/unlink",
            "post",
            &["204", "400", "401", "403", "404", "409", "503"][..],
        ),
        (
            "/fhir/Consent",
            "get",
            &["200", "400", "401", "403", "404", "503"][..],
        ),
        (
            "/fhir/Consent",
            "post",
            &["201", "400", "401", "403", "404", "409", "503"][..],
        ),
        (
            "/fhir/Consent/{id}/$revoke",
            "post",
            &["200", "401", "403", "404", "409", "503"][..],
        ),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path}");
        for status in statuses {
            assert!(
                op["responses"].get(*status).is_some(),
                "{method} {path} {status}"
            );
        }
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "MatchParameters",
        "PatientBundle",
        "PixParameters",
        "ReviewQueue",
        "Consent",
        "ConsentBundle",
    ] {
        assert!(schemas.get(name).is_some(), "{name}");
    }
}

#[tokio::test]
async fn the_identity_section_and_its_script_are_served_and_every_element_it_uses_exists() {
    let f = fixture(false);
    let (status, headers, bytes) = f
        .send_raw(Request::get("/identity.js").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let js = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(js.contains("/fhir/Patient/$match") && js.contains("/api/identity/review"));
    assert!(
        !js.contains("innerHTML"),
        "patient data is set as text only"
    );
    let (_, _, html) = f
        .send_raw(Request::get("/").body(Body::empty()).unwrap())
        .await;
    let html = String::from_utf8(html.to_vec()).unwrap();
    assert!(html.contains("<script src=\"/identity.js\" defer></script>"));
    assert!(html.contains("名寄せ / Identity") && html.contains("公開同意"));
    assert!(js.contains("同一人物 / Same person") && js.contains("別人 / Not the same"));
    let ids = regex::Regex::new(r#"\$\("([A-Za-z0-9-]+)"\)"#).unwrap();
    let mut used = 0;
    for c in ids.captures_iter(&js) {
        let id = &c[1];
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "#{id} is not on the page"
        );
        used += 1;
    }
    assert!(used > 20, "{used}");
}
