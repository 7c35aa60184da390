//! Opening a sealed blob from disk must fail cleanly on any corruption: arbitrary bytes
//! never panic and never yield plaintext; a real blob with one byte changed never opens.
#![no_main]

use gateway_keystore::{KEY_LEN, MasterKey};
use gateway_spool::seal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let key = MasterKey::from_bytes([9; KEY_LEN]);
    let mut out = Vec::new();
    // Forging a blob would need the GCM tag of an unknown data key.
    assert!(seal::open(&key, input, input.len() as u64, &mut out).is_err());

    // Seal the input, flip one byte chosen by the input, and require failure.
    let Ok(mut sealer) = seal::Sealer::new(&key, &[1; 16]) else { return };
    let mut blob = sealer.header().to_vec();
    if sealer.update(input, &mut blob).is_err() || sealer.finish(&mut blob).is_err() {
        return;
    }
    let mut plain = Vec::new();
    assert!(seal::open(&key, blob.as_slice(), blob.len() as u64, &mut plain).is_ok());
    assert_eq!(plain, input);
    if let Some(&b) = input.first() {
        let pos = usize::from(b) * 131 % blob.len();
        blob[pos] ^= 0x01;
        let mut junk = Vec::new();
        assert!(seal::open(&key, blob.as_slice(), blob.len() as u64, &mut junk).is_err());
    }
});
