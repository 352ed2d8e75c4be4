//! SQLite store, reader role ([`UsageReader`]): totals, series, top customers and totals across
//! customers, the enforcer's snapshot.

use async_trait::async_trait;

use super::writer::read_offsets;
use super::*;

/// The high and low parts (`h`, `l`) of the figure of the `usage_minute` rows selected, by
/// `aggregation`: the sums of the parts for additive meters (exact past 2^63, see
/// [`tally_schemas::quantity`]), the parts of the largest or smallest value for `max` and `min`,
/// of the number of distinct values for `unique_count`.
pub(super) fn split(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::UniqueCount => {
            "COUNT(DISTINCT distinct_value) >> 32 AS h, \
             COUNT(DISTINCT distinct_value) & 4294967295 AS l"
        }
        Aggregation::Max => "MAX(value) >> 32 AS h, MAX(value) & 4294967295 AS l",
        Aggregation::Min => "MIN(value) >> 32 AS h, MIN(value) & 4294967295 AS l",
        _ => "SUM(value >> 32) AS h, SUM(value & 4294967295) AS l",
    }
}

/// A customer's usage of a periodic meter over `[from_ms, to_ms)`, `None` without any cell.
fn period_figure(
    c: &Connection,
    customer: &str,
    meter: &str,
    aggregation: Aggregation,
    from_ms: i64,
    to_ms: i64,
) -> Result<Option<u64>> {
    let (high, low, cells): (Option<i64>, Option<i64>, i64) = c
        .prepare_cached(&format!(
            "SELECT {}, COUNT(*) FROM usage_minute
             WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4",
            split(aggregation)
        ))?
        .query_row(params![customer, meter, from_ms, to_ms], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    Ok((cells > 0).then(|| joined(high, low)))
}

fn total(
    c: &Connection,
    customer: &str,
    meter: &str,
    aggregation: Aggregation,
    from_ms: i64,
    to_ms: i64,
) -> Result<u64> {
    if aggregation.is_periodic() {
        let v = period_figure(c, customer, meter, aggregation, from_ms, to_ms)?;
        return Ok(v.unwrap_or(0));
    }
    let v: Option<i64> = {
        c.prepare_cached(
            "SELECT value FROM usage_minute
             WHERE customer = ?1 AND meter = ?2 AND minute_ms < ?3
             ORDER BY minute_ms DESC LIMIT 1",
        )?
        .query_row(params![customer, meter, to_ms], |r| r.get(0))
        .optional()?
    };
    Ok(v.unwrap_or(0).max(0) as u64)
}

fn distinct_values(
    c: &Connection,
    customer: &str,
    meter: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<String>> {
    let mut stmt = c.prepare_cached(
        "SELECT DISTINCT distinct_value FROM usage_minute
         WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
         ORDER BY distinct_value",
    )?;
    let rows = stmt.query_map(params![customer, meter, from_ms, to_ms], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A customer's total from the sums of the high and low parts of its cells (see
/// [`tally_schemas::quantity`]): exact, held at the cap.
fn joined(high: Option<i64>, low: Option<i64>) -> u64 {
    quantity::join_capped(high.unwrap_or(0).into(), low.unwrap_or(0).into())
}

#[async_trait]
impl UsageReader for SqliteStore {
    async fn total(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            total(c, &customer, &meter, aggregation, from_ms, to_ms)
        })
        .await
    }

    async fn dimension_totals(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, u64)>> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT dims, SUM(value >> 32), SUM(value & 4294967295) FROM usage_minute
                 WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
                 GROUP BY dims ORDER BY dims",
            )?;
            let rows = stmt.query_map(params![customer, meter, from_ms, to_ms], |r| {
                Ok((r.get::<_, String>(0)?, joined(r.get(1)?, r.get(2)?)))
            })?;
            Ok(rows
                .collect::<rusqlite::Result<Vec<_>>>()?
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .collect())
        })
        .await
    }

    async fn dimension_series(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(String, Vec<(i64, u64)>)>> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT dims, minute_ms, value FROM usage_minute
                 WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
                 ORDER BY dims, minute_ms",
            )?;
            let rows = stmt.query_map(params![customer, meter, from_ms, to_ms], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?.max(0) as u64,
                ))
            })?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(crate::store::bucket_by_key(rows, window))
        })
        .await
    }

    async fn distinct_values(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<String>> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            distinct_values(c, &customer, &meter, from_ms, to_ms)
        })
        .await
    }

    async fn series(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(i64, u64)>> {
        let (customer, meter) = (customer.to_owned(), meter.to_owned());
        Self::with(&self.reader, move |c| {
            if aggregation == Aggregation::UniqueCount {
                let mut stmt = c.prepare_cached(
                    "SELECT minute_ms, distinct_value FROM usage_minute
                     WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
                     ORDER BY minute_ms",
                )?;
                let rows = stmt
                    .query_map(params![customer, meter, from_ms, to_ms], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                return Ok(crate::store::bucket_distinct(rows, window));
            }
            let mut stmt = c.prepare_cached(
                "SELECT minute_ms, value, last_ms FROM usage_minute
                 WHERE customer = ?1 AND meter = ?2 AND minute_ms >= ?3 AND minute_ms < ?4
                 ORDER BY minute_ms",
            )?;
            let rows = stmt.query_map(params![customer, meter, from_ms, to_ms], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?;
            // Rows come in time order: the last one in a bucket is the latest.
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(crate::store::bucket(rows, window, aggregation))
        })
        .await
    }

    async fn top_customers(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        let meter = meter.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Self::with(&self.reader, move |c| {
            let sql = if aggregation.is_periodic() {
                // The sums normalised to (high, low < 2^32) order exactly, without overflow.
                format!(
                    "SELECT customer, h + (l >> 32) AS hi, l & 4294967295 AS lo FROM (
                         SELECT customer, {}
                         FROM usage_minute WHERE meter = ?1 AND minute_ms >= ?2 AND minute_ms < ?3
                         GROUP BY customer)
                     WHERE h > 0 OR l > 0 ORDER BY hi DESC, lo DESC, customer LIMIT ?4",
                    split(aggregation)
                )
            } else {
                "SELECT customer, value >> 32, value & 4294967295 AS v FROM (
                     SELECT customer, value, ROW_NUMBER() OVER
                         (PARTITION BY customer ORDER BY minute_ms DESC) AS n
                     FROM usage_minute WHERE meter = ?1 AND minute_ms < ?3)
                 WHERE n = 1 AND value > 0 ORDER BY value DESC, customer LIMIT ?4"
                    .to_owned()
            };
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![meter, from_ms, to_ms, limit], |r| {
                Ok((r.get::<_, String>(0)?, joined(r.get(1)?, r.get(2)?)))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn meter_total(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<MeterTotal> {
        let meter = meter.to_owned();
        Self::with(&self.reader, move |c| {
            let (high, low, customers): (Option<i64>, Option<i64>, i64) = c
                .prepare_cached(&if aggregation.is_periodic() {
                    format!(
                        "SELECT SUM(h), SUM(l), COUNT(*) FROM (
                             SELECT customer, {}
                             FROM usage_minute WHERE meter = ?1 AND minute_ms >= ?2 AND minute_ms < ?3
                             GROUP BY customer HAVING h > 0 OR l > 0)",
                        split(aggregation)
                    )
                } else {
                    "SELECT SUM(value >> 32), SUM(value & 4294967295), COUNT(*) FROM (
                         SELECT customer, value, ROW_NUMBER() OVER
                             (PARTITION BY customer ORDER BY minute_ms DESC) AS n
                         FROM usage_minute WHERE meter = ?1 AND minute_ms < ?3)
                     WHERE n = 1 AND value > 0"
                        .to_owned()
                })?
                .query_row(params![meter, from_ms, to_ms], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            Ok(MeterTotal {
                // Several customers: exact up to u64::MAX, not held at one customer's cap.
                usage: quantity::join(high.unwrap_or(0).into(), low.unwrap_or(0).into()),
                customers: customers.max(0) as u64,
            })
        })
        .await
    }

    async fn snapshot(&self, req: SnapshotRequest) -> Result<Snapshot> {
        Self::with(&self.reader, move |c| {
            let tx = c.transaction()?; // one read snapshot for offsets and usage
            let offsets = read_offsets(&tx)?;
            let mut totals = Vec::new();
            let special: std::collections::HashMap<&str, i64> = req
                .since_by_customer
                .iter()
                .map(|(c, s)| (c.as_str(), *s))
                .collect();
            {
                for (meter, aggregation) in &req.periodic_meters {
                    let mut stmt = tx.prepare_cached(&format!(
                        "SELECT customer, {} FROM usage_minute
                         WHERE meter = ?1 AND minute_ms >= ?2 GROUP BY customer",
                        split(*aggregation)
                    ))?;
                    let rows = stmt.query_map(params![meter, req.default_since_ms], |r| {
                        Ok((r.get::<_, String>(0)?, joined(r.get(1)?, r.get(2)?)))
                    })?;
                    for row in rows {
                        let (customer, sum) = row?;
                        if !special.contains_key(customer.as_str()) {
                            totals.push((customer, meter.clone(), sum));
                        }
                    }
                }
                for (customer, since) in &req.since_by_customer {
                    for (meter, aggregation) in &req.periodic_meters {
                        let v =
                            period_figure(&tx, customer, meter, *aggregation, *since, i64::MAX)?;
                        if let Some(v) = v {
                            totals.push((customer.clone(), meter.clone(), v));
                        }
                    }
                }
            }
            let mut distinct = Vec::new();
            for (meter, _) in req
                .periodic_meters
                .iter()
                .filter(|(_, a)| *a == Aggregation::UniqueCount)
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT DISTINCT customer, distinct_value FROM usage_minute
                     WHERE meter = ?1 AND minute_ms >= ?2",
                )?;
                let rows = stmt.query_map(params![meter, req.default_since_ms], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (customer, value) = row?;
                    if !special.contains_key(customer.as_str()) {
                        distinct.push((customer, meter.clone(), value));
                    }
                }
                for (customer, since) in &req.since_by_customer {
                    for value in distinct_values(&tx, customer, meter, *since, i64::MAX)? {
                        distinct.push((customer.clone(), meter.clone(), value));
                    }
                }
            }
            let mut gauges = Vec::new();
            {
                let mut stmt =
                    tx.prepare("SELECT customer, meter, time_ms, value FROM gauge_latest")?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, i64>(3)?.max(0) as u64,
                    ))
                })?;
                for row in rows {
                    gauges.push(row?);
                }
            }
            tx.finish()?;
            Ok(Snapshot {
                offsets,
                totals,
                gauges,
                distinct,
            })
        })
        .await
    }
}
