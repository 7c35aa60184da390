//! The streaming de-identifier against objects built here in every encoding: each action
//! at depth 0 to 3, the output read back by dicom-object (an independent parser), split
//! invariance, keyed UIDs and date shifts, holds, truncation and bounds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::Write;

use dicom_core::Tag;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use gateway_deid::stream::MAX_HELD_VALUE;
use gateway_deid::{
    DeidError, Deidentified, Deidentifier, DestinationKey, HoldReason, Profile, ProfileOption,
    Subject, deidentify,
};
use gateway_dicom::element::{self, Encoding, ITEM_GROUP, UNDEFINED_LENGTH};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const SOP_UID: &str = "1.2.826.0.1.3680043.2.1125.1.100";
const STUDY_UID: &str = "1.2.826.0.1.3680043.2.1125.1.200";
const SERIES_UID: &str = "1.2.826.0.1.3680043.2.1125.1.300";
const REF_UID: &str = "1.2.826.0.1.3680043.2.1125.1.400";
const PIXELS: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ts {
    ExplicitLe,
    ImplicitLe,
    ExplicitBe,
    Deflated,
    Jpeg,
}

const ALL: [Ts; 5] = [
    Ts::ExplicitLe,
    Ts::ImplicitLe,
    Ts::ExplicitBe,
    Ts::Deflated,
    Ts::Jpeg,
];

impl Ts {
    fn uid(self) -> &'static str {
        match self {
            Ts::ExplicitLe => "1.2.840.10008.1.2.1",
            Ts::ImplicitLe => "1.2.840.10008.1.2",
            Ts::ExplicitBe => "1.2.840.10008.1.2.2",
            Ts::Deflated => "1.2.840.10008.1.2.1.99",
            Ts::Jpeg => "1.2.840.10008.1.2.4.50",
        }
    }
    fn enc(self) -> Encoding {
        Encoding {
            deflated: false,
            ..Encoding::of_transfer_syntax(self.uid())
        }
    }
}

/// A data set node: an element, a sequence (defined or undefined lengths), or
/// encapsulated pixel data.
#[derive(Debug, Clone)]
enum Node {
    El(u32, [u8; 2], Vec<u8>),
    Sq(u32, Vec<Vec<Node>>, bool),
    Encap(u32, Vec<Vec<u8>>),
}

fn tag_of(n: &Node) -> u32 {
    match n {
        Node::El(t, ..) | Node::Sq(t, ..) | Node::Encap(t, ..) => *t,
    }
}

fn el(tag: u32, vr: &[u8; 2], value: &str) -> Node {
    let mut v = value.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    Node::El(tag, *vr, v)
}

fn u16s(enc: Encoding, v: u16) -> [u8; 2] {
    if enc.big_endian {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    }
}
fn u32s(enc: Encoding, v: u32) -> [u8; 4] {
    if enc.big_endian {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    }
}

fn header(out: &mut Vec<u8>, enc: Encoding, tag: u32, vr: Option<&[u8; 2]>, len: u32) {
    out.extend(u16s(enc, (tag >> 16) as u16));
    out.extend(u16s(enc, tag as u16));
    match vr {
        Some(vr) if enc.explicit_vr && tag >> 16 != 0xFFFE => {
            out.extend(vr);
            if element::is_long_vr(*vr) {
                out.extend([0, 0]);
                out.extend(u32s(enc, len));
            } else {
                out.extend(u16s(enc, len as u16));
            }
        }
        _ => out.extend(u32s(enc, len)),
    }
}

fn encode(nodes: &[Node], enc: Encoding) -> Vec<u8> {
    let mut nodes = nodes.to_vec();
    nodes.sort_by_key(tag_of);
    let mut out = Vec::new();
    for n in &nodes {
        match n {
            Node::El(tag, vr, v) => {
                let v = if enc.big_endian && matches!(vr, b"US" | b"OW") {
                    v.chunks(2).flat_map(|c| c.iter().rev().copied()).collect()
                } else {
                    v.clone()
                };
                header(&mut out, enc, *tag, Some(vr), v.len() as u32);
                out.extend(v);
            }
            Node::Sq(tag, items, defined) => {
                let mut body = Vec::new();
                for item in items {
                    let content = encode(item, enc);
                    let len = if *defined {
                        content.len() as u32
                    } else {
                        UNDEFINED_LENGTH
                    };
                    header(&mut body, enc, 0xFFFE_E000, None, len);
                    body.extend(&content);
                    if !*defined {
                        header(&mut body, enc, 0xFFFE_E00D, None, 0);
                    }
                }
                if *defined {
                    header(&mut out, enc, *tag, Some(b"SQ"), body.len() as u32);
                    out.extend(body);
                } else {
                    header(&mut out, enc, *tag, Some(b"SQ"), UNDEFINED_LENGTH);
                    out.extend(body);
                    header(&mut out, enc, 0xFFFE_E0DD, None, 0);
                }
            }
            Node::Encap(tag, fragments) => {
                header(&mut out, enc, *tag, Some(b"OB"), UNDEFINED_LENGTH);
                for f in fragments {
                    header(&mut out, enc, 0xFFFE_E000, None, f.len() as u32);
                    out.extend(f);
                }
                header(&mut out, enc, 0xFFFE_E0DD, None, 0);
            }
        }
    }
    out
}

fn part10(ts: Ts, class: &str, nodes: &[Node]) -> Vec<u8> {
    let le = Encoding::EXPLICIT_LE;
    let mut meta = encode(
        &[
            Node::El(0x0002_0001, *b"OB", vec![0, 1]),
            el(0x0002_0002, b"UI", class),
            el(0x0002_0003, b"UI", SOP_UID),
            el(0x0002_0010, b"UI", ts.uid()),
            el(0x0002_0012, b"UI", "1.2.3.4.5"),
            el(0x0002_0016, b"AE", "MODALITY_AE"),
            el(0x0002_0100, b"UI", "1.2.3.999"),
            Node::El(0x0002_0102, *b"OB", b"DOE PRIVATE ".to_vec()),
        ],
        le,
    );
    let mut out = vec![0xAB; 128];
    out.extend(b"DICM");
    header(&mut out, le, 0x0002_0000, Some(b"UL"), 4);
    out.extend((meta.len() as u32).to_le_bytes());
    out.append(&mut meta);
    let data = encode(nodes, ts.enc());
    if ts == Ts::Deflated {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&data).unwrap();
        out.extend(z.finish().unwrap());
    } else {
        out.extend(data);
    }
    out
}

/// The attributes each level of nesting carries, one per action kind.
fn payload(depth: usize, defined: bool) -> Vec<Node> {
    let mut p = vec![
        el(0x0008_0020, b"DA", "20240301"),         // Study Date: Z / C
        el(0x0008_0030, b"TM", "101500"),           // Study Time: Z / C
        el(0x0008_0080, b"LO", "GENERAL HOSPITAL"), // Institution Name: D / K
        el(0x0008_1030, b"LO", &format!("CT HEAD {depth}")), // Study Description: X / C
        el(0x0008_1155, b"UI", REF_UID),            // Referenced SOP Instance UID: U
        el(0x0009_0010, b"LO", "ACME 1.0"),         // private creator
        el(0x0009_1001, b"LO", "DOE SECRET"),       // private
        el(0x0018_1000, b"LO", "SN-4711"),          // Device Serial Number: D / K
        el(0x0020_4000, b"LT", "seen by Dr Welby"), // Image Comments: X / C
        Node::El(0x6000_3000, *b"OW", vec![0xFF; 4]), // Overlay Data: X
    ];
    if depth > 0 {
        p.push(el(0x0010_0010, b"PN", "DOE^JANE")); // nested Patient's Name: Z
    }
    if depth < 3 {
        // Referenced Image Sequence: X/Z/U*, kept with its items processed.
        p.push(Node::Sq(
            0x0008_1140,
            vec![payload(depth + 1, !defined)],
            defined,
        ));
    }
    p
}

fn ct(ts: Ts) -> Vec<u8> {
    ct_with(ts, &[])
}

fn ct_with(ts: Ts, extra: &[Node]) -> Vec<u8> {
    let mut nodes = payload(0, true);
    nodes.extend([
        el(0x0008_0005, b"CS", "ISO_IR 100"),
        el(0x0008_0016, b"UI", CT),
        el(0x0008_0018, b"UI", SOP_UID),
        el(0x0008_0050, b"SH", "ACC777"),
        el(0x0008_0090, b"PN", "WELBY^MARCUS"),
        // Referenced Study Sequence: X/Z, emptied.
        Node::Sq(
            0x0008_1110,
            vec![vec![el(0x0008_1155, b"UI", STUDY_UID)]],
            true,
        ),
        el(0x0009_0011, b"LO", "OTHER CREATOR"),
        el(0x0010_0010, b"PN", "DOE^JANE"),
        el(0x0010_0020, b"LO", "P12345"),
        el(0x0010_0021, b"LO", "HOSP"),
        el(0x0010_0030, b"DA", "19800229"),
        el(0x0010_0040, b"CS", "F"),
        el(0x0010_1010, b"AS", "044Y"),
        el(0x0012_0062, b"CS", "NO"),
        el(0x0020_000D, b"UI", STUDY_UID),
        el(0x0020_000E, b"UI", SERIES_UID),
        Node::El(0x0028_0010, *b"US", vec![2, 0]),
        Node::El(0x0028_0011, *b"US", vec![2, 0]),
        el(0x0028_0301, b"CS", "NO"),
        el(0x0028_0303, b"CS", "UNMODIFIED"),
        Node::El(0xFFFC_FFFC, *b"OB", b"OLD DOE ".to_vec()),
    ]);
    if ts == Ts::Jpeg {
        nodes.push(Node::Encap(
            0x7FE0_0010,
            vec![vec![], PIXELS.to_vec(), vec![9; 6]],
        ));
    } else {
        nodes.push(Node::El(0x7FE0_0010, *b"OW", PIXELS.to_vec()));
    }
    nodes.extend(extra.iter().cloned());
    part10(ts, CT, &nodes)
}

fn key() -> DestinationKey {
    DestinationKey::from_bytes([42; 32])
}

fn profile(options: &[ProfileOption]) -> Profile {
    Profile::new(options).unwrap()
}

fn run(
    input: &[u8],
    cuts: &[usize],
    profile: &Profile,
    accept: bool,
) -> Result<(Vec<u8>, Deidentified), DeidError> {
    let subject = Subject::scan(input)?;
    let mut d = Deidentifier::new(profile.clone(), key(), subject, accept);
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, input.len());
        d.feed(&input[start..end], &mut out)?;
        start = end;
    }
    d.feed(&input[start..], &mut out)?;
    let done = d.finish(&mut out)?;
    Ok((out, done))
}

fn open(bytes: &[u8]) -> DefaultDicomObject {
    OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(bytes)
        .unwrap()
}

fn text(obj: &InMemDicomObject, tag: u32) -> Option<String> {
    obj.element(Tag((tag >> 16) as u16, tag as u16))
        .ok()
        .map(|e| {
            e.to_str()
                .map(|s| s.trim_end_matches([' ', '\0']).to_string())
                .unwrap_or_default()
        })
}

fn has(obj: &InMemDicomObject, tag: u32) -> bool {
    obj.element(Tag((tag >> 16) as u16, tag as u16)).is_ok()
}

fn items(obj: &InMemDicomObject, tag: u32) -> Vec<InMemDicomObject> {
    obj.element(Tag((tag >> 16) as u16, tag as u16))
        .ok()
        .and_then(|e| e.items().map(|i| i.to_vec()))
        .unwrap_or_default()
}

/// Every tag at every depth of an object.
fn all_tags(obj: &InMemDicomObject, into: &mut Vec<u32>) {
    for e in obj {
        let t = e.header().tag;
        into.push((u32::from(t.0) << 16) | u32::from(t.1));
        if let Some(items) = e.items() {
            for i in items {
                all_tags(i, into);
            }
        }
    }
}

/// Dates `days` before `date` (YYYYMMDD), counted one day at a time.
fn days_before(date: &str, days: u32) -> String {
    let (mut y, mut m, mut d): (i32, u32, u32) = (
        date[..4].parse().unwrap(),
        date[4..6].parse().unwrap(),
        date[6..8].parse().unwrap(),
    );
    let month_len = |y: i32, m: u32| match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    for _ in 0..days {
        if d > 1 {
            d -= 1;
        } else if m > 1 {
            m -= 1;
            d = month_len(y, m);
        } else {
            y -= 1;
            m = 12;
            d = 31;
        }
    }
    format!("{y:04}{m:02}{d:02}")
}

/// Checks the payload at one level against the basic profile.
fn check_basic_level(obj: &InMemDicomObject, depth: usize, k: &DestinationKey) {
    let at = format!("depth {depth}");
    assert_eq!(text(obj, 0x0008_0020).as_deref(), Some(""), "Z date {at}");
    assert_eq!(text(obj, 0x0008_0030).as_deref(), Some(""), "Z time {at}");
    assert_eq!(
        text(obj, 0x0008_0080).as_deref(),
        Some("ANONYMIZED"),
        "D {at}"
    );
    assert!(!has(obj, 0x0008_1030), "X {at}");
    assert_eq!(text(obj, 0x0008_1155), Some(k.uid(REF_UID)), "U {at}");
    assert!(
        !has(obj, 0x0009_0010) && !has(obj, 0x0009_1001),
        "private {at}"
    );
    assert_eq!(
        text(obj, 0x0018_1000).as_deref(),
        Some("ANONYMIZED"),
        "D {at}"
    );
    assert!(!has(obj, 0x0020_4000), "X {at}");
    assert!(!has(obj, 0x6000_3000), "overlay {at}");
    if depth > 0 {
        assert_eq!(
            text(obj, 0x0010_0010).as_deref(),
            Some(""),
            "nested PN {at}"
        );
    }
    let nested = items(obj, 0x0008_1140);
    if depth < 3 {
        assert_eq!(nested.len(), 1, "nested sequence kept {at}");
        check_basic_level(&nested[0], depth + 1, k);
    }
}

#[test]
fn basic_profile_every_action_at_every_depth_in_every_encoding() {
    let k = key();
    let p = profile(&[]);
    for ts in ALL {
        let input = ct(ts);
        let (out, done) = deidentify(&input, &p, &k, false).unwrap();
        let obj = open(&out);
        assert_eq!(obj.meta().transfer_syntax(), ts.uid(), "{ts:?}");
        assert_eq!(obj.meta().media_storage_sop_instance_uid(), k.uid(SOP_UID));
        assert!(obj.meta().source_application_entity_title.is_none());
        assert!(obj.meta().private_information_creator_uid.is_none());
        assert!(obj.meta().private_information.is_none());
        assert_eq!(&out[..128], &[0u8; 128][..], "preamble zeroed");
        let pseudo = k.patient_id("HOSP", "P12345");
        assert_eq!(done.pseudo_patient_id, pseudo);
        assert_eq!(done.pseudo_study_uid, k.uid(STUDY_UID));
        assert_eq!(done.pseudo_sop_instance_uid, k.uid(SOP_UID));
        assert_eq!(text(&obj, 0x0010_0020), Some(pseudo.clone()), "{ts:?}");
        assert_eq!(text(&obj, 0x0010_0010), Some(pseudo.clone()));
        assert_eq!(text(&obj, 0x0008_0018), Some(k.uid(SOP_UID)));
        assert_eq!(text(&obj, 0x0020_000D), Some(k.uid(STUDY_UID)));
        assert_eq!(text(&obj, 0x0020_000E), Some(k.uid(SERIES_UID)));
        assert_eq!(text(&obj, 0x0008_0016).as_deref(), Some(CT));
        assert_eq!(text(&obj, 0x0008_0050).as_deref(), Some(""), "Accession Z");
        assert_eq!(text(&obj, 0x0010_0030).as_deref(), Some(""), "Birth date Z");
        assert_eq!(text(&obj, 0x0010_0040).as_deref(), Some(""), "Sex Z");
        assert!(!has(&obj, 0x0010_1010), "Age X");
        assert!(!has(&obj, 0x0010_0021), "Issuer X");
        assert!(!has(&obj, 0x0009_0011), "private creator");
        assert!(!has(&obj, 0xFFFC_FFFC), "trailing padding");
        assert!(items(&obj, 0x0008_1110).is_empty(), "Z sequence emptied");
        check_basic_level(&obj, 0, &k);
        // The de-identification attributes.
        assert_eq!(text(&obj, 0x0012_0062).as_deref(), Some("YES"));
        assert_eq!(
            text(&obj, 0x0012_0063).as_deref(),
            Some("PS3.15 E.1-1 Basic Profile")
        );
        let codes = items(&obj, 0x0012_0064);
        assert_eq!(codes.len(), 1);
        assert_eq!(text(&codes[0], 0x0008_0100).as_deref(), Some("113100"));
        assert_eq!(text(&codes[0], 0x0008_0102).as_deref(), Some("DCM"));
        assert!(
            !has(&obj, 0x0028_0303),
            "no date option: (0028,0303) removed"
        );
        // Pixel data byte for byte.
        let pixel = obj.element(Tag(0x7FE0, 0x0010)).unwrap();
        if ts == Ts::Jpeg {
            let fragments = pixel.value().fragments().unwrap();
            assert_eq!(fragments, &[PIXELS.to_vec(), vec![9; 6]]);
        } else {
            assert_eq!(&pixel.to_bytes().unwrap()[..], &PIXELS);
        }
        // No private tag anywhere, no value of the subject anywhere in the output.
        let mut tags = Vec::new();
        all_tags(&obj, &mut tags);
        assert!(tags.iter().all(|t| (t >> 16) % 2 == 0), "{ts:?}");
        if ts != Ts::Deflated {
            for secret in [
                "DOE", "P12345", "WELBY", "SN-4711", "GENERAL", "ACC777", SOP_UID, STUDY_UID,
                REF_UID, "20240301", "19800229",
            ] {
                assert!(
                    !out.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} in the output of {ts:?}"
                );
            }
        }
    }
}

/// The top-level tags of a Part 10 object's data set, in order (a reader independent of
/// dicom-object, which sorts).
fn top_level_tags(part10: &[u8], ts: Ts) -> Vec<u32> {
    let meta = gateway_dicom::part10::read(part10).unwrap();
    let mut data = part10[meta.data_set_offset..].to_vec();
    if ts == Ts::Deflated {
        let mut z = flate2::read::DeflateDecoder::new(&data[..]);
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut z, &mut plain).unwrap();
        data = plain;
    }
    let mut tags = Vec::new();
    let mut pos = 0;
    // The encoding inside each open undefined-length element or item (UN: Implicit LE).
    let mut stack: Vec<Encoding> = Vec::new();
    while pos < data.len() {
        let enc = stack.last().copied().unwrap_or(ts.enc());
        let h = element::read_header_at(&data, pos, enc).unwrap();
        let tag = (u32::from(h.group) << 16) | u32::from(h.element);
        pos += h.header_len;
        if h.group == ITEM_GROUP {
            match h.element {
                0xE000 if h.len != UNDEFINED_LENGTH => pos += h.len as usize,
                0xE000 => stack.push(enc),
                _ => {
                    stack.pop().unwrap();
                }
            }
            continue;
        }
        if stack.is_empty() {
            tags.push(tag);
        }
        if h.len == UNDEFINED_LENGTH {
            stack.push(if h.vr == Some(*b"UN") {
                Encoding::IMPLICIT_LE
            } else {
                enc
            });
        } else {
            pos += h.len as usize;
        }
    }
    let depth = stack.len();
    assert_eq!(depth, 0);
    tags
}

#[test]
fn de_identification_attributes_are_in_tag_order_with_the_options() {
    let k = key();
    let opts = [
        ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
        ProfileOption::CleanDescriptors,
    ];
    for ts in ALL {
        let (out, _) = deidentify(&ct(ts), &profile(&opts), &k, false).unwrap();
        let tags = top_level_tags(&out, ts);
        let mut sorted = tags.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(tags, sorted, "{ts:?}: ascending, no duplicates");
        for t in [0x0012_0062, 0x0012_0063, 0x0012_0064, 0x0028_0303] {
            assert!(tags.contains(&t), "{t:08X} in {ts:?}");
        }
        let obj = open(&out);
        assert_eq!(text(&obj, 0x0028_0303).as_deref(), Some("MODIFIED"));
        let method = text(&obj, 0x0012_0063).unwrap();
        assert!(method.contains("Retain Longitudinal Temporal Information Modified Dates Option"));
        let codes: Vec<String> = items(&obj, 0x0012_0064)
            .iter()
            .map(|i| text(i, 0x0008_0100).unwrap())
            .collect();
        assert_eq!(codes.len(), 3);
        assert!(
            codes.contains(&"113100".into())
                && codes.contains(&"113107".into())
                && codes.contains(&"113105".into())
        );
    }
    let (out, _) = deidentify(
        &ct(Ts::ExplicitLe),
        &profile(&[ProfileOption::RetainLongitudinalTemporalInformationFullDates]),
        &k,
        false,
    )
    .unwrap();
    let obj = open(&out);
    assert_eq!(text(&obj, 0x0028_0303).as_deref(), Some("UNMODIFIED"));
    assert_eq!(
        text(&obj, 0x0008_0020).as_deref(),
        Some("20240301"),
        "K date"
    );
}

#[test]
fn options_keep_shift_and_clean_at_every_depth() {
    let k = key();
    let p = profile(&[
        ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
        ProfileOption::CleanDescriptors,
        ProfileOption::RetainDeviceIdentity,
        ProfileOption::RetainInstitutionIdentity,
        ProfileOption::RetainPatientCharacteristics,
    ]);
    let days = k.day_shift("HOSP", "P12345");
    let shifted = days_before("20240301", days);
    for ts in ALL {
        let (out, _) = deidentify(&ct(ts), &p, &k, false).unwrap();
        let obj = open(&out);
        assert_eq!(text(&obj, 0x0010_0040).as_deref(), Some("F"), "K sex");
        assert_eq!(text(&obj, 0x0010_1010).as_deref(), Some("044Y"), "K age");
        let mut level = obj.clone().into_inner();
        for depth in 0..=3 {
            let at = format!("{ts:?} depth {depth}");
            assert_eq!(
                text(&level, 0x0008_0020),
                Some(shifted.clone()),
                "C date {at}"
            );
            assert_eq!(
                text(&level, 0x0008_0030).as_deref(),
                Some("101500"),
                "C time {at}"
            );
            assert_eq!(
                text(&level, 0x0008_0080).as_deref(),
                Some("GENERAL HOSPITAL"),
                "K {at}"
            );
            assert_eq!(
                text(&level, 0x0018_1000).as_deref(),
                Some("SN-4711"),
                "K {at}"
            );
            assert_eq!(
                text(&level, 0x0008_1030),
                Some(format!("CT HEAD {depth}")),
                "C text without identity kept {at}"
            );
            // The institution is retained, and "Welby" (the referring physician) is
            // named in the comment: replaced.
            assert_eq!(
                text(&level, 0x0020_4000).as_deref(),
                Some("ANONYMIZED"),
                "C text {at}"
            );
            if depth < 3 {
                level = items(&level, 0x0008_1140).remove(0);
            }
        }
    }
}

#[test]
fn output_does_not_depend_on_the_split() {
    let p = profile(&[ProfileOption::RetainLongitudinalTemporalInformationModifiedDates]);
    for ts in ALL {
        let input = ct(ts);
        let whole = run(&input, &[], &p, false).unwrap();
        let ones: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            run(&input, &ones, &p, false).unwrap(),
            whole,
            "{ts:?} 1-byte feeds"
        );
        for cut in 0..=input.len() {
            assert_eq!(
                run(&input, &[cut], &p, false).unwrap(),
                whole,
                "{ts:?} cut {cut}"
            );
        }
        let mut seed = 0x9E37_79B9u32 ^ input.len() as u32;
        for _ in 0..50 {
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < input.len() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                at += 1 + (seed % 61) as usize;
                cuts.push(at);
            }
            assert_eq!(
                run(&input, &cuts, &p, false).unwrap(),
                whole,
                "{ts:?} random"
            );
        }
    }
}

#[test]
fn uids_are_consistent_within_and_across_objects_and_keyed() {
    let p = profile(&[]);
    let a = deidentify(&ct(Ts::ExplicitLe), &p, &key(), false).unwrap();
    let b = deidentify(&ct(Ts::ImplicitLe), &p, &key(), false).unwrap();
    let other = DestinationKey::from_bytes([7; 32]);
    let c = deidentify(&ct(Ts::ExplicitLe), &p, &other, false).unwrap();
    assert_eq!(a.1, b.1, "same objects, same key: same pseudonyms");
    assert_ne!(a.1.pseudo_study_uid, c.1.pseudo_study_uid);
    assert_ne!(a.1.pseudo_patient_id, c.1.pseudo_patient_id);
    let obj = open(&a.0);
    // The same Referenced SOP Instance UID at four depths maps to one UID.
    let mut refs = vec![text(&obj, 0x0008_1155).unwrap()];
    let mut level = obj.into_inner();
    for _ in 0..3 {
        level = items(&level, 0x0008_1140).remove(0);
        refs.push(text(&level, 0x0008_1155).unwrap());
    }
    assert!(refs.iter().all(|r| *r == key().uid(REF_UID)));
    // Retain UIDs keeps them (and the file meta's).
    let (out, done) = deidentify(
        &ct(Ts::ExplicitLe),
        &profile(&[ProfileOption::RetainUids]),
        &key(),
        false,
    )
    .unwrap();
    let obj = open(&out);
    assert_eq!(text(&obj, 0x0020_000D).as_deref(), Some(STUDY_UID));
    assert_eq!(obj.meta().media_storage_sop_instance_uid(), SOP_UID);
    assert_eq!(done.pseudo_study_uid, "");
}

#[test]
fn multi_valued_uids_and_date_ranges_are_rewritten_value_by_value() {
    let k = key();
    let p = profile(&[ProfileOption::RetainLongitudinalTemporalInformationModifiedDates]);
    let extra = [
        // Related General SOP Class UID is not in the table; Failed SOP Instance UID List
        // (0008,0058) is U.
        el(0x0008_0058, b"UI", &format!("{REF_UID}\\{SOP_UID}")),
        // Acquisition DateTime (C with the option): offset kept.
        el(0x0008_002A, b"DT", "20240301235959.123456+0100"),
        // Admitting Date (C): a range and a second value.
        el(0x0038_0020, b"DA", "20000301-20000302\\20241231"),
    ];
    let days = k.day_shift("HOSP", "P12345");
    let (out, _) = deidentify(&ct_with(Ts::ExplicitLe, &extra), &p, &k, false).unwrap();
    let obj = open(&out);
    assert_eq!(
        text(&obj, 0x0008_0058),
        Some(format!("{}\\{}", k.uid(REF_UID), k.uid(SOP_UID)))
    );
    assert_eq!(
        text(&obj, 0x0008_002A),
        Some(format!(
            "{}235959.123456+0100",
            days_before("20240301", days)
        ))
    );
    assert_eq!(
        text(&obj, 0x0038_0020),
        Some(format!(
            "{}-{}\\{}",
            days_before("20000301", days),
            days_before("20000302", days),
            days_before("20241231", days)
        ))
    );
}

fn sc(burned_in: Option<&str>) -> Vec<u8> {
    let sc = "1.2.840.10008.5.1.4.1.1.7";
    let mut nodes = vec![
        el(0x0008_0016, b"UI", sc),
        el(0x0008_0018, b"UI", SOP_UID),
        el(0x0010_0010, b"PN", "DOE^JANE"),
        Node::El(0x7FE0_0010, *b"OW", PIXELS.to_vec()),
    ];
    if let Some(b) = burned_in {
        nodes.push(el(0x0028_0301, b"CS", b));
    }
    part10(Ts::ExplicitLe, sc, &nodes)
}

#[test]
fn holds_name_their_reason_and_accepting_destinations_get_the_object() {
    let p = profile(&[]);
    let k = key();
    let held = |bytes: &[u8]| match deidentify(bytes, &p, &k, false) {
        Err(DeidError::Held(reason)) => reason,
        other => panic!("not held: {other:?}"),
    };
    assert!(matches!(held(&sc(None)), HoldReason::PixelText { .. }));
    assert!(matches!(
        held(&sc(Some("YES"))),
        HoldReason::BurnedInAnnotation
    ));
    assert!(deidentify(&sc(Some("NO")), &p, &k, false).is_ok());
    let ct_yes = ct_with(Ts::ExplicitLe, &[]);
    assert!(deidentify(&ct_yes, &p, &k, false).is_ok());
    let pdf = part10(
        Ts::ExplicitLe,
        "1.2.840.10008.5.1.4.1.1.104.1",
        &[el(0x0010_0010, b"PN", "DOE^JANE")],
    );
    assert!(matches!(
        held(&pdf),
        HoldReason::EncapsulatedDocument { .. }
    ));
    let e = deidentify(&pdf, &p, &k, false).unwrap_err().to_string();
    assert!(e.starts_with("held for de-identification: "), "{e}");
    for accepted in [sc(None), sc(Some("YES")), pdf] {
        assert!(deidentify(&accepted, &p, &k, true).is_ok());
    }
}

#[test]
fn truncated_input_is_an_error_or_a_shorter_data_set_never_a_panic() {
    let p = profile(&[]);
    for ts in ALL {
        let input = ct(ts);
        let meta_end = gateway_dicom::part10::read(&input).unwrap().data_set_offset;
        let whole = run(&input, &[], &p, false).unwrap().0;
        let mut errors = 0;
        for cut in 0..input.len() {
            match run(&input[..cut], &[cut / 2], &p, false) {
                Err(e) => {
                    errors += 1;
                    let text = e.to_string();
                    for secret in ["DOE", "P12345", SOP_UID, "WELBY"] {
                        assert!(!text.contains(secret), "{text}");
                    }
                }
                Ok((out, _)) => {
                    // Only a cut between two top-level elements makes a valid (shorter)
                    // object, and never for a deflated data set.
                    assert_ne!(ts, Ts::Deflated, "cut {cut}");
                    assert!(cut > meta_end, "cut {cut} inside the file meta group");
                    assert!(out.len() <= whole.len());
                }
            }
        }
        assert!(
            errors > input.len() * 9 / 10,
            "{ts:?}: {errors} of {}",
            input.len()
        );
    }
}

#[test]
fn a_value_to_rewrite_above_the_bound_is_too_large_and_kept_values_are_not_bounded() {
    let p = profile(&[]);
    let big_uid = "1.".repeat(MAX_HELD_VALUE as usize / 2 + 10);
    let input = part10(Ts::ImplicitLe, CT, &[el(0x0008_0018, b"UI", &big_uid)]);
    match deidentify(&input, &p, &key(), false) {
        Err(
            e @ DeidError::ValueTooLarge {
                group: 8,
                element: 0x18,
                ..
            },
        ) => {
            assert!(!e.to_string().contains("1.1.1"));
        }
        other => panic!("{other:?}"),
    }
    // A kept value (pixel data) far above the bound streams through.
    let pixels = vec![7u8; 3 * MAX_HELD_VALUE as usize];
    let input = part10(
        Ts::ExplicitLe,
        CT,
        &[Node::El(0x7FE0_0010, *b"OW", pixels.clone())],
    );
    let (out, _) = run(&input, &[1000, 70_000, 150_000], &p, false).unwrap();
    let obj = open(&out);
    assert_eq!(
        &obj.element(Tag(0x7FE0, 0x0010))
            .unwrap()
            .to_bytes()
            .unwrap()[..],
        &pixels[..]
    );
}

#[test]
fn malformed_framing_is_an_error() {
    let p = profile(&[]);
    let k = key();
    let mut bad_item = ct(Ts::ExplicitLe);
    // An item delimiter at top level.
    let mut stray = part10(Ts::ExplicitLe, CT, &[el(0x0008_0018, b"UI", SOP_UID)]);
    stray.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    assert!(matches!(
        deidentify(&stray, &p, &k, false),
        Err(DeidError::Malformed { .. })
    ));
    // Not Part 10.
    bad_item[128] = b'X';
    assert!(matches!(
        deidentify(&bad_item, &p, &k, false),
        Err(DeidError::Malformed { offset: 128, .. })
    ));
    // An element that runs past the end of its defined-length item.
    let inner = encode(&[el(0x0008_1155, b"UI", REF_UID)], Encoding::EXPLICIT_LE);
    let mut seq = Vec::new();
    header(
        &mut seq,
        Encoding::EXPLICIT_LE,
        0x0008_1140,
        Some(b"SQ"),
        inner.len() as u32 + 8,
    );
    header(
        &mut seq,
        Encoding::EXPLICIT_LE,
        0xFFFE_E000,
        None,
        inner.len() as u32 - 2,
    );
    seq.extend(&inner);
    let mut obj = part10(Ts::ExplicitLe, CT, &[]);
    obj.extend(seq);
    assert!(matches!(
        deidentify(&obj, &p, &k, false),
        Err(DeidError::Malformed { .. })
    ));
}

#[test]
fn subject_scan_reads_identity_in_every_encoding() {
    for ts in ALL {
        let s = Subject::scan(&ct(ts)).unwrap();
        assert_eq!(s.patient_id, "P12345", "{ts:?}");
        assert_eq!(s.issuer, "HOSP");
        assert_eq!(s.study_uid, STUDY_UID);
        for v in [
            "doe",
            "jane",
            "welby",
            "marcus",
            "acc777",
            "general hospital",
            "19800229",
        ] {
            assert!(
                s.identifying.iter().any(|i| i.eq_ignore_ascii_case(v)),
                "{v} {ts:?}"
            );
        }
    }
}

#[test]
fn un_encoded_attributes_are_decided_by_their_dictionary_vr() {
    let k = key();
    // Referenced Image Sequence sent as UN (defined length, items in Implicit VR LE) with
    // a private element and a UID inside; Study Instance UID and Patient's Birth Date
    // sent as UN too.
    let implicit = Encoding::IMPLICIT_LE;
    let item = encode(
        &[
            el(0x0008_1155, b"UI", REF_UID),
            el(0x0009_0010, b"LO", "ACME 1.0"),
            el(0x0009_1001, b"LO", "DOE SECRET"),
        ],
        implicit,
    );
    let mut seq = Vec::new();
    header(&mut seq, implicit, 0xFFFE_E000, None, item.len() as u32);
    seq.extend(&item);
    let nodes = [
        el(0x0008_0018, b"UI", SOP_UID),
        Node::El(0x0008_1140, *b"UN", seq),
        el(0x0010_0020, b"LO", "P12345"),
        Node::El(0x0010_0030, *b"UN", b"19800229".to_vec()),
        Node::El(0x0020_000D, *b"UN", format!("{STUDY_UID}\0").into_bytes()),
    ];
    let input = part10(Ts::ExplicitLe, CT, &nodes);
    let (out, done) = deidentify(&input, &profile(&[]), &k, false).unwrap();
    assert_eq!(done.pseudo_study_uid, k.uid(STUDY_UID));
    for secret in ["DOE SECRET", REF_UID, STUDY_UID, "19800229"] {
        assert!(
            !out.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} left in a UN element"
        );
    }
    let mapped = k.uid(REF_UID);
    assert!(out.windows(mapped.len()).any(|w| w == mapped.as_bytes()));
    let tags = top_level_tags(&out, Ts::ExplicitLe);
    assert!(tags.contains(&0x0008_1140) && tags.contains(&0x0020_000D));
}

#[test]
fn an_object_may_end_with_an_empty_value_of_any_action() {
    for last in [
        el(0x0040_0275, b"SQ", ""), // removed, empty
        el(0x0020_4000, b"LT", ""), // removed
        el(0x0008_0050, b"SH", ""), // zeroed
        el(0x0028_0010, b"US", ""), // kept
        el(0x0008_1155, b"UI", ""), // UID, held
    ] {
        let tag = tag_of(&last);
        let input = part10(Ts::ExplicitLe, CT, &[el(0x0008_0018, b"UI", SOP_UID), last]);
        let whole =
            run(&input, &[], &profile(&[]), false).unwrap_or_else(|e| panic!("{tag:08X}: {e}"));
        let ones: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(&input, &ones, &profile(&[]), false).unwrap(), whole);
        open(&whole.0);
    }
}

#[test]
fn a_large_deflated_object_is_the_same_in_any_chunking() {
    // Noise compresses poorly: the deflate stream is several 64 KiB feeds long, and the
    // inflater sometimes flushes what it holds without consuming input.
    let mut seed = 0x2545_F491u32;
    let noise: Vec<u8> = (0..512 * 512u32)
        .flat_map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (((i % 512) * 4 + (seed & 0xFF)) as u16 & 0x0FFF).to_le_bytes()
        })
        .collect();
    let input = ct_with(
        Ts::Deflated,
        &[Node::El(0x0020_9999, *b"OB", noise.clone())],
    );
    assert!(input.len() > 4 * 65536);
    let p = profile(&[]);
    let whole = run(&input, &[], &p, false).unwrap();
    for step in [65536, 65535, 4096, 1000] {
        let cuts: Vec<usize> = (step..input.len()).step_by(step).collect();
        assert_eq!(run(&input, &cuts, &p, false).unwrap(), whole, "step {step}");
    }
    let obj = open(&whole.0);
    assert_eq!(
        &obj.element(Tag(0x0020, 0x9999))
            .unwrap()
            .to_bytes()
            .unwrap()[..],
        &noise[..]
    );
}

#[test]
fn names_are_found_in_cleaned_text_after_decoding_in_the_character_set() {
    let k = key();
    let p = profile(&[ProfileOption::CleanDescriptors]);
    for (charset, name, comment) in [
        (
            "ISO_IR 192",
            "Müller^Jürgen".as_bytes().to_vec(),
            "Befund: MÜLLER".as_bytes().to_vec(),
        ),
        (
            "ISO_IR 100",
            b"M\xfcller^J\xfcrgen".to_vec(),
            b"Befund: M\xdcLLER".to_vec(),
        ),
    ] {
        let pad = |mut v: Vec<u8>| {
            if v.len() % 2 == 1 {
                v.push(b' ');
            }
            v
        };
        let nodes = [
            el(0x0008_0005, b"CS", charset),
            el(0x0008_0018, b"UI", SOP_UID),
            Node::El(0x0010_0010, *b"PN", pad(name)),
            el(0x0010_0020, b"LO", "P1"),
            Node::El(0x0020_4000, *b"LT", pad(comment)),
            // Not naming the subject: kept.
            el(0x0008_1030, b"LO", "Befund: unauffaellig"),
        ];
        let input = part10(Ts::ExplicitLe, CT, &nodes);
        let subject = Subject::scan(&input).unwrap();
        assert!(
            subject.identifying.iter().any(|i| i == "müller"),
            "{charset}"
        );
        let (out, _) = deidentify(&input, &p, &k, false).unwrap();
        let obj = open(&out);
        assert_eq!(
            text(&obj, 0x0020_4000).as_deref(),
            Some("ANONYMIZED"),
            "{charset}"
        );
        assert_eq!(
            text(&obj, 0x0008_1030).as_deref(),
            Some("Befund: unauffaellig")
        );
    }
}

/// A whole Overlay Plane module in repeating group `group`.
fn overlay(group: u16) -> Vec<Node> {
    let g = u32::from(group) << 16;
    vec![
        Node::El(g | 0x0010, *b"US", vec![4, 0]), // Overlay Rows
        Node::El(g | 0x0011, *b"US", vec![4, 0]), // Overlay Columns
        el(g | 0x0040, b"CS", "G"),               // Overlay Type
        Node::El(g | 0x0050, *b"SS", vec![1, 0, 1, 0]), // Overlay Origin
        Node::El(g | 0x0100, *b"US", vec![1, 0]), // Overlay Bits Allocated
        Node::El(g | 0x0102, *b"US", vec![0, 0]), // Overlay Bit Position
        Node::El(g | 0x3000, *b"OW", vec![0xA5, 0x5A]), // Overlay Data: X / C
        el(g | 0x4000, b"LT", "ARROW"),           // Overlay Comments: X / C
    ]
}

#[test]
fn overlays_are_removed_whole_or_kept_whole_with_clean_graphics() {
    let mut extra = overlay(0x6000);
    extra.extend(overlay(0x6002));
    // An overlay group inside an item too (any depth): the rule is by group.
    extra.push(Node::Sq(0x0008_1250, vec![overlay(0x601E)], true));
    for ts in [Ts::ExplicitLe, Ts::ImplicitLe] {
        let input = ct_with(ts, &extra);
        let (out, _) = deidentify(&input, &profile(&[]), &key(), false).unwrap();
        let mut tags = Vec::new();
        all_tags(&open(&out), &mut tags);
        let left: Vec<String> = tags
            .iter()
            .filter(|t| (0x6000..=0x601E).contains(&(*t >> 16)))
            .map(|t| format!("{t:08X}"))
            .collect();
        assert!(
            left.is_empty(),
            "{ts:?} basic keeps overlay elements {left:?}"
        );
        assert!(
            tags.contains(&0x0008_1250),
            "{ts:?} the sequence around one stays"
        );

        let (out, _) = deidentify(
            &input,
            &profile(&[ProfileOption::CleanGraphics]),
            &key(),
            false,
        )
        .unwrap();
        let obj = open(&out);
        for group in [0x6000u32, 0x6002] {
            for element in [
                0x0010u32, 0x0011, 0x0040, 0x0050, 0x0100, 0x0102, 0x3000, 0x4000,
            ] {
                let tag = (group << 16) | element;
                assert!(has(&obj, tag), "{ts:?} clean_graphics keeps {tag:08X}");
            }
            let data = obj
                .element(Tag(group as u16, 0x3000))
                .unwrap()
                .to_bytes()
                .unwrap()
                .to_vec();
            assert_eq!(data, [0xA5, 0x5A], "{ts:?} overlay data {group:04X}");
        }
        assert_eq!(text(&obj, 0x6002_4000).as_deref(), Some("ARROW"));
        let nested = items(&obj, 0x0008_1250);
        assert!(has(&nested[0], 0x601E_3000), "{ts:?} nested overlay kept");
    }
}

const SR: &str = "1.2.840.10008.5.1.4.1.1.88.22"; // Enhanced SR
const SR_TEXT: &str = "Nodule 4 mm, stable";
const SR_TEXT_NAMED: &str = "Discussed with Jane Doe";
const SR_DATE: &str = "20231115";
const SR_TIME: &str = "142233.123456";
const SR_DATETIME: &str = "20231116091507";
const SR_NUM: &str = "4711.25";
const SR_PNAME: &str = "ROE^RICHARD";
const SR_UID: &str = "1.2.826.0.1.3680043.2.1125.1.555";
const SR_UNKNOWN: &str = "HIDDEN 99117";

/// A code item (Code Sequence Macro).
fn code(value: &str, scheme: &str, meaning: &str) -> Vec<Node> {
    vec![
        el(0x0008_0100, b"SH", value),
        el(0x0008_0102, b"SH", scheme),
        el(0x0008_0104, b"LO", meaning),
    ]
}

/// An SR content item: Relationship Type, Value Type, Concept Name Code Sequence, and
/// its value.
fn content_item(value_type: &str, concept: &str, value: Vec<Node>) -> Vec<Node> {
    let mut item = vec![
        el(0x0040_A010, b"CS", "CONTAINS"),
        el(0x0040_A040, b"CS", value_type),
        Node::Sq(
            0x0040_A043,
            vec![code(concept, "99TEST", &format!("Concept {concept}"))],
            true,
        ),
    ];
    item.extend(value);
    item
}

/// An SR whose Content Sequence holds, two levels deep, one content item of each value
/// type that carries a value (and a TEXT naming the patient).
fn sr(ts: Ts, defined: bool) -> Vec<u8> {
    let leaves = vec![
        content_item(
            "TEXT",
            "T1",
            vec![
                el(0x0040_A160, b"UT", SR_TEXT),
                // A tag no dictionary knows (UN in Explicit VR, no VR in Implicit VR).
                Node::El(0x0040_FFF0, *b"UN", SR_UNKNOWN.as_bytes().to_vec()),
            ],
        ),
        content_item("TEXT", "T2", vec![el(0x0040_A160, b"UT", SR_TEXT_NAMED)]),
        content_item("DATE", "D1", vec![el(0x0040_A121, b"DA", SR_DATE)]),
        content_item("TIME", "TM1", vec![el(0x0040_A122, b"TM", SR_TIME)]),
        content_item("DATETIME", "DT1", vec![el(0x0040_A120, b"DT", SR_DATETIME)]),
        content_item(
            "NUM",
            "N1",
            vec![Node::Sq(
                0x0040_A300,
                vec![vec![
                    Node::Sq(0x0040_08EA, vec![code("mm", "UCUM", "millimeter")], defined),
                    el(0x0040_A30A, b"DS", SR_NUM),
                ]],
                defined,
            )],
        ),
        content_item("PNAME", "P1", vec![el(0x0040_A123, b"PN", SR_PNAME)]),
        content_item("UIDREF", "U1", vec![el(0x0040_A124, b"UI", SR_UID)]),
        content_item(
            "IMAGE",
            "I1",
            vec![Node::Sq(
                0x0008_1199,
                vec![vec![
                    el(0x0008_1150, b"UI", CT),
                    el(0x0008_1155, b"UI", REF_UID),
                    el(0x0008_1160, b"IS", "3"), // Referenced Frame Number
                ]],
                defined,
            )],
        ),
        content_item(
            "SCOORD",
            "S1",
            vec![
                el(0x0070_0023, b"CS", "POINT"),
                // Graphic Data (FL): 12.5, 40.0
                Node::El(
                    0x0070_0022,
                    *b"FL",
                    [12.5f32.to_le_bytes(), 40.0f32.to_le_bytes()].concat(),
                ),
            ],
        ),
    ];
    let mut container = content_item("CONTAINER", "C1", vec![]);
    container.push(el(0x0040_A050, b"CS", "SEPARATE"));
    container.push(Node::Sq(0x0040_A730, leaves, !defined));
    let nodes = vec![
        el(0x0008_0005, b"CS", "ISO_IR 100"),
        el(0x0008_0016, b"UI", SR),
        el(0x0008_0018, b"UI", SOP_UID),
        el(0x0010_0010, b"PN", "DOE^JANE"),
        el(0x0010_0020, b"LO", "P12345"),
        el(0x0020_000D, b"UI", STUDY_UID),
        el(0x0040_A040, b"CS", "CONTAINER"),
        Node::Sq(0x0040_A730, vec![container], defined),
    ];
    part10(ts, SR, &nodes)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_dummy_content_sequence_keeps_its_structure_and_codes_not_its_values() {
    let k = key();
    for ts in [Ts::ExplicitLe, Ts::ImplicitLe] {
        for defined in [true, false] {
            let at = format!("{ts:?} defined {defined}");
            let input = sr(ts, defined);
            for v in [
                SR_TEXT,
                SR_DATE,
                SR_TIME,
                SR_DATETIME,
                SR_NUM,
                SR_PNAME,
                SR_UID,
            ] {
                assert!(contains(&input, v), "{at}: the input carries {v}");
            }
            let (out, _) = deidentify(&input, &profile(&[]), &k, false).unwrap();
            for v in [
                SR_TEXT,
                SR_TEXT_NAMED,
                SR_DATE,
                SR_TIME,
                SR_DATETIME,
                SR_NUM,
                SR_PNAME,
                "RICHARD",
                SR_UID,
                REF_UID,
                SR_UNKNOWN,
            ] {
                assert!(!contains(&out, v), "{at}: {v} survives");
            }
            let obj = open(&out);
            let container = items(&obj, 0x0040_A730).remove(0);
            assert_eq!(text(&container, 0x0040_A040).as_deref(), Some("CONTAINER"));
            assert_eq!(text(&container, 0x0040_A050).as_deref(), Some("SEPARATE"));
            let leaves = items(&container, 0x0040_A730);
            let types: Vec<_> = leaves
                .iter()
                .map(|i| text(i, 0x0040_A040).unwrap_or_default())
                .collect();
            assert_eq!(
                types,
                [
                    "TEXT", "TEXT", "DATE", "TIME", "DATETIME", "NUM", "PNAME", "UIDREF", "IMAGE",
                    "SCOORD"
                ],
                "{at}"
            );
            for (leaf, concept) in leaves
                .iter()
                .zip(["T1", "T2", "D1", "TM1", "DT1", "N1", "P1", "U1", "I1", "S1"])
            {
                let name = items(leaf, 0x0040_A043).remove(0);
                assert_eq!(text(&name, 0x0008_0100).as_deref(), Some(concept), "{at}");
                assert_eq!(text(&name, 0x0008_0102).as_deref(), Some("99TEST"), "{at}");
                assert_eq!(
                    text(&name, 0x0008_0104),
                    Some(format!("Concept {concept}")),
                    "{at}"
                );
                assert_eq!(text(leaf, 0x0040_A010).as_deref(), Some("CONTAINS"), "{at}");
            }
            let value = |i: usize, tag: u32| text(&leaves[i], tag);
            assert_eq!(value(0, 0x0040_A160).as_deref(), Some("ANONYMIZED"), "{at}");
            assert_eq!(value(2, 0x0040_A121).as_deref(), Some("19000101"), "{at}");
            assert_eq!(value(3, 0x0040_A122).as_deref(), Some("000000.00"), "{at}");
            assert_eq!(
                value(4, 0x0040_A120).as_deref(),
                Some("19000101000000"),
                "{at}"
            );
            let measured = items(&leaves[5], 0x0040_A300).remove(0);
            assert_eq!(text(&measured, 0x0040_A30A).as_deref(), Some("0"), "{at}");
            let units = items(&measured, 0x0040_08EA).remove(0);
            assert_eq!(text(&units, 0x0008_0100).as_deref(), Some("mm"), "{at}");
            assert_eq!(
                text(&units, 0x0008_0104).as_deref(),
                Some("millimeter"),
                "{at}"
            );
            assert_eq!(value(6, 0x0040_A123).as_deref(), Some("ANONYMIZED"), "{at}");
            assert_eq!(value(7, 0x0040_A124), Some(k.uid(SR_UID)), "{at}");
            let reference = items(&leaves[8], 0x0008_1199).remove(0);
            assert_eq!(
                text(&reference, 0x0008_1150).as_deref(),
                Some(CT),
                "{at} class"
            );
            assert_eq!(text(&reference, 0x0008_1155), Some(k.uid(REF_UID)), "{at}");
            // Where a reference points is kept: a frame number, image coordinates.
            assert_eq!(text(&reference, 0x0008_1160).as_deref(), Some("3"), "{at}");
            let points = leaves[9]
                .element(Tag(0x0070, 0x0022))
                .unwrap()
                .to_multi_float32()
                .unwrap();
            assert_eq!(points, [12.5, 40.0], "{at} graphic data");

            // clean_structured_content: the Content Sequence is C, its text cleaned.
            let p = profile(&[ProfileOption::CleanStructuredContent]);
            let (out, _) = deidentify(&input, &p, &k, false).unwrap();
            let obj = open(&out);
            let container = items(&obj, 0x0040_A730).remove(0);
            let leaves = items(&container, 0x0040_A730);
            assert_eq!(
                text(&leaves[0], 0x0040_A160).as_deref(),
                Some(SR_TEXT),
                "{at}"
            );
            assert_eq!(
                text(&leaves[1], 0x0040_A160).as_deref(),
                Some("ANONYMIZED"),
                "{at}: a text naming the patient"
            );
            assert!(!contains(&out, SR_TEXT_NAMED), "{at}");
        }
        // Split invariance of the Dummy subtree.
        let input = sr(ts, true);
        let p = profile(&[]);
        let whole = run(&input, &[], &p, false).unwrap();
        for cut in 0..=input.len() {
            assert_eq!(
                run(&input, &[cut], &p, false).unwrap(),
                whole,
                "{ts:?} cut {cut}"
            );
        }
        let ones: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            run(&input, &ones, &p, false).unwrap(),
            whole,
            "{ts:?} 1-byte"
        );
    }
}

#[test]
fn codes_that_are_the_identity_in_a_dummy_code_sequence_get_dummies() {
    let input = ct_with(
        Ts::ExplicitLe,
        &[
            // Institution Code Sequence (X/Z/D: D): the code names the institution.
            Node::Sq(
                0x0008_0082,
                vec![code("GH-0042", "99HOSP", "General Hospital East")],
                true,
            ),
            // Operator Identification Sequence (X/D) > Person Identification Code
            // Sequence (D).
            Node::Sq(
                0x0008_1072,
                vec![vec![Node::Sq(
                    0x0040_1101,
                    vec![code("EMP-7781", "99HOSP", "Operator Smithers")],
                    false,
                )]],
                true,
            ),
        ],
    );
    let (out, _) = deidentify(&input, &profile(&[]), &key(), false).unwrap();
    for v in [
        "GH-0042",
        "General Hospital East",
        "EMP-7781",
        "Smithers",
        "99HOSP",
    ] {
        assert!(!contains(&out, v), "{v} survives");
    }
    let obj = open(&out);
    let institution = items(&obj, 0x0008_0082).remove(0);
    assert_eq!(
        text(&institution, 0x0008_0100).as_deref(),
        Some("ANONYMIZED")
    );
    let operator = items(&obj, 0x0008_1072).remove(0);
    let person = items(&operator, 0x0040_1101).remove(0);
    assert_eq!(text(&person, 0x0008_0104).as_deref(), Some("ANONYMIZED"));
    // retain_institution_identity keeps the Institution Code Sequence (K) as it is.
    let p = profile(&[ProfileOption::RetainInstitutionIdentity]);
    let (out, _) = deidentify(&input, &p, &key(), false).unwrap();
    assert!(contains(&out, "General Hospital East"));
}
