//! NDJSON (`application/x-ndjson`): every non-blank line decodes to an event or an error.
#![no_main]
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tally_schemas::event::{decode_event, split_ndjson};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    let mut n = 0;
    for line in split_ndjson(text) {
        n += 1;
        let _ = decode_event(line, &common::CATALOG, &common::POLICY, common::NOW_MS);
    }
    assert_eq!(n, lines);
});
