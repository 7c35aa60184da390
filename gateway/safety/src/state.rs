//! The safety store's state in memory and its ops: one code path live and at replay (the
//! journal holds ops; applying an op never fails).

use std::collections::BTreeMap;

use crate::contrast::Contrast;
use gateway_registry::SourceKey;
use serde::{Deserialize, Serialize};

use crate::DoseEvent;

/// Where a reaction was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An AL1 segment of ADT A01/A04/A08 (the list replaces the earlier AL1 entries).
    Al1,
    /// An IAM segment of ADT^A60 (added, updated, deleted one by one).
    Iam,
}

/// One recorded allergy or reaction of one source record. Holds patient data: `Debug` is
/// redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Reaction {
    /// Random, opaque (16 bytes hex); stable while the entry lives (warning ids use it).
    pub id: String,
    /// The hospital that sent it (the source record's hospital).
    pub hospital: String,
    pub allergen_code: String,
    pub allergen_text: String,
    pub allergen_system: String,
    /// AL1-2 / IAM-2 code (e.g. `DA`).
    pub allergen_type: String,
    /// AL1-4 / IAM-4 code (HL7 table 0128).
    pub severity: String,
    pub reactions: Vec<String>,
    /// IAM-11 onset date, else AL1-6 identification date, else IAM-13 reported date.
    pub onset: Option<String>,
    /// RFC 3339 UTC, when the store recorded it.
    pub recorded_at: String,
    pub origin: Origin,
    /// IAM-7 allergy unique identifier, when sent.
    pub iam_id: Option<String>,
    /// The contrast agent as [`crate::contrast::recognise`] read it when recorded.
    pub contrast: Option<Contrast>,
}

impl std::fmt::Debug for Reaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaction")
            .field("id", &self.id)
            .field("origin", &self.origin)
            .field("contrast", &self.contrast)
            .finish_non_exhaustive()
    }
}

impl Reaction {
    /// What identifies the allergen when no IAM-7 id does: code and system, else the text
    /// (folded for case and width).
    pub fn allergen_key(&self) -> String {
        allergen_key(
            &self.allergen_code,
            &self.allergen_system,
            &self.allergen_text,
        )
    }
}

/// See [`Reaction::allergen_key`].
pub fn allergen_key(code: &str, system: &str, text: &str) -> String {
    if code.trim().is_empty() {
        format!(
            "t:{}",
            gateway_identity::normalize::name(text).unwrap_or_default()
        )
    } else {
        format!("c:{}|{}", code.trim(), system.trim().to_ascii_uppercase())
    }
}

/// One dose event as recorded (under its Irradiation Event UID).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDose {
    pub source: SourceKey,
    pub event: DoseEvent,
    /// RFC 3339 UTC, when the store recorded it.
    pub recorded_at: String,
}

impl std::fmt::Debug for StoredDose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredDose").finish_non_exhaustive()
    }
}

/// One change, as journaled.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Adds `reaction` to `key`, replacing an entry with the same id.
    PutReaction { key: SourceKey, reaction: Reaction },
    /// Removes the entry `id` of `key`.
    RemoveReaction { key: SourceKey, id: String },
    /// Replaces every AL1-sourced entry of `key` with `reactions`.
    ReplaceAl1 {
        key: SourceKey,
        reactions: Vec<Reaction>,
    },
    /// Moves every reaction and dose event of `from` to `to` (A40 merge, A47 id change).
    Move { from: SourceKey, to: SourceKey },
    /// Records one dose event under its UID (first one wins).
    PutDose { uid: String, dose: StoredDose },
}

/// Everything the store holds.
#[derive(Debug, Default)]
pub struct State {
    pub reactions: BTreeMap<SourceKey, Vec<Reaction>>,
    /// By Irradiation Event UID.
    pub doses: BTreeMap<String, StoredDose>,
}

impl State {
    /// Applies one op (never fails: the journal only holds ops made from valid requests).
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::PutReaction { key, reaction } => {
                let list = self.reactions.entry(key).or_default();
                match list.iter_mut().find(|r| r.id == reaction.id) {
                    Some(r) => *r = reaction,
                    None => list.push(reaction),
                }
            }
            Op::RemoveReaction { key, id } => {
                if let Some(list) = self.reactions.get_mut(&key) {
                    list.retain(|r| r.id != id);
                    if list.is_empty() {
                        self.reactions.remove(&key);
                    }
                }
            }
            Op::ReplaceAl1 { key, reactions } => {
                let list = self.reactions.entry(key.clone()).or_default();
                list.retain(|r| r.origin != Origin::Al1);
                list.extend(reactions);
                if list.is_empty() {
                    self.reactions.remove(&key);
                }
            }
            Op::Move { from, to } => {
                if from == to {
                    return;
                }
                if let Some(moved) = self.reactions.remove(&from) {
                    let list = self.reactions.entry(to.clone()).or_default();
                    for r in moved {
                        if !list.iter().any(|x| x.id == r.id) {
                            list.push(r);
                        }
                    }
                }
                for d in self.doses.values_mut() {
                    if d.source == from {
                        d.source = to.clone();
                    }
                }
            }
            Op::PutDose { uid, dose } => {
                self.doses.entry(uid).or_insert(dose);
            }
        }
    }

    /// The ops that rebuild this state (for a compaction), `chunk` at a time.
    pub fn snapshot_ops(&self) -> Vec<Op> {
        let reactions = self.reactions.iter().flat_map(|(key, list)| {
            list.iter().map(|r| Op::PutReaction {
                key: key.clone(),
                reaction: r.clone(),
            })
        });
        let doses = self.doses.iter().map(|(uid, dose)| Op::PutDose {
            uid: uid.clone(),
            dose: dose.clone(),
        });
        reactions.chain(doses).collect()
    }

    /// Reactions held, in all.
    pub fn reaction_count(&self) -> usize {
        self.reactions.values().map(Vec::len).sum()
    }

    /// What the store holds of `keys`.
    pub fn of(&self, keys: &[SourceKey]) -> Vec<Held> {
        keys.iter()
            .map(|key| Held {
                key: key.clone(),
                reactions: self.reactions.get(key).cloned().unwrap_or_default(),
                doses: self
                    .doses
                    .values()
                    .filter(|d| &d.source == key)
                    .cloned()
                    .collect(),
            })
            .collect()
    }
}

/// What the store holds of one source record.
#[derive(Debug, Clone)]
pub struct Held {
    pub key: SourceKey,
    pub reactions: Vec<Reaction>,
    pub doses: Vec<StoredDose>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn key(h: &str, p: &str) -> SourceKey {
        SourceKey {
            hospital_id: h.into(),
            patient_id: p.into(),
        }
    }

    fn reaction(id: &str, origin: Origin) -> Reaction {
        Reaction {
            id: id.into(),
            hospital: "h".into(),
            allergen_code: String::new(),
            allergen_text: "iohexol".into(),
            allergen_system: String::new(),
            allergen_type: String::new(),
            severity: String::new(),
            reactions: vec![],
            onset: None,
            recorded_at: String::new(),
            origin,
            iam_id: None,
            contrast: None,
        }
    }

    #[test]
    fn al1_replace_keeps_iam_entries_and_move_carries_everything() {
        let mut s = State::default();
        let a = key("h", "1");
        s.apply(Op::PutReaction {
            key: a.clone(),
            reaction: reaction("iam", Origin::Iam),
        });
        s.apply(Op::ReplaceAl1 {
            key: a.clone(),
            reactions: vec![reaction("al1a", Origin::Al1), reaction("al1b", Origin::Al1)],
        });
        s.apply(Op::ReplaceAl1 {
            key: a.clone(),
            reactions: vec![reaction("al1c", Origin::Al1)],
        });
        let ids: Vec<_> = s.reactions[&a].iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["iam", "al1c"]);
        let b = key("h", "2");
        s.apply(Op::Move {
            from: a.clone(),
            to: b.clone(),
        });
        assert!(!s.reactions.contains_key(&a));
        assert_eq!(s.reactions[&b].len(), 2);
        assert_eq!(s.snapshot_ops().len(), 2);
    }
}
