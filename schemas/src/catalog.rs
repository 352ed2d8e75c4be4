//! The meter and plan catalogue: which meters exist, how each one aggregates, and what every plan
//! allows. Plans are configuration: the default catalogue ships as `catalog.toml` and a user's own
//! file replaces it whole.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::meter::{Condition, EventType, MAX_SCALE, Reader, ValueRule};
use crate::path::JsonPath;
use crate::{Error, Result};

/// Most meters a catalogue holds, the file's and the managed ones (archived included).
pub const MAX_METERS: usize = 255;

/// The catalogue Tally ships with.
pub const DEFAULT_CATALOG_TOML: &str = include_str!("../catalog.toml");

/// How the events of a meter fold into one figure per period.
///
/// What a plan's limit bounds follows the aggregation: for `count` and `sum` the period's total,
/// for `max` the largest value reported in the period (one report past the limit crosses it),
/// for `min` the smallest (the period's usage reaches the limit only while every report of the
/// period did), for `unique_count` the number of distinct values reported in the period (seats,
/// active users), for `latest` the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Each event adds its `data.value` (default 1): requests, calls.
    Count,
    /// Each event adds its `data.value`: bytes, minutes.
    Sum,
    /// The largest value of the period's events: peak concurrency, the largest build.
    Max,
    /// The smallest value of the period's events.
    Min,
    /// How many distinct values of the `value` path the period's events carried (exactly):
    /// seats, active users, distinct models. A value is a string, number or boolean, compared
    /// as text (`7` and `"7"` are one value).
    UniqueCount,
    /// A gauge: the value of the latest event (by event time) is the usage, and it carries over
    /// from one period to the next. Ties on event time keep the larger value.
    Latest,
}

impl Aggregation {
    /// Whether the events of this meter add up (count, sum).
    pub fn is_additive(self) -> bool {
        matches!(self, Aggregation::Count | Aggregation::Sum)
    }

    /// Whether usage belongs to a billing period and starts afresh with the next one (every
    /// aggregation but the `latest` gauge, which carries over).
    pub fn is_periodic(self) -> bool {
        !matches!(self, Aggregation::Latest)
    }

    /// Folds value `b` into the figure `a` of the same period: commutative and associative.
    /// For `latest` (which orders by event time, see [`crate::rollup::Cell`]) the larger value.
    /// For `unique_count`, `b` is how many values are new to the period (the caller knows which
    /// values it saw): they add.
    pub fn fold(self, a: u64, b: u64) -> u64 {
        match self {
            Aggregation::Count | Aggregation::Sum | Aggregation::UniqueCount => {
                crate::quantity::add(a, b)
            }
            Aggregation::Max | Aggregation::Latest => a.max(b),
            Aggregation::Min => a.min(b),
        }
    }
}

/// One meter of the catalogue (see [`crate::meter`] for how it reads events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// How events fold into usage.
    pub aggregation: Aggregation,
    /// The unit of the quantity and of every limit on this meter.
    pub unit: String,
    /// Shown in dashboards and the API.
    #[serde(default)]
    pub description: String,
    /// The CloudEvents `type` this meter reads; default: the meter's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Path of the quantity in `data`. Default: `data.value` (1 when absent) for a meter
    /// without `event_type`; none (1 per event) for a `count` meter with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<JsonPath>,
    /// Decimal places of the quantity: usage and limits are whole numbers of `10^-scale` units.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scale: u8,
    /// Named dimensions: name = path of its value in `data`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_by: BTreeMap<String, JsonPath>,
    /// Conditions an event must meet to feed this meter (all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Condition>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

impl Meter {
    /// The CloudEvents `type` this meter reads.
    pub fn reads<'a>(&'a self, name: &'a str) -> &'a str {
        self.event_type.as_deref().unwrap_or(name)
    }

    fn reader(&self, name: &str) -> Result<Reader> {
        let err = |why: String| Error::Catalog(format!("meter `{name}`: {why}"));
        let fail = |why: String| Err(err(why));
        let value = match (&self.event_type, &self.value, self.aggregation) {
            (_, Some(_), Aggregation::Count) => {
                return fail("a count meter counts events and takes no `value`".into());
            }
            (_, Some(path), Aggregation::UniqueCount) => ValueRule::Distinct(path.clone()),
            (_, None, Aggregation::UniqueCount) => {
                return fail("a unique_count meter names the `value` path it counts".into());
            }
            (_, Some(path), _) => ValueRule::Path(path.clone()),
            (None, None, _) => ValueRule::DataValue,
            (Some(_), None, Aggregation::Count) => ValueRule::One,
            (Some(_), None, _) => {
                return fail("a meter with an `event_type` names its `value` path".into());
            }
        };
        if self.aggregation == Aggregation::UniqueCount && self.scale != 0 {
            return fail("a unique_count meter counts whole values and takes no `scale`".into());
        }
        if self.scale > MAX_SCALE {
            return fail(format!("`scale` is at most {MAX_SCALE}"));
        }
        if let Some(t) = &self.event_type
            && (t.is_empty() || t.len() > 256)
        {
            return fail("`event_type` must be 1-256 bytes".into());
        }
        if !self.group_by.is_empty() && !self.aggregation.is_additive() {
            return fail("dimensions (`group_by`) are kept for count and sum meters only".into());
        }
        if self.group_by.len() > 8 {
            return fail("at most 8 dimensions".into());
        }
        for dim in self.group_by.keys() {
            if crate::event::check_meter_name(dim).is_err() {
                return fail(format!(
                    "dimension name `{dim}` must be 1-64 bytes of a-z, 0-9 and _, starting with a letter"
                ));
            }
        }
        for c in &self.filter {
            c.check().map_err(err)?;
        }
        Ok(Reader {
            meter: name.to_owned(),
            value,
            scale: self.scale,
            filter: self.filter.clone(),
            group_by: self
                .group_by
                .iter()
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
        })
    }
}

/// A plan's allowance on one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// At most this many units per billing period (for gauges: at any time).
    Finite(u64),
    /// Never limited.
    Unlimited,
}

impl Limit {
    pub fn finite(self) -> Option<u64> {
        match self {
            Limit::Finite(n) => Some(n),
            Limit::Unlimited => None,
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Limit::Finite(n) => s.serialize_u64(*n),
            Limit::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct LimitVisitor;
        impl Visitor<'_> for LimitVisitor {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative whole number, \"unlimited\" or \"custom\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Limit, E> {
                Ok(Limit::Finite(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Limit, E> {
                u64::try_from(v)
                    .map(Limit::Finite)
                    .map_err(|_| E::custom("a limit cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Limit, E> {
                match v {
                    // A custom limit is negotiated per customer and set as an override; until it
                    // is set, the meter does not block.
                    "unlimited" | "custom" => Ok(Limit::Unlimited),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(LimitVisitor)
    }
}

/// In the OpenAPI document: a whole number, or `"unlimited"` (`"custom"` is read as unlimited).
impl utoipa::PartialSchema for Limit {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::Integer))
                    .minimum(Some(0)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::String))
                    .enum_values(Some(["unlimited", "custom"])),
            )
            .description(Some(
                "Units per billing period (gauges: at any time), or unlimited",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Limit {}

/// What happens when usage passes the plan's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Warn, grant the grace period, then block (the 80 / 100 / 110 % rules).
    #[default]
    Block,
    /// Usage past the limit is billed as overage and never blocked; notifications still go out.
    Overage,
}

/// Per-plan request-rate limit (a token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained checks per second.
    pub per_second: u32,
    /// Checks that may arrive at once above the sustained rate.
    pub burst: u32,
}

/// One plan of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Name shown to people.
    pub display_name: String,
    /// List price per month; absent for plans priced by contract.
    #[serde(default)]
    pub monthly_price_cents: Option<u64>,
    /// Block or bill overage once the limit is passed.
    #[serde(default)]
    pub on_limit: OnLimit,
    /// Request-rate limit applied by the enforcer, if any.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Allowance per meter; a meter that is not listed is unlimited.
    #[serde(default)]
    pub limits: BTreeMap<String, Limit>,
}

impl Plan {
    /// The plan's allowance on `meter`.
    pub fn limit(&self, meter: &str) -> Limit {
        self.limits.get(meter).copied().unwrap_or(Limit::Unlimited)
    }
}

/// Thresholds and grace periods of the quota rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaPolicy {
    pub warn_percent: u32,
    pub soft_percent: u32,
    pub block_percent: u32,
    pub grace_hours: u32,
    pub payment_grace_days: u32,
    pub default_plan: String,
    pub fallback_plan: String,
}

impl Default for QuotaPolicy {
    fn default() -> Self {
        QuotaPolicy {
            warn_percent: 80,
            soft_percent: 100,
            block_percent: 110,
            grace_hours: 48,
            payment_grace_days: 7,
            default_plan: "free".into(),
            fallback_plan: "free".into(),
        }
    }
}

impl QuotaPolicy {
    pub fn grace_ms(&self) -> i64 {
        i64::from(self.grace_hours) * 3_600_000
    }

    pub fn payment_grace_ms(&self) -> i64 {
        i64::from(self.payment_grace_days) * 86_400_000
    }
}

/// Pricing facts that billing needs beyond the per-plan prices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub annual_discount_percent: u32,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            annual_discount_percent: 10,
        }
    }
}

/// Meters, plans and the quota policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub policy: QuotaPolicy,
    #[serde(default)]
    pub pricing: Pricing,
    pub meters: BTreeMap<String, Meter>,
    pub plans: BTreeMap<String, Plan>,
    /// The meters reading each CloudEvents `type`, built from `meters` (archived meters read
    /// none).
    #[serde(skip)]
    event_types: BTreeMap<String, EventType>,
    /// The meters managed through the API (`/v1/meters`) rather than the catalogue file; each
    /// is in `meters` too.
    #[serde(skip)]
    managed: BTreeMap<String, ManagedMeter>,
}

/// A meter managed through the API (`/v1/meters`), as the store keeps it. Its name is never
/// one of the catalogue file's meters (the file's meter of a name wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedMeter {
    pub name: String,
    pub meter: Meter,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Set once archived: the meter reads no more events; its usage stays readable and its
    /// name stays taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_ms: Option<i64>,
}

impl Catalog {
    /// Parses and checks a catalogue written in TOML.
    pub fn from_toml(text: &str) -> Result<Catalog> {
        let mut catalog: Catalog =
            toml::from_str(text).map_err(|e| Error::Catalog(e.message().to_string()))?;
        catalog.check()?;
        catalog.event_types = catalog.index()?;
        Ok(catalog)
    }

    /// The catalogue Tally ships with.
    pub fn builtin() -> Catalog {
        // The shipped file is checked by this crate's tests, so this cannot fail at run time.
        Catalog::from_toml(DEFAULT_CATALOG_TOML).expect("the built-in catalogue is valid")
    }

    /// The catalogue file's meters and plans with the meters managed through the API added
    /// (whatever this catalogue held of those before is replaced). A managed meter named like
    /// one of the file's is left out: the file's wins. Every meter is checked as the file's
    /// are; archived meters read no events.
    pub fn with_managed(&self, managed: impl IntoIterator<Item = ManagedMeter>) -> Result<Catalog> {
        let mut out = self.clone();
        out.meters
            .retain(|name, _| !self.managed.contains_key(name));
        out.managed.clear();
        for m in managed {
            if out.meters.contains_key(&m.name) {
                continue;
            }
            out.meters.insert(m.name.clone(), m.meter.clone());
            out.managed.insert(m.name.clone(), m);
        }
        out.check()?;
        out.event_types = out.index()?;
        Ok(out)
    }

    /// The record of a meter managed through the API; `None` for the file's meters.
    pub fn managed(&self, name: &str) -> Option<&ManagedMeter> {
        self.managed.get(name)
    }

    /// The meters managed through the API, archived ones included, in name order.
    pub fn managed_meters(&self) -> impl Iterator<Item = &ManagedMeter> {
        self.managed.values()
    }

    /// Whether `name` is a managed meter that was archived.
    pub fn is_archived(&self, name: &str) -> bool {
        self.managed
            .get(name)
            .is_some_and(|m| m.archived_ms.is_some())
    }

    /// Every meter in an order that only grows at its end as meters are added: the file's in
    /// name order, then the managed ones oldest first (ties by name).
    pub fn meter_order(&self) -> Vec<&str> {
        let mut managed: Vec<&ManagedMeter> = self.managed.values().collect();
        managed.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
        self.meters
            .keys()
            .filter(|n| !self.managed.contains_key(*n))
            .map(String::as_str)
            .chain(managed.into_iter().map(|m| m.name.as_str()))
            .collect()
    }

    fn check(&self) -> Result<()> {
        if self.meters.is_empty() || self.meters.len() > MAX_METERS {
            return Err(Error::Catalog(format!(
                "the catalogue must define between 1 and {MAX_METERS} meters"
            )));
        }
        for name in self.meters.keys() {
            crate::event::check_meter_name(name)
                .map_err(|_| Error::Catalog(format!("meter name `{name}` is not valid")))?;
        }
        for (id, plan) in &self.plans {
            for meter in plan.limits.keys() {
                if !self.meters.contains_key(meter) {
                    return Err(Error::Catalog(format!(
                        "plan `{id}` limits unknown meter `{meter}`"
                    )));
                }
            }
        }
        for plan in [&self.policy.default_plan, &self.policy.fallback_plan] {
            if !self.plans.contains_key(plan) {
                return Err(Error::Catalog(format!(
                    "policy names unknown plan `{plan}`"
                )));
            }
        }
        let p = &self.policy;
        if !(p.warn_percent <= p.soft_percent && p.soft_percent <= p.block_percent)
            || p.soft_percent == 0
        {
            return Err(Error::Catalog(
                "policy needs 0 < soft_percent and warn_percent <= soft_percent <= block_percent"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Which meters read which event type, each meter checked.
    fn index(&self) -> Result<BTreeMap<String, EventType>> {
        let mut types: BTreeMap<String, EventType> = BTreeMap::new();
        for (name, meter) in &self.meters {
            let reader = meter.reader(name)?;
            if self.is_archived(name) {
                continue;
            }
            types
                .entry(meter.reads(name).to_owned())
                .or_insert_with(|| EventType { readers: vec![] })
                .readers
                .push(reader);
        }
        Ok(types)
    }

    /// The meters that read events of CloudEvents type `ty`.
    pub fn event_type(&self, ty: &str) -> Option<&EventType> {
        self.event_types.get(ty)
    }

    pub fn meter(&self, name: &str) -> Option<&Meter> {
        self.meters.get(name)
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id)
    }

    /// The plan of customers that were never assigned one.
    pub fn default_plan(&self) -> &Plan {
        &self.plans[&self.policy.default_plan]
    }

    /// The plan a customer falls back to after its payment grace ran out.
    pub fn fallback_plan(&self) -> &Plan {
        &self.plans[&self.policy.fallback_plan]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_matches_the_published_plans() {
        let c = Catalog::builtin();
        assert_eq!(c.plans.len(), 4);
        let free = c.plan("free").unwrap();
        assert_eq!(free.limit("api_requests"), Limit::Finite(10_000));
        assert_eq!(free.limit("bandwidth_bytes"), Limit::Finite(1_000_000_000));
        assert_eq!(free.limit("build_minutes"), Limit::Finite(100));
        assert_eq!(free.limit("wasm_modules"), Limit::Finite(3));
        assert_eq!(free.limit("edge_deployments"), Limit::Finite(2));
        assert_eq!(free.limit("collaborators"), Limit::Finite(1));
        let starter = c.plan("starter").unwrap();
        assert_eq!(starter.monthly_price_cents, Some(2_900));
        assert_eq!(starter.limit("api_requests"), Limit::Finite(100_000));
        assert_eq!(starter.limit("collaborators"), Limit::Finite(3));
        let pro = c.plan("professional").unwrap();
        assert_eq!(pro.monthly_price_cents, Some(9_900));
        assert_eq!(pro.limit("bandwidth_bytes"), Limit::Finite(100_000_000_000));
        assert_eq!(pro.limit("build_minutes"), Limit::Finite(2_000));
        let ent = c.plan("enterprise").unwrap();
        assert_eq!(ent.limit("api_requests"), Limit::Unlimited);
        assert_eq!(ent.limit("build_minutes"), Limit::Unlimited);
        // storage_bytes is metered but no plan limits it.
        assert_eq!(free.limit("storage_bytes"), Limit::Unlimited);
        assert_eq!(
            c.meter("wasm_modules").unwrap().aggregation,
            Aggregation::Latest
        );
        assert_eq!(c.pricing.annual_discount_percent, 10);
        assert_eq!(c.policy.grace_ms(), 48 * 3_600_000);
    }

    #[test]
    fn rejects_limits_on_unknown_meters_and_unknown_keys() {
        let bad = "[meters.a]\naggregation='sum'\nunit='x'\n[plans.free]\ndisplay_name='F'\nlimits={b=1}\n";
        assert!(
            matches!(Catalog::from_toml(bad), Err(Error::Catalog(m)) if m.contains("unknown meter"))
        );
        let typo =
            "[meters.a]\naggregation='sum'\nunit='x'\nunitz='y'\n[plans.free]\ndisplay_name='F'\n";
        assert!(Catalog::from_toml(typo).is_err());
        let neg = "[meters.a]\naggregation='sum'\nunit='x'\n[plans.free]\ndisplay_name='F'\nlimits={a=-1}\n";
        assert!(Catalog::from_toml(neg).is_err());
    }
}
