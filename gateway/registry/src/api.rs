//! What the kiosk (and the safety-warnings feature after it) asks of the registry
//! ([`IdentityService`]), and the answers. Every method returns a future ([`BoxFuture`]);
//! none blocks the caller's thread. The registry audits every decision, disclosure and
//! refusal itself (the caller names the `actor`), so callers never audit these twice.
//!
//! Consent gates **every** disclosure of one hospital's records or data to another:
//! [`IdentityService::may_disclose`] answers [`Permit`] or [`Refused`] (audited either way).

use std::future::Future;
use std::pin::Pin;

use gateway_identity::{Decision, Record};
use serde::{Deserialize, Serialize};

/// A boxed, sendable future (the trait is object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One hospital's record of one patient: `(hospital_id, patient_id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceKey {
    pub hospital_id: String,
    pub patient_id: String,
}

/// The registry's opaque id of a person (the set of linked source records). Random, not
/// derived from any identity; changes when records are merged or split.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PersonId(pub String);

/// A source record as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub key: SourceKey,
    pub person: PersonId,
    pub record: Record,
    /// RFC 3339, when the registry last changed it.
    pub updated: String,
}

/// Kinds of data a consent grants (公開同意 per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// Other hospitals' record identifiers and demographics (PDQm / PIXm answers).
    Identity,
    /// Results: reports and their images' metadata.
    Results,
    /// Allergies and contrast reactions.
    Reactions,
    /// Radiation dose.
    Dose,
    /// Images.
    Images,
}

/// Who a consent lets see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "hospital_id")]
pub enum Grantee {
    /// Every hospital of the region.
    Region,
    /// One hospital.
    Hospital(String),
}

/// One permission of a consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub grantee: Grantee,
    pub kinds: Vec<DataKind>,
}

/// Where a consent was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentSource {
    Kiosk,
    Hl7,
}

/// Active, or revoked (kept: who recorded and who revoked stay on record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    Active,
    Revoked,
}

/// A consent as recorded: it applies to the person the `patient` record belongs to (and
/// follows links and unlinks of that record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub id: String,
    pub patient: SourceKey,
    pub grants: Vec<Grant>,
    pub status: ConsentStatus,
    pub source: ConsentSource,
    pub recorded_by: String,
    /// RFC 3339.
    pub recorded_at: String,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<String>,
}

/// A consent to record (a new one replaces the patient's active one from the same source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConsent {
    pub patient: SourceKey,
    pub grants: Vec<Grant>,
    pub source: ConsentSource,
}

/// Why a disclosure may happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permit {
    /// The data stays within its own hospital.
    SameHospital,
    /// The referral itself: results returned to the clinic that booked the exam.
    Referral,
    /// The patient's consent (its id).
    Consent(String),
}

/// A disclosure was refused (no active consent covers it); audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no consent to disclose")]
pub struct Refused;

/// A disclosure to decide: `owner`'s data of `kind` to `to_hospital`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosure {
    pub owner: SourceKey,
    pub to_hospital: String,
    pub kind: DataKind,
    /// `true` when this is the referral (results to the clinic that booked).
    pub referral: bool,
}

/// One answer of a demographic search (PDQm `$match`).
#[derive(Debug, Clone, PartialEq)]
pub struct MatchCandidate {
    pub record: SourceRecord,
    pub score: f64,
    pub decision: Decision,
}

/// A patient's linked identifiers (PIXm): the person and each source record the requester
/// may see (its own hospital's always; others' only with consent for [`DataKind::Identity`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Linked {
    pub person: PersonId,
    pub identifiers: Vec<SourceKey>,
    /// Linked records withheld for want of consent (their count only; audited).
    pub withheld: usize,
}

/// A pair waiting for a person's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewItem {
    pub id: String,
    pub a: SourceRecord,
    pub b: SourceRecord,
    pub score: f64,
    /// RFC 3339, when the pair was queued.
    pub queued: String,
}

/// A reviewer's decision on a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The same person: link them.
    Same,
    /// Not the same person: never link them automatically.
    NotSame,
}

/// The registry could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No such source record, review item or consent.
    #[error("not found")]
    NotFound,
    /// The request contradicts the registry's state (e.g. a review already decided).
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// The store is unavailable (I/O, sealing); details are in the local log.
    #[error("identity registry is unavailable")]
    Unavailable,
}

/// The registry as its users see it. `actor` is the staff account (or `hl7:{sender}`) the
/// audit trail names; `requester_hospital` is the hospital asking (the core's own id at
/// its kiosk).
pub trait IdentityService: Send + Sync + std::fmt::Debug {
    /// PDQm-like: source records that may be `query`'s person, best first, at most `limit`;
    /// other hospitals' records only with consent ([`DataKind::Identity`]). Audited.
    fn search(
        &self,
        query: Record,
        requester_hospital: &str,
        actor: &str,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<MatchCandidate>, RegistryError>>;

    /// PIXm-like: the identifiers linked to `key`. Audited (withheld ones as refusals).
    fn linked(
        &self,
        key: SourceKey,
        requester_hospital: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Linked, RegistryError>>;

    /// The pairs waiting for review, oldest first.
    fn review_queue(&self) -> BoxFuture<'static, Result<Vec<ReviewItem>, RegistryError>>;

    /// Decides a queued pair. Audited.
    fn decide(
        &self,
        review_id: &str,
        verdict: Verdict,
        actor: &str,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// Links two source records by hand (the same person). Audited.
    fn link(
        &self,
        a: SourceKey,
        b: SourceKey,
        actor: &str,
    ) -> BoxFuture<'static, Result<PersonId, RegistryError>>;

    /// Takes `key` out of its person (a person of its own; never re-linked automatically
    /// to the records it left). Takes effect at once for every lookup and disclosure. Audited.
    fn unlink(&self, key: SourceKey, actor: &str) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// The consents on record for `key`'s person (active and revoked), newest first.
    fn consents(&self, key: SourceKey) -> BoxFuture<'static, Result<Vec<Consent>, RegistryError>>;

    /// Records a consent (durable before it returns). Audited.
    fn record_consent(
        &self,
        consent: NewConsent,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>>;

    /// Revokes a consent. Audited.
    fn revoke_consent(
        &self,
        consent_id: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<Consent, RegistryError>>;

    /// Decides one disclosure; audited either way (the referral is recorded as such).
    fn may_disclose(
        &self,
        disclosure: Disclosure,
        actor: &str,
    ) -> BoxFuture<'static, Result<Result<Permit, Refused>, RegistryError>>;
}
