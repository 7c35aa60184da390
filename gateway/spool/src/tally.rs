//! Counts of the index's records, kept as records change, so that `spool status` and the
//! metrics never scan the index (it holds a record for every object of the dedupe window:
//! a million on a busy box).
//!
//! The [`Index`](crate::index::Index) owns the one [`Tally`]: it counts every record once
//! when the spool opens ([`Index::recount`](crate::index::Index::recount)), then applies
//! each record it writes or removes as a change from the old record to the new. Counts are
//! sums of such changes, signed, so concurrent writers may apply theirs in any order (a
//! change may be applied before the one it followed: a count may dip below zero for that
//! moment, and [`Counts::get`] reads such a dip as 0).

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::index::{DeliveryState, Record};

/// The overall states of [`Record::state`], in the order `spool status` shows them.
pub(crate) const STATES: [&str; 4] = ["received", "queued", "sent", "failed"];

/// Records per state of one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DestinationTally {
    pub queued: i64,
    pub sent: i64,
    pub failed: i64,
}

/// What the index holds, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Records in the index.
    pub objects: i64,
    /// Records by overall state ([`Record::state`]).
    pub by_state: BTreeMap<&'static str, i64>,
    /// Records by the state of each destination they name.
    pub by_destination: BTreeMap<String, DestinationTally>,
    /// When the oldest object held without destinations (`received`) arrived. Such a
    /// record never changes state and is never pruned, so the minimum only moves down.
    pub oldest_received_ms: Option<u64>,
}

impl Counts {
    /// A count as shown: a momentary dip below zero (see the module) reads as 0.
    pub(crate) fn get(n: i64) -> u64 {
        u64::try_from(n).unwrap_or(0)
    }

    pub(crate) fn add(&mut self, r: &Record) {
        self.objects += 1;
        *self.by_state.entry(r.state()).or_default() += 1;
        for d in &r.destinations {
            let t = self.by_destination.entry(d.name.clone()).or_default();
            *slot(t, &d.state) += 1;
        }
        if r.destinations.is_empty() {
            let ms = r.received_unix_ms;
            self.oldest_received_ms = Some(self.oldest_received_ms.map_or(ms, |o| o.min(ms)));
        }
    }

    /// Takes `r` out of the counts; a state or destination left at zero is dropped, so
    /// the counts equal those of a fresh count.
    fn remove(&mut self, r: &Record) {
        self.objects -= 1;
        let state = r.state();
        let n = self.by_state.entry(state).or_default();
        *n -= 1;
        if *n == 0 {
            self.by_state.remove(state);
        }
        for d in &r.destinations {
            let t = self.by_destination.entry(d.name.clone()).or_default();
            *slot(t, &d.state) -= 1;
            if *t == DestinationTally::default() {
                self.by_destination.remove(&d.name);
            }
        }
    }
}

fn slot<'a>(t: &'a mut DestinationTally, state: &DeliveryState) -> &'a mut i64 {
    match state {
        DeliveryState::Queued => &mut t.queued,
        DeliveryState::Sent => &mut t.sent,
        DeliveryState::Failed { .. } => &mut t.failed,
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The counts and the gauges that show them.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    counts: Mutex<Counts>,
    objects: Family<StateLabel, Gauge>,
    records: Gauge,
    index_bytes: Gauge,
}

impl Tally {
    /// Registers `gateway_spool_objects{state}`, `gateway_spool_index_records` and
    /// `gateway_spool_index_bytes`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_spool_objects",
            "Objects in the spool by state",
            self.objects.clone(),
        );
        registry.register(
            "gateway_spool_index_records",
            "Records in the spool index (objects not yet delivered, and delivered ones for spool.dedupe_window)",
            self.records.clone(),
        );
        registry.register(
            "gateway_spool_index_bytes",
            "Size of the spool index on disk",
            self.index_bytes.clone(),
        );
    }

    /// Replaces the counts with `counts` (a full count at open).
    pub(crate) fn reset(&self, counts: Counts) {
        let mut c = crate::lock(&self.counts);
        *c = counts;
        self.show(&c);
    }

    /// A record changed from `before` to `after` (`None`: it did not exist / was removed).
    pub(crate) fn apply(&self, before: Option<&Record>, after: Option<&Record>) {
        let mut c = crate::lock(&self.counts);
        if let Some(r) = before {
            c.remove(r);
        }
        if let Some(r) = after {
            c.add(r);
        }
        self.show(&c);
    }

    pub(crate) fn counts(&self) -> Counts {
        crate::lock(&self.counts).clone()
    }

    pub(crate) fn set_index_bytes(&self, bytes: u64) {
        self.index_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn show(&self, c: &Counts) {
        for state in STATES {
            let n = c.by_state.get(state).copied().unwrap_or(0);
            self.objects
                .get_or_create(&StateLabel { state })
                .set(n.max(0));
        }
        self.records.set(c.objects.max(0));
    }
}
