//! The safety store and service on real files in a temporary folder, with a real identity
//! registry, audit log, spool and ledger: HL7 in, dose events in, reports out, the audit
//! trail and what is on disk checked, restarts in between.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_audit::{Action, AuditKey, AuditLog};
use gateway_booking::{
    ContrastClass, PatientRef, SafetyCheck, SafetyReport, SafetyWarning, WarningKind,
};
use gateway_identity::{Matcher, Model};
use gateway_keystore::MasterKey;
use gateway_registry::{
    ConsentSource, DataKind, Grant, Grantee, IdentityService, NewConsent, Registry, RegistryHandle,
    SourceKey,
};

use crate::state::Held;
use crate::store::{HEAD_FILE, JOURNAL_FILE};
use crate::*;

const MASTER: [u8; 32] = [0x42; 32];

struct Env {
    dir: tempfile::TempDir,
    audit: Arc<AuditLog>,
    metrics: Metrics,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(
            AuditLog::open(
                &dir.path().join("audit"),
                AuditKey::new(&MasterKey::from_bytes(MASTER)),
            )
            .unwrap(),
        );
        Self {
            dir,
            audit,
            metrics: Metrics::default(),
        }
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join(DIR)
    }

    fn open(&self) -> SafetyHandle {
        self.try_open().unwrap()
    }

    fn try_open(&self) -> Result<SafetyHandle, SafetyError> {
        SafetyHandle::open_with(
            &self.store_dir(),
            &MasterKey::from_bytes(MASTER),
            Arc::clone(&self.audit),
            self.metrics.clone(),
            Some("CORE".into()),
        )
    }

    fn registry(&self) -> RegistryHandle {
        Registry::open(
            &self.dir.path().join("identity"),
            &MasterKey::from_bytes(MASTER),
            Matcher::new(Model::default()),
            "CORE".into(),
            Arc::clone(&self.audit),
            gateway_registry::Metrics::default(),
        )
        .unwrap()
    }

    fn actions(&self, action: Action) -> Vec<gateway_audit::Record> {
        self.audit
            .records()
            .unwrap()
            .into_iter()
            .filter(|r| r.action() == action)
            .collect()
    }
}

fn key(hospital: &str, pid: &str) -> SourceKey {
    SourceKey {
        hospital_id: hospital.into(),
        patient_id: pid.into(),
    }
}

fn msh(hospital: &str, trigger: &str) -> String {
    format!("MSH|^~\\&|EMR|{hospital}|GW|CORE|20270101120000||ADT^{trigger}|{trigger}1|P|2.5\r")
}

fn a60(hospital: &str, pid: &str, iams: &[&str]) -> String {
    let mut m = msh(hospital, "A60");
    m.push_str(&format!("PID|1||{pid}^^^{hospital}^MR\r"));
    for (i, iam) in iams.iter().enumerate() {
        m.push_str(&format!("IAM|{}|{iam}\r", i + 1));
    }
    m
}

fn adt_al1(trigger: &str, hospital: &str, pid: &str, al1s: &[&str]) -> String {
    let mut m = msh(hospital, trigger);
    m.push_str(&format!("PID|1||{pid}^^^{hospital}^MR\r"));
    for (i, al1) in al1s.iter().enumerate() {
        m.push_str(&format!("AL1|{}|{al1}\r", i + 1));
    }
    m
}

async fn held(h: &SafetyHandle, k: &SourceKey) -> Held {
    h.held(vec![k.clone()]).await.unwrap().pop().unwrap()
}

fn event(uid: &str, dlp: f64, dt: &str) -> DoseEvent {
    DoseEvent {
        event_uid: uid.into(),
        datetime: Some(dt.into()),
        ctdivol_mgy: Some(dlp / 40.0),
        dlp_mgy_cm: Some(dlp),
        target_region: Some("Chest".into()),
        protocol: Some("Routine chest".into()),
    }
}

/// Every file under `dir`, as bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Waits for the store thread of a dropped handle to let go of the folder, then reopens.
fn reopen(env: &Env) -> SafetyHandle {
    env.open()
}

#[tokio::test]
async fn the_store_round_trips_survives_a_torn_tail_refuses_damage_and_holds_nothing_in_clear() {
    let env = Env::new();
    let h = env.open();
    let a = key("HOSP-A", "PAT-SECRET-1");
    let applied = h
        .apply(a60(
            "HOSP-A",
            "PAT-SECRET-1",
            &["DA|C01^イオヘキソール^LOCAL|SV|蕁麻疹|A|IAM-1||||20240301"],
        ))
        .await
        .unwrap();
    assert_eq!(
        applied,
        Hl7Applied::Iam {
            added: 1,
            updated: 0,
            deleted: 0,
            unchanged: 0
        }
    );
    let rec = h
        .record_dose(
            a.clone(),
            vec![event("1.2.826.0.1.3680043.8.498.1", 500.0, "20261201")],
        )
        .await
        .unwrap();
    assert_eq!(rec.new, 1);
    assert_eq!(env.metrics.counts(), (1, 1));
    let before = held(&h, &a).await;
    assert_eq!(before.reactions.len(), 1);
    assert_eq!(
        before.reactions[0].contrast,
        Some(contrast::Contrast::Class(ContrastClass::Iodinated))
    );
    assert_eq!(before.reactions[0].onset.as_deref(), Some("20240301"));
    drop(h);

    // Reopened: the same state.
    let h = reopen(&env);
    let again = held(&h, &a).await;
    assert_eq!(again.reactions, before.reactions);
    assert_eq!(again.doses, before.doses);
    drop(h);

    // Nothing in clear on disk.
    for (path, bytes) in files(&env.store_dir()) {
        for needle in [
            "イオヘキソール",
            "PAT-SECRET-1",
            "HOSP-A",
            "蕁麻疹",
            "1.2.826.0.1",
            "IAM-1",
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} in clear in {}",
                path.display()
            );
        }
    }

    // A torn last append (a crash mid-write) is cut off; the rest stands and appends go on.
    let journal = env.store_dir().join(JOURNAL_FILE);
    let whole = std::fs::read(&journal).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(&[0x40, 0, 0, 0, 0xBF, 0xFF, 0xFF, 0xFF, 1, 2, 3]);
    std::fs::write(&journal, &torn).unwrap();
    let h = reopen(&env);
    assert_eq!(held(&h, &a).await.reactions, before.reactions);
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        whole.len() as u64
    );
    h.record_dose(
        a.clone(),
        vec![event("1.2.826.0.1.3680043.8.498.2", 1.0, "20261202")],
    )
    .await
    .unwrap();
    drop(h);
    let h = reopen(&env);
    assert_eq!(held(&h, &a).await.doses.len(), 2);
    drop(h);

    // A flipped byte inside a frame is damage: the open fails naming the file and frame.
    let whole = std::fs::read(&journal).unwrap();
    let mut bad = whole.clone();
    bad[40] ^= 0x01;
    std::fs::write(&journal, &bad).unwrap();
    let err = env.try_open().unwrap_err().to_string();
    assert!(
        err.contains("journal.sealed") && err.contains("frame 0"),
        "{err}"
    );
    assert!(!err.contains("PAT-SECRET"), "{err}");

    // Frames cut off the journal's end (not a torn append) are refused by the head.
    let head = std::fs::read(env.store_dir().join(HEAD_FILE)).unwrap();
    assert!(!head.is_empty());
    std::fs::write(&journal, &whole).unwrap();
    let h = reopen(&env);
    h.record_dose(
        a.clone(),
        vec![event("1.2.826.0.1.3680043.8.498.3", 1.0, "20261203")],
    )
    .await
    .unwrap();
    drop(h);
    std::fs::write(&journal, &whole).unwrap();
    let err = env.try_open().unwrap_err().to_string();
    assert!(err.contains("fewer frames"), "{err}");
}

#[tokio::test]
async fn an_al1_list_replaces_the_earlier_al1_entries_and_keeps_ids_of_unchanged_allergens() {
    let env = Env::new();
    let h = env.open();
    let a = key("HOSP-A", "P1");
    let got = h
        .apply(adt_al1(
            "A01",
            "HOSP-A",
            "P1",
            &["DA|^オムニパーク|SV|蕁麻疹|20230105", "FA|^卵|MI"],
        ))
        .await
        .unwrap();
    assert_eq!(got, Hl7Applied::Al1 { entries: 2 });
    // An IAM entry of the same record is not touched by AL1 lists.
    h.apply(a60("HOSP-A", "P1", &["DA|^ガドビスト|MO||A|G1"]))
        .await
        .unwrap();
    let first = held(&h, &a).await;
    let omni_id = first
        .reactions
        .iter()
        .find(|r| r.allergen_text == "オムニパーク")
        .unwrap()
        .id
        .clone();
    // A08 with one AL1: the egg entry goes, the contrast entry keeps its id.
    let got = h
        .apply(adt_al1(
            "A08",
            "HOSP-A",
            "P1",
            &["DA|^オムニパーク|SV|蕁麻疹~呼吸困難"],
        ))
        .await
        .unwrap();
    assert_eq!(got, Hl7Applied::Al1 { entries: 1 });
    let now = held(&h, &a).await;
    let texts: Vec<_> = now
        .reactions
        .iter()
        .map(|r| r.allergen_text.as_str())
        .collect();
    assert_eq!(texts, ["ガドビスト", "オムニパーク"]);
    let omni = now
        .reactions
        .iter()
        .find(|r| r.allergen_text == "オムニパーク")
        .unwrap();
    assert_eq!(omni.id, omni_id);
    assert_eq!(omni.reactions, ["蕁麻疹", "呼吸困難"]);
    // No AL1: no change.
    let got = h.apply(adt_al1("A08", "HOSP-A", "P1", &[])).await.unwrap();
    assert_eq!(got, Hl7Applied::Ignored("no AL1 segment"));
    assert_eq!(held(&h, &a).await.reactions, now.reactions);
    assert_eq!(env.metrics.hl7_messages("al1"), 2);
    assert_eq!(env.metrics.hl7_messages("ignored"), 1);
}

#[tokio::test]
async fn iam_add_update_delete_and_no_change_by_unique_id_or_by_allergen() {
    let env = Env::new();
    let h = env.open();
    let a = key("HOSP-A", "P1");
    h.apply(a60(
        "HOSP-A",
        "P1",
        &[
            "DA|C01^iohexol^LOCAL|MI|rash|A|U1",
            "DA|C02^iopamidol^LOCAL|MO||A",
        ],
    ))
    .await
    .unwrap();
    let start = held(&h, &a).await;
    assert_eq!(start.reactions.len(), 2);
    let id1 = start.reactions[0].id.clone();
    // U by IAM-7: the same entry, new severity and text.
    let got = h
        .apply(a60(
            "HOSP-A",
            "P1",
            &["DA|C01^Omnipaque^LOCAL|SV|anaphylaxis|U|U1"],
        ))
        .await
        .unwrap();
    assert_eq!(
        got,
        Hl7Applied::Iam {
            added: 0,
            updated: 1,
            deleted: 0,
            unchanged: 0
        }
    );
    let now = held(&h, &a).await;
    assert_eq!(now.reactions.len(), 2);
    assert_eq!(now.reactions[0].id, id1);
    assert_eq!(now.reactions[0].severity, "SV");
    assert_eq!(now.reactions[0].allergen_text, "Omnipaque");
    // X: no change; D of an entry not held: no change.
    let got = h
        .apply(a60(
            "HOSP-A",
            "P1",
            &["DA|C01^x^LOCAL|SV||X|U1", "DA|C99^other^LOCAL|SV||D"],
        ))
        .await
        .unwrap();
    assert_eq!(
        got,
        Hl7Applied::Iam {
            added: 0,
            updated: 0,
            deleted: 0,
            unchanged: 2
        }
    );
    assert_eq!(held(&h, &a).await.reactions, now.reactions);
    // D without IAM-7: by allergen code and system.
    h.apply(a60("HOSP-A", "P1", &["DA|C02^^LOCAL|MO||D"]))
        .await
        .unwrap();
    let now = held(&h, &a).await;
    assert_eq!(now.reactions.len(), 1);
    assert_eq!(now.reactions[0].id, id1);
    // D by IAM-7.
    h.apply(a60("HOSP-A", "P1", &["DA|C01^^LOCAL|SV||D|U1"]))
        .await
        .unwrap();
    assert!(held(&h, &a).await.reactions.is_empty());
    assert_eq!(env.metrics.counts().0, 0);
}

#[tokio::test]
async fn a40_and_a47_move_reactions_and_dose_events_to_the_surviving_record() {
    let env = Env::new();
    let h = env.open();
    let (old, mid, new) = (
        key("HOSP-A", "OLD"),
        key("HOSP-A", "MID"),
        key("HOSP-A", "NEW"),
    );
    h.apply(a60("HOSP-A", "OLD", &["DA|^iohexol|SV||A"]))
        .await
        .unwrap();
    h.record_dose(old.clone(), vec![event("2.25.1", 100.0, "20261201")])
        .await
        .unwrap();
    let merge = format!(
        "{}PID|1||MID^^^HOSP-A^MR\rMRG|OLD^^^HOSP-A^MR\r",
        msh("HOSP-A", "A40")
    );
    assert_eq!(h.apply(merge).await.unwrap(), Hl7Applied::Moved);
    assert!(held(&h, &old).await.reactions.is_empty());
    assert!(held(&h, &old).await.doses.is_empty());
    assert_eq!(held(&h, &mid).await.reactions.len(), 1);
    assert_eq!(held(&h, &mid).await.doses.len(), 1);
    let change = format!(
        "{}PID|1||NEW^^^HOSP-A^MR\rMRG|MID^^^HOSP-A^MR\r",
        msh("HOSP-A", "A47")
    );
    assert_eq!(h.apply(change).await.unwrap(), Hl7Applied::Moved);
    assert_eq!(held(&h, &new).await.reactions.len(), 1);
    assert_eq!(held(&h, &new).await.doses.len(), 1);
    assert!(held(&h, &mid).await.reactions.is_empty());
    // Survives a restart (the move is journaled).
    drop(h);
    let h = reopen(&env);
    assert_eq!(held(&h, &new).await.reactions.len(), 1);
    assert_eq!(held(&h, &new).await.doses[0].source, new);
}

#[tokio::test]
async fn dose_events_count_once_whatever_the_order_repetition_or_report_kind() {
    let today = jiff::civil::date(2027, 1, 1);
    let events = [
        event("2.25.11", 120.5, "20261101101500"),
        event("2.25.12", 340.25, "20261101102000"),
        event("2.25.13", 80.0, "20261215090000"),
    ];
    let total = |h: &SafetyHandle, k: SourceKey| {
        let h = h.clone();
        async move {
            let held = h.held(vec![k]).await.unwrap();
            check::build(&held, &held, true, &options_clone(), today)
                .dose
                .unwrap()
        }
    };
    fn options_clone() -> Options {
        Options {
            window_days: 365,
            dlp_threshold_mgy_cm: None,
            hospital_id: "CORE".into(),
        }
    }

    // A cumulative report, then the same events as per-event reports in reverse order, then
    // the cumulative report again.
    let env = Env::new();
    let h = env.open();
    let k = key("CORE", "P1");
    let r = h.record_dose(k.clone(), events.to_vec()).await.unwrap();
    assert_eq!((r.new, r.duplicate), (3, 0));
    for e in events.iter().rev() {
        let r = h.record_dose(k.clone(), vec![e.clone()]).await.unwrap();
        assert_eq!((r.new, r.duplicate), (0, 1));
    }
    let r = h.record_dose(k.clone(), events.to_vec()).await.unwrap();
    assert_eq!((r.new, r.duplicate), (0, 3));
    // A UID already held under another record is a duplicate too; no UID: refused.
    let mut no_uid = event("", 999.0, "20261201");
    no_uid.event_uid = "  ".into();
    let r = h
        .record_dose(key("HOSP-B", "X"), vec![events[0].clone(), no_uid])
        .await
        .unwrap();
    assert_eq!((r.new, r.duplicate, r.refused), (0, 1, 1));
    let first = total(&h, k.clone()).await;

    // The per-event reports first, in another order, twice each.
    let env2 = Env::new();
    let h2 = env2.open();
    for e in [&events[2], &events[0], &events[2], &events[1], &events[0]] {
        h2.record_dose(k.clone(), vec![e.clone()]).await.unwrap();
    }
    h2.record_dose(k.clone(), events.to_vec()).await.unwrap();
    let second = total(&h2, k.clone()).await;

    assert_eq!(first.total_dlp_mgy_cm, 540.75);
    assert_eq!(second.total_dlp_mgy_cm, first.total_dlp_mgy_cm);
    assert_eq!(first.events.len(), 3);
    assert_eq!(second.events, first.events);
    // Oldest first.
    let uids: Vec<_> = first.events.iter().map(|e| e.event_uid.as_str()).collect();
    assert_eq!(uids, ["2.25.11", "2.25.12", "2.25.13"]);
    assert_eq!(first.label, gateway_booking::safety::DOSE_LABEL);
    assert_eq!(env.metrics.counts().1, 3);
}

#[test]
fn the_window_leaves_out_older_events_and_the_threshold_makes_a_stable_warning() {
    let k = key("HOSP-A", "P1");
    let stored = |uid: &str, dlp: f64, dt: &str| state::StoredDose {
        source: k.clone(),
        event: event(uid, dlp, dt),
        recorded_at: "2027-01-01T00:00:00.000Z".into(),
    };
    let held = vec![Held {
        key: k.clone(),
        reactions: Vec::new(),
        doses: vec![
            stored("2.25.3", 700.0, "20261201"),
            stored("2.25.1", 5000.0, "20251231"), // 366 days before: out
            stored("2.25.2", 600.0, "20260101"),  // 365 days before: in
        ],
    }];
    let options = Options {
        window_days: 365,
        dlp_threshold_mgy_cm: Some(1000.0),
        hospital_id: "CORE".into(),
    };
    let today = jiff::civil::date(2027, 1, 1);
    let report = check::build(&held, &held, true, &options, today);
    let dose = report.dose.clone().unwrap();
    assert_eq!(dose.total_dlp_mgy_cm, 1300.0);
    let uids: Vec<_> = dose.events.iter().map(|e| e.event_uid.as_str()).collect();
    assert_eq!(uids, ["2.25.2", "2.25.3"]);
    assert_eq!(report.warnings.len(), 1);
    let w = &report.warnings[0];
    assert_eq!(w.kind, WarningKind::CumulativeDose);
    assert_eq!(w.id, "d-365-1300");
    assert!(w.text_en.contains("1300 mGy·cm") && w.text_en.contains("not patient dose"));
    assert!(w.text_ja.contains("患者被ばく線量ではありません"));
    // Under the threshold: the summary, no warning; not CT: no summary.
    let under = Options {
        dlp_threshold_mgy_cm: Some(2000.0),
        ..options.clone()
    };
    assert!(
        check::build(&held, &held, true, &under, today)
            .warnings
            .is_empty()
    );
    assert_eq!(
        check::build(&held, &held, false, &options, today).dose,
        None
    );
}

/// Registry ADT for a linked pair (the same demographics at both hospitals).
fn registry_adt(trigger: &str, hospital: &str, pid: &str) -> String {
    format!(
        "MSH|^~\\&|EMR|{hospital}|GW|CORE|20270101120000||ADT^{trigger}|{pid}{trigger}|P|2.5\r\
         PID|1||{pid}^^^{hospital}^MR||山田^太郎^^^^^L^I~ヤマダ^タロウ^^^^^L^P||19800102|M|||1-2-3^^港区^東京都^1050001||0312345678\r"
    )
}

fn taro(pid: &str) -> PatientRef {
    PatientRef {
        id: pid.into(),
        name: "YAMADA^TARO=山田^太郎=ヤマダ^タロウ".into(),
        birth_date: "19800102".into(),
        sex: "M".into(),
    }
}

fn reaction_warnings(r: &SafetyReport) -> Vec<&SafetyWarning> {
    r.warnings
        .iter()
        .filter(|w| w.kind == WarningKind::ContrastReaction)
        .collect()
}

#[tokio::test]
async fn a_reaction_at_hospital_a_warns_clinic_b_with_consent_is_suppressed_without_and_deleted_by_iam()
 {
    let env = Env::new();
    let registry = env.registry();
    registry
        .apply_hl7(registry_adt("A01", "HOSP-A", "A-0001"))
        .await
        .unwrap();
    registry
        .apply_hl7(registry_adt("A04", "CLINIC-B", "B-7777"))
        .await
        .unwrap();
    let store = env.open();
    store
        .apply(a60(
            "HOSP-A",
            "A-0001",
            &["DA|C01^イオパミロン^LOCAL|SV|蕁麻疹~呼吸困難|A|IAM-9||||20240301"],
        ))
        .await
        .unwrap();
    store
        .record_dose(
            key("HOSP-A", "A-0001"),
            vec![
                event("2.25.101", 900.0, &today_dt(-30)),
                event("2.25.102", 700.0, &today_dt(-10)),
            ],
        )
        .await
        .unwrap();
    let safety = Safety::new(
        store.clone(),
        registry.clone(),
        Options {
            window_days: 365,
            dlp_threshold_mgy_cm: Some(1500.0),
            hospital_id: "CORE".into(),
        },
    );

    // No consent: nothing of HOSP-A reaches CLINIC-B; the refusals are audited.
    let report = safety
        .check("CLINIC-B", &taro("B-7777"), "CT", "dr-b")
        .await
        .unwrap();
    assert!(report.warnings.is_empty(), "{report:?}");
    assert_eq!(report.dose.as_ref().unwrap().events.len(), 0);
    assert_eq!(env.actions(Action::DisclosureRefused).len(), 2);
    assert!(env.actions(Action::SafetyWarningsShown).is_empty());

    // With the patient's consent for reactions and dose: the warning and the summary.
    let consent = registry
        .record_consent(
            NewConsent {
                patient: key("HOSP-A", "A-0001"),
                grants: vec![Grant {
                    grantee: Grantee::Region,
                    kinds: vec![DataKind::Reactions, DataKind::Dose],
                }],
                source: ConsentSource::Kiosk,
            },
            "clerk-a",
        )
        .await
        .unwrap();
    let report = safety
        .check("CLINIC-B", &taro("B-7777"), "CT", "dr-b")
        .await
        .unwrap();
    let reactions = reaction_warnings(&report);
    assert_eq!(reactions.len(), 1, "{report:?}");
    let w = reactions[0];
    assert_eq!(w.contrast, Some(ContrastClass::Iodinated));
    assert_eq!(w.hospital, "HOSP-A");
    assert_eq!(w.agent.as_deref(), Some("イオパミロン"));
    assert_eq!(w.severity.as_deref(), Some("SV"));
    assert_eq!(w.when.as_deref(), Some("20240301"));
    assert_eq!(w.reactions, ["蕁麻疹", "呼吸困難"]);
    assert!(w.text_en.contains("HOSP-A") && w.text_en.contains("severe"));
    assert!(w.text_ja.contains("造影剤副作用歴") && w.text_ja.contains("重度"));
    assert!(w.id.starts_with("r-"));
    let dose = report.dose.as_ref().unwrap();
    assert_eq!(dose.total_dlp_mgy_cm, 1600.0);
    assert_eq!(dose.events.len(), 2);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.kind == WarningKind::CumulativeDose && w.id == "d-365-1600")
    );
    // The same finding keeps its id across requests (the acknowledgement names it).
    let again = safety
        .check("CLINIC-B", &taro("B-7777"), "CT", "dr-b")
        .await
        .unwrap();
    assert_eq!(again.warnings, report.warnings);
    // Shown: audited with the person, counts only.
    let shown = env.actions(Action::SafetyWarningsShown);
    assert_eq!(shown.len(), 2);
    assert!(shown[0].subject().unwrap().starts_with("person:"));
    assert!(shown[0].actor() == "dr-b");
    let line = serde_json::to_string(&env.audit.records().unwrap()).unwrap();
    for secret in ["イオパミロン", "A-0001", "B-7777", "蕁麻疹", "2.25.101"] {
        assert!(!line.contains(secret), "{secret} in the audit trail");
    }
    // Not CT: reactions only.
    let mr = safety
        .check("CLINIC-B", &taro("B-7777"), "MR", "dr-b")
        .await
        .unwrap();
    assert_eq!(mr.dose, None);
    assert_eq!(reaction_warnings(&mr).len(), 1);

    // The operator's view: everything, audited.
    let person = registry.members(key("CLINIC-B", "B-7777")).await.unwrap().0;
    let shown = safety.show(person.clone(), "operator").await.unwrap();
    assert_eq!(shown.person, format!("person:{}", person.0));
    assert_eq!(reaction_warnings(&shown.report).len(), 1);
    assert_eq!(env.actions(Action::SafetyShown).len(), 1);
    assert!(matches!(
        safety
            .show(gateway_registry::PersonId("nobody".into()), "operator")
            .await,
        Err(SafetyError::UnknownPerson)
    ));

    // Consent revoked: suppressed again, and audited.
    let refused_before = env.actions(Action::DisclosureRefused).len();
    registry
        .revoke_consent(&consent.id, "clerk-a")
        .await
        .unwrap();
    let report = safety
        .check("CLINIC-B", &taro("B-7777"), "CT", "dr-b")
        .await
        .unwrap();
    assert!(report.warnings.is_empty());
    assert_eq!(
        env.actions(Action::DisclosureRefused).len(),
        refused_before + 2
    );

    // The clinic's own reaction needs no consent; an IAM delete at HOSP-A leaves nothing.
    store
        .apply(a60("CLINIC-B", "B-7777", &["DA|^造影剤|MO||A|B1"]))
        .await
        .unwrap();
    let report = safety
        .check("CLINIC-B", &taro("B-7777"), "MR", "dr-b")
        .await
        .unwrap();
    let own = reaction_warnings(&report);
    assert_eq!(own.len(), 1);
    // A contrast agent of no named class: warned about, without a class.
    assert_eq!(own[0].contrast, None);
    assert!(
        own[0].text_en.contains("class not given"),
        "{}",
        own[0].text_en
    );
    assert!(own[0].text_ja.contains("種類不明"));
    assert_eq!(own[0].hospital, "CLINIC-B");
    registry
        .record_consent(
            NewConsent {
                patient: key("HOSP-A", "A-0001"),
                grants: vec![Grant {
                    grantee: Grantee::Region,
                    kinds: vec![DataKind::Reactions],
                }],
                source: ConsentSource::Kiosk,
            },
            "clerk-a",
        )
        .await
        .unwrap();
    store
        .apply(a60("HOSP-A", "A-0001", &["DA|C01^^LOCAL|SV||D|IAM-9"]))
        .await
        .unwrap();
    let report = safety
        .check("CLINIC-B", &taro("B-7777"), "MR", "dr-b")
        .await
        .unwrap();
    let left = reaction_warnings(&report);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].hospital, "CLINIC-B");
    assert!(env.metrics.warnings("contrast-reaction") >= 4);
    assert!(env.metrics.warnings("cumulative-dose") >= 2);
}

#[tokio::test]
async fn a_check_is_unavailable_when_the_store_is_gone_never_an_empty_report() {
    let env = Env::new();
    let registry = env.registry();
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let dead = SafetyHandle {
        tx,
        audit: Arc::clone(&env.audit),
        metrics: Metrics::default(),
    };
    drop(_rx);
    let safety = Safety::new(
        dead,
        registry,
        Options {
            window_days: 365,
            dlp_threshold_mgy_cm: None,
            hospital_id: "CORE".into(),
        },
    );
    assert!(
        safety
            .check("CLINIC-B", &taro("B-1"), "CT", "dr-b")
            .await
            .is_err()
    );
}

/// `YYYYMMDD` `days` from today (UTC).
fn today_dt(days: i64) -> String {
    jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .checked_add(jiff::Span::new().days(days))
        .unwrap()
        .strftime("%Y%m%d120000")
        .to_string()
}

#[tokio::test]
async fn the_dose_route_passes_objects_that_are_not_dose_reports_and_feed_applies_hl7() {
    use gateway_spool::{Committed, Limits, ObjectKind, ObjectMeta, Route, Spool};
    let env = Env::new();
    let store = env.open();
    let spool = Spool::open(
        env.dir.path(),
        Some(MasterKey::from_bytes(MASTER)),
        Limits {
            max_bytes: 1 << 30,
            min_free_bytes: 0,
        },
        vec![Route::new(DOSE_ROUTE, ObjectKind::Dicom)],
    )
    .unwrap();
    spool.recover().unwrap();
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    let uid = "1.2.826.0.1.3680043.8.498.4242";
    let mut bytes = gateway_dicom::part10::header(CT, uid, EXPLICIT_LE).unwrap();
    // (0008,0016) UI and (0008,0018) UI, Explicit VR Little Endian.
    for (element, value) in [(0x0016u16, CT), (0x0018, uid)] {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        bytes.extend_from_slice(&0x0008u16.to_le_bytes());
        bytes.extend_from_slice(&element.to_le_bytes());
        bytes.extend_from_slice(b"UI");
        bytes.extend_from_slice(&(v.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&v);
    }
    let mut ingest = spool
        .begin(ObjectMeta {
            sop_instance_uid: uid.into(),
            sop_class_uid: CT.into(),
            transfer_syntax_uid: EXPLICIT_LE.into(),
            source: "CT01".into(),
        })
        .unwrap();
    ingest.write(&bytes).unwrap();
    let Committed::Stored(id) = ingest.commit().unwrap() else {
        panic!("stored twice")
    };
    // Journaled: indexed (and queued) behind the commit.
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    assert_eq!(spool.queued(DOSE_ROUTE, 10).unwrap(), vec![id]);

    let ledger_dir = env.dir.path().join("ledger");
    let ledger = gateway_booking::ledger::Ledger::open(
        &ledger_dir,
        gateway_booking::sealed::SealKey::derive(&MasterKey::from_bytes(MASTER)),
    )
    .unwrap();
    let (service, ledger) =
        gateway_booking::service::LedgerService::new(ledger, Arc::new(Vec::new()));
    let _thread = service.spawn().unwrap();

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(dose::run(
        spool.clone(),
        store.clone(),
        ledger,
        "CORE".into(),
        shutdown,
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !spool.queued(DOSE_ROUTE, 10).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "object never settled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(env.metrics.dose_reports("not_dose"), 1);
    assert_eq!(env.metrics.dose_reports("malformed"), 0);
    stop.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();

    // feed: the listener's decoded messages, in order, until the channel closes.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(4);
    let fed = tokio::spawn(feed(rx, store.clone()));
    tx.send(a60("HOSP-A", "P9", &["DA|^gadolinium|MO||A"]))
        .await
        .unwrap();
    tx.send("not hl7".into()).await.unwrap();
    drop(tx);
    fed.await.unwrap();
    let got = held(&store, &key("HOSP-A", "P9")).await;
    assert_eq!(
        got.reactions[0].contrast,
        Some(contrast::Contrast::Class(ContrastClass::Gadolinium))
    );
    assert_eq!(env.metrics.hl7_messages("iam"), 1);
    assert_eq!(env.metrics.hl7_messages("ignored"), 1);
}
