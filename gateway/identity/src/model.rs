//! The Fellegi-Sunter parameters: for each comparison field, the probability of each
//! agreement level among true matches (`m`) and among non-matches (`u`), and the two
//! thresholds on the match weight.
//!
//! The built-in default ([`Model::default`]) is a hand-set prior; where each number comes
//! from is said beside it. [`crate::learn`] refines `m`, `u` and `lambda` from a
//! registry by EM and keeps the thresholds.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The comparison fields, in the order of [`Model::fields`] and of a comparison vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Family name (kanji and kana read together): exact, same reading / different
    /// kanji, similar, different.
    Family = 0,
    /// Given name, same levels as the family name.
    Given = 1,
    /// Birth date: exact; day or month differs, day/month swapped, or year differs by
    /// under 10; partial (same year, or same day and month a decade or more apart);
    /// different.
    BirthDate = 2,
    /// Sex: same, different.
    Sex = 3,
    /// Residence (address, else postal code): same dwelling, same 丁目/番, same town,
    /// different.
    Residence = 4,
    /// Phone (full or last 8 digits): same, different.
    Phone = 5,
    /// Insurance: same insurer/symbol/number/branch, same but the branch (a family member),
    /// different.
    Insurance = 6,
}

/// Number of comparison fields.
pub const FIELDS: usize = 7;

/// Levels per field, in [`Field`] order.
pub const LEVELS: [usize; FIELDS] = [4, 4, 4, 2, 4, 2, 3];

/// m and u of one field, one entry per agreement level (level 0 = best agreement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldParams {
    pub m: Vec<f64>,
    pub u: Vec<f64>,
}

impl FieldParams {
    /// log2(m/u) of a level; 0 for a level the parameters do not have.
    pub fn weight(&self, level: usize) -> f64 {
        match (self.m.get(level), self.u.get(level)) {
            (Some(m), Some(u)) => log2_ratio(*m, *u),
            _ => 0.0,
        }
    }
}

pub(crate) fn log2_ratio(m: f64, u: f64) -> f64 {
    (m.max(1e-9) / u.max(1e-9)).log2()
}

/// The matcher's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Score at or above which two records are linked.
    pub link_threshold: f64,
    /// Score at or above which (and below `link_threshold`) a person reviews.
    pub review_threshold: f64,
    /// Prior share of true matches among blocked candidate pairs (EM's lambda).
    #[serde(default = "default_lambda")]
    pub lambda: f64,
    /// m/u per field, in [`Field`] order.
    #[serde(default = "default_fields")]
    pub fields: Vec<FieldParams>,
}

fn default_lambda() -> f64 {
    0.01
}

fn fp(m: &[f64], u: &[f64]) -> FieldParams {
    FieldParams {
        m: m.to_vec(),
        u: u.to_vec(),
    }
}

/// The hand-set prior.
///
/// m: shares among true matches of Japanese hospital records, as the record-linkage
/// literature on clinical registries reports them (names exact ~90 %, a few percent
/// variant kanji or kana only, ~3-5 % family name changed by marriage; birth date exact
/// ~95 % with most errors one field or a day/month swap; addresses and phones change
/// over years, so only 60-70 % agree; insurance changes with a job).
/// u: chance agreement of two different people: names from the surname/given name
/// distributions (the exact level is replaced by the value's frequency, see
/// [`crate::Frequencies`]); birth date 1/(365 x ~90 years); sex 1/2; a dwelling shared by
/// a household among ~10^4 addresses of a town's catchment; phone 1e-4 (households and
/// care homes share one); an insurance number is personal with its branch, shared by a
/// family without.
fn default_fields() -> Vec<FieldParams> {
    vec![
        // Family: exact, same reading, similar, different (marriage keeps m high).
        fp(&[0.88, 0.03, 0.04, 0.05], &[0.0008, 0.0004, 0.004, 0.9948]),
        // Given.
        fp(&[0.92, 0.03, 0.04, 0.01], &[0.0008, 0.0004, 0.003, 0.9958]),
        // Birth date: exact, one field / swap, partial, different.
        fp(
            &[0.95, 0.04, 0.005, 0.005],
            &[0.00004, 0.004, 0.011, 0.98496],
        ),
        // Sex.
        fp(&[0.99, 0.01], &[0.5, 0.5]),
        // Residence: dwelling, block, town, different.
        fp(&[0.55, 0.1, 0.1, 0.25], &[0.0001, 0.0005, 0.01, 0.9894]),
        // Phone.
        fp(&[0.6, 0.4], &[0.0001, 0.9999]),
        // Insurance: same, same household (branch differs), different.
        fp(&[0.5, 0.01, 0.49], &[0.00001, 0.0001, 0.99989]),
    ]
}

impl Default for Model {
    fn default() -> Self {
        Self {
            link_threshold: 20.0,
            review_threshold: 8.0,
            lambda: default_lambda(),
            fields: default_fields(),
        }
    }
}

impl Model {
    /// Reads a model saved as JSON.
    pub fn load(path: &std::path::Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let model: Model = serde_json::from_str(&text).map_err(|source| ModelError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        model.check().map_err(|reason| ModelError::Invalid {
            path: path.display().to_string(),
            reason,
        })?;
        Ok(model)
    }

    /// Writes the model as JSON (the form [`Model::load`] reads).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let text = serde_json::to_string_pretty(self).map_err(|source| ModelError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(path, text).map_err(|source| ModelError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// The shape a comparison needs: every field with its levels, probabilities in [0, 1].
    fn check(&self) -> Result<(), &'static str> {
        if self.fields.len() != FIELDS {
            return Err("wrong number of fields");
        }
        for (f, n) in self.fields.iter().zip(LEVELS) {
            if f.m.len() != n || f.u.len() != n {
                return Err("wrong number of levels");
            }
            if f.m.iter().chain(&f.u).any(|p| !(0.0..=1.0).contains(p)) {
                return Err("a probability outside [0, 1]");
            }
        }
        if !self.link_threshold.is_finite() || !self.review_threshold.is_finite() {
            return Err("thresholds must be numbers");
        }
        Ok(())
    }
}
