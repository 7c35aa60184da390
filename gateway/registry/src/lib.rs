//! The core gateway's patient identity registry (名寄せ) and consent to share (公開同意).
//!
//! SKELETON: [`api`] is the contract the kiosk and the next features use
//! ([`api::IdentityService`]); the registry that implements it comes next.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod api;

pub use api::*;
