//! Learning the model from a registry by EM (expectation-maximisation on the comparison
//! vectors, Fellegi-Sunter with conditional independence).
//!
//! Pairs: the blocked candidate pairs (where the matches are, and the non-matches that
//! blocking makes alike) plus as many random pairs (non-matches). `u` per level is counted on
//! the random pairs (chance agreement in this registry); then EM estimates `lambda` and `m`
//! on the blocked pairs with `u` fixed (the estimation order Splink recommends), with the
//! prior's values as Dirichlet pseudo-counts, so a level the registry never shows keeps its
//! prior value. Pairs the decision guards call
//! different people (given names or birth dates that differ) are held in the non-match
//! class: otherwise the largest cluster among blocked pairs is the household and EM learns
//! "same household". The thresholds stay the prior's: the decision rule is the same weight
//! against them. [`em`] is the classic unconstrained EM (m, u and lambda), for vectors.

use crate::Record;
use crate::index::Index;
use crate::matcher::{Levels, Matcher, Prepared};
use crate::model::{FIELDS, FieldParams, Model};

/// Most blocked candidates taken per record, and pairs in all.
const PER_RECORD: usize = 20;
const MAX_PAIRS: usize = 400_000;
/// Weight of the prior, in pseudo-observations per field.
const PRIOR_WEIGHT: f64 = 20.0;
/// EM iterations (it converges in far fewer on registries we have seen).
const ITERATIONS: usize = 40;

/// Learns a model from a registry's records, starting from the built-in default.
pub fn learn<'a>(records: impl IntoIterator<Item = &'a Record>) -> Model {
    let prepared: Vec<Prepared> = records.into_iter().map(Prepared::new).collect();
    learn_prepared(&prepared, &Model::default())
}

/// Learns from prepared records, with `prior` as the starting point and pseudo-counts.
pub fn learn_prepared(records: &[Prepared], prior: &Model) -> Model {
    let matcher = Matcher::new(prior.clone());
    let mut index = Index::new();
    for (i, p) in records.iter().enumerate() {
        let Ok(i) = u32::try_from(i) else { break };
        index.insert(i, p);
    }
    let mut vectors: Vec<Levels> = Vec::new();
    // Records spread over the whole registry (a stride), not its first part.
    let step = (records.len() / (MAX_PAIRS / PER_RECORD)).max(1);
    'outer: for (i, p) in records.iter().enumerate().step_by(step) {
        let mut taken = 0;
        for j in index.candidates(p) {
            let j = j as usize;
            if j == i {
                continue;
            }
            if let Some(q) = records.get(j) {
                vectors.push(matcher.levels(p, q));
                taken += 1;
            }
            if vectors.len() >= MAX_PAIRS {
                break 'outer;
            }
            if taken >= PER_RECORD {
                break;
            }
        }
    }
    // As many random pairs (xorshift, fixed seed: the same registry learns the same model).
    let n = records.len();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut random = Vec::new();
    if n >= 2 {
        let want = vectors.len().max(1000);
        for _ in 0..want {
            let (i, j) = ((next() % n as u64) as usize, (next() % n as u64) as usize);
            if let (true, Some(p), Some(q)) = (i != j, records.get(i), records.get(j)) {
                random.push(matcher.levels(p, q));
            }
        }
    }
    // u first, counted on the random pairs (nearly all different people: the registry's own
    // chance agreement, e.g. how many share a town, a birth year or a common name), with the
    // prior as pseudo-counts; then m and lambda by EM on the blocked pairs with u held fixed
    // (look-alikes in the non-match class). Letting EM move u as well lets it trade the two
    // classes for the registry's largest cluster (households, then "same given name and
    // year") and lose the changes real records show (a family name changed by marriage).
    let mut start = prior.clone();
    let counted = count_levels(&random, prior);
    for (params, u) in start.fields.iter_mut().zip(counted) {
        params.u = normalised(&u);
    }
    sane(fit(&vectors, &start, ITERATIONS, false, true), prior)
}

/// Per field and level: the prior's `u` as pseudo-counts plus the levels seen in `vectors`.
fn count_levels(vectors: &[Levels], prior: &Model) -> Vec<Vec<f64>> {
    let mut counts = prior_counts(prior, |f| &f.u);
    for v in vectors {
        for (f, level) in v.0.iter().enumerate() {
            let Some(l) = level else { continue };
            if let Some(c) = counts.get_mut(f).and_then(|s| s.get_mut(usize::from(*l))) {
                *c += 1.0;
            }
        }
    }
    counts
}

/// A learnt field is kept only if agreement is still evidence for a match and disagreement
/// against it (otherwise EM found another cluster than "same person" for that field, and the
/// prior's parameters stay); a lambda over one half (the classes swapped) keeps the prior.
fn sane(mut learnt: Model, prior: &Model) -> Model {
    if learnt.lambda > 0.5 {
        return prior.clone();
    }
    for (f, p) in learnt.fields.iter_mut().zip(&prior.fields) {
        let first = f.weight(0);
        let last = f.weight(f.m.len().saturating_sub(1));
        if !(first > 0.0 && last < 0.0) {
            *f = p.clone();
        }
    }
    learnt
}

/// Classic EM on comparison vectors from `init`: lambda, m and u; returns the fitted model
/// (thresholds of `init`).
pub fn em(vectors: &[Levels], init: &Model, iterations: usize) -> Model {
    fit(vectors, init, iterations, true, false)
}

/// A pair the decision guards call different people (given names different in both
/// scripts, or birth dates different in two fields): in the non-match class for EM too.
/// Without this the blocked pairs' largest cluster is the household (same dwelling, phone,
/// family name and insurance), and EM would learn "same household" instead of "same person".
fn look_alike(v: &Levels) -> bool {
    v.get(crate::Field::Given) == Some(3) || v.get(crate::Field::BirthDate) == Some(3)
}

fn fit(
    vectors: &[Levels],
    init: &Model,
    iterations: usize,
    learn_u: bool,
    constrained: bool,
) -> Model {
    let mut model = init.clone();
    if vectors.is_empty() {
        return model;
    }
    let mut lambda = init.lambda.clamp(1e-4, 0.5);
    for _ in 0..iterations {
        let mut sum_m: Vec<Vec<f64>> = prior_counts(init, |f| &f.m);
        let mut sum_u: Vec<Vec<f64>> = prior_counts(init, |f| &f.u);
        let mut total_g = 0.0;
        for v in vectors {
            let g = if constrained && look_alike(v) {
                0.0
            } else {
                let (mut lm, mut lu) = (lambda.ln(), (1.0 - lambda).ln());
                for (level, params) in v.0.iter().zip(&model.fields) {
                    if let Some(l) = level {
                        let l = usize::from(*l);
                        lm += params.m.get(l).copied().unwrap_or(1.0).max(1e-12).ln();
                        lu += params.u.get(l).copied().unwrap_or(1.0).max(1e-12).ln();
                    }
                }
                1.0 / (1.0 + (lu - lm).exp())
            };
            total_g += g;
            for (f, level) in v.0.iter().enumerate() {
                let Some(l) = level else { continue };
                let l = usize::from(*l);
                if let Some(c) = sum_m.get_mut(f).and_then(|s| s.get_mut(l)) {
                    *c += g;
                }
                if let Some(c) = sum_u.get_mut(f).and_then(|s| s.get_mut(l)) {
                    *c += 1.0 - g;
                }
            }
        }
        lambda = (total_g / vectors.len() as f64).clamp(1e-6, 1.0 - 1e-6);
        for (f, params) in model.fields.iter_mut().enumerate().take(FIELDS) {
            if let Some(m) = sum_m.get(f) {
                params.m = normalised(m);
            }
            if let (true, Some(u)) = (learn_u, sum_u.get(f)) {
                params.u = normalised(u);
            }
        }
    }
    model.lambda = lambda;
    model
}

fn prior_counts(init: &Model, pick: impl Fn(&FieldParams) -> &Vec<f64>) -> Vec<Vec<f64>> {
    init.fields
        .iter()
        .map(|f| pick(f).iter().map(|p| p * PRIOR_WEIGHT).collect())
        .collect()
}

fn normalised(v: &[f64]) -> Vec<f64> {
    let total: f64 = v.iter().sum();
    if total <= 0.0 {
        return vec![1.0 / v.len().max(1) as f64; v.len()];
    }
    v.iter().map(|x| (x / total).max(1e-9)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LEVELS;

    /// Draws a level from a distribution with a uniform number in [0, 1).
    fn draw(p: &[f64], r: f64) -> u8 {
        let mut acc = 0.0;
        for (i, x) in p.iter().enumerate() {
            acc += x;
            if r < acc {
                return i as u8;
            }
        }
        (p.len() - 1) as u8
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // f indexes three parallel tables
    fn em_recovers_known_m_and_u_on_generated_vectors() {
        let mut truth = Model::default();
        // Known parameters, away from the defaults EM starts at.
        truth.fields[0] = FieldParams {
            m: vec![0.7, 0.1, 0.1, 0.1],
            u: vec![0.01, 0.01, 0.08, 0.9],
        };
        truth.fields[1] = FieldParams {
            m: vec![0.8, 0.05, 0.1, 0.05],
            u: vec![0.01, 0.01, 0.03, 0.95],
        };
        truth.fields[2] = FieldParams {
            m: vec![0.85, 0.1, 0.03, 0.02],
            u: vec![0.01, 0.04, 0.05, 0.9],
        };
        truth.fields[3] = FieldParams {
            m: vec![0.97, 0.03],
            u: vec![0.5, 0.5],
        };
        truth.fields[4] = FieldParams {
            m: vec![0.5, 0.2, 0.1, 0.2],
            u: vec![0.01, 0.02, 0.07, 0.9],
        };
        truth.fields[5] = FieldParams {
            m: vec![0.6, 0.4],
            u: vec![0.02, 0.98],
        };
        truth.fields[6] = FieldParams {
            m: vec![0.5, 0.05, 0.45],
            u: vec![0.01, 0.01, 0.98],
        };
        let lambda = 0.3;
        let mut state: u64 = 42;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut vectors = Vec::new();
        for _ in 0..40_000 {
            let is_match = uniform() < lambda;
            let mut v = Levels::default();
            for f in 0..FIELDS {
                let p = if is_match {
                    &truth.fields[f].m
                } else {
                    &truth.fields[f].u
                };
                assert_eq!(p.len(), LEVELS[f]);
                // 10 % missing.
                v.0[f] = (uniform() >= 0.1).then(|| draw(p, uniform()));
            }
            vectors.push(v);
        }
        let fitted = em(&vectors, &Model::default(), 100);
        assert!(
            (fitted.lambda - lambda).abs() < 0.02,
            "lambda {}",
            fitted.lambda
        );
        for f in 0..FIELDS {
            for l in 0..LEVELS[f] {
                let (m, u) = (fitted.fields[f].m[l], fitted.fields[f].u[l]);
                assert!((m - truth.fields[f].m[l]).abs() < 0.03, "m[{f}][{l}] = {m}");
                assert!((u - truth.fields[f].u[l]).abs() < 0.03, "u[{f}][{l}] = {u}");
            }
        }
    }
}

#[cfg(test)]
mod sanity_tests {
    use super::*;

    #[test]
    fn a_learnt_field_where_agreement_counts_against_a_match_keeps_the_prior() {
        let prior = Model::default();
        let mut learnt = prior.clone();
        learnt.fields[2] = FieldParams {
            m: vec![0.0004, 0.46, 0.53, 0.0096],
            u: vec![0.13, 0.01, 0.07, 0.79],
        };
        learnt.fields[5] = FieldParams {
            m: vec![0.7, 0.3],
            u: vec![0.001, 0.999],
        };
        let kept = sane(learnt.clone(), &prior);
        assert_eq!(kept.fields[2], prior.fields[2]);
        assert_eq!(kept.fields[5], learnt.fields[5]);
        learnt.lambda = 0.8;
        assert_eq!(sane(learnt, &prior), prior);
    }
}
