//! `[dicom]` TLS keys, `[[dicom.peers]] tls_client_name` and `[[results.deliver]]` TLS keys
//! as `gatewayd check-config` sees them: every problem named, the production rules.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use gateway_config::{DeliverTls, Settings, TlsFiles};

const NODE_DEV: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"development\"\n";
const NODE_PROD: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"production\"\n";

fn ok(text: &str) -> Settings {
    Settings::from_toml_str(text).unwrap_or_else(|e| panic!("should parse, got:\n{e}"))
}

/// The `key: message` lines of a config (empty when it parses).
fn lines(text: &str) -> Vec<String> {
    match Settings::from_toml_str(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn tls_listener_from_files_or_the_device_identity() {
    let s = ok(&format!(
        "{NODE_DEV}[dicom]\nlisten = \"127.0.0.1:11112\"\ntls_listen = \"0.0.0.0:2762\"\n\
         tls_cert_file = \"gw.pem\"\ntls_key_file = \"gw.key\"\ntls_client_ca_file = \"ca.pem\"\n\
         [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"10.0.0.5\"\ntls_client_name = \"ct01.clinic\"\n"
    ));
    let d = s.dicom.unwrap();
    let tls = d.tls.unwrap();
    assert_eq!(tls.listen, "0.0.0.0:2762".parse().unwrap());
    assert_eq!(
        tls.files,
        Some(TlsFiles {
            cert_file: "gw.pem".into(),
            key_file: "gw.key".into()
        })
    );
    assert_eq!(tls.client_ca_file, Some(PathBuf::from("ca.pem")));
    assert_eq!(d.peers[0].tls_client_name.as_deref(), Some("ct01.clinic"));

    let s = ok(&format!(
        "{NODE_DEV}[dicom]\ntls_listen = \"127.0.0.1:2762\"\n"
    ));
    let tls = s.dicom.unwrap().tls.unwrap();
    assert_eq!(tls.files, None, "neither file: the device identity");
    assert_eq!(tls.client_ca_file, None);
    assert!(
        ok(&format!("{NODE_DEV}[dicom]\n"))
            .dicom
            .unwrap()
            .tls
            .is_none()
    );
}

#[test]
fn every_tls_problem_is_named() {
    let l = lines(&format!(
        "{NODE_DEV}[dicom]\ntls_cert_file = \"gw.pem\"\ntls_client_ca_file = \"ca.pem\"\n\
         [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"10.0.0.5\"\ntls_client_name = \"\"\n"
    ));
    for want in [
        "dicom.tls_key_file: is required with dicom.tls_cert_file",
        "dicom.tls_cert_file: needs dicom.tls_listen",
        "dicom.tls_client_ca_file: needs dicom.tls_listen",
        "dicom.peers[0].tls_client_name: must be a certificate name",
    ] {
        assert!(
            l.iter().any(|p| p.starts_with(want)),
            "{want:?} not in {l:?}"
        );
    }
    let l = lines(&format!(
        "{NODE_DEV}[dicom]\nlisten = \"127.0.0.1:104\"\ntls_listen = \"127.0.0.1:104\"\n\
         tls_key_file = \"gw.key\"\n\
         [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"10.0.0.5\"\ntls_client_name = \"ct01\"\n"
    ));
    for want in [
        "dicom.tls_cert_file: is required with dicom.tls_key_file",
        "dicom.tls_listen: 127.0.0.1:104 is also dicom.listen",
        "dicom.peers[0].tls_client_name: needs dicom.tls_listen and dicom.tls_client_ca_file",
    ] {
        assert!(
            l.iter().any(|p| p.starts_with(want)),
            "{want:?} not in {l:?}"
        );
    }
    let l = lines(&format!("{NODE_DEV}[dicom]\ntls_listen = \"nowhere\"\n"));
    assert!(
        l[0].starts_with("dicom.tls_listen: invalid socket address"),
        "{l:?}"
    );
}

#[test]
fn production_needs_an_allow_list_for_tls_without_client_certificates() {
    let problem = "dicom.peers: production mode needs an allow list of calling AE title + address for a DICOM TLS listener";
    // Plain listener on loopback (fine), TLS on the LAN without a client CA: refused.
    let l = lines(&format!(
        "{NODE_PROD}[dicom]\nlisten = \"127.0.0.1:104\"\ntls_listen = \"0.0.0.0:2762\"\n"
    ));
    assert!(l.iter().any(|p| p.starts_with(problem)), "{l:?}");
    // With a client CA the certificate is the gate.
    let l = lines(&format!(
        "{NODE_PROD}[dicom]\nlisten = \"127.0.0.1:104\"\ntls_listen = \"0.0.0.0:2762\"\n\
         tls_client_ca_file = \"ca.pem\"\n"
    ));
    assert!(!l.iter().any(|p| p.starts_with("dicom.")), "{l:?}");
    // Or with an allow list.
    let l = lines(&format!(
        "{NODE_PROD}[dicom]\nlisten = \"127.0.0.1:104\"\ntls_listen = \"0.0.0.0:2762\"\n\
         [[dicom.peers]]\nae_title = \"CT01\"\nhost = \"10.0.0.5\"\n"
    ));
    assert!(!l.iter().any(|p| p.starts_with("dicom.")), "{l:?}");
    // The plain listener keeps its own rule.
    let l = lines(&format!(
        "{NODE_PROD}[dicom]\nlisten = \"0.0.0.0:104\"\ntls_listen = \"0.0.0.0:2762\"\n\
         tls_client_ca_file = \"ca.pem\"\n"
    ));
    assert!(
        l.iter().any(
            |p| p.starts_with("dicom.peers: production mode needs an allow list")
                && p.contains("plain DIMSE")
        ),
        "{l:?}"
    );
}

const RESULTS: &str = "[[uplink]]\nname = \"cloud\"\nurl = \"http://127.0.0.1:1/dicom-web\"\n\
    [[uplink]]\nname = \"emr\"\nkind = \"mllp-tls\"\nurl = \"mllp://127.0.0.1:2\"\n\
    message_types = [\"ORU^R01\"]\n[booking]\n[results]\nsource = \"cloud\"\n";

#[test]
fn results_delivery_over_tls() {
    let deliver = |extra: &str| {
        format!(
            "{NODE_DEV}{RESULTS}[[results.deliver]]\nname = \"pacs\"\nkind = \"dicom\"\n\
             host = \"pacs.clinic\"\nport = 2762\ncalled_ae = \"PACS\"\ncalling_ae = \"GW\"\n{extra}"
        )
    };
    let tls_of = |s: Settings| match s.results.unwrap().deliver.remove(0) {
        gateway_config::Deliver::Dicom { tls, .. } => tls,
        other => panic!("{other:?}"),
    };
    assert_eq!(tls_of(ok(&deliver(""))), None);
    assert_eq!(
        tls_of(ok(&deliver("tls_ca_file = \"pacs-ca.pem\"\n"))),
        Some(DeliverTls {
            ca_file: "pacs-ca.pem".into(),
            files: None
        })
    );
    assert_eq!(
        tls_of(ok(&deliver(
            "tls_ca_file = \"pacs-ca.pem\"\ntls_cert_file = \"gw.pem\"\ntls_key_file = \"gw.key\"\n"
        ))),
        Some(DeliverTls {
            ca_file: "pacs-ca.pem".into(),
            files: Some(TlsFiles {
                cert_file: "gw.pem".into(),
                key_file: "gw.key".into()
            })
        })
    );
    let l = lines(&deliver("tls_cert_file = \"gw.pem\"\n"));
    let want = "results.deliver[0].tls_key_file: is required with results.deliver[0].tls_cert_file";
    assert!(l.iter().any(|p| p.starts_with(want)), "{l:?}");
    let l = lines(&deliver(
        "tls_cert_file = \"gw.pem\"\ntls_key_file = \"gw.key\"\n",
    ));
    assert!(
        l.iter()
            .any(|p| p.starts_with("results.deliver[0].tls_ca_file: is required")),
        "{l:?}"
    );
    let l = lines(&format!(
        "{NODE_DEV}{RESULTS}[[results.deliver]]\nname = \"reports\"\nkind = \"hl7\"\nuplink = \"emr\"\n\
         tls_ca_file = \"x.pem\"\n"
    ));
    assert!(
        l.iter()
            .any(|p| p.starts_with("results.deliver[0].tls_ca_file: not a key of kind = \"hl7\"")),
        "{l:?}"
    );
}
