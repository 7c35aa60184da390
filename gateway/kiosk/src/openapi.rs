//! The OpenAPI 3.1 document served at `/openapi.json`.

use serde_json::{Value, json};

/// A request, slot or appointment id: the topic-safe id of `gateway_id::is_valid` (1-64 of
/// `A-Z a-z 0-9 - _ .`), the one rule `appointment::parse_request` and the cancel route
/// check, written as a JSON Schema pattern for clients (a test checks that both agree).
const TOKEN: &str = "^[A-Za-z0-9._-]{1,64}$";
const SLOT_REFERENCE: &str = "^Slot/[A-Za-z0-9._-]{1,64}$";
/// `based-on` of the results searches: `Appointment/{id}` with the same id rule.
const APPOINTMENT_REFERENCE: &str = "^Appointment/[A-Za-z0-9._-]{1,64}$";
/// A patient id: no DICOM delimiters (backslash, `^`, `=`).
const PATIENT_ID: &str = "^[^\\\\^=]+$";
/// A person name: no backslash, no control character (Unicode Cc).
const PERSON_NAME: &str = "^[^\\\\\\u0000-\\u001f\\u007f-\\u009f]+$";

fn outcome_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}})
}

pub fn document() -> Value {
    let mut doc = base();
    add_enrolment(&mut doc);
    add_results(&mut doc);
    add_identity(&mut doc);
    doc
}

/// Adds `more`'s schemas and paths to the document.
fn extend(doc: &mut Value, schemas: Value, paths: Value) {
    for (section, more) in [("schemas", schemas), ("paths", paths)] {
        let target = if section == "paths" {
            doc.get_mut("paths")
        } else {
            doc.get_mut("components").and_then(|c| c.get_mut("schemas"))
        };
        if let (Some(Value::Object(target)), Value::Object(more)) = (target, more) {
            target.extend(more);
        }
    }
}

/// The identity routes (`crate::identity`): PDQm-like search, PIXm-like linked identifiers,
/// the review queue and consents.
fn add_identity(doc: &mut Value) {
    use crate::identity::fhir;
    let string = json!({"type": "string"});
    let fhir_ok = |description: &str, schema: &str| json!({"description": description, "content": {"application/fhir+json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let json_ok = |description: &str, schema: Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let no_session = outcome_response("No session");
    let forbidden =
        outcome_response("A clerk (administrators and physicians only; the refusal is audited)");
    let unsupported = outcome_response(
        "not-supported: this gateway has no identity registry; or not-found: no such patient record, review item or consent",
    );
    let conflict =
        outcome_response("The request contradicts the registry's state (the diagnostics say how)");
    let unavailable = outcome_response(
        "The identity registry (or, for the reads it cannot attribute, the audit trail) is unavailable; try again",
    );
    let key = json!({"type": "object", "required": ["hospital_id", "patient_id"], "properties": {
        "hospital_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "patient_id": {"type": "string", "minLength": 1, "maxLength": 64}}});
    let identifier = json!({"type": "object", "required": ["system", "value"], "properties": {
        "system": {"type": "string", "description": format!("{}{{hospital id}}", fhir::HOSPITAL_SYSTEM_PREFIX)},
        "value": {"type": "string", "description": "The patient id at that hospital"}}});
    let token = json!({"type": "string", "description": format!("{}{{hospital id}}|{{patient id}}", fhir::HOSPITAL_SYSTEM_PREFIX)});
    let review_record = json!({"type": "object", "required": ["hospital_id", "patient_id", "person", "record"], "properties": {
        "hospital_id": string, "patient_id": string, "person": string, "updated": string,
        "record": {"type": "object", "description": "Every field of the record (null when missing): hospital_id, patient_id, family_name, given_name, family_kana, given_kana, sex, birth_date, address, postal_code, phone, insurer_number, insurance_symbol, insurance_number, insurance_branch",
            "additionalProperties": {"type": ["string", "null"]}}}});
    let schemas = json!({
        "MatchParameters": {
            "type": "object",
            "description": "A FHIR Parameters: `resource` = the Patient to search for (JP Core: HumanName with the iso21090-EN-representation extension IDE for kanji, SYL for kana; identifier urn:gateway:hospital:{id}; gender, birthDate (FHIR date), address, telecom phone, insurance in the urn:gateway:identity:insurance extension), optional `count` (1-100, default 10) and `onlyCertainMatches`",
            "required": ["resourceType", "parameter"],
            "properties": {
                "resourceType": {"const": "Parameters"},
                "parameter": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"enum": ["resource", "count", "onlyCertainMatches"]},
                    "resource": {"type": "object", "required": ["resourceType"], "properties": {"resourceType": {"const": "Patient"}}},
                    "valueInteger": {"type": "integer", "minimum": 1, "maximum": 100},
                    "valueBoolean": {"type": "boolean"}}}}
            }
        },
        "PatientBundle": {
            "type": "object",
            "description": format!("Searchset of source records that may be the patient, best first. entry.search.score = 1 / (1 + 2^-w) for the Fellegi-Sunter match weight w (log2 likelihood ratio; the weight itself in the extension {}), entry.search.extension {} certain (link) / probable (review) / possible (distinct). Each Patient carries its person in the extension {} (valueIdentifier, system {}).", fhir::MATCH_WEIGHT, fhir::MATCH_GRADE, fhir::PERSON, fhir::PERSON_SYSTEM),
            "required": ["resourceType", "type", "total", "entry"],
            "properties": {
                "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                "total": {"type": "integer", "minimum": 0},
                "entry": {"type": "array", "items": {"type": "object", "required": ["resource", "search"], "properties": {
                    "resource": {"type": "object", "required": ["resourceType", "identifier"], "properties": {
                        "resourceType": {"const": "Patient"},
                        "identifier": {"type": "array", "items": identifier}}},
                    "search": {"type": "object", "required": ["mode", "score"], "properties": {
                        "mode": {"const": "match"},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "extension": {"type": "array", "items": {"type": "object"}}}}}}}
            }
        },
        "PixParameters": {
            "type": "object",
            "description": "A FHIR Parameters: one targetIdentifier per linked record this hospital may see (withheld ones for want of consent are neither shown nor counted), and `person` (system urn:gateway:person)",
            "required": ["resourceType", "parameter"],
            "properties": {
                "resourceType": {"const": "Parameters"},
                "parameter": {"type": "array", "items": {"type": "object", "required": ["name", "valueIdentifier"], "properties": {
                    "name": {"enum": ["targetIdentifier", "person"]},
                    "valueIdentifier": identifier}}}
            }
        },
        "ReviewQueue": {
            "type": "object", "required": ["items"],
            "properties": {"items": {"type": "array", "items": {"type": "object",
                "required": ["id", "score", "probability", "queued", "a", "b"],
                "properties": {
                    "id": {"type": "string"},
                    "score": {"type": "number", "description": "The match weight (log2 likelihood ratio)"},
                    "probability": {"type": "number", "minimum": 0, "maximum": 1, "description": "1 / (1 + 2^-score)"},
                    "queued": {"type": "string"},
                    "a": review_record, "b": review_record}}}}
        },
        "Verdict": {"type": "object", "required": ["verdict"], "properties": {"verdict": {"enum": ["same", "not_same"]}}},
        "LinkRequest": {"type": "object", "required": ["a", "b"], "properties": {"a": key, "b": key}},
        "SourceKey": key,
        "Consent": {
            "type": "object",
            "description": format!("A FHIR Consent (公開同意): status active | inactive (revoked), scope patient-privacy, patient.identifier ({}{{hospital id}}), dateTime and performer[0].display (when and by whom recorded), extensions {} (kiosk | hl7), {} and {}. provision: a base deny whose nested permit provisions are the grants: actor[0].reference.identifier = the grantee (system {} and a hospital id, or {} for the whole region), class[] = kinds of data (system {}: identity, results, reactions, dose, images; `all` on input). A posted Consent may put one grant in a top-level permit provision; the recorder is the logged-in staff member.", fhir::HOSPITAL_SYSTEM_PREFIX, fhir::CONSENT_SOURCE, fhir::REVOKED_BY, fhir::REVOKED_AT, fhir::GRANTEE_HOSPITAL_SYSTEM, fhir::GRANTEE_REGION_SYSTEM, fhir::DATA_KIND_SYSTEM),
            "required": ["resourceType", "patient", "provision"],
            "properties": {
                "resourceType": {"const": "Consent"},
                "id": {"type": "string"},
                "status": {"enum": ["active", "inactive"]},
                "patient": {"type": "object", "required": ["identifier"], "properties": {"identifier": identifier}},
                "dateTime": {"type": "string"},
                "provision": {"type": "object", "required": ["type"], "properties": {
                    "type": {"enum": ["deny", "permit"]},
                    "provision": {"type": "array", "items": {"type": "object"}}}}
            }
        },
        "ConsentBundle": {
            "type": "object", "required": ["resourceType", "type", "total", "entry"],
            "properties": {
                "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                "total": {"type": "integer", "minimum": 0},
                "entry": {"type": "array", "items": {"type": "object", "required": ["resource"], "properties": {
                    "resource": {"$ref": "#/components/schemas/Consent"}}}}}
        }
    });
    let security = json!([{"session": []}]);
    let paths = json!({
        "/fhir/Patient/$match": {"post": {
            "summary": "Search the identity registry by demographics (IHE PDQm-like); audited by the registry",
            "security": security,
            "requestBody": {"required": true, "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/MatchParameters"}}}},
            "responses": {
                "200": fhir_ok("Searchset Bundle of Patient, scored and graded", "PatientBundle"),
                "400": outcome_response("Not a Parameters with a Patient, or a malformed element (named in the diagnostics)"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/fhir/Patient/$ihe-pix": {"get": {
            "summary": "The identifiers linked to a patient record (IHE PIXm-like); audited by the registry",
            "security": security,
            "parameters": [
                {"name": "sourceIdentifier", "in": "query", "required": true, "schema": token},
                {"name": "targetSystem", "in": "query", "required": false, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": fhir_ok("The linked identifiers and the person", "PixParameters"),
                "400": outcome_response("sourceIdentifier missing or not urn:gateway:hospital:{id}|{patient id}"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/api/identity/review": {"get": {
            "summary": "The pairs waiting for a person's decision, both records field by field (audited as a patient record read)",
            "security": security,
            "responses": {
                "200": json_ok("The review queue, oldest first", json!({"$ref": "#/components/schemas/ReviewQueue"})),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/api/identity/review/{id}": {"post": {
            "summary": "Decide a queued pair: the same person (link) or not (never linked automatically); audited by the registry",
            "security": security,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": TOKEN}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Verdict"}}}},
            "responses": {
                "200": json_ok("Decided", json!({"type": "object", "required": ["id", "verdict"], "properties": {"id": {"type": "string"}, "verdict": {"enum": ["same", "not_same"]}}})),
                "400": outcome_response("Not {\"verdict\": \"same\" | \"not_same\"}"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/api/identity/link": {"post": {
            "summary": "Link two source records by hand (the same person); audited by the registry",
            "security": security,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LinkRequest"}}}},
            "responses": {
                "200": json_ok("Linked: the person both records belong to now", json!({"type": "object", "required": ["person"], "properties": {"person": {"type": "string"}}})),
                "400": outcome_response("Not two records, or the same record twice"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/api/identity/unlink": {"post": {
            "summary": "Take a source record out of its person, at once for every lookup and disclosure; audited by the registry",
            "security": security,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SourceKey"}}}},
            "responses": {
                "204": {"description": "Unlinked"},
                "400": outcome_response("Not {hospital_id, patient_id}"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }},
        "/fhir/Consent": {
            "get": {
                "summary": "The consents of a patient's person (active and revoked), newest first (audited as a patient record read)",
                "security": security,
                "parameters": [{"name": "patient", "in": "query", "required": true, "schema": token}],
                "responses": {
                    "200": fhir_ok("Searchset Bundle of Consent", "ConsentBundle"),
                    "400": outcome_response("Search by patient=urn:gateway:hospital:{id}|{patient id} only"),
                    "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
                }
            },
            "post": {
                "summary": "Record a consent to share (公開同意), durable before the answer; audited by the registry",
                "security": security,
                "requestBody": {"required": true, "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Consent"}}}},
                "responses": {
                    "201": fhir_ok("Recorded; Location is Consent/{id}", "Consent"),
                    "400": outcome_response("Not a Consent, or a malformed element (named in the diagnostics)"),
                    "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
                }
            }
        },
        "/fhir/Consent/{id}/$revoke": {"post": {
            "summary": "Revoke a consent (kept, status inactive, who and when on record); audited by the registry",
            "security": security,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": TOKEN}}],
            "responses": {
                "200": fhir_ok("The revoked Consent", "Consent"),
                "401": no_session, "403": forbidden, "404": unsupported, "409": conflict, "503": unavailable
            }
        }}
    });
    extend(doc, schemas, paths);
}

/// The results routes (`crate::results`): ImagingStudy and DiagnosticReport of a booked exam.
fn add_results(doc: &mut Value) {
    let base = crate::results::EXTENSION_BASE;
    let based_on = json!({
        "name": "based-on", "in": "query", "required": true,
        "description": "The booked exam: Appointment/{id}",
        "schema": {"type": "string", "pattern": APPOINTMENT_REFERENCE}
    });
    let reference = json!({"type": "object", "required": ["reference"], "properties": {
        "reference": {"type": "string", "pattern": APPOINTMENT_REFERENCE}}});
    let count = |what: &str| {
        json!({"type": "object", "required": ["url", "valueUnsignedInt"],
        "description": what,
        "properties": {"url": {"const": format!("{base}{what}")}, "valueUnsignedInt": {"type": "integer", "minimum": 0}}})
    };
    let schemas = json!({
        "ImagingStudy": {
            "type": "object",
            "description": format!("A booked exam's images as they came back to this clinic. Extensions (url under {base}): images-received (pulled and sealed here), images-delivered (confirmed by every PACS destination), images-failed (dead-lettered at some destination), complete (the core said the study is complete), report (complex: status, issued, received, delivered; never the text)."),
            "required": ["resourceType", "id", "status", "basedOn", "numberOfInstances", "extension"],
            "properties": {
                "resourceType": {"const": "ImagingStudy"},
                "id": {"type": "string", "pattern": TOKEN},
                "meta": {"type": "object", "properties": {"lastUpdated": {"type": "string"}}},
                "status": {"enum": ["registered", "available"], "description": "registered: nothing pulled yet; available: at least one instance received"},
                "basedOn": {"type": "array", "minItems": 1, "maxItems": 1, "items": reference},
                "identifier": {"type": "array", "description": "The accession (type ACSN) and each Study Instance UID (system urn:dicom:uid, value urn:oid:{uid})",
                    "items": {"type": "object", "required": ["value"], "properties": {
                        "system": {"type": "string"}, "type": {"type": "object"}, "value": {"type": "string"}}}},
                "numberOfInstances": {"type": "integer", "minimum": 0, "description": "Instances the core says the cloud archive has confirmed"},
                "extension": {"type": "array", "items": {"anyOf": [
                    count("images-received"), count("images-delivered"), count("images-failed"),
                    {"type": "object", "required": ["url", "valueBoolean"], "properties": {
                        "url": {"const": format!("{base}complete")}, "valueBoolean": {"type": "boolean"}}},
                    {"$ref": "#/components/schemas/ReportStateExtension"}
                ]}}
            }
        },
        "ReportStateExtension": {
            "type": "object",
            "description": "Where the exam's report is (no text): status (preliminary, final, corrected, amended), issued, received, delivered (every HL7 destination, the EMR, acknowledged it)",
            "required": ["url", "extension"],
            "properties": {
                "url": {"const": format!("{base}report")},
                "extension": {"type": "array", "items": {"type": "object", "required": ["url"], "properties": {
                    "url": {"enum": ["status", "issued", "received", "delivered"]},
                    "valueCode": {"enum": ["preliminary", "final", "corrected", "amended"]},
                    "valueDateTime": {"type": "string"},
                    "valueBoolean": {"type": "boolean"}}}}
            }
        },
        "ImagingStudyBundle": {"type": "object", "required": ["resourceType", "type", "total", "entry"], "properties": {
            "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
            "total": {"type": "integer", "minimum": 0, "maximum": 1},
            "entry": {"type": "array", "maxItems": 1, "items": {"type": "object", "required": ["resource"], "properties": {
                "resource": {"$ref": "#/components/schemas/ImagingStudy"}}}}}},
        "DiagnosticReport": {
            "type": "object",
            "description": "A booked exam's report with its text: presentedForm[0] is text/plain; charset=utf-8 (base64; one line per observation, 'title: text'); each line is also a contained Observation (code.text the title, valueString the line) referenced from result, in order",
            "required": ["resourceType", "id", "status", "code", "basedOn", "presentedForm"],
            "properties": {
                "resourceType": {"const": "DiagnosticReport"},
                "id": {"type": "string", "pattern": TOKEN},
                "status": {"enum": ["preliminary", "final", "corrected", "amended"]},
                "category": {"type": "array", "items": {"type": "object"}},
                "code": {"type": "object"},
                "basedOn": {"type": "array", "minItems": 1, "maxItems": 1, "items": reference},
                "issued": {"type": "string"},
                "contained": {"type": "array", "items": {"type": "object", "required": ["resourceType", "id", "status", "code", "valueString"], "properties": {
                    "resourceType": {"const": "Observation"}, "id": {"type": "string"},
                    "status": {"type": "string"},
                    "code": {"type": "object", "properties": {"text": {"type": "string"}}},
                    "valueString": {"type": "string"}}}},
                "result": {"type": "array", "items": {"type": "object", "required": ["reference"], "properties": {"reference": {"type": "string"}}}},
                "presentedForm": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["contentType", "data"], "properties": {
                    "contentType": {"const": "text/plain; charset=utf-8"},
                    "data": {"type": "string", "contentEncoding": "base64"}}}}
            }
        },
        "DiagnosticReportBundle": {"type": "object", "required": ["resourceType", "type", "total", "entry"], "properties": {
            "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
            "total": {"type": "integer", "minimum": 0, "maximum": 1},
            "entry": {"type": "array", "maxItems": 1, "items": {"type": "object", "required": ["resource"], "properties": {
                "resource": {"$ref": "#/components/schemas/DiagnosticReport"}}}}}}
    });
    let paths = json!({
        "/fhir/ImagingStudy": {"get": {
            "summary": "How far a booked exam's images (and its report, without text) have come back to this clinic",
            "security": [{"session": []}],
            "parameters": [based_on],
            "responses": {
                "200": {"description": "Searchset Bundle of 0 or 1 ImagingStudy (0: nothing has come back, or not this clinic's appointment)", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/ImagingStudyBundle"}}}},
                "400": outcome_response("Search by based-on=Appointment/{id} only"),
                "401": outcome_response("No session"),
                "503": outcome_response("The results store is unavailable; try again")
            }
        }},
        "/fhir/DiagnosticReport": {"get": {
            "summary": "A booked exam's report with its text (physicians only; audited as a patient record read)",
            "security": [{"session": []}],
            "parameters": [based_on],
            "responses": {
                "200": {"description": "Searchset Bundle of 0 or 1 DiagnosticReport (0: no report has come back)", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/DiagnosticReportBundle"}}}},
                "400": outcome_response("Search by based-on=Appointment/{id} only"),
                "401": outcome_response("No session"),
                "403": outcome_response("Not a physician (the refusal is audited)"),
                "503": outcome_response("The results store is unavailable, or the read cannot be audited; try again")
            }
        }}
    });
    extend(doc, schemas, paths);
}

/// The enrolment routes (`crate::enrol`): schemas and paths added to the document.
fn add_enrolment(doc: &mut Value) {
    let schemas = json!({
        "Enrol": {
            "type": "object",
            "additionalProperties": false,
            "required": ["code", "password"],
            "properties": {
                "code": {"type": "string", "maxLength": 64, "description": "The one-time enrolment code, e.g. ABCDE-FGHIJ-KLMNO-PQRST (case and separators do not matter)"},
                "password": {"type": "string", "maxLength": 256, "description": "At least 12 characters, not containing the staff id, not one character repeated"}
            }
        },
        "EnrolConfirm": {
            "type": "object",
            "additionalProperties": false,
            "required": ["code", "totp"],
            "properties": {
                "code": {"type": "string", "maxLength": 64},
                "totp": {"type": "string", "pattern": "^[0-9]{6}$"}
            }
        },
        "Enrolment": {"type": "object", "required": ["name", "role", "secret", "otpauth_uri", "qr_svg"], "properties": {
            "name": {"type": "string"}, "role": {"enum": ["clerk", "physician", "admin"]},
            "secret": {"type": "string", "description": "The TOTP secret, base32"},
            "otpauth_uri": {"type": "string"},
            "qr_svg": {"type": "string", "description": "The otpauth URI as a QR code, an SVG document"}}},
        "Invite": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "role"],
            "properties": {
                "name": {"type": "string", "maxLength": 64, "pattern": "^[a-z0-9._-]{1,64}$"},
                "role": {"enum": ["clerk", "physician", "admin"]}
            }
        },
        "Invited": {"type": "object", "required": ["name", "role", "code", "expires_at"], "properties": {
            "name": {"type": "string"}, "role": {"enum": ["clerk", "physician", "admin"]},
            "code": {"type": "string", "description": "The one-time enrolment code, shown once"},
            "expires_at": {"type": "integer", "description": "Unix seconds"}}}
    });
    let paths = json!({
        "/api/enrol": {"post": {
            "summary": "Start an invited account's enrolment: spend the code, set the password, get the TOTP secret",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Enrol"}}}},
            "responses": {
                "200": {"description": "The new second factor, shown once", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Enrolment"}}}},
                "400": outcome_response("Not an enrolment request"),
                "401": outcome_response("The code is not valid (unknown, used, replaced or expired): one answer for all"),
                "422": outcome_response("The password breaks a rule; the issue code names it (too-short, contains-name, one-character)"),
                "429": outcome_response("Too many failed enrolments from this address; Retry-After says when to try again"),
                "503": outcome_response("The account store failed; try again")
            }
        }},
        "/api/enrol/confirm": {"post": {
            "summary": "Complete the enrolment with the authenticator's first code; then log in",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EnrolConfirm"}}}},
            "responses": {
                "200": {"description": "Enrolled: the account can log in with its password and the next code", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Me"}}}},
                "400": outcome_response("Not a confirmation request"),
                "401": outcome_response("The code is not valid, or the authenticator's code does not match"),
                "429": outcome_response("Too many failed enrolments from this address; Retry-After says when to try again"),
                "503": outcome_response("The account store failed; try again")
            }
        }},
        "/api/accounts/invite": {"post": {
            "summary": "Invite a staff account (administrators only); its enrolment code is answered once",
            "security": [{"session": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Invite"}}}},
            "responses": {
                "201": {"description": "Invited", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Invited"}}}},
                "400": outcome_response("Not an invitation, or a name or role that is not allowed"),
                "401": outcome_response("No session"),
                "403": outcome_response("Not an administrator"),
                "409": outcome_response("An account with that name has completed its enrolment"),
                "503": outcome_response("The account store failed; try again")
            }
        }}
    });
    extend(doc, schemas, paths);
}

fn base() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "gatewayd kiosk API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Regional exam booking from the clinic kiosk. Staff log in with a password and a TOTP code; the session cookie is Secure, HttpOnly and SameSite=Strict. Resources are shaped after FHIR R4 Slot, Appointment, ImagingStudy, DiagnosticReport, Patient (PDQm $match, PIXm $ihe-pix), Parameters and Consent."
        },
        "components": {
            "securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": "gw_session"}},
            "schemas": {
                "OperationOutcome": {
                    "type": "object",
                    "required": ["resourceType", "issue"],
                    "properties": {
                        "resourceType": {"const": "OperationOutcome"},
                        "issue": {"type": "array", "items": {"type": "object",
                            "required": ["severity", "code"],
                            "properties": {"severity": {"type": "string"}, "code": {"type": "string"}, "diagnostics": {"type": "string"},
                                "details": {"type": "object", "description": "A safety warning: coding[0] (system urn:gatewayd:safety-warning) code = the warning id to acknowledge, display = its kind; text = the Japanese text (diagnostics the English)"},
                                "extension": {"type": "array", "items": {"type": "object"}, "description": "A safety warning's details: url urn:gatewayd:safety-warning, sub-extensions kind, contrast (valueCode), agent, severity, reaction (repeated), when, hospital, text-ja (valueString)"}}}},
                        "contained": {"type": "array", "items": {"type": "object"}, "description": "With safety warnings for CT: the cumulative dose Observation (see Appointment.contained)"}
                    }
                },
                "Login": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["name", "password", "code"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 64},
                        "password": {"type": "string", "maxLength": 256},
                        "code": {"type": "string", "pattern": "^[0-9]{6}$"}
                    }
                },
                "Me": {"type": "object", "required": ["name", "role", "identity"], "properties": {
                    "name": {"type": "string"}, "role": {"enum": ["clerk", "physician", "admin"]},
                    "identity": {"type": "boolean", "description": "This gateway keeps the identity registry (the identity and consent routes answer)"}}},
                "AppointmentRequest": {
                    "type": "object",
                    "description": "A FHIR Appointment: identifier[0].value = client request id, slot[0].reference = Slot/{id}, a contained Patient with id 'patient' (identifier, name[0].text as DICOM PN, birthDate, gender), serviceType[0].text",
                    "required": ["resourceType", "identifier", "slot", "contained", "serviceType"],
                    "properties": {
                        "resourceType": {"const": "Appointment"},
                        "identifier": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["value"], "properties": {
                            "system": {"type": "string"},
                            "value": {"type": "string", "description": "The client-made request id: a repeat is answered with the first outcome", "pattern": TOKEN}}}},
                        "slot": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["reference"], "properties": {
                            "reference": {"type": "string", "pattern": SLOT_REFERENCE}}}},
                        "serviceType": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string", "description": "The procedure", "minLength": 1, "maxLength": 64}}}},
                        "contained": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ContainedPatient"}},
                        "participant": {"type": "array", "items": {"type": "object"}},
                        "extension": {"type": "array", "maxItems": 64, "description": "Safety warnings a physician acknowledges (physicians only: 403 otherwise): one extension with url urn:gatewayd:acknowledged-warning and valueString = the warning id (details.coding[0].code of the 409's issue) per warning, at most 32; extensions with other urls are ignored",
                            "items": {"type": "object", "required": ["url"], "properties": {
                                "url": {"type": "string"},
                                "valueString": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}}}}
                    }
                },
                "ContainedPatient": {
                    "type": "object",
                    "description": "The patient, contained in the Appointment with id 'patient'",
                    "required": ["resourceType", "id", "identifier", "name", "birthDate"],
                    "properties": {
                        "resourceType": {"const": "Patient"},
                        "id": {"const": "patient"},
                        "identifier": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["value"], "properties": {
                            "value": {"type": "string", "description": "The patient id: 1-64 bytes, no \\ ^ =", "minLength": 1, "maxLength": 64, "pattern": PATIENT_ID}}}},
                        "name": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string", "description": "DICOM PN: alphabetic=ideographic=phonetic groups, components separated by ^, e.g. YAMADA^TARO=山田^太郎=やまだ^たろう", "minLength": 1, "maxLength": 192, "pattern": PERSON_NAME}}}},
                        "birthDate": {"type": "string", "format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                        "gender": {"enum": ["male", "female", "other", "unknown"]}
                    }
                },
                "AppointmentBundle": {"type": "object", "required": ["resourceType", "type", "entry"], "properties": {
                    "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                    "total": {"type": "integer"},
                    "entry": {"type": "array", "items": {"type": "object", "required": ["resource"], "properties": {
                        "resource": {"$ref": "#/components/schemas/Appointment"}}}}}},
                "Appointment": {"type": "object", "required": ["resourceType", "id", "status"], "properties": {
                    "resourceType": {"const": "Appointment"}, "id": {"type": "string"},
                    "status": {"enum": ["proposed", "pending", "booked", "cancelled", "fulfilled", "noshow"]},
                    "extension": {"type": "array", "items": {"type": "object"}, "description": "On the answer to a $hold/$book: the safety warnings it was acknowledged with (url urn:gatewayd:acknowledged-warning, valueString the id)"},
                    "contained": {"type": "array", "items": {"type": "object"}, "description": "On the answer to a $hold/$book of a CT: the cumulative dose of the window as an Observation (id cumulative-dose): valueQuantity the total DLP in mGy.cm, referenceRange[0].high the threshold, extension urn:gatewayd:dose-window-days the window, note the label 'scanner output (CTDIvol/DLP), not patient dose' in English and Japanese, one component per irradiation event (code: Irradiation Event UID, system urn:dicom:uid; valueQuantity its DLP; extension urn:gatewayd:dose-event with when, hospital, ctdivol, protocol)"}}},
                "ScheduleBundle": {"type": "object", "required": ["resourceType", "type", "total", "entry"], "properties": {
                    "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                    "total": {"type": "integer", "minimum": 0},
                    "entry": {"type": "array", "items": {"type": "object", "required": ["resource"], "properties": {
                        "resource": {"type": "object", "required": ["resourceType", "id"], "properties": {
                            "resourceType": {"const": "Schedule"}, "id": {"type": "string"},
                            "active": {"type": "boolean"}}}}}}}},
                "SlotBundle": {"type": "object", "required": ["resourceType", "type", "entry"], "properties": {
                    "resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                    "total": {"type": "integer"}, "meta": {"type": "object"},
                    "entry": {"type": "array", "items": {"type": "object"}}}}
            }
        },
        "paths": {
            "/api/login": {"post": {
                "summary": "Log in with both factors",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Login"}}}},
                "responses": {
                    "200": {"description": "Logged in; Set-Cookie carries the session", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Me"}}}},
                    "400": outcome_response("Not a login request"),
                    "401": outcome_response("Refused, with one answer whatever the reason (unknown name, wrong password or code, no second factor, locked or disabled); the audit trail has the reason"),
                    "429": outcome_response("Too many failed logins from this address; Retry-After says when to try again"),
                    "503": outcome_response("The account store or the session randomness failed; try again")
                }
            }},
            "/api/logout": {"post": {
                "summary": "End the session", "security": [{"session": []}],
                "responses": {"204": {"description": "Logged out"}, "401": outcome_response("No session")}
            }},
            "/api/me": {"get": {
                "summary": "Who is logged in", "security": [{"session": []}],
                "responses": {"200": {"description": "The session's staff member", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Me"}}}},
                              "401": outcome_response("No session")}
            }},
            "/api/accounts": {"get": {
                "summary": "Staff accounts (administrators only)", "security": [{"session": []}],
                "responses": {"200": {"description": "Accounts without secrets", "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}}, "401": outcome_response("No session"), "403": outcome_response("Not an administrator")}
            }},
            "/fhir/Appointment/$hold": {"post": {
                "summary": "Hold a slot at the core (tentative, expires)", "security": [{"session": []}],
                "requestBody": {"required": true, "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/AppointmentRequest"}}}},
                "responses": {
                    "201": {"description": "Held (status pending)", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Appointment"}}}},
                    "200": {"description": "The same request again: its first answer", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Appointment"}}}},
                    "400": outcome_response("Malformed request; the diagnostics name the element"),
                    "401": outcome_response("No session"),
                    "403": outcome_response("Safety warnings acknowledged by someone who is not a physician; nothing was held"),
                    "404": outcome_response("No such slot"),
                    "409": outcome_response("The slot went to another request, or has begun; or (code business-rule, severity warning, one issue per warning) safety warnings a physician must acknowledge: re-send with their ids as acknowledged-warning extensions; nothing was held"),
                    "503": outcome_response("The core hospital (or its safety check) cannot be reached; nothing was held")
                }
            }},
            "/fhir/Appointment/$book": {"post": {
                "summary": "Book a slot at the core (or confirm a hold with the same identifier)", "security": [{"session": []}],
                "requestBody": {"required": true, "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/AppointmentRequest"}}}},
                "responses": {
                    "201": {"description": "Booked", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Appointment"}}}},
                    "200": {"description": "The same request again: its first answer", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Appointment"}}}},
                    "400": outcome_response("Malformed request; the diagnostics name the element"),
                    "401": outcome_response("No session"),
                    "403": outcome_response("Safety warnings acknowledged by someone who is not a physician; nothing was booked"),
                    "404": outcome_response("No such slot"),
                    "409": outcome_response("The slot went to another request, or has begun; or (code business-rule, severity warning, one issue per warning) safety warnings a physician must acknowledge: re-send with their ids as acknowledged-warning extensions; nothing was booked"),
                    "503": outcome_response("The core hospital (or its safety check) cannot be reached; nothing was booked")
                }
            }},
            "/fhir/Appointment/{id}/$cancel": {"post": {
                "summary": "Cancel an appointment (FHIR status cancelled); idempotent",
                "security": [{"session": []}],
                "parameters": [
                    {"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": TOKEN}},
                    {"name": "If-Match", "in": "header", "required": true, "schema": {"type": "string"},
                     "description": "The appointment's ETag, W/\"versionId\""}
                ],
                "responses": {
                    "200": {"description": "Cancelled; ETag is the new version", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Appointment"}}}},
                    "401": outcome_response("No session"),
                    "404": outcome_response("No such appointment of this clinic"),
                    "409": outcome_response("Cannot be cancelled in its state"),
                    "412": outcome_response("The appointment changed since it was read"),
                    "428": outcome_response("If-Match is required"),
                    "503": outcome_response("The core hospital cannot be reached; nothing was changed")
                }
            }},
            "/fhir/Appointment": {"get": {
                "summary": "A patient's appointments (audited as a patient record read)", "security": [{"session": []}],
                "parameters": [{"name": "patient", "in": "query", "required": true, "schema": {"type": "string", "minLength": 1}}],
                "responses": {"200": {"description": "Searchset Bundle of Appointment", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/AppointmentBundle"}}}},
                              "400": outcome_response("Search by patient only"),
                              "401": outcome_response("No session")}
            }},
            "/fhir/Schedule": {"get": {
                "summary": "The scanners (schedules) that can be booked, whether or not they have free slots",
                "security": [{"session": []}],
                "responses": {"200": {"description": "Searchset Bundle of Schedule", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/ScheduleBundle"}}}},
                              "400": outcome_response("Search parameters given"),
                              "401": outcome_response("No session")}
            }},
            "/fhir/Slot": {"get": {
                "summary": "Free slots at the core hospital (cached at the clinic; tagged stale when not refreshed)",
                "security": [{"session": []}],
                "parameters": [
                    {"name": "schedule", "in": "query", "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "schema": {"enum": ["free"]}},
                    {"name": "start", "in": "query", "style": "form", "explode": true,
                     "schema": {"type": "array", "items": {"type": "string", "pattern": "^(ge|lt)"}}}
                ],
                "responses": {"200": {"description": "Searchset Bundle of Slot", "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/SlotBundle"}}}},
                              "400": outcome_response("Unsupported or malformed search"),
                              "401": outcome_response("No session")}
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_pattern_is_the_gateway_id_rule() {
        let token = regex::Regex::new(TOKEN).unwrap();
        let slot = regex::Regex::new(SLOT_REFERENCE).unwrap();
        let appointment = regex::Regex::new(APPOINTMENT_REFERENCE).unwrap();
        let long = "x".repeat(64);
        let too_long = "x".repeat(65);
        for sample in [
            "a",
            "r-1",
            "ct-1.20270112T1000",
            "A.B_c-9",
            long.as_str(),
            too_long.as_str(),
            "",
            "a/b",
            "a+b",
            "#",
            "a b",
            "a\0b",
            "山田",
            "é",
            "a\nb",
            "a$",
            "Slot/x",
        ] {
            assert_eq!(
                token.is_match(sample),
                gateway_id::is_valid(sample),
                "{sample:?}"
            );
            assert_eq!(
                slot.is_match(&format!("Slot/{sample}")),
                gateway_id::is_valid(sample),
                "{sample:?}"
            );
            assert_eq!(
                appointment.is_match(&format!("Appointment/{sample}")),
                gateway_id::is_valid(sample),
                "{sample:?}"
            );
        }
    }
}
