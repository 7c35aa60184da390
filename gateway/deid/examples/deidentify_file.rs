//! De-identifies one Part 10 file for looking at the result with DCMTK or dciodvfy by hand:
//! `cargo run -p gateway-deid --example deidentify_file -- IN OUT` (basic profile with the
//! modified-dates and clean-descriptors options, a fixed test key).

use gateway_deid::{DestinationKey, Profile, ProfileOption};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: deidentify_file IN OUT".into());
    };
    let profile = Profile::new(&[
        ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
        ProfileOption::CleanDescriptors,
    ])?;
    let key = DestinationKey::from_bytes([9; 32]);
    let (out, _) = gateway_deid::deidentify(&std::fs::read(input)?, &profile, &key, false)?;
    std::fs::write(output, out)?;
    Ok(())
}
