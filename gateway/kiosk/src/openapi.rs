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
            "description": "Regional exam booking from the clinic kiosk. Staff log in with a password and a TOTP code; the session cookie is Secure, HttpOnly and SameSite=Strict. Resources are shaped after FHIR R4 Slot, Appointment, ImagingStudy and DiagnosticReport."
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
                            "properties": {"severity": {"type": "string"}, "code": {"type": "string"}, "diagnostics": {"type": "string"}}}}
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
                "Me": {"type": "object", "required": ["name", "role"], "properties": {
                    "name": {"type": "string"}, "role": {"enum": ["clerk", "physician", "admin"]}}},
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
                        "participant": {"type": "array", "items": {"type": "object"}}
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
                    "status": {"enum": ["proposed", "pending", "booked", "cancelled", "fulfilled", "noshow"]}}},
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
                    "404": outcome_response("No such slot"),
                    "409": outcome_response("The slot went to another request, or has begun"),
                    "503": outcome_response("The core hospital cannot be reached; nothing was held")
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
                    "404": outcome_response("No such slot"),
                    "409": outcome_response("The slot went to another request, or has begun"),
                    "503": outcome_response("The core hospital cannot be reached; nothing was booked")
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
