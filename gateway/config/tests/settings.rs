//! Behaviour of `Settings::from_toml_str` / `Settings::load` as `gatewayd check-config`
//! sees it: defaults, structural errors with key paths, problems collected in one pass,
//! cross-field rules and the production-mode refusals.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;

use gateway_config::{
    AeTitle, ByteSize, Charset, ClientAuth, ConfigErrors, Duration, KeystoreBackend, Mode, Role,
    Settings, Tcti, UplinkKind,
};

const NODE_DEV: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"development\"\n";
const NODE_PROD: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"production\"\n";
const NODE_CORE: &str =
    "[node]\nid = \"t\"\nrole = \"core\"\ndata_dir = \"d\"\nmode = \"development\"\n";

fn ok(text: &str) -> Settings {
    Settings::from_toml_str(text).unwrap_or_else(|e| panic!("should parse, got:\n{e}"))
}

/// The `key: message` lines of a rejected config.
fn lines(text: &str) -> Vec<String> {
    match Settings::from_toml_str(text) {
        Ok(s) => panic!("should be rejected, parsed to {s:?}"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

fn keys(text: &str) -> Vec<String> {
    match Settings::from_toml_str(text) {
        Ok(s) => panic!("should be rejected, parsed to {s:?}"),
        Err(e) => e.problems.into_iter().map(|p| p.key).collect(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn minimal_file_gets_defaults_and_production_mode() {
    let s = ok("[node]\nid = \"clinic-001\"\ndata_dir = \"/var/lib/gatewayd\"\n");
    assert_eq!(s.node.id.as_str(), "clinic-001");
    assert_eq!(s.node.role, Role::Clinic);
    assert_eq!(s.node.mode, Mode::Production);
    assert_eq!(s.node.data_dir, PathBuf::from("/var/lib/gatewayd"));
    assert_eq!(s.spool.max_bytes, ByteSize::gib(20));
    assert_eq!(s.spool.min_free_bytes, ByteSize::gib(1));
    assert_eq!(s.spool.index_cache_bytes, ByteSize::mib(8));
    assert_eq!(
        s.spool.dedupe_window.get(),
        std::time::Duration::from_secs(7 * 24 * 3600)
    );
    assert_eq!(s.keystore.backend, KeystoreBackend::Tpm);
    assert_eq!(s.keystore.tcti, Tcti::Device(PathBuf::from("/dev/tpmrm0")));
    assert!(s.dicom.is_none() && s.hl7.is_none() && s.fleet.is_none());
    assert!(s.admin.is_none() && s.booking.is_none() && s.uplinks.is_empty());
}

#[test]
fn empty_sections_get_their_defaults() {
    let text = format!(
        "{NODE_DEV}[dicom]\n[hl7]\n[spool]\n[keystore]\n[admin]\n[booking]\n\
         [[uplink]]\nname = \"a\"\nurl = \"https://x\"\nca_file = \"ca.pem\"\n"
    );
    let s = ok(&text);
    let dicom = s.dicom.unwrap();
    assert_eq!(dicom.listen, addr("0.0.0.0:11112"));
    assert_eq!(dicom.ae_title, "GATEWAY".parse::<AeTitle>().unwrap());
    assert_eq!(dicom.max_associations, 32);
    assert_eq!(dicom.max_associations_per_peer, 8);
    assert_eq!(dicom.max_pdu_length, ByteSize::kib(256));
    assert_eq!(dicom.artim_timeout, Duration::from_secs(30));
    assert_eq!(dicom.idle_timeout, Duration::from_secs(300));
    assert_eq!(dicom.shutdown_grace, Duration::from_secs(30));
    assert!(dicom.peers.is_empty());
    let hl7 = s.hl7.unwrap();
    assert_eq!(hl7.listen, addr("0.0.0.0:2575"));
    assert_eq!(hl7.charset, Charset::Auto);
    assert_eq!(s.spool.max_bytes.to_string(), "20GiB");
    assert_eq!(s.keystore.backend, KeystoreBackend::Tpm);
    assert_eq!(s.keystore.tcti.to_string(), "device:/dev/tpmrm0");
    assert_eq!(s.admin.unwrap().listen, addr("127.0.0.1:9464"));
    assert_eq!(s.booking.unwrap().listen, addr("0.0.0.0:8443"));
    let up = &s.uplinks[0];
    assert_eq!(up.kind, UplinkKind::DicomWeb);
    assert_eq!(up.client_auth, ClientAuth::Keystore);
    assert_eq!(up.ca_file.as_deref(), Some(std::path::Path::new("ca.pem")));
    assert!(up.cert_file.is_none() && up.key_file.is_none());
    assert_eq!((up.max_bytes_per_sec, up.batch_max_instances), (None, 16));
}

#[test]
fn every_typed_field_is_parsed() {
    let text = "[node]\nid = \"core-1\"\nrole = \"core\"\ndata_dir = \"./data\"\nmode = \"development\"\n\
         [dicom]\nlisten = \"[::]:104\"\nae_title = \" CORE \"\nmax_associations = 4\n\
         max_associations_per_peer = 2\nmax_pdu_length = \"16MiB\"\nartim_timeout = \"500ms\"\n\
         idle_timeout = \"5m\"\nshutdown_grace = \"0s\"\n\
         [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"192.168.10.21\"\nmax_associations = 1\n\
         [[dicom.peers]]\nae_title = \"MR01\"\nhost = \"fe80::1\"\n\
         [hl7]\ncharset = \"iso-2022-jp\"\n\
         [spool]\nmax_bytes = \"100 GB\"\nmin_free_bytes = \"1048576\"\n\
         index_cache_bytes = \"2MiB\"\ndedupe_window = \"24h\"\n\
         [keystore]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n\
         [[uplink]]\nname = \"dev\"\nurl = \"http://127.0.0.1:8042/dicom-web\"\nclient_auth = \"files\"\n\
         cert_file = \"c.pem\"\nkey_file = \"k.pem\"\nca_file = \"ca.pem\"\n\
         [fleet]\nbroker = \"mqtt://127.0.0.1:1883\"\nvendor_public_key = \"v.pub\"\n";
    let s = ok(text);
    assert_eq!(s.node.role, Role::Core);
    assert_eq!(s.node.data_dir, PathBuf::from("./data"));
    let d = s.dicom.unwrap();
    assert_eq!(d.listen, addr("[::]:104"));
    assert_eq!(d.ae_title.as_str(), "CORE");
    assert_eq!(d.max_pdu_length.bytes(), 16 << 20);
    assert_eq!(d.artim_timeout.get(), std::time::Duration::from_millis(500));
    assert_eq!(d.peers.len(), 2);
    assert_eq!(d.peers[0].max_associations, Some(1));
    assert_eq!(d.peers[1].host.to_string(), "fe80::1");
    assert_eq!(s.hl7.unwrap().charset, Charset::Iso2022Jp);
    assert_eq!(s.spool.max_bytes.bytes(), 100_000_000_000);
    assert_eq!(s.spool.min_free_bytes.bytes(), 1 << 20);
    assert_eq!(s.spool.index_cache_bytes.bytes(), 2 << 20);
    assert_eq!(
        s.spool.dedupe_window.get(),
        std::time::Duration::from_secs(24 * 3600)
    );
    assert_eq!(
        s.keystore.tcti,
        Tcti::Swtpm {
            host: "127.0.0.1".into(),
            port: 2321
        }
    );
    assert_eq!(s.uplinks[0].cert_file, Some(PathBuf::from("c.pem")));
    assert!(s.fleet.unwrap().broker.is_plaintext());
}

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let l = lines(&format!("{NODE_DEV}[dicom]\nfoo = 1\n"));
    assert_eq!(l.len(), 1, "{l:?}");
    assert!(l[0].starts_with("dicom.foo: unknown key"), "{l:?}");
    let l = lines(&format!(
        "{NODE_DEV}[[dicom.peers]]\nae_title = \"A\"\nhost = \"10.0.0.1\"\nport = 1\n"
    ));
    assert!(
        l[0].starts_with("dicom.peers[0].port: unknown key"),
        "{l:?}"
    );
    let l = lines(&format!("{NODE_DEV}[dicmo]\n"));
    assert!(l[0].starts_with("dicmo: unknown key"), "{l:?}");
}

#[test]
fn wrong_type_is_rejected_with_its_path() {
    let l = lines(&format!("{NODE_DEV}[dicom]\nmax_associations = \"x\"\n"));
    assert_eq!(
        l,
        ["dicom.max_associations: invalid type: string \"x\", expected u32"]
    );
    let l = lines(&format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://x\"\nca_file = \"ca.pem\"\n[[uplink]]\nname = 5\nurl = \"https://y\"\nca_file = \"ca.pem\"\n"
    ));
    assert!(l[0].starts_with("uplink[1].name: invalid type"), "{l:?}");
}

#[test]
fn missing_required_key_is_named() {
    assert_eq!(
        lines("[node]\nid = \"x\"\n"),
        ["node.data_dir: missing required key"]
    );
    assert_eq!(lines(""), ["node: missing required key"]);
    let l = lines(&format!("{NODE_DEV}[fleet]\nbroker = \"mqtts://b\"\n"));
    assert_eq!(l, ["fleet.vendor_public_key: missing required key"]);
}

#[test]
fn toml_syntax_error_is_one_problem_with_line_and_column() {
    let errors = Settings::from_toml_str("[node]\nid = \"x\"\ndata_dir = \n").unwrap_err();
    assert_eq!(errors.problems.len(), 1);
    let p = &errors.problems[0];
    assert_eq!(p.key, "config");
    assert!(p.message.contains("line 3, column"), "{p}");
}

#[test]
fn semantic_problems_are_all_collected_in_one_pass() {
    let text = format!("{NODE_DEV}[dicom]\nlisten = \"x\"\n[spool]\nmax_bytes = \"20 gigs\"\n");
    let errors = Settings::from_toml_str(&text).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "dicom.listen: invalid socket address \"x\" (use e.g. \"0.0.0.0:11112\" or \"[::1]:11112\")\n\
         spool.max_bytes: invalid size \"20 gigs\" (use e.g. \"20GiB\" or a byte count)"
    );

    let text = "[node]\nid = \"bad id\"\nrole = \"x\"\ndata_dir = \"\"\nmode = \"development\"\n\
        [dicom]\nae_title = \"\"\nmax_pdu_length = \"1KiB\"\nartim_timeout = \"30\"\n\
        [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"ct01.local\"\n\
        [hl7]\nlisten = \"0.0.0.0\"\ncharset = \"sjis\"\n\
        [keystore]\nbackend = \"hsm\"\ntcti = \"tpm0\"\n\
        [[uplink]]\nname = \"A\"\nurl = \"ftp://x\"\n\
        [fleet]\nbroker = \"https://b\"\nvendor_public_key = \"\"\n\
        [admin]\nlisten = \"localhost:9464\"\n[booking]\nlisten = \"\"\n";
    assert_eq!(
        keys(text),
        [
            "node.id",
            "node.role",
            "node.data_dir",
            "dicom.ae_title",
            "dicom.max_pdu_length",
            "dicom.artim_timeout",
            "dicom.peers[0].host",
            "hl7.listen",
            "hl7.charset",
            "keystore.backend",
            "keystore.tcti",
            "uplink[0].name",
            "uplink[0].url",
            "fleet.broker",
            "fleet.vendor_public_key",
            "admin.listen",
            "booking.listen",
        ]
    );
}

#[test]
fn a_file_without_node_still_names_every_problem_of_every_section() {
    let l = lines("[dicom]\nlisten = \"nonsense\"\n");
    assert_eq!(
        l,
        [
            "node: missing required key",
            "dicom.listen: invalid socket address \"nonsense\" (use e.g. \"0.0.0.0:11112\" or \"[::1]:11112\")",
        ]
    );
    let text = "[dicom]\nlisten = \"nonsense\"\nartim_timeout = \"soon\"\n\
        [hl7]\ncharset = \"sjis\"\n[spool]\nmax_bytes = \"lots\"\n\
        [[uplink]]\nname = \"a\"\nurl = \"ftp://x\"\n[admin]\nlisten = \"localhost\"\n";
    assert_eq!(
        keys(text),
        [
            "node",
            "dicom.listen",
            "dicom.artim_timeout",
            "hl7.charset",
            "spool.max_bytes",
            "uplink[0].url",
            "admin.listen",
        ]
    );
}

#[test]
fn config_errors_display_is_one_line_per_problem() {
    let text =
        format!("{NODE_DEV}[hl7]\nlisten = \"a\"\ncharset = \"b\"\n[admin]\nlisten = \"c\"\n");
    let errors: ConfigErrors = Settings::from_toml_str(&text).unwrap_err();
    let shown = errors.to_string();
    assert_eq!(shown.lines().count(), 3, "{shown}");
    for (line, problem) in shown.lines().zip(&errors.problems) {
        assert_eq!(line, format!("{}: {}", problem.key, problem.message));
    }
    assert!(!shown.ends_with('\n'));
}

#[test]
fn messages_quote_only_the_offending_value() {
    let secret_neighbour = "do-not-echo-me";
    let text = format!(
        "{NODE_DEV}[dicom]\nlisten = \"x\"\nae_title = \"{secret_neighbour}\"\n[spool]\nmax_bytes = \"{}\"\n",
        "9".repeat(5000)
    );
    let shown = Settings::from_toml_str(&text).unwrap_err().to_string();
    assert!(!shown.contains(secret_neighbour), "{shown}");
    assert!(!shown.contains("[node]"), "{shown}");
    assert!(
        shown.len() < 1000,
        "long values are clipped: {} bytes",
        shown.len()
    );
}

#[test]
fn uplink_url_credentials_are_refused_without_echo() {
    let l = lines(&format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://u:hunter2@dc.example.jp/\"\nca_file = \"ca.pem\"\n"
    ));
    assert_eq!(l.len(), 1);
    assert!(l[0].starts_with("uplink[0].url: credentials"), "{l:?}");
    assert!(!l[0].contains("hunter2"));
}

#[test]
fn duplicate_uplink_names_are_keyed_by_the_later_index() {
    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"cloud\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"other\"\nurl = \"https://b\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"cloud\"\nurl = \"https://c\"\nca_file = \"ca.pem\"\n"
    );
    assert_eq!(
        lines(&text),
        ["uplink[2].name: duplicate uplink name \"cloud\" (already uplink[0])"]
    );
}

#[test]
fn files_client_auth_needs_cert_and_key_and_keystore_auth_takes_neither() {
    let l = lines(&format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\nclient_auth = \"files\"\ncert_file = \"c.pem\"\n"
    ));
    assert_eq!(
        l,
        ["uplink[0].key_file: is required when client_auth = \"files\""]
    );
    let k = keys(&format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n"
    ));
    assert_eq!(k, ["uplink[0].cert_file", "uplink[0].key_file"]);
}

#[test]
fn per_peer_limit_above_total_is_a_problem() {
    let l = lines(&format!(
        "{NODE_DEV}[dicom]\nmax_associations = 4\nmax_associations_per_peer = 5\n"
    ));
    assert_eq!(
        l,
        ["dicom.max_associations_per_peer: 5 is more than dicom.max_associations (4)"]
    );
    let k = keys(&format!(
        "{NODE_DEV}[dicom]\nmax_associations = 0\nmax_associations_per_peer = 0\n\
         [[dicom.peers]]\nae_title = \"A\"\nhost = \"10.0.0.1\"\nmax_associations = 0\n"
    ));
    assert_eq!(
        k,
        [
            "dicom.max_associations",
            "dicom.max_associations_per_peer",
            "dicom.peers[0].max_associations"
        ]
    );
}

#[test]
fn duplicate_dicom_peer_is_a_problem() {
    let k = keys(&format!(
        "{NODE_DEV}[dicom]\n[[dicom.peers]]\nae_title = \"CT01\"\nhost = \"10.0.0.1\"\n\
         [[dicom.peers]]\nae_title = \" CT01\"\nhost = \"10.0.0.1\"\n"
    ));
    assert_eq!(k, ["dicom.peers[1]"]);
}

#[test]
fn spool_min_free_may_exceed_max() {
    let s = ok(&format!(
        "{NODE_DEV}[spool]\nmax_bytes = \"1GiB\"\nmin_free_bytes = \"2GiB\"\n"
    ));
    assert!(s.spool.min_free_bytes > s.spool.max_bytes);
}

#[test]
fn pdu_length_must_be_within_4096_and_16mib() {
    ok(&format!("{NODE_DEV}[dicom]\nmax_pdu_length = \"4096\"\n"));
    ok(&format!("{NODE_DEV}[dicom]\nmax_pdu_length = \"16MiB\"\n"));
    for bad in ["4095", "16777217", "1GiB"] {
        let l = lines(&format!("{NODE_DEV}[dicom]\nmax_pdu_length = \"{bad}\"\n"));
        assert_eq!(l.len(), 1);
        assert!(
            l[0].starts_with(&format!("dicom.max_pdu_length: \"{bad}\" is out of range")),
            "{l:?}"
        );
    }
}

#[test]
fn production_refuses_the_software_key_store() {
    let l = lines(&format!("{NODE_PROD}[keystore]\nbackend = \"software\"\n"));
    assert_eq!(
        l,
        ["keystore.backend: the software key store is refused in production mode (use \"tpm\")"]
    );
    ok(&format!("{NODE_DEV}[keystore]\nbackend = \"software\"\n"));
}

#[test]
fn production_is_the_default_mode_for_refusals() {
    let l = lines("[node]\nid = \"t\"\ndata_dir = \"d\"\n[keystore]\nbackend = \"software\"\n");
    assert_eq!(l.len(), 1);
    assert!(l[0].starts_with("keystore.backend:"));
}

#[test]
fn production_refuses_plaintext_http_uplinks() {
    let text = "[[uplink]]\nname = \"a\"\nurl = \"http://dc.example.jp/\"\n";
    assert_eq!(
        lines(&format!("{NODE_PROD}{text}")),
        ["uplink[0].url: plaintext (http://, mllp://) is refused in production mode"]
    );
    ok(&format!("{NODE_DEV}{text}"));
}

#[test]
fn production_refuses_files_client_auth() {
    let text = "[[uplink]]\nname = \"a\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\nclient_auth = \"files\"\n\
                cert_file = \"c\"\nkey_file = \"k\"\n";
    assert_eq!(
        keys(&format!("{NODE_PROD}{text}")),
        ["uplink[0].client_auth"]
    );
    ok(&format!("{NODE_DEV}{text}"));
}

#[test]
fn production_refuses_open_dicom_listener_without_peers() {
    let text = "[dicom]\nlisten = \"0.0.0.0:11112\"\n";
    assert_eq!(
        lines(&format!("{NODE_PROD}{text}")),
        [
            "dicom.peers: production mode needs an allow list of calling AE title + address for plain DIMSE on a non-loopback address"
        ]
    );
    ok(&format!("{NODE_DEV}{text}"));
    ok(&format!(
        "{NODE_PROD}[dicom]\nlisten = \"127.0.0.1:11112\"\n"
    ));
    ok(&format!(
        "{NODE_PROD}{text}[[dicom.peers]]\nae_title = \"CT01\"\nhost = \"192.168.10.21\"\n"
    ));
    // The default listen address is not loopback either.
    assert_eq!(keys(&format!("{NODE_PROD}[dicom]\n")), ["dicom.peers"]);
}

#[test]
fn production_refuses_non_loopback_admin() {
    let text = "[admin]\nlisten = \"0.0.0.0:9464\"\n";
    assert_eq!(keys(&format!("{NODE_PROD}{text}")), ["admin.listen"]);
    ok(&format!("{NODE_DEV}{text}"));
    ok(&format!("{NODE_PROD}[admin]\nlisten = \"[::1]:9464\"\n"));
}

#[test]
fn production_refuses_plaintext_mqtt_broker() {
    let text = "[fleet]\nbroker = \"mqtt://b:1883\"\nvendor_public_key = \"v.pub\"\n";
    let l = lines(&format!("{NODE_PROD}{text}"));
    assert_eq!(l.len(), 1);
    assert!(
        l[0].starts_with("fleet.broker: plaintext mqtt is refused in production mode"),
        "{l:?}"
    );
    ok(&format!("{NODE_DEV}{text}"));
}

#[test]
fn production_refusals_are_all_reported_together() {
    let text = format!(
        "{NODE_PROD}[dicom]\n[keystore]\nbackend = \"software\"\n\
         [[uplink]]\nname = \"a\"\nurl = \"http://a\"\nclient_auth = \"files\"\ncert_file = \"c\"\nkey_file = \"k\"\n\
         [fleet]\nbroker = \"mqtt://b\"\nvendor_public_key = \"v\"\n[admin]\nlisten = \"0.0.0.0:1\"\n"
    );
    assert_eq!(
        keys(&text),
        [
            "dicom.peers",
            "keystore.backend",
            "uplink[0].client_auth",
            "uplink[0].url",
            "fleet.broker",
            "admin.listen"
        ]
    );
}

#[test]
fn unparseable_mode_is_reported_without_guessing_refusals() {
    let l = lines(
        "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"prod\"\n[keystore]\nbackend = \"software\"\n",
    );
    assert_eq!(
        l,
        ["node.mode: unknown mode \"prod\" (use \"development\" or \"production\")"]
    );
}

#[test]
fn load_names_an_unreadable_path() {
    let path = std::path::Path::new("/nonexistent/gatewayd-test.toml");
    let errors = Settings::load(path).unwrap_err();
    assert_eq!(errors.problems.len(), 1);
    assert_eq!(errors.problems[0].key, "config");
    assert!(
        errors.problems[0]
            .message
            .contains("/nonexistent/gatewayd-test.toml"),
        "{errors}"
    );
}

#[test]
fn load_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("gateway-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g.toml");
    std::fs::write(&path, NODE_DEV).unwrap();
    let s = Settings::load(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(s.node.mode, Mode::Development);
}

#[test]
fn keystore_pcrs_and_software_tpm_override_are_parsed_and_checked() {
    let base = "[node]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\nmode = \"development\"\n";
    let s = Settings::from_toml_str(&format!(
        "{base}[keystore]\nbackend = \"tpm\"\npcrs = [7, 0]\nallow_software_tpm = true\n"
    ))
    .unwrap();
    assert_eq!(s.keystore.pcrs, vec![7, 0]);
    assert!(s.keystore.allow_software_tpm);
    let defaults = Settings::from_toml_str(base).unwrap();
    assert!(defaults.keystore.pcrs.is_empty());
    assert!(!defaults.keystore.allow_software_tpm);
    let err =
        Settings::from_toml_str(&format!("{base}[keystore]\npcrs = [7, 24, 7]\n")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("keystore.pcrs[1]: 24 is not a PCR index"),
        "{text}"
    );
    assert!(
        text.contains("keystore.pcrs[2]: PCR 7 is listed twice"),
        "{text}"
    );
}

#[test]
fn https_uplink_needs_a_ca_file_and_rate_and_batch_are_checked() {
    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://a\"\nmax_bytes_per_sec = \"2MiB\"\n\
         [[uplink]]\nname = \"b\"\nurl = \"https://b\"\nca_file = \"ca.pem\"\nbatch_max_instances = 0\n"
    );
    let err = Settings::from_toml_str(&text).unwrap_err().to_string();
    assert!(
        err.contains("uplink[0].ca_file: required for a TLS url"),
        "{err}"
    );
    assert!(
        err.contains("uplink[1].batch_max_instances: 0 is outside 1..=1000"),
        "{err}"
    );
    let ok = format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\nmax_bytes_per_sec = \"2MiB\"\n"
    );
    let s = Settings::from_toml_str(&ok).unwrap();
    assert_eq!(s.uplinks[0].max_bytes_per_sec, Some(ByteSize::mib(2)));
    assert_eq!(s.uplinks[0].batch_max_instances, 16);
}

#[test]
fn mllp_uplink_needs_host_port_matching_kind_and_no_plaintext_in_production() {
    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nkind = \"mllp-tls\"\nurl = \"https://a\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"b\"\nkind = \"mllp-tls\"\nurl = \"mllps://b\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"c\"\nurl = \"mllps://c:2575\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"d\"\nkind = \"mllp-tls\"\nurl = \"mllps://d:2575\"\n"
    );
    let err = Settings::from_toml_str(&text).unwrap_err().to_string();
    for want in [
        "uplink[0].url: kind = \"mllp-tls\" needs an mllps://host:port",
        "uplink[1].url: kind = \"mllp-tls\" needs an mllps://host:port",
        "uplink[2].url: kind = \"dicomweb\" needs an https://",
        "uplink[3].ca_file: required for a TLS url",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let ok = format!(
        "{NODE_DEV}[[uplink]]\nname = \"ris\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2576\"\n"
    );
    let s = Settings::from_toml_str(&ok).unwrap();
    assert_eq!(
        s.uplinks[0].url.host_port(),
        Some(("127.0.0.1".into(), 2576))
    );
    let prod = ok.replace("mode = \"development\"", "mode = \"production\"");
    assert_ne!(prod, ok, "NODE_DEV names development mode");
    let err = Settings::from_toml_str(&prod).unwrap_err().to_string();
    assert!(
        err.contains("uplink[0].url: plaintext (http://, mllp://) is refused in production mode"),
        "{err}"
    );
}

#[test]
fn syslog_uplink_takes_a_tls_url_a_ca_and_a_queue_cap_and_refuses_keys_it_does_not_use() {
    let s = ok(&format!(
        "{NODE_PROD}[[uplink]]\nname = \"arr\"\nkind = \"syslog-tls\"\nurl = \"syslog-tls://arr.example.jp\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"siem\"\nkind = \"syslog-tls\"\nurl = \"syslog-tls://10.0.0.9:16514\"\nca_file = \"ca.pem\"\nmax_queued = 50\n"
    ));
    assert_eq!(s.uplinks[0].kind, gateway_config::UplinkKind::SyslogTls);
    assert_eq!(
        s.uplinks[0].url.syslog_host_port(),
        Some(("arr.example.jp".into(), 6514))
    );
    assert_eq!(s.uplinks[0].max_queued, Some(100_000));
    assert_eq!(
        s.uplinks[1].url.syslog_host_port(),
        Some(("10.0.0.9".into(), 16514))
    );
    assert_eq!(s.uplinks[1].max_queued, Some(50));

    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"a\"\nkind = \"syslog-tls\"\nurl = \"syslog-tls://a\"\n\
         [[uplink]]\nname = \"b\"\nkind = \"syslog-tls\"\nurl = \"mllps://b:1\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"c\"\nkind = \"syslog-tls\"\nurl = \"syslog-tls://c\"\nca_file = \"ca.pem\"\n\
         deidentify = \"basic\"\nmessage_types = [\"ADT\"]\nbatch_max_instances = 4\nmax_queued = 0\n\
         [[uplink]]\nname = \"d\"\nurl = \"https://d\"\nca_file = \"ca.pem\"\nmax_queued = 5\n\
         [[uplink]]\nname = \"e\"\nkind = \"syslog-tls\"\nurl = \"syslog://e\"\nca_file = \"ca.pem\"\n\
         [[uplink]]\nname = \"f\"\nurl = \"syslog-tls://f\"\nca_file = \"ca.pem\"\n"
    );
    let err = Settings::from_toml_str(&text).unwrap_err().to_string();
    for want in [
        "uplink[0].ca_file: required for a TLS url",
        "uplink[1].url: kind = \"syslog-tls\" needs a syslog-tls://host[:port] url",
        "uplink[2].deidentify: is not used by kind = \"syslog-tls\"",
        "uplink[2].message_types: is not used by kind = \"syslog-tls\"",
        "uplink[2].batch_max_instances: is not used by kind = \"syslog-tls\"",
        "uplink[2].max_queued: 0 is outside 1..=10000000",
        "uplink[3].max_queued: only an audit repository (kind = \"syslog-tls\") takes max_queued",
        "uplink[4].url: invalid url",
        "uplink[5].url: kind = \"dicomweb\" needs an https://",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn mllp_message_types_are_parsed_kept_in_order_and_absent_means_all() {
    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"ris\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2576\"\n\
         message_types = [\"OMG^O19\", \"ORM^O01\", \"ADT\"]\n\
         [[uplink]]\nname = \"all\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2577\"\n"
    );
    let s = ok(&text);
    let types: Vec<&str> = s.uplinks[0]
        .message_types
        .as_ref()
        .unwrap()
        .iter()
        .map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["OMG^O19", "ORM^O01", "ADT"]);
    assert_eq!(s.uplinks[1].message_types, None);
}

#[test]
fn every_message_types_problem_is_named_in_one_pass() {
    let mllp = |name: &str, types: &str| {
        format!(
            "[[uplink]]\nname = \"{name}\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2576\"\n\
             message_types = {types}\n"
        )
    };
    let text = format!(
        "{NODE_DEV}{}{}{}{}[[uplink]]\nname = \"pacs\"\nurl = \"http://127.0.0.1:8042\"\n\
         message_types = [\"ORU^R01\"]\n",
        mllp("a", "[]"),
        mllp(
            "b",
            "[\"oru^r01\", \"ORU^R1\", \"ORU^R01^ORU_R01\", \"ORU^\", \"ORUX\", \"\"]"
        ),
        mllp("c", "[\"ORU^R01\", \"DFT^P03\", \"ORU^R01\"]"),
        mllp("d", "[\"ADT\", \"ADT^A08\"]"),
    );
    let got = lines(&text);
    let want = [
        "uplink[0].message_types: must not be empty (remove the key for all message types)",
        "uplink[1].message_types[0]: invalid HL7 message type \"oru^r01\"",
        "uplink[1].message_types[1]: invalid HL7 message type \"ORU^R1\"",
        "uplink[1].message_types[2]: invalid HL7 message type \"ORU^R01^ORU_R01\"",
        "uplink[1].message_types[3]: invalid HL7 message type \"ORU^\"",
        "uplink[1].message_types[4]: invalid HL7 message type \"ORUX\"",
        "uplink[1].message_types[5]: invalid HL7 message type \"\"",
        "uplink[2].message_types[2]: duplicate message type \"ORU^R01\" (already uplink[2].message_types[0])",
        "uplink[4].message_types: only an HL7 destination (kind = \"mllp-tls\") takes message_types",
    ];
    for w in want {
        assert!(
            got.iter().any(|l| l.starts_with(w)),
            "missing {w:?} in:\n{got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
    // A code alone next to one of its events is not a duplicate: both are kept.
    assert!(!got.iter().any(|l| l.starts_with("uplink[3]")), "{got:#?}");
}

#[test]
fn deidentify_takes_the_basic_profile_and_table_e1_1_options() {
    let s = ok(&format!(
        "{NODE_DEV}[[uplink]]\nname = \"research\"\nurl = \"http://127.0.0.1:8042\"\n\
         deidentify = \"basic\"\n\
         deidentify_options = [\"retain_longitudinal_temporal_information_modified_dates\", \"clean_descriptors\"]\n\
         deidentify_burned_in = \"send\"\n\
         [[uplink]]\nname = \"cloud\"\nurl = \"http://127.0.0.1:8043\"\ndeidentify = \"none\"\n\
         [[uplink]]\nname = \"plain\"\nurl = \"http://127.0.0.1:8044\"\n"
    ));
    let d = s.uplinks[0].deidentify.as_ref().unwrap();
    assert_eq!(
        d.options,
        [
            gateway_deid::ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
            gateway_deid::ProfileOption::CleanDescriptors
        ]
    );
    assert!(d.send_burned_in);
    assert_eq!(s.uplinks[1].deidentify, None);
    assert_eq!(s.uplinks[2].deidentify, None);
}

#[test]
fn every_deidentify_problem_is_named() {
    let up = |name: &str, extra: &str| {
        format!("[[uplink]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:8042\"\n{extra}")
    };
    let text = format!(
        "{NODE_DEV}{}{}{}{}{}{}",
        up("a", "deidentify = \"full\"\n"),
        up(
            "b",
            "deidentify = \"basic\"\ndeidentify_options = [\"retain_everything\", \"retain_safe_private\", \"clean_graphics\", \"clean_graphics\"]\n"
        ),
        up("c", "deidentify_options = [\"retain_uids\"]\n"),
        up(
            "d",
            "deidentify = \"basic\"\ndeidentify_burned_in = \"maybe\"\n"
        ),
        up(
            "e",
            "deidentify = \"basic\"\ndeidentify_options = [\"retain_longitudinal_temporal_information_full_dates\", \"retain_longitudinal_temporal_information_modified_dates\"]\n"
        ),
        "[[uplink]]\nname = \"emr\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2576\"\ndeidentify = \"basic\"\n",
    );
    let got = lines(&text);
    let want = [
        "uplink[0].deidentify: \"full\" is not a de-identification profile",
        "uplink[1].deidentify_options[0]: unknown de-identification option \"retain_everything\"",
        "uplink[1].deidentify_options[1]: de-identification option retain_safe_private is not supported",
        "uplink[1].deidentify_options[3]: duplicate option \"clean_graphics\"",
        "uplink[2].deidentify_options: is only used with deidentify = \"basic\"",
        "uplink[3].deidentify_burned_in: must be \"hold\"",
        "uplink[4].deidentify_options: de-identification options retain_longitudinal_temporal_information_full_dates and",
        "uplink[5].deidentify: only a DICOM destination (kind = \"dicomweb\") is de-identified",
    ];
    for w in want {
        assert!(
            got.iter().any(|l| l.starts_with(w)),
            "missing {w:?} in:\n{got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[test]
fn results_are_not_pulled_from_a_de_identifying_uplink() {
    let text = format!(
        "{NODE_DEV}[[uplink]]\nname = \"cloud\"\nurl = \"http://127.0.0.1:1/dicom-web\"\n\
         deidentify = \"basic\"\n[booking]\n[results]\nsource = \"cloud\"\n"
    );
    let got = lines(&text);
    assert!(
        got.iter().any(
            |l| l.starts_with("results.source: must name an uplink with deidentify = \"none\"")
        ),
        "{got:#?}"
    );
}

#[test]
fn booking_schedules_need_three_fields_and_name_every_problem() {
    let s = ok(&format!(
        "{NODE_CORE}[booking]\n\
         [[booking.schedule]]\nid = \"ct-1\"\nmodality = \"CT\"\nstation_ae = \"CT01\"\n\
         [[booking.schedule]]\nid = \"mr-1\"\nmodality = \"MR\"\nstation_ae = \"MR01\"\n\
         slot_minutes = 45\ntime_zone = \"Asia/Tokyo\"\nholidays = [\"2027-01-01\"]\n\
         hours = {{ mon = \"08:30-12:00\", sat = \"09:00-11:00\" }}\n"
    ));
    let b = s.booking.unwrap();
    let ids: Vec<&str> = b.schedules.iter().map(|s| s.id()).collect();
    assert_eq!(ids, ["ct-1", "mr-1"]);
    assert_eq!(
        (b.schedules[0].time_zone(), b.schedules[0].slot_minutes()),
        ("Asia/Tokyo", 30)
    );
    assert_eq!(b.schedules[1].station_ae(), "MR01");

    let text = format!(
        "{NODE_CORE}[booking]\n\
         [[booking.schedule]]\nid = \"ct-1\"\nmodality = \"CT\"\nstation_ae = \"CT01\"\n\
         [[booking.schedule]]\nid = \"ct-1\"\nmodality = \"ct\"\nstation_ae = \"CT02\"\n\
         time_zone = \"Tokyo\"\nhours = {{ monday = \"9-5\" }}\n"
    );
    assert_eq!(
        keys(&text),
        [
            "booking.schedule[1].modality",
            "booking.schedule[1].time_zone",
            "booking.schedule[1].hours.monday",
        ]
    );
    let text = format!(
        "{NODE_CORE}[booking]\n\
         [[booking.schedule]]\nid = \"ct-1\"\nmodality = \"CT\"\nstation_ae = \"CT01\"\n\
         [[booking.schedule]]\nid = \"ct-1\"\nmodality = \"CT\"\nstation_ae = \"CT02\"\n"
    );
    assert_eq!(keys(&text), ["booking.schedule[1].id"]);
    // A missing required field or an unknown key is a structural error naming the path.
    let text =
        format!("{NODE_CORE}[booking]\n[[booking.schedule]]\nid = \"x\"\nmodality = \"CT\"\n");
    assert!(
        lines(&text)[0].contains("booking.schedule"),
        "{:?}",
        lines(&text)
    );
    let text = format!(
        "{NODE_CORE}[booking]\n[[booking.schedule]]\nid = \"x\"\nmodality = \"CT\"\nstation_ae = \"A\"\nroom = 1\n"
    );
    assert!(lines(&text)[0].contains("room"), "{:?}", lines(&text));
}

#[test]
fn fleet_tls_client_auth_and_telemetry_interval_are_parsed_and_checked() {
    let s = ok(&format!(
        "{NODE_DEV}[fleet]\nbroker = \"mqtts://b:8884\"\nvendor_public_key = \"v.pub\"\n\
         ca_file = \"ca.pem\"\nclient_auth = \"files\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
         telemetry_interval = \"5s\"\n"
    ));
    let fleet = s.fleet.unwrap();
    assert_eq!(fleet.broker.host_port(), Some(("b".into(), 8884)));
    assert_eq!(
        fleet.ca_file.as_deref(),
        Some(std::path::Path::new("ca.pem"))
    );
    assert_eq!(fleet.client_auth, gateway_config::ClientAuth::Files);
    assert_eq!(
        fleet.telemetry_interval.get(),
        std::time::Duration::from_secs(5)
    );

    let s = ok(&format!(
        "{NODE_DEV}[fleet]\nbroker = \"mqtt://127.0.0.1\"\nvendor_public_key = \"v.pub\"\n"
    ));
    let fleet = s.fleet.unwrap();
    assert_eq!(fleet.client_auth, gateway_config::ClientAuth::Keystore);
    assert_eq!(
        fleet.telemetry_interval.get(),
        std::time::Duration::from_secs(60)
    );

    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[fleet]\nbroker = \"mqtts://b\"\nvendor_public_key = \"v.pub\"\n\
             client_auth = \"files\"\ntelemetry_interval = \"500ms\"\n"
        )),
        [
            "fleet.ca_file",
            "fleet.cert_file",
            "fleet.key_file",
            "fleet.telemetry_interval"
        ]
    );
    assert_eq!(
        keys(&format!(
            "{NODE_PROD}[fleet]\nbroker = \"mqtts://b\"\nvendor_public_key = \"v.pub\"\n\
             ca_file = \"ca.pem\"\nclient_auth = \"files\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             telemetry_interval = \"25h\"\n[keystore]\nbackend = \"tpm\"\n"
        )),
        ["fleet.client_auth", "fleet.telemetry_interval"]
    );
    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[fleet]\nbroker = \"mqtt://b\"\nvendor_public_key = \"v.pub\"\n\
             cert_file = \"c.pem\"\n"
        )),
        ["fleet.cert_file"]
    );
}

#[test]
fn fleet_claim_credential_is_both_files_over_mqtts_with_the_keystore_identity() {
    let s = ok(&format!(
        "{NODE_DEV}[fleet]\nbroker = \"mqtts://b:8884\"\nvendor_public_key = \"v.pub\"\n\
         ca_file = \"ca.pem\"\nclaim_cert_file = \"claim.pem\"\nclaim_key_file = \"claim.key\"\n"
    ));
    assert_eq!(
        s.fleet.unwrap().claim,
        Some(gateway_config::Claim {
            cert_file: "claim.pem".into(),
            key_file: "claim.key".into(),
        })
    );
    let s = ok(&format!(
        "{NODE_DEV}[fleet]\nbroker = \"mqtts://b\"\nvendor_public_key = \"v.pub\"\nca_file = \"ca.pem\"\n"
    ));
    assert_eq!(s.fleet.unwrap().claim, None);

    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[fleet]\nbroker = \"mqtts://b\"\nvendor_public_key = \"v.pub\"\n\
             ca_file = \"ca.pem\"\nclaim_cert_file = \"claim.pem\"\n"
        )),
        ["fleet.claim_cert_file"]
    );
    // The claim obtains the key store identity's certificate: not with files, not in clear.
    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[fleet]\nbroker = \"mqtts://b\"\nvendor_public_key = \"v.pub\"\n\
             ca_file = \"ca.pem\"\nclient_auth = \"files\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             claim_cert_file = \"claim.pem\"\nclaim_key_file = \"claim.key\"\n"
        )),
        ["fleet.claim_cert_file"]
    );
    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[fleet]\nbroker = \"mqtt://b\"\nvendor_public_key = \"v.pub\"\n\
             claim_cert_file = \"claim.pem\"\nclaim_key_file = \"claim.key\"\n"
        )),
        ["fleet.claim_cert_file"]
    );
}

#[test]
fn booking_roles_tls_files_and_exchange_peers_are_checked() {
    const KEY: &str = "q0V8Ow0Tq2B4S2pc8fmyJ7Jx6yPqKkq3V0YfZ3Ql0Gg=";
    let clinic = format!(
        "{NODE_DEV}[booking]\ncore = \"core-1\"\nrequest_timeout = \"3s\"\nstale_after = \"5s\"\n\
         [exchange]\nbroker = \"mqtt://127.0.0.1:1883\"\n\
         [[exchange.peers]]\nid = \"core-1\"\npublic_key = \"{KEY}\"\n"
    );
    let s = ok(&clinic);
    let b = s.booking.unwrap();
    assert_eq!(b.core.as_deref(), Some("core-1"));
    assert_eq!(b.request_timeout.get(), std::time::Duration::from_secs(3));
    assert_eq!(b.stale_after.get(), std::time::Duration::from_secs(5));
    assert_eq!(b.tls_files, None);
    let x = s.exchange.unwrap();
    assert_eq!(x.peers[0].id, "core-1");
    assert_eq!(x.client_auth, gateway_config::ClientAuth::Keystore);

    // A clinic names a known core and needs the exchange for it; schedules are the core's.
    assert_eq!(
        keys(&format!("{NODE_DEV}[booking]\ncore = \"core-1\"\n")),
        ["exchange"]
    );
    assert_eq!(
        keys(&clinic.replace("core = \"core-1\"", "core = \"core-2\"")),
        ["booking.core"]
    );
    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[booking]\n[[booking.schedule]]\nid = \"ct-1\"\nmodality = \"CT\"\nstation_ae = \"CT01\"\n"
        )),
        ["booking.schedule"]
    );
    assert_eq!(
        keys(&format!("{NODE_CORE}[booking]\ncore = \"x\"\n")),
        ["booking.core"]
    );
    // Certificates: both or neither, required in production.
    assert_eq!(
        keys(&format!("{NODE_DEV}[booking]\ncert_file = \"c.pem\"\n")),
        ["booking.cert_file"]
    );
    assert!(keys(&format!("{NODE_PROD}[booking]\n")).contains(&"booking.cert_file".to_string()));
    let s = ok(&format!(
        "{NODE_DEV}[booking]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n"
    ));
    assert_eq!(
        s.booking.unwrap().tls_files,
        Some(("c.pem".into(), "k.pem".into()))
    );
    // Peers: ids and keys checked, no duplicates; the exchange's TLS like the fleet's.
    assert_eq!(
        keys(&format!(
            "{NODE_DEV}[exchange]\nbroker = \"mqtts://b\"\n\
             [[exchange.peers]]\nid = \"a/b\"\npublic_key = \"{KEY}\"\n\
             [[exchange.peers]]\nid = \"c\"\npublic_key = \"short\"\n\
             [[exchange.peers]]\nid = \"c\"\npublic_key = \"{KEY}\"\n"
        )),
        [
            "exchange.ca_file",
            "exchange.peers[0].id",
            "exchange.peers[1].public_key",
            "exchange.peers[2].id"
        ]
    );
}

const RESULTS_UPLINKS: &str = "[[uplink]]\nname = \"cloud\"\nurl = \"http://127.0.0.1:1/dicom-web\"\n\
     [[uplink]]\nname = \"emr\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2\"\n\
     message_types = [\"ORU^R01\"]\n[booking]\n";

#[test]
fn clinic_results_with_a_pacs_and_an_emr_parse_with_defaults() {
    let s = ok(&format!(
        "{NODE_DEV}{RESULTS_UPLINKS}[results]\nsource = \"cloud\"\n\
         [[results.deliver]]\nname = \"pacs\"\nkind = \"dicom\"\nhost = \"127.0.0.1\"\nport = 11112\n\
         called_ae = \"PACS\"\ncalling_ae = \"GATEWAY\"\n\
         [[results.deliver]]\nname = \"emr-reports\"\nkind = \"hl7\"\nuplink = \"emr\"\n"
    ));
    let r = s.results.unwrap();
    assert_eq!(r.source.as_str(), "cloud");
    assert!(r.rewrite_patient_id, "on by default");
    assert_eq!(r.patient_id_issuer, "t", "the node id by default");
    assert_eq!(r.complete_after, Duration::from_secs(600));
    assert_eq!(r.deliver.len(), 2);
    match &r.deliver[0] {
        gateway_config::Deliver::Dicom {
            name,
            host,
            port,
            called_ae,
            calling_ae,
            tls: None,
        } => {
            assert_eq!(
                (name.as_str(), host.as_str(), *port),
                ("pacs", "127.0.0.1", 11112)
            );
            assert_eq!(
                (called_ae.as_str(), calling_ae.as_str()),
                ("PACS", "GATEWAY")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&r.deliver[1],
        gateway_config::Deliver::Hl7 { uplink, .. } if uplink.as_str() == "emr"));
}

#[test]
fn every_results_problem_is_named_in_one_pass() {
    let got = lines(&format!(
        "{NODE_DEV}{RESULTS_UPLINKS}[results]\nsource = \"emr\"\npatient_id_issuer = \"A^B\"\n\
         complete_after = \"0s\"\n\
         [[results.deliver]]\nname = \"cloud\"\nkind = \"dicom\"\nport = 0\ncalled_ae = \"PACS\"\n\
         calling_ae = \"GW\"\n\
         [[results.deliver]]\nname = \"r\"\nkind = \"hl7\"\nuplink = \"cloud\"\nhost = \"x\"\n\
         [[results.deliver]]\nname = \"s\"\nkind = \"ftp\"\n"
    ));
    for want in [
        "results.source: must name a kind = \"dicomweb\" uplink",
        "results.patient_id_issuer:",
        "results.complete_after: must be greater than zero",
        "results.deliver[0].name:",
        "results.deliver[0].host: missing required key",
        "results.deliver[0].port:",
        "results.deliver[1].host: not a key of kind = \"hl7\"",
        "results.deliver[1].uplink: must name a kind = \"mllp-tls\" uplink",
        "results.deliver[2].kind:",
    ] {
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {got:#?}"
        );
    }
    // The core announces results; it delivers none.
    let core = keys(&format!(
        "{NODE_CORE}{RESULTS_UPLINKS}[results]\nsource = \"cloud\"\n\
         [[results.deliver]]\nname = \"r\"\nkind = \"hl7\"\nuplink = \"emr\"\n"
    ));
    assert!(core.contains(&"results.deliver".to_string()), "{core:?}");
}

#[test]
fn identity_on_the_core_defaults_its_hospital_id_to_the_node_id() {
    let s = ok(&format!("{NODE_CORE}[booking]\n[identity]\n"));
    let i = s.identity.unwrap();
    assert_eq!(i.hospital_id, "t");
    assert_eq!(i.model, None);
    let s = ok(&format!(
        "{NODE_CORE}[booking]\n[identity]\nhospital_id = \"KOHSEI-01\"\nmodel = \"/var/lib/gatewayd/model.json\"\n"
    ));
    let i = s.identity.unwrap();
    assert_eq!(i.hospital_id, "KOHSEI-01");
    assert_eq!(i.model, Some(PathBuf::from("/var/lib/gatewayd/model.json")));
    assert!(ok(NODE_CORE).identity.is_none());
}

#[test]
fn every_identity_problem_is_named_and_unknown_keys_are_refused() {
    let got = lines(&format!(
        "{NODE_DEV}[identity]\nhospital_id = \"A^B\"\nmodel = \"\"\n"
    ));
    for want in [
        "identity: only the core keeps the identity registry",
        "identity.hospital_id: must be 1 to 64 characters",
        "identity.model:",
        "identity: needs [booking]",
    ] {
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {got:#?}"
        );
    }
    let unknown = keys(&format!("{NODE_CORE}[identity]\nauto_link = true\n"));
    assert!(
        unknown.iter().any(|k| k.starts_with("identity")),
        "{unknown:?}"
    );
}

#[test]
fn safety_on_the_core_has_a_year_window_and_no_threshold_by_default() {
    let s = ok(&format!("{NODE_CORE}[booking]\n[identity]\n[safety]\n"));
    let safety = s.safety.unwrap();
    assert_eq!(safety.dose_window_days, 365);
    assert_eq!(safety.dlp_threshold_mgy_cm, None);
    let s = ok(&format!(
        "{NODE_CORE}[booking]\n[identity]\n[safety]\ndose_window_days = 180\ndlp_threshold_mgy_cm = 1500.5\n"
    ));
    let safety = s.safety.unwrap();
    assert_eq!(safety.dose_window_days, 180);
    assert_eq!(safety.dlp_threshold_mgy_cm, Some(1500.5));
    assert!(ok(NODE_CORE).safety.is_none());
}

#[test]
fn every_safety_problem_is_named_and_unknown_keys_are_refused() {
    let got = lines(&format!(
        "{NODE_DEV}[safety]\ndose_window_days = 0\ndlp_threshold_mgy_cm = -3.0\n"
    ));
    for want in [
        "safety: dose_window_days and dlp_threshold_mgy_cm are the core's",
        "safety.dose_window_days: must be 1 to 36500 days",
        "safety.dlp_threshold_mgy_cm: must be a positive number",
        "safety: on a clinic it carries dose reports to the core: it needs [exchange]",
    ] {
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {got:#?}"
        );
    }
    let core = lines(&format!("{NODE_CORE}[booking]\n[safety]\n"));
    assert!(
        core.iter()
            .any(|l| l.starts_with("safety: needs [identity]")),
        "{core:#?}"
    );
    let unknown = keys(&format!(
        "{NODE_CORE}[booking]\n[identity]\n[safety]\nthreshold = 1\n"
    ));
    assert!(
        unknown.iter().any(|k| k.starts_with("safety")),
        "{unknown:?}"
    );
}

#[test]
fn update_section_defaults_and_bounds_name_the_key() {
    let base = "[node]\nid = \"gw-1\"\ndata_dir = \"/var/lib/gatewayd\"\n";
    let s = ok(base);
    assert_eq!(s.update.max_bundle_bytes.bytes(), 1 << 30);
    assert_eq!(s.update.health_timeout.get().as_secs(), 300);
    assert_eq!(s.update.download_deadline.get().as_secs(), 3600);
    assert_eq!(s.update.max_bytes_per_sec, None);
    assert_eq!(s.update.ca_file, None);
    assert_eq!(
        s.update.reboot_request_file,
        std::path::PathBuf::from("/run/gatewayd/reboot")
    );
    assert_eq!(s.update.rauc_command, std::path::PathBuf::from("rauc"));
    let s = ok(&format!(
        "{base}[update]\nmax_bundle_bytes = \"512MiB\"\nhealth_timeout = \"90s\"\ndownload_deadline = \"10m\"\nmax_bytes_per_sec = \"2MiB\"\nca_file = \"/etc/gw/bundles.pem\"\nreboot_request_file = \"/tmp/reboot\"\nrauc_command = \"/usr/bin/rauc\"\n"
    ));
    assert_eq!(s.update.max_bundle_bytes.bytes(), 512 << 20);
    assert_eq!(s.update.health_timeout.get().as_secs(), 90);
    assert_eq!(s.update.max_bytes_per_sec.unwrap().bytes(), 2 << 20);
    for (line, key) in [
        ("max_bundle_bytes = \"17GiB\"", "update.max_bundle_bytes"),
        ("max_bundle_bytes = \"10KiB\"", "update.max_bundle_bytes"),
        ("health_timeout = \"5s\"", "update.health_timeout"),
        ("health_timeout = \"2h\"", "update.health_timeout"),
        ("download_deadline = \"30s\"", "update.download_deadline"),
        ("max_bytes_per_sec = \"100\"", "update.max_bytes_per_sec"),
        ("max_bytes_per_sec = \"fast\"", "update.max_bytes_per_sec"),
        ("rauc = \"x\"", "update"),
    ] {
        let text = format!("{base}[update]\n{line}\n");
        let found = lines(&text).join("\n");
        assert!(found.contains(key), "{line}: {found}");
    }
}

#[test]
fn spool_index_cache_and_dedupe_window_are_checked() {
    let text =
        format!("{NODE_DEV}[spool]\nindex_cache_bytes = \"lots\"\ndedupe_window = \"a week\"\n");
    assert_eq!(
        keys(&text),
        ["spool.index_cache_bytes", "spool.dedupe_window"]
    );
}
