//! The MLLP decoder must never panic, never buffer more than `max_frame` plus the input not
//! yet consumed, and its events must not depend on how the stream was split into reads.
#![no_main]

use gateway_hl7::mllp::{MllpDecoder, decode_all};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let max_frame = usize::from(input[0]);
    let step = usize::from(input[1]).max(1);
    let data = &input[2..];
    let cuts: Vec<usize> = (step..data.len()).step_by(step).collect();
    let whole = decode_all(max_frame, data, &[]);
    let pieces = decode_all(max_frame, data, &cuts);
    assert_eq!(whole, pieces, "events depend on the split");

    // Bounded memory: after draining, only the partial frame (<= max_frame) is held.
    let mut d = MllpDecoder::new(max_frame);
    for chunk in data.chunks(step) {
        d.feed(chunk);
        while d.next_event().is_some() {}
        assert!(d.buffered() <= max_frame, "buffered {} > {max_frame}", d.buffered());
    }
});
