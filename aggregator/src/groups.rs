//! Usage broken down by dimension: `group_by=region,model` and `filter[region]=eu` on the query
//! API. The store answers an additive meter's usage per stored dimensions key (every
//! combination a customer's readings had); this module keeps the keys that match the filter and
//! sums them by the asked dimensions. A reading without a value for an asked dimension falls in
//! the group where that dimension is `null`.

use std::collections::BTreeMap;

use serde::Serialize;
use tally_http::problem::ApiError;
use tally_schemas::Meter;
use tally_schemas::rollup::parse_dimensions_key;
use utoipa::ToSchema;

/// Most dimensions one query may group by.
pub const MAX_GROUP_BY: usize = 8;

/// A group's value of each asked dimension; `None` where its readings had none.
pub type GroupKey = BTreeMap<String, Option<String>>;

/// One group of a breakdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Group {
    /// The group's value of each asked dimension; `null` where its readings had none.
    pub dimensions: BTreeMap<String, Option<String>>,
    pub usage: u64,
}

/// What a query asks to break down by and keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub group_by: Vec<String>,
    /// (dimension, value): only usage with these values.
    pub filter: Vec<(String, String)>,
}

impl Breakdown {
    /// From `group_by` (comma-separated) and the query's other parameters, which must all be
    /// `filter[<dimension>]`; each dimension must be one of the meter's.
    pub fn parse(
        meter_name: &str,
        meter: &Meter,
        group_by: Option<&str>,
        rest: &BTreeMap<String, String>,
    ) -> Result<Option<Breakdown>, ApiError> {
        let known = |dim: &str| {
            if meter.group_by.contains_key(dim) {
                Ok(())
            } else {
                Err(ApiError::bad_request(
                    "unknown_dimension",
                    format!(
                        "meter `{meter_name}` has no dimension `{dim}` (it has: {})",
                        meter
                            .group_by
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        Self::parse_with(known, group_by, rest)
    }

    /// Like [`Breakdown::parse`], for a query across `meters`: each dimension must be one of
    /// some meter's; the breakdown then applies to the meters that have them all
    /// ([`Breakdown::applies_to`]).
    pub fn parse_across<'m>(
        meters: impl Iterator<Item = &'m Meter> + Clone,
        group_by: Option<&str>,
        rest: &BTreeMap<String, String>,
    ) -> Result<Option<Breakdown>, ApiError> {
        let known = |dim: &str| {
            if meters.clone().any(|m| m.group_by.contains_key(dim)) {
                Ok(())
            } else {
                let mut all: Vec<&str> = meters
                    .clone()
                    .flat_map(|m| m.group_by.keys().map(String::as_str))
                    .collect();
                all.sort_unstable();
                all.dedup();
                Err(ApiError::bad_request(
                    "unknown_dimension",
                    format!(
                        "no meter has a dimension `{dim}` (the meters have: {})",
                        all.join(", ")
                    ),
                ))
            }
        };
        Self::parse_with(known, group_by, rest)
    }

    /// Whether `meter` has every dimension this breakdown groups or filters by.
    pub fn applies_to(&self, meter: &Meter) -> bool {
        self.group_by
            .iter()
            .chain(self.filter.iter().map(|(d, _)| d))
            .all(|d| meter.group_by.contains_key(d))
    }

    /// CSV columns of rows by dimension: `lead`, each asked dimension in the asked order, then
    /// `tail`.
    pub fn csv_header<'a>(&'a self, lead: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
        let dims = self.group_by.iter().map(String::as_str);
        lead.iter()
            .copied()
            .chain(dims)
            .chain(tail.iter().copied())
            .collect()
    }

    /// A group's value of each asked dimension, in the asked order: empty where it has none.
    pub fn csv_cells<'g>(&'g self, dims: &'g GroupKey) -> impl Iterator<Item = String> + 'g {
        self.group_by
            .iter()
            .map(|d| dims.get(d).cloned().flatten().unwrap_or_default())
    }

    fn parse_with(
        known: impl Fn(&str) -> Result<(), ApiError>,
        group_by: Option<&str>,
        rest: &BTreeMap<String, String>,
    ) -> Result<Option<Breakdown>, ApiError> {
        let mut b = Breakdown::default();
        if let Some(list) = group_by {
            for dim in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                known(dim)?;
                if !b.group_by.iter().any(|d| d == dim) {
                    b.group_by.push(dim.to_owned());
                }
            }
            if b.group_by.len() > MAX_GROUP_BY {
                return Err(ApiError::bad_request(
                    "invalid_group_by",
                    format!("at most {MAX_GROUP_BY} dimensions"),
                ));
            }
        }
        for (key, value) in rest {
            let dim = key
                .strip_prefix("filter[")
                .and_then(|k| k.strip_suffix(']'))
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_request", format!("unknown parameter `{key}`"))
                })?;
            known(dim)?;
            b.filter.push((dim.to_owned(), value.clone()));
        }
        Ok((!b.group_by.is_empty() || !b.filter.is_empty()).then_some(b))
    }

    /// The group a stored dimensions key falls in; `None` when the filter leaves it out.
    fn group_of(&self, key: &str) -> Option<GroupKey> {
        let dims: BTreeMap<String, String> = parse_dimensions_key(key)
            .into_iter()
            .map(|d| (d.name, d.value))
            .collect();
        self.filter
            .iter()
            .all(|(n, v)| dims.get(n).is_some_and(|have| have == v))
            .then(|| {
                self.group_by
                    .iter()
                    .map(|n| (n.clone(), dims.get(n).cloned()))
                    .collect()
            })
    }

    /// The groups of per-key series, largest total first (ties by dimensions), each with its
    /// buckets summed over its keys in time order.
    pub fn series_groups(
        &self,
        per_key: Vec<(String, Vec<(i64, u64)>)>,
    ) -> Vec<(GroupKey, Vec<(i64, u64)>)> {
        let mut groups: BTreeMap<GroupKey, BTreeMap<i64, u64>> = BTreeMap::new();
        for (key, points) in per_key {
            let Some(group) = self.group_of(&key) else {
                continue;
            };
            let buckets = groups.entry(group).or_default();
            for (t, v) in points {
                let b = buckets.entry(t).or_insert(0);
                *b = tally_schemas::quantity::add(*b, v);
            }
        }
        let total = |b: &BTreeMap<i64, u64>| {
            b.values()
                .fold(0u64, |t, v| tally_schemas::quantity::add(t, *v))
        };
        let mut out: Vec<_> = groups
            .into_iter()
            .map(|(g, b)| (total(&b), g, b.into_iter().collect::<Vec<_>>()))
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        out.into_iter().map(|(_, g, points)| (g, points)).collect()
    }

    /// The groups of per-key totals, largest first (ties by dimensions).
    pub fn groups(&self, totals: &[(String, u64)]) -> Vec<Group> {
        let mut sums: BTreeMap<GroupKey, u64> = BTreeMap::new();
        for (key, usage) in totals {
            let Some(group) = self.group_of(key) else {
                continue;
            };
            let sum = sums.entry(group).or_insert(0);
            *sum = tally_schemas::quantity::add(*sum, *usage);
        }
        let mut out: Vec<Group> = sums
            .into_iter()
            .map(|(dimensions, usage)| Group { dimensions, usage })
            .collect();
        out.sort_by(|a, b| b.usage.cmp(&a.usage).then(a.dimensions.cmp(&b.dimensions)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter() -> Meter {
        let toml = r#"
            aggregation = "sum"
            unit = "bytes"
            event_type = "request"
            value = "$.bytes"
            group_by = { region = "$.region", model = "$.model" }
        "#;
        toml::from_str(toml).unwrap()
    }

    fn totals() -> Vec<(String, u64)> {
        vec![
            (r#"{"model":"m1","region":"eu"}"#.into(), 1200),
            (r#"{"model":"m2","region":"eu"}"#.into(), 300),
            (r#"{"model":"m1","region":"us"}"#.into(), 800),
            (r#"{"region":"eu"}"#.into(), 5),
            (String::new(), 7),
        ]
    }

    fn group(pairs: &[(&str, Option<&str>)], usage: u64) -> Group {
        Group {
            dimensions: pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.map(str::to_owned)))
                .collect(),
            usage,
        }
    }

    #[test]
    fn groups_sum_by_the_asked_dimensions_and_keep_the_filtered_ones() {
        let none = BTreeMap::new();
        let by_region = Breakdown::parse("b", &meter(), Some("region"), &none)
            .unwrap()
            .unwrap();
        assert_eq!(
            by_region.groups(&totals()),
            [
                group(&[("region", Some("eu"))], 1505),
                group(&[("region", Some("us"))], 800),
                group(&[("region", None)], 7),
            ]
        );
        let eu: BTreeMap<String, String> = [("filter[region]".into(), "eu".into())].into();
        let eu_by_model = Breakdown::parse("b", &meter(), Some("model"), &eu)
            .unwrap()
            .unwrap();
        assert_eq!(
            eu_by_model.groups(&totals()),
            [
                group(&[("model", Some("m1"))], 1200),
                group(&[("model", Some("m2"))], 300),
                group(&[("model", None)], 5),
            ]
        );
        let only_eu = Breakdown::parse("b", &meter(), None, &eu).unwrap().unwrap();
        assert_eq!(only_eu.groups(&totals()), [group(&[], 1505)]);
        assert_eq!(Breakdown::parse("b", &meter(), None, &none).unwrap(), None);
    }

    #[test]
    fn unknown_dimensions_and_parameters_are_refused_with_codes() {
        let none = BTreeMap::new();
        let err = Breakdown::parse("b", &meter(), Some("colour"), &none).unwrap_err();
        assert_eq!(err.code, "unknown_dimension");
        let bad: BTreeMap<String, String> = [("filter[colour]".into(), "red".into())].into();
        let err = Breakdown::parse("b", &meter(), None, &bad).unwrap_err();
        assert_eq!(err.code, "unknown_dimension");
        let typo: BTreeMap<String, String> = [("fliter".into(), "x".into())].into();
        let err = Breakdown::parse("b", &meter(), None, &typo).unwrap_err();
        assert_eq!(err.code, "invalid_request");
    }

    #[test]
    fn series_groups_sum_their_keys_bucket_by_bucket() {
        let none = BTreeMap::new();
        let by_region = Breakdown::parse("b", &meter(), Some("region"), &none)
            .unwrap()
            .unwrap();
        let per_key = vec![
            (
                r#"{"model":"m1","region":"eu"}"#.to_owned(),
                vec![(0, 10), (60, 5)],
            ),
            (r#"{"model":"m2","region":"eu"}"#.to_owned(), vec![(60, 1)]),
            (r#"{"region":"us"}"#.to_owned(), vec![(0, 100)]),
        ];
        let eu: GroupKey = [("region".to_owned(), Some("eu".to_owned()))].into();
        let us: GroupKey = [("region".to_owned(), Some("us".to_owned()))].into();
        assert_eq!(
            by_region.series_groups(per_key),
            [(us, vec![(0, 100)]), (eu, vec![(0, 10), (60, 6)])]
        );
    }
}
