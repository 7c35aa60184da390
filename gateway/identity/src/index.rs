//! The blocking index: each record is filed under several keys, so that a typing error in
//! one field does not hide the true match, and a new record is compared only with the
//! records sharing a key with it.
//!
//! Keys: birth date; kana full name; kanji full name; family (kana, else kanji) + birth
//! year; given (kana, else kanji) + birth month/day; given + birth year; phone last 8
//! digits; insurer + insurance number; postal code + first kana of the given name.
//! Keys are 64-bit hashes (tagged by kind), ids are `u32` slots. A block larger than
//! [`BLOCK_CAP`] (a key too common to discriminate, e.g. one phone of a care home in a
//! large registry) is skipped at query time: the other keys still find the match.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use crate::matcher::Prepared;

/// Largest block still read for candidates.
pub const BLOCK_CAP: usize = 400;

fn key(kind: u8, parts: &[&dyn HashPart]) -> u64 {
    let mut h = DefaultHasher::new();
    kind.hash(&mut h);
    for p in parts {
        p.put(&mut h);
    }
    h.finish()
}

trait HashPart {
    fn put(&self, h: &mut DefaultHasher);
}
impl<T: Hash> HashPart for T {
    fn put(&self, h: &mut DefaultHasher) {
        self.hash(h);
    }
}

/// The blocking keys of a prepared record (deduplicated).
pub fn block_keys(p: &Prepared) -> Vec<u64> {
    let mut keys = Vec::with_capacity(10);
    let dob = p.birth_date;
    if let Some(d) = dob {
        keys.push(key(1, &[&d.year, &d.month, &d.day]));
    }
    if let (Some(_), Some(_)) = (&p.family_kana, &p.given_kana)
        && let Some(full) = p.full_kana()
    {
        keys.push(key(2, &[&full]));
    }
    if let (Some(_), Some(_)) = (&p.family, &p.given)
        && let Some(full) = p.full()
    {
        keys.push(key(3, &[&full]));
    }
    let family = p.family_kana.as_deref().or(p.family.as_deref());
    let given = p.given_kana.as_deref().or(p.given.as_deref());
    if let (Some(f), Some(d)) = (family, dob) {
        keys.push(key(4, &[&f, &d.year]));
    }
    if let (Some(g), Some(d)) = (given, dob) {
        keys.push(key(5, &[&g, &d.month, &d.day]));
        keys.push(key(6, &[&g, &d.year]));
    }
    if let Some(ph) = p.phone.as_deref() {
        let tail = ph.get(ph.len().saturating_sub(8)..).unwrap_or(ph);
        keys.push(key(7, &[&tail]));
    }
    if let Some(ins) = &p.insurance {
        keys.push(key(8, &[&ins.insurer, &ins.number]));
    }
    if let (Some(postal), Some(first)) = (p.postal, given.and_then(|g| g.chars().next())) {
        keys.push(key(9, &[&postal, &first]));
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The blocking index over prepared records, keyed by the caller's id.
#[derive(Debug)]
pub struct Index<K> {
    blocks: HashMap<u64, Vec<u32>>,
    slots: Vec<Option<K>>,
    free: Vec<u32>,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self {
            blocks: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Clone + PartialEq> Index<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records filed.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Files `key` under the blocking keys of `p` (insert it again after a change, with
    /// [`Index::remove`] of the old prepared form first).
    pub fn insert(&mut self, key: K, p: &Prepared) {
        let slot = match self.free.pop() {
            Some(s) => {
                if let Some(v) = self.slots.get_mut(s as usize) {
                    *v = Some(key);
                }
                s
            }
            None => {
                let Ok(s) = u32::try_from(self.slots.len()) else {
                    return; // 4 billion records: beyond any registry; not filed.
                };
                self.slots.push(Some(key));
                s
            }
        };
        for k in block_keys(p) {
            self.blocks.entry(k).or_default().push(slot);
        }
    }

    /// Removes `key`, filed with the prepared form `p`.
    pub fn remove(&mut self, key: &K, p: &Prepared) {
        let mut freed = HashSet::new();
        for k in block_keys(p) {
            let Some(block) = self.blocks.get_mut(&k) else {
                continue;
            };
            let slots = &self.slots;
            block.retain(|s| {
                let hit = slots.get(*s as usize).and_then(Option::as_ref) == Some(key);
                if hit {
                    freed.insert(*s);
                }
                !hit
            });
            if block.is_empty() {
                self.blocks.remove(&k);
            }
        }
        for s in freed {
            if let Some(v) = self.slots.get_mut(s as usize) {
                *v = None;
                self.free.push(s);
            }
        }
    }

    /// The keys worth comparing with `p` (each at most once).
    pub fn candidates(&self, p: &Prepared) -> Vec<K> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for k in block_keys(p) {
            let Some(block) = self.blocks.get(&k) else {
                continue;
            };
            if block.len() > BLOCK_CAP {
                continue;
            }
            for s in block {
                if seen.insert(*s)
                    && let Some(Some(key)) = self.slots.get(*s as usize)
                {
                    out.push(key.clone());
                }
            }
        }
        out
    }
}
