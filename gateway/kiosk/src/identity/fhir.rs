//! FHIR R4 shapes of the identity registry's records and consents, in one place: a
//! `gateway_identity::Record` to and from a Patient, a `gateway_registry::Consent` to a
//! Consent resource and a posted Consent to a [`NewConsent`], a patient identifier to and
//! from a [`SourceKey`], the FS match weight to a `search.score`.
//!
//! **Patient** (JP Core conventions):
//! - `identifier`: system `urn:gateway:hospital:{hospital_id}`, value = the patient id
//!   ([`HOSPITAL_SYSTEM_PREFIX`]); identifiers of other systems are ignored on input.
//! - `name`: HumanName `family` and `given` (given parts joined by a space), or `text` alone
//!   (an unsplit name, read into the family field). The representation extension
//!   [`REPRESENTATION`] says which is which: `valueCode` `IDE` = the written name (kanji),
//!   `SYL` = the reading (kana); `ABC` (romaji) has no field in a record and is ignored. A
//!   name without the extension is read as `SYL` when all its letters are kana, else `IDE`.
//!   Output names always carry the extension (`use` `official`).
//! - `gender` `male|female|other|unknown` <-> sex `M|F|O|U` (HL7 table 0001; on output `男`,
//!   `1`, `女`, `2` are understood too).
//! - `birthDate` (a FHIR date) <-> birth date. A record's date that is not a FHIR date (an era
//!   date as the hospital typed it) is answered in the extension [`BIRTH_DATE_AS_RECORDED`]
//!   (`valueString`) instead of `birthDate`.
//! - `address[0]`: `text` (else `state`, `city`, `district` and the `line`s, joined) <->
//!   address; `postalCode` <-> postal code.
//! - `telecom`: the first `system` `phone` (or without a system) <-> phone.
//! - Insurance (a FHIR Coverage has no place in a Patient): the complex extension
//!   [`INSURANCE`] with `insurer-number`, `symbol`, `number`, `branch` (`valueString`).
//! - Answers carry the person the record belongs to: extension [`PERSON`]
//!   (`valueIdentifier`, system [`PERSON_SYSTEM`]), and `meta.lastUpdated`.
//!
//! **Score**: the matcher's score is a Fellegi-Sunter match weight `w` (log2 of the
//! likelihood ratio). `search.score` = `1 / (1 + 2^-w)`: the probability of a match at even
//! prior odds (0.5 at `w` = 0, 0.999 at about `w` = 10), rounded to 4 decimals; the weight
//! itself is in the entry's extension [`MATCH_WEIGHT`]. `match-grade`: link `certain`, review
//! `probable`, distinct `possible`.
//!
//! **Consent** (R4): `status` `active` | `inactive` (revoked), `scope` `patient-privacy`,
//! `category` LOINC 59284-0, `policyRule` `OPTIN`, `patient.identifier`, `dateTime` (when
//! recorded), `performer[0].display` (who recorded it), extensions [`CONSENT_SOURCE`]
//! (`kiosk` | `hl7`), [`REVOKED_BY`] and [`REVOKED_AT`]. `provision` is a base `deny` whose
//! nested `permit` provisions are the grants: `actor[].reference.identifier` is the grantee
//! (system [`GRANTEE_HOSPITAL_SYSTEM`] + hospital id, or [`GRANTEE_REGION_SYSTEM`] for the
//! whole region), `class[]` the kinds of data (system [`DATA_KIND_SYSTEM`], codes
//! `identity`, `results`, `reactions`, `dose`, `images`; `all` on input = all five). A posted
//! Consent may also put one grant in a top-level `permit` provision.

use gateway_identity::{Decision, Record};
use gateway_registry::{
    Consent, ConsentSource, ConsentStatus, DataKind, Grant, Grantee, NewConsent, SourceKey,
    SourceRecord,
};
use serde_json::{Map, Value, json};

/// Patient identifier systems: `urn:gateway:hospital:{hospital_id}`.
pub const HOSPITAL_SYSTEM_PREFIX: &str = "urn:gateway:hospital:";
/// The person a record belongs to (extension on an answered Patient).
pub const PERSON: &str = "urn:gateway:identity:person";
/// The system of person ids.
pub const PERSON_SYSTEM: &str = "urn:gateway:person";
/// JP Core's name representation extension (IDE kanji, SYL kana, ABC romaji).
pub const REPRESENTATION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
/// A birth date that is not a FHIR date, as the hospital recorded it.
pub const BIRTH_DATE_AS_RECORDED: &str = "urn:gateway:identity:birth-date-as-recorded";
/// Insurance card fields (complex extension).
pub const INSURANCE: &str = "urn:gateway:identity:insurance";
/// FHIR's match grade (on `Bundle.entry.search`).
pub const MATCH_GRADE: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";
/// The FS match weight behind `search.score` (on `Bundle.entry.search`).
pub const MATCH_WEIGHT: &str = "urn:gateway:identity:match-weight";
/// Where a consent was recorded.
pub const CONSENT_SOURCE: &str = "urn:gateway:consent:source";
pub const REVOKED_BY: &str = "urn:gateway:consent:revoked-by";
pub const REVOKED_AT: &str = "urn:gateway:consent:revoked-at";
/// A grantee hospital (identifier value = its hospital id).
pub const GRANTEE_HOSPITAL_SYSTEM: &str = "urn:gateway:hospital";
/// The whole region as grantee (identifier value `region`).
pub const GRANTEE_REGION_SYSTEM: &str = "urn:gateway:region";
/// Kinds of data in `provision.class`.
pub const DATA_KIND_SYSTEM: &str = "urn:gateway:data-kind";

/// Longest string read from any element (ids, names, addresses...).
const MAX_TEXT: usize = 256;

/// A malformed resource; the text names the element, never its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidResource(pub &'static str);

type Parsed<T> = Result<T, InvalidResource>;

/// The data kinds in their FHIR code order.
pub const DATA_KINDS: [(DataKind, &str); 5] = [
    (DataKind::Identity, "identity"),
    (DataKind::Results, "results"),
    (DataKind::Reactions, "reactions"),
    (DataKind::Dose, "dose"),
    (DataKind::Images, "images"),
];

fn kind_code(kind: DataKind) -> &'static str {
    DATA_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("identity", |(_, c)| c)
}

/// A string element: absent/null = `None`, a string of 1..=256 characters (trimmed; empty =
/// `None`), anything else refused naming `what`.
fn text(v: Option<&Value>, what: &'static str) -> Parsed<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.chars().count() > MAX_TEXT || s.chars().any(char::is_control) {
                Err(InvalidResource(what))
            } else if s.is_empty() {
                Ok(None)
            } else {
                Ok(Some(s.to_string()))
            }
        }
        Some(_) => Err(InvalidResource(what)),
    }
}

/// An array element: absent/null = empty, else an array (refused naming `what`).
fn array<'v>(v: Option<&'v Value>, what: &'static str) -> Parsed<&'v [Value]> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a.as_slice()),
        Some(_) => Err(InvalidResource(what)),
    }
}

// ---- identifiers ----

/// A hospital id or patient id: 1..=64 characters, no control character, no `|`.
fn valid_key_part(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= 64 && !s.chars().any(|c| c.is_control() || c == '|')
}

/// `urn:gateway:hospital:{h}` + value -> a source key.
pub fn source_key(system: &str, value: &str) -> Option<SourceKey> {
    let hospital = system.strip_prefix(HOSPITAL_SYSTEM_PREFIX)?;
    (valid_key_part(hospital) && valid_key_part(value)).then(|| SourceKey {
        hospital_id: hospital.to_string(),
        patient_id: value.to_string(),
    })
}

/// A token search value `urn:gateway:hospital:{h}|{patient id}`.
pub fn parse_token(token: &str) -> Option<SourceKey> {
    let (system, value) = token.split_once('|')?;
    source_key(system, value)
}

/// The FHIR Identifier of a source record.
pub fn identifier(key: &SourceKey) -> Value {
    json!({"system": format!("{HOSPITAL_SYSTEM_PREFIX}{}", key.hospital_id), "value": key.patient_id})
}

/// A FHIR Identifier that must be a hospital's patient identifier.
fn identifier_key(v: &Value, what: &'static str) -> Parsed<SourceKey> {
    let system = text(v.get("system"), what)?.ok_or(InvalidResource(what))?;
    let value = text(v.get("value"), what)?.ok_or(InvalidResource(what))?;
    source_key(&system, &value).ok_or(InvalidResource(what))
}

/// A `{hospital_id, patient_id}` JSON object (the review API's shape).
pub fn key_object(v: Option<&Value>, what: &'static str) -> Parsed<SourceKey> {
    let v = v.filter(|v| v.is_object()).ok_or(InvalidResource(what))?;
    let hospital = text(v.get("hospital_id"), what)?.ok_or(InvalidResource(what))?;
    let patient = text(v.get("patient_id"), what)?.ok_or(InvalidResource(what))?;
    (valid_key_part(&hospital) && valid_key_part(&patient))
        .then_some(SourceKey {
            hospital_id: hospital,
            patient_id: patient,
        })
        .ok_or(InvalidResource(what))
}

// ---- Patient <-> Record ----

/// Kana (hiragana, katakana, half-width katakana), the long vowel mark, middle dots, spaces.
fn is_kana_text(s: &str) -> bool {
    s.chars().any(|c| !c.is_whitespace())
        && s.chars().all(|c| {
            c.is_whitespace()
                || matches!(c, '\u{3041}'..='\u{309F}' | '\u{30A0}'..='\u{30FF}' | '\u{FF65}'..='\u{FF9F}' | '\u{31F0}'..='\u{31FF}')
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Representation {
    Ideographic,
    Syllabic,
    Alphabetic,
}

fn representation(name: &Value) -> Parsed<Option<Representation>> {
    for e in array(name.get("extension"), "Patient.name.extension")? {
        if e.get("url").and_then(Value::as_str) == Some(REPRESENTATION) {
            return match e.get("valueCode").and_then(Value::as_str) {
                Some("IDE") => Ok(Some(Representation::Ideographic)),
                Some("SYL") => Ok(Some(Representation::Syllabic)),
                Some("ABC") => Ok(Some(Representation::Alphabetic)),
                _ => Err(InvalidResource(
                    "Patient.name.extension (iso21090-EN-representation takes IDE, SYL or ABC)",
                )),
            };
        }
    }
    Ok(None)
}

/// `(family, given)` of a HumanName: family + given parts, or the unsplit text as family.
fn name_parts(name: &Value) -> Parsed<(Option<String>, Option<String>)> {
    let family = text(name.get("family"), "Patient.name.family")?;
    let mut given = Vec::new();
    for g in array(name.get("given"), "Patient.name.given")? {
        if let Some(g) = text(Some(g), "Patient.name.given")? {
            given.push(g);
        }
    }
    let given = (!given.is_empty()).then(|| given.join(" "));
    if given.as_ref().is_some_and(|g| g.chars().count() > MAX_TEXT) {
        return Err(InvalidResource("Patient.name.given"));
    }
    if family.is_none() && given.is_none() {
        return Ok((text(name.get("text"), "Patient.name.text")?, None));
    }
    Ok((family, given))
}

fn set_if_none(field: &mut Option<String>, value: Option<String>) {
    if field.is_none() {
        *field = value;
    }
}

/// Reads a FHIR Patient into a record (see the module docs for each element).
pub fn patient_to_record(p: &Value) -> Parsed<Record> {
    if !p.is_object() || p.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return Err(InvalidResource("resource must be a FHIR Patient"));
    }
    let mut r = Record::default();
    for id in array(p.get("identifier"), "Patient.identifier")? {
        let system = text(id.get("system"), "Patient.identifier.system")?;
        let value = text(id.get("value"), "Patient.identifier.value")?;
        if let (Some(system), Some(value)) = (system, value)
            && system.starts_with(HOSPITAL_SYSTEM_PREFIX)
            && r.hospital_id.is_none()
        {
            let key = source_key(&system, &value)
                .ok_or(InvalidResource("Patient.identifier (urn:gateway:hospital:{id} and a patient id of 1-64 characters)"))?;
            r.hospital_id = Some(key.hospital_id);
            r.patient_id = Some(key.patient_id);
        }
    }
    let names = array(p.get("name"), "Patient.name")?;
    // Marked names first, so an unmarked one only fills what they left empty.
    let mut unmarked = Vec::new();
    for name in names {
        if !name.is_object() {
            return Err(InvalidResource("Patient.name"));
        }
        let (family, given) = name_parts(name)?;
        match representation(name)? {
            Some(Representation::Ideographic) => {
                set_if_none(&mut r.family_name, family);
                set_if_none(&mut r.given_name, given);
            }
            Some(Representation::Syllabic) => {
                set_if_none(&mut r.family_kana, family);
                set_if_none(&mut r.given_kana, given);
            }
            Some(Representation::Alphabetic) => {}
            None => unmarked.push((family, given)),
        }
    }
    for (family, given) in unmarked {
        let all = format!(
            "{}{}",
            family.as_deref().unwrap_or(""),
            given.as_deref().unwrap_or("")
        );
        if is_kana_text(&all) {
            if r.family_kana.is_none() && r.given_kana.is_none() {
                r.family_kana = family;
                r.given_kana = given;
            }
        } else if r.family_name.is_none() && r.given_name.is_none() {
            r.family_name = family;
            r.given_name = given;
        }
    }
    r.sex = match text(p.get("gender"), "Patient.gender")?.as_deref() {
        None => None,
        Some("male") => Some("M".into()),
        Some("female") => Some("F".into()),
        Some("other") => Some("O".into()),
        Some("unknown") => Some("U".into()),
        Some(_) => {
            return Err(InvalidResource(
                "Patient.gender (male, female, other or unknown)",
            ));
        }
    };
    r.birth_date = text(p.get("birthDate"), "Patient.birthDate")?;
    if r.birth_date.as_deref().is_some_and(|d| !is_fhir_date(d)) {
        return Err(InvalidResource(
            "Patient.birthDate (a FHIR date: YYYY, YYYY-MM or YYYY-MM-DD)",
        ));
    }
    if let Some(a) = array(p.get("address"), "Patient.address")?.first() {
        if !a.is_object() {
            return Err(InvalidResource("Patient.address"));
        }
        r.address = match text(a.get("text"), "Patient.address.text")? {
            Some(t) => Some(t),
            None => {
                let mut parts = Vec::new();
                for key in ["state", "city", "district"] {
                    parts.extend(text(a.get(key), "Patient.address")?);
                }
                for l in array(a.get("line"), "Patient.address.line")? {
                    parts.extend(text(Some(l), "Patient.address.line")?);
                }
                let joined = parts.concat();
                if joined.chars().count() > MAX_TEXT {
                    return Err(InvalidResource("Patient.address"));
                }
                (!joined.is_empty()).then_some(joined)
            }
        };
        r.postal_code = text(a.get("postalCode"), "Patient.address.postalCode")?;
    }
    for t in array(p.get("telecom"), "Patient.telecom")? {
        let system = text(t.get("system"), "Patient.telecom.system")?;
        if system.as_deref().is_none_or(|s| s == "phone") {
            r.phone = text(t.get("value"), "Patient.telecom.value")?;
            if r.phone.is_some() {
                break;
            }
        }
    }
    for e in array(p.get("extension"), "Patient.extension")? {
        if e.get("url").and_then(Value::as_str) != Some(INSURANCE) {
            continue;
        }
        for part in array(e.get("extension"), "Patient.extension (insurance)")? {
            let value = text(part.get("valueString"), "Patient.extension (insurance)")?;
            match part.get("url").and_then(Value::as_str) {
                Some("insurer-number") => r.insurer_number = value,
                Some("symbol") => r.insurance_symbol = value,
                Some("number") => r.insurance_number = value,
                Some("branch") => r.insurance_branch = value,
                _ => {
                    return Err(InvalidResource(
                        "Patient.extension (insurance parts: insurer-number, symbol, number, branch)",
                    ));
                }
            }
        }
    }
    Ok(r)
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` with a plausible month and day.
pub fn is_fhir_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    let in_range = |p: &str, hi: u32| p.parse::<u32>().is_ok_and(|v| (1..=hi).contains(&v));
    match parts.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && digits(m, 2) && in_range(m, 12),
        [y, m, d] => {
            digits(y, 4) && digits(m, 2) && in_range(m, 12) && digits(d, 2) && in_range(d, 31)
        }
        _ => false,
    }
}

fn human_name(family: Option<&String>, given: Option<&String>, code: &str) -> Option<Value> {
    if family.is_none() && given.is_none() {
        return None;
    }
    let mut n = Map::new();
    n.insert(
        "extension".into(),
        json!([{"url": REPRESENTATION, "valueCode": code}]),
    );
    n.insert("use".into(), json!("official"));
    if let Some(f) = family {
        n.insert("family".into(), json!(f));
    }
    if let Some(g) = given {
        n.insert("given".into(), json!([g]));
    }
    Some(Value::Object(n))
}

fn gender(sex: &str) -> &'static str {
    match sex.trim() {
        "M" | "m" | "male" | "男" | "1" => "male",
        "F" | "f" | "female" | "女" | "2" => "female",
        "O" | "o" | "other" => "other",
        _ => "unknown",
    }
}

/// The FHIR Patient of a source record, with its person.
pub fn record_to_patient(s: &SourceRecord) -> Value {
    let r = &s.record;
    let mut p = Map::new();
    p.insert("resourceType".into(), json!("Patient"));
    let mut extensions = vec![json!({
        "url": PERSON,
        "valueIdentifier": {"system": PERSON_SYSTEM, "value": s.person.0},
    })];
    let insurance: Vec<Value> = [
        ("insurer-number", &r.insurer_number),
        ("symbol", &r.insurance_symbol),
        ("number", &r.insurance_number),
        ("branch", &r.insurance_branch),
    ]
    .into_iter()
    .filter_map(|(url, v)| v.as_ref().map(|v| json!({"url": url, "valueString": v})))
    .collect();
    if !insurance.is_empty() {
        extensions.push(json!({"url": INSURANCE, "extension": insurance}));
    }
    if let Some(d) = r.birth_date.as_ref().filter(|d| !is_fhir_date(d)) {
        extensions.push(json!({"url": BIRTH_DATE_AS_RECORDED, "valueString": d}));
    }
    p.insert("extension".into(), Value::Array(extensions));
    if !s.updated.is_empty() {
        p.insert("meta".into(), json!({"lastUpdated": s.updated}));
    }
    p.insert("identifier".into(), json!([identifier(&s.key)]));
    let names: Vec<Value> = [
        human_name(r.family_name.as_ref(), r.given_name.as_ref(), "IDE"),
        human_name(r.family_kana.as_ref(), r.given_kana.as_ref(), "SYL"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !names.is_empty() {
        p.insert("name".into(), Value::Array(names));
    }
    if let Some(phone) = &r.phone {
        p.insert(
            "telecom".into(),
            json!([{"system": "phone", "value": phone}]),
        );
    }
    if let Some(sex) = &r.sex {
        p.insert("gender".into(), json!(gender(sex)));
    }
    if let Some(d) = r.birth_date.as_ref().filter(|d| is_fhir_date(d)) {
        p.insert("birthDate".into(), json!(d));
    }
    if r.address.is_some() || r.postal_code.is_some() {
        let mut a = Map::new();
        if let Some(t) = &r.address {
            a.insert("text".into(), json!(t));
        }
        if let Some(pc) = &r.postal_code {
            a.insert("postalCode".into(), json!(pc));
        }
        p.insert("address".into(), json!([Value::Object(a)]));
    }
    Value::Object(p)
}

/// `search.score` of a match weight: `1 / (1 + 2^-w)`, 4 decimals, 0 for NaN.
pub fn score(weight: f64) -> f64 {
    if weight.is_nan() {
        return 0.0;
    }
    let p = 1.0 / (1.0 + (-weight).exp2());
    ((p * 10_000.0).round() / 10_000.0).clamp(0.0, 1.0)
}

/// FHIR `match-grade` of a decision.
pub fn match_grade(d: Decision) -> &'static str {
    match d {
        Decision::Link => "certain",
        Decision::Review => "probable",
        Decision::Distinct => "possible",
    }
}

/// A finite JSON number (NaN and infinities, which JSON cannot carry, as 0 / +-1e308).
pub fn finite(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-1e308, 1e308)
    }
}

// ---- Consent ----

fn grantee_actor(g: &Grantee) -> Value {
    let recipient = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
        "code": "IRCP", "display": "information recipient"}]});
    let reference = match g {
        Grantee::Region => json!({"type": "Organization",
            "identifier": {"system": GRANTEE_REGION_SYSTEM, "value": "region"},
            "display": "地域全体 / the whole region"}),
        Grantee::Hospital(h) => json!({"type": "Organization",
            "identifier": {"system": GRANTEE_HOSPITAL_SYSTEM, "value": h}}),
    };
    json!({"role": recipient, "reference": reference})
}

/// The FHIR Consent of a recorded consent.
pub fn consent_resource(c: &Consent) -> Value {
    let provisions: Vec<Value> = c
        .grants
        .iter()
        .map(|g| {
            json!({
                "type": "permit",
                "actor": [grantee_actor(&g.grantee)],
                "class": g.kinds.iter().map(|k| json!({"system": DATA_KIND_SYSTEM, "code": kind_code(*k)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let source = match c.source {
        ConsentSource::Kiosk => "kiosk",
        ConsentSource::Hl7 => "hl7",
    };
    let mut extensions = vec![json!({"url": CONSENT_SOURCE, "valueCode": source})];
    if let Some(by) = &c.revoked_by {
        extensions.push(json!({"url": REVOKED_BY, "valueString": by}));
    }
    if let Some(at) = &c.revoked_at {
        extensions.push(json!({"url": REVOKED_AT, "valueDateTime": at}));
    }
    json!({
        "resourceType": "Consent",
        "id": c.id,
        "extension": extensions,
        "status": match c.status { ConsentStatus::Active => "active", ConsentStatus::Revoked => "inactive" },
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"identifier": identifier(&c.patient)},
        "dateTime": c.recorded_at,
        "performer": [{"display": c.recorded_by}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "deny", "provision": provisions},
    })
}

fn parse_grant(p: &Value) -> Parsed<Grant> {
    if !p.is_object() {
        return Err(InvalidResource("Consent.provision"));
    }
    if p.get("type").and_then(Value::as_str) != Some("permit") {
        return Err(InvalidResource(
            "Consent.provision.provision.type (each grant is a permit)",
        ));
    }
    let actors = array(p.get("actor"), "Consent.provision.actor")?;
    let [actor] = actors else {
        return Err(InvalidResource(
            "Consent.provision.actor (exactly one grantee per permit)",
        ));
    };
    let id = actor
        .get("reference")
        .and_then(|r| r.get("identifier"))
        .ok_or(InvalidResource(
            "Consent.provision.actor.reference.identifier",
        ))?;
    let system = text(
        id.get("system"),
        "Consent.provision.actor.reference.identifier.system",
    )?;
    let grantee = match system.as_deref() {
        Some(GRANTEE_REGION_SYSTEM) => Grantee::Region,
        Some(GRANTEE_HOSPITAL_SYSTEM) => {
            let h = text(
                id.get("value"),
                "Consent.provision.actor.reference.identifier.value",
            )?
            .filter(|h| valid_key_part(h))
            .ok_or(InvalidResource(
                "Consent.provision.actor.reference.identifier.value (a hospital id)",
            ))?;
            Grantee::Hospital(h)
        }
        _ => {
            return Err(InvalidResource(
                "Consent.provision.actor.reference.identifier.system (urn:gateway:hospital or urn:gateway:region)",
            ));
        }
    };
    let mut kinds = Vec::new();
    for class in array(p.get("class"), "Consent.provision.class")? {
        if class.get("system").and_then(Value::as_str) != Some(DATA_KIND_SYSTEM) {
            return Err(InvalidResource(
                "Consent.provision.class.system (urn:gateway:data-kind)",
            ));
        }
        let code = class.get("code").and_then(Value::as_str);
        let found: Vec<DataKind> = match code {
            Some("all") => DATA_KINDS.iter().map(|(k, _)| *k).collect(),
            Some(c) => DATA_KINDS
                .iter()
                .filter(|(_, name)| *name == c)
                .map(|(k, _)| *k)
                .collect(),
            None => Vec::new(),
        };
        if found.is_empty() {
            return Err(InvalidResource(
                "Consent.provision.class.code (identity, results, reactions, dose, images or all)",
            ));
        }
        for k in found {
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
    }
    if kinds.is_empty() {
        return Err(InvalidResource(
            "Consent.provision.class (at least one kind of data)",
        ));
    }
    kinds.sort();
    Ok(Grant { grantee, kinds })
}

/// Reads a posted FHIR Consent (recorded at the kiosk).
pub fn consent_to_new(c: &Value) -> Parsed<NewConsent> {
    if !c.is_object() || c.get("resourceType").and_then(Value::as_str) != Some("Consent") {
        return Err(InvalidResource("send a FHIR Consent"));
    }
    match c.get("status").and_then(Value::as_str) {
        None | Some("active") => {}
        Some(_) => {
            return Err(InvalidResource(
                "Consent.status (a new consent is active; revoke with $revoke)",
            ));
        }
    }
    let patient = c
        .get("patient")
        .and_then(|p| p.get("identifier"))
        .ok_or(InvalidResource(
            "Consent.patient.identifier (urn:gateway:hospital:{id} and the patient id)",
        ))
        .and_then(|id| {
            identifier_key(
                id,
                "Consent.patient.identifier (urn:gateway:hospital:{id} and the patient id)",
            )
        })?;
    let provision = c
        .get("provision")
        .filter(|p| p.is_object())
        .ok_or(InvalidResource("Consent.provision"))?;
    let grants = match provision.get("type").and_then(Value::as_str) {
        Some("permit") => vec![parse_grant(provision)?],
        Some("deny") | None => {
            let nested = array(provision.get("provision"), "Consent.provision.provision")?;
            nested.iter().map(parse_grant).collect::<Parsed<Vec<_>>>()?
        }
        Some(_) => return Err(InvalidResource("Consent.provision.type (deny or permit)")),
    };
    if grants.is_empty() {
        return Err(InvalidResource(
            "Consent.provision.provision (at least one permit)",
        ));
    }
    Ok(NewConsent {
        patient,
        grants,
        source: ConsentSource::Kiosk,
    })
}

/// A review item's record as the review API shows it: key, person, every field.
pub fn review_record(s: &SourceRecord) -> Value {
    json!({
        "hospital_id": s.key.hospital_id,
        "patient_id": s.key.patient_id,
        "person": s.person.0,
        "updated": s.updated,
        "record": s.record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_dates() {
        for ok in ["1975", "1975-01", "1975-01-02", "2000-12-31"] {
            assert!(is_fhir_date(ok), "{ok}");
        }
        for bad in [
            "",
            "75",
            "1975-1-2",
            "1975-13",
            "1975-00-01",
            "1975-01-32",
            "S50.1.2",
            "昭和50年",
            "1975/01/02",
            "１９７５",
        ] {
            assert!(!is_fhir_date(bad), "{bad}");
        }
    }

    #[test]
    fn the_score_is_the_match_probability_at_even_odds() {
        assert_eq!(score(0.0), 0.5);
        assert_eq!(score(10.0), 0.999);
        assert_eq!(score(14.0), 0.9999);
        assert_eq!(score(-10.0), 0.001);
        assert!(score(-20.0) < 0.0001);
        assert_eq!(score(f64::INFINITY), 1.0);
        assert_eq!(score(f64::NEG_INFINITY), 0.0);
        assert_eq!(score(f64::NAN), 0.0);
        assert!(score(3.0) > score(2.0));
    }

    /// Odd values put in place of each element of a valid resource, one at a time.
    fn odd_values() -> Vec<Value> {
        vec![
            Value::Null,
            json!(0),
            json!(-1.5e300),
            json!(true),
            json!(""),
            json!(" "),
            json!("a\u{0}b"),
            json!("x".repeat(257)),
            json!("髙".repeat(256)),
            json!("ｱ"),
            json!("|"),
            json!("urn:gateway:hospital:"),
            json!("urn:gateway:hospital:h"),
            json!("urn:gateway:region"),
            json!("IDE"),
            json!("SYL"),
            json!("permit"),
            json!("all"),
            json!("1975-02-31"),
            json!([]),
            json!([null]),
            json!(["x".repeat(200), "y".repeat(200)]),
            json!({}),
            json!({"system": "urn:gateway:hospital:h", "value": "p"}),
        ]
    }

    /// Every JSON pointer of `v`.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = format!("{at}/{k}");
                    out.push(p.clone());
                    pointers(x, p, out);
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    let p = format!("{at}/{i}");
                    out.push(p.clone());
                    pointers(x, p, out);
                }
            }
            _ => {}
        }
    }

    /// Each mutant of `seed` (one element replaced by one odd value).
    fn mutants(seed: &Value) -> Vec<Value> {
        let mut paths = Vec::new();
        pointers(seed, String::new(), &mut paths);
        let mut out = Vec::new();
        for p in &paths {
            for odd in odd_values() {
                let mut m = seed.clone();
                if let Some(slot) = m.pointer_mut(p) {
                    *slot = odd;
                }
                out.push(m);
            }
        }
        out
    }

    fn seed_patient() -> Value {
        json!({
            "resourceType": "Patient",
            "identifier": [{"system": "urn:gateway:hospital:core", "value": "12345"}],
            "name": [
                {"extension": [{"url": REPRESENTATION, "valueCode": "IDE"}], "family": "髙橋", "given": ["太郎", "次"]},
                {"family": "たかはし", "given": ["たろう"]},
                {"text": "TAKAHASHI TARO"}
            ],
            "gender": "male",
            "birthDate": "1975-01-02",
            "address": [{"state": "東京都", "city": "千代田区", "line": ["1-1"], "postalCode": "100-0001"}],
            "telecom": [{"system": "phone", "value": "03-1234-5678"}],
            "extension": [{"url": INSURANCE, "extension": [
                {"url": "insurer-number", "valueString": "06130012"},
                {"url": "branch", "valueString": "01"}
            ]}]
        })
    }

    /// No input panics, and whatever is read is answered so that it reads back the same.
    #[test]
    fn patients_of_every_odd_shape_are_refused_or_read_back_the_same() {
        let mut read = 0;
        for m in mutants(&seed_patient()) {
            let Ok(r) = patient_to_record(&m) else {
                continue;
            };
            read += 1;
            let key = SourceKey {
                hospital_id: r.hospital_id.clone().unwrap_or_else(|| "h".into()),
                patient_id: r.patient_id.clone().unwrap_or_else(|| "p".into()),
            };
            let expected = Record {
                hospital_id: Some(key.hospital_id.clone()),
                patient_id: Some(key.patient_id.clone()),
                ..r.clone()
            };
            let s = SourceRecord {
                key,
                person: gateway_registry::PersonId("x".into()),
                record: r,
                updated: String::new(),
            };
            let back = patient_to_record(&record_to_patient(&s));
            assert!(back == Ok(expected), "{m}");
        }
        assert!(read > 100, "{read}");
    }

    fn seed_consent() -> Value {
        json!({
            "resourceType": "Consent",
            "status": "active",
            "patient": {"identifier": {"system": "urn:gateway:hospital:core", "value": "12345"}},
            "provision": {"type": "deny", "provision": [
                {"type": "permit",
                 "actor": [{"reference": {"identifier": {"system": GRANTEE_HOSPITAL_SYSTEM, "value": "clinic-a"}}}],
                 "class": [{"system": DATA_KIND_SYSTEM, "code": "results"}, {"system": DATA_KIND_SYSTEM, "code": "images"}]},
                {"type": "permit",
                 "actor": [{"reference": {"identifier": {"system": GRANTEE_REGION_SYSTEM, "value": "region"}}}],
                 "class": [{"system": DATA_KIND_SYSTEM, "code": "all"}]}
            ]}
        })
    }

    #[test]
    fn consents_of_every_odd_shape_are_refused_or_read_back_the_same() {
        let mut read = 0;
        for m in mutants(&seed_consent()) {
            let Ok(new) = consent_to_new(&m) else {
                continue;
            };
            read += 1;
            let recorded = Consent {
                id: "c-1".into(),
                patient: new.patient.clone(),
                grants: new.grants.clone(),
                status: ConsentStatus::Active,
                source: ConsentSource::Kiosk,
                recorded_by: "staff".into(),
                recorded_at: "2026-12-01T00:00:00Z".into(),
                revoked_by: None,
                revoked_at: None,
            };
            assert_eq!(consent_to_new(&consent_resource(&recorded)), Ok(new), "{m}");
        }
        assert!(read > 20, "{read}");
    }

    #[test]
    fn kana_is_told_from_kanji() {
        assert!(is_kana_text("やまだ たろう"));
        assert!(is_kana_text("ヤマダ"));
        assert!(is_kana_text("ﾔﾏﾀﾞ ﾀﾛｰ"));
        assert!(is_kana_text("コーヒー"));
        assert!(!is_kana_text("山田"));
        assert!(!is_kana_text("YAMADA"));
        assert!(!is_kana_text(" "));
    }
}
