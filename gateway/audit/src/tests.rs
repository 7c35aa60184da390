use super::*;

fn key() -> AuditKey {
    AuditKey::derive(&[5; 32])
}

fn event(actor: &str, action: Action) -> Event {
    Event {
        actor: actor.into(),
        action,
        outcome: Outcome::Success,
        subject: Some("appt-0001".into()),
        detail: None,
    }
}

/// A log of `n` records in a fresh dir.
fn log_of(n: u64) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), key()).unwrap();
    for i in 0..n {
        log.append(event(&format!("clerk{i}"), Action::Login))
            .unwrap();
    }
    let lines = lines(dir.path());
    (dir, lines)
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(LOG_FILE))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn rewrite(dir: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(dir.join(LOG_FILE), text).unwrap();
}

fn problem(dir: &Path) -> Option<Problem> {
    verify(dir, &key()).unwrap().problem
}

#[test]
fn appended_records_chain_and_survive_reopen() {
    let (dir, lines) = log_of(3);
    assert_eq!(lines.len(), 3);
    assert_eq!(
        verify(dir.path(), &key()).unwrap(),
        Report {
            records: 3,
            problem: None
        }
    );
    let log = AuditLog::open(dir.path(), key()).unwrap();
    let r = log.append(event("admin", Action::AccountAdded)).unwrap();
    assert_eq!(r.seq(), 4);
    let all = log.records().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].body.prev, all[2].mac);
    assert_eq!(all[0].body.prev, GENESIS);
    assert_eq!(all[1].actor(), "clerk1");
    assert_eq!(verify(dir.path(), &key()).unwrap().records, 4);
}

#[test]
fn an_edited_record_is_named() {
    let (dir, mut lines) = log_of(4);
    lines[1] = lines[1].replace("clerk1", "clerk9");
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Edited { line: 2, seq: 2 })
    );
    // Opening for append refuses a damaged log.
    let err = AuditLog::open(dir.path(), key()).unwrap_err();
    assert!(
        err.to_string().contains("record 2 (line 2) was changed"),
        "{err}"
    );
}

#[test]
fn reordered_records_are_named() {
    let (dir, mut lines) = log_of(4);
    lines.swap(1, 2);
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Missing {
            line: 2,
            from_seq: 2,
            to_seq: 2
        })
    );
    let (dir, mut lines) = log_of(3);
    let copy = lines[0].clone();
    lines.insert(2, copy);
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::OutOfOrder {
            line: 3,
            seq: 1,
            expected: 3
        })
    );
}

#[test]
fn deleted_records_are_named_in_the_middle_and_at_the_end() {
    let (dir, mut lines) = log_of(5);
    lines.remove(2);
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Missing {
            line: 3,
            from_seq: 3,
            to_seq: 3
        })
    );
    let (dir, mut lines) = log_of(5);
    lines.truncate(3);
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Truncated {
            last_seq: 3,
            head_seq: 5
        })
    );
    // Everything deleted, head kept.
    let (dir, _) = log_of(2);
    rewrite(dir.path(), &[]);
    std::fs::write(dir.path().join(LOG_FILE), "").unwrap();
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Truncated {
            last_seq: 0,
            head_seq: 2
        })
    );
}

#[test]
fn a_forged_head_or_a_foreign_key_is_detected() {
    let (dir, mut lines) = log_of(3);
    // Truncate and write a head without the key: its seal does not verify.
    lines.truncate(2);
    rewrite(dir.path(), &lines);
    let fake = Head {
        seq: 2,
        mac: "00".repeat(32),
        seal: "00".repeat(32),
    };
    std::fs::write(
        dir.path().join(HEAD_FILE),
        serde_json::to_vec(&fake).unwrap(),
    )
    .unwrap();
    assert_eq!(problem(dir.path()), Some(Problem::BadHead));
    std::fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
    assert_eq!(problem(dir.path()), Some(Problem::BadHead));
    // A log MAC'd by another box's key does not verify under ours.
    let (dir, _) = log_of(1);
    let other = verify(dir.path(), &AuditKey::derive(&[6; 32])).unwrap();
    assert_eq!(other.problem, Some(Problem::Edited { line: 1, seq: 1 }));
}

#[test]
fn a_crash_between_record_and_head_is_not_damage() {
    let (dir, _) = log_of(2);
    let head = std::fs::read(dir.path().join(HEAD_FILE)).unwrap();
    let log = AuditLog::open(dir.path(), key()).unwrap();
    log.append(event("clerk", Action::Logout)).unwrap();
    drop(log);
    // The head as it was before the third record's head replacement.
    std::fs::write(dir.path().join(HEAD_FILE), head).unwrap();
    assert_eq!(
        verify(dir.path(), &key()).unwrap(),
        Report {
            records: 3,
            problem: None
        }
    );
    let log = AuditLog::open(dir.path(), key()).unwrap();
    assert_eq!(log.append(event("clerk", Action::Login)).unwrap().seq(), 4);
}

#[test]
fn garbage_lines_are_malformed_not_a_panic() {
    let (dir, mut lines) = log_of(2);
    lines.insert(1, "{\"seq\": \"x\"".into());
    rewrite(dir.path(), &lines);
    assert_eq!(problem(dir.path()), Some(Problem::Malformed { line: 2 }));
    for junk in [
        "",
        "null",
        "[]",
        "{}",
        "\u{0}\u{1}",
        "{\"seq\":1,\"mac\":5}",
    ] {
        let (dir, mut lines) = log_of(1);
        lines.push(junk.into());
        rewrite(dir.path(), &lines);
        assert_eq!(
            problem(dir.path()),
            Some(Problem::Malformed { line: 2 }),
            "{junk:?}"
        );
    }
}

#[test]
fn two_handles_appending_keep_one_chain() {
    // The daemon and `gatewayd users ...` both append to the same trail.
    let dir = tempfile::tempdir().unwrap();
    let key = || AuditKey::derive(&[4; 32]);
    let daemon = AuditLog::open(dir.path(), key()).unwrap();
    let cli = AuditLog::open(dir.path(), key()).unwrap();
    let event = |actor: &str| Event {
        actor: actor.into(),
        action: Action::Login,
        outcome: Outcome::Success,
        subject: None,
        detail: None,
    };
    daemon.append(event("a")).unwrap();
    cli.append(event("b")).unwrap();
    daemon.append(event("c")).unwrap();
    cli.append(event("d")).unwrap();
    let report = verify(dir.path(), &key()).unwrap();
    assert_eq!((report.records, report.problem), (4, None));
}

#[test]
fn processes_opening_a_new_trail_at_once_all_succeed_and_keep_one_chain() {
    // Two `gatewayd users ...` runs on a box without a trail yet: each open must see either
    // no trail or a whole one (log and head), never a log without its head.
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (dir, start) = (dir.path().to_path_buf(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let log = AuditLog::open(&dir, key())?;
                    log.append(event(&format!("admin{i}"), Action::AccountAdded))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let report = verify(dir.path(), &key()).unwrap();
        assert_eq!((report.records, report.problem), (6, None));
    }
}

#[test]
fn a_lock_held_elsewhere_past_the_wait_is_an_error_and_appends_nothing() {
    let (dir, before) = log_of(2);
    let log = AuditLog::open(dir.path(), key())
        .unwrap()
        .with_lock_wait(std::time::Duration::from_millis(200));
    let held = LockedFile::lock(
        &dir.path().join(HEAD_FILE),
        &dir.path().join(LOCK_FILE),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let err = log.append(event("clerk", Action::Login)).unwrap_err();
    assert!(
        matches!(err, AuditError::Lock(durable::LockError::Busy { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("audit.lock"), "{err}");
    assert_eq!(lines(dir.path()), before);
    drop(held);
    assert_eq!(log.append(event("clerk", Action::Login)).unwrap().seq(), 3);
    assert_eq!(verify(dir.path(), &key()).unwrap().problem, None);
}

#[test]
fn an_unreadable_or_unsealed_head_stops_appends() {
    let (dir, before) = log_of(2);
    let log = AuditLog::open(dir.path(), key()).unwrap();
    let head = dir.path().join(HEAD_FILE);
    let good = std::fs::read(&head).unwrap();
    let forged = serde_json::to_vec(&Head {
        seq: 9,
        mac: "00".repeat(32),
        seal: "00".repeat(32),
    })
    .unwrap();
    for bad in [b"{ not json".to_vec(), forged] {
        std::fs::write(&head, &bad).unwrap();
        let err = log.append(event("clerk", Action::Login)).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::Damaged {
                    problem: Problem::BadHead,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(lines(dir.path()), before);
        assert_eq!(std::fs::read(&head).unwrap(), bad, "head replaced");
    }
    std::fs::remove_file(&head).unwrap();
    assert!(log.append(event("clerk", Action::Login)).is_err());
    assert_eq!(lines(dir.path()), before);
    std::fs::write(&head, good).unwrap();
    assert_eq!(log.append(event("clerk", Action::Login)).unwrap().seq(), 3);
}

fn transfer() -> Participants {
    Participants {
        patient_id: "PID-77".into(),
        study_uid: "1.2.3.4.5".into(),
        sop_classes: vec![SopClassCount {
            uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            count: 2,
        }],
    }
}

#[test]
fn sealed_participants_are_chained_covered_by_the_mac_and_not_in_clear() {
    let (dir, _) = log_of(2);
    let log = AuditLog::open(dir.path(), key()).unwrap();
    let r = log
        .append_with_participants(
            Event {
                actor: "CT01".into(),
                action: Action::DicomInstancesReceived,
                outcome: Outcome::Success,
                subject: Some("peer:127.0.0.1:4000".into()),
                detail: None,
            },
            &transfer(),
        )
        .unwrap();
    assert_eq!(r.seq(), 3);
    assert!(r.has_participants());
    log.append(event("clerk", Action::Logout)).unwrap();
    assert_eq!(verify(dir.path(), &key()).unwrap().problem, None);
    let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
    assert!(!text.contains("PID-77") && !text.contains("1.2.3.4.5"));
    // Records without participants are written exactly as before (no new field).
    let plain = lines(dir.path());
    assert!(!plain[0].contains("participants"));
    assert!(plain[2].contains("\"participants\":\""));
    let back = log.records().unwrap();
    assert_eq!(
        back[2].participants(key().participants_key()).unwrap(),
        Some(transfer())
    );
    assert_eq!(
        back[1].participants(key().participants_key()).unwrap(),
        None
    );
    // Another box's key does not open them.
    let other = AuditKey::derive(&[6; 32]);
    assert!(matches!(
        back[2].participants(other.participants_key()),
        Err(AuditError::Sealed { seq: 3, .. })
    ));
    // Swapping the sealed part for another is an edit the chain names.
    let mut lines = plain;
    let sealed_at = lines[2].find("\"participants\":\"").unwrap() + 16;
    let mut bytes = lines[2].clone().into_bytes();
    bytes[sealed_at + 4] = if bytes[sealed_at + 4] == b'A' {
        b'B'
    } else {
        b'A'
    };
    lines[2] = String::from_utf8(bytes).unwrap();
    rewrite(dir.path(), &lines);
    assert_eq!(
        problem(dir.path()),
        Some(Problem::Edited { line: 3, seq: 3 })
    );
}

#[test]
fn a_record_written_before_sealed_participants_existed_still_verifies() {
    // A line as the previous version wrote it (no `participants` field), MAC'd over the
    // same field order.
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let body = format!(
        "{{\"seq\":1,\"time_unix_ms\":1700000000000,\"actor\":\"alice\",\"action\":\"login\",\"outcome\":\"success\",\"subject\":null,\"detail\":null,\"prev\":\"{GENESIS}\"}}"
    );
    let mac = k.mac(body.as_bytes());
    let line = format!("{},\"mac\":\"{mac}\"}}\n", body.trim_end_matches('}'));
    std::fs::write(dir.path().join(LOG_FILE), line).unwrap();
    let head = Head::new(&k, 1, mac);
    std::fs::write(
        dir.path().join(HEAD_FILE),
        serde_json::to_vec(&head).unwrap(),
    )
    .unwrap();
    assert_eq!(
        verify(dir.path(), &k).unwrap(),
        Report {
            records: 1,
            problem: None
        }
    );
    let log = AuditLog::open(dir.path(), key()).unwrap();
    log.append_with_participants(event("CT01", Action::DicomInstancesReceived), &transfer())
        .unwrap();
    assert_eq!(verify(dir.path(), &k).unwrap().records, 2);
}

#[test]
fn records_after_reads_on_from_where_it_stopped_and_starts_over_when_asked_for_earlier() {
    let (dir, _) = log_of(5);
    let log = AuditLog::open(dir.path(), key()).unwrap();
    let seqs = |rs: Vec<Record>| rs.iter().map(Record::seq).collect::<Vec<_>>();
    assert_eq!(seqs(log.records_after(0, 2).unwrap()), [1, 2]);
    assert_eq!(seqs(log.records_after(2, 10).unwrap()), [3, 4, 5]);
    assert_eq!(seqs(log.records_after(5, 10).unwrap()), Vec::<u64>::new());
    // Appended by another handle (another process) after the last read.
    let other = AuditLog::open(dir.path(), key()).unwrap();
    other.append(event("clerk5", Action::Login)).unwrap();
    assert_eq!(seqs(log.records_after(5, 10).unwrap()), [6]);
    // A line still being written is not a record yet, and is read whole later.
    let line = lines(dir.path()).pop().unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG_FILE))
        .unwrap();
    f.write_all(&line.as_bytes()[..10]).unwrap();
    assert_eq!(seqs(log.records_after(6, 10).unwrap()), Vec::<u64>::new());
    // An earlier cursor (an export that fell behind) reads from the start again.
    assert_eq!(seqs(log.records_after(3, 2).unwrap()), [4, 5]);
    assert_eq!(seqs(log.records_after(0, 1).unwrap()), [1]);
}
