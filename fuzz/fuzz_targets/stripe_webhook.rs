//! The Stripe webhook's signature check and event parser. The input is split into a
//! `Stripe-Signature` header and a body: arbitrary headers never pass, never panic; a body
//! signed with the secret always passes the check, and then parses or is refused with a code.
#![no_main]

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use tally_billing_sync::webhooks::{parse_event, verify};

const SECRET: &str = "whsec_fuzz";
const NOW_S: i64 = 1_795_255_200;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    if verify(SECRET, &header, body, NOW_S).is_ok() {
        // Only a real signature passes: the fuzzer cannot forge HMAC-SHA256.
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        // The timestamp the check used: the last `t=`, as a number.
        let t: i64 = header
            .split(',')
            .filter_map(|p| p.trim().split_once('='))
            .filter(|(k, _)| *k == "t")
            .last()
            .and_then(|(_, v)| v.parse().ok())
            .unwrap();
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let sig = mac.finalize().into_bytes().to_vec();
        // Some v1 signature is the MAC (hex digits in either case: the same bytes).
        assert!(
            header
                .split(',')
                .filter_map(|p| p.trim().split_once('='))
                .filter(|(k, _)| *k == "v1")
                .any(|(_, v)| hex::decode(v).ok().as_ref() == Some(&sig)),
            "accepted without the signature: {header}"
        );
    }
    // A correctly signed body.
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{NOW_S}.").as_bytes());
    mac.update(body);
    let signed = format!("t={NOW_S},v1={}", hex::encode(mac.finalize().into_bytes()));
    assert!(verify(SECRET, &signed, body, NOW_S).is_ok());
    assert!(
        verify(SECRET, &signed, body, NOW_S + 301).is_err(),
        "expired"
    );
    match parse_event(body) {
        Ok(e) => {
            // The envelope is what the JSON says.
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["id"].as_str(), Some(e.id.as_str()));
            assert_eq!(v["type"].as_str(), Some(e.kind.as_str()));
            assert_eq!(v["created"].as_i64(), Some(e.created));
            assert_eq!(v["data"]["object"], e.object);
        }
        Err(e) => assert!(
            ["malformed_json", "invalid_event"].contains(&e.code),
            "{}",
            e.code
        ),
    }
});
