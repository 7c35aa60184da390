//! The logic of `gatewayd identity match|learn|search` over JSON lines (the binary only
//! opens the files and prints the errors).
//!
//! `match` streams: one pair is read, compared and written at a time (output buffered),
//! so a million pairs need no more memory than one. A bad line (not JSON, not an object
//! with `pair_id`, `a` and `b`, a field that is an object) is reported on the error
//! stream by its line number and the kind of fault, never its content; the good lines
//! are all still printed in input order, and the command then fails ([`CliError::BadLines`])
//! so that a script notices. Blank lines are skipped.

use std::io::{BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{Decision, Frequencies, Index, Matcher, Model, Prepared, Record};

/// A command-line run failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading {what} at line {line}: {source}")]
    Read {
        what: &'static str,
        line: usize,
        source: std::io::Error,
    },
    #[error("writing the output: {source}")]
    Write { source: std::io::Error },
    #[error("{count} bad line(s) in {what} (first: line {first})")]
    BadLines {
        what: &'static str,
        count: usize,
        first: usize,
    },
}

#[derive(Deserialize)]
struct Pair {
    pair_id: PairId,
    a: Record,
    b: Record,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PairId {
    Text(String),
    Int(i64),
    Uint(u64),
}

impl PairId {
    fn text(self) -> String {
        match self {
            PairId::Text(s) => s,
            PairId::Int(n) => n.to_string(),
            PairId::Uint(n) => n.to_string(),
        }
    }
}

#[derive(Serialize)]
struct PairOut<'a> {
    pair_id: &'a str,
    decision: Decision,
    score: f64,
}

/// Score as printed: finite, three decimals.
fn printable(score: f64) -> f64 {
    if score.is_finite() {
        (score * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// What is wrong with a line, without its content.
fn fault(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => format!("not JSON (column {})", e.column()),
        Category::Data => "not a pair of records (wrong shape or field type)".into(),
        Category::Io => "unreadable".into(),
    }
}

/// Counts of one `match` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MatchStats {
    pub pairs: usize,
    pub bad: usize,
}

/// `identity match`: every pair of `input` compared, one JSON line each to `out`, faults
/// to `err`. Fails at the end if a line was bad.
pub fn match_pairs(
    input: impl BufRead,
    mut out: impl Write,
    mut err: impl Write,
    matcher: &Matcher,
) -> Result<MatchStats, CliError> {
    let mut stats = MatchStats::default();
    let mut first_bad = 0;
    let mut line = Vec::new();
    let mut reader = input;
    let mut n = 0usize;
    loop {
        line.clear();
        n += 1;
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| CliError::Read {
                what: "pairs",
                line: n,
                source,
            })?;
        if read == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Pair>(&line) {
            Ok(pair) => {
                let c = matcher.compare(&pair.a, &pair.b);
                let id = pair.pair_id.text();
                let o = PairOut {
                    pair_id: &id,
                    decision: c.decision,
                    score: printable(c.score),
                };
                serde_json::to_writer(&mut out, &o)
                    .map_err(|e| CliError::Write { source: e.into() })?;
                out.write_all(b"\n")
                    .map_err(|source| CliError::Write { source })?;
                stats.pairs += 1;
            }
            Err(e) => {
                stats.bad += 1;
                if first_bad == 0 {
                    first_bad = n;
                }
                // The error stream is best effort: a closed stderr must not stop the run.
                let _ = writeln!(err, "line {n}: {}", fault(&e));
            }
        }
    }
    out.flush().map_err(|source| CliError::Write { source })?;
    if stats.bad > 0 {
        return Err(CliError::BadLines {
            what: "pairs",
            count: stats.bad,
            first: first_bad,
        });
    }
    Ok(stats)
}

/// Reads JSON-lines records; a bad line fails the whole read (naming the line).
pub fn read_records(input: impl BufRead, what: &'static str) -> Result<Vec<Record>, CliError> {
    let mut records = Vec::new();
    let mut bad = (0usize, 0usize);
    for (i, line) in input.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line.map_err(|source| CliError::Read {
            what,
            line: n,
            source,
        })?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => records.push(r),
            Err(_) => {
                if bad.0 == 0 {
                    bad.1 = n;
                }
                bad.0 += 1;
            }
        }
    }
    if bad.0 > 0 {
        return Err(CliError::BadLines {
            what,
            count: bad.0,
            first: bad.1,
        });
    }
    Ok(records)
}

/// `identity learn`: a model learnt by EM from the records.
pub fn learn_records(input: impl BufRead) -> Result<Model, CliError> {
    let records = read_records(input, "records")?;
    Ok(crate::learn(&records))
}

/// Options of `identity search`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchOptions {
    /// Learn the model from the loaded records first.
    pub learn: bool,
    /// Compare each query with every record instead of the index's candidates.
    pub brute_force: bool,
}

/// The identifiers of a record found.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub hospital_id: Option<String>,
    pub patient_id: Option<String>,
}

/// One query's best candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub query: usize,
    pub best: Option<Found>,
    pub decision: Decision,
    pub score: f64,
}

/// The report `identity search` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub records: usize,
    pub load_ms: f64,
    pub learn_ms: f64,
    pub queries: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_candidates: f64,
    pub peak_rss_kib: u64,
    pub answers: Vec<Answer>,
}

/// Peak resident memory of this process (VmHWM), 0 where unknown.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// `identity search`: the registry benchmark (see DESIGN: load the records into an
/// [`Index`], optionally learn, then time each query's candidates + comparisons).
pub fn search(
    records: impl BufRead,
    queries: impl BufRead,
    model: Model,
    opts: SearchOptions,
) -> Result<SearchReport, CliError> {
    let t = Instant::now();
    let mut ids = Vec::new();
    let mut prepared = Vec::new();
    let mut index: Index<u32> = Index::new();
    for (i, line) in records.split(b'\n').enumerate() {
        let line = line.map_err(|source| CliError::Read {
            what: "records",
            line: i + 1,
            source,
        })?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let r: Record = serde_json::from_slice(&line).map_err(|_| CliError::BadLines {
            what: "records",
            count: 1,
            first: i + 1,
        })?;
        let p = Prepared::new(&r);
        let Ok(slot) = u32::try_from(prepared.len()) else {
            break;
        };
        index.insert(slot, &p);
        prepared.push(p);
        ids.push((r.hospital_id, r.patient_id));
    }
    let load_ms = ms(t);
    let t = Instant::now();
    let model = if opts.learn {
        crate::em::learn_prepared(&prepared, &model)
    } else {
        model
    };
    let learn_ms = if opts.learn { ms(t) } else { 0.0 };
    let matcher = Matcher::with_frequencies(model, Frequencies::from_prepared(&prepared));
    let queries = read_records(queries, "queries")?;
    let mut times = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    let mut total_candidates = 0usize;
    for (qi, q) in queries.iter().enumerate() {
        let t = Instant::now();
        let p = matcher.prepare(q);
        let candidates: Vec<u32> = if opts.brute_force {
            (0..u32::try_from(prepared.len()).unwrap_or(u32::MAX)).collect()
        } else {
            index.candidates(&p)
        };
        let mut best: Option<(u32, crate::Comparison)> = None;
        for c in &candidates {
            if let Some(r) = prepared.get(*c as usize) {
                let cmp = matcher.compare_prepared(&p, r);
                if best.is_none_or(|(_, b)| cmp.score > b.score) {
                    best = Some((*c, cmp));
                }
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e6);
        total_candidates += candidates.len();
        answers.push(match best {
            Some((c, cmp)) => Answer {
                query: qi,
                best: ids.get(c as usize).map(|(h, p)| Found {
                    hospital_id: h.clone(),
                    patient_id: p.clone(),
                }),
                decision: cmp.decision,
                score: printable(cmp.score),
            },
            None => Answer {
                query: qi,
                best: None,
                decision: Decision::Distinct,
                score: 0.0,
            },
        });
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(SearchReport {
        records: prepared.len(),
        load_ms,
        learn_ms,
        queries: queries.len(),
        p50_us: quantile(&sorted, 0.5),
        p99_us: quantile(&sorted, 0.99),
        max_us: sorted.last().copied().unwrap_or(0.0),
        mean_candidates: if queries.is_empty() {
            0.0
        } else {
            total_candidates as f64 / queries.len() as f64
        },
        peak_rss_kib: peak_rss_kib(),
        answers,
    })
}
