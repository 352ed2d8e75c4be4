//! ClickHouse store, reader role ([`UsageReader`]): totals, series, top customers and totals across
//! customers, the enforcer's snapshot.

use async_trait::async_trait;

use super::*;

/// The bucket expression of a series window: hours and days are rolled up by ClickHouse,
/// calendar months from its daily rows.
fn bucket_of(window: Window) -> &'static str {
    match window {
        Window::Minute => "minute",
        Window::Hour => "toStartOfHour(minute)",
        Window::Day | Window::Month => "toStartOfDay(minute)",
    }
}

#[async_trait]
impl UsageReader for ClickHouseStore {
    async fn counted_at(&self, records: &[Record]) -> Result<Vec<Option<u64>>> {
        let mut out = vec![None; records.len()];
        for (partition, idx) in by_partition(records) {
            let index = id_index(records, &idx);
            let counted = self.counted_in(partition, records, &idx, &index).await?;
            for i in idx {
                let e = &records[i].event;
                out[i] = counted.get(&(e.source.as_str(), e.id.as_str())).copied();
            }
        }
        Ok(out)
    }

    async fn total(
        &self,
        customer: &str,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64> {
        if aggregation.is_periodic() {
            let split = split_of(aggregation);
            let v: (u64, u64) = self
                .client
                .query(&format!(
                    "SELECT {split} FROM usage_block_cells FINAL
                     WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)"
                ))
                .bind(customer)
                .bind(meter)
                .bind(seconds(from_ms))
                .bind(seconds(to_ms))
                .fetch_one()
                .await
                .map_err(ch)?;
            Ok(joined(v))
        } else {
            let v: Option<u64> = self
                .client
                .query(
                    "SELECT value FROM usage_block_cells
                     WHERE customer = ? AND meter = ? AND minute < toDateTime(?)
                     ORDER BY minute DESC, last_ms DESC, value DESC LIMIT 1",
                )
                .bind(customer)
                .bind(meter)
                .bind(seconds(to_ms))
                .fetch_optional()
                .await
                .map_err(ch)?;
            Ok(v.unwrap_or(0))
        }
    }

    async fn dimension_totals(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, u64, u64)> = self
            .client
            .query(&format!(
                "SELECT dims, {SPLIT_SUM} FROM usage_block_cells FINAL
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY dims ORDER BY dims"
            ))
            .bind(customer)
            .bind(meter)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms))
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(rows
            .into_iter()
            .map(|(dims, h, l)| (dims, joined((h, l))))
            .filter(|(_, v)| *v > 0)
            .collect())
    }

    async fn dimension_series(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
        window: Window,
    ) -> Result<Vec<(String, Vec<(i64, u64)>)>> {
        let bucket = bucket_of(window);
        let rows: Vec<(String, u32, u64, u64)> = self
            .client
            .query(&format!(
                "SELECT dims, toUInt32({bucket}) AS b, {SPLIT_SUM} FROM usage_block_cells FINAL
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY dims, b ORDER BY dims, b"
            ))
            .bind(customer)
            .bind(meter)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms))
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(crate::store::bucket_by_key(
            rows.into_iter()
                .map(|(dims, b, h, l)| (dims, b as i64 * 1000, joined((h, l)))),
            window,
        ))
    }

    async fn distinct_values(
        &self,
        customer: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<String>> {
        self.client
            .query(
                "SELECT DISTINCT distinct_value FROM usage_block_cells FINAL
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 ORDER BY distinct_value",
            )
            .bind(customer)
            .bind(meter)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms))
            .fetch_all()
            .await
            .map_err(ch)
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
        let bucket = bucket_of(window);
        if aggregation == Aggregation::UniqueCount {
            // Each value once per (finest) bucket; months count their days' values once.
            let rows: Vec<(u32, String)> = self
                .client
                .query(&format!(
                    "SELECT toUInt32({bucket}) AS b, distinct_value FROM usage_block_cells FINAL
                     WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                     GROUP BY b, distinct_value ORDER BY b"
                ))
                .bind(customer)
                .bind(meter)
                .bind(seconds(from_ms))
                .bind(seconds(to_ms))
                .fetch_all()
                .await
                .map_err(ch)?;
            return Ok(crate::store::bucket_distinct(
                rows.into_iter().map(|(b, v)| (b as i64 * 1000, v)),
                window,
            ));
        }
        let sql = if aggregation.is_periodic() {
            format!(
                "SELECT toUInt32({bucket}) AS b, {} FROM usage_block_cells FINAL
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY b ORDER BY b",
                split_of(aggregation)
            )
        } else {
            format!(
                "SELECT b, bitShiftRight(v, 32), bitAnd(v, 4294967295) FROM (
                 SELECT toUInt32({bucket}) AS b, argMax(value, (minute, last_ms, value)) AS v FROM usage_block_cells
                 WHERE customer = ? AND meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY b) ORDER BY b"
            )
        };
        let rows: Vec<(u32, u64, u64)> = self
            .client
            .query(&sql)
            .bind(customer)
            .bind(meter)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms))
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(crate::store::bucket(
            rows.into_iter()
                .map(|(b, h, l)| (b as i64 * 1000, joined((h, l)))),
            window,
            aggregation,
        ))
    }

    async fn totals(
        &self,
        customer: &str,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<u64>> {
        // Two reads of the customer's rows (the primary key's prefix), whatever the meters.
        let sums = self
            .client
            .query(&format!(
                "SELECT meter, {SPLIT_SUM} FROM usage_block_cells FINAL
                 WHERE customer = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                 GROUP BY meter"
            ))
            .bind(customer)
            .bind(seconds(from_ms))
            .bind(seconds(to_ms));
        let latest = self
            .client
            .query(
                "SELECT meter, argMax(value, (minute, last_ms, value)) FROM usage_block_cells
                 WHERE customer = ? AND minute < toDateTime(?) GROUP BY meter",
            )
            .bind(customer)
            .bind(seconds(to_ms));
        let (sums, latest) = tokio::try_join!(
            sums.fetch_all::<(String, u64, u64)>(),
            latest.fetch_all::<(String, u64)>()
        )
        .map_err(ch)?;
        let sums: Vec<(String, u64)> = sums
            .into_iter()
            .map(|(m, h, l)| (m, joined((h, l))))
            .collect();
        let mut out = per_meter(meters, &sums, &latest);
        for (i, (meter, aggregation)) in meters.iter().enumerate() {
            if aggregation.is_periodic() && !aggregation.is_additive() {
                out[i] = self
                    .total(customer, meter, *aggregation, from_ms, to_ms)
                    .await?;
            }
        }
        Ok(out)
    }

    async fn top_customers(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        let query = if aggregation.is_periodic() {
            let split = split_of(aggregation);
            // The sums normalised to (high, low < 2^32) order exactly, without overflow.
            self.client
                .query(&format!(
                    "SELECT customer, h + bitShiftRight(l, 32) AS hi, bitAnd(l, 4294967295) AS lo
                     FROM (SELECT customer, {split} FROM usage_block_cells FINAL
                           WHERE meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                           GROUP BY customer HAVING h > 0 OR l > 0)
                     ORDER BY hi DESC, lo DESC, customer LIMIT ?"
                ))
                .bind(meter)
                .bind(seconds(from_ms))
        } else {
            self.client
                .query(
                    "SELECT customer, bitShiftRight(v, 32), bitAnd(v, 4294967295) FROM (
                         SELECT customer, argMax(value, (minute, last_ms, value)) AS v
                         FROM usage_block_cells WHERE meter = ? AND minute < toDateTime(?)
                         GROUP BY customer HAVING v > 0)
                     ORDER BY v DESC, customer LIMIT ?",
                )
                .bind(meter)
        };
        let rows: Vec<(String, u64, u64)> = query
            .bind(seconds(to_ms))
            .bind(limit as u64)
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(rows
            .into_iter()
            .map(|(c, h, l)| (c, joined((h, l))))
            .collect())
    }

    async fn meter_totals(
        &self,
        meters: &[(String, Aggregation)],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterTotal>> {
        // One scan for the additive meters and one for the gauges, whatever their number.
        let sums = self
            .client
            .query(&format!(
                "SELECT meter, sum(h), sum(l), count() FROM (
                     SELECT meter, customer, {SPLIT_SUM} FROM usage_block_cells FINAL
                     WHERE minute >= toDateTime(?) AND minute < toDateTime(?)
                     GROUP BY meter, customer HAVING h > 0 OR l > 0)
                 GROUP BY meter"
            ))
            .bind(seconds(from_ms))
            .bind(seconds(to_ms));
        let latest = self
            .client
            .query(
                "SELECT meter, sum(bitShiftRight(v, 32)), sum(bitAnd(v, 4294967295)), count() FROM (
                     SELECT meter, customer, argMax(value, (minute, last_ms, value)) AS v
                     FROM usage_block_cells WHERE minute < toDateTime(?)
                     GROUP BY meter, customer HAVING v > 0)
                 GROUP BY meter",
            )
            .bind(seconds(to_ms));
        let additive = meters.iter().any(|(_, a)| a.is_additive());
        let gauges = meters.iter().any(|(_, a)| !a.is_periodic());
        let (sums, latest) = tokio::try_join!(
            async {
                if additive {
                    sums.fetch_all::<(String, u64, u64, u64)>().await
                } else {
                    Ok(Vec::new())
                }
            },
            async {
                if gauges {
                    latest.fetch_all::<(String, u64, u64, u64)>().await
                } else {
                    Ok(Vec::new())
                }
            }
        )
        .map_err(ch)?;
        // Several customers: exact up to u64::MAX, not held at one customer's cap.
        let total = |rows: Vec<(String, u64, u64, u64)>| -> Vec<(String, MeterTotal)> {
            rows.into_iter()
                .map(|(m, h, l, customers)| {
                    let usage = quantity::join(h.into(), l.into());
                    (m, MeterTotal { usage, customers })
                })
                .collect()
        };
        let mut out = per_meter(meters, &total(sums), &total(latest));
        for (i, (meter, aggregation)) in meters.iter().enumerate() {
            if aggregation.is_periodic() && !aggregation.is_additive() {
                out[i] = self
                    .meter_total(meter, *aggregation, from_ms, to_ms)
                    .await?;
            }
        }
        Ok(out)
    }

    async fn meter_total(
        &self,
        meter: &str,
        aggregation: Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<MeterTotal> {
        let query = if aggregation.is_periodic() {
            let split = split_of(aggregation);
            self.client
                .query(&format!(
                    "SELECT sum(h), sum(l), count() FROM (
                         SELECT customer, {split} FROM usage_block_cells FINAL
                         WHERE meter = ? AND minute >= toDateTime(?) AND minute < toDateTime(?)
                         GROUP BY customer HAVING h > 0 OR l > 0)"
                ))
                .bind(meter)
                .bind(seconds(from_ms))
        } else {
            self.client
                .query(
                    "SELECT sum(bitShiftRight(v, 32)), sum(bitAnd(v, 4294967295)), count() FROM (
                         SELECT customer, argMax(value, (minute, last_ms, value)) AS v
                         FROM usage_block_cells WHERE meter = ? AND minute < toDateTime(?)
                         GROUP BY customer HAVING v > 0)",
                )
                .bind(meter)
        };
        let (h, l, customers): (u64, u64, u64) =
            query.bind(seconds(to_ms)).fetch_one().await.map_err(ch)?;
        Ok(MeterTotal {
            usage: quantity::join(h.into(), l.into()),
            customers,
        })
    }

    async fn snapshot(&self, req: SnapshotRequest) -> Result<Snapshot> {
        // Positions first, then only rows of batches at or below them: usage and positions
        // agree even while batches keep landing.
        let offsets = self.stored_offsets().await?;
        if offsets.is_empty() {
            return Ok(Snapshot::default());
        }
        let (parts, nexts): (Vec<u32>, Vec<u64>) = offsets.iter().map(|(p, n)| (*p, *n)).unzip();
        let covered = "batch_next_offset <= transform(partition, ?, ?, toUInt64(0))";
        let mut totals = Vec::new();
        let special: HashSet<&str> = req
            .since_by_customer
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        // One read per kind of figure (sums, largest, smallest) among the meters asked.
        let mut kinds: Vec<(&'static str, Vec<&str>)> = Vec::new();
        for (meter, aggregation) in &req.periodic_meters {
            let split = split_of(*aggregation);
            match kinds.iter_mut().find(|(s, _)| *s == split) {
                Some((_, meters)) => meters.push(meter),
                None => kinds.push((split, vec![meter])),
            }
        }
        for (split, meters) in &kinds {
            let rows: Vec<(String, String, u64, u64)> = self
                .client
                .query(&format!(
                    "SELECT customer, meter, {split} FROM usage_block_cells FINAL
                     WHERE has(?, meter) AND minute >= toDateTime(?) AND customer != '' AND {covered}
                     GROUP BY customer, meter"
                ))
                .bind(meters)
                .bind(seconds(req.default_since_ms))
                .bind(&parts)
                .bind(&nexts)
                .fetch_all()
                .await
                .map_err(ch)?;
            totals.extend(
                rows.into_iter()
                    .filter(|(c, _, _, _)| !special.contains(c.as_str()))
                    .map(|(c, m, h, l)| (c, m, joined((h, l)))),
            );
            for (customer, since) in &req.since_by_customer {
                let rows: Vec<(String, u64, u64)> = self
                    .client
                    .query(&format!(
                        "SELECT meter, {split} FROM usage_block_cells FINAL
                         WHERE customer = ? AND has(?, meter) AND minute >= toDateTime(?) AND {covered}
                         GROUP BY meter"
                    ))
                    .bind(customer.as_str())
                    .bind(meters)
                    .bind(seconds(*since))
                    .bind(&parts)
                    .bind(&nexts)
                    .fetch_all()
                    .await
                    .map_err(ch)?;
                // A row is a meter with cells in the period (a smallest value may be 0).
                totals.extend(
                    rows.into_iter()
                        .map(|(m, h, l)| (customer.clone(), m, joined((h, l)))),
                );
            }
        }
        let unique: Vec<&str> = req
            .periodic_meters
            .iter()
            .filter(|(_, a)| *a == Aggregation::UniqueCount)
            .map(|(m, _)| m.as_str())
            .collect();
        let mut distinct = Vec::new();
        if !unique.is_empty() {
            let rows: Vec<(String, String, String)> = self
                .client
                .query(&format!(
                    "SELECT DISTINCT customer, meter, distinct_value FROM usage_block_cells FINAL
                     WHERE has(?, meter) AND minute >= toDateTime(?) AND customer != '' AND {covered}"
                ))
                .bind(&unique)
                .bind(seconds(req.default_since_ms))
                .bind(&parts)
                .bind(&nexts)
                .fetch_all()
                .await
                .map_err(ch)?;
            distinct.extend(
                rows.into_iter()
                    .filter(|(c, _, _)| !special.contains(c.as_str())),
            );
            for (customer, since) in &req.since_by_customer {
                let rows: Vec<(String, String)> = self
                    .client
                    .query(&format!(
                        "SELECT DISTINCT meter, distinct_value FROM usage_block_cells FINAL
                         WHERE customer = ? AND has(?, meter) AND minute >= toDateTime(?) AND {covered}"
                    ))
                    .bind(customer.as_str())
                    .bind(&unique)
                    .bind(seconds(*since))
                    .bind(&parts)
                    .bind(&nexts)
                    .fetch_all()
                    .await
                    .map_err(ch)?;
                distinct.extend(rows.into_iter().map(|(m, v)| (customer.clone(), m, v)));
            }
        }
        let gauges: Vec<(String, String, i64, u64)> = self
            .client
            .query(&format!(
                "SELECT customer, meter, max(last_ms), argMax(value, (last_ms, value)) FROM usage_block_cells
                 WHERE last_ms != 0 AND customer != '' AND {covered}
                 GROUP BY customer, meter"
            ))
            .bind(&parts)
            .bind(&nexts)
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(Snapshot {
            offsets,
            totals,
            gauges,
            distinct,
        })
    }
}
