//! Observers: who else sees each durable message (e.g. the core's booking ledger reading
//! SIU^S12..S17 from its RIS), through a bounded channel the listener never waits on.
//!
//! The listener hands every message, once it is durable (stored, or a duplicate of a stored
//! one), to the [`Observer`] with `try_send` before it builds the acknowledgement; the
//! consumer (a task of its own) reads [`Observed`] items from the receiver at its own pace.
//! Nothing the consumer does (a slow disk, a stalled ledger) can delay an AA.
//!
//! Drop policy: the queue holds [`OBSERVER_QUEUE`] messages. When it is full (the consumer
//! is that far behind) or the consumer is gone, the message is **not** handed over: the
//! drop is counted in `gateway_hl7_observer_dropped_total{reason="full"|"closed"}` and
//! logged at warn with the message type and length only (no content). The message itself
//! is already stored in the spool and acknowledged; only its side effect (e.g. a slot block
//! from a SIU) is missing, and the warning says so.

use tokio::sync::mpsc;

/// Messages an observer may fall behind by before new ones are dropped (counted and logged).
/// Large: a burst of a RIS's whole day of SIUs fits.
pub const OBSERVER_QUEUE: usize = 4096;

/// One durable message as an observer gets it: its decoded text (UTF-8, exactly what the
/// listener parsed) and its type. `Debug` shows neither content nor identifiers.
#[derive(Clone, PartialEq, Eq)]
pub struct Observed {
    text: String,
    message_type: String,
}

impl Observed {
    /// The decoded message text (segments separated by CR).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `MSH-9.1^MSH-9.2`, e.g. `SIU^S12`.
    pub fn message_type(&self) -> &str {
        &self.message_type
    }
}

impl AsRef<str> for Observed {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("message_type", &self.message_type)
            .field("len", &self.text.len())
            .finish()
    }
}

/// The sending side an [`crate::Hl7Service`] hands durable messages to
/// ([`crate::Hl7Service::with_observer`]).
#[derive(Debug, Clone)]
pub struct Observer {
    tx: mpsc::Sender<Observed>,
}

/// Why a message was not handed to the observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The queue is full: the consumer is [`OBSERVER_QUEUE`] messages behind.
    Full,
    /// The consumer is gone.
    Closed,
}

impl Dropped {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Dropped::Full => "full",
            Dropped::Closed => "closed",
        }
    }
}

impl Observer {
    /// An observer with room for `capacity` messages (at least 1; use [`OBSERVER_QUEUE`]) and
    /// the receiver its consumer reads.
    pub fn channel(capacity: usize) -> (Observer, mpsc::Receiver<Observed>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Observer { tx }, rx)
    }

    /// Hands a message over without waiting.
    pub(crate) fn offer(&self, text: String, message_type: String) -> Result<(), Dropped> {
        self.tx
            .try_send(Observed { text, message_type })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Dropped::Full,
                mpsc::error::TrySendError::Closed(_) => Dropped::Closed,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_closed_queue_drops_without_waiting_and_says_why() {
        let (observer, mut rx) = Observer::channel(1);
        assert_eq!(observer.offer("MSH|a".into(), "SIU^S12".into()), Ok(()));
        assert_eq!(
            observer.offer("MSH|b".into(), "SIU^S12".into()),
            Err(Dropped::Full)
        );
        let got = rx.try_recv().unwrap();
        assert_eq!((got.text(), got.message_type()), ("MSH|a", "SIU^S12"));
        assert!(!format!("{got:?}").contains("MSH|a"));
        drop(rx);
        assert_eq!(
            observer.offer("MSH|c".into(), "SIU^S12".into()),
            Err(Dropped::Closed)
        );
    }
}
