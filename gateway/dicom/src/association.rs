//! One established association: the DIMSE message loop, C-STORE streaming and
//! Modality Worklist C-FIND.
//!
//! A C-FIND's identifier is collected in memory (at most
//! [`worklist::MAX_IDENTIFIER_LEN`] bytes; the rest of a larger one is drained and the
//! request answered C000), the worklist is read and matched on a blocking thread, and one
//! pending response per match follows. Between pending responses, PDUs already received
//! are looked at: a C-CANCEL-RQ for the request ends it with FE00; any other message is a
//! protocol violation (this SCP negotiates no asynchronous operations).

use std::net::SocketAddr;
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use gateway_spool::{Committed, ObjectMeta, Spool, SpoolError};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::dimse::{self, FindRequest, Request, StoreRequest, status};
use crate::part10;
use crate::walker::{Encoding, Summary, Walker};
use crate::worklist::{self, MODALITY_WORKLIST_FIND};

/// Largest command set accepted (real ones are a few hundred bytes).
const MAX_COMMAND_LEN: usize = 64 * 1024;
/// Longest wait for `WorklistSource::items` before a C-FIND is answered C000.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(30);
/// PDUs buffered between the network and an object's writer thread.
const SINK_DEPTH: usize = 8;

type Association = crate::link::Link;

/// Why the loop ends.
enum End {
    Released,
    PeerAborted,
    /// We abort: protocol violation, timeout or shutdown.
    Abort(&'static str),
    Broken(String),
}

/// Serves one association until release, abort, idle timeout or hard stop.
pub(crate) async fn serve(
    mut association: Association,
    ctx: &Context,
    calling: &str,
    addr: SocketAddr,
    mut hard_stop: watch::Receiver<bool>,
) {
    let accepted = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .count();
    info!(peer = %addr, calling_ae = %calling, accepted_contexts = accepted, "association established");
    let mut state = Dimse::default();
    let end = loop {
        let pdu = tokio::select! {
            received = tokio::time::timeout(ctx.idle_timeout, association.receive()) => match received {
                Ok(Ok(pdu)) => pdu,
                Ok(Err(e)) => break End::Broken(e.to_string()),
                Err(_) => break End::Abort("idle timeout"),
            },
            () = async { let _ = hard_stop.wait_for(|stop| *stop).await; } => break End::Abort("gateway shutting down"),
        };
        match pdu {
            Pdu::PData { data } => {
                if let Err(reason) = state.on_pdata(data, &mut association, ctx, calling).await {
                    break End::Abort(reason);
                }
            }
            Pdu::ReleaseRQ => {
                if state.store.is_some() || state.find.is_some() {
                    break End::Abort("release requested in the middle of a data set");
                }
                let _ = association.send(&Pdu::ReleaseRP).await;
                break End::Released;
            }
            Pdu::AbortRQ { .. } => break End::PeerAborted,
            _ => break End::Abort("unexpected PDU"),
        }
    };
    // An object cut off mid-transfer is discarded: its sender got no success status.
    if let Some(store) = state.store.take() {
        store.discard().await;
    }
    match end {
        End::Released => {
            info!(peer = %addr, calling_ae = %calling, stored = state.stored, "association released")
        }
        End::PeerAborted => {
            info!(peer = %addr, calling_ae = %calling, stored = state.stored, "association aborted by peer")
        }
        End::Broken(error) => {
            info!(peer = %addr, calling_ae = %calling, error, "association ended on a receive error");
            let _ = association.abort().await;
        }
        End::Abort(reason) => {
            warn!(peer = %addr, calling_ae = %calling, reason, "aborting association");
            let _ = association.abort().await;
        }
    }
    // What was stored goes to the audit trail, however the association ended.
    if let Some(sink) = &ctx.transfers
        && let Some(transfer) = state.tally.take(calling, addr)
    {
        let _ = sink.send(transfer).await;
    }
}

/// DIMSE state of one association.
#[derive(Default)]
struct Dimse {
    command: Vec<u8>,
    command_pc: Option<u8>,
    store: Option<InboundObject>,
    stored: u64,
    find: Option<InboundFind>,
    /// Stored instances per study, for the audit trail.
    tally: crate::transfers::Tally,
}

/// A C-FIND whose identifier is being received.
struct InboundFind {
    req: FindRequest,
    pc_id: u8,
    transfer_syntax: String,
    identifier: Vec<u8>,
    too_large: bool,
    /// Answered with this (status, metric label, comment) once the identifier is drained.
    refusal: Option<(u16, &'static str, &'static str)>,
}

impl Dimse {
    async fn on_pdata(
        &mut self,
        values: Vec<PDataValue>,
        association: &mut Association,
        ctx: &Context,
        calling: &str,
    ) -> Result<(), &'static str> {
        for pdv in values {
            match pdv.value_type {
                PDataValueType::Command => {
                    if self.store.is_some() || self.find.is_some() {
                        return Err("command fragment in the middle of a data set");
                    }
                    if self
                        .command_pc
                        .is_some_and(|pc| pc != pdv.presentation_context_id)
                    {
                        return Err("command fragments on different presentation contexts");
                    }
                    if self.command.len() + pdv.data.len() > MAX_COMMAND_LEN {
                        return Err("command set too large");
                    }
                    self.command_pc = Some(pdv.presentation_context_id);
                    self.command.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let bytes = std::mem::take(&mut self.command);
                        self.command_pc = None;
                        self.on_command(
                            &bytes,
                            pdv.presentation_context_id,
                            association,
                            ctx,
                            calling,
                        )
                        .await?;
                    }
                }
                PDataValueType::Data if self.find.is_some() => {
                    let Some(find) = self.find.as_mut() else {
                        continue;
                    };
                    if find.pc_id != pdv.presentation_context_id {
                        return Err("data set fragment on another presentation context");
                    }
                    if find.identifier.len() + pdv.data.len() > worklist::MAX_IDENTIFIER_LEN {
                        find.too_large = true;
                        find.identifier = Vec::new();
                    } else if !find.too_large {
                        find.identifier.extend_from_slice(&pdv.data);
                    }
                    if pdv.is_last
                        && let Some(find) = self.find.take()
                    {
                        answer_find(find, association, ctx).await?;
                    }
                }
                PDataValueType::Data => {
                    let Some(store) = self.store.as_mut() else {
                        return Err("data set fragment without a C-STORE command");
                    };
                    if store.pc_id != pdv.presentation_context_id {
                        return Err("data set fragment on another presentation context");
                    }
                    let last = pdv.is_last;
                    store.push(pdv.data).await;
                    if last && let Some(store) = self.store.take() {
                        let req = store.req.clone();
                        let pc_id = store.pc_id;
                        let (code, label, comment, seen) = store.finish().await;
                        ctx.metrics.stored(label);
                        if code == status::SUCCESS {
                            self.stored += 1;
                        }
                        if let Some(seen) = seen {
                            self.tally.add(
                                seen.study_instance_uid.as_deref(),
                                seen.patient_id.as_deref(),
                                &req.sop_class_uid,
                            );
                        }
                        send_command(
                            association,
                            pc_id,
                            dimse::store_response(&req, code, comment),
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn on_command(
        &mut self,
        bytes: &[u8],
        pc_id: u8,
        association: &mut Association,
        ctx: &Context,
        calling: &str,
    ) -> Result<(), &'static str> {
        let pc = association
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .ok_or("message on a presentation context that was not accepted")?;
        let request = dimse::decode(bytes).map_err(|_| "command set does not decode")?;
        match request {
            Request::Echo {
                message_id,
                sop_class_uid,
            } => {
                send_command(
                    association,
                    pc_id,
                    dimse::echo_response(message_id, &sop_class_uid),
                )
                .await
            }
            Request::Store(req) => {
                let refusal = if trim_uid(&pc.abstract_syntax) != req.sop_class_uid {
                    Some((
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "sop_class_not_supported",
                        "SOP class not accepted on this presentation context",
                    ))
                } else if !req.has_data_set {
                    Some((
                        status::CANNOT_UNDERSTAND,
                        "invalid",
                        "C-STORE without a data set",
                    ))
                } else {
                    None
                };
                match refusal {
                    Some((code, label, comment)) if !req.has_data_set => {
                        ctx.metrics.stored(label);
                        send_command(
                            association,
                            pc_id,
                            dimse::store_response(&req, code, Some(comment)),
                        )
                        .await
                    }
                    refusal => {
                        let ts = trim_uid(&pc.transfer_syntax).to_string();
                        self.store =
                            Some(InboundObject::start(ctx, req, pc_id, ts, calling, refusal));
                        Ok(())
                    }
                }
            }
            Request::Find(req) => {
                let offered = ctx.worklist.is_some()
                    && trim_uid(&pc.abstract_syntax) == MODALITY_WORKLIST_FIND
                    && req.sop_class_uid == MODALITY_WORKLIST_FIND;
                let refusal = if offered {
                    None
                } else {
                    Some((
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "sop_class_not_supported",
                        "SOP class not supported",
                    ))
                };
                if !req.has_data_set {
                    let (code, label, comment) = refusal.unwrap_or((
                        status::CANNOT_UNDERSTAND,
                        "invalid",
                        "C-FIND without an identifier",
                    ));
                    ctx.metrics.worklist_find(label);
                    return send_command(
                        association,
                        pc_id,
                        dimse::find_response(&req, code, false, Some(comment)),
                    )
                    .await;
                }
                self.find = Some(InboundFind {
                    req,
                    pc_id,
                    transfer_syntax: trim_uid(&pc.transfer_syntax).to_string(),
                    identifier: Vec::new(),
                    too_large: false,
                    refusal,
                });
                Ok(())
            }
            // A cancel for a request already answered (or never made) is ignored.
            Request::Cancel { .. } => Ok(()),
            Request::Other { .. } => Err("DIMSE command not offered by this SCP"),
        }
    }
}

async fn send_command(
    association: &mut Association,
    pc_id: u8,
    data: Vec<u8>,
) -> Result<(), &'static str> {
    if data.is_empty() {
        return Err("response did not encode");
    }
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc_id,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    };
    association
        .send(&pdu)
        .await
        .map_err(|_| "cannot send response")
}

/// Answers a C-FIND whose identifier is complete.
async fn answer_find(
    find: InboundFind,
    association: &mut Association,
    ctx: &Context,
) -> Result<(), &'static str> {
    let InboundFind {
        req,
        pc_id,
        transfer_syntax,
        identifier,
        too_large,
        refusal,
    } = find;
    let refusal = refusal.or(too_large.then_some((
        status::CANNOT_UNDERSTAND,
        "too_large",
        "identifier too large",
    )));
    let parsed = match refusal {
        Some(refusal) => Err(refusal),
        None => worklist::parse_identifier(&identifier, &transfer_syntax)
            .map_err(|e| (e.status(), e.label(), e.label())),
    };
    let source = ctx.worklist.clone();
    let (query, source) = match (parsed, source) {
        (Ok(query), Some(source)) => (query, source),
        (Err((code, label, comment)), _) => {
            debug!(
                status = format!("{code:04X}"),
                reason = label,
                "C-FIND refused"
            );
            ctx.metrics.worklist_find(label);
            return send_rsp(
                ctx,
                association,
                pc_id,
                dimse::find_response(&req, code, false, Some(comment)),
            )
            .await;
        }
        (Ok(_), None) => {
            ctx.metrics.worklist_find("sop_class_not_supported");
            return send_rsp(
                ctx,
                association,
                pc_id,
                dimse::find_response(&req, status::SOP_CLASS_NOT_SUPPORTED, false, None),
            )
            .await;
        }
    };
    let matching = query.query().clone();
    let selected = tokio::time::timeout(
        SOURCE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            let items = source.items();
            matching
                .select(&items)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        }),
    )
    .await;
    let Ok(Ok(items)) = selected else {
        warn!("worklist source failed while answering C-FIND");
        ctx.metrics.worklist_find("unable_to_process");
        return send_rsp(
            ctx,
            association,
            pc_id,
            dimse::find_response(
                &req,
                status::CANNOT_UNDERSTAND,
                false,
                Some("worklist unavailable"),
            ),
        )
        .await;
    };
    let mut sent = 0usize;
    for item in &items {
        if cancel_received(association, req.message_id).await? {
            return cancel_find(&req, pc_id, sent, association, ctx).await;
        }
        let Ok(data) = query.response(item) else {
            ctx.metrics.worklist_find("unable_to_process");
            return send_rsp(
                ctx,
                association,
                pc_id,
                dimse::find_response(
                    &req,
                    status::CANNOT_UNDERSTAND,
                    false,
                    Some("response does not encode"),
                ),
            )
            .await;
        };
        send_rsp(
            ctx,
            association,
            pc_id,
            dimse::find_response(&req, status::PENDING, true, None),
        )
        .await?;
        send_timed(ctx, send_data(association, pc_id, data)).await?;
        ctx.metrics.worklist_matches.inc();
        sent += 1;
    }
    if cancel_received(association, req.message_id).await? {
        return cancel_find(&req, pc_id, sent, association, ctx).await;
    }
    debug!(matches = sent, "C-FIND answered");
    ctx.metrics.worklist_find("success");
    send_rsp(
        ctx,
        association,
        pc_id,
        dimse::find_response(&req, status::SUCCESS, false, None),
    )
    .await
}

async fn cancel_find(
    req: &FindRequest,
    pc_id: u8,
    sent: usize,
    association: &mut Association,
    ctx: &Context,
) -> Result<(), &'static str> {
    debug!(matches = sent, "C-FIND cancelled");
    ctx.metrics.worklist_find("cancel");
    send_rsp(
        ctx,
        association,
        pc_id,
        dimse::find_response(req, status::CANCEL, false, None),
    )
    .await
}

/// A C-FIND response, given up on when the peer does not take it within the idle timeout
/// (a peer that stops reading must not hold the association forever).
async fn send_rsp(
    ctx: &Context,
    association: &mut Association,
    pc_id: u8,
    data: Vec<u8>,
) -> Result<(), &'static str> {
    send_timed(ctx, send_command(association, pc_id, data)).await
}

async fn send_timed(
    ctx: &Context,
    send: impl Future<Output = Result<(), &'static str>>,
) -> Result<(), &'static str> {
    tokio::time::timeout(ctx.idle_timeout, send)
        .await
        .unwrap_or(Err("peer does not take C-FIND responses"))
}

/// Looks at the PDUs already received, without waiting: true on a C-CANCEL-RQ for
/// `message_id`. Cancels of other message ids are ignored; any other message is an error.
/// (dicom-ul's receive keeps partial PDUs in the association's buffer, so abandoning it
/// when nothing is ready loses nothing.)
async fn cancel_received(
    association: &mut Association,
    message_id: u16,
) -> Result<bool, &'static str> {
    loop {
        let pdu = match tokio::time::timeout(Duration::ZERO, association.receive()).await {
            Err(_) => return Ok(false),
            Ok(Err(_)) => return Err("receive error while answering C-FIND"),
            Ok(Ok(pdu)) => pdu,
        };
        let Pdu::PData { data } = pdu else {
            return Err("unexpected PDU while answering C-FIND");
        };
        for pdv in data {
            if pdv.value_type != PDataValueType::Command || !pdv.is_last {
                return Err("unexpected message while answering C-FIND");
            }
            match dimse::decode(&pdv.data) {
                Ok(Request::Cancel { message_id: id }) => {
                    if id.is_none_or(|id| id == message_id) {
                        return Ok(true);
                    }
                }
                _ => return Err("unexpected message while answering C-FIND"),
            }
        }
    }
}

/// Sends a data set in PDVs that fit the peer's maximum PDU length.
async fn send_data(
    association: &mut Association,
    pc_id: u8,
    data: Vec<u8>,
) -> Result<(), &'static str> {
    // The PDV item header (length, context id, control) takes 6 bytes of the PDU.
    let chunk = match association.requestor_max_pdu_length() {
        0 => 64 * 1024,
        max => (max as usize).saturating_sub(6).max(2) & !1,
    };
    let mut chunks: Vec<&[u8]> = data.chunks(chunk).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, part) in chunks.into_iter().enumerate() {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Data,
                is_last: i == last,
                data: part.to_vec(),
            }],
        };
        association
            .send(&pdu)
            .await
            .map_err(|_| "cannot send response")?;
    }
    Ok(())
}

fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

enum Chunk {
    Data(Vec<u8>),
    /// The data set is complete and checked; carries its Study Instance UID.
    Commit {
        study: Option<String>,
    },
}

/// A data set being received: checked by the walker on the way, written by its own
/// blocking writer thread into a spool ingest.
struct InboundObject {
    req: StoreRequest,
    pc_id: u8,
    walker: Option<Walker>,
    walk_error: bool,
    refusal: Option<(u16, &'static str, &'static str)>,
    tx: Option<mpsc::Sender<Chunk>>,
    result: Option<oneshot::Receiver<Result<Option<Committed>, SpoolError>>>,
}

impl InboundObject {
    fn start(
        ctx: &Context,
        req: StoreRequest,
        pc_id: u8,
        transfer_syntax: String,
        calling: &str,
        refusal: Option<(u16, &'static str, &'static str)>,
    ) -> Self {
        let walker = Some(Walker::new(Encoding::of_transfer_syntax(&transfer_syntax)));
        let mut object = Self {
            req,
            pc_id,
            walker,
            walk_error: false,
            refusal,
            tx: None,
            result: None,
        };
        if object.refusal.is_some() {
            // Drain the data set and answer with the refusal; nothing is written.
            return object;
        }
        let header = match part10::header(
            &object.req.sop_class_uid,
            &object.req.sop_instance_uid,
            &transfer_syntax,
        ) {
            Ok(h) => h,
            Err(_) => {
                object.refusal = Some((
                    status::CANNOT_UNDERSTAND,
                    "invalid",
                    "UIDs do not form a valid file meta group",
                ));
                return object;
            }
        };
        let meta = ObjectMeta {
            sop_instance_uid: object.req.sop_instance_uid.clone(),
            sop_class_uid: object.req.sop_class_uid.clone(),
            transfer_syntax_uid: transfer_syntax,
            source: calling.to_string(),
        };
        let (tx, rx) = mpsc::channel(SINK_DEPTH);
        let (result_tx, result_rx) = oneshot::channel();
        let spool = ctx.spool.clone();
        tokio::task::spawn_blocking(move || {
            let _ = result_tx.send(write_object(&spool, meta, &header, rx));
        });
        object.tx = Some(tx);
        object.result = Some(result_rx);
        object
    }

    async fn push(&mut self, data: Vec<u8>) {
        if let Some(walker) = self.walker.as_mut()
            && !self.walk_error
            && walker.feed(&data).is_err()
        {
            self.walk_error = true;
            // Stop writing: the object will be refused.
            self.tx = None;
        }
        if let Some(tx) = &self.tx
            && tx.send(Chunk::Data(data)).await.is_err()
        {
            // The writer stopped (spool full or failing); its error comes with the result.
            self.tx = None;
        }
    }

    /// Ends the data set and returns (status, metric label, error comment, and for a
    /// stored object what the walk found).
    async fn finish(mut self) -> (u16, &'static str, Option<&'static str>, Option<Summary>) {
        if let Some(refusal) = self.refusal {
            self.discard().await;
            return (refusal.0, refusal.1, Some(refusal.2), None);
        }
        let check = match self.walker.take() {
            _ if self.walk_error => {
                Err((status::CANNOT_UNDERSTAND, "invalid", "malformed data set"))
            }
            Some(walker) => match walker.finish() {
                Err(_) => Err((status::CANNOT_UNDERSTAND, "invalid", "malformed data set")),
                Ok(summary) => {
                    if summary.sop_class_uid.as_deref() != Some(self.req.sop_class_uid.as_str()) {
                        Err((
                            status::DATASET_MISMATCH,
                            "mismatch",
                            "SOP Class UID of data set does not match command",
                        ))
                    } else if summary.sop_instance_uid.as_deref()
                        != Some(self.req.sop_instance_uid.as_str())
                    {
                        Err((
                            status::DATASET_MISMATCH,
                            "mismatch",
                            "SOP Instance UID of data set does not match command",
                        ))
                    } else {
                        Ok(summary)
                    }
                }
            },
            None => Err((status::CANNOT_UNDERSTAND, "invalid", "malformed data set")),
        };
        let summary = match check {
            Ok(summary) => summary,
            Err((code, label, comment)) => {
                self.discard().await;
                return (code, label, Some(comment), None);
            }
        };
        if let Some(tx) = self.tx.take() {
            let study = summary.study_instance_uid.clone();
            let _ = tx.send(Chunk::Commit { study }).await;
        }
        let outcome = match self.result.take() {
            Some(rx) => rx.await.unwrap_or(Ok(None)),
            None => Ok(None),
        };
        match outcome {
            Ok(Some(Committed::Stored(id))) => {
                debug!(object = %hex_id(id.as_bytes()), "object stored");
                (status::SUCCESS, "success", None, Some(summary))
            }
            Ok(Some(Committed::Duplicate(id))) => {
                debug!(object = %hex_id(id.as_bytes()), "duplicate of a stored object");
                (status::SUCCESS, "duplicate", None, Some(summary))
            }
            Ok(None) => (
                status::OUT_OF_RESOURCES,
                "out_of_resources",
                Some("storage interrupted"),
                None,
            ),
            Err(SpoolError::Full { reason }) => {
                warn!(reason, "C-STORE refused: spool full");
                (
                    status::OUT_OF_RESOURCES,
                    "out_of_resources",
                    Some("gateway storage is full"),
                    None,
                )
            }
            Err(e) => {
                warn!(error = %e, "C-STORE failed in the spool");
                (
                    status::OUT_OF_RESOURCES,
                    "out_of_resources",
                    Some("gateway storage failed"),
                    None,
                )
            }
        }
    }

    /// Drops the object: the writer sees the channel close without `Commit` and removes it.
    async fn discard(mut self) {
        self.tx = None;
        if let Some(rx) = self.result.take() {
            let _ = rx.await;
        }
    }
}

/// The writer thread of one object. `Ok(None)`: the data set was abandoned.
fn write_object(
    spool: &Spool,
    meta: ObjectMeta,
    header: &[u8],
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Option<Committed>, SpoolError> {
    let mut ingest = spool.begin(meta)?;
    ingest.write(header)?;
    loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(data)) => ingest.write(&data)?,
            Some(Chunk::Commit { study }) => {
                if let Some(uid) = study.as_deref() {
                    ingest.set_study_instance_uid(uid);
                }
                return ingest.commit().map(Some);
            }
            None => return Ok(None),
        }
    }
}

fn hex_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
