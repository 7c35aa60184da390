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
use std::hash::{BuildHasherDefault, Hash, Hasher};

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
    if let Some(ph) = p.phone {
        match ph.tail8 {
            Some(tail) => keys.push(key(7, &[&tail])),
            None => keys.push(key(10, &[&ph.full])),
        }
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

/// The keys are already hashes: the map uses them as they are.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Blocks = HashMap<u64, Block, BuildHasherDefault<KeyHasher>>;

/// A block: the head of its posting list in the arena and its length.
#[derive(Debug, Clone, Copy)]
struct Block {
    head: u32,
    len: u32,
}

/// One record in one block: its slot and the next posting of the block.
#[derive(Debug, Clone, Copy)]
struct Posting {
    slot: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;

/// The blocking index over prepared records, keyed by the caller's id. Memory: per block a
/// map entry of 16 bytes, per (record, key) an 8-byte posting in one arena, per record its
/// key `K`.
#[derive(Debug)]
pub struct Index<K> {
    blocks: Blocks,
    postings: Vec<Posting>,
    free_postings: Vec<u32>,
    slots: Vec<Option<K>>,
    free: Vec<u32>,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self {
            blocks: Blocks::default(),
            postings: Vec::new(),
            free_postings: Vec::new(),
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

    fn posting(&mut self, p: Posting) -> Option<u32> {
        if let Some(i) = self.free_postings.pop() {
            if let Some(x) = self.postings.get_mut(i as usize) {
                *x = p;
            }
            return Some(i);
        }
        let i = u32::try_from(self.postings.len())
            .ok()
            .filter(|i| *i != NIL)?;
        self.postings.push(p);
        Some(i)
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
            let head = self.blocks.get(&k).map_or(NIL, |b| b.head);
            let Some(i) = self.posting(Posting { slot, next: head }) else {
                return;
            };
            let b = self.blocks.entry(k).or_insert(Block { head: NIL, len: 0 });
            b.head = i;
            b.len = b.len.saturating_add(1);
        }
    }

    /// Removes `key`, filed with the prepared form `p`.
    pub fn remove(&mut self, key: &K, p: &Prepared) {
        let mut freed = HashSet::new();
        for k in block_keys(p) {
            let Some(mut block) = self.blocks.get(&k).copied() else {
                continue;
            };
            let (mut prev, mut cur) = (NIL, block.head);
            while let Some(post) = self.postings.get(cur as usize).copied() {
                let hit = self.slots.get(post.slot as usize).and_then(Option::as_ref) == Some(key);
                if hit {
                    freed.insert(post.slot);
                    if prev == NIL {
                        block.head = post.next;
                    } else if let Some(pp) = self.postings.get_mut(prev as usize) {
                        pp.next = post.next;
                    }
                    block.len = block.len.saturating_sub(1);
                    self.free_postings.push(cur);
                } else {
                    prev = cur;
                }
                cur = post.next;
            }
            if block.len == 0 {
                self.blocks.remove(&k);
            } else {
                self.blocks.insert(k, block);
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
            if block.len as usize > BLOCK_CAP {
                continue;
            }
            let mut cur = block.head;
            while let Some(post) = self.postings.get(cur as usize) {
                if seen.insert(post.slot)
                    && let Some(Some(key)) = self.slots.get(post.slot as usize)
                {
                    out.push(key.clone());
                }
                cur = post.next;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    fn prepared(given: &str) -> Prepared {
        Prepared::new(&Record {
            family_name: Some("山田".into()),
            given_name: Some(given.into()),
            birth_date: Some("1980-01-02".into()),
            ..Record::default()
        })
    }

    #[test]
    fn remove_unlinks_from_the_middle_of_a_block_and_slots_are_reused() {
        let mut index = Index::new();
        let ps: Vec<Prepared> = ["一郎", "二郎", "三郎"]
            .iter()
            .map(|g| prepared(g))
            .collect();
        for (i, p) in ps.iter().enumerate() {
            index.insert(i, p);
        }
        let mut c = index.candidates(&ps[0]);
        c.sort_unstable();
        assert_eq!(c, [0, 1, 2]);
        index.remove(&1, &ps[1]);
        let mut c = index.candidates(&ps[0]);
        c.sort_unstable();
        assert_eq!(c, [0, 2]);
        assert_eq!(index.len(), 2);
        index.insert(7, &ps[1]);
        let mut c = index.candidates(&ps[1]);
        c.sort_unstable();
        assert_eq!(c, [0, 2, 7]);
        assert_eq!(index.slots.len(), 3, "the freed slot is reused");
        for (k, p) in [(0, &ps[0]), (2, &ps[2]), (7, &ps[1])] {
            index.remove(&k, p);
        }
        assert!(index.is_empty());
        assert!(index.blocks.is_empty());
    }

    #[test]
    fn a_block_over_the_cap_is_not_read() {
        let mut index = Index::new();
        let p = prepared("一郎");
        for i in 0..=BLOCK_CAP {
            index.insert(i, &p);
        }
        // Every key of p is shared by all: every block is over the cap.
        assert!(index.candidates(&p).is_empty());
    }
}
