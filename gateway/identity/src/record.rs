//! A source record: one hospital's record of one patient.

use serde::{Deserialize, Serialize};

/// One hospital's record of a patient. Every field may be missing; names may be stored
/// unsplit in the family fields. `Debug` shows no value (patient identity).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    pub hospital_id: Option<String>,
    pub patient_id: Option<String>,
    pub family_name: Option<String>,
    pub given_name: Option<String>,
    pub family_kana: Option<String>,
    pub given_kana: Option<String>,
    pub sex: Option<String>,
    pub birth_date: Option<String>,
    pub address: Option<String>,
    pub postal_code: Option<String>,
    pub phone: Option<String>,
    pub insurer_number: Option<String>,
    pub insurance_symbol: Option<String>,
    pub insurance_number: Option<String>,
    pub insurance_branch: Option<String>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Record(..)")
    }
}
