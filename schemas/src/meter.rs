//! Meters over the event's payload: which meters one event feeds, with what quantity and which
//! dimensions.
//!
//! A meter reads the events whose CloudEvents `type` is its `event_type` (default: its own
//! name). Several meters may read one type, so one event may feed several meters: one
//! [`Reading`] each. Per meter:
//!
//! - `filter`: conditions on paths of `data` (`eq`, `ne`, `in`) an event must meet to feed it;
//! - `value`: the path of the quantity in `data`. A meter without `event_type` and `value`
//!   reads `data.value`, 1 when absent (Tally's first meters). A `count` meter with an
//!   `event_type` counts 1 per event and takes no `value`; any other meter with an `event_type`
//!   names its `value`, which the event must carry;
//! - `scale`: decimal places of the quantity. Quantities are stored exactly, as whole numbers of
//!   the meter's smallest unit (`1.25` with `scale = 2` is 125). A JSON number keeps at most 15
//!   significant digits exactly; a quantity sent as a string (`"1.250000000000000001"`) keeps
//!   every digit. More decimal places than `scale` are refused (`value_precision`);
//! - `group_by`: named dimensions, each a path whose value (a string, number or boolean) the
//!   reading carries. An event without the path has no value for that dimension.
//!
//! A `unique_count` meter reads its `value` path as the value to count once per period (a
//! string, number or boolean, as text, at most [`MAX_DIMENSION_BYTES`]); its reading carries it
//! as `distinct`, with a value of 1.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::EventError;
use crate::path::{Ambiguous, JsonPath, Payload, Scalar};

/// `data.value`, the quantity of the first meters.
static DATA_VALUE: std::sync::LazyLock<JsonPath> =
    std::sync::LazyLock::new(|| JsonPath::parse("$.value").expect("a valid path"));

/// Longest dimension value kept, in bytes.
pub const MAX_DIMENSION_BYTES: usize = 256;

/// Most decimal places a meter may declare.
pub const MAX_SCALE: u8 = 12;

/// One meter's share of an event, as the log carries it.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Reading {
    #[prost(string, tag = "1")]
    pub meter: String,
    /// In the meter's smallest unit (see `scale`).
    #[prost(uint64, tag = "2")]
    pub value: u64,
    /// The meter's dimensions the event has a value for, in name order.
    #[prost(message, repeated, tag = "3")]
    pub dimensions: Vec<Dimension>,
    /// For a `unique_count` meter: the value counted once per period.
    #[prost(string, optional, tag = "4")]
    pub distinct: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Dimension {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// A condition on one path of `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub path: JsonPath,
    /// Met when the value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Value>,
    /// Met when the value is missing or differs from this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Value>,
    /// Met when the value is one of these.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub any_of: Option<Vec<Value>>,
}

impl Condition {
    /// Exactly one of `eq`, `ne`, `in`, each a string, number or boolean.
    pub fn check(&self) -> Result<(), String> {
        let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
        match (&self.eq, &self.ne, &self.any_of) {
            (Some(v), None, None) | (None, Some(v), None) if scalar(v) => Ok(()),
            (None, None, Some(vs)) if !vs.is_empty() && vs.iter().all(scalar) => Ok(()),
            _ => Err(format!(
                "the condition on `{}` needs exactly one of eq, ne or in, with strings, numbers or booleans",
                self.path
            )),
        }
    }

    fn met(&self, data: &Payload<'_>) -> Result<bool, EventError> {
        let v = data
            .get(&self.path)
            .map_err(|Ambiguous| ambiguous(&self.path))?;
        let v = v.as_deref();
        Ok(match (&self.eq, &self.ne, &self.any_of) {
            (Some(want), _, _) => v == Some(want),
            (_, Some(not), _) => v != Some(not),
            (_, _, Some(any)) => v.is_some_and(|v| any.contains(v)),
            _ => false,
        })
    }
}

fn ambiguous(path: &JsonPath) -> EventError {
    EventError::InvalidValue(format!("`{path}` names more than one value"))
}

/// Where a meter's quantity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueRule {
    /// `data.value`, 1 when absent.
    DataValue,
    /// 1 per event.
    One,
    /// The value at a path, which the event must carry.
    Path(JsonPath),
    /// 1, and the value at a path (which the event must carry) as the reading's `distinct`.
    Distinct(JsonPath),
}

/// How one meter reads the events of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    pub meter: String,
    pub value: ValueRule,
    pub scale: u8,
    pub filter: Vec<Condition>,
    pub group_by: Vec<(String, JsonPath)>,
}

/// What the catalogue reads from the events of one CloudEvents type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType {
    pub readers: Vec<Reader>,
}

impl EventType {
    /// The one meter of Tally's first form, when that is all this type feeds: its name is the
    /// type, its quantity a whole `data.value`, no filter, no dimensions. Such events travel as
    /// before (no readings), so consumers that predate payload meters count them alike.
    pub fn plain_meter(&self) -> Option<&str> {
        match self.readers.as_slice() {
            [r] if r.value == ValueRule::DataValue
                && r.scale == 0
                && r.filter.is_empty()
                && r.group_by.is_empty() =>
            {
                Some(&r.meter)
            }
            _ => None,
        }
    }

    /// The readings of one event, from its `data`.
    pub fn readings(&self, data: &Payload<'_>) -> Result<Vec<Reading>, EventError> {
        let mut out = Vec::with_capacity(self.readers.len());
        for r in &self.readers {
            if !all_met(&r.filter, data)? {
                continue;
            }
            let mut distinct = None;
            let value = match &r.value {
                ValueRule::One => 1,
                ValueRule::Distinct(p) => {
                    let v = data.scalar(p).map_err(|Ambiguous| ambiguous(p))?;
                    let text = v.map(|v| value_text(p, v)).transpose()?.flatten();
                    let Some(text) = text else {
                        return Err(missing(&r.meter, p));
                    };
                    distinct = Some(text);
                    1
                }
                ValueRule::DataValue => match data.scalar(&DATA_VALUE).ok().flatten() {
                    None | Some(Scalar::Null) => scaled(1, r.scale)?,
                    Some(v) => scalar_quantity(&v, r.scale)?,
                },
                ValueRule::Path(p) => match data.scalar(p).map_err(|Ambiguous| ambiguous(p))? {
                    None | Some(Scalar::Null) => return Err(missing(&r.meter, p)),
                    Some(v) => scalar_quantity(&v, r.scale)?,
                },
            };
            let mut dimensions = Vec::with_capacity(r.group_by.len());
            for (name, path) in &r.group_by {
                let Some(v) = data.scalar(path).map_err(|Ambiguous| ambiguous(path))? else {
                    continue;
                };
                if let Some(value) = dimension_value(name, v)? {
                    dimensions.push(Dimension {
                        name: name.clone(),
                        value,
                    });
                }
            }
            out.push(Reading {
                meter: r.meter.clone(),
                value,
                dimensions,
                distinct,
            });
        }
        Ok(out)
    }
}

fn all_met(filter: &[Condition], data: &Payload<'_>) -> Result<bool, EventError> {
    for c in filter {
        if !c.met(data)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn missing(meter: &str, p: &JsonPath) -> EventError {
    EventError::MissingValue(format!(
        "meter `{meter}` reads `{p}`, which the event does not carry"
    ))
}

/// A string, number or boolean as text, at most [`MAX_DIMENSION_BYTES`]; `None` for JSON null
/// (no value); `Err(why)` for anything else.
fn scalar_text(v: Scalar<'_>) -> Result<Option<String>, String> {
    let text = match v {
        Scalar::Null => return Ok(None),
        Scalar::Str(s) => s.into_owned(),
        Scalar::Number(n) => n.to_string(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Compound => return Err("must be a string, number or boolean".into()),
    };
    if text.len() > MAX_DIMENSION_BYTES {
        return Err(format!("is longer than {MAX_DIMENSION_BYTES} bytes"));
    }
    Ok(Some(text))
}

/// A dimension's value as text; `None` for JSON null (no value).
fn dimension_value(name: &str, v: Scalar<'_>) -> Result<Option<String>, EventError> {
    scalar_text(v).map_err(|why| EventError::InvalidDimension(format!("dimension `{name}` {why}")))
}

/// A `unique_count` meter's value as text; `None` for JSON null (no value).
fn value_text(path: &JsonPath, v: Scalar<'_>) -> Result<Option<String>, EventError> {
    scalar_text(v).map_err(|why| EventError::InvalidValue(format!("`{path}` {why}")))
}

/// `whole * 10^scale`, within the usage cap.
fn scaled(whole: u64, scale: u8) -> Result<u64, EventError> {
    10u64
        .checked_pow(u32::from(scale))
        .and_then(|f| whole.checked_mul(f))
        .filter(|v| *v <= crate::quantity::MAX)
        .ok_or(EventError::ValueOutOfRange)
}

/// A quantity in the meter's smallest unit, exactly: a JSON number (whole numbers of any size
/// up to the cap; decimals of at most 15 significant digits) or a decimal string.
pub fn quantity(v: &Value, scale: u8) -> Result<u64, EventError> {
    scalar_quantity(&Scalar::of(v), scale)
}

fn scalar_quantity(v: &Scalar<'_>, scale: u8) -> Result<u64, EventError> {
    match v {
        Scalar::Number(n) => {
            if let Some(whole) = n.as_u64() {
                return scaled(whole, scale);
            }
            if n.as_i64().is_some() {
                return Err(EventError::NegativeValue);
            }
            // A float: its shortest round-trip text is what was sent, as long as that had at
            // most 15 significant digits.
            let text = n.to_string();
            let digits = text
                .split(['e', 'E'])
                .next()
                .unwrap_or("")
                .bytes()
                .filter(u8::is_ascii_digit)
                .skip_while(|d| *d == b'0')
                .count();
            if digits > 15 {
                return Err(EventError::ValuePrecision(
                    "a JSON number keeps at most 15 significant digits exactly; send the quantity as a string"
                        .into(),
                ));
            }
            decimal(&text, scale)
        }
        Scalar::Str(s) => decimal(s.trim(), scale),
        _ => Err(EventError::InvalidValue(
            "the quantity must be a number or a decimal string".into(),
        )),
    }
}

/// Parses a decimal (`12`, `1.25`, `1e3`, `2.5E-1`) into whole units of `10^-scale`.
fn decimal(text: &str, scale: u8) -> Result<u64, EventError> {
    let not_a_number =
        || EventError::InvalidValue(format!("`{}` is not a decimal number", truncate(text)));
    if text.starts_with('-') {
        return Err(EventError::NegativeValue);
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| not_a_number())?),
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || exponent.unsigned_abs() > 400
    {
        return Err(not_a_number());
    }
    // The digits, and where the decimal point falls among them once scaled.
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let point = int.len() as i64 + i64::from(exponent) + i64::from(scale);
    let mut value: u64 = 0;
    for (i, d) in digits.iter().enumerate() {
        if (i as i64) < point {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(*d)))
                .ok_or(EventError::ValueOutOfRange)?;
        } else if *d != 0 {
            return Err(EventError::ValuePrecision(format!(
                "`{}` has more than {scale} decimal places",
                truncate(text)
            )));
        }
    }
    for _ in digits.len() as i64..point.max(0) {
        value = value.checked_mul(10).ok_or(EventError::ValueOutOfRange)?;
    }
    if value > crate::quantity::MAX {
        return Err(EventError::ValueOutOfRange);
    }
    Ok(value)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_are_exact_to_the_declared_scale() {
        let q = |v: Value, scale| quantity(&v, scale);
        assert_eq!(q(json!(1200), 0), Ok(1200));
        assert_eq!(q(json!(1.25), 2), Ok(125));
        assert_eq!(q(json!(1.2), 2), Ok(120));
        assert_eq!(q(json!(0.1), 1), Ok(1));
        assert_eq!(q(json!(3), 3), Ok(3000));
        assert_eq!(
            q(json!("1.250"), 2),
            Ok(125),
            "trailing zeros are not places"
        );
        assert_eq!(q(json!("0.000000000001"), 12), Ok(1));
        assert_eq!(q(json!("1e3"), 0), Ok(1000));
        assert_eq!(q(json!("2.5E-1"), 2), Ok(25));
        assert_eq!(q(json!(".5"), 1), Ok(5));
        assert_eq!(q(json!("9223372036854775807"), 0), Ok(crate::quantity::MAX));
        assert_eq!(q(json!(1.255), 2).unwrap_err().code(), "value_precision");
        assert_eq!(q(json!("0.5"), 0).unwrap_err().code(), "value_precision");
        assert_eq!(
            q(json!(0.12345678901234568), 17).unwrap_err().code(),
            "value_precision",
            "past 15 significant digits a JSON number is not exact"
        );
        assert_eq!(
            q(json!("9223372036854775808"), 0).unwrap_err().code(),
            "value_out_of_range"
        );
        assert_eq!(
            q(json!(9_223_372_036_854_775u64), 4).unwrap_err().code(),
            "value_out_of_range"
        );
        assert_eq!(q(json!(-1), 0).unwrap_err().code(), "negative_value");
        assert_eq!(q(json!(-0.5), 1).unwrap_err().code(), "negative_value");
        assert_eq!(q(json!("-2"), 0).unwrap_err().code(), "negative_value");
        for bad in [
            json!("ten"),
            json!("1.2.3"),
            json!(""),
            json!("1e"),
            json!(true),
            json!([1]),
        ] {
            assert_eq!(
                q(bad.clone(), 2).unwrap_err().code(),
                "invalid_value",
                "{bad}"
            );
        }
    }

    /// The readings of `data` read from its JSON text, as the decoder does.
    fn read(t: &EventType, data: Value) -> Result<Vec<Reading>, EventError> {
        let text = data.to_string();
        let raw: Box<serde_json::value::RawValue> = serde_json::from_str(&text).unwrap();
        let from_text = t.readings(&Payload::raw(Some(&raw)));
        assert_eq!(
            from_text,
            t.readings(&Payload::Value(&data)),
            "both ways agree"
        );
        from_text
    }

    fn reader(meter: &str, value: ValueRule) -> Reader {
        Reader {
            meter: meter.into(),
            value,
            scale: 0,
            filter: vec![],
            group_by: vec![],
        }
    }

    fn path(p: &str) -> JsonPath {
        JsonPath::parse(p).unwrap()
    }

    #[test]
    fn one_event_feeds_each_meter_whose_filter_it_meets() {
        let mut bytes = reader("request_bytes", ValueRule::Path(path("$.bytes")));
        bytes.group_by = vec![
            ("model".into(), path("$.model")),
            ("region".into(), path("$.region")),
        ];
        let mut eu = reader("eu_requests", ValueRule::One);
        eu.filter = vec![Condition {
            path: path("$.region"),
            eq: Some(json!("eu")),
            ne: None,
            any_of: None,
        }];
        let t = EventType {
            readers: vec![reader("requests", ValueRule::One), bytes, eu],
        };
        assert_eq!(t.plain_meter(), None);
        let got = read(&t, json!({"bytes": 1200, "region": "eu", "model": "m1"})).unwrap();
        let dims = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(n, v)| Dimension {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got,
            [
                Reading {
                    meter: "requests".into(),
                    value: 1,
                    dimensions: vec![],
                    distinct: None,
                },
                Reading {
                    meter: "request_bytes".into(),
                    value: 1200,
                    dimensions: dims(&[("model", "m1"), ("region", "eu")]),
                    distinct: None,
                },
                Reading {
                    meter: "eu_requests".into(),
                    value: 1,
                    dimensions: vec![],
                    distinct: None,
                },
            ]
        );
        let us = read(&t, json!({"bytes": 5, "region": "us"})).unwrap();
        let meters: Vec<&str> = us.iter().map(|r| r.meter.as_str()).collect();
        assert_eq!(
            meters,
            ["requests", "request_bytes"],
            "the filter leaves eu_requests out"
        );
        assert_eq!(
            us[1].dimensions,
            dims(&[("region", "us")]),
            "no model: no model value"
        );
        let err = read(&t, json!({"region": "eu"})).unwrap_err();
        assert_eq!(err.code(), "value_missing");
        let err = read(&t, json!({"bytes": 1, "region": {"name": "eu"}})).unwrap_err();
        assert_eq!(err.code(), "invalid_dimension");
        let long = "x".repeat(MAX_DIMENSION_BYTES + 1);
        let err = read(&t, json!({"bytes": 1, "model": long})).unwrap_err();
        assert_eq!(err.code(), "invalid_dimension");
    }

    #[test]
    fn conditions_eq_ne_and_in() {
        let c = |eq, ne, any_of| Condition {
            path: path("$.tier"),
            eq,
            ne,
            any_of,
        };
        let gold = json!({"tier": "gold"});
        let none = json!({});
        assert!(
            c(Some(json!("gold")), None, None)
                .met(&Payload::Value(&gold))
                .unwrap()
        );
        assert!(
            !c(Some(json!("gold")), None, None)
                .met(&Payload::Value(&none))
                .unwrap()
        );
        assert!(
            !c(None, Some(json!("gold")), None)
                .met(&Payload::Value(&gold))
                .unwrap()
        );
        assert!(
            c(None, Some(json!("gold")), None)
                .met(&Payload::Value(&none))
                .unwrap(),
            "missing differs"
        );
        let any = c(None, None, Some(vec![json!("gold"), json!("silver")]));
        assert!(any.met(&Payload::Value(&gold)).unwrap());
        assert!(!any.met(&Payload::Value(&none)).unwrap());
        assert!(any.check().is_ok());
        assert!(c(Some(json!(1)), Some(json!(2)), None).check().is_err());
        assert!(c(None, None, Some(vec![])).check().is_err());
        assert!(c(Some(json!({"a": 1})), None, None).check().is_err());
        assert!(c(None, None, None).check().is_err());
    }

    #[test]
    fn the_first_meter_form_stays_plain() {
        let t = EventType {
            readers: vec![reader("api_requests", ValueRule::DataValue)],
        };
        assert_eq!(t.plain_meter(), Some("api_requests"));
        let got = read(&t, json!({"value": 7})).unwrap();
        assert_eq!(got[0].value, 7);
        assert_eq!(read(&t, Value::Null).unwrap()[0].value, 1, "default 1");
    }
}
