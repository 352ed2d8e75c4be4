//! The quota rules, as pure functions shared by the enforcer (decisions), the query API (states)
//! and the notifier (threshold crossings).
//!
//! With `p = (usage + quantity) / limit` and the catalogue's policy (80 / 100 / 110 % and a 48 h
//! grace by default):
//!
//! | p | decision | threshold |
//! |---|---|---|
//! | below 80 % | allow | none |
//! | 80 % up to 100 % | warn (allowed) | 80 |
//! | 100 % up to 110 %, grace running or not started | warn (allowed: soft limit) | 100 |
//! | 100 % up to 110 %, grace over | block | 100 |
//! | 110 % and above | block | 110 |
//!
//! The grace period starts when counted usage first reaches 100 % in a period (at the event time
//! of the event that crossed). Unlimited meters always allow; plans that bill overage never block.
//! A limit of 0 blocks everything.

use serde::{Deserialize, Serialize};

use crate::catalog::{Limit, OnLimit, QuotaPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Warn,
    Block,
}

/// How a dashboard shows a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageState {
    Ok,
    Warn,
    /// Over the soft limit, still allowed (grace running, or an overage plan).
    Over,
    Blocked,
}

/// The verdict on one quota question.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    pub state: UsageState,
    /// Highest threshold (percent) that usage + quantity reaches.
    pub threshold: Option<u32>,
    /// `(usage + quantity) / limit` in percent; absent for unlimited meters and zero limits.
    pub percent: Option<f64>,
    /// End of the soft-limit grace, once it started.
    pub grace_until_ms: Option<i64>,
    /// Units left before the soft limit, after `quantity`.
    pub remaining: Option<u64>,
}

/// Whether `amount` is at least `pct` percent of `limit` (exact, no floating point).
pub fn reaches(amount: u64, limit: u64, pct: u32) -> bool {
    u128::from(amount) * 100 >= u128::from(limit) * u128::from(pct)
}

/// The highest policy threshold that `amount` reaches against `limit`.
pub fn threshold_reached(policy: &QuotaPolicy, limit: u64, amount: u64) -> Option<u32> {
    [
        policy.block_percent,
        policy.soft_percent,
        policy.warn_percent,
    ]
    .into_iter()
    .find(|&p| reaches(amount, limit, p))
}

/// Thresholds crossed when usage grows from `before` to `after`, lowest first.
pub fn thresholds_crossed(
    policy: &QuotaPolicy,
    limit: Limit,
    before: u64,
    after: u64,
) -> impl Iterator<Item = u32> {
    let mut out = [None; 3];
    if let Some(limit) = limit.finite() {
        for (slot, pct) in out.iter_mut().zip([
            policy.warn_percent,
            policy.soft_percent,
            policy.block_percent,
        ]) {
            if reaches(after, limit, pct) && !reaches(before, limit, pct) {
                *slot = Some(pct);
            }
        }
    }
    out.into_iter().flatten()
}

/// When the soft-limit grace starts: when usage reached the soft limit of the limit in force
/// (`crossed_ms`), but never before that limit took effect (`limit_since_ms`, from
/// [`crate::customer::Customer::limit_since`]). Usage that was already past the new soft limit
/// when the limit changed starts its grace at the change. Only meaningful while usage is at or
/// past the soft limit.
pub fn grace_start(crossed_ms: Option<i64>, limit_since_ms: Option<i64>) -> Option<i64> {
    crossed_ms.max(limit_since_ms)
}

/// Decides whether `quantity` more units may be used.
pub fn decide(
    policy: &QuotaPolicy,
    limit: Limit,
    on_limit: OnLimit,
    usage: u64,
    quantity: u64,
    soft_crossed_ms: Option<i64>,
    now_ms: i64,
) -> Verdict {
    let Limit::Finite(limit) = limit else {
        return Verdict {
            decision: Decision::Allow,
            state: UsageState::Ok,
            threshold: None,
            percent: None,
            grace_until_ms: None,
            remaining: None,
        };
    };
    let amount = usage.saturating_add(quantity);
    let threshold = threshold_reached(policy, limit, amount);
    let grace_until_ms = soft_crossed_ms.map(|t| t.saturating_add(policy.grace_ms()));
    let grace_over = grace_until_ms.is_some_and(|until| now_ms >= until);
    let mut decision = match threshold {
        None => Decision::Allow,
        Some(t) if t >= policy.block_percent => Decision::Block,
        Some(t) if t >= policy.soft_percent && grace_over => Decision::Block,
        Some(_) => Decision::Warn,
    };
    if on_limit == OnLimit::Overage && decision == Decision::Block {
        decision = Decision::Warn;
    }
    let state = match (decision, threshold) {
        (Decision::Block, _) => UsageState::Blocked,
        (_, Some(t)) if t >= policy.soft_percent => UsageState::Over,
        (_, Some(_)) => UsageState::Warn,
        (_, None) => UsageState::Ok,
    };
    let soft = u128::from(limit) * u128::from(policy.soft_percent) / 100;
    let remaining = u64::try_from(soft.saturating_sub(u128::from(amount))).unwrap_or(u64::MAX);
    Verdict {
        decision,
        state,
        threshold,
        percent: (limit > 0).then(|| amount as f64 * 100.0 / limit as f64),
        grace_until_ms,
        remaining: Some(remaining),
    }
}

/// A threshold crossing: sent once per customer, meter, billing period and threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub customer: String,
    pub meter: String,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// Percent of the limit: 80, 100 or 110 with the default policy.
    pub threshold: u32,
    /// Usage when the threshold was crossed.
    pub usage: u64,
    pub limit: u64,
    /// Event time of the event that crossed it; the soft-limit grace runs from here.
    pub crossed_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn at(usage: u64, crossed: Option<i64>, now: i64) -> Verdict {
        decide(
            &QuotaPolicy::default(),
            Limit::Finite(10_000),
            OnLimit::Block,
            usage,
            0,
            crossed,
            now,
        )
    }

    #[test]
    fn every_boundary() {
        let cases = [
            (7_990, Decision::Allow, None),
            (8_000, Decision::Warn, Some(80)),
            (9_990, Decision::Warn, Some(80)),
            (10_000, Decision::Warn, Some(100)),
            (10_990, Decision::Warn, Some(100)),
            (11_000, Decision::Block, Some(110)),
        ];
        for (usage, decision, threshold) in cases {
            let v = at(usage, Some(0), 0);
            assert_eq!(
                (v.decision, v.threshold),
                (decision, threshold),
                "usage {usage}"
            );
        }
        let v = at(7_990, None, 0);
        assert_eq!(v.percent, Some(79.9));
        assert_eq!(v.remaining, Some(2_010));
        assert_eq!(v.state, UsageState::Ok);
    }

    #[test]
    fn quantity_counts_toward_the_decision() {
        let p = QuotaPolicy::default();
        let v = decide(&p, Limit::Finite(1_000), OnLimit::Block, 0, 1_100, None, 0);
        assert_eq!(v.decision, Decision::Block);
        let v = decide(&p, Limit::Finite(1_000), OnLimit::Block, 799, 1, None, 0);
        assert_eq!((v.decision, v.threshold), (Decision::Warn, Some(80)));
    }

    #[test]
    fn grace_expiry_blocks_at_the_soft_limit() {
        let v = at(10_500, Some(0), 48 * H - 1);
        assert_eq!((v.decision, v.state), (Decision::Warn, UsageState::Over));
        assert_eq!(v.grace_until_ms, Some(48 * H));
        let v = at(10_500, Some(0), 48 * H);
        assert_eq!(
            (v.decision, v.state),
            (Decision::Block, UsageState::Blocked)
        );
        // Below the soft limit an expired grace does not matter.
        assert_eq!(at(9_000, Some(0), 100 * H).decision, Decision::Warn);
    }

    #[test]
    fn unlimited_overage_and_zero_limits() {
        let p = QuotaPolicy::default();
        let v = decide(
            &p,
            Limit::Unlimited,
            OnLimit::Block,
            u64::MAX,
            u64::MAX,
            None,
            0,
        );
        assert_eq!(
            (v.decision, v.percent, v.threshold),
            (Decision::Allow, None, None)
        );
        let v = decide(
            &p,
            Limit::Finite(10),
            OnLimit::Overage,
            50,
            1,
            Some(0),
            100 * H,
        );
        assert_eq!(
            (v.decision, v.state, v.threshold),
            (Decision::Warn, UsageState::Over, Some(110))
        );
        let v = decide(&p, Limit::Finite(0), OnLimit::Block, 0, 0, None, 0);
        assert_eq!((v.decision, v.percent), (Decision::Block, None));
    }

    #[test]
    fn crossings_are_reported_once_each() {
        let p = QuotaPolicy::default();
        let l = Limit::Finite(100);
        assert_eq!(thresholds_crossed(&p, l, 0, 79).count(), 0);
        assert_eq!(
            thresholds_crossed(&p, l, 79, 80).collect::<Vec<_>>(),
            vec![80]
        );
        assert_eq!(
            thresholds_crossed(&p, l, 80, 200).collect::<Vec<_>>(),
            vec![100, 110]
        );
        assert_eq!(
            thresholds_crossed(&p, l, 0, 200).collect::<Vec<_>>(),
            vec![80, 100, 110]
        );
        assert_eq!(thresholds_crossed(&p, Limit::Unlimited, 0, 200).count(), 0);
    }
}
