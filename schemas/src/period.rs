//! Billing periods. A customer's period follows its subscription: monthly from the subscription's
//! anchor, like Stripe's `billing_cycle_anchor` (a day the month lacks becomes the month's last
//! day). Customers with no known subscription are billed by calendar month, UTC.
//!
//! Periods are half-open, `[start_ms, end_ms)`, in milliseconds since the Unix epoch.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Period {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Period {
    pub fn contains(&self, t_ms: i64) -> bool {
        self.start_ms <= t_ms && t_ms < self.end_ms
    }
}

fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let first_next = NaiveDate::from_ymd_opt(ny, nm, 1).unwrap_or(NaiveDate::MAX);
    first_next.pred_opt().map(|d| d.day()).unwrap_or(28)
}

fn add_months(year: i32, month: u32, delta: i32) -> (i32, u32) {
    let idx = year * 12 + month as i32 - 1 + delta;
    (idx.div_euclid(12), (idx.rem_euclid(12) + 1) as u32)
}

/// The start of the anchored period that begins in `(year, month)`.
fn anchored_start(year: i32, month: u32, day: u32, time: NaiveTime) -> i64 {
    let d = day.min(days_in_month(year, month));
    let date = NaiveDate::from_ymd_opt(year, month, d).unwrap_or(NaiveDate::MIN);
    NaiveDateTime::new(date, time).and_utc().timestamp_millis()
}

/// The calendar month (UTC) that contains `t_ms`.
pub fn calendar_month(t_ms: i64) -> Period {
    let t = utc(t_ms);
    let start = anchored_start(t.year(), t.month(), 1, NaiveTime::MIN);
    let (ny, nm) = add_months(t.year(), t.month(), 1);
    let end = anchored_start(ny, nm, 1, NaiveTime::MIN);
    Period {
        start_ms: start,
        end_ms: end,
    }
}

/// The monthly period, anchored at `anchor_ms`, that contains `t_ms`.
pub fn anchored_month(anchor_ms: i64, t_ms: i64) -> Period {
    let a = utc(anchor_ms);
    let (day, time) = (a.day(), a.time());
    let t = utc(t_ms);
    let (mut y, mut m) = (t.year(), t.month());
    let mut start = anchored_start(y, m, day, time);
    if start > t_ms {
        (y, m) = add_months(y, m, -1);
        start = anchored_start(y, m, day, time);
    }
    let (ny, nm) = add_months(y, m, 1);
    Period {
        start_ms: start,
        end_ms: anchored_start(ny, nm, day, time),
    }
}

/// Start of the UTC minute holding `t_ms`.
pub fn minute_of(t_ms: i64) -> i64 {
    t_ms - t_ms.rem_euclid(60_000)
}

/// Buckets of a usage series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl Window {
    /// Start of the bucket holding `t_ms` (UTC; months are calendar months).
    pub fn bucket_of(self, t_ms: i64) -> i64 {
        let step = match self {
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
            Window::Month => return calendar_month(t_ms).start_ms,
        };
        t_ms - t_ms.rem_euclid(step)
    }

    pub fn parse(s: &str) -> Option<Window> {
        match s {
            "minute" => Some(Window::Minute),
            "hour" => Some(Window::Hour),
            "day" => Some(Window::Day),
            "month" => Some(Window::Month),
            _ => None,
        }
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with second precision, or millisecond
/// precision when the instant has milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = utc(ms);
    if ms.rem_euclid(1000) == 0 {
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    } else {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    #[test]
    fn calendar_months() {
        let p = calendar_month(ms("2026-11-21T10:00:00Z"));
        assert_eq!(p.start_ms, ms("2026-11-01T00:00:00Z"));
        assert_eq!(p.end_ms, ms("2026-12-01T00:00:00Z"));
        let p = calendar_month(ms("2026-12-31T23:59:59.999Z"));
        assert_eq!(p.end_ms, ms("2027-01-01T00:00:00Z"));
        assert!(!p.contains(p.end_ms));
        assert!(p.contains(p.start_ms));
    }

    #[test]
    fn anchored_periods_follow_the_anchor_and_clamp_short_months() {
        let anchor = ms("2026-01-31T08:30:00Z");
        let p = anchored_month(anchor, ms("2026-02-15T00:00:00Z"));
        assert_eq!(p.start_ms, ms("2026-01-31T08:30:00Z"));
        assert_eq!(p.end_ms, ms("2026-02-28T08:30:00Z"));
        let p = anchored_month(anchor, ms("2026-02-28T08:30:00Z"));
        assert_eq!(p.start_ms, ms("2026-02-28T08:30:00Z"));
        assert_eq!(p.end_ms, ms("2026-03-31T08:30:00Z"));
        let p = anchored_month(ms("2026-03-15T00:00:00Z"), ms("2026-11-14T23:59:59Z"));
        assert_eq!(p.start_ms, ms("2026-10-15T00:00:00Z"));
        assert_eq!(p.end_ms, ms("2026-11-15T00:00:00Z"));
        // Across a year boundary, and before the anchor itself.
        let p = anchored_month(ms("2026-06-10T00:00:00Z"), ms("2026-01-05T00:00:00Z"));
        assert_eq!(p.start_ms, ms("2025-12-10T00:00:00Z"));
        assert_eq!(p.end_ms, ms("2026-01-10T00:00:00Z"));
    }

    #[test]
    fn windows_bucket_times() {
        let t = ms("2026-11-21T10:17:42.5Z");
        assert_eq!(Window::Minute.bucket_of(t), ms("2026-11-21T10:17:00Z"));
        assert_eq!(Window::Hour.bucket_of(t), ms("2026-11-21T10:00:00Z"));
        assert_eq!(Window::Day.bucket_of(t), ms("2026-11-21T00:00:00Z"));
        assert_eq!(Window::Month.bucket_of(t), ms("2026-11-01T00:00:00Z"));
        assert_eq!(minute_of(-1), -60_000);
        assert_eq!(rfc3339(t), "2026-11-21T10:17:42.500Z");
        assert_eq!(rfc3339(ms("2026-11-21T10:00:00Z")), "2026-11-21T10:00:00Z");
    }
}
