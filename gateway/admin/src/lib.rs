//! Operator-facing local interfaces of the gateway.
//!
//! - [`http`]: `GET /healthz` and `GET /metrics` (Prometheus text format) on `admin.listen`.
//! - [`control`]: a Unix socket in the data folder through which the `gatewayd spool ...`
//!   commands reach a running daemon (the spool index is locked by the daemon while it runs).
//!
//! Invariants:
//! - Nothing here exposes patient data: metrics carry counts and labels only, and the
//!   control socket is created with mode 0600 inside the 0700 data folder.
//! - Both interfaces stop with the shared shutdown signal.
//! - No indexing or string slicing that could panic on what a client sends
//!   (`clippy::indexing_slicing` and `clippy::string_slice` are denied in this crate).

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod control;
pub mod http;
