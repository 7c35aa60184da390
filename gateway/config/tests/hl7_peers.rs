//! `[[hl7.peers]]`: the allow list of HL7 senders as `gatewayd check-config` sees it, and
//! the production refusal of a plain MLLP listener without it.

#![allow(clippy::unwrap_used, clippy::panic)]

use gateway_config::{Hl7Peer, Settings};

const NODE_DEV: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"development\"\n";
const NODE_PROD: &str = "[node]\nid = \"t\"\ndata_dir = \"d\"\nmode = \"production\"\n";
/// A TLS listener with client certificates (the files are not read by the parse).
const HL7_TLS: &str = "[hl7]\nlisten = \"0.0.0.0:2575\"\ntls_cert_file = \"c.pem\"\n\
                       tls_key_file = \"k.pem\"\ntls_client_ca_file = \"ca.pem\"\n";

fn ok(text: &str) -> Settings {
    Settings::from_toml_str(text).unwrap_or_else(|e| panic!("should parse, got:\n{e}"))
}

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

fn peers(s: &Settings) -> &[Hl7Peer] {
    &s.hl7.as_ref().unwrap().peers
}

#[test]
fn peers_parse_with_absent_application_and_facility_meaning_any() {
    let s = ok(&format!(
        "{NODE_DEV}{HL7_TLS}\
         [[hl7.peers]]\nhost = \"192.168.10.5\"\nsending_application = \"HIS\"\nsending_facility = \"CLINIC01\"\n\
         [[hl7.peers]]\nhost = \"fe80::1\"\n\
         [[hl7.peers]]\ntls_client_name = \"emr.clinic.example\"\nsending_facility = \"CLINIC01\"\n"
    ));
    assert_eq!(
        peers(&s),
        [
            Hl7Peer {
                host: Some("192.168.10.5".parse().unwrap()),
                sending_application: Some("HIS".into()),
                sending_facility: Some("CLINIC01".into()),
                tls_client_name: None,
            },
            Hl7Peer {
                host: Some("fe80::1".parse().unwrap()),
                sending_application: None,
                sending_facility: None,
                tls_client_name: None,
            },
            Hl7Peer {
                host: None,
                sending_application: None,
                sending_facility: Some("CLINIC01".into()),
                tls_client_name: Some("emr.clinic.example".into()),
            },
        ]
    );
}

#[test]
fn no_peers_key_is_an_empty_list() {
    let s = ok(&format!("{NODE_DEV}[hl7]\n"));
    assert!(peers(&s).is_empty());
}

#[test]
fn an_entry_needs_host_or_tls_client_name() {
    assert_eq!(
        lines(&format!(
            "{NODE_DEV}[hl7]\n[[hl7.peers]]\nsending_application = \"HIS\"\n"
        )),
        [
            "hl7.peers[0]: needs host or tls_client_name (MSH-3/MSH-4 alone can be claimed by any sender)"
        ]
    );
}

#[test]
fn tls_client_name_needs_the_client_ca() {
    assert_eq!(
        lines(&format!(
            "{NODE_DEV}[hl7]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n\
             [[hl7.peers]]\ntls_client_name = \"emr\"\n"
        )),
        [
            "hl7.peers[0].tls_client_name: needs hl7.tls_client_ca_file (client certificates are verified only then)"
        ]
    );
}

#[test]
fn bad_values_are_each_a_problem_with_their_key() {
    let text = format!(
        "{NODE_DEV}{HL7_TLS}\
         [[hl7.peers]]\nhost = \"emr.local\"\n\
         [[hl7.peers]]\nhost = \"10.0.0.1\"\nsending_application = \"HIS^1\"\n\
         [[hl7.peers]]\nhost = \"10.0.0.1\"\nsending_facility = \"\"\n\
         [[hl7.peers]]\ntls_client_name = \" emr\"\n\
         [[hl7.peers]]\nhost = \"10.0.0.1\"\nsending_application = \"{}\"\n",
        "A".repeat(228)
    );
    assert_eq!(
        keys(&text),
        [
            "hl7.peers[0].host",
            "hl7.peers[1].sending_application",
            "hl7.peers[2].sending_facility",
            "hl7.peers[3].tls_client_name",
            "hl7.peers[4].sending_application",
        ]
    );
    let l = lines(&text);
    assert!(l[1].ends_with("must not hold control characters or HL7 delimiters (| ^ ~ \\ &)"));
    assert!(
        l[2].ends_with("an MSH-4 namespace id must not be empty"),
        "{l:?}"
    );
}

#[test]
fn unknown_key_in_an_entry_is_named() {
    let l = lines(&format!(
        "{NODE_DEV}[hl7]\n[[hl7.peers]]\nhost = \"10.0.0.1\"\nport = 2575\n"
    ));
    assert!(l[0].starts_with("hl7.peers[0].port: unknown key"), "{l:?}");
}

#[test]
fn duplicate_entries_are_refused() {
    let entry = "[[hl7.peers]]\nhost = \"10.0.0.1\"\nsending_application = \"HIS\"\n";
    assert_eq!(
        lines(&format!("{NODE_DEV}[hl7]\n{entry}{entry}")),
        ["hl7.peers[1]: duplicate peer (already hl7.peers[0])"]
    );
    // The same host with another application is another entry.
    ok(&format!(
        "{NODE_DEV}[hl7]\n{entry}[[hl7.peers]]\nhost = \"10.0.0.1\"\nsending_application = \"LIS\"\n"
    ));
}

#[test]
fn production_refuses_plain_mllp_without_peers() {
    let text = "[hl7]\nlisten = \"0.0.0.0:2575\"\n";
    assert_eq!(
        lines(&format!("{NODE_PROD}{text}")),
        [
            "hl7.peers: production mode needs an allow list of sender address / client certificate name (+ MSH-3/MSH-4) for plain MLLP on a non-loopback address"
        ]
    );
    // The default listen address is not loopback either.
    assert_eq!(keys(&format!("{NODE_PROD}[hl7]\n")), ["hl7.peers"]);
    ok(&format!("{NODE_DEV}{text}"));
    ok(&format!("{NODE_PROD}[hl7]\nlisten = \"127.0.0.1:2575\"\n"));
    ok(&format!(
        "{NODE_PROD}{text}[[hl7.peers]]\nhost = \"192.168.10.5\"\n"
    ));
    // MLLP in TLS is not refused for want of a list.
    ok(&format!("{NODE_PROD}{HL7_TLS}"));
}
