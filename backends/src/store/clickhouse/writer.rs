//! ClickHouse store, writer role ([`UsageWriter`]): de-duplication and atomic batch writes with
//! their log positions.

use async_trait::async_trait;

use super::*;

#[async_trait]
impl UsageWriter for ClickHouseStore {
    async fn first_seen(&self, records: &[Record]) -> Result<Vec<bool>> {
        let mut keep = vec![false; records.len()];
        let mut new_ids = Vec::new();
        for (partition, idx) in by_partition(records) {
            let index = id_index(records, &idx);
            // The offset at which each (source, id) was counted, per what is stored.
            let mut counted = self.counted_in(partition, records, &idx, &index).await?;
            for i in idx {
                let r = &records[i];
                let key = (r.event.source.as_str(), r.event.id.as_str());
                match counted.get(&key) {
                    Some(&offset) => keep[i] = offset == r.offset,
                    None => {
                        counted.insert(key, r.offset);
                        keep[i] = true;
                        new_ids.push(IdRow {
                            day: r
                                .event
                                .received_ms
                                .div_euclid(86_400_000)
                                .clamp(0, u16::MAX as i64) as u16,
                            partition: r.partition,
                            source: r.event.source.clone(),
                            id: r.event.id.clone(),
                            offset: r.offset,
                        });
                    }
                }
            }
        }
        if !new_ids.is_empty() {
            let mut insert = self.client.insert::<IdRow>("event_ids").await.map_err(ch)?;
            for row in &new_ids {
                insert.write(row).await.map_err(ch)?;
            }
            insert.end().await.map_err(ch)?;
        }
        Ok(keep)
    }

    async fn apply(&self, rollup: &Rollup) -> Result<Applied> {
        if crate::store::check_positions(rollup, &self.recorded_offsets().await?)?
            == Applied::Replay
        {
            return Ok(Applied::Replay);
        }
        let own;
        let blocks = if rollup.blocks.is_empty() {
            own = batch_blocks(rollup);
            &own
        } else {
            &rollup.blocks
        };
        let mut insert = self
            .client
            .insert::<CellRow>("usage_block_cells")
            .await
            .map_err(ch)?;
        for block in blocks {
            let row = |k: Option<&CellKey>, value, last_ms| CellRow {
                customer: k.map(|k| k.customer.clone()).unwrap_or_default(),
                meter: k.map(|k| k.meter.clone()).unwrap_or_default(),
                dims: k.map(|k| k.dims.clone()).unwrap_or_default(),
                distinct_value: k.map(|k| k.distinct.clone()).unwrap_or_default(),
                minute: k.map_or(0, |k| seconds(k.minute_ms) as u32),
                value,
                last_ms,
                partition: block.partition,
                batch_first_offset: block.first,
                batch_next_offset: block.next,
            };
            if block.cells.is_empty() {
                // The block's position, without usage.
                insert.write(&row(None, 0, 0)).await.map_err(ch)?;
            }
            for (k, cell) in &block.cells {
                let (value, last_ms) = match *cell {
                    Cell::Add(v) | Cell::Max(v) | Cell::Min(v) => (v, 0),
                    Cell::Latest { time_ms, value } => (value, time_ms),
                };
                insert
                    .write(&row(Some(k), value, last_ms))
                    .await
                    .map_err(ch)?;
            }
        }
        insert.end().await.map_err(ch)?;
        Ok(Applied::Written)
    }

    fn takes_blocks(&self) -> bool {
        true
    }

    async fn resume(&self) -> Result<BTreeMap<u32, Resume>> {
        // The last block written is the one that reaches furthest.
        let rows: Vec<(u32, u64, u64)> = self
            .client
            .query(
                "SELECT partition, argMax(batch_first_offset, batch_next_offset),
                        max(batch_next_offset)
                 FROM usage_block_cells GROUP BY partition",
            )
            .fetch_all()
            .await
            .map_err(ch)?;
        Ok(rows
            .into_iter()
            .map(|(p, start, next)| (p, Resume { start, next }))
            .collect())
    }

    async fn offsets(&self) -> Result<BTreeMap<u32, u64>> {
        self.stored_offsets().await
    }

    async fn maintain(&self, now_ms: i64) -> Result<()> {
        self.expire_ids(now_ms).await
    }
}
