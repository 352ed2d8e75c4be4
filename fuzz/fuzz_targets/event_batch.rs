//! A batch (`application/cloudevents-batch+json`, or a JSON array): the fast batch decoder
//! agrees with decoding each element on its own.
#![no_main]
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tally_schemas::event::{BatchError, decode_batch, decode_event};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A small limit, so that bodies past it are fuzzed too: they are refused with the exact
    // count, never decoded in part.
    const MAX: usize = 16;
    let results = match decode_batch(text, &common::CATALOG, &common::POLICY, common::NOW_MS, MAX) {
        Ok(results) => results,
        Err(BatchError::TooMany(n)) => {
            let all = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text)
                .expect("a body counted past the limit is a JSON array");
            assert!(n > MAX);
            assert_eq!(all.len(), n);
            return;
        }
        Err(BatchError::Invalid(_)) => return,
    };
    // The whole body is a JSON array: decoding each element's own text gives the same result
    // (the same event, or an error with the same code).
    if let Ok(items) = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text) {
        assert_eq!(items.len(), results.len());
        for (item, got) in items.iter().zip(&results) {
            let one = decode_event(
                item.get(),
                &common::CATALOG,
                &common::POLICY,
                common::NOW_MS,
            );
            match (one, got) {
                (Ok(a), Ok(b)) => assert_eq!(&a, b),
                (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "element {}", item.get()),
                (a, b) => panic!("element {}: alone {a:?}, in the batch {b:?}", item.get()),
            }
        }
    }
});
