//! The Patient ID rewriter and the identifier reader must never panic, and the rewriter's
//! output (or error) must not depend on how the stream was split: feeding everything at
//! once and feeding it in arbitrary pieces gives the same bytes and the same verdict.
//! When it succeeds, the output reads back with the clinic's Patient ID.
#![no_main]

use gateway_dicom::reconcile::{
    ClinicIdentity, ReconcileError, Rewriter, Rewritten, read_identifiers,
};
use libfuzzer_sys::fuzz_target;

fn clinic() -> ClinicIdentity {
    ClinicIdentity {
        patient_id: "CL-0042".into(),
        issuer: "CLINIC-A".into(),
    }
}

fn rewrite(
    data: &[u8],
    cuts: &[usize],
    max: usize,
) -> Result<(Vec<u8>, Rewritten), ReconcileError> {
    let mut r = Rewriter::with_max_prefix(clinic(), max);
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, data.len());
        r.feed(&data[start..end], &mut out)?;
        start = end;
    }
    r.feed(&data[start..], &mut out)?;
    let done = r.finish(&mut out)?;
    Ok((out, done))
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    // Byte 0: chunk size; byte 1: prefix limit (small limits reach the PrefixTooLong path).
    let step = usize::from(input[0]).max(1);
    let max = if input[1] == 0 {
        1 << 20
    } else {
        132 + 8 * usize::from(input[1])
    };
    let data = &input[2..];
    let cuts: Vec<usize> = (step..data.len()).step_by(step).collect();
    let whole = rewrite(data, &[], max);
    let pieces = rewrite(data, &cuts, max);
    assert_eq!(whole, pieces, "result depends on the split");
    let ids = read_identifiers(data);
    if let Ok((out, done)) = whole {
        assert_eq!(done.bytes_in, data.len() as u64);
        assert_eq!(done.bytes_out, out.len() as u64);
        if done.changed {
            // The rewritten prefix reads back with the clinic's ID, unless the object
            // ends before the Study Instance UID inside an element the reader needs.
            if let Ok(back) = read_identifiers(&out) {
                assert_eq!(back.patient_id.as_deref(), Some("CL-0042"));
                assert_eq!(back.issuer_of_patient_id.as_deref(), Some("CLINIC-A"));
            }
        }
    }
    let _ = ids;
});
