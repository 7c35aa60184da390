//! Patient identity matching across hospitals (名寄せ). Pure computation apart from the
//! command-line helpers of [`cli`] (JSON lines in and out) and [`Model::load`]/[`Model::save`];
//! no network, no async; the registry (`gateway-registry`) and `gatewayd identity` use it.
//!
//! - [`record`]: the source record (`hospital_id, patient_id`, demographics), as the
//!   `identity match --pairs` JSON carries it (lenient: numbers as text, null missing).
//! - [`normalize`]: Japanese normalisation (異体字, kana, long vowels, era dates,
//!   addresses, phones).
//! - [`Matcher`] (module `matcher`): the comparison vector of two [`Prepared`] records, its
//!   Fellegi-Sunter weight (log2 m/u summed, missing fields 0, exact names weighed by
//!   their [`Frequencies`]), the decision [`Decision::Link`], [`Decision::Review`] or
//!   [`Decision::Distinct`] against the model's thresholds, and the look-alike guards
//!   (twins, parent/child, namesakes) that can only lower it.
//! - [`Index`]: the blocking index, so a new record is compared with a small candidate set.
//! - [`Model`]: m/u per comparison level and the thresholds, with a documented built-in
//!   default, learnt from a registry by EM ([`learn`]) and saved/loaded as JSON.
//! - [`cli`]: `identity match|learn|search`.
//!
//! Records carry patient identity: nothing here logs, errors never carry a value, and
//! `Debug` of a record or a prepared record shows no value. No input panics.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod cli;
pub mod em;
pub mod freq;
pub mod index;
pub mod matcher;
pub mod model;
pub mod normalize;
pub mod record;

pub use em::learn;
pub use freq::Frequencies;
pub use index::Index;
pub use matcher::{Levels, Matcher, Prepared};
pub use model::{Field, FieldParams, Model};
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
    #[error("model {path}: {reason}")]
    Invalid { path: String, reason: &'static str },
    #[error("model {path}: writing: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}
