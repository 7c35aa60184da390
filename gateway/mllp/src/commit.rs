//! Group commit: one thread owns the durable step for every connection's messages.
//!
//! Connections send a [`gateway_spool::MessageIn`] with a reply channel. The thread takes the
//! first waiting message, then every other one already queued (up to [`MAX_GROUP`]), and
//! stores them together: one append to the spool's journal and one `fdatasync`
//! ([`gateway_spool::Spool::store_messages`]). While a group is being synced the next one
//! gathers, so under load a sync serves many senders and with one sender it costs what a
//! single commit costs.

use gateway_spool::{Committed, MessageIn, Spool, SpoolError};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Most messages in one group.
const MAX_GROUP: usize = 512;

struct Job {
    item: MessageIn,
    reply: oneshot::Sender<Result<Committed, SpoolError>>,
}

/// A handle on the committer thread; cheap to clone. The thread ends when every handle is
/// dropped.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("item", &self.item).finish()
    }
}

impl Committer {
    /// Starts the committer thread.
    pub fn start(spool: Spool) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Job>(4 * MAX_GROUP);
        std::thread::Builder::new()
            .name("hl7-commit".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let (items, replies): (Vec<MessageIn>, Vec<_>) =
                        jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
                    let results = spool.store_messages(&items);
                    for (reply, result) in replies.into_iter().zip(results) {
                        // The connection may be gone (sender hung up): its message is stored
                        // all the same and a resend will be answered as a duplicate.
                        let _ = reply.send(result);
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Stores one message; returns once it is durable (or could not be made so).
    pub async fn store(&self, item: MessageIn) -> Result<Committed, SpoolError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Job { item, reply }).await.is_err() {
            warn!("HL7 committer is gone");
            return Err(SpoolError::GroupCommit {
                detail: "the committer stopped".into(),
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(SpoolError::GroupCommit {
                detail: "the committer stopped".into(),
            })
        })
    }
}
