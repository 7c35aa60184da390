//! The data set walker must never panic, and its verdict must not depend on how the
//! bytes were split into PDVs: feeding everything at once and feeding it in arbitrary
//! pieces gives the same result.
#![no_main]

use gateway_dicom::walker::{Encoding, Walker};
use libfuzzer_sys::fuzz_target;

fn walk(enc: Encoding, data: &[u8], cuts: &[usize]) -> Result<gateway_dicom::walker::Summary, gateway_dicom::walker::WalkError> {
    let mut w = Walker::new(enc);
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, data.len());
        w.feed(&data[start..end])?;
        start = end;
    }
    w.feed(&data[start..])?;
    w.finish()
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let enc = Encoding { explicit_vr: input[0] & 1 == 0, big_endian: input[0] & 2 != 0, deflated: input[0] & 4 != 0 };
    let step = usize::from(input[1]).max(1);
    let data = &input[2..];
    let cuts: Vec<usize> = (step..data.len()).step_by(step).collect();
    let whole = walk(enc, data, &[]);
    let pieces = walk(enc, data, &cuts);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("verdict depends on the split: {whole:?} vs {pieces:?}"),
    }
});
