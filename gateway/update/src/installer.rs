//! The boundary to the A/B installer (RAUC): [`Installer`], the real [`RaucCli`] and the
//! [`FakeInstaller`] twin the tests drive through every cut point.
//!
//! `RaucCli` runs the `rauc` command line (blocking; call it from `spawn_blocking` or a
//! dedicated thread), each run bounded by a timeout after which the child is killed:
//! - `rauc info --output-format=json BUNDLE`: checks the bundle's CMS signature against the
//!   keyring (`check_bundle`) before it prints anything; non-zero exit = not verified;
//! - `rauc install BUNDLE` (through the RAUC service; the pre-install handler and the slot
//!   hooks run inside it);
//! - `rauc status --output-format=json`: `booted` (boot name), `boot_primary`, per slot
//!   `bootname`, `state`, `boot_status`;
//! - `rauc status mark-good booted`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What `rauc info` says of a verified bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    pub compatible: String,
    /// The manifest's `version` (an integer string in this project's bundles).
    pub version: String,
}

/// One slot of `rauc status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    pub bootname: Option<String>,
    /// `good`, `bad` or unknown.
    pub boot_good: Option<bool>,
}

/// What `rauc status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallerStatus {
    pub compatible: String,
    /// Boot name of the booted slot (`system0`).
    pub booted: Option<String>,
    /// Slot name of the primary boot slot (`rootfs.0`).
    pub primary: Option<String>,
    pub slots: Vec<SlotInfo>,
}

impl InstallerStatus {
    /// Whether the slot with this boot name is marked good.
    pub fn is_good(&self, bootname: &str) -> Option<bool> {
        self.slots
            .iter()
            .find(|s| s.bootname.as_deref() == Some(bootname))
            .and_then(|s| s.boot_good)
    }

    /// The boot name of the other slot of the booted one's class (the install target).
    pub fn other_bootname(&self) -> Option<String> {
        let booted = self.booted.as_deref()?;
        self.slots
            .iter()
            .filter_map(|s| s.bootname.as_deref())
            .find(|b| *b != booted)
            .map(str::to_owned)
    }
}

/// Why the installer failed. Texts come from `rauc`'s own messages (paths, slot names,
/// versions; never patient data), cut to 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallerError {
    #[error("cannot run {command}: {reason}")]
    Spawn { command: String, reason: String },
    #[error("{command} {verb} did not finish within {secs} s and was stopped")]
    Timeout {
        command: String,
        verb: &'static str,
        secs: u64,
    },
    #[error("rauc {verb} failed ({status}): {message}")]
    Failed {
        command: String,
        verb: &'static str,
        status: String,
        message: String,
    },
    /// A `gatewayd update pre-install` refusal carried through `rauc install`.
    #[error("refused by the pre-install check: {code}")]
    Refused { code: String },
    #[error("{command} {verb} printed output this build cannot read: {reason}")]
    Output {
        command: String,
        verb: &'static str,
        reason: String,
    },
}

/// The A/B installer.
pub trait Installer: Send + Sync + std::fmt::Debug {
    /// Verifies the bundle's signature and reads its manifest; writes nothing.
    fn info(&self, bundle: &Path) -> Result<BundleInfo, InstallerError>;
    /// Writes the bundle to the inactive slots and makes the target the next boot (once).
    fn install(&self, bundle: &Path) -> Result<(), InstallerError>;
    /// The booted slot and the slots' states.
    fn status(&self) -> Result<InstallerStatus, InstallerError>;
    /// Marks the booted slot good (it becomes the primary boot slot).
    fn mark_good(&self) -> Result<(), InstallerError>;
}

/// The marker `gatewayd update pre-install` prints before its refusal code (for the rauc
/// service's log and a person running it by hand).
pub const REFUSAL_MARKER: &str = "gatewayd-update-refused:";

/// `gatewayd update pre-install`'s exit code for each refusal. RAUC 1.8 carries only the
/// handler's exit status back to `rauc install` ("Pre-install handler error: Child process
/// exited with code N"); what the handler prints reaches the rauc service's log only
/// (RAUC v1.8 `src/service.c`). Codes from 10 up, clear of the shell's and glib's own.
pub const PRE_INSTALL_EXIT_CODES: [(u8, &str); 4] = [
    (10, "downgrade"),
    (11, "data-format"),
    (12, "version-mismatch"),
    (13, "install-failed"),
];

/// The exit code `gatewayd update pre-install` ends with for a refusal `code`; a code without
/// its own number is `install-failed`'s.
pub fn pre_install_exit_code(code: &str) -> u8 {
    PRE_INSTALL_EXIT_CODES
        .iter()
        .find(|(_, c)| *c == code)
        .map_or(13, |(n, _)| *n)
}

/// The `rauc` command line.
#[derive(Debug, Clone)]
pub struct RaucCli {
    pub command: PathBuf,
    /// Bound of `info`, `status` and `mark-good`.
    pub query_timeout: Duration,
    /// Bound of `install`.
    pub install_timeout: Duration,
}

impl RaucCli {
    pub fn new(command: PathBuf) -> RaucCli {
        RaucCli {
            command,
            query_timeout: Duration::from_secs(120),
            install_timeout: Duration::from_secs(1800),
        }
    }

    fn run(
        &self,
        verb: &'static str,
        args: &[&std::ffi::OsStr],
        timeout: Duration,
    ) -> Result<String, InstallerError> {
        let command = self.command.display().to_string();
        let mut child = Command::new(&self.command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| InstallerError::Spawn {
                command: command.clone(),
                reason: e.to_string(),
            })?;
        // Drain both pipes on their own threads so a chatty child never blocks.
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(InstallerError::Timeout {
                        command,
                        verb,
                        secs: timeout.as_secs(),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    return Err(InstallerError::Spawn {
                        command,
                        reason: e.to_string(),
                    });
                }
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if status.success() {
            return Ok(stdout);
        }
        let all = format!("{stderr}\n{stdout}");
        if let Some(code) = refusal_code(&all) {
            return Err(InstallerError::Refused { code });
        }
        Err(InstallerError::Failed {
            command,
            verb,
            status: status.to_string(),
            message: last_lines(&stderr),
        })
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            // Bounded: rauc's JSON is small; anything past 4 MiB is not read.
            let _ = pipe.by_ref().take(4 << 20).read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// The pre-install refusal `rauc install`'s output reports: RAUC's "Pre-install handler
/// error: Child process exited with code N" with N one of [`PRE_INSTALL_EXIT_CODES`], or
/// (the handler run directly) the code after [`REFUSAL_MARKER`].
pub fn refusal_code(output: &str) -> Option<String> {
    const RAUC_HANDLER_EXIT: &str = "Pre-install handler error: Child process exited with code ";
    if let Some(at) = output.find(RAUC_HANDLER_EXIT) {
        let digits: String = output
            .get(at + RAUC_HANDLER_EXIT.len()..)?
            .chars()
            .take_while(char::is_ascii_digit)
            .take(3)
            .collect();
        let n: u8 = digits.parse().ok()?;
        return PRE_INSTALL_EXIT_CODES
            .iter()
            .find(|(code, _)| *code == n)
            .map(|(_, name)| (*name).to_string());
    }
    let at = output.find(REFUSAL_MARKER)?;
    let rest = output.get(at + REFUSAL_MARKER.len()..)?;
    let code: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '-')
        .take(64)
        .collect();
    (!code.is_empty()).then_some(code)
}

/// The last non-empty lines of a message without glib's informational `rauc-Message:`
/// lines (they name files), single-line, at most 256 characters.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("-Message: ") && !l.contains("-Info: "))
        .collect();
    let tail = lines
        .iter()
        .rev()
        .take(3)
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join(" | ");
    tail.chars().filter(|c| !c.is_control()).take(256).collect()
}

#[derive(Deserialize)]
struct RawInfo {
    compatible: Option<String>,
    version: Option<String>,
}

#[derive(Deserialize)]
struct RawStatus {
    compatible: Option<String>,
    booted: Option<String>,
    boot_primary: Option<String>,
    #[serde(default)]
    slots: Vec<BTreeMap<String, RawSlot>>,
}

#[derive(Deserialize)]
struct RawSlot {
    bootname: Option<String>,
    boot_status: Option<String>,
}

/// `rauc`'s JSON output could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct OutputError {
    pub reason: String,
}

fn output_error(reason: impl Into<String>) -> OutputError {
    OutputError {
        reason: reason.into(),
    }
}

/// Parses `rauc info --output-format=json`.
pub fn parse_info(json: &str) -> Result<BundleInfo, OutputError> {
    let raw: RawInfo = serde_json::from_str(json.trim()).map_err(|e| {
        output_error(format!(
            "not JSON (line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    Ok(BundleInfo {
        compatible: raw
            .compatible
            .ok_or_else(|| output_error("no compatible"))?,
        version: raw.version.ok_or_else(|| output_error("no version"))?,
    })
}

/// Parses `rauc status --output-format=json`.
pub fn parse_status(json: &str) -> Result<InstallerStatus, OutputError> {
    let raw: RawStatus = serde_json::from_str(json.trim()).map_err(|e| {
        output_error(format!(
            "not JSON (line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    let slots = raw
        .slots
        .into_iter()
        .flat_map(|m| m.into_iter())
        .map(|(name, s)| SlotInfo {
            name,
            bootname: s.bootname,
            boot_good: match s.boot_status.as_deref() {
                Some("good") => Some(true),
                Some("bad") => Some(false),
                _ => None,
            },
        })
        .collect();
    Ok(InstallerStatus {
        compatible: raw.compatible.unwrap_or_default(),
        booted: raw.booted,
        primary: raw.boot_primary,
        slots,
    })
}

impl Installer for RaucCli {
    fn info(&self, bundle: &Path) -> Result<BundleInfo, InstallerError> {
        let out = self.run(
            "info",
            &[
                "info".as_ref(),
                "--output-format=json".as_ref(),
                bundle.as_os_str(),
            ],
            self.query_timeout,
        )?;
        parse_info(&out).map_err(|e| InstallerError::Output {
            command: self.command.display().to_string(),
            verb: "info",
            reason: e.reason,
        })
    }

    fn install(&self, bundle: &Path) -> Result<(), InstallerError> {
        self.run(
            "install",
            &["install".as_ref(), bundle.as_os_str()],
            self.install_timeout,
        )
        .map(drop)
    }

    fn status(&self) -> Result<InstallerStatus, InstallerError> {
        let out = self.run(
            "status",
            &["status".as_ref(), "--output-format=json".as_ref()],
            self.query_timeout,
        )?;
        parse_status(&out).map_err(|e| InstallerError::Output {
            command: self.command.display().to_string(),
            verb: "status",
            reason: e.reason,
        })
    }

    fn mark_good(&self) -> Result<(), InstallerError> {
        self.run(
            "mark-good",
            &["status".as_ref(), "mark-good".as_ref(), "booted".as_ref()],
            self.query_timeout,
        )
        .map(drop)
    }
}

/// The software twin: two slots `system0`/`system1`, a boot-next and a boot order like
/// RAUC's `efi` backend, bundles described by what the test says they contain.
#[derive(Debug, Clone, Default)]
pub struct FakeInstaller {
    inner: Arc<Mutex<FakeState>>,
}

/// The twin's state (shared by clones, so a test can "reboot" it).
#[derive(Debug, Clone, Default)]
pub struct FakeState {
    pub booted: String,
    /// Boot names in boot order (good slots).
    pub boot_order: Vec<String>,
    pub boot_next: Option<String>,
    /// What `info` answers per bundle file content hash; `None`: a bad signature.
    pub info: Option<BundleInfo>,
    /// `install` fails with this refusal code (pre-install refusal).
    pub refuse_install: Option<String>,
    /// Slot contents: boot name -> version written.
    pub slots: BTreeMap<String, String>,
    pub installs: u32,
    pub mark_goods: u32,
}

impl FakeInstaller {
    /// Booted from `system0`, which holds `version`; `system1` empty and not in the order.
    pub fn new(version: &str) -> FakeInstaller {
        let mut state = FakeState {
            booted: "system0".into(),
            boot_order: vec!["system0".into()],
            ..FakeState::default()
        };
        state.slots.insert("system0".into(), version.into());
        FakeInstaller {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A reboot as UEFI does it: `BootNext` once, else the first of the boot order.
    pub fn reboot(&self) {
        self.with(|s| {
            let next = s
                .boot_next
                .take()
                .or_else(|| s.boot_order.first().cloned())
                .unwrap_or_else(|| "system0".into());
            s.booted = next;
        });
    }

    /// The version of the booted slot.
    pub fn booted_version(&self) -> Option<String> {
        self.with(|s| s.slots.get(&s.booted).cloned())
    }
}

impl Installer for FakeInstaller {
    fn info(&self, _bundle: &Path) -> Result<BundleInfo, InstallerError> {
        self.with(|s| s.info.clone()).ok_or(InstallerError::Failed {
            command: "rauc".into(),
            verb: "info",
            status: "exit status: 1".into(),
            message: "signature verification failed".into(),
        })
    }

    fn install(&self, _bundle: &Path) -> Result<(), InstallerError> {
        self.with(|s| {
            if let Some(code) = &s.refuse_install {
                return Err(InstallerError::Refused { code: code.clone() });
            }
            let info = s.info.clone().ok_or(InstallerError::Failed {
                command: "rauc".into(),
                verb: "install",
                status: "exit status: 1".into(),
                message: "signature verification failed".into(),
            })?;
            let target = if s.booted == "system0" {
                "system1"
            } else {
                "system0"
            }
            .to_owned();
            s.boot_order.retain(|b| *b != target);
            s.slots.insert(target.clone(), info.version);
            s.boot_next = Some(target);
            s.installs += 1;
            Ok(())
        })
    }

    fn status(&self) -> Result<InstallerStatus, InstallerError> {
        Ok(self.with(|s| InstallerStatus {
            compatible: "clinic-gateway-x86_64".into(),
            booted: Some(s.booted.clone()),
            primary: s.boot_order.first().cloned(),
            slots: ["system0", "system1"]
                .iter()
                .map(|b| SlotInfo {
                    name: if *b == "system0" {
                        "rootfs.0"
                    } else {
                        "rootfs.1"
                    }
                    .to_owned(),
                    bootname: Some((*b).to_owned()),
                    boot_good: Some(s.boot_order.iter().any(|o| o == b)),
                })
                .collect(),
        }))
    }

    fn mark_good(&self) -> Result<(), InstallerError> {
        self.with(|s| {
            let booted = s.booted.clone();
            s.boot_order.retain(|b| *b != booted);
            s.boot_order.insert(0, booted);
            s.mark_goods += 1;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rauc_json_of_info_and_status_parses() {
        let info = parse_info(
            r#"{"compatible":"clinic-gateway-x86_64","version":"7","description":null,"build":null,"hooks":[],"images":[{"rootfs":{"variant":null,"filename":"root.ext4","checksum":"ab","size":1,"hooks":["post-install"],"adaptive":[]}}]}"#,
        )
        .unwrap();
        assert_eq!(info.version, "7");
        let status = parse_status(
            r#"{"compatible":"clinic-gateway-x86_64","variant":"","booted":"system0","boot_primary":"rootfs.0","slots":[{"efi.0":{"class":"efi","device":"/dev/vda1","type":"vfat","bootname":null,"state":"active","parent":"rootfs.0","mountpoint":null,"boot_status":null}},{"rootfs.0":{"class":"rootfs","device":"/dev/vda3","type":"raw","bootname":"system0","state":"booted","parent":null,"mountpoint":null,"boot_status":"good"}},{"rootfs.1":{"class":"rootfs","device":"/dev/vda4","type":"raw","bootname":"system1","state":"inactive","parent":null,"mountpoint":null,"boot_status":"bad"}}]}"#,
        )
        .unwrap();
        assert_eq!(status.booted.as_deref(), Some("system0"));
        assert_eq!(status.primary.as_deref(), Some("rootfs.0"));
        assert_eq!(status.is_good("system0"), Some(true));
        assert_eq!(status.is_good("system1"), Some(false));
        assert_eq!(status.other_bootname().as_deref(), Some("system1"));
        assert!(parse_info("not json").is_err());
        assert!(parse_info("{}").is_err());
    }

    #[test]
    fn refusal_marker_is_found_in_rauc_output() {
        assert_eq!(
            refusal_code(
                "rauc: handler failed\ngatewayd-update-refused: downgrade (version 3 < floor 4)"
            )
            .as_deref(),
            Some("downgrade")
        );
        assert_eq!(refusal_code("nothing here"), None);
        assert_eq!(refusal_code("gatewayd-update-refused: "), None);
        // What `rauc install` really prints when the handler refuses (RAUC 1.8 through its
        // service; hw-tests/test_update_bundle.py sees it with the real rauc).
        for (n, code) in PRE_INSTALL_EXIT_CODES {
            let out = format!(
                "rauc-Message: installing\nLastError: Failed to check bundle: Pre-install handler error: Child process exited with code {n}\nInstalling `/b` failed"
            );
            assert_eq!(refusal_code(&out).as_deref(), Some(code));
            assert_eq!(pre_install_exit_code(code), n);
        }
        assert_eq!(pre_install_exit_code("anything else"), 13);
        let unknown = "Pre-install handler error: Child process exited with code 1";
        assert_eq!(refusal_code(unknown), None);
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("rauc");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn rauc_cli_runs_the_command_and_reads_failures_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let ok = RaucCli::new(script(
            dir.path(),
            r#"[ "$1 $2" = "info --output-format=json" ] && echo '{"compatible":"c","version":"9"}' && exit 0; exit 3"#,
        ));
        assert_eq!(ok.info(Path::new("/b")).unwrap().version, "9");
        assert!(matches!(
            ok.install(Path::new("/b")),
            Err(InstallerError::Failed { .. })
        ));
        let failing = RaucCli::new(script(
            dir.path(),
            "echo 'rauc-Message: 20:11:13.848: Reading bundle: /data/update/bundle.raucb' >&2; echo 'signature verification failed: Verify error: self-signed certificate' >&2; exit 1",
        ));
        assert_eq!(
            failing.info(Path::new("/b")).unwrap_err().to_string(),
            "rauc info failed (exit status: 1): signature verification failed: Verify error: self-signed certificate"
        );
        let refused = RaucCli::new(script(
            dir.path(),
            "echo 'gatewayd-update-refused: data-format' >&2; exit 1",
        ));
        assert_eq!(
            refused.install(Path::new("/b")).unwrap_err(),
            InstallerError::Refused {
                code: "data-format".into()
            }
        );
        let mut slow = RaucCli::new(script(dir.path(), "sleep 10"));
        slow.query_timeout = Duration::from_millis(300);
        let started = Instant::now();
        assert!(matches!(slow.status(), Err(InstallerError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(5));
        let missing = RaucCli::new(dir.path().join("no-such-rauc"));
        assert!(matches!(
            missing.status(),
            Err(InstallerError::Spawn { .. })
        ));
    }
}
