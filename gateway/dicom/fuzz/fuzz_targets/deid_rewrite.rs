//! The streaming de-identifier must never panic on any bytes, and its output (or error)
//! must not depend on where the stream was split: the whole input at once, the input cut
//! at a fuzzer-chosen point, and the input fed in small steps give the same bytes and the
//! same verdict. What it writes must read back through `Subject::scan` without a panic.
#![no_main]

use gateway_deid::{
    DeidError, Deidentified, Deidentifier, DestinationKey, Profile, ProfileOption, Subject,
};
use libfuzzer_sys::fuzz_target;

fn rewrite(
    data: &[u8],
    cuts: &[usize],
    profile: &Profile,
    accept: bool,
) -> Result<(Vec<u8>, Deidentified), DeidError> {
    // An object whose subject cannot be read is still fed to the rewriter.
    let subject = Subject::scan(data).unwrap_or_default();
    let key = DestinationKey::from_bytes([3; 32]);
    let mut d = Deidentifier::new(profile.clone(), key, subject, accept);
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, data.len());
        d.feed(&data[start..end], &mut out)?;
        start = end;
    }
    d.feed(&data[start..], &mut out)?;
    let done = d.finish(&mut out)?;
    Ok((out, done))
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    // Bytes 0-1: the split point; byte 2: options and burned-in acceptance; byte 3: step.
    let split = usize::from(u16::from_le_bytes([input[0], input[1]]));
    let flags = input[2];
    let step = usize::from(input[3]).max(1);
    let data = &input[4..];
    let mut options = Vec::new();
    for (bit, option) in [
        ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
        ProfileOption::RetainUids,
        ProfileOption::CleanDescriptors,
        ProfileOption::RetainDeviceIdentity,
        ProfileOption::CleanGraphics,
        ProfileOption::RetainPatientCharacteristics,
    ]
    .into_iter()
    .enumerate()
    {
        if flags & (1 << bit) != 0 {
            options.push(option);
        }
    }
    let Ok(profile) = Profile::new(&options) else {
        return;
    };
    let accept = flags & 0x80 != 0;
    let whole = rewrite(data, &[], &profile, accept);
    let cut = rewrite(data, &[split % (data.len() + 1)], &profile, accept);
    assert_eq!(whole, cut, "result depends on the split");
    let steps: Vec<usize> = (step..data.len()).step_by(step).collect();
    let stepped = rewrite(data, &steps, &profile, accept);
    assert_eq!(whole, stepped, "result depends on the chunk size");
    if let Ok((out, _)) = whole {
        let _ = Subject::scan(&out);
    }
});
