//! The NBD server's handshake and request parser on arbitrary client bytes: it must never
//! panic, and every command it lets through must lie inside the export.
#![no_main]

use hapair_agent::nbd::proto::{Action, Op, run_session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (actions, _) = run_session(data);
    for a in actions {
        if let Action::Execute(cmd) = a {
            let (offset, len) = match cmd.op {
                Op::Read { offset, len } | Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                    (offset, u64::from(len))
                }
                Op::Write { offset, data, .. } => (offset, data.len() as u64),
                Op::Flush => (0, 0),
            };
            assert!(offset.checked_add(len).is_some_and(|end| end <= 1 << 20));
        }
    }
});
