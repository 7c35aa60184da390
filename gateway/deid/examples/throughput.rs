//! Throughput of the de-identifier on a 0.5 MB CT object, plain and deflated (a measuring
//! tool, not a test: `cargo run -p gateway-deid --release --example throughput`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

use gateway_deid::{Deidentifier, DestinationKey, Profile, ProfileOption, Subject};

fn el(out: &mut Vec<u8>, tag: u32, vr: &[u8; 2], value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    out.extend(((tag >> 16) as u16).to_le_bytes());
    out.extend((tag as u16).to_le_bytes());
    out.extend(vr);
    if gateway_dicom::element::is_long_vr(*vr) {
        out.extend([0, 0]);
        out.extend((v.len() as u32).to_le_bytes());
    } else {
        out.extend((v.len() as u16).to_le_bytes());
    }
    out.extend(v);
}

/// A CT slice: the usual ~60 header attributes and 512 x 512 x 16-bit pixels.
fn ct_slice(n: u32) -> Vec<u8> {
    let mut meta = Vec::new();
    el(&mut meta, 0x0002_0001, b"OB", &[0, 1]);
    el(&mut meta, 0x0002_0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2");
    el(
        &mut meta,
        0x0002_0003,
        b"UI",
        format!("1.2.3.4.5.{n}").as_bytes(),
    );
    el(&mut meta, 0x0002_0010, b"UI", b"1.2.840.10008.1.2.1");
    let mut out = vec![0u8; 128];
    out.extend(b"DICM");
    el(
        &mut out,
        0x0002_0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    );
    out.extend(meta);
    let text: [(u32, &[u8; 2], &str); 40] = [
        (0x0008_0005, b"CS", "ISO_IR 100"),
        (0x0008_0008, b"CS", "ORIGINAL\\PRIMARY\\AXIAL"),
        (0x0008_0016, b"UI", "1.2.840.10008.5.1.4.1.1.2"),
        (0x0008_0018, b"UI", "1.2.3.4.5.9"),
        (0x0008_0020, b"DA", "20240301"),
        (0x0008_0021, b"DA", "20240301"),
        (0x0008_0022, b"DA", "20240301"),
        (0x0008_0023, b"DA", "20240301"),
        (0x0008_0030, b"TM", "101500"),
        (0x0008_0031, b"TM", "101500"),
        (0x0008_0032, b"TM", "101500"),
        (0x0008_0033, b"TM", "101500"),
        (0x0008_0050, b"SH", "ACC777"),
        (0x0008_0060, b"CS", "CT"),
        (0x0008_0070, b"LO", "ACME MEDICAL"),
        (0x0008_0080, b"LO", "GENERAL HOSPITAL"),
        (0x0008_0090, b"PN", "WELBY^MARCUS"),
        (0x0008_1010, b"SH", "CT01"),
        (0x0008_1030, b"LO", "CT HEAD"),
        (0x0008_103E, b"LO", "AXIAL 5MM"),
        (0x0008_1090, b"LO", "SCANNER 9000"),
        (0x0010_0010, b"PN", "DOE^JANE"),
        (0x0010_0020, b"LO", "P12345"),
        (0x0010_0030, b"DA", "19800229"),
        (0x0010_0040, b"CS", "F"),
        (0x0010_1010, b"AS", "044Y"),
        (0x0018_0015, b"CS", "HEAD"),
        (0x0018_0050, b"DS", "5.0"),
        (0x0018_0060, b"DS", "120"),
        (0x0018_1000, b"LO", "SN-4711"),
        (0x0018_1020, b"LO", "V1.2.3"),
        (0x0018_5100, b"CS", "HFS"),
        (0x0020_000D, b"UI", "1.2.3.4.5.7"),
        (0x0020_000E, b"UI", "1.2.3.4.5.8"),
        (0x0020_0011, b"IS", "3"),
        (0x0020_0013, b"IS", "1"),
        (0x0020_0032, b"DS", "-250\\-250\\100"),
        (0x0020_0037, b"DS", "1\\0\\0\\0\\1\\0"),
        (0x0020_0052, b"UI", "1.2.3.4.5.6"),
        (0x0020_1041, b"DS", "100"),
    ];
    for (tag, vr, v) in text {
        el(&mut out, tag, vr, v.as_bytes());
    }
    for (tag, v) in [
        (0x0028_0002u32, 1u16),
        (0x0028_0010, 512),
        (0x0028_0011, 512),
        (0x0028_0100, 16),
        (0x0028_0101, 12),
        (0x0028_0102, 11),
        (0x0028_0103, 0),
    ] {
        el(&mut out, tag, b"US", &v.to_le_bytes());
    }
    el(&mut out, 0x0028_0004, b"CS", b"MONOCHROME2");
    el(&mut out, 0x0028_1050, b"DS", b"40");
    el(&mut out, 0x0028_1051, b"DS", b"400");
    // 12-bit noise on a slope: compresses about as poorly as a CT slice does.
    let mut seed = 0x2545_F491u32 ^ n;
    let pixels: Vec<u8> = (0..512 * 512u32)
        .flat_map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let v = ((i % 512) * 4 + (seed & 0xFF)) as u16 & 0x0FFF;
            v.to_le_bytes()
        })
        .collect();
    el(&mut out, 0x7FE0_0010, b"OW", &pixels);
    out
}

fn main() {
    throughput_of_half_megabyte_ct_slices();
    throughput_of_deflated_ct_slices();
}

fn throughput_of_half_megabyte_ct_slices() {
    let key = DestinationKey::from_bytes([1; 32]);
    let profile =
        Profile::new(&[ProfileOption::RetainLongitudinalTemporalInformationModifiedDates]).unwrap();
    let objects: Vec<Vec<u8>> = (0..8).map(ct_slice).collect();
    let n = 2000;
    let mut bytes = 0u64;
    let mut out = Vec::with_capacity(600 * 1024);
    let start = Instant::now();
    for i in 0..n {
        let input = &objects[i % objects.len()];
        let subject = Subject::scan(input).unwrap();
        let mut d = Deidentifier::new(profile.clone(), key.clone(), subject, false);
        out.clear();
        // As the uplink reads the spool: 64 KiB at a time.
        for chunk in input.chunks(64 * 1024) {
            d.feed(chunk, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        assert!(out.len() > input.len() - 200, "the pixel data was written");
        bytes += input.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} objects of {} bytes in {secs:.3} s: {:.0} objects/s, {:.0} MB/s",
        objects[0].len(),
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    assert!(n as f64 / secs >= 200.0);
}

fn throughput_of_deflated_ct_slices() {
    use std::io::Write;
    let key = DestinationKey::from_bytes([1; 32]);
    let profile = Profile::new(&[]).unwrap();
    let plain = ct_slice(1);
    // Same object, data set deflated: the file meta group ends at the first non-0002 tag.
    let meta_end = gateway_dicom::part10::read(&plain).unwrap().data_set_offset;
    let ts = b"1.2.840.10008.1.2.1.99\0";
    let mut object = plain[..meta_end].to_vec();
    let at = object
        .windows(19)
        .position(|w| w == b"1.2.840.10008.1.2.1")
        .unwrap();
    object.splice(at..at + 20, ts[..22].iter().copied());
    object[at - 2] = 22;
    let group_len = u32::from_le_bytes(object[140..144].try_into().unwrap()) + 2;
    object[140..144].copy_from_slice(&group_len.to_le_bytes());
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&plain[meta_end..]).unwrap();
    object.extend(z.finish().unwrap());
    let n = 50;
    let start = Instant::now();
    let mut out = Vec::new();
    for _ in 0..n {
        let subject = Subject::scan(&object).unwrap();
        let mut d = Deidentifier::new(profile.clone(), key.clone(), subject, false);
        out.clear();
        for chunk in object.chunks(64 * 1024) {
            d.feed(chunk, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} deflated objects ({} bytes inflated, {} deflated) in {secs:.3} s: {:.0} objects/s, {:.0} MB/s inflated",
        plain.len(),
        object.len(),
        n as f64 / secs,
        (n * plain.len()) as f64 / secs / 1e6
    );
}
