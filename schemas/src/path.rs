//! JSON paths into an event's `data`, as meters name them: `$.bytes`, `$.usage.tokens`,
//! `$.items[0].id`, `$['model name']`. The syntax is JSONPath (RFC 9535, by `serde_json_path`);
//! a meter reads one value with each path, so a path that names several values in an event
//! (a wildcard, a filter) refuses that event rather than pick one.

use std::fmt;

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// Longest path text accepted.
pub const MAX_PATH_BYTES: usize = 256;

/// A parsed JSON path; displayed and serialized as its text.
#[derive(Debug, Clone)]
pub struct JsonPath {
    text: String,
    query: serde_json_path::JsonPath,
    /// The member names of a path made of names only (`$.usage.tokens`, `$['a b']`), which
    /// [`Payload`] walks without building the whole `data`.
    members: Option<Vec<String>>,
}

/// The member names of `$` followed by `.name` (RFC 9535 shorthand: a letter, `_` or
/// non-ASCII first, then those or digits) or `['name']` / `["name"]` without escapes; `None`
/// for any other path (indices, wildcards, filters, escapes), which takes the general way.
fn member_names(text: &str) -> Option<Vec<String>> {
    let mut rest = text.strip_prefix('$')?;
    let mut names = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r
                .char_indices()
                .find(|&(i, c)| {
                    let first = c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
                    !(first || (i > 0 && c.is_ascii_digit()))
                })
                .map_or(r.len(), |(i, _)| i);
            if end == 0 {
                return None;
            }
            names.push(r[..end].to_owned());
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("['").or_else(|| rest.strip_prefix("[\"")) {
            let quote = if rest.starts_with("['") { "']" } else { "\"]" };
            let end = r.find(quote)?;
            let name = &r[..end];
            if name.contains(['\\', '\'', '"']) {
                return None;
            }
            names.push(name.to_owned());
            rest = &r[end + 2..];
        } else {
            return None;
        }
    }
    Some(names)
}

/// Why a path was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON path `{path}`: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

/// A path named more than one value in an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, PathError> {
        let fail = |reason: String| PathError {
            path: text.chars().take(64).collect(),
            reason,
        };
        if text.len() > MAX_PATH_BYTES {
            return Err(fail(format!("longer than {MAX_PATH_BYTES} bytes")));
        }
        let query = serde_json_path::JsonPath::parse(text).map_err(|e| fail(e.to_string()))?;
        Ok(JsonPath {
            text: text.to_owned(),
            query,
            members: member_names(text),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The one value the path names in `root`: `None` when it names none, [`Ambiguous`] when
    /// it names several.
    pub fn get<'v>(&self, root: &'v Value) -> Result<Option<&'v Value>, Ambiguous> {
        self.query.query(root).at_most_one().map_err(|_| Ambiguous)
    }
}

/// An event's `data`, read lazily: a path of member names walks the JSON text to its value
/// without building the rest; any other path reads the whole value once.
pub enum Payload<'a> {
    /// The JSON text of `data` (none: the event has no `data`).
    Raw {
        raw: Option<&'a RawValue>,
        /// The top-level members of `data` (empty when it is not an object), read once.
        top: std::cell::OnceCell<Vec<(Cow<'a, str>, &'a RawValue)>>,
        whole: std::cell::OnceCell<Value>,
    },
    Value(&'a Value),
}

impl<'a> Payload<'a> {
    pub fn raw(raw: Option<&'a RawValue>) -> Payload<'a> {
        Payload::Raw {
            raw,
            top: std::cell::OnceCell::new(),
            whole: std::cell::OnceCell::new(),
        }
    }

    fn whole(&self) -> Value {
        match self {
            Payload::Raw { raw: Some(r), .. } => serde_json::from_str(r.get()).unwrap_or_default(),
            _ => Value::Null,
        }
    }

    /// The one value `path` names, as a [`Scalar`]: like [`Payload::get`], without building
    /// the value (a string is borrowed from the event's text where it has no escapes).
    pub fn scalar(&self, path: &JsonPath) -> Result<Option<Scalar<'_>>, Ambiguous> {
        if let Some(at) = self.raw_at(path) {
            return Ok(at.and_then(|v| Scalar::parse(v.get())));
        }
        Ok(match self.get(path)? {
            None => None,
            Some(Cow::Borrowed(v)) => Some(Scalar::of(v)),
            Some(Cow::Owned(v)) => Some(match v {
                Value::String(s) => Scalar::Str(Cow::Owned(s)),
                other => Scalar::of(&other).into_static(),
            }),
        })
    }

    /// The one value `path` names: `None` when it names none, [`Ambiguous`] when several.
    pub fn get(&self, path: &JsonPath) -> Result<Option<Cow<'_, Value>>, Ambiguous> {
        if let Some(at) = self.raw_at(path) {
            return Ok(at
                .and_then(|v| serde_json::from_str::<Value>(v.get()).ok())
                .map(Cow::Owned));
        }
        match self {
            Payload::Value(v) => Ok(path.get(v)?.map(Cow::Borrowed)),
            Payload::Raw { whole, .. } => {
                let whole = whole.get_or_init(|| self.whole());
                Ok(path.get(whole)?.map(Cow::Borrowed))
            }
        }
    }

    /// The text of the value a path of member names names in the raw `data`, walked without
    /// parsing the rest: `Some(None)` when it names none; `None` when `data` is a built value or
    /// the path is not made of names (it then takes the general way).
    fn raw_at(&self, path: &JsonPath) -> Option<Option<&RawValue>> {
        let (Payload::Raw { raw, top, .. }, Some(names)) = (self, &path.members) else {
            return None;
        };
        let Some(root) = *raw else {
            return Some(None);
        };
        let Some((first, deeper)) = names.split_first() else {
            return Some(Some(root));
        };
        let top = top.get_or_init(|| members(root));
        // The last of repeated names, like a full parse.
        let mut at = top.iter().rev().find(|(k, _)| k == first).map(|(_, v)| *v);
        for name in deeper {
            at = at.and_then(|v| member(v, name));
        }
        Some(at)
    }
}

/// One value of `data` as a meter reads it: a scalar, with a string borrowed from the event's
/// text when it has no escapes, or a mark that it was an array or object.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(Cow<'a, str>),
    /// An array or an object.
    Compound,
}

impl<'a> Scalar<'a> {
    /// The scalar of a built value (strings borrowed from it).
    pub fn of(v: &'a Value) -> Scalar<'a> {
        match v {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => Scalar::Number(n.clone()),
            Value::String(s) => Scalar::Str(Cow::Borrowed(s)),
            Value::Array(_) | Value::Object(_) => Scalar::Compound,
        }
    }

    /// The same scalar, owning its string.
    pub fn into_static(self) -> Scalar<'static> {
        match self {
            Scalar::Null => Scalar::Null,
            Scalar::Bool(b) => Scalar::Bool(b),
            Scalar::Number(n) => Scalar::Number(n),
            Scalar::Str(s) => Scalar::Str(Cow::Owned(s.into_owned())),
            Scalar::Compound => Scalar::Compound,
        }
    }

    /// Reads one JSON value's text: its scalar, strings borrowed; arrays and objects skipped.
    fn parse(text: &'a str) -> Option<Scalar<'a>> {
        serde_json::from_str(text).ok()
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
                // JSON text has no non-finite numbers; as `Value` does, they would read as null.
                Ok(serde_json::Number::from_f64(v).map_or(Scalar::Null, Scalar::Number))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Scalar<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Compound)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Scalar<'de>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Compound)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The members of a JSON object's text, in order, values unparsed; none when it is not an
/// object.
fn members(object: &RawValue) -> Vec<(Cow<'_, str>, &RawValue)> {
    serde_json::from_str::<ObjectMembers<'_>>(object.get())
        .map(|m| m.0)
        .unwrap_or_default()
}

/// A member name, borrowed from the text unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Visit)
    }
}

struct ObjectMembers<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for ObjectMembers<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ObjectMembers<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    out.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(ObjectMembers(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The raw value of member `name` of a JSON object's text; `None` when it is not an object or
/// has no such member (the last of repeated names, like a full parse).
fn member<'a>(object: &'a RawValue, name: &str) -> Option<&'a RawValue> {
    members(object)
        .into_iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

impl PartialEq for JsonPath {
    fn eq(&self, other: &JsonPath) -> bool {
        self.text == other.text
    }
}

impl Eq for JsonPath {}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for JsonPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for JsonPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        JsonPath::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for JsonPath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .description(Some(
                "A JSONPath (RFC 9535) into the event's `data` that names one value",
            ))
            .examples(["$.usage.tokens"])
            .into()
    }
}

impl utoipa::ToSchema for JsonPath {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(text: &str) -> JsonPath {
        JsonPath::parse(text).unwrap()
    }

    #[test]
    fn names_members_quoted_members_and_indices() {
        let data = json!({
            "bytes": 1200,
            "usage": {"tokens": 7, "model name": "m1"},
            "items": [{"id": "a"}, {"id": "b"}],
        });
        assert_eq!(p("$.bytes").get(&data), Ok(Some(&json!(1200))));
        assert_eq!(p("$.usage.tokens").get(&data), Ok(Some(&json!(7))));
        assert_eq!(
            p("$.usage['model name']").get(&data),
            Ok(Some(&json!("m1")))
        );
        assert_eq!(p("$.items[1].id").get(&data), Ok(Some(&json!("b"))));
        assert_eq!(p("$.items[2].id").get(&data), Ok(None));
        assert_eq!(
            p("$.bytes.more").get(&data),
            Ok(None),
            "a number has no members"
        );
        assert_eq!(p("$.missing").get(&data), Ok(None));
        assert_eq!(p("$.items[*].id").get(&data), Err(Ambiguous));
        assert_eq!(p("$.usage.tokens").to_string(), "$.usage.tokens");
    }

    #[test]
    fn refuses_what_is_not_a_path() {
        for bad in ["bytes", "$.", "$[", "$.a b", "$['a"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
        assert!(JsonPath::parse(&format!("$.{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn reads_and_writes_itself_as_text() {
        let path: JsonPath = serde_json::from_str(r#""$.usage.tokens""#).unwrap();
        assert_eq!(path, p("$.usage.tokens"));
        assert_eq!(serde_json::to_string(&path).unwrap(), r#""$.usage.tokens""#);
        assert!(serde_json::from_str::<JsonPath>(r#""usage""#).is_err());
    }

    #[test]
    fn name_paths_walk_the_text_and_agree_with_the_whole_value() {
        assert_eq!(
            member_names("$.usage.tokens"),
            Some(vec!["usage".into(), "tokens".into()])
        );
        assert_eq!(
            member_names("$['model name']"),
            Some(vec!["model name".into()])
        );
        assert_eq!(
            member_names("$.a1._b"),
            Some(vec!["a1".into(), "_b".into()])
        );
        assert_eq!(member_names("$"), Some(vec![]), "the root");
        for general in ["$.items[0]", "$.*", "$..a", r"$['it\'s']"] {
            assert_eq!(member_names(general), None, "{general}");
        }
        let text = r#"{"usage": {"tokens": 7, "model name": "m1"}, "items": [1, 2], "n": null, "d": 1, "d": 2}"#;
        let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
        let whole: Value = serde_json::from_str(text).unwrap();
        let lazy = Payload::raw(Some(&raw));
        for path in [
            "$.usage.tokens",
            "$.usage['model name']",
            "$.items[1]",
            "$.items.x",
            "$.usage.tokens.deeper",
            "$.missing",
            "$.n",
            "$.d",
        ] {
            let path = p(path);
            let got = lazy.get(&path).map(|v| v.map(Cow::into_owned));
            let want = Payload::Value(&whole)
                .get(&path)
                .map(|v| v.map(Cow::into_owned));
            assert_eq!(got, want, "{path}");
        }
        assert_eq!(Payload::raw(None).get(&p("$.a")), Ok(None));
    }
}
