//! The usage event contract: CloudEvents 1.0 JSON in, a validated [`UsageEvent`] out.
//!
//! | CloudEvents attribute | meaning in Tally | rule |
//! |---|---|---|
//! | `specversion` | | must be `"1.0"` |
//! | `id`, `source` | the event's identity; the same pair is counted once | non-empty, at most 256 bytes |
//! | `type` | the meter, or the event type payload meters read | a meter's name or `event_type` |
//! | `subject` | the customer | 1-128 bytes of `A-Z a-z 0-9 . _ : @ -` |
//! | `time` | when the usage happened (RFC 3339) | optional (default: receipt time); at most the late window old and the future tolerance ahead |
//! | `data.value` | the quantity of a plain meter, in its unit | optional (default 1); a whole number from 0 to 2^63-1 ([`crate::quantity::MAX`]) |
//! | `data` | what payload meters read: quantities, filters, dimensions ([`crate::meter`]) | each meter's `value` path present, a number or decimal string within its `scale` |
//!
//! Each failure has a stable machine-readable [`EventError::code`].

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::catalog::Catalog;
use crate::meter::{Dimension, Reading};

pub const MAX_ID_BYTES: usize = 256;
pub const MAX_SOURCE_BYTES: usize = 256;
pub const MAX_CUSTOMER_BYTES: usize = 128;

/// A validated usage event. Times are milliseconds since the Unix epoch, UTC.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct UsageEvent {
    /// CloudEvents `id`; with `source`, the key duplicates are detected by.
    #[prost(string, tag = "1")]
    pub id: String,
    /// CloudEvents `source`: the edge node or service that measured the usage.
    #[prost(string, tag = "2")]
    pub source: String,
    /// CloudEvents `subject`: the customer billed for the usage. Also the partition key.
    #[prost(string, tag = "3")]
    pub customer: String,
    /// CloudEvents `type`: the meter.
    #[prost(string, tag = "4")]
    pub meter: String,
    /// `data.value`, in the meter's unit.
    #[prost(uint64, tag = "5")]
    pub value: u64,
    /// When the usage happened; decides the period it is billed in.
    #[prost(int64, tag = "6")]
    pub time_ms: i64,
    /// When Tally accepted it.
    #[prost(int64, tag = "7")]
    pub received_ms: i64,
    /// The meters the event feeds, when its type is read by payload meters (see
    /// [`crate::meter`]); then `meter` holds the event's type and `value` is 0. Empty for an
    /// event of one plain meter: `meter` and `value` are its reading. An event that feeds no
    /// meter (every filter left it out) has neither readings nor `meter`.
    #[prost(message, repeated, tag = "8")]
    pub readings: Vec<Reading>,
}

/// One meter's share of an event, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingRef<'e> {
    pub meter: &'e str,
    pub value: u64,
    pub dimensions: &'e [Dimension],
    /// The value a `unique_count` meter counts once per period.
    pub distinct: Option<&'e str>,
}

impl UsageEvent {
    /// The meters this event feeds, with their quantities and dimensions.
    pub fn readings(&self) -> impl Iterator<Item = ReadingRef<'_>> + '_ {
        let plain = (self.readings.is_empty() && !self.meter.is_empty()).then(|| ReadingRef {
            meter: &self.meter,
            value: self.value,
            dimensions: &[],
            distinct: None,
        });
        plain
            .into_iter()
            .chain(self.readings.iter().map(|r| ReadingRef {
                meter: &r.meter,
                value: r.value,
                dimensions: &r.dimensions,
                distinct: r.distinct.as_deref(),
            }))
    }
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("required attribute `{0}` is missing")]
    MissingField(&'static str),
    #[error("an attribute has the wrong type: {0}")]
    InvalidType(String),
    #[error("specversion must be \"1.0\"")]
    UnsupportedSpecVersion,
    #[error("attribute `{0}` must not be empty")]
    EmptyField(&'static str),
    #[error("attribute `{field}` is longer than {max} bytes")]
    FieldTooLong { field: &'static str, max: usize },
    #[error("subject must be 1-128 bytes of letters, digits and . _ : @ -")]
    InvalidCustomer,
    #[error("unknown meter `{0}` (the event's `type`)")]
    UnknownMeter(String),
    #[error("time must be an RFC 3339 timestamp such as 2026-11-21T10:00:00Z")]
    InvalidTime,
    #[error("event time is older than the late-arrival window of {window_hours} hours")]
    TooOld { window_hours: i64 },
    #[error("event time is more than {tolerance_secs} seconds in the future")]
    InFuture { tolerance_secs: i64 },
    #[error("data.value must be a whole number")]
    NotInteger,
    #[error("data.value must not be negative")]
    NegativeValue,
    #[error("data.value must be at most 9223372036854775807")]
    ValueOutOfRange,
    #[error("{0}")]
    MissingValue(String),
    #[error("{0}")]
    InvalidValue(String),
    #[error("{0}")]
    ValuePrecision(String),
    #[error("{0}")]
    InvalidDimension(String),
    /// Raised at ingest, not by the decoder.
    #[error(
        "this event would add a combination of dimension values past the {cap} a customer's meter may have in a month"
    )]
    DimensionCapExceeded { cap: usize },
    /// Raised at ingest, not by the decoder.
    #[error(
        "this event would add a distinct value past the {cap} a customer's unique_count meter may have in a month"
    )]
    DistinctCapExceeded { cap: usize },
    /// Raised at ingest, not by the decoder (see [`crate::quantity`]).
    #[error(
        "this event would push the customer's period total of the meter past 9223372036854775807"
    )]
    UsageCapExceeded,
}

impl EventError {
    /// Stable, machine-readable code of the error.
    /// Every [`EventError::code`], in declaration order.
    pub const CODES: &'static [&'static str] = &[
        "malformed_json",
        "not_an_object",
        "missing_field",
        "invalid_type",
        "unsupported_specversion",
        "empty_field",
        "field_too_long",
        "invalid_customer",
        "unknown_meter",
        "invalid_time",
        "event_too_old",
        "event_in_future",
        "value_not_integer",
        "negative_value",
        "value_out_of_range",
        "usage_cap_exceeded",
        "value_missing",
        "invalid_value",
        "value_precision",
        "invalid_dimension",
        "dimension_cap_exceeded",
        "distinct_cap_exceeded",
    ];

    pub fn code(&self) -> &'static str {
        match self {
            EventError::MalformedJson(_) => "malformed_json",
            EventError::NotAnObject => "not_an_object",
            EventError::MissingField(_) => "missing_field",
            EventError::InvalidType(_) => "invalid_type",
            EventError::UnsupportedSpecVersion => "unsupported_specversion",
            EventError::EmptyField(_) => "empty_field",
            EventError::FieldTooLong { .. } => "field_too_long",
            EventError::InvalidCustomer => "invalid_customer",
            EventError::UnknownMeter(_) => "unknown_meter",
            EventError::InvalidTime => "invalid_time",
            EventError::TooOld { .. } => "event_too_old",
            EventError::InFuture { .. } => "event_in_future",
            EventError::NotInteger => "value_not_integer",
            EventError::NegativeValue => "negative_value",
            EventError::ValueOutOfRange => "value_out_of_range",
            EventError::UsageCapExceeded => "usage_cap_exceeded",
            EventError::MissingValue(_) => "value_missing",
            EventError::InvalidValue(_) => "invalid_value",
            EventError::ValuePrecision(_) => "value_precision",
            EventError::InvalidDimension(_) => "invalid_dimension",
            EventError::DimensionCapExceeded { .. } => "dimension_cap_exceeded",
            EventError::DistinctCapExceeded { .. } => "distinct_cap_exceeded",
        }
    }
}

/// How far from the receipt time an event's `time` may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimePolicy {
    /// Events older than this are refused (`event_too_old`); younger ones land in their own period.
    pub late_window_ms: i64,
    /// Events further ahead than this are refused (`event_in_future`): clock skew allowance.
    pub future_tolerance_ms: i64,
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy {
            late_window_ms: 35 * 86_400_000,
            future_tolerance_ms: 5 * 60_000,
        }
    }
}

#[derive(Deserialize)]
struct CloudEventIn<'a> {
    #[serde(borrow, default)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A [`CloudEventIn`] read only from a JSON object: derived struct deserializers also take a
/// JSON array (fields by position), which would let `["1.0", "id", ...]` pass as an event.
struct ObjectOnly<'a>(CloudEventIn<'a>);

impl<'de> Deserialize<'de> for ObjectOnly<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = CloudEventIn<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a CloudEvent object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                CloudEventIn::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Object).map(ObjectOnly)
    }
}

#[derive(Deserialize)]
struct DataIn {
    #[serde(default)]
    value: Option<serde_json::Number>,
}

fn json_error(e: serde_json::Error) -> EventError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => EventError::InvalidType(e.to_string()),
        Category::Io | Category::Syntax | Category::Eof => EventError::MalformedJson(e.to_string()),
    }
}

/// Why a batch body was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The body as a whole is not a JSON array.
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// More elements than allowed: the count, found without keeping the elements past the
    /// limit.
    #[error("the batch has {0} events")]
    TooMany(usize),
}

/// Splits a JSON array body into its elements, without decoding them, so that one bad event
/// never hides the others. Fails when the body as a whole is not a JSON array, or holds more
/// than `max` elements (those past `max` are counted, not kept: a body of tiny elements costs
/// no more memory than `max` of them).
pub fn split_batch(body: &str, max: usize) -> Result<Vec<&RawValue>, BatchError> {
    let count = std::cell::Cell::new(None);
    let seed = Elements {
        max,
        count: &count,
        item: std::convert::identity::<&RawValue>,
        kinds: std::marker::PhantomData,
    };
    let mut de = serde_json::Deserializer::from_str(body);
    let parsed = serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    match (parsed, count.get()) {
        (Ok(_), Some(n)) => Err(BatchError::TooMany(n)),
        (Ok(items), None) => Ok(items),
        (Err(e), _) => Err(BatchError::Invalid(match e.classify() {
            serde_json::error::Category::Data => {
                EventError::InvalidType("a batch must be a JSON array of events".into())
            }
            _ => EventError::MalformedJson(e.to_string()),
        })),
    }
}

/// The non-blank lines of an NDJSON body, each one event.
pub fn split_ndjson(body: &str) -> impl Iterator<Item = &str> {
    body.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
}

/// Decodes and validates every event of a JSON array body, one result per element. The common
/// case (every element a well-formed event object) is decoded in one pass; otherwise each
/// element is decoded on its own so that one bad element never hides the others. Fails when
/// the body as a whole is not a JSON array, or holds more than `max` elements (counted without
/// decoding those past `max`).
pub fn decode_batch(
    body: &str,
    catalog: &Catalog,
    policy: &TimePolicy,
    now_ms: i64,
    max: usize,
) -> Result<Vec<Result<UsageEvent, EventError>>, BatchError> {
    let count = std::cell::Cell::new(None);
    let fast = Elements {
        max,
        count: &count,
        item: |ObjectOnly(raw)| validate(raw, catalog, policy, now_ms),
        kinds: std::marker::PhantomData,
    };
    let mut de = serde_json::Deserializer::from_str(body);
    if let Ok(results) = serde::de::DeserializeSeed::deserialize(fast, &mut de)
        && de.end().is_ok()
    {
        return match count.get() {
            Some(n) => Err(BatchError::TooMany(n)),
            None => Ok(results),
        };
    }
    Ok(split_batch(body, max)?
        .into_iter()
        .map(|raw| decode_event(raw.get(), catalog, policy, now_ms))
        .collect())
}

/// The elements of a JSON array, each parsed as `T` and mapped by `item` as it is parsed (no
/// intermediate collection), at most `max` of them: past `max` the rest are only counted, into
/// `count`.
struct Elements<'c, T, R, F> {
    max: usize,
    count: &'c std::cell::Cell<Option<usize>>,
    item: F,
    kinds: std::marker::PhantomData<fn(T) -> R>,
}

impl<'de, T, R, F> serde::de::DeserializeSeed<'de> for Elements<'_, T, R, F>
where
    T: Deserialize<'de>,
    F: FnMut(T) -> R,
{
    type Value = Vec<R>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T, R, F> serde::de::Visitor<'de> for Elements<'_, T, R, F>
where
    T: Deserialize<'de>,
    F: FnMut(T) -> R,
{
    type Value = Vec<R>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of CloudEvents")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        mut self,
        mut seq: A,
    ) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while out.len() < self.max {
            match seq.next_element::<T>()? {
                Some(v) => out.push((self.item)(v)),
                None => return Ok(out),
            }
        }
        let mut n = out.len();
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            n += 1;
        }
        if n > self.max {
            self.count.set(Some(n));
        }
        Ok(out)
    }
}

/// Number of elements of a JSON array body, without decoding them.
pub fn batch_len(body: &str) -> Result<usize, EventError> {
    match split_batch(body, usize::MAX) {
        Ok(v) => Ok(v.len()),
        Err(BatchError::Invalid(e)) => Err(e),
        Err(BatchError::TooMany(n)) => Ok(n),
    }
}

/// Decodes and validates one event from its JSON text.
pub fn decode_event(
    json: &str,
    catalog: &Catalog,
    policy: &TimePolicy,
    now_ms: i64,
) -> Result<UsageEvent, EventError> {
    let trimmed = json.trim_start();
    if !trimmed.starts_with('{') {
        // Distinguish "not JSON" from "JSON but not an object".
        return match serde_json::from_str::<serde::de::IgnoredAny>(json) {
            Ok(_) => Err(EventError::NotAnObject),
            Err(e) => Err(json_error(e)),
        };
    }
    let raw: CloudEventIn<'_> = serde_json::from_str(json).map_err(json_error)?;
    validate(raw, catalog, policy, now_ms)
}

fn validate(
    raw: CloudEventIn<'_>,
    catalog: &Catalog,
    policy: &TimePolicy,
    now_ms: i64,
) -> Result<UsageEvent, EventError> {
    match raw.specversion.as_deref() {
        None => return Err(EventError::MissingField("specversion")),
        Some("1.0") => {}
        Some(_) => return Err(EventError::UnsupportedSpecVersion),
    }
    let id = required(raw.id, "id", MAX_ID_BYTES)?;
    let source = required(raw.source, "source", MAX_SOURCE_BYTES)?;
    let meter = raw.ty.ok_or(EventError::MissingField("type"))?;
    let Some(event_type) = catalog.event_type(&meter) else {
        return Err(EventError::UnknownMeter(truncated(&meter, 64)));
    };
    let customer = raw.subject.ok_or(EventError::MissingField("subject"))?;
    check_customer_id(&customer)?;
    let time_ms = match raw.time {
        None => now_ms,
        Some(t) => parse_time(&t)?,
    };
    if time_ms < now_ms - policy.late_window_ms {
        return Err(EventError::TooOld {
            window_hours: policy.late_window_ms / 3_600_000,
        });
    }
    if time_ms > now_ms + policy.future_tolerance_ms {
        return Err(EventError::InFuture {
            tolerance_secs: policy.future_tolerance_ms / 1000,
        });
    }
    let plain = event_type.plain_meter().is_some();
    let (value, readings) = if plain {
        // One plain meter: `data.value` alone is read, without building the whole `data`.
        let value = match raw.data {
            None => None,
            Some(d) => serde_json::from_str::<Option<DataIn>>(d.get())
                .map_err(json_error)?
                .and_then(|d| d.value),
        };
        let value = match value {
            None => 1,
            Some(n) => value_of(&n)?,
        };
        (value, Vec::new())
    } else {
        let readings = event_type.readings(&crate::path::Payload::raw(raw.data))?;
        (0, readings)
    };
    // An event that feeds no meter (filtered out everywhere) names none, so it reads as empty.
    let meter = if !plain && readings.is_empty() {
        Cow::Borrowed("")
    } else {
        meter
    };
    Ok(UsageEvent {
        id: id.into_owned(),
        source: source.into_owned(),
        customer: customer.into_owned(),
        meter: meter.into_owned(),
        value,
        time_ms,
        received_ms: now_ms,
        readings,
    })
}

fn required<'a>(
    v: Option<Cow<'a, str>>,
    field: &'static str,
    max: usize,
) -> Result<Cow<'a, str>, EventError> {
    let v = v.ok_or(EventError::MissingField(field))?;
    if v.is_empty() {
        return Err(EventError::EmptyField(field));
    }
    if v.len() > max {
        return Err(EventError::FieldTooLong { field, max });
    }
    Ok(v)
}

fn value_of(n: &serde_json::Number) -> Result<u64, EventError> {
    if let Some(v) = n.as_u64() {
        if v > crate::quantity::MAX {
            return Err(EventError::ValueOutOfRange);
        }
        return Ok(v);
    }
    if n.as_i64().is_some() {
        return Err(EventError::NegativeValue);
    }
    // A float: fractional, exponent form or beyond u64.
    match n.as_f64() {
        Some(f) if f < 0.0 => Err(EventError::NegativeValue),
        Some(f) if f.fract() == 0.0 && f > crate::quantity::MAX as f64 => {
            Err(EventError::ValueOutOfRange)
        }
        _ => Err(EventError::NotInteger),
    }
}

fn parse_time(t: &str) -> Result<i64, EventError> {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|_| EventError::InvalidTime)
}

fn truncated(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn id_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
}

/// Checks a customer id: 1-128 bytes of `A-Z a-z 0-9 . _ : @ -`, safe in URLs, logs and SQL.
pub fn check_customer_id(id: &str) -> Result<(), EventError> {
    if id.is_empty() || id.len() > MAX_CUSTOMER_BYTES || !id.bytes().all(id_byte_ok) {
        return Err(EventError::InvalidCustomer);
    }
    Ok(())
}

/// Checks a meter name: 1-64 bytes of lower-case letters, digits and `_`, starting with a letter.
pub fn check_meter_name(name: &str) -> Result<(), EventError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(EventError::UnknownMeter(truncated(name, 64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

    fn decode(json: &str) -> Result<UsageEvent, EventError> {
        decode_event(json, &Catalog::builtin(), &TimePolicy::default(), NOW)
    }

    /// Found by the `event_batch` fuzz target: a batch element that is an array was decoded
    /// field by field (derived struct deserializers take arrays) instead of refused.
    #[test]
    fn a_batch_element_that_is_an_array_is_not_an_event() {
        let body = r#"[[], ["1.0", "e-1", "edge", "api_requests", "cust_42"], {"specversion":"1.0","id":"e-2","source":"edge","type":"api_requests","subject":"cust_42"}]"#;
        let got =
            decode_batch(body, &Catalog::builtin(), &TimePolicy::default(), NOW, 100).unwrap();
        let codes: Vec<&str> = got
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.code(), |_| "ok"))
            .collect();
        assert_eq!(codes, ["not_an_object", "not_an_object", "ok"]);
    }

    #[test]
    fn decodes_the_documented_example() {
        let e = decode(r#"{"specversion":"1.0","id":"e-1","source":"edge-fra-1","type":"api_requests","subject":"cust_42","time":"2026-11-21T10:00:00Z","data":{"value":1}}"#).unwrap();
        assert_eq!(e.id, "e-1");
        assert_eq!(e.source, "edge-fra-1");
        assert_eq!(e.customer, "cust_42");
        assert_eq!(e.meter, "api_requests");
        assert_eq!(e.value, 1);
        assert_eq!(e.time_ms, NOW);
        assert_eq!(e.received_ms, NOW);
    }

    #[test]
    fn value_and_time_default() {
        let e = decode(
            r#"{"specversion":"1.0","id":"a","source":"s","type":"bandwidth_bytes","subject":"c"}"#,
        )
        .unwrap();
        assert_eq!((e.value, e.time_ms), (1, NOW));
        let e = decode(r#"{"specversion":"1.0","id":"a","source":"s","type":"bandwidth_bytes","subject":"c","data":{"value":5368709120,"route":"/x"}}"#).unwrap();
        assert_eq!(e.value, 5_368_709_120);
    }

    #[test]
    fn each_fault_has_its_code() {
        let base = |patch: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"a","source":"s","type":"api_requests","subject":"c"{patch}}}"#
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("{\"id\":".into(), "malformed_json"),
            ("[1]".into(), "not_an_object"),
            ("42".into(), "not_an_object"),
            (r#"{"id":"a","source":"s","type":"api_requests","subject":"c"}"#.into(), "missing_field"),
            (r#"{"specversion":"0.3","id":"a","source":"s","type":"api_requests","subject":"c"}"#.into(), "unsupported_specversion"),
            (r#"{"specversion":"1.0","source":"s","type":"api_requests","subject":"c"}"#.into(), "missing_field"),
            (r#"{"specversion":"1.0","id":"a","source":"s","type":"api_requests"}"#.into(), "missing_field"),
            (r#"{"specversion":"1.0","id":7,"source":"s","type":"api_requests","subject":"c"}"#.into(), "invalid_type"),
            (r#"{"specversion":"1.0","id":"","source":"s","type":"api_requests","subject":"c"}"#.into(), "empty_field"),
            (format!(r#"{{"specversion":"1.0","id":"{}","source":"s","type":"api_requests","subject":"c"}}"#, "x".repeat(300)), "field_too_long"),
            (r#"{"specversion":"1.0","id":"a","source":"s","type":"api_requests","subject":"c d"}"#.into(), "invalid_customer"),
            (r#"{"specversion":"1.0","id":"a","source":"s","type":"gpu_hours","subject":"c"}"#.into(), "unknown_meter"),
            (base(r#","time":"yesterday""#), "invalid_time"),
            (base(r#","time":"2026-09-01T00:00:00Z""#), "event_too_old"),
            (base(r#","time":"2026-11-21T10:06:00Z""#), "event_in_future"),
            (base(r#","data":{"value":1.5}"#), "value_not_integer"),
            (base(r#","data":{"value":1e3}"#), "value_not_integer"),
            (base(r#","data":{"value":-1}"#), "negative_value"),
            (base(r#","data":{"value":-1.5}"#), "negative_value"),
            (base(r#","data":{"value":"1"}"#), "invalid_type"),
            (base(r#","data":{"value":18446744073709551615}"#), "value_out_of_range"),
            (base(r#","data":"text""#), "invalid_type"),
        ];
        for (json, code) in cases {
            let err = decode(&json).expect_err(&json);
            assert_eq!(err.code(), code, "{json}: {err}");
        }
    }

    #[test]
    fn late_events_inside_the_window_are_kept_in_their_own_time() {
        let e = decode(r#"{"specversion":"1.0","id":"a","source":"s","type":"api_requests","subject":"c","time":"2026-10-20T00:00:00+02:00"}"#).unwrap();
        assert_eq!(e.time_ms, 1_792_447_200_000);
    }

    #[test]
    fn batch_decoding_gives_one_result_per_element_either_way() {
        let good =
            r#"{"specversion":"1.0","id":"a","source":"s","type":"api_requests","subject":"c"}"#;
        let cat = Catalog::builtin();
        let p = TimePolicy::default();
        let all_good = decode_batch(&format!("[{good},{good}]"), &cat, &p, NOW, 100).unwrap();
        assert!(all_good.iter().all(|r| r.is_ok()) && all_good.len() == 2);
        let mixed = decode_batch(
            &format!("[{good},7,{{\"id\":1}},{good}]"),
            &cat,
            &p,
            NOW,
            100,
        )
        .unwrap();
        let codes: Vec<_> = mixed
            .iter()
            .map(|r| r.as_ref().err().map(|e| e.code()))
            .collect();
        assert_eq!(
            codes,
            vec![None, Some("not_an_object"), Some("invalid_type"), None]
        );
    }

    #[test]
    fn batches_split_without_decoding() {
        let items = split_batch(r#"[{"a":1}, 5, "x"]"#, 3).unwrap();
        assert_eq!(items.len(), 3);
        let code = |body: &str| match split_batch(body, 3) {
            Err(BatchError::Invalid(e)) => e.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code("{}"), "invalid_type");
        assert_eq!(code("[{"), "malformed_json");
        let lines: Vec<_> = split_ndjson("{\"a\":1}\r\n\n  \n{\"b\":2}").collect();
        assert_eq!(lines, vec!["{\"a\":1}", "{\"b\":2}"]);
    }
}
