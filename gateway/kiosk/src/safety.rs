//! Safety warnings at booking, as the kiosk answers them (the core's report:
//! [`gateway_booking::SafetyReport`]).
//!
//! A `$hold` / `$book` whose warnings a physician has not acknowledged is answered 409 with
//! [`needs_acknowledgement`]: an OperationOutcome with one issue per warning
//! (`severity` `warning`, `code` `business-rule`):
//! - `details.coding[0]`: system [`WARNING_SYSTEM`], `code` = the warning id (what the
//!   physician acknowledges), `display` = its kind (`contrast-reaction`, `cumulative-dose`);
//! - `details.text`: the Japanese text; `diagnostics`: the English text;
//! - `extension[0]`: url [`WARNING_SYSTEM`], complex, with sub-extensions `kind`
//!   (valueCode), `contrast` (valueCode `iodinated` / `gadolinium`), and as valueString
//!   `agent`, `severity` (HL7 table 0128 as sent), `reaction` (one per reaction), `when`,
//!   `hospital`, `text-ja`, each present when known.
//!
//! For CT the cumulative dose of the window is a contained Observation
//! ([`dose_observation`], id `cumulative-dose`), in the 409 and in a successful booking's
//! Appointment alike: `valueQuantity` the total DLP in mGy.cm (UCUM), `referenceRange[0].high`
//! the threshold, extension [`WINDOW_DAYS`] the window, `note` the label in English and
//! Japanese ([`gateway_booking::safety::DOSE_LABEL`], [`DOSE_LABEL_JA`]: scanner output,
//! never the patient's dose), one `component` per irradiation event (code: the Irradiation
//! Event UID, system `urn:dicom:uid`, text the target region; `valueQuantity` its DLP;
//! extension [`DOSE_EVENT`] with `when`, `hospital`, `ctdivol` (mGy) and `protocol`).
//!
//! The physician re-sends the request with each warning id as an extension
//! [`crate::appointment::ACKNOWLEDGED_WARNING`]; the booked Appointment lists the warnings
//! it was acknowledged with the same way.

use gateway_booking::safety::DOSE_LABEL;
use gateway_booking::{DoseSummary, SafetyReport, SafetyWarning, WarningKind};
use serde_json::{Value, json};

/// System of a warning id (`details.coding`) and url of the warning's complex extension.
pub const WARNING_SYSTEM: &str = "urn:gatewayd:safety-warning";
/// Url of the dose window (days) on the dose Observation.
pub const WINDOW_DAYS: &str = "urn:gatewayd:dose-window-days";
/// Url of an irradiation event's complex extension on a dose component.
pub const DOSE_EVENT: &str = "urn:gatewayd:dose-event";
/// The dose label in Japanese.
pub const DOSE_LABEL_JA: &str = "装置表示値 (CTDIvol/DLP)、患者被ばく線量ではありません";
/// What the 409 says when the report has no warning to list (it always should).
const NEEDS_ACK: &str = "safety warnings must be acknowledged by a physician before booking";

fn kind_code(kind: WarningKind) -> &'static str {
    match kind {
        WarningKind::ContrastReaction => "contrast-reaction",
        WarningKind::CumulativeDose => "cumulative-dose",
    }
}

fn string_ext(url: &str, value: &str) -> Value {
    json!({"url": url, "valueString": value})
}

fn mgy_cm(value: f64) -> Value {
    json!({"value": value, "unit": "mGy.cm", "system": "http://unitsofmeasure.org", "code": "mGy.cm"})
}

/// One OperationOutcome issue of a warning.
pub fn issue(w: &SafetyWarning) -> Value {
    let mut ext = vec![json!({"url": "kind", "valueCode": kind_code(w.kind)})];
    if let Some(c) = w.contrast {
        let code = match c {
            gateway_booking::ContrastClass::Iodinated => "iodinated",
            gateway_booking::ContrastClass::Gadolinium => "gadolinium",
        };
        ext.push(json!({"url": "contrast", "valueCode": code}));
    }
    if let Some(agent) = &w.agent {
        ext.push(string_ext("agent", agent));
    }
    if let Some(severity) = &w.severity {
        ext.push(string_ext("severity", severity));
    }
    for r in &w.reactions {
        ext.push(string_ext("reaction", r));
    }
    if let Some(when) = &w.when {
        ext.push(string_ext("when", when));
    }
    ext.push(string_ext("hospital", &w.hospital));
    ext.push(string_ext("text-ja", &w.text_ja));
    json!({
        "severity": "warning",
        "code": "business-rule",
        "details": {
            "coding": [{"system": WARNING_SYSTEM, "code": w.id, "display": kind_code(w.kind)}],
            "text": w.text_ja,
        },
        "diagnostics": w.text_en,
        "extension": [{"url": WARNING_SYSTEM, "extension": ext}],
    })
}

/// The cumulative CT dose of the window as a contained Observation.
pub fn dose_observation(dose: &DoseSummary) -> Value {
    let components: Vec<Value> = dose
        .events
        .iter()
        .map(|e| {
            let mut ext = vec![string_ext("hospital", &e.hospital)];
            if let Some(when) = &e.when {
                ext.push(string_ext("when", when));
            }
            if let Some(c) = e.ctdivol_mgy {
                ext.push(json!({"url": "ctdivol", "valueQuantity":
                    {"value": c, "unit": "mGy", "system": "http://unitsofmeasure.org", "code": "mGy"}}));
            }
            if let Some(p) = &e.protocol {
                ext.push(string_ext("protocol", p));
            }
            let mut c = json!({
                "code": {
                    "coding": [{"system": "urn:dicom:uid", "code": e.event_uid}],
                    "text": e.target_region.as_deref().unwrap_or("CT irradiation event"),
                },
                "extension": [{"url": DOSE_EVENT, "extension": ext}],
            });
            if let (Some(dlp), Some(obj)) = (e.dlp_mgy_cm, c.as_object_mut()) {
                obj.insert("valueQuantity".into(), mgy_cm(dlp));
            }
            c
        })
        .collect();
    let mut o = json!({
        "resourceType": "Observation",
        "id": "cumulative-dose",
        "status": "final",
        "code": {
            "coding": [{"system": "urn:gatewayd:safety", "code": "cumulative-ct-dlp"}],
            "text": format!("Cumulative CT DLP of {} days, {DOSE_LABEL}", dose.window_days),
        },
        "valueQuantity": mgy_cm(dose.total_dlp_mgy_cm),
        "note": [{"text": DOSE_LABEL}, {"text": DOSE_LABEL_JA}],
        "extension": [{"url": WINDOW_DAYS, "valueUnsignedInt": dose.window_days}],
        "component": components,
    });
    if let (Some(t), Some(obj)) = (dose.threshold_dlp_mgy_cm, o.as_object_mut()) {
        obj.insert("referenceRange".into(), json!([{"high": mgy_cm(t)}]));
    }
    o
}

/// The 409's OperationOutcome: one issue per warning, the dose as a contained Observation.
pub fn needs_acknowledgement(report: &SafetyReport) -> Value {
    let mut issues: Vec<Value> = report.warnings.iter().map(issue).collect();
    if issues.is_empty() {
        issues.push(
            json!({"severity": "warning", "code": "business-rule", "diagnostics": NEEDS_ACK}),
        );
    }
    let mut o = json!({"resourceType": "OperationOutcome", "issue": issues});
    if let (Some(dose), Some(obj)) = (&report.dose, o.as_object_mut()) {
        obj.insert("contained".into(), json!([dose_observation(dose)]));
    }
    o
}
