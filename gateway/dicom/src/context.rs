//! What the listener ([`crate::service`]) hands to every association
//! ([`crate::association`]): the negotiation options, the spool, the metrics, the idle
//! timeout and the worklist. Both modules depend on this one; `service` depends on
//! `association`, never the other way round.

use std::sync::Arc;
use std::time::Duration;

use dicom_ul::ServerAssociationOptions;
use dicom_ul::association::server::{AcceptCalledAeTitle, DefaultNegotiation};
use gateway_spool::Spool;

use crate::link::Syntaxes;
use crate::metrics::Metrics;
use crate::worklist::WorklistSource;

/// The association negotiation options of the service.
pub(crate) type Options =
    ServerAssociationOptions<'static, AcceptCalledAeTitle, DefaultNegotiation>;

/// What every association of the service shares.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub options: Arc<Options>,
    /// The same syntaxes as `options`, for the TLS listener's negotiation.
    pub syntaxes: Arc<Syntaxes>,
    pub spool: Spool,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    /// Set on the core gateway: Modality Worklist C-FIND is offered.
    pub worklist: Option<Arc<dyn WorklistSource>>,
    /// Where each association's stored studies go at its end (the audit trail).
    pub transfers: Option<crate::transfers::TransferSink>,
}
