//! The command line of `gatewayd` (the contract in DESIGN.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gatewayd", version, about = "Clinic edge gateway daemon")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every configured service until SIGTERM/SIGINT, then drain and exit 0.
    Run(RunArgs),
    /// Validate a config file: exit 0, or one line per problem naming the key.
    CheckConfig(ConfigArg),
    /// Inspect the spool (works while `run` is running).
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// Manage the key store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage kiosk staff accounts (each change is written to the audit trail).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Patient identity matching (名寄せ) from the command line: no daemon needed.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Safety warnings before an exam: contrast reactions and CT dose.
    #[command(subcommand)]
    Safety(SafetyCommand),
    /// De-identification (PS3.15 Annex E) per destination.
    #[command(subcommand)]
    Deid(DeidCommand),
    /// Signed A/B firmware updates (the fleet `update` command's box side).
    #[command(subcommand)]
    Update(UpdateCommand),
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// On a trial boot of a new firmware: wait (bounded) until gatewayd is READY, the spool
    /// verifies and the fleet broker was reached in this boot, then mark the slot good and
    /// raise the version floor; exit 1 when that does not happen in time (the unit's
    /// FailureAction then reboots into the old slot). On any other boot: exit 0, nothing done.
    HealthCheck {
        #[arg(long)]
        config: PathBuf,
        /// Seconds (default `update.health_timeout`).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// RAUC's pre-install handler (env RAUC_BUNDLE_MOUNT_POINT, RAUC_MF_VERSION): refuses a
    /// bundle below the version floor or whose firmware cannot read this box's data format.
    PreInstall {
        #[arg(long, default_value = "/var/lib/gatewayd/config/gatewayd.toml")]
        config: PathBuf,
    },
    /// Print the update in progress (or the last one) as JSON.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeidCommand {
    /// Print the real study (Study Instance UID, Patient ID, issuer) or patient behind a
    /// destination's pseudonym, as JSON; exit 1 when the pseudonym is unknown. Asks the
    /// running gateway, or reads the sealed map itself when none runs. Audited.
    Reidentify {
        #[arg(long)]
        config: PathBuf,
        /// The `[[uplink]]` the pseudonym was sent to.
        #[arg(long)]
        destination: String,
        /// A pseudonymous Study Instance UID.
        #[arg(long, conflicts_with = "patient", required_unless_present = "patient")]
        study: Option<String>,
        /// A pseudonymous Patient ID.
        #[arg(long)]
        patient: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SafetyCommand {
    /// Print what the dose report reader finds in DICOM Part 10 files (no daemon): one JSON
    /// object per file, never patient name, id or birth date. Exit 1 when any file could not
    /// be read or is a malformed dose report.
    ReadRdsr {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print one person's safety record (contrast reactions, CT dose events and the window's
    /// total) as JSON, asked of the running core gateway by the person's opaque reference
    /// (`person:{id}`, as the audit trail and the kiosk's lookups name it). Audited.
    Show {
        #[arg(long)]
        config: PathBuf,
        /// `person:{id}`.
        #[arg(long)]
        patient: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Compare record pairs (JSON lines {"pair_id","a","b"}); prints one JSON line per pair
    /// ({"pair_id","decision","score"}) in input order. A bad line is reported on stderr by
    /// its number, the good ones are still printed, and the exit status is then 1.
    Match {
        #[arg(long)]
        pairs: PathBuf,
        /// A gatewayd config: its `[identity] model`, when set and `--model` is not given.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Parameters learnt with `identity learn` (default: `--config`'s `[identity] model`,
        /// else the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Learn the model by EM from a registry's records (JSON lines) and write it.
    Learn {
        #[arg(long)]
        records: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmark: load records into the blocking index, then time each query's match;
    /// prints one JSON report.
    Search {
        #[arg(long)]
        records: PathBuf,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
        /// Learn the model from the records first (timed as learn_ms).
        #[arg(long)]
        learn: bool,
        /// Compare each query with every record (no index).
        #[arg(long)]
        brute_force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Add an account; its password is read from the first line of standard input.
    Add {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        /// clerk, physician or admin.
        #[arg(long)]
        role: String,
    },
    /// Invite an account (no password, no second factor yet) and print its one-time
    /// enrolment code once: the person completes the account at the kiosk's enrolment page
    /// (`/#enrol`). The same flow as the fleet op `staff-invite`.
    Invite {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        /// clerk, physician or admin.
        #[arg(long)]
        role: String,
        /// Print JSON (name, role, code, expires_at) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a new TOTP secret for an account and print it once (base32 and otpauth URI).
    EnrollTotp {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Disable an account.
    Disable {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List accounts (no secrets).
    List {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record's MAC, order and link, and that none is missing at the end;
    /// exit 0 if intact, 1 naming the first damaged record.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the records after a chain position as audit messages, one per line: with
    /// `--format a5`, each as the RFC 5424 syslog message (DICOM PS3.15 A.5 audit message,
    /// `[meta sequenceId]` = chain position) that the audit export sends. The output holds
    /// the Patient ID and Study UID of DICOM transfers (opened from their sealed part).
    Export {
        #[arg(long)]
        config: PathBuf,
        /// The output form (only `a5`).
        #[arg(long, value_enum)]
        format: AuditFormat,
        /// Print records after this chain position (0: all).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

/// `gatewayd audit export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    /// DICOM PS3.15 A.5 audit messages in RFC 5424 syslog messages.
    A5,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file; without it, the embedded development default
    /// (config/gatewayd.dev.toml: software key store, data under ./gatewayd-data,
    /// DICOM on 127.0.0.1:11112, admin on 127.0.0.1:9464).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Counts by state and destination, bytes, oldest age.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that index and blobs agree and every blob unseals; exit 1 otherwise.
    Verify {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Requeue dead letters (objects a destination refused) for another upload attempt.
    Retry {
        #[arg(long)]
        config: PathBuf,
        /// Only this uplink's dead letters (default: every destination's).
        #[arg(long)]
        destination: Option<String>,
    },
    /// Write a stored object back out: a DICOM Part 10 file, or an HL7 message's original
    /// bytes.
    Export {
        #[arg(long)]
        config: PathBuf,
        #[arg(
            long,
            required_unless_present = "hl7_message",
            conflicts_with = "hl7_message"
        )]
        sop_instance_uid: Option<String>,
        /// An HL7 message, as `SENDING_APP|SENDING_FACILITY|MSH-10` (MSH-3, MSH-4 and
        /// MSH-10 exactly as sent).
        #[arg(long)]
        hl7_message: Option<String>,
        /// Destination file (created with mode 0600: it holds patient data).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the keys of a new box.
    Init(ConfigArg),
    /// Show whether keys exist and their fingerprints.
    Status(ConfigArg),
    /// Print a PKCS#10 CSR for the device identity key.
    Csr(ConfigArg),
    /// Store the certificate issued for the device identity (PEM, leaf first).
    InstallCert {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        cert: PathBuf,
    },
    /// Prove the box can authenticate: mutual-TLS handshake and one GET with the device
    /// identity and its installed certificate; prints the HTTP status line.
    CheckTls {
        #[arg(long)]
        config: PathBuf,
        /// https://host:port/path
        #[arg(long)]
        url: String,
        /// CA certificates (PEM) the server is verified against.
        #[arg(long)]
        ca_file: PathBuf,
    },
    /// Print this gateway's exchange public key (X25519, base64): what its peers put in
    /// `[[exchange.peers]] public_key`.
    ExchangePublic(ConfigArg),
    /// Crypto-shred: destroy the keys; every sealed object becomes unreadable.
    Wipe(WipeArgs),
}

#[derive(Debug, Args)]
pub struct WipeArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Confirm that every stored object is to become unreadable.
    #[arg(long)]
    pub yes: bool,
}
