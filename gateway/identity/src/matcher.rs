//! Comparison of two prepared records: the comparison vector (one agreement level per
//! field), its Fellegi-Sunter weight with term-frequency adjustment for names, and the
//! decision.
//!
//! The decision is the weight against the model's thresholds, then the look-alike
//! guards, which only ever lower it (each is a case where the fields are not independent,
//! so the summed weight overstates the evidence):
//! - given names that differ in both scripts (twins, siblings, spouses, care-home
//!   residents) -> distinct; given names only similar (twins named 翔太/翔平) -> review at
//!   most;
//! - birth dates that differ in two fields or more (parent and child with one given name)
//!   -> distinct; birth date only partly the same (the same year, or the same day of the
//!   year a decade or more apart) or missing on a side -> review at most;
//! - no contact field (dwelling or 丁目-番, phone, insurance) agrees (namesakes born the
//!   same day, whether their contact fields differ or are missing) -> review at most.

use crate::freq::Frequencies;
use crate::model::{FIELDS, Field, Model};
use crate::normalize::{self, Address, Date};
use crate::{Comparison, Decision, Record};

/// Insurance identifiers as numbers (leading zeros dropped; the symbol folded and hashed):
/// only compared for equality, and held inline so a million records stay small.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Insurance {
    pub insurer: Option<u64>,
    pub symbol: Option<u64>,
    pub number: u64,
    pub branch: Option<u64>,
}

/// A phone number: its digits as a number (a missing trunk 0 does not matter) and its last
/// 8 digits (a landline with or without the area code, a mobile).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Phone {
    pub full: u64,
    pub tail8: Option<u32>,
}

/// A digit string as a number; longer than 18 digits: a hash with the top bit set.
fn code(digits: &str) -> u64 {
    let t = digits.trim_start_matches('0');
    if t.len() <= 18 {
        t.parse().unwrap_or(0)
    } else {
        hash(t) | (1 << 63)
    }
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn phone(digits: &str) -> Phone {
    let tail8 = (digits.len() >= 8)
        .then(|| digits.get(digits.len() - 8..).and_then(|t| t.parse().ok()))
        .flatten();
    Phone {
        full: code(digits),
        tail8,
    }
}

/// A record normalised once for comparison and blocking. `Debug` shows no value.
#[derive(Clone, Default)]
pub struct Prepared {
    pub(crate) family: Option<Box<str>>,
    pub(crate) given: Option<Box<str>>,
    pub(crate) family_kana: Option<Box<str>>,
    pub(crate) given_kana: Option<Box<str>>,
    pub(crate) birth_date: Option<Date>,
    pub(crate) sex: Option<u8>,
    pub(crate) address: Option<Address>,
    pub(crate) postal: Option<u32>,
    pub(crate) phone: Option<Phone>,
    pub(crate) insurance: Option<Insurance>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared(..)")
    }
}

fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn boxed(s: Option<String>) -> Option<Box<str>> {
    s.map(String::into_boxed_str)
}

/// Family and given of one script, splitting a name stored whole in the family field.
fn name_pair(family: Option<&str>, given: Option<&str>) -> (Option<Box<str>>, Option<Box<str>>) {
    match (family, given) {
        (Some(f), None) => match normalize::split_name(f) {
            Some((f, g)) => (boxed(normalize::name(&f)), boxed(normalize::name(&g))),
            None => (boxed(normalize::name(f)), None),
        },
        (None, Some(g)) => match normalize::split_name(g) {
            Some((f, g)) => (boxed(normalize::name(&f)), boxed(normalize::name(&g))),
            None => (None, boxed(normalize::name(g))),
        },
        (f, g) => (
            f.and_then(normalize::name).map(String::into_boxed_str),
            g.and_then(normalize::name).map(String::into_boxed_str),
        ),
    }
}

impl Prepared {
    /// Normalises a record (see [`crate::normalize`]).
    pub fn new(r: &Record) -> Self {
        let (family, given) = name_pair(present(&r.family_name), present(&r.given_name));
        let (family_kana, given_kana) = name_pair(present(&r.family_kana), present(&r.given_kana));
        let digits = |v: &Option<String>| present(v).and_then(normalize::digits);
        let insurance = digits(&r.insurance_number).map(|number| Insurance {
            insurer: digits(&r.insurer_number).map(|d| code(&d)),
            symbol: present(&r.insurance_symbol)
                .and_then(normalize::token)
                .map(|t| hash(&t)),
            number: code(&number),
            branch: digits(&r.insurance_branch).map(|d| code(&d)),
        });
        Self {
            family,
            given,
            family_kana,
            given_kana,
            birth_date: present(&r.birth_date).and_then(normalize::date),
            sex: present(&r.sex).and_then(normalize::sex),
            address: present(&r.address).and_then(normalize::address),
            postal: present(&r.postal_code).and_then(normalize::postal),
            phone: present(&r.phone)
                .and_then(normalize::phone)
                .map(|d| phone(&d)),
            insurance,
        }
    }

    /// The folded full name in kanji (family + given), if any part is present.
    pub(crate) fn full(&self) -> Option<String> {
        join(self.family.as_deref(), self.given.as_deref())
    }

    /// The folded full name in kana.
    pub(crate) fn full_kana(&self) -> Option<String> {
        join(self.family_kana.as_deref(), self.given_kana.as_deref())
    }
}

fn join(a: Option<&str>, b: Option<&str>) -> Option<String> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(format!("{}{}", a.unwrap_or(""), b.unwrap_or(""))),
    }
}

/// The comparison vector: one level per field (`None` = not comparable: missing on a
/// side). Level 0 is the best agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Levels(pub [Option<u8>; FIELDS]);

impl Levels {
    pub fn get(&self, f: Field) -> Option<u8> {
        self.0.get(f as usize).copied().flatten()
    }
}

/// Edit distance, capped: returns early once it exceeds 2.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    if a.len().abs_diff(b.len()) > 2 {
        return 3;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        if let Some(c0) = cur.first_mut() {
            *c0 = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            if let Some(c) = cur.get_mut(j + 1) {
                *c = sub.min(del).min(ins);
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev.last().copied().unwrap_or(0)
}

/// Jaro-Winkler similarity on chars.
fn jaro_winkler(a: &[char], b: &[char]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let window = (a.len().max(b.len()) / 2).saturating_sub(1);
    let mut b_used = vec![false; b.len()];
    let mut a_match = Vec::new();
    for (i, ca) in a.iter().enumerate() {
        let lo = i.saturating_sub(window);
        let hi = (i + window + 1).min(b.len());
        for j in lo..hi {
            if b_used.get(j) == Some(&false) && b.get(j) == Some(ca) {
                if let Some(u) = b_used.get_mut(j) {
                    *u = true;
                }
                a_match.push(*ca);
                break;
            }
        }
    }
    let m = a_match.len();
    if m == 0 {
        return 0.0;
    }
    let b_match: Vec<char> = b
        .iter()
        .zip(&b_used)
        .filter(|(_, u)| **u)
        .map(|(c, _)| *c)
        .collect();
    let transpositions = a_match.iter().zip(&b_match).filter(|(x, y)| x != y).count() / 2;
    let m = m as f64;
    let jaro = (m / a.len() as f64 + m / b.len() as f64 + (m - transpositions as f64) / m) / 3.0;
    let prefix = a.iter().zip(b).take(4).take_while(|(x, y)| x == y).count() as f64;
    jaro + prefix * 0.1 * (1.0 - jaro)
}

/// Typing-error distance: Jaro-Winkler >= 0.9 or one edit.
pub(crate) fn similar(a: &str, b: &str) -> bool {
    if a.len() > 256 || b.len() > 256 {
        return a == b;
    }
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    edit_distance(&a, &b) <= 1 || jaro_winkler(&a, &b) >= 0.9
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Agree {
    Same,
    Similar,
    Different,
    Missing,
}

fn agree(a: Option<&str>, b: Option<&str>) -> Agree {
    match (a, b) {
        (Some(a), Some(b)) if a == b => Agree::Same,
        (Some(a), Some(b)) if similar(a, b) => Agree::Similar,
        (Some(_), Some(_)) => Agree::Different,
        _ => Agree::Missing,
    }
}

/// The name level from the kanji and the kana agreement: 0 exact, 1 same reading and
/// different kanji, 2 similar (a typo), 3 different.
fn name_level(kanji: Agree, kana: Agree) -> Option<u8> {
    use Agree::*;
    Some(match (kanji, kana) {
        (Same, Same | Similar | Missing) => 0,
        (Same, Different) => 2,
        (Similar | Different, Same) => 1,
        (Similar, Similar | Missing) => 2,
        (Missing, Same) => 0,
        (Missing, Similar) => 2,
        (Missing, Missing) => return None,
        _ => 3,
    })
}

/// Splits an unsplit full name `whole` by the other side's family or given name.
fn split_by(whole: &str, family: Option<&str>, given: Option<&str>) -> Option<(String, String)> {
    if let Some(f) = family.filter(|f| !f.is_empty())
        && let Some(rest) = whole.strip_prefix(f)
    {
        return Some((f.to_string(), rest.to_string()));
    }
    if let Some(g) = given.filter(|g| !g.is_empty())
        && let Some(head) = whole.strip_suffix(g)
    {
        return Some((head.to_string(), g.to_string()));
    }
    None
}

/// One script's (family, given) of one side; also the (family, given) values an exact
/// agreement is weighed by.
type Parts = (Option<String>, Option<String>);

/// The (family, given) levels.
type NameLevels = (Option<u8>, Option<u8>);

fn align(a: (Option<&str>, Option<&str>), b: (Option<&str>, Option<&str>)) -> (Parts, Parts) {
    let own = |x: (Option<&str>, Option<&str>)| (x.0.map(str::to_string), x.1.map(str::to_string));
    match (a, b) {
        ((Some(whole), None), (f, g @ Some(_))) => match split_by(whole, f, g) {
            Some((f2, g2)) => ((Some(f2), Some(g2)), own(b)),
            None => (own(a), own(b)),
        },
        ((f, g @ Some(_)), (Some(whole), None)) => match split_by(whole, f, g) {
            Some((f2, g2)) => (own(a), (Some(f2), Some(g2))),
            None => (own(a), own(b)),
        },
        _ => (own(a), own(b)),
    }
}

/// Family and given levels, and the values an exact agreement is weighed by (its term
/// frequency).
fn names(a: &Prepared, b: &Prepared) -> (NameLevels, Parts) {
    let (ka, kb) = align(
        (a.family.as_deref(), a.given.as_deref()),
        (b.family.as_deref(), b.given.as_deref()),
    );
    let (ra, rb) = align(
        (a.family_kana.as_deref(), a.given_kana.as_deref()),
        (b.family_kana.as_deref(), b.given_kana.as_deref()),
    );
    // Both sides unsplit in both scripts: the whole names are compared as the given name
    // (the field the guards read).
    let unsplit = |k: &Parts, r: &Parts| k.1.is_none() && r.1.is_none();
    if unsplit(&ka, &ra) && unsplit(&kb, &rb) {
        let g = name_level(
            agree(ka.0.as_deref(), kb.0.as_deref()),
            agree(ra.0.as_deref(), rb.0.as_deref()),
        );
        let tf = (g == Some(0))
            .then(|| ka.0.clone().or(ra.0.clone()))
            .flatten();
        return ((None, g), (None, tf));
    }
    let lv =
        |ka: &Option<String>, kb: &Option<String>, ra: &Option<String>, rb: &Option<String>| {
            name_level(
                agree(ka.as_deref(), kb.as_deref()),
                agree(ra.as_deref(), rb.as_deref()),
            )
        };
    let mut family = lv(&ka.0, &kb.0, &ra.0, &rb.0);
    let mut given = lv(&ka.1, &kb.1, &ra.1, &rb.1);
    if family == Some(3) && given == Some(3) {
        // Family and given entered in each other's fields.
        let f = lv(&ka.0, &kb.1, &ra.0, &rb.1);
        let g = lv(&ka.1, &kb.0, &ra.1, &rb.0);
        if f.is_some_and(|l| l <= 1) && g.is_some_and(|l| l <= 1) {
            (family, given) = (f, g);
        }
    }
    let value = |k: &Option<String>, r: &Option<String>| k.clone().or_else(|| r.clone());
    // Exact: the kanji (else kana) value; same reading with other kanji: the reading.
    let tf_value = |level: Option<u8>, k: &Option<String>, r: &Option<String>| match level {
        Some(0) => value(k, r),
        Some(1) => r.clone(),
        _ => None,
    };
    let tf_family = tf_value(family, &ka.0, &ra.0);
    let tf_given = tf_value(given, &ka.1, &ra.1);
    ((family, given), (tf_family, tf_given))
}

fn date_level(a: Date, b: Date) -> u8 {
    if a == b {
        return 0;
    }
    let same_year = a.year == b.year;
    let swapped = same_year && a.month == b.day && a.day == b.month;
    // Only the day or only the month differs, or day and month swapped: a typing error.
    // Only the year differs: a typing error when it is within a decade; further apart it
    // may be a typo in the tens or another generation (parent and child born on the same
    // day of the year): the partial level, which a person reviews at most.
    let md_only = same_year && (a.month == b.month) != (a.day == b.day);
    let year_only = !same_year && a.month == b.month && a.day == b.day;
    if md_only || swapped || (year_only && a.year.abs_diff(b.year) < 10) {
        1
    } else if same_year || year_only {
        2
    } else {
        3
    }
}

fn towns_match(a: &str, b: &str) -> bool {
    if a.is_empty() || b.is_empty() {
        return false;
    }
    if a == b {
        return true;
    }
    let (short, long) = if a.chars().count() <= b.chars().count() {
        (a, b)
    } else {
        (b, a)
    };
    long.ends_with(short) && short.chars().count() >= 2
}

fn residence_level(a: &Prepared, b: &Prepared) -> Option<u8> {
    if let (Some(x), Some(y)) = (&a.address, &b.address) {
        if !towns_match(&x.town, &y.town) {
            return Some(3);
        }
        let (s, l) = if x.blocks.len() <= y.blocks.len() {
            (&x.blocks, &y.blocks)
        } else {
            (&y.blocks, &x.blocks)
        };
        if s.is_empty() {
            return Some(2);
        }
        if s == l {
            return Some(0);
        }
        if l.starts_with(s) && s.len() >= 2 {
            return Some(1);
        }
        if s.get(..2).is_some() && s.get(..2) == l.get(..2) {
            return Some(1);
        }
        return Some(2);
    }
    match (a.postal, b.postal) {
        (Some(x), Some(y)) => Some(if x == y { 2 } else { 3 }),
        _ => None,
    }
}

fn phone_level(a: &Prepared, b: &Prepared) -> Option<u8> {
    let (x, y) = (a.phone?, b.phone?);
    let same = x.full == y.full || (x.tail8.is_some() && x.tail8 == y.tail8);
    Some(if same { 0 } else { 1 })
}

fn insurance_level(a: &Prepared, b: &Prepared) -> Option<u8> {
    let (x, y) = (a.insurance?, b.insurance?);
    let (xi, yi) = (x.insurer?, y.insurer?);
    let differ = |p: Option<u64>, q: Option<u64>| matches!((p, q), (Some(p), Some(q)) if p != q);
    if xi != yi || x.number != y.number || differ(x.symbol, y.symbol) {
        return Some(2);
    }
    Some(if differ(x.branch, y.branch) { 1 } else { 0 })
}

/// Compares records under a [`Model`], names weighed by a [`Frequencies`] table.
#[derive(Debug, Clone)]
pub struct Matcher {
    model: Model,
    freq: Frequencies,
}

impl Matcher {
    /// A matcher with the built-in name frequency table.
    pub fn new(model: Model) -> Self {
        Self::with_frequencies(model, Frequencies::builtin())
    }

    /// A matcher weighing exact name agreement by `freq` (e.g. built from the registry
    /// with [`Frequencies::from_prepared`]).
    pub fn with_frequencies(model: Model, freq: Frequencies) -> Self {
        Self { model, freq }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn frequencies(&self) -> &Frequencies {
        &self.freq
    }

    /// Normalises a record once (kana, kanji variants, dates, digits...).
    pub fn prepare(&self, r: &Record) -> Prepared {
        Prepared::new(r)
    }

    /// The comparison vector of two prepared records.
    pub fn levels(&self, a: &Prepared, b: &Prepared) -> Levels {
        levels_with_tf(a, b).0
    }

    pub fn compare_prepared(&self, a: &Prepared, b: &Prepared) -> Comparison {
        let (levels, (tf_family, tf_given)) = levels_with_tf(a, b);
        let mut score = 0.0;
        for (i, level) in levels.0.iter().enumerate() {
            let (Some(level), Some(params)) = (level, self.model.fields.get(i)) else {
                continue;
            };
            let level = usize::from(*level);
            let tf = match i {
                0 => tf_family.as_deref().and_then(|v| self.freq.family(v)),
                1 => tf_given.as_deref().and_then(|v| self.freq.given(v)),
                _ => None,
            };
            score += match (tf, params.m.get(level), params.u.get(level)) {
                // Agreement on a name (exact, or the same reading): u is that value's
                // frequency, never below a quarter of the model's u (a registry of one
                // does not make a name rare).
                (Some(f), Some(m), Some(u)) if level <= 1 => {
                    crate::model::log2_ratio(*m, f.max(u / 4.0))
                }
                _ => params.weight(level),
            };
        }
        self.decide(score, &levels)
    }

    pub fn compare(&self, a: &Record, b: &Record) -> Comparison {
        self.compare_prepared(&self.prepare(a), &self.prepare(b))
    }

    fn decide(&self, score: f64, l: &Levels) -> Comparison {
        let mut decision = if score >= self.model.link_threshold {
            Decision::Link
        } else if score >= self.model.review_threshold {
            Decision::Review
        } else {
            Decision::Distinct
        };
        let at_most = |d: &mut Decision, cap: Decision| {
            let rank = |d: Decision| match d {
                Decision::Distinct => 0,
                Decision::Review => 1,
                Decision::Link => 2,
            };
            if rank(*d) > rank(cap) {
                *d = cap;
            }
        };
        let given = l.get(Field::Given);
        let birth = l.get(Field::BirthDate);
        let insurance = l.get(Field::Insurance);
        match given {
            Some(3) => at_most(&mut decision, Decision::Distinct),
            Some(2) | None => at_most(&mut decision, Decision::Review),
            _ => {}
        }
        match birth {
            Some(3) => at_most(&mut decision, Decision::Distinct),
            Some(2) | None => at_most(&mut decision, Decision::Review),
            _ => {}
        }
        let contacts = [
            l.get(Field::Residence).map(|v| v <= 1),
            l.get(Field::Phone).map(|v| v == 0),
            insurance.map(|v| v <= 1),
        ];
        let any_agrees = contacts.contains(&Some(true));
        if !any_agrees {
            at_most(&mut decision, Decision::Review);
        }
        Comparison { decision, score }
    }
}

fn levels_with_tf(a: &Prepared, b: &Prepared) -> (Levels, Parts) {
    let ((family, given), tf) = names(a, b);
    let birth = match (a.birth_date, b.birth_date) {
        (Some(x), Some(y)) => Some(date_level(x, y)),
        _ => None,
    };
    let sex = match (a.sex, b.sex) {
        (Some(x), Some(y)) => Some(u8::from(x != y)),
        _ => None,
    };
    let levels = Levels([
        family,
        given,
        birth,
        sex,
        residence_level(a, b),
        phone_level(a, b),
        insurance_level(a, b),
    ]);
    (levels, tf)
}
