//! Every `*.toml` file in the repository's `config/` folder must parse as it ships.

#![allow(clippy::panic)]

use std::path::{Path, PathBuf};

use gateway_config::Settings;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
}

fn toml_files() -> Vec<PathBuf> {
    let dir = config_dir();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_toml_file_in_config_dir_parses() {
    let mut failures = Vec::new();
    for file in toml_files() {
        if let Err(errors) = Settings::load(&file) {
            failures.push(format!("{}:\n{errors}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "config files with problems:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn config_dir_has_the_dev_default_and_the_example() {
    let names: Vec<String> = toml_files()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in ["gatewayd.dev.toml", "gatewayd.example.toml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from config/: {names:?}"
        );
    }
}

#[test]
fn embedded_default_is_the_dev_file() {
    let on_disk = std::fs::read_to_string(config_dir().join("gatewayd.dev.toml"))
        .unwrap_or_else(|e| panic!("cannot read gatewayd.dev.toml: {e}"));
    assert_eq!(gateway_config::EMBEDDED_DEFAULT_TOML, on_disk);
}

#[test]
fn example_is_production_shaped_with_every_section() {
    let file = config_dir().join("gatewayd.example.toml");
    let s = Settings::load(&file).unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
    assert!(s.node.mode.is_production());
    assert_eq!(s.keystore.backend, gateway_config::KeystoreBackend::Tpm);
    let dicom = s.dicom.unwrap_or_else(|| panic!("example lacks [dicom]"));
    assert!(!dicom.peers.is_empty(), "example lacks [[dicom.peers]]");
    let kinds: Vec<_> = s.uplinks.iter().map(|u| u.kind).collect();
    assert_eq!(
        kinds,
        [
            gateway_config::UplinkKind::DicomWeb,
            gateway_config::UplinkKind::MllpTls
        ]
    );
    assert!(s.uplinks.iter().all(|u| !u.url.is_plaintext()));
    assert!(s.hl7.is_some() && s.fleet.is_some() && s.admin.is_some() && s.booking.is_some());
}
