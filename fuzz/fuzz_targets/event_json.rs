//! One CloudEvent (`application/json`, `application/cloudevents+json`): any bytes decode to an
//! event or an error, never a panic; an accepted event satisfies the contract's invariants.
#![no_main]
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tally_schemas::event::{check_customer_id, decode_event};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_event(text, &common::CATALOG, &common::POLICY, common::NOW_MS) {
        Ok(e) => {
            assert!(check_customer_id(&e.customer).is_ok());
            assert!(common::CATALOG.meter(&e.meter).is_some());
            assert!(!e.id.is_empty() && !e.source.is_empty());
            assert!(e.time_ms >= common::NOW_MS - common::POLICY.late_window_ms);
            assert!(e.time_ms <= common::NOW_MS + common::POLICY.future_tolerance_ms);
            assert!(e.value <= i64::MAX as u64);
        }
        // Every error carries one of the documented codes.
        Err(err) => assert!(tally_schemas::EventError::CODES.contains(&err.code())),
    }
});
