//! The delivery queues: which destinations an object is queued for, and what they said.
//!
//! Each [`Route`] (a destination and the kind of object it takes) has its own queue in the
//! index, oldest first ([`Spool::queued`]). Uplink workers read an object
//! ([`Spool::read`]), then confirm it ([`Spool::mark_sent`], [`Spool::mark_sent_all`]) or
//! dead-letter it ([`Spool::mark_failed`]); an operator puts dead letters back in the queue
//! with [`Spool::retry_failed`]. A dead letter's sealed bytes leave their journal segment
//! for `blobs/`, so that one refused message does not keep a whole segment on disk.

use std::fs;
use std::io::Write;

use gateway_durable::{self as durable, Context};

use crate::index::StudyMac;
use crate::{
    DeliveryState, Destination, Inner, ObjectId, ObjectKind, Record, Spool, SpoolError, journal,
    unix_ms,
};

/// An upload destination and the kind of objects queued for it.
///
/// An HL7 destination may take only some message types ([`Route::with_message_types`]);
/// see [`Route::takes`] for the rule. The destinations of an object are chosen once, when
/// it is stored, and kept in its index record: a changed route affects new objects only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub kind: ObjectKind,
    /// HL7 only: the message types queued here, each `CODE^EVENT` (`ORU^R01`) or `CODE`
    /// alone for every event of that code (`ADT`). `None`: every message.
    pub message_types: Option<Vec<String>>,
    /// Takes objects received on the LAN ([`Origin::Local`]); true unless
    /// [`Route::results_only`].
    pub local: bool,
    /// Takes results returned from the cloud for this clinic ([`Origin::Result`]): only
    /// routes made with [`Route::results_only`] or [`Route::with_results`].
    pub results: bool,
    /// Audit routes only ([`Route::with_max_queued`]): at most this many messages queued;
    /// a newer one is not queued here while the queue is full (the oldest are kept).
    pub max_queued: Option<u64>,
}

/// Where a stored object came from; a route takes objects of the origins it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// Received on the LAN (a modality, an EMR, the hospital's RIS): the uplinks take it.
    #[default]
    Local,
    /// A result returned from the cloud archive for this clinic: only the results
    /// destinations take it (never sent back to the cloud it came from).
    Result,
}

impl Route {
    pub fn new(name: impl Into<String>, kind: ObjectKind) -> Self {
        Self {
            name: name.into(),
            kind,
            message_types: None,
            local: true,
            results: false,
            max_queued: None,
        }
    }

    /// An audit route ([`ObjectKind::Audit`]) queues at most `max` messages: while `max`
    /// are queued, [`Spool::store_audit_messages`] does not queue new ones here and names
    /// this route among the message's `dropped`. Other kinds ignore it.
    #[must_use]
    pub fn with_max_queued(mut self, max: u64) -> Self {
        self.max_queued = Some(max);
        self
    }

    /// A results destination (a clinic PACS): takes returned results only.
    #[must_use]
    pub fn results_only(mut self) -> Self {
        self.local = false;
        self.results = true;
        self
    }

    /// Takes returned results too (an EMR uplink that also gets the returned reports).
    #[must_use]
    pub fn with_results(mut self) -> Self {
        self.results = true;
        self
    }

    /// Whether a new object of `kind` from `origin` queues here ([`Route::takes`] for the
    /// message type rule).
    pub fn takes_from(&self, origin: Origin, kind: ObjectKind, message_type: Option<&str>) -> bool {
        let origin_ok = match origin {
            Origin::Local => self.local,
            Origin::Result => self.results,
        };
        origin_ok && self.takes(kind, message_type)
    }

    /// Takes only these message types (see [`Route::message_types`]).
    pub fn with_message_types<S: Into<String>>(
        mut self,
        types: impl IntoIterator<Item = S>,
    ) -> Self {
        self.message_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// Whether a new object of `kind` queues here. `message_type` is an HL7 message's
    /// `CODE^EVENT` as [`MessageIn::message_type`](crate::MessageIn) carries it (MSH-9.1
    /// and MSH-9.2 as the HL7 parser read them; MSH-9.3 is not part of it).
    ///
    /// A route without a filter takes every object of its kind. A filtered route takes a
    /// message whose code and event are each 3 upper-case letters or digits and that a
    /// filter entry names (`CODE^EVENT` exactly, or `CODE` alone); a message whose type
    /// cannot be read that way (missing event, components, lower case) goes only to
    /// routes without a filter, never to one that asked for particular types.
    pub fn takes(&self, kind: ObjectKind, message_type: Option<&str>) -> bool {
        if self.kind != kind {
            return false;
        }
        let Some(filter) = &self.message_types else {
            return true;
        };
        let Some((code, event)) = message_type.and_then(readable_type) else {
            return false;
        };
        filter.iter().any(|f| match f.split_once('^') {
            Some((c, e)) => c == code && e == event,
            None => f == code,
        })
    }
}

/// `CODE^EVENT` split in two, if each is 3 upper-case ASCII letters or digits.
fn readable_type(message_type: &str) -> Option<(&str, &str)> {
    let part = |p: &str| {
        p.len() == 3
            && p.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    let (code, event) = message_type.split_once('^')?;
    (part(code) && part(event)).then_some((code, event))
}

/// A DICOM destination.
impl From<&str> for Route {
    fn from(name: &str) -> Self {
        Self::new(name, ObjectKind::Dicom)
    }
}

/// A DICOM destination.
impl From<String> for Route {
    fn from(name: String) -> Self {
        Self::new(name, ObjectKind::Dicom)
    }
}

impl Inner {
    /// The destinations a new object of `kind` is queued for (`message_type`: an HL7
    /// message's `CODE^EVENT`, see [`Route::takes`]). Empty: the object is held as
    /// `received`, stored and acknowledged like any other.
    pub(crate) fn queue_for(
        &self,
        origin: Origin,
        kind: ObjectKind,
        message_type: Option<&str>,
    ) -> Vec<Destination> {
        self.destinations
            .iter()
            .filter(|r| r.takes_from(origin, kind, message_type))
            .map(|r| Destination {
                name: r.name.clone(),
                state: DeliveryState::Queued,
            })
            .collect()
    }
}

impl Inner {
    /// The cap of an audit route, if it has one.
    pub(crate) fn max_queued(&self, destination: &str) -> Option<u64> {
        self.destinations
            .iter()
            .find(|r| r.name == destination && r.kind == ObjectKind::Audit)
            .and_then(|r| r.max_queued)
    }

    /// `destination`'s queue grew by `added` and shrank by `removed` (kept for capped
    /// routes only: [`Spool::queued_count`]).
    pub(crate) fn note_queued(&self, destination: &str, added: u64, removed: u64) {
        let mut counts = crate::lock(&self.capped);
        if let Some(n) = counts.get_mut(destination) {
            *n = n.saturating_add(added).saturating_sub(removed);
        }
    }
}

impl Spool {
    /// How many objects a capped audit route ([`Route::with_max_queued`]) has queued: a
    /// counter kept as objects are queued and leave the queue, no index scan. `None` for
    /// other routes.
    pub fn queued_count(&self, destination: &str) -> Option<u64> {
        crate::lock(&self.inner.capped).get(destination).copied()
    }

    /// Up to `limit` objects queued for `destination`, oldest first.
    pub fn queued(&self, destination: &str, limit: usize) -> Result<Vec<ObjectId>, SpoolError> {
        Ok(self.inner.index.queued(destination, limit)?)
    }

    /// The keyed MAC of an object's Study Instance UID (None: unknown or without one).
    /// Objects with equal keys belong to one study.
    pub fn study_key(&self, id: &ObjectId) -> Result<Option<StudyMac>, SpoolError> {
        self.look_settled(|index| index.study_of(id), Option::is_some)
    }

    /// `look` in the index; if it finds nothing (`found` false), waits once for the
    /// checkpointer and looks again: a journaled object's commit returns before its index
    /// entry is written. An object indexed already costs no wait.
    fn look_settled<T>(
        &self,
        look: impl Fn(&crate::index::Index) -> Result<T, crate::index::IndexError>,
        found: impl Fn(&T) -> bool,
    ) -> Result<T, SpoolError> {
        let first = look(&self.inner.index)?;
        if found(&first) {
            return Ok(first);
        }
        self.settle(crate::SETTLE_WAIT);
        Ok(look(&self.inner.index)?)
    }

    /// A stored object's index record (its destinations' states), without its bytes.
    pub fn record(&self, id: &ObjectId) -> Result<Option<Record>, SpoolError> {
        self.look_settled(|index| index.get(id), Option::is_some)
    }

    /// The objects stored under a DICOM SOP Instance UID (looked up by its keyed MAC), in
    /// any state: a puller skips an instance it already has.
    pub fn stored_instance(&self, sop_instance_uid: &str) -> Result<Vec<ObjectId>, SpoolError> {
        let keys = self.inner.keys.as_ref().ok_or(SpoolError::NoKey)?;
        let uid_mac = keys.uid_mac(sop_instance_uid);
        self.look_settled(|index| index.ids_for_uid(&uid_mac), |ids| !ids.is_empty())
    }

    /// A stored object's record and plaintext (for upload: the whole object in memory).
    pub fn read(&self, id: &ObjectId) -> Result<(Record, Vec<u8>), SpoolError> {
        let record = self
            .look_settled(|index| index.get(id), Option::is_some)?
            .ok_or(SpoolError::UnknownObject { id: *id })?;
        let mut plain = Vec::with_capacity(usize::try_from(record.plain_len).unwrap_or(0));
        self.unseal(id, &record, &mut plain)?;
        Ok((record, plain))
    }

    /// The destination confirmed the object. When every destination has, the blob is
    /// deleted (its record stays, for dedupe and status), or kept for `keep_sent_for`.
    pub fn mark_sent(&self, id: &ObjectId, destination: &str) -> Result<(), SpoolError> {
        self.mark_sent_all(std::slice::from_ref(id), destination)
    }

    /// [`Spool::mark_sent`] for several objects with one index flush for the states and
    /// one for the reclaimed blobs (the uplink confirms a whole STOW response at once).
    pub fn mark_sent_all(&self, ids: &[ObjectId], destination: &str) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let now = unix_ms();
        let mut completed = Vec::new();
        for id in ids {
            let Some(change) =
                self.set_delivery_indexed(id, destination, DeliveryState::Sent, Some(now), false)?
            else {
                return Err(SpoolError::NoDelivery {
                    id: *id,
                    destination: destination.to_string(),
                });
            };
            let record = change.record;
            if change.was_queued {
                inner.note_queued(destination, 0, 1);
            }
            if record.state() == "sent" && !record.blob_deleted {
                completed.push((*id, record.sealed_len));
            }
        }
        inner.index.flush()?;
        if self.keep_sent_ms() == 0 {
            self.delete_blobs(&completed)?;
        }
        Ok(())
    }

    /// A dead letter may wait for an operator for weeks: its sealed bytes move out of their
    /// journal segment into `blobs/` (written, synced, then the index updated and flushed),
    /// so that it does not keep the whole segment on disk.
    fn move_out_of_journal(&self, id: &ObjectId) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let Some(record) = inner.index.get(id)? else {
            return Ok(());
        };
        let Some(at) = record.segment.filter(|_| !record.blob_deleted) else {
            return Ok(());
        };
        let segment = journal::segment_path(&inner.journal_dir, at.generation);
        let sealed = journal::read_sealed(&inner.journal_dir, at, record.sealed_len)
            .ctx("read", &segment)?;
        let tmp_path = inner.tmp.join(format!("{}.part", hex::encode(id)));
        let _ = fs::remove_file(&tmp_path);
        let mut file = durable::create_new_private(&tmp_path)?;
        file.write_all(&sealed).ctx("write", &tmp_path)?;
        file.sync_data().ctx("sync", &tmp_path)?;
        drop(file);
        let final_path = self.blob_path(id);
        fs::rename(&tmp_path, &final_path).ctx("rename into place", &final_path)?;
        durable::sync_dir(&inner.blobs)?;
        inner.index.clear_segment(id)?;
        inner.release_segment(at.generation, 1);
        Ok(())
    }

    /// The destination refused the object for good: dead letter, with the reason.
    pub fn mark_failed(
        &self,
        id: &ObjectId,
        destination: &str,
        reason: &str,
    ) -> Result<(), SpoolError> {
        let reason: String = reason.chars().take(200).collect();
        self.set_delivery(id, destination, DeliveryState::Failed { reason })?;
        self.move_out_of_journal(id)
    }

    /// Puts dead letters (of one destination, or all) back in the queue. Returns how many.
    pub fn retry_failed(&self, destination: Option<&str>) -> Result<u64, SpoolError> {
        let mut moved = 0;
        let failed: Vec<(ObjectId, String)> = self
            .inner
            .index
            .records()
            .filter_map(Result::ok)
            .flat_map(|(id, r)| {
                r.destinations
                    .into_iter()
                    .filter(|d| matches!(d.state, DeliveryState::Failed { .. }))
                    .map(move |d| (id, d.name))
            })
            .filter(|(_, name)| destination.is_none_or(|want| want == name))
            .collect();
        for (id, name) in failed {
            self.set_delivery(&id, &name, DeliveryState::Queued)?;
            moved += 1;
        }
        Ok(moved)
    }

    /// [`Index::set_delivery`](crate::index::Index::set_delivery), waiting once for the
    /// checkpointer if `id` is not indexed yet (a journaled object's commit returns before
    /// its index entry is written).
    fn set_delivery_indexed(
        &self,
        id: &ObjectId,
        destination: &str,
        state: DeliveryState,
        now_ms: Option<u64>,
        sync: bool,
    ) -> Result<Option<crate::index::DeliveryChange>, SpoolError> {
        let index = &self.inner.index;
        let change = index.set_delivery(id, destination, state.clone(), now_ms, sync)?;
        if change.is_some() || index.contains(id)? {
            return Ok(change);
        }
        self.settle(crate::SETTLE_WAIT);
        Ok(index.set_delivery(id, destination, state, now_ms, sync)?)
    }

    fn set_delivery(
        &self,
        id: &ObjectId,
        destination: &str,
        state: DeliveryState,
    ) -> Result<(), SpoolError> {
        if state == DeliveryState::Sent {
            return self.mark_sent(id, destination);
        }
        let inner = &self.inner;
        let queued = state == DeliveryState::Queued;
        let Some(change) = self.set_delivery_indexed(id, destination, state, None, true)? else {
            return Err(SpoolError::NoDelivery {
                id: *id,
                destination: destination.to_string(),
            });
        };
        match (change.was_queued, queued) {
            (false, true) => inner.note_queued(destination, 1, 0),
            (true, false) => inner.note_queued(destination, 0, 1),
            _ => {}
        }
        Ok(())
    }

    /// Records (or clears) why uploads to `destination` are failing, for `spool status`.
    pub fn set_destination_error(&self, destination: &str, error: Option<String>) {
        let mut errors = self
            .inner
            .destination_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => errors.insert(destination.to_string(), e),
            None => errors.remove(destination),
        };
    }

    /// A receiver that changes whenever an object is committed (uplink workers wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_route_takes_the_named_types_and_codes_only() {
        let emr = Route::new("emr", ObjectKind::Hl7).with_message_types(["ORU^R01", "ADT"]);
        let hl7 = |t: &str| emr.takes(ObjectKind::Hl7, Some(t));
        assert!(hl7("ORU^R01"));
        assert!(
            hl7("ADT^A08") && hl7("ADT^A01"),
            "a code alone takes its events"
        );
        for other in ["ORU^R30", "DFT^P03", "OMG^O19", "ACK^A08"] {
            assert!(!hl7(other), "{other}");
        }
        assert!(
            !emr.takes(ObjectKind::Dicom, None),
            "HL7 routes take no DICOM"
        );
    }

    #[test]
    fn an_unreadable_type_goes_only_to_routes_without_a_filter() {
        let all = Route::new("all", ObjectKind::Hl7);
        let adt = Route::new("adt", ObjectKind::Hl7).with_message_types(["ADT"]);
        for unreadable in [
            "ADT^",
            "ADT",
            "adt^a08",
            "ADT^A08&X",
            "AD^A08",
            "ADTX^A08",
            "^A08",
            "",
            "ADT^A0\u{8}",
        ] {
            assert!(
                all.takes(ObjectKind::Hl7, Some(unreadable)),
                "{unreadable:?}"
            );
            assert!(
                !adt.takes(ObjectKind::Hl7, Some(unreadable)),
                "{unreadable:?}"
            );
        }
        assert!(all.takes(ObjectKind::Hl7, None));
        assert!(!adt.takes(ObjectKind::Hl7, None));
    }

    #[test]
    fn results_go_only_to_routes_that_take_results() {
        let cloud = Route::from("cloud");
        let pacs = Route::from("pacs").results_only();
        let emr = Route::new("emr", ObjectKind::Hl7)
            .with_message_types(["ORU^R01"])
            .with_results();
        let dicom = |r: &Route, o| r.takes_from(o, ObjectKind::Dicom, None);
        let oru = |r: &Route, o| r.takes_from(o, ObjectKind::Hl7, Some("ORU^R01"));
        assert!(dicom(&cloud, Origin::Local) && !dicom(&cloud, Origin::Result));
        assert!(!dicom(&pacs, Origin::Local) && dicom(&pacs, Origin::Result));
        assert!(oru(&emr, Origin::Local) && oru(&emr, Origin::Result));
        assert!(
            !emr.takes_from(Origin::Result, ObjectKind::Hl7, Some("ADT^A08")),
            "a result still obeys the message type filter"
        );
    }

    #[test]
    fn unfiltered_routes_take_every_object_of_their_kind() {
        let archive = Route::from("archive");
        assert!(archive.takes(ObjectKind::Dicom, None));
        assert!(!archive.takes(ObjectKind::Hl7, Some("ORU^R01")));
    }
}
