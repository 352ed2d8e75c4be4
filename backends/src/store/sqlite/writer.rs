//! SQLite store, writer role ([`UsageWriter`]): de-duplication and atomic batch writes with
//! their log positions.

use async_trait::async_trait;

use super::*;

pub(super) fn read_offsets(c: &Connection) -> Result<BTreeMap<u32, u64>> {
    let mut stmt = c.prepare_cached("SELECT partition, next_offset FROM log_offsets")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn apply_rollup(c: &mut Connection, rollup: &Rollup) -> Result<Applied> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if crate::store::check_positions(rollup, &read_offsets(&tx)?)? == Applied::Replay {
        return Ok(Applied::Replay);
    }
    {
        // One upsert of a minute's cell per kind of merge: `$set` is the conflict's update.
        macro_rules! upsert_cell {
            ($set:literal) => {
                concat!(
                    "INSERT INTO usage_minute
                         (customer, meter, minute_ms, value, last_ms, dims, distinct_value)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (customer, meter, dims, distinct_value, minute_ms) DO UPDATE SET ",
                    $set
                )
            };
        }
        let mut add = tx.prepare_cached(upsert_cell!(
            "value = CASE WHEN value > 9223372036854775807 - excluded.value
                          THEN 9223372036854775807
                          ELSE value + excluded.value END"
        ))?;
        let mut max = tx.prepare_cached(upsert_cell!("value = max(value, excluded.value)"))?;
        let mut min = tx.prepare_cached(upsert_cell!("value = min(value, excluded.value)"))?;
        let mut latest = tx.prepare_cached(upsert_cell!(
            "value = CASE WHEN (excluded.last_ms, excluded.value) > (last_ms, value)
                          THEN excluded.value ELSE value END,
             last_ms = max(last_ms, excluded.last_ms)"
        ))?;
        let mut gauge = tx.prepare_cached(
            "INSERT INTO gauge_latest (customer, meter, time_ms, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (customer, meter) DO UPDATE SET
               value = CASE WHEN (excluded.time_ms, excluded.value) > (time_ms, value)
                            THEN excluded.value ELSE value END,
               time_ms = max(time_ms, excluded.time_ms)",
        )?;
        for (k, cell) in &rollup.cells {
            match *cell {
                Cell::Add(v) | Cell::Max(v) | Cell::Min(v) => {
                    let stmt = match cell {
                        Cell::Max(_) => &mut max,
                        Cell::Min(_) => &mut min,
                        _ => &mut add,
                    };
                    stmt.execute(params![
                        k.customer,
                        k.meter,
                        k.minute_ms,
                        v as i64,
                        0,
                        k.dims,
                        k.distinct
                    ])?;
                }
                Cell::Latest { time_ms, value } => {
                    latest.execute(params![
                        k.customer,
                        k.meter,
                        k.minute_ms,
                        value as i64,
                        time_ms,
                        k.dims,
                        k.distinct
                    ])?;
                    gauge.execute(params![k.customer, k.meter, time_ms, value as i64])?;
                }
            }
        }
        let mut pos = tx.prepare_cached(
            "INSERT INTO log_offsets (partition, next_offset) VALUES (?1, ?2)
             ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
        )?;
        for (&partition, &(_, next)) in &rollup.ranges {
            pos.execute(params![partition, next as i64])?;
        }
    }
    tx.commit()?;
    Ok(Applied::Written)
}

#[async_trait]
impl UsageWriter for SqliteStore {
    async fn apply(&self, rollup: &Rollup) -> Result<Applied> {
        let rollup = rollup.clone();
        Self::with(&self.writer, move |c| apply_rollup(c, &rollup)).await
    }

    async fn offsets(&self) -> Result<BTreeMap<u32, u64>> {
        Self::with(&self.reader, |c| read_offsets(c)).await
    }
}
