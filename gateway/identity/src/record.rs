//! A source record: one hospital's record of one patient.
//!
//! Deserialisation is lenient, as records come from many systems: a number is taken as its
//! text, `null` as missing, unknown extra fields are ignored. An object or array where a
//! field's text is expected is refused.

use serde::{Deserialize, Deserializer, Serialize};

/// One hospital's record of a patient. Every field may be missing; names may be stored
/// unsplit in the family fields. `Debug` shows no value (patient identity).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    #[serde(deserialize_with = "lenient")]
    pub hospital_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub patient_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub family_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub given_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub family_kana: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub given_kana: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub sex: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub birth_date: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub address: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub postal_code: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub phone: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub insurer_number: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub insurance_symbol: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub insurance_number: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub insurance_branch: Option<String>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Record(..)")
    }
}

/// A field's text: a string, a number (its text), a boolean (its text) or null (missing).
#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient {
    Text(String),
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
}

/// Deserialises an optional text field leniently (see the module docs).
pub fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Lenient>::deserialize(d)?.map(|v| match v {
        Lenient::Text(s) => s,
        Lenient::Int(n) => n.to_string(),
        Lenient::Uint(n) => n.to_string(),
        Lenient::Float(n) => n.to_string(),
        Lenient::Bool(b) => b.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_text_null_is_missing_extra_fields_ignored() {
        let r: Record = serde_json::from_str(
            r#"{"patient_id": 12345, "phone": null, "postal_code": "1600023", "extra": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(r.patient_id.as_deref(), Some("12345"));
        assert_eq!(r.phone, None);
        assert_eq!(r.postal_code.as_deref(), Some("1600023"));
        assert!(serde_json::from_str::<Record>(r#"{"phone": {"x": 1}}"#).is_err());
        assert_eq!(format!("{r:?}"), "Record(..)");
    }
}
