//! What Tally knows of a customer: its plan, per-meter limit overrides, billing period and payment
//! state. Customers Tally never heard of are on the catalogue's default plan, billed by calendar
//! month.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Limit, Plan};
use crate::period::{Period, anchored_month, calendar_month};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    /// Plan id in the catalogue.
    pub plan: String,
    /// Limits negotiated for this customer, replacing the plan's on these meters.
    #[serde(default)]
    pub limit_overrides: BTreeMap<String, Limit>,
    /// Start of any one billing period; later periods start monthly on the same day and time.
    #[serde(default)]
    pub period_anchor_ms: Option<i64>,
    /// The subscription's current period as the billing provider reported it; it wins over the
    /// anchor while it lasts.
    #[serde(default)]
    pub current_period: Option<Period>,
    /// Links the customer to Stripe for usage reporting.
    #[serde(default)]
    pub stripe_customer_id: Option<String>,
    /// When the latest unpaid invoice failed; the payment grace runs from here.
    #[serde(default)]
    pub payment_failed_at_ms: Option<i64>,
    /// When each meter's limit last changed (a new plan, override or payment state), so that
    /// the soft-limit grace runs against the limit in force: see [`Customer::limit_since`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limit_changed_ms: BTreeMap<String, i64>,
    /// Last change, for replicas that poll for changes.
    #[serde(default)]
    pub updated_ms: i64,
    /// The latest Stripe events applied to this record, so that a retried or older delivery
    /// never moves it backwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_events: Option<StripeEvents>,
}

/// The latest Stripe event applied per kind: (`created`, event id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEvents {
    /// Of the customer's current subscription ([`StripeEvents::current_subscription`]).
    #[serde(default)]
    pub subscription: Option<(i64, String)>,
    /// The subscription the plan follows, as (its `created`, its id): events of an older
    /// subscription (one the customer replaced) are not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_subscription: Option<(i64, String)>,
    #[serde(default)]
    pub invoice: Option<(i64, String)>,
}

impl Customer {
    /// A customer on the catalogue's default plan.
    pub fn new_default(catalog: &Catalog) -> Customer {
        Customer {
            plan: catalog.policy.default_plan.clone(),
            limit_overrides: BTreeMap::new(),
            period_anchor_ms: None,
            current_period: None,
            stripe_customer_id: None,
            payment_failed_at_ms: None,
            limit_changed_ms: BTreeMap::new(),
            updated_ms: 0,
            stripe_events: None,
        }
    }

    /// The billing period holding `t_ms`.
    pub fn period_at(&self, t_ms: i64) -> Period {
        if let Some(p) = self.current_period
            && p.contains(t_ms)
        {
            return p;
        }
        match self
            .period_anchor_ms
            .or(self.current_period.map(|p| p.start_ms))
        {
            Some(anchor) => anchored_month(anchor, t_ms),
            None => calendar_month(t_ms),
        }
    }

    /// When the payment grace ends, if a payment failed.
    pub fn payment_grace_until(&self, catalog: &Catalog) -> Option<i64> {
        self.payment_failed_at_ms
            .map(|t| t.saturating_add(catalog.policy.payment_grace_ms()))
    }

    /// Whether the customer lost its plan to an unpaid invoice at `now_ms`.
    pub fn fell_back(&self, catalog: &Catalog, now_ms: i64) -> bool {
        self.payment_grace_until(catalog)
            .is_some_and(|until| now_ms >= until)
    }

    /// The plan in force at `now_ms`, with its id.
    pub fn plan_at<'c>(&self, catalog: &'c Catalog, now_ms: i64) -> (&'c str, &'c Plan) {
        let id = if self.fell_back(catalog, now_ms) {
            &catalog.policy.fallback_plan
        } else {
            &self.plan
        };
        match catalog.plans.get_key_value(id.as_str()) {
            Some((id, plan)) => (id.as_str(), plan),
            // The plan was removed from a replaced catalogue: the default plan applies.
            None => (catalog.policy.default_plan.as_str(), catalog.default_plan()),
        }
    }

    /// The limit on `meter` at `now_ms`: the override if one is set and the plan is still
    /// paid for, otherwise the plan's.
    pub fn limit_at(&self, catalog: &Catalog, meter: &str, now_ms: i64) -> Limit {
        if !self.fell_back(catalog, now_ms)
            && let Some(l) = self.limit_overrides.get(meter)
        {
            return *l;
        }
        self.plan_at(catalog, now_ms).1.limit(meter)
    }

    /// Records `now_ms` as the change time of every meter whose limit at `now_ms` differs from
    /// `before`'s. Every writer of a customer record calls it.
    pub fn note_limit_changes(&mut self, before: &Customer, catalog: &Catalog, now_ms: i64) {
        for meter in catalog.meters.keys() {
            if before.limit_at(catalog, meter, now_ms) != self.limit_at(catalog, meter, now_ms) {
                self.limit_changed_ms.insert(meter.clone(), now_ms);
            }
        }
    }

    /// When the limit in force on `meter` at `now_ms` took effect, if it ever changed: the
    /// latest recorded change, or the end of a failed payment's grace when the fallback plan
    /// changed this limit. The soft-limit grace never starts before it
    /// ([`crate::quota::grace_start`]): a limit raised or lowered mid-period gives a fresh
    /// grace against the new limit.
    pub fn limit_since(&self, catalog: &Catalog, meter: &str, now_ms: i64) -> Option<i64> {
        let changed = self.limit_changed_ms.get(meter).copied();
        let fallback = self
            .payment_grace_until(catalog)
            .filter(|&from| now_ms >= from)
            .filter(|&from| {
                self.limit_at(catalog, meter, from.saturating_sub(1))
                    != self.limit_at(catalog, meter, from)
            });
        changed.max(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::parse_rfc3339 as ms;

    #[test]
    fn limit_changes_are_recorded_per_meter_and_the_fallback_counts_as_one() {
        let c = Catalog::builtin();
        let t0 = ms("2026-11-02T10:00:00Z").unwrap();
        let mut before = Customer::new_default(&c);
        before.plan = "starter".into();
        let mut after = before.clone();
        after
            .limit_overrides
            .insert("bandwidth_bytes".into(), Limit::Finite(5));
        after.note_limit_changes(&before, &c, t0);
        assert_eq!(after.limit_since(&c, "bandwidth_bytes", t0), Some(t0));
        assert_eq!(after.limit_since(&c, "api_requests", t0), None);
        // The payment grace running out changes the limits that differ on the fallback plan.
        after.payment_failed_at_ms = Some(t0);
        let from = after.payment_grace_until(&c).unwrap();
        assert_eq!(after.limit_since(&c, "api_requests", from - 1), None);
        assert_eq!(after.limit_since(&c, "api_requests", from), Some(from));
        assert_eq!(
            after.limit_since(&c, "bandwidth_bytes", from + 5),
            Some(from)
        );
        // A record that changes nothing records nothing.
        let mut same = after.clone();
        same.note_limit_changes(&after, &c, from + 10);
        assert_eq!(same.limit_changed_ms, after.limit_changed_ms);
    }

    #[test]
    fn payment_grace_then_fallback_to_free() {
        let c = Catalog::builtin();
        let mut cust = Customer::new_default(&c);
        cust.plan = "professional".into();
        cust.limit_overrides
            .insert("api_requests".into(), Limit::Finite(5_000_000));
        let t0 = ms("2026-11-01T00:00:00Z").unwrap();
        assert_eq!(
            cust.limit_at(&c, "api_requests", t0),
            Limit::Finite(5_000_000)
        );
        assert_eq!(cust.limit_at(&c, "build_minutes", t0), Limit::Finite(2_000));
        cust.payment_failed_at_ms = Some(t0);
        let day = 86_400_000;
        assert_eq!(cust.plan_at(&c, t0 + 7 * day - 1).0, "professional");
        assert_eq!(
            cust.limit_at(&c, "api_requests", t0 + 7 * day - 1),
            Limit::Finite(5_000_000)
        );
        assert_eq!(cust.plan_at(&c, t0 + 7 * day).0, "free");
        assert_eq!(
            cust.limit_at(&c, "api_requests", t0 + 7 * day),
            Limit::Finite(10_000)
        );
    }

    #[test]
    fn subscription_period_wins_then_anchor_continues_it() {
        let c = Catalog::builtin();
        let mut cust = Customer::new_default(&c);
        let now = ms("2026-11-21T10:00:00Z").unwrap();
        assert_eq!(
            cust.period_at(now).start_ms,
            ms("2026-11-01T00:00:00Z").unwrap()
        );
        let p = Period {
            start_ms: ms("2026-11-07T12:00:00Z").unwrap(),
            end_ms: ms("2026-12-07T12:00:00Z").unwrap(),
        };
        cust.current_period = Some(p);
        assert_eq!(cust.period_at(now), p);
        let next = cust.period_at(ms("2026-12-20T00:00:00Z").unwrap());
        assert_eq!(next.start_ms, p.end_ms);
        assert_eq!(next.end_ms, ms("2027-01-07T12:00:00Z").unwrap());
        let unknown = Customer {
            plan: "gone".into(),
            ..cust
        };
        assert_eq!(unknown.plan_at(&c, now).0, "free");
    }
}
