//! The TPM back end against a real TPM 2.0 simulator (swtpm), started by each test on
//! loopback ports it picks, with its state in a temp dir. A missing swtpm is a failure.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_keystore::is_software_tpm;
use gateway_keystore::tpm::{FLOOR_BASE_INDEX, FLOOR_COUNTER_INDEX, TpmKeyStore};
use gateway_keystore::{DeviceIdentity, KeyStore, KeyStoreError, MAX_FLOOR_STEP};

struct Swtpm {
    child: Option<Child>,
    port: u16,
    state: PathBuf,
}

impl Swtpm {
    fn start(state: &Path) -> Self {
        std::fs::create_dir_all(state).unwrap();
        let mut swtpm = Self {
            child: None,
            port: 0,
            state: state.to_path_buf(),
        };
        swtpm.launch();
        swtpm
    }

    fn launch(&mut self) {
        for _ in 0..20 {
            let port = free_port_pair();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2"])
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--tpmstate", &format!("dir={}", self.state.display())])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start swtpm (install swtpm: apt-get install swtpm swtpm-tools): {e}"
                    )
                });
            self.child = Some(child);
            self.port = port;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.stop();
        }
        panic!("swtpm did not start");
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Power cycle: same state, PCRs reset.
    fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Runs a tpm2-tools command against this TPM; returns its stdout.
    fn tool(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} (apt-get install tpm2-tools): {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The raw value of an 8-byte NV index.
    fn nv_u64(&self, index: u32) -> u64 {
        let out = Command::new("tpm2_nvread")
            .args([&format!("{index:#x}"), "-C", "o", "-s", "8"])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("cannot run tpm2_nvread (apt-get install tpm2-tools): {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        u64::from_be_bytes(out.stdout.as_slice().try_into().unwrap())
    }

    fn extend_pcr(&self, pcr: u8) {
        let status = Command::new("tpm2_pcrextend")
            .arg(format!("{pcr}:sha256={}", "ab".repeat(32)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run tpm2_pcrextend (apt-get install tpm2-tools): {e}")
            });
        assert!(status.success());
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn setup() -> (tempfile::TempDir, Swtpm, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&dir.path().join("swtpm"));
    let data = dir.path().join("data");
    (dir, swtpm, data)
}

#[test]
fn master_key_survives_a_restart_of_the_tpm_and_the_gateway() {
    let (_dir, mut swtpm, data) = setup();
    let status = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    let first = TpmKeyStore::open(&swtpm.tcti(), &data)
        .unwrap()
        .spool_master_key()
        .unwrap();
    assert_eq!(status.master_key_id, Some(first.id()));
    swtpm.restart();
    let again = TpmKeyStore::open(&swtpm.tcti(), &data)
        .unwrap()
        .spool_master_key()
        .unwrap();
    assert_eq!(first.expose(), again.expose());
    // Only blobs and the recorded Name are on disk: no saved contexts, no raw key.
    let mut names: Vec<_> = std::fs::read_dir(data.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "identity.priv",
            "identity.pub",
            "spool-master.priv",
            "spool-master.pub",
            "tpm-state.json"
        ]
    );
    for entry in std::fs::read_dir(data.join("keys")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == first.expose()),
            "raw master key on disk"
        );
    }
}

#[test]
fn the_keys_work_while_the_tpm_is_in_dictionary_attack_lockout() {
    // A TPM counts failed authorisations, and each start after a power cut that interrupted
    // its work (seen in the QEMU power-cut test); after maxTries it refuses every DA-protected
    // object until its recovery time has passed. A box in that state must still unseal its
    // spool key and sign as itself. Here: maxTries 1, then one wrong password on an NV index
    // of its own.
    let (_dir, swtpm, data) = setup();
    TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    swtpm.tool(
        "tpm2_dictionarylockout",
        &[
            "--setup-parameters",
            "--max-tries=1",
            "--recovery-time=3600",
            "--lockout-recovery-time=3600",
        ],
    );
    swtpm.tool(
        "tpm2_nvdefine",
        &[
            "0x01500099",
            "-C",
            "o",
            "-s",
            "8",
            "-p",
            "secret",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        ],
    );
    let wrong = Command::new("tpm2_nvread")
        .args(["0x01500099", "-C", "0x01500099", "-P", "wrong", "-s", "8"])
        .env("TPM2TOOLS_TCTI", swtpm.tcti())
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "a wrong password was accepted");
    let cap = swtpm.tool("tpm2_getcap", &["properties-variable"]);
    assert!(
        cap.contains("inLockout:                 1"),
        "the TPM is not in lockout:\n{cap}"
    );
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).expect("open in DA lockout");
    let identity = store.identity().unwrap();
    let signature = identity
        .sign_sha256(b"TLS handshake transcript")
        .expect("the identity signs in DA lockout");
    assert!(!signature.is_empty());
}

#[test]
fn a_cleared_tpm_is_refused_as_tamper() {
    let (dir, mut swtpm, data) = setup();
    TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    swtpm.stop();
    std::fs::remove_dir_all(dir.path().join("swtpm")).unwrap();
    let mut fresh = Swtpm::start(&dir.path().join("swtpm"));
    let err = TpmKeyStore::open(&fresh.tcti(), &data).unwrap_err();
    assert!(matches!(err, KeyStoreError::Tamper { .. }), "{err}");
    assert!(err.to_string().contains("cleared or replaced"), "{err}");

    // A different key at the same handle (another box's init) is a Name mismatch.
    TpmKeyStore::init(&fresh.tcti(), &dir.path().join("other"), &[]).unwrap();
    let err = TpmKeyStore::open(&fresh.tcti(), &data).unwrap_err();
    assert!(err.to_string().contains("Name mismatch"), "{err}");
    fresh.stop();
}

#[test]
fn pcr_policy_blocks_unsealing_after_an_extend_until_the_pcrs_reset() {
    let (_dir, mut swtpm, data) = setup();
    TpmKeyStore::init(&swtpm.tcti(), &data, &[16]).unwrap();
    let key = TpmKeyStore::open(&swtpm.tcti(), &data)
        .unwrap()
        .spool_master_key()
        .unwrap();
    swtpm.extend_pcr(16);
    let err = TpmKeyStore::open(&swtpm.tcti(), &data)
        .unwrap()
        .spool_master_key()
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::PcrPolicy { .. }), "{err}");
    assert!(err.to_string().contains("PCRs [16]"), "{err}");
    swtpm.restart();
    let again = TpmKeyStore::open(&swtpm.tcti(), &data)
        .unwrap()
        .spool_master_key()
        .unwrap();
    assert_eq!(key.expose(), again.expose());
}

#[test]
fn wipe_makes_the_old_blobs_useless_and_open_says_to_init() {
    let (dir, swtpm, data) = setup();
    TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    let saved = dir.path().join("saved-keys");
    copy_dir(&data.join("keys"), &saved);
    assert!(TpmKeyStore::wipe(&swtpm.tcti(), &data).unwrap());
    let err = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap_err();
    assert!(matches!(err, KeyStoreError::NotInitialised { .. }), "{err}");
    assert!(err.to_string().contains("gatewayd keys init"), "{err}");
    // Someone who kept a copy of every blob still cannot unseal: the parent key is gone.
    copy_dir(&saved, &data.join("keys"));
    let err = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap_err();
    assert!(matches!(err, KeyStoreError::Tamper { .. }), "{err}");
    assert!(!TpmKeyStore::wipe(&swtpm.tcti(), &dir.path().join("nothing")).unwrap());
}

#[test]
fn identity_signs_verifiably_and_a_thousand_cycles_leave_no_transient_object() {
    let (_dir, swtpm, data) = setup();
    TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert!(is_software_tpm(&store.vendor().unwrap()));
    let identity = store.identity().unwrap();
    let point = identity.public_key();
    assert_eq!(point.len(), 65);
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    for i in 0..500u32 {
        let message = format!("handshake transcript {i}");
        let der = identity.sign_sha256(message.as_bytes()).unwrap();
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        use p256::ecdsa::signature::Verifier;
        verifying.verify(message.as_bytes(), &sig).unwrap();
        store.spool_master_key().unwrap();
    }
    assert_eq!(store.transient_objects().unwrap(), 0);
}

#[test]
fn the_version_floor_only_rises_and_outlives_a_reopen_a_restart_and_a_wipe() {
    let (_dir, mut swtpm, data) = setup();
    let status = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    assert_eq!(status.version_floor, Some(0), "keys init defines the floor");
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert_eq!(store.version_floor().unwrap(), 0);
    assert_eq!(store.raise_version_floor(3).unwrap(), 3);
    assert_eq!(store.version_floor().unwrap(), 3);
    assert_eq!(
        store.raise_version_floor(2).unwrap(),
        3,
        "a lower raise is a no-op"
    );
    assert_eq!(store.raise_version_floor(3).unwrap(), 3);
    let err = store.raise_version_floor(4 + MAX_FLOOR_STEP).unwrap_err();
    assert!(
        matches!(err, KeyStoreError::FloorRaiseTooLarge { floor: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("more than 1000 versions"), "{err}");
    assert_eq!(
        store.version_floor().unwrap(),
        3,
        "a refused raise changes nothing"
    );
    assert_eq!(store.transient_objects().unwrap(), 0);
    drop(store);

    // The floor is the counter minus its recorded base, both in the TPM.
    assert_eq!(
        swtpm.nv_u64(FLOOR_COUNTER_INDEX) - swtpm.nv_u64(FLOOR_BASE_INDEX),
        3
    );
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert_eq!(store.version_floor().unwrap(), 3, "survives a reopen");
    drop(store);
    swtpm.restart();
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert_eq!(
        store.version_floor().unwrap(),
        3,
        "survives a TPM power cycle"
    );
    drop(store);

    // keys wipe + keys init: new keys, same floor.
    assert!(TpmKeyStore::wipe(&swtpm.tcti(), &data).unwrap());
    let wiped = TpmKeyStore::status_at(&swtpm.tcti(), &data).unwrap();
    assert!(!wiped.initialised);
    assert_eq!(wiped.version_floor, Some(3), "keys wipe keeps the floor");
    let status = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    assert_eq!(status.version_floor, Some(3));
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert_eq!(store.raise_version_floor(5).unwrap(), 5);
    assert_eq!(
        TpmKeyStore::status_at(&swtpm.tcti(), &data)
            .unwrap()
            .version_floor,
        Some(5)
    );
}

#[test]
fn a_fresh_tpm_whose_counters_ran_high_starts_the_floor_at_0() {
    let (_dir, swtpm, data) = setup();
    // Someone else's counter ran up to 40 and was deleted: the TPM starts every new counter
    // above the highest count it has seen.
    let noise = "0x1806799";
    swtpm.tool(
        "tpm2_nvdefine",
        &[
            noise,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "nt=counter|ownerread|ownerwrite|no_da",
        ],
    );
    for _ in 0..40 {
        swtpm.tool("tpm2_nvincrement", &[noise, "-C", "o"]);
    }
    swtpm.tool("tpm2_nvundefine", &[noise, "-C", "o"]);
    assert_eq!(
        TpmKeyStore::status_at(&swtpm.tcti(), &data)
            .unwrap()
            .version_floor,
        None,
        "keys status does not define the floor"
    );
    let status = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap();
    assert_eq!(status.version_floor, Some(0));
    let raw = swtpm.nv_u64(FLOOR_COUNTER_INDEX);
    assert!(
        raw >= 40,
        "raw counter {raw}: the test did not push it high"
    );
    let store = TpmKeyStore::open(&swtpm.tcti(), &data).unwrap();
    assert_eq!(store.raise_version_floor(2).unwrap(), 2);
    assert_eq!(swtpm.nv_u64(FLOOR_COUNTER_INDEX), raw + 2);
}

#[test]
fn a_foreign_index_at_the_floor_handle_is_refused_not_used() {
    let (dir, swtpm, data) = setup();
    let counter = format!("{FLOOR_COUNTER_INDEX:#x}");
    // An ordinary index (not a counter) someone else defined at our handle.
    swtpm.tool(
        "tpm2_nvdefine",
        &[
            &counter,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|no_da",
        ],
    );
    let err = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap_err();
    assert!(
        matches!(err, KeyStoreError::FloorIndex { index, .. } if index == FLOOR_COUNTER_INDEX),
        "{err}"
    );
    assert!(err.to_string().contains("did not define"), "{err}");
    assert!(
        !data.join("keys").join("tpm-state.json").exists(),
        "init refused before making keys"
    );
    swtpm.tool("tpm2_nvundefine", &[&counter, "-C", "o"]);

    // A counter with other attributes (auth-writable) at the base handle: refused too.
    let base = format!("{FLOOR_BASE_INDEX:#x}");
    swtpm.tool(
        "tpm2_nvdefine",
        &[
            &base,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|authwrite|no_da",
        ],
    );
    let err = TpmKeyStore::init(&swtpm.tcti(), &data, &[]).unwrap_err();
    assert!(
        matches!(err, KeyStoreError::FloorIndex { index, .. } if index == FLOOR_BASE_INDEX),
        "{err}"
    );
    swtpm.tool("tpm2_nvundefine", &[&base, "-C", "o"]);
    let status = TpmKeyStore::init(&swtpm.tcti(), &dir.path().join("data2"), &[]).unwrap();
    assert_eq!(status.version_floor, Some(0));

    // A base rewritten above the counter (lowering attempt) is refused, not read as a floor.
    let store = TpmKeyStore::open(&swtpm.tcti(), &dir.path().join("data2")).unwrap();
    assert_eq!(store.raise_version_floor(1).unwrap(), 1);
    let above = swtpm.nv_u64(FLOOR_COUNTER_INDEX) + 5;
    let file = dir.path().join("base.bin");
    std::fs::write(&file, above.to_be_bytes()).unwrap();
    swtpm.tool(
        "tpm2_nvwrite",
        &[&base, "-C", "o", "-i", file.to_str().unwrap()],
    );
    let err = store.version_floor().unwrap_err();
    assert!(err.to_string().contains("tampering"), "{err}");
    assert_eq!(store.transient_objects().unwrap(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
