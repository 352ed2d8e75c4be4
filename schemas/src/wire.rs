//! The binary encoding of usage events on the log: Protocol Buffers, message `tally.v1.UsageEvent`
//! (`schemas/proto/usage_event.proto`), one event per record. Kafka records are keyed by the
//! customer id so that one customer's events stay ordered on one partition; the embedded log
//! stores the same bytes. Consumers in other languages can generate a decoder from the `.proto`.

use prost::Message;

use crate::{Result, UsageEvent};

/// Content type of an encoded record (a Kafka header carries it).
pub const CONTENT_TYPE: &str = "application/x-protobuf; messageType=tally.v1.UsageEvent";

/// Appends the encoding of `event` to `buf` (which grows as needed: callers reuse one buffer,
/// so sizing it first would only walk the event twice).
pub fn encode_into(event: &UsageEvent, buf: &mut Vec<u8>) {
    event.encode_raw(buf);
}

pub fn encode(event: &UsageEvent) -> Vec<u8> {
    event.encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<UsageEvent> {
    Ok(UsageEvent::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_uses_the_published_field_numbers() {
        let e = UsageEvent {
            id: "e-1".into(),
            source: "s".into(),
            customer: "c".into(),
            meter: "api_requests".into(),
            value: 300,
            time_ms: 1_795_255_200_000,
            received_ms: 1_795_255_200_001,
            readings: Vec::new(),
        };
        let bytes = encode(&e);
        assert_eq!(decode(&bytes).unwrap(), e);
        // Field 1 (id), wire type 2 (length-delimited), length 3, "e-1".
        assert_eq!(&bytes[..5], &[0x0a, 3, b'e', b'-', b'1']);
        // Field 5 (value), varint 300 = 0xac 0x02.
        let pos = bytes.windows(3).position(|w| w == [0x28, 0xac, 0x02]);
        assert!(pos.is_some());
        assert!(decode(&[0xff, 0xff]).is_err());
    }
}
