//! Real peer: DCMTK writes an object in every transfer syntax it can (explicit and
//! implicit VR LE, explicit VR BE, deflated; defined and undefined lengths), the
//! de-identifier rewrites it in 7-byte chunks, and dcmdump reads the result without an
//! error or warning, showing the pseudonyms and none of the subject's values.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;

use gateway_deid::{Deidentifier, DestinationKey, Profile, ProfileOption, Subject};

/// A CT image with nested sequences (three levels), private attributes, an overlay and
/// dates, in dcmdump format.
const DUMP: &str = r#"
(0008,0005) CS [ISO_IR 100]
(0008,0016) UI [1.2.840.10008.5.1.4.1.1.2]
(0008,0018) UI [1.2.826.0.1.3680043.2.1125.88.1]
(0008,0020) DA [20240301]
(0008,0050) SH [ACC-DCMTK]
(0008,0060) CS [CT]
(0008,0080) LO [Saint Elsewhere]
(0008,0090) PN [Welby^Marcus]
(0008,1030) LO [CT head for Doe]
(0008,1140) SQ (Sequence with explicit length #=1)
  (fffe,e000) na (Item with explicit length #=3)
    (0008,1150) UI [1.2.840.10008.5.1.4.1.1.2]
    (0008,1155) UI [1.2.826.0.1.3680043.2.1125.88.2]
    (0040,a170) SQ (Sequence with explicit length #=1)
      (fffe,e000) na (Item with explicit length #=4)
        (0008,0100) SH [121311]
        (0008,0102) SH [DCM]
        (0008,0104) LO [Localizer]
        (0008,0121) SQ (Sequence with explicit length #=1)
          (fffe,e000) na (Item with explicit length #=3)
            (0008,0020) DA [20240229]
            (0008,1155) UI [1.2.826.0.1.3680043.2.1125.88.3]
            (0010,0010) PN [Doe^Jane]
          (fffe,e00d) na (ItemDelimitationItem for re-encoding)
        (fffe,e0dd) na (SequenceDelimitationItem for re-encod.)
      (fffe,e00d) na (ItemDelimitationItem for re-encoding)
    (fffe,e0dd) na (SequenceDelimitationItem for re-encod.)
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.)
(0009,0010) LO [ACME 1.0]
(0009,1001) LO [Doe private]
(0010,0010) PN [Doe^Jane]
(0010,0020) LO [DCMTK-42]
(0010,0030) DA [19800229]
(0020,000d) UI [1.2.826.0.1.3680043.2.1125.88.4]
(0020,000e) UI [1.2.826.0.1.3680043.2.1125.88.5]
(0020,4000) LT [Dr Welby saw Jane Doe]
(0028,0002) US 1
(0028,0004) CS [MONOCHROME2]
(0028,0010) US 4
(0028,0011) US 4
(0028,0100) US 8
(0028,0101) US 8
(0028,0102) US 7
(0028,0103) US 0
(6000,0010) US 4
(6000,0011) US 4
(6000,3000) OW 0000\ffff
(7fe0,0010) OB 00\11\22\33\44\55\66\77\88\99\aa\bb\cc\dd\ee\ff
"#;

fn run_tool(tool: &str, args: &[&OsStr]) -> std::process::Output {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("DCMTK peer `{tool}` cannot run ({e}): install dcmtk (apt-get install dcmtk)")
        });
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{tool} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn dcmtk_reads_the_de_identified_object_in_every_transfer_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("in.dump");
    std::fs::write(&dump, DUMP).unwrap();
    let key = DestinationKey::from_bytes([9; 32]);
    let profile = Profile::new(&[
        ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
        ProfileOption::CleanDescriptors,
    ])
    .unwrap();
    let pseudo = key.patient_id("", "DCMTK-42");
    for (name, opts) in [
        ("explicit", &["+te"][..]),
        ("explicit-undefined", &["+te", "-e"][..]),
        ("implicit", &["+ti"][..]),
        ("implicit-undefined", &["+ti", "-e"][..]),
        ("big-endian", &["+tb"][..]),
        ("deflated", &["+td"][..]),
    ] {
        let input = dir.path().join(format!("{name}.dcm"));
        let mut args: Vec<&OsStr> = opts.iter().map(|o| o.as_ref()).collect();
        args.extend([dump.as_os_str(), input.as_os_str()]);
        run_tool("dump2dcm", &args);
        let bytes = std::fs::read(&input).unwrap();
        let subject = Subject::scan(&bytes).unwrap();
        let mut d = Deidentifier::new(profile.clone(), key.clone(), subject, false);
        let mut out = Vec::new();
        for chunk in bytes.chunks(7) {
            d.feed(chunk, &mut out).unwrap();
        }
        let done = d.finish(&mut out).unwrap();
        assert_eq!(done.pseudo_patient_id, pseudo);
        let output = dir.path().join(format!("{name}-out.dcm"));
        std::fs::write(&output, &out).unwrap();
        // run_tool asserts that dcmdump printed no error or warning.
        let dumped = run_tool(
            "dcmdump",
            &["-E".as_ref(), "+L".as_ref(), output.as_os_str()][..],
        );
        let text = String::from_utf8_lossy(&dumped.stdout);
        for secret in [
            "Doe",
            "Jane",
            "Welby",
            "DCMTK-42",
            "ACC-DCMTK",
            "Elsewhere",
            "19800229",
            "20240301",
            "20240229",
            "ACME",
            "1.2.826.0.1.3680043.2.1125.88.",
        ] {
            assert!(!text.contains(secret), "{name}: {secret} in\n{text}");
        }
        let shown = |line: &str| text.lines().any(|l| l.trim_start().starts_with(line));
        assert!(
            shown(&format!("(0010,0010) PN [{pseudo}]")),
            "{name}: {text}"
        );
        assert!(
            shown(&format!("(0010,0020) LO [{pseudo}]")),
            "{name}: {text}"
        );
        assert!(shown("(0012,0062) CS [YES]"), "{name}: {text}");
        assert!(shown("(0028,0303) CS [MODIFIED]"), "{name}: {text}");
        assert!(
            shown(&format!(
                "(0008,1155) UI [{}]",
                key.uid("1.2.826.0.1.3680043.2.1125.88.3")
            )),
            "{name}: level 3 UID: {text}"
        );
        assert!(
            shown("(0008,1030) LO [ANONYMIZED]"),
            "{name}: cleaned: {text}"
        );
        // Implicit VR: dcmdump reads pixel data as OW (16-bit words, little endian).
        assert!(
            shown("(7fe0,0010) OB 00\\11\\22\\33\\44\\55\\66\\77\\88\\99\\aa\\bb\\cc\\dd\\ee\\ff")
                || shown("(7fe0,0010) OW 1100\\3322\\5544\\7766\\9988\\bbaa\\ddcc\\ffee"),
            "{name}: pixels: {text}"
        );
        assert!(
            !text.contains("(6000,3000)") && !text.contains("(0009,"),
            "{name}"
        );
        let days = key.day_shift("", "DCMTK-42");
        assert!((365..=3650).contains(&days));
    }
}
