//! The check before a booking ([`Safety`] implements [`SafetyCheck`]) and the operator's
//! view ([`Safety::show`]).
//!
//! A check: the booked patient is recorded in the registry as a booking does
//! (`record_booking`: a first booking is linked), the person's source records are taken
//! (`members`), and the store's data of each is read. A record of the booking clinic's own
//! hospital is its own; another hospital's reactions (and, for CT, its dose events) are
//! disclosed only when the registry's `may_disclose` permits it to the clinic (the
//! registry audits the decision; a refusal leaves that record's data out). The report:
//! one warning per contrast reaction (id `r-` + the entry's random id: stable while the
//! entry lives), and for CT the window's dose summary with a warning over the threshold
//! (id `d-{window}-{total rounded}`). One audit record (`SafetyWarningsShown`, subject
//! `person:{id}`, counts only) when anything is shown. Registry or store errors, or an
//! audit that cannot be written: [`SafetyUnavailable`] (never booked unchecked).

use std::collections::BTreeSet;

use gateway_audit::{Action, Event, Outcome};
use gateway_booking::safety::DOSE_LABEL;
use gateway_booking::{
    DoseEventView, DoseSummary, PatientRef, SafetyCheck, SafetyReport, SafetyUnavailable,
    SafetyWarning, WarningKind,
};
use gateway_registry::{
    DataKind, Disclosure, IdentityService, PersonId, RegistryHandle, SourceKey, booked_patient,
};
use tracing::warn;

use crate::contrast::Contrast;
use crate::state::{Held, Reaction, StoredDose};
use crate::{BoxFuture, Options, PatientSafety, SafetyError, SafetyHandle, contrast};

/// The safety check the core's booking paths call, and the operator's view.
#[derive(Debug, Clone)]
pub struct Safety {
    store: SafetyHandle,
    registry: RegistryHandle,
    options: Options,
}

impl Safety {
    pub fn new(store: SafetyHandle, registry: RegistryHandle, options: Options) -> Self {
        Self {
            store,
            registry,
            options,
        }
    }

    /// Everything recorded for person `person` (an opaque `person:` reference), for the
    /// operator (`gatewayd safety show`): every linked record's contrast reactions and the
    /// dose summary of the window, on the core for the core's staff, so without consent
    /// filtering; audited (`SafetyShown`) with `actor` before it is answered.
    pub fn show(
        &self,
        person: PersonId,
        actor: &str,
    ) -> BoxFuture<'static, Result<PatientSafety, SafetyError>> {
        let (this, actor) = (self.clone(), actor.to_owned());
        Box::pin(async move {
            let keys = this
                .registry
                .person_members(person.clone())
                .await
                .map_err(|e| match e {
                    gateway_registry::RegistryError::NotFound => SafetyError::UnknownPerson,
                    _ => SafetyError::Unavailable,
                })?;
            let held = this.store.held(keys).await?;
            let report = build(&held, &held, true, &this.options, today());
            this.count(&report);
            let detail = counts(&report, 0);
            audit(&this.store, &actor, Action::SafetyShown, &person, detail).await?;
            Ok(PatientSafety {
                person: format!("person:{}", person.0),
                report,
            })
        })
    }

    fn count(&self, report: &SafetyReport) {
        for w in &report.warnings {
            self.store.metrics.warning(match w.kind {
                WarningKind::ContrastReaction => "contrast-reaction",
                WarningKind::CumulativeDose => "cumulative-dose",
            });
        }
    }

    async fn check_inner(
        &self,
        clinic: String,
        patient: PatientRef,
        modality: String,
        actor: String,
    ) -> Result<SafetyReport, SafetyError> {
        let unavailable = |what: &'static str| {
            move |e: gateway_registry::RegistryError| {
                warn!(error = %e, what, "safety check: identity registry");
                SafetyError::Unavailable
            }
        };
        let record = booked_patient(
            &clinic,
            &patient.id,
            &patient.name,
            &patient.birth_date,
            &patient.sex,
        );
        self.registry
            .record_booking(clinic.clone(), record)
            .await
            .map_err(unavailable("record booking"))?;
        let key = SourceKey {
            hospital_id: clinic.clone(),
            patient_id: patient.id.clone(),
        };
        let (person, keys) = self
            .registry
            .members(key)
            .await
            .map_err(unavailable("members"))?;
        let held = self.store.held(keys).await?;
        let ct = modality.trim().eq_ignore_ascii_case("CT");
        let mut reactions_ok = Vec::new();
        let mut doses_ok = Vec::new();
        let mut suppressed = 0usize;
        for h in &held {
            let own = h.key.hospital_id == clinic;
            let has_contrast = h.reactions.iter().any(|r| class_of(r).is_some());
            if has_contrast {
                if own
                    || self
                        .permitted(&h.key, &clinic, DataKind::Reactions, &actor)
                        .await?
                {
                    reactions_ok.push(h.clone());
                } else {
                    suppressed += 1;
                }
            }
            if ct && !h.doses.is_empty() {
                if own
                    || self
                        .permitted(&h.key, &clinic, DataKind::Dose, &actor)
                        .await?
                {
                    doses_ok.push(h.clone());
                } else {
                    suppressed += 1;
                }
            }
        }
        let report = build(&reactions_ok, &doses_ok, ct, &self.options, today());
        self.count(&report);
        let shown = !report.warnings.is_empty()
            || report.dose.as_ref().is_some_and(|d| !d.events.is_empty());
        if shown {
            audit(
                &self.store,
                &actor,
                Action::SafetyWarningsShown,
                &person,
                counts(&report, suppressed),
            )
            .await?;
        }
        Ok(report)
    }

    /// The registry's decision (audited by it): `true` when permitted.
    async fn permitted(
        &self,
        owner: &SourceKey,
        clinic: &str,
        kind: DataKind,
        actor: &str,
    ) -> Result<bool, SafetyError> {
        let decision = self
            .registry
            .may_disclose(
                Disclosure {
                    owner: owner.clone(),
                    to_hospital: clinic.to_owned(),
                    kind,
                    referral: false,
                },
                actor,
            )
            .await
            .map_err(|e| {
                warn!(error = %e, "safety check: disclosure decision unavailable");
                SafetyError::Unavailable
            })?;
        Ok(decision.is_ok())
    }
}

impl SafetyCheck for Safety {
    fn check(
        &self,
        clinic: &str,
        patient: &PatientRef,
        modality: &str,
        actor: &str,
    ) -> BoxFuture<'static, Result<SafetyReport, SafetyUnavailable>> {
        let this = self.clone();
        let (clinic, patient, modality, actor) = (
            clinic.to_owned(),
            patient.clone(),
            modality.to_owned(),
            actor.to_owned(),
        );
        Box::pin(async move {
            this.check_inner(clinic, patient, modality, actor)
                .await
                .map_err(|e| {
                    warn!(error = %e, "safety check unavailable");
                    SafetyUnavailable
                })
        })
    }
}

/// Today, UTC.
fn today() -> jiff::civil::Date {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
}

fn counts(report: &SafetyReport, suppressed: usize) -> Option<String> {
    let reactions = report
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::ContrastReaction)
        .count();
    let over = report
        .warnings
        .iter()
        .any(|w| w.kind == WarningKind::CumulativeDose);
    let events = report.dose.as_ref().map_or(0, |d| d.events.len());
    Some(format!(
        "reactions={reactions} dose_events={events} dose_over_threshold={over} suppressed={suppressed}"
    ))
}

async fn audit(
    store: &SafetyHandle,
    actor: &str,
    action: Action,
    person: &PersonId,
    detail: Option<String>,
) -> Result<(), SafetyError> {
    let log = store.audit.clone();
    let event = Event {
        actor: actor.to_owned(),
        action,
        outcome: Outcome::Success,
        subject: Some(format!("person:{}", person.0)),
        detail,
    };
    tokio::task::spawn_blocking(move || log.append(event))
        .await
        .map_err(|_| SafetyError::Unavailable)?
        .map(drop)
        .map_err(|e| {
            warn!(error = %e, ?action, "safety: audit record not written");
            SafetyError::Unavailable
        })
}

/// The agent as the table reads it now (else as it read it when recorded).
fn class_of(r: &Reaction) -> Option<Contrast> {
    contrast::recognise(Some(&r.allergen_code), Some(&r.allergen_text)).or(r.contrast)
}

fn severity_words(code: &str) -> (&str, &str) {
    match code.trim().to_ascii_uppercase().as_str() {
        "SV" => ("severe", "重度"),
        "MO" => ("moderate", "中等度"),
        "MI" => ("mild", "軽度"),
        "U" | "" => ("severity unknown", "重症度不明"),
        _ => (code, code),
    }
}

/// The report of what `reactions` and `doses` hold (already cleared for disclosure).
pub(crate) fn build(
    reactions: &[Held],
    doses: &[Held],
    with_dose: bool,
    options: &Options,
    today: jiff::civil::Date,
) -> SafetyReport {
    let mut warnings = Vec::new();
    for h in reactions {
        for r in &h.reactions {
            if let Some(class) = class_of(r) {
                warnings.push(reaction_warning(r, class));
            }
        }
    }
    let dose = with_dose.then(|| summary(doses, options, today));
    if let (Some(d), Some(threshold)) = (&dose, options.dlp_threshold_mgy_cm)
        && d.total_dlp_mgy_cm > threshold
    {
        warnings.push(dose_warning(d, threshold));
    }
    SafetyReport { warnings, dose }
}

fn reaction_warning(r: &Reaction, class: Contrast) -> SafetyWarning {
    let agent = if r.allergen_text.trim().is_empty() {
        r.allergen_code.trim().to_owned()
    } else {
        r.allergen_text.trim().to_owned()
    };
    let (sev_en, sev_ja) = severity_words(&r.severity);
    let reactions_en = if r.reactions.is_empty() {
        String::new()
    } else {
        format!(": {}", r.reactions.join(", "))
    };
    let reactions_ja = if r.reactions.is_empty() {
        String::new()
    } else {
        format!(" {}", r.reactions.join("、"))
    };
    let when = r.onset.clone();
    let when_text = when
        .as_deref()
        .map(|w| format!(", {w}"))
        .unwrap_or_default();
    let when_ja = when.as_deref().map(|w| format!(" {w}")).unwrap_or_default();
    SafetyWarning {
        id: format!("r-{}", r.id),
        kind: WarningKind::ContrastReaction,
        contrast: class.class(),
        agent: (!agent.is_empty()).then(|| agent.clone()),
        severity: (!r.severity.trim().is_empty()).then(|| r.severity.trim().to_owned()),
        reactions: r.reactions.clone(),
        when,
        hospital: r.hospital.clone(),
        text_en: format!(
            "Contrast reaction recorded at {}: {agent} ({}; {sev_en}{reactions_en}){when_text}",
            r.hospital,
            class.en()
        ),
        text_ja: format!(
            "造影剤副作用歴 ({}): {agent} ({}) {sev_ja}{reactions_ja}{when_ja}",
            r.hospital,
            class.ja()
        ),
    }
}

/// The date (`YYYYMMDD`) an event counts on: its DICOM DT, else when it was recorded.
fn event_day(d: &StoredDose) -> Option<String> {
    let from_dt = d.event.datetime.as_deref().and_then(|dt| {
        let digits: String = dt.chars().take(8).collect();
        (digits.len() == 8 && digits.chars().all(|c| c.is_ascii_digit())).then_some(digits)
    });
    from_dt.or_else(|| {
        let digits: String = d
            .recorded_at
            .chars()
            .take(10)
            .filter(char::is_ascii_digit)
            .collect();
        (digits.len() == 8).then_some(digits)
    })
}

/// A sortable key: the event's DT digits (or its recorded day), then its UID.
fn order_key(d: &StoredDose) -> (String, String) {
    let dt: String = d
        .event
        .datetime
        .as_deref()
        .map(|s| s.chars().take_while(|c| c.is_ascii_digit()).collect())
        .filter(|s: &String| s.len() >= 8)
        .or_else(|| event_day(d))
        .unwrap_or_default();
    (dt, d.event.event_uid.clone())
}

fn summary(doses: &[Held], options: &Options, today: jiff::civil::Date) -> DoseSummary {
    let cutoff = today
        .checked_sub(jiff::Span::new().days(i64::from(options.window_days)))
        .unwrap_or(today)
        .strftime("%Y%m%d")
        .to_string();
    let mut seen = BTreeSet::new();
    let mut events: Vec<&StoredDose> = doses
        .iter()
        .flat_map(|h| h.doses.iter())
        .filter(|d| seen.insert(d.event.event_uid.clone()))
        .filter(|d| event_day(d).is_some_and(|day| day >= cutoff))
        .collect();
    events.sort_by_key(|d| order_key(d));
    let total: f64 = events
        .iter()
        .filter_map(|d| d.event.dlp_mgy_cm)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .sum();
    DoseSummary {
        window_days: options.window_days,
        total_dlp_mgy_cm: (total * 100.0).round() / 100.0,
        threshold_dlp_mgy_cm: options.dlp_threshold_mgy_cm,
        events: events
            .into_iter()
            .map(|d| DoseEventView {
                event_uid: d.event.event_uid.clone(),
                when: d.event.datetime.clone(),
                hospital: d.source.hospital_id.clone(),
                ctdivol_mgy: d.event.ctdivol_mgy,
                dlp_mgy_cm: d.event.dlp_mgy_cm,
                target_region: d.event.target_region.clone(),
                protocol: d.event.protocol.clone(),
            })
            .collect(),
        label: DOSE_LABEL.to_owned(),
    }
}

fn dose_warning(d: &DoseSummary, threshold: f64) -> SafetyWarning {
    let hospitals: BTreeSet<&str> = d.events.iter().map(|e| e.hospital.as_str()).collect();
    let hospitals: Vec<&str> = hospitals.into_iter().collect();
    let n = d.events.len();
    SafetyWarning {
        id: format!("d-{}-{:.0}", d.window_days, d.total_dlp_mgy_cm),
        kind: WarningKind::CumulativeDose,
        contrast: None,
        agent: None,
        severity: None,
        reactions: Vec::new(),
        when: d.events.last().and_then(|e| e.when.clone()),
        hospital: hospitals.join(", "),
        text_en: format!(
            "Cumulative CT DLP of the last {} days: {:.0} mGy·cm from {n} events, over the threshold of {:.0} mGy·cm ({DOSE_LABEL})",
            d.window_days, d.total_dlp_mgy_cm, threshold
        ),
        text_ja: format!(
            "過去{}日間のCT累積DLP: {:.0} mGy·cm ({n}件)、閾値 {:.0} mGy·cm を超えています (装置出力値 CTDIvol/DLP、患者被ばく線量ではありません)",
            d.window_days, d.total_dlp_mgy_cm, threshold
        ),
    }
}
