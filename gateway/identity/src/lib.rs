//! Patient identity matching across hospitals (名寄せ). Pure computation: no files, no
//! network, no async; the registry (`gateway-registry`) and `gatewayd identity match` use it.
//!
//! - [`record`]: the source record (`hospital_id, patient_id`, demographics), as the
//!   `identity match --pairs` JSON carries it.
//! - [`Matcher`]: compares two records and decides [`Decision::Link`], [`Decision::Review`]
//!   or [`Decision::Distinct`] with a score (the Fellegi-Sunter match weight, log2).
//! - [`Index`]: the blocking index, so a new record is compared with a small candidate set.
//! - [`Model`]: the parameters (m/u per comparison level, thresholds), with built-in defaults,
//!   learnt from a registry by EM ([`learn`]) and saved/loaded as JSON.
//!
//! Records carry patient identity: nothing here logs, and `Debug` of a record shows no value.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod record;

pub use record::Record;

use serde::{Deserialize, Serialize};

/// What a comparison of two records decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The same person: linked without a person looking.
    Link,
    /// Maybe: a person decides at the kiosk.
    Review,
    /// Different people.
    Distinct,
}

/// The result of comparing two records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub decision: Decision,
    /// The match weight (sum of log2 likelihood ratios); higher is more alike.
    pub score: f64,
}

/// Loading or saving a model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("model {path}: not a model file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// The matcher's parameters. SKELETON: replaced by the Fellegi-Sunter model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Score at or above which two records are linked.
    pub link_threshold: f64,
    /// Score at or above which (and below `link_threshold`) a person reviews.
    pub review_threshold: f64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            link_threshold: 10.0,
            review_threshold: 0.0,
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
        serde_json::from_str(&text).map_err(|source| ModelError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

/// A record normalised once for comparison and blocking. SKELETON.
#[derive(Clone)]
pub struct Prepared {
    name: String,
    birth_date: String,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared(..)")
    }
}

/// Compares records under a [`Model`]. SKELETON: exact name + birth date.
#[derive(Debug, Clone)]
pub struct Matcher {
    model: Model,
}

impl Matcher {
    pub fn new(model: Model) -> Self {
        Self { model }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Normalises a record once (kana, kanji variants, dates, digits...).
    pub fn prepare(&self, r: &Record) -> Prepared {
        let name = format!(
            "{}{}",
            r.family_kana.as_deref().unwrap_or(""),
            r.given_kana.as_deref().unwrap_or("")
        );
        Prepared {
            name,
            birth_date: r.birth_date.clone().unwrap_or_default(),
        }
    }

    pub fn compare_prepared(&self, a: &Prepared, b: &Prepared) -> Comparison {
        let score = if !a.name.is_empty() && a.name == b.name && a.birth_date == b.birth_date {
            20.0
        } else {
            -20.0
        };
        self.decide(score)
    }

    pub fn compare(&self, a: &Record, b: &Record) -> Comparison {
        self.compare_prepared(&self.prepare(a), &self.prepare(b))
    }

    fn decide(&self, score: f64) -> Comparison {
        let decision = if score >= self.model.link_threshold {
            Decision::Link
        } else if score >= self.model.review_threshold {
            Decision::Review
        } else {
            Decision::Distinct
        };
        Comparison { decision, score }
    }
}

/// The blocking index over prepared records, keyed by the caller's id. SKELETON: one
/// block per birth date.
#[derive(Debug, Default)]
pub struct Index<K> {
    blocks: std::collections::HashMap<String, Vec<K>>,
}

impl<K: Clone + PartialEq> Index<K> {
    pub fn new() -> Self {
        Self {
            blocks: std::collections::HashMap::new(),
        }
    }

    pub fn insert(&mut self, key: K, p: &Prepared) {
        self.blocks
            .entry(p.birth_date.clone())
            .or_default()
            .push(key);
    }

    pub fn remove(&mut self, key: &K, p: &Prepared) {
        if let Some(v) = self.blocks.get_mut(&p.birth_date) {
            v.retain(|k| k != key);
        }
    }

    /// The keys worth comparing with `p` (each at most once).
    pub fn candidates(&self, p: &Prepared) -> Vec<K> {
        self.blocks.get(&p.birth_date).cloned().unwrap_or_default()
    }
}

/// Learns a model from a registry's records by EM. SKELETON: the default.
pub fn learn<'a>(_records: impl IntoIterator<Item = &'a Record>) -> Model {
    Model::default()
}
