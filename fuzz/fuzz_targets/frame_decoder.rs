//! The replication frame decoder on arbitrary peer bytes: it must never panic, and every
//! frame it accepts must encode back to itself.
#![no_main]

use hapair_agent::replication::wire::{decode_all, decode_frame, encode_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (frames, _) = decode_all(data);
    for env in frames {
        let mut again = encode_envelope(&env);
        assert_eq!(decode_frame(&mut again), Ok(Some(env)));
    }
});
