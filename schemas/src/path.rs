//! JSON paths into an event's `data`, as meters name them: `$.bytes`, `$.usage.tokens`,
//! `$.items[0].id`, `$['model name']`. The syntax is JSONPath (RFC 9535, by `serde_json_path`);
//! a meter reads one value with each path, so a path that names several values in an event
//! (a wildcard, a filter) refuses that event rather than pick one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Longest path text accepted.
pub const MAX_PATH_BYTES: usize = 256;

/// A parsed JSON path; displayed and serialized as its text.
#[derive(Debug, Clone)]
pub struct JsonPath {
    text: String,
    query: serde_json_path::JsonPath,
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
}
