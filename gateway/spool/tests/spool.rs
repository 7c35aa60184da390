//! Spool behaviour through its public interface, on a temporary data folder.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;

use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::{
    Committed, JOURNAL_MAX_SEALED, Limits, ObjectId, ObjectMeta, Spool, SpoolError,
};

const ROOMY: Limits = Limits {
    max_bytes: 1 << 40,
    min_free_bytes: 0,
};

fn key() -> MasterKey {
    MasterKey::from_bytes([42; KEY_LEN])
}

fn meta(uid: &str) -> ObjectMeta {
    ObjectMeta {
        sop_instance_uid: uid.into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        source: "CT01".into(),
    }
}

fn store(spool: &Spool, uid: &str, body: &[u8]) -> Result<Committed, SpoolError> {
    let mut ingest = spool.begin(meta(uid))?;
    for piece in body.chunks(10_000) {
        ingest.write(piece)?;
    }
    ingest.commit()
}

fn export(spool: &Spool, uid: &str) -> Vec<u8> {
    let mut out = Vec::new();
    spool.export(uid, &mut out).unwrap();
    out
}

fn all_bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes_under(&p));
        } else {
            out.extend(fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn stored_object_exports_byte_identical_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    assert!(matches!(
        store(&spool, "1.2.3.4", &body).unwrap(),
        Committed::Stored(_)
    ));
    assert_eq!(export(&spool, "1.2.3.4"), body);
    let status = spool.status().unwrap();
    assert_eq!(status.objects, 1);
    assert_eq!(status.by_state["received"], 1);
    assert!(status.bytes > body.len() as u64);
    assert!(status.oldest_age_seconds.is_some());
}

#[test]
fn resend_of_same_content_is_a_duplicate_and_stores_nothing() {
    // Through the journal (small objects) and through blobs/ (large ones).
    for max in [JOURNAL_MAX_SEALED, 0] {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
        spool.set_journal_max_sealed(max);
        let Committed::Stored(first) = store(&spool, "1.2.3", b"same bytes").unwrap() else {
            panic!("first store must be new")
        };
        assert_eq!(
            store(&spool, "1.2.3", b"same bytes").unwrap(),
            Committed::Duplicate(first)
        );
        assert_eq!(spool.status().unwrap().objects, 1);
        // Same UID, new content: a new version is kept, and export gives the newest.
        assert!(matches!(
            store(&spool, "1.2.3", b"new bytes").unwrap(),
            Committed::Stored(_)
        ));
        assert_eq!(spool.status().unwrap().objects, 2);
        assert_eq!(export(&spool, "1.2.3"), b"new bytes");
        let blobs = fs::read_dir(spool.dir().join("blobs")).unwrap().count();
        assert_eq!(blobs, if max == 0 { 2 } else { 0 });
        drop(spool);
        // Still a duplicate after a reopen, whichever way it was stored.
        let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
        assert_eq!(
            store(&spool, "1.2.3", b"same bytes").unwrap(),
            Committed::Duplicate(first)
        );
        assert_eq!(spool.status().unwrap().objects, 2);
        assert!(spool.verify().unwrap().is_consistent());
    }
}

#[test]
fn uids_and_content_never_appear_in_plaintext_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["cloud".into()]).unwrap();
    store(
        &spool,
        "1.2.826.0.1.3680043.99999",
        b"ZZTESTPAT^Hanako PID-ZZ-000001",
    )
    .unwrap();
    drop(spool);
    let bytes = all_bytes_under(dir.path());
    for needle in [
        &b"ZZTESTPAT"[..],
        b"PID-ZZ-000001",
        b"1.2.826.0.1.3680043.99999",
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{:?} found on disk",
            String::from_utf8_lossy(needle)
        );
    }
}

#[test]
fn max_bytes_refuses_new_objects_and_keeps_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 250_000,
        min_free_bytes: 0,
    };
    let spool = Spool::open(dir.path(), Some(key()), limits, vec![]).unwrap();
    store(&spool, "1.1", &vec![1u8; 100_000]).unwrap();
    store(&spool, "1.2", &vec![2u8; 100_000]).unwrap();
    let err = store(&spool, "1.3", &vec![3u8; 100_000]).unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(export(&spool, "1.1"), vec![1u8; 100_000]);
    assert_eq!(spool.status().unwrap().objects, 2);
    assert_eq!(
        fs::read_dir(spool.dir().join("tmp")).unwrap().count(),
        0,
        "refused object left a partial file"
    );
}

#[test]
fn min_free_bytes_above_free_space_refuses_at_begin() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: u64::MAX / 2,
        min_free_bytes: u64::MAX / 4,
    };
    let spool = Spool::open(dir.path(), Some(key()), limits, vec![]).unwrap();
    let err = spool.begin(meta("1.9")).unwrap_err();
    assert!(err.to_string().contains("min_free_bytes"), "{err}");
}

#[test]
fn dropped_ingest_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
    let mut ingest = spool.begin(meta("1.5")).unwrap();
    ingest.write(b"half an object").unwrap();
    drop(ingest);
    assert_eq!(fs::read_dir(spool.dir().join("tmp")).unwrap().count(), 0);
    assert_eq!(spool.status().unwrap().objects, 0);
}

#[test]
fn recovery_removes_partials_and_orphans_and_verify_then_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
    store(&spool, "2.1", b"kept").unwrap();
    // Simulate a crash between rename and index commit, and one mid-write.
    fs::write(
        spool
            .dir()
            .join("blobs")
            .join(format!("{}.blob", "ab".repeat(16))),
        b"orphan",
    )
    .unwrap();
    fs::write(spool.dir().join("tmp").join("cd.part"), b"partial").unwrap();
    let report = spool.verify().unwrap();
    assert_eq!(
        (
            report.objects,
            report.ok,
            report.orphan_blobs,
            report.partial_files
        ),
        (1, 1, 1, 1)
    );
    assert!(!report.is_consistent());
    let rec = spool.recover().unwrap();
    assert_eq!(
        (rec.orphan_blobs_removed, rec.partial_files_removed),
        (1, 1)
    );
    let report = spool.verify().unwrap();
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!(export(&spool, "2.1"), b"kept");
}

#[test]
fn a_blob_left_behind_by_a_crash_during_reclaim_is_removed_at_recovery_and_never_dangles() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    // Objects in blobs/ (the path of large objects), whose files this test checks.
    spool.set_journal_max_sealed(0);
    let Committed::Stored(id) = store(&spool, "2.2", b"sent").unwrap() else {
        panic!()
    };
    let path = spool.dir().join("blobs").join(format!("{}.blob", hex(&id)));
    let sealed = fs::read(&path).unwrap();
    spool.mark_sent(&id, "a").unwrap();
    assert!(!path.exists(), "blob reclaimed once confirmed");
    assert!(spool.verify().unwrap().is_consistent());
    // The index said "deleted" and then the process died before the file went.
    fs::write(&path, &sealed).unwrap();
    let rec = spool.recover().unwrap();
    assert_eq!(rec.orphan_blobs_removed, 1, "{rec:?}");
    assert!(!path.exists());
    let report = spool.verify().unwrap();
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!(report.dangling_entries, 0);
}

#[test]
fn verify_reports_missing_and_tampered_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec![]).unwrap();
    // Objects in blobs/ (the path of large objects), whose files this test checks.
    spool.set_journal_max_sealed(0);
    let Committed::Stored(a) = store(&spool, "3.1", b"alpha").unwrap() else {
        panic!()
    };
    let Committed::Stored(b) = store(&spool, "3.2", b"bravo").unwrap() else {
        panic!()
    };
    let blobs = spool.dir().join("blobs");
    fs::remove_file(blobs.join(format!("{}.blob", hex(&a)))).unwrap();
    let pb = blobs.join(format!("{}.blob", hex(&b)));
    let mut bytes = fs::read(&pb).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&pb, bytes).unwrap();
    let report = spool.verify().unwrap();
    assert_eq!(
        (report.dangling_entries, report.unseal_failures, report.ok),
        (1, 1, 0)
    );
}

#[test]
fn index_survives_reopen_and_a_different_key_cannot_read_blobs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["cloud".into()]).unwrap();
        store(&spool, "4.1", b"persisted").unwrap();
    }
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["cloud".into()]).unwrap();
    let status = spool.status().unwrap();
    assert_eq!(status.by_state["queued"], 1);
    assert_eq!(status.by_destination["cloud"].queued, 1);
    assert_eq!(export(&spool, "4.1"), b"persisted");
    drop(spool);
    let other = Spool::open(
        dir.path(),
        Some(MasterKey::from_bytes([7; KEY_LEN])),
        ROOMY,
        vec![],
    )
    .unwrap();
    // The uid MAC differs under another key, so the object is not even findable...
    assert!(matches!(
        other.export("4.1", &mut Vec::new()),
        Err(SpoolError::NotFound)
    ));
    // ...and verify reports that every blob fails to unseal.
    let report = other.verify().unwrap();
    assert_eq!(report.unseal_failures, 1);
}

fn hex(id: &ObjectId) -> String {
    id.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn queue_is_oldest_first_and_sent_objects_leave_it_and_their_blob() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into(), "b".into()]).unwrap();
    // Objects in blobs/ (the path of large objects), whose files this test checks.
    spool.set_journal_max_sealed(0);
    let mut ids = Vec::new();
    for i in 0..3 {
        let Committed::Stored(id) =
            store(&spool, &format!("5.{i}"), format!("object {i}").as_bytes()).unwrap()
        else {
            panic!()
        };
        ids.push(id);
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    assert_eq!(spool.queued("a", 10).unwrap(), ids);
    assert_eq!(spool.queued("a", 2).unwrap(), ids[..2]);
    let (record, plain) = spool.read(&ids[0]).unwrap();
    assert_eq!(plain, b"object 0");
    assert_eq!(record.state(), "queued");

    spool.mark_sent(&ids[0], "a").unwrap();
    assert_eq!(spool.queued("a", 10).unwrap(), ids[1..]);
    assert_eq!(
        spool.queued("b", 10).unwrap(),
        ids,
        "destinations do not share a queue"
    );
    let blobs = || fs::read_dir(spool.dir().join("blobs")).unwrap().count();
    assert_eq!(blobs(), 3, "blob kept until every destination confirmed");
    spool.mark_sent(&ids[0], "b").unwrap();
    assert_eq!(
        blobs(),
        2,
        "blob reclaimed once every destination confirmed"
    );
    assert!(matches!(
        spool.export("5.0", &mut Vec::new()),
        Err(SpoolError::Reclaimed { .. })
    ));
    // A resend of an uploaded object is still recognised as a duplicate.
    assert!(matches!(
        store(&spool, "5.0", b"object 0").unwrap(),
        Committed::Duplicate(_)
    ));

    spool
        .mark_failed(&ids[1], "a", "400 refused by archive")
        .unwrap();
    let status = spool.status().unwrap();
    assert_eq!(status.by_destination["a"].failed, 1);
    assert_eq!(status.by_destination["a"].sent, 1);
    assert_eq!(status.by_state["sent"], 1);
    assert_eq!(spool.queued("a", 10).unwrap(), ids[2..]);
    assert_eq!(spool.retry_failed(Some("a")).unwrap(), 1);
    assert_eq!(spool.queued("a", 10).unwrap(), ids[1..]);
    assert!(spool.verify().unwrap().is_consistent());
    drop(spool);
    // State survives a reopen.
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into(), "b".into()]).unwrap();
    assert_eq!(spool.queued("a", 10).unwrap(), ids[1..]);
}

fn store_in_study(spool: &Spool, uid: &str, study: Option<&str>, body: &[u8]) -> ObjectId {
    let mut ingest = spool.begin(meta(uid)).unwrap();
    ingest.write(body).unwrap();
    if let Some(study) = study {
        ingest.set_study_instance_uid(study);
    }
    match ingest.commit().unwrap() {
        Committed::Stored(id) => id,
        Committed::Duplicate(_) => panic!("not a duplicate"),
    }
}

#[test]
fn study_key_groups_objects_of_one_study_without_storing_the_uid() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    let a1 = store_in_study(&spool, "7.1", Some("1.2.840.99.1"), b"one");
    let b1 = store_in_study(&spool, "7.2", Some("1.2.840.99.2"), b"two");
    let a2 = store_in_study(&spool, "7.3", Some("1.2.840.99.1"), b"three");
    let none = store_in_study(&spool, "7.4", None, b"four");
    let key_of = |id| spool.study_key(&id).unwrap();
    assert!(key_of(a1).is_some());
    assert_eq!(key_of(a1), key_of(a2));
    assert_ne!(key_of(a1), key_of(b1));
    assert_eq!(key_of(none), None);
    drop(spool);
    let on_disk = all_bytes_under(dir.path());
    assert!(
        !on_disk
            .windows(b"1.2.840.99.1".len())
            .any(|w| w == b"1.2.840.99.1"),
        "the Study Instance UID is stored only as a keyed MAC"
    );
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    assert_eq!(spool.study_key(&a1).unwrap(), spool.study_key(&a2).unwrap());
}

#[test]
fn keep_sent_for_keeps_the_local_copy_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    // Objects in blobs/ (the path of large objects), whose files this test checks.
    spool.set_journal_max_sealed(0);
    spool.set_keep_sent_for(std::time::Duration::from_millis(300));
    let ids: Vec<_> = (0..3)
        .map(|i| {
            store_in_study(
                &spool,
                &format!("8.{i}"),
                None,
                format!("kept {i}").as_bytes(),
            )
        })
        .collect();
    let blob_dir = spool.dir().join("blobs");
    let blobs = || fs::read_dir(&blob_dir).unwrap().count();
    spool.mark_sent_all(&ids[..2], "a").unwrap();
    assert_eq!(spool.queued("a", 10).unwrap(), ids[2..]);
    assert_eq!(blobs(), 3, "sent blobs are kept as a cache");
    assert_eq!(
        export(&spool, "8.0"),
        b"kept 0",
        "a cached object still exports"
    );
    assert_eq!(spool.status().unwrap().by_state["sent"], 2);
    assert_eq!(spool.reclaim_expired().unwrap(), 0, "not expired yet");
    // A restart does not treat kept blobs as crash leftovers.
    drop(spool);
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    spool.set_keep_sent_for(std::time::Duration::from_millis(300));
    assert_eq!(spool.recover().unwrap().sent_blobs_reclaimed, 0);
    assert_eq!(blobs(), 3);
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(spool.reclaim_expired().unwrap(), 2);
    assert_eq!(blobs(), 1, "only the queued object's blob is left");
    assert!(matches!(
        spool.export("8.0", &mut Vec::new()),
        Err(SpoolError::Reclaimed { .. })
    ));
    assert!(spool.verify().unwrap().is_consistent());
}

#[test]
fn cached_copies_yield_to_new_objects_when_the_spool_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 200_000,
        min_free_bytes: 0,
    };
    let spool = Spool::open(dir.path(), Some(key()), limits, vec!["a".into()]).unwrap();
    // Objects in blobs/ (the path of large objects), whose files this test checks.
    spool.set_journal_max_sealed(0);
    spool.set_keep_sent_for(std::time::Duration::from_secs(3600));
    let body = vec![7u8; 120_000];
    let first = store_in_study(&spool, "9.1", None, &body);
    spool.mark_sent(&first, "a").unwrap();
    assert_eq!(fs::read_dir(spool.dir().join("blobs")).unwrap().count(), 1);
    // The cached copy takes 120 kB of the 200 kB: a second object only fits once it goes.
    let second = store(&spool, "9.2", &vec![8u8; 120_000]).unwrap();
    assert!(matches!(second, Committed::Stored(_)));
    assert!(matches!(
        spool.export("9.1", &mut Vec::new()),
        Err(SpoolError::Reclaimed { .. })
    ));
    assert_eq!(export(&spool, "9.2"), vec![8u8; 120_000]);
    // Without a cache to evict, the limit holds.
    assert!(matches!(
        store(&spool, "9.3", &vec![9u8; 120_000]),
        Err(SpoolError::Full { .. })
    ));
}

fn message(key: &str, body: &str) -> gateway_spool::MessageIn {
    gateway_spool::MessageIn {
        key: key.into(),
        message_type: "ADT^A08".into(),
        charset: "ascii".into(),
        source: "127.0.0.1".into(),
        bytes: body.as_bytes().to_vec(),
    }
}

#[test]
fn message_group_is_stored_once_per_key_and_queued_for_hl7_routes_only() {
    use gateway_spool::{ObjectKind, Route};
    let dir = tempfile::tempdir().unwrap();
    let routes = vec![Route::from("archive"), Route::new("ris", ObjectKind::Hl7)];
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes.clone()).unwrap();
    let group = [
        message("APP|FAC|1", "MSH|one"),
        message("APP|FAC|2", "MSH|two"),
        message("APP|FAC|1", "MSH|one again"),
    ];
    let results = spool.store_messages(&group);
    let ids: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let (Committed::Stored(first), Committed::Stored(_), Committed::Duplicate(dup)) =
        (ids[0], ids[1], ids[2])
    else {
        panic!("{ids:?}")
    };
    assert_eq!(
        dup, first,
        "a repeated key within a group is the first one's duplicate"
    );
    // A later group: the key is recognised from the index.
    let again = spool.store_messages(&[message("APP|FAC|2", "MSH|two")]);
    assert!(matches!(again[0], Ok(Committed::Duplicate(_))));
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    assert_eq!(spool.queued("ris", 10).unwrap().len(), 2);
    assert!(spool.queued("archive", 10).unwrap().is_empty());
    let mut out = Vec::new();
    spool.export_message("APP|FAC|1", &mut out).unwrap();
    assert_eq!(out, b"MSH|one");
    drop(spool);
    let on_disk = all_bytes_under(dir.path());
    assert!(
        !on_disk.windows(7).any(|w| w == b"MSH|one"),
        "stored sealed"
    );
    // The journal segment holding the queued messages is still there; replaying it adds
    // nothing.
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes).unwrap();
    assert_eq!(spool.recover().unwrap(), Default::default());
    assert!(spool.verify().unwrap().is_consistent());
    assert_eq!(spool.status().unwrap().objects, 2);
    assert_eq!(spool.queued("ris", 10).unwrap().len(), 2);
    assert_eq!(
        fs::read_dir(dir.path().join("spool/journal"))
            .unwrap()
            .count(),
        1
    );
}

fn typed(key: &str, message_type: &str) -> gateway_spool::MessageIn {
    gateway_spool::MessageIn {
        message_type: message_type.into(),
        ..message(key, key)
    }
}

#[test]
fn messages_queue_only_for_the_hl7_routes_whose_types_they_match() {
    use gateway_spool::{ObjectKind, Route};
    let dir = tempfile::tempdir().unwrap();
    let routes = vec![
        Route::from("archive"),
        Route::new("emr", ObjectKind::Hl7).with_message_types(["ORU^R01"]),
        Route::new("accounting", ObjectKind::Hl7).with_message_types(["DFT^P03"]),
        Route::new("ris", ObjectKind::Hl7).with_message_types(["OMG^O19", "ORM^O01"]),
        Route::new("all", ObjectKind::Hl7),
    ];
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes).unwrap();
    let group = [
        typed("A|F|1", "ORU^R01"),
        typed("A|F|2", "DFT^P03"),
        typed("A|F|3", "OMG^O19"),
        typed("A|F|4", "ADT^A08"),
        typed("A|F|5", "ORU^R01"),
        typed("A|F|6", "ORU^"),
    ];
    let ids: Vec<_> = spool
        .store_messages(&group)
        .into_iter()
        .map(|r| match r.unwrap() {
            Committed::Stored(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    let queued = |d: &str| spool.queued(d, 10).unwrap();
    assert_eq!(queued("emr"), [ids[0], ids[4]]);
    assert_eq!(queued("accounting"), [ids[1]]);
    assert_eq!(queued("ris"), [ids[2]]);
    assert_eq!(
        queued("all"),
        ids,
        "the unfiltered route takes all, unreadable too"
    );
    assert!(queued("archive").is_empty());
    let status = spool.status().unwrap();
    let counts: Vec<(&str, u64)> = status
        .by_destination
        .iter()
        .map(|(d, c)| (d.as_str(), c.queued))
        .collect();
    assert_eq!(
        counts,
        [
            ("accounting", 1),
            ("all", 6),
            ("archive", 0),
            ("emr", 2),
            ("ris", 1)
        ]
    );
    drop(spool);

    // No destination takes ADT^A08 or an unreadable type now: stored all the same, held as
    // `received`. The earlier messages keep the destinations chosen when they arrived.
    let routes = vec![Route::new("emr", ObjectKind::Hl7).with_message_types(["ORU^R01"])];
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes).unwrap();
    let later = spool.store_messages(&[typed("A|F|7", "ADT^A08"), typed("A|F|8", "ORU^R01")]);
    let (Ok(Committed::Stored(adt)), Ok(Committed::Stored(oru))) = (&later[0], &later[1]) else {
        panic!("{later:?}")
    };
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    let (record, plain) = spool.read(adt).unwrap();
    assert_eq!(
        (record.state(), plain.as_slice()),
        ("received", &b"A|F|7"[..])
    );
    assert!(record.destinations.is_empty());
    assert_eq!(spool.queued("emr", 10).unwrap(), [ids[0], ids[4], *oru]);
    assert_eq!(spool.queued("all", 10).unwrap(), ids);
    assert_eq!(spool.status().unwrap().by_state["received"], 1);
}

/// Destinations confirm independently and at the same moment (an HL7 message queued for
/// the EMR, the RIS and an archive, acknowledged within a millisecond of each other):
/// no confirmation may undo another, and every object leaves every queue it was in.
#[test]
fn concurrent_confirmations_of_one_object_for_several_destinations_all_count() {
    use gateway_spool::{ObjectKind, Route};
    const DESTS: [&str; 4] = ["emr", "ris", "accounting", "all"];
    const N: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let routes = DESTS
        .iter()
        .map(|d| Route::new(*d, ObjectKind::Hl7))
        .collect();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes).unwrap();
    let group: Vec<_> = (0..N)
        .map(|i| typed(&format!("A|F|{i}"), "ORU^R01"))
        .collect();
    let ids: Vec<ObjectId> = spool
        .store_messages(&group)
        .into_iter()
        .map(|r| match r.unwrap() {
            Committed::Stored(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    let start = std::sync::Barrier::new(DESTS.len());
    std::thread::scope(|s| {
        for dest in DESTS {
            let (spool, ids, start) = (&spool, &ids, &start);
            s.spawn(move || {
                start.wait();
                // A few one by one, like the HL7 forwarders, then the rest at once like a
                // STOW batch: both paths read and rewrite the same records.
                let (single, batch) = ids.split_at(20);
                for id in single {
                    spool.mark_sent(id, dest).unwrap();
                }
                spool.mark_sent_all(batch, dest).unwrap();
            });
        }
    });
    let status = spool.status().unwrap();
    for dest in DESTS {
        let c = &status.by_destination[dest];
        assert_eq!(
            (c.queued, c.sent),
            (0, N),
            "{dest}: a confirmation was lost"
        );
        assert!(spool.queued(dest, 10).unwrap().is_empty());
    }
    assert_eq!(status.by_state["sent"], N, "{:?}", status.by_state);
    assert!(spool.verify().unwrap().is_consistent());
}

#[test]
fn message_group_on_a_full_spool_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 1 << 40,
        min_free_bytes: u64::MAX / 4,
    };
    let spool = Spool::open(dir.path(), Some(key()), limits, vec![]).unwrap();
    let results = spool.store_messages(&[message("A|B|1", "x"), message("A|B|2", "y")]);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(SpoolError::Full { .. })))
    );
    assert_eq!(spool.status().unwrap().objects, 0);
}

#[test]
fn status_reports_the_oldest_queued_age_per_destination() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into(), "b".into()]).unwrap();
    let Committed::Stored(first) = store(&spool, "6.0", b"first").unwrap() else {
        panic!()
    };
    std::thread::sleep(std::time::Duration::from_millis(1_200));
    store(&spool, "6.1", b"second").unwrap();
    spool.mark_sent(&first, "a").unwrap();
    let status = spool.status().unwrap();
    let a = status.by_destination["a"]
        .oldest_queued_age_seconds
        .unwrap();
    let b = status.by_destination["b"]
        .oldest_queued_age_seconds
        .unwrap();
    // "a" sent the first object: its oldest is the second, about 1.2 s younger than b's.
    assert!(b >= 1.2 && b - a >= 1.0, "a {a} b {b}");
    spool.mark_sent(&first, "b").unwrap();
    let ids = spool.queued("a", 10).unwrap();
    spool.mark_sent(&ids[0], "a").unwrap();
    let status = spool.status().unwrap();
    assert_eq!(status.by_destination["a"].oldest_queued_age_seconds, None);
    assert!(
        status.by_destination["b"]
            .oldest_queued_age_seconds
            .unwrap()
            < 1.0
    );
}

#[test]
fn delivery_errors_name_the_object_and_destination() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    let Committed::Stored(id) = store(&spool, "10.1", b"routed to a").unwrap() else {
        panic!()
    };
    let err = spool.mark_sent(&id, "b").unwrap_err();
    assert!(
        matches!(&err, SpoolError::NoDelivery { id: i, destination } if *i == id && destination == "b"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("object {} has no delivery to destination b", hex(&id))
    );
    let unknown = ObjectId::from_bytes([0xEE; 16]);
    assert!(matches!(
        spool.read(&unknown),
        Err(SpoolError::UnknownObject { id }) if id == unknown
    ));
    assert!(matches!(
        spool.mark_failed(&unknown, "a", "refused"),
        Err(SpoolError::NoDelivery { .. })
    ));
    assert_eq!(spool.queued("a", 10).unwrap(), [id], "nothing changed");
}

/// The `[spool]` dedupe window: a delivered object's record stays for the window (a resend
/// is a duplicate), then leaves the index with its keys (a resend is stored again). Held
/// back are objects still queued somewhere, dead letters and kept local copies. The
/// counts `status` shows, kept as records change, equal a fresh count at the next open.
#[test]
fn delivered_records_leave_the_index_after_the_dedupe_window_and_counts_stay_true() {
    use gateway_spool::{ObjectKind, Route};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let routes = vec![
        Route::from("a"),
        Route::from("b"),
        Route::new("ris", ObjectKind::Hl7),
    ];
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes.clone()).unwrap();
    let stored = |spool: &Spool, uid: &str, body: &[u8]| match store(spool, uid, body).unwrap() {
        Committed::Stored(id) => id,
        other => panic!("{uid}: {other:?}"),
    };
    let done = stored(&spool, "9.1", b"delivered everywhere");
    let half = stored(&spool, "9.2", b"still queued for b");
    let dead = stored(&spool, "9.3", b"refused by a");
    spool.mark_sent(&done, "a").unwrap();
    spool.mark_sent(&done, "b").unwrap();
    spool.mark_sent(&half, "a").unwrap();
    spool.mark_failed(&dead, "a", "refused").unwrap();
    spool.mark_sent(&dead, "b").unwrap();
    let [Ok(Committed::Stored(msg))] = spool.store_messages(&[message("APP|FAC|7", "MSH|x")])[..]
    else {
        panic!("message not stored")
    };
    assert!(
        spool.settle(Duration::from_secs(5)),
        "the message is indexed"
    );
    spool.mark_sent(&msg, "ris").unwrap();
    assert_eq!(spool.status().unwrap().objects, 4);
    assert_eq!(
        spool.prune_delivered().unwrap(),
        0,
        "no window set: nothing pruned"
    );

    spool.set_dedupe_window(Duration::from_secs(3600));
    assert_eq!(spool.prune_delivered().unwrap(), 0, "inside the window");
    assert_eq!(
        store(&spool, "9.1", b"delivered everywhere").unwrap(),
        Committed::Duplicate(done),
        "a resend inside the window is a duplicate"
    );

    spool.set_dedupe_window(Duration::ZERO);
    assert_eq!(
        spool.prune_delivered().unwrap(),
        2,
        "the DICOM object and the message"
    );
    let status = spool.status().unwrap();
    assert_eq!(status.objects, 2);
    assert_eq!(
        [
            status.by_state["received"],
            status.by_state["queued"],
            status.by_state["sent"],
            status.by_state["failed"]
        ],
        [0, 1, 0, 1]
    );
    let b = &status.by_destination["b"];
    assert_eq!((b.queued, b.sent, b.failed), (1, 1, 0));
    let a = &status.by_destination["a"];
    assert_eq!((a.queued, a.sent, a.failed), (0, 1, 1));
    assert_eq!(status.by_destination["ris"].sent, 0);
    assert!(spool.stored_instance("9.1").unwrap().is_empty());
    assert!(spool.verify().unwrap().is_consistent());

    let again = stored(&spool, "9.1", b"delivered everywhere");
    assert_ne!(again, done, "a resend after the window is stored again");
    assert_eq!(export(&spool, "9.1"), b"delivered everywhere");
    let [Ok(Committed::Stored(_))] = spool.store_messages(&[message("APP|FAC|7", "MSH|x")])[..]
    else {
        panic!("a message resent after the window is stored again")
    };

    // A kept local copy holds its record until the copy goes.
    spool.set_keep_sent_for(Duration::from_secs(3600));
    spool.mark_sent(&half, "b").unwrap();
    assert_eq!(
        spool.prune_delivered().unwrap(),
        0,
        "its blob is still kept"
    );
    spool.set_keep_sent_for(Duration::ZERO);
    assert_eq!(spool.reclaim_expired().unwrap(), 1);
    assert_eq!(spool.prune_delivered().unwrap(), 1);

    let kept = spool.status().unwrap();
    drop(spool);
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, routes).unwrap();
    let mut fresh = spool.status().unwrap();
    // Ages move on; the counts must not.
    fresh.oldest_age_seconds = kept.oldest_age_seconds;
    for (name, d) in &mut fresh.by_destination {
        d.oldest_queued_age_seconds = kept.by_destination[name].oldest_queued_age_seconds;
    }
    assert_eq!(fresh, kept, "the counts kept equal a fresh count");
    assert_eq!(fresh.objects, 3);
}

/// `/metrics` shows how many records the index holds and its size on disk.
#[test]
fn metrics_show_the_index_records_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Some(key()), ROOMY, vec!["a".into()]).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    spool.register_metrics(&mut registry);
    for i in 0..3 {
        store(&spool, &format!("7.{i}"), b"x").unwrap();
    }
    // Journaled objects are indexed behind their commit.
    assert!(spool.settle(std::time::Duration::from_secs(5)));
    spool.refresh_index_size().unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(value("gateway_spool_index_records"), 3.0);
    assert!(value("gateway_spool_index_bytes") > 0.0);
    assert!(
        text.contains("gateway_spool_objects{state=\"queued\"} 3"),
        "{text}"
    );
}
