//! The ClickHouse schema, as data: ordered migrations whose statements `tally migrate` applies
//! (database name substituted for `{db}`), recording each applied version in
//! `{db}.schema_migrations`. Every statement is `IF NOT EXISTS` or, for migration 5's copy, yields
//! rows that collapse with themselves, so applying twice is harmless.
//!
//! The statements stay within what both ClickHouse 18.16 (Debian's package) and current releases
//! accept. Avoided on purpose: `DateTime64` (times are `Int64` milliseconds or `DateTime`
//! minutes), table `TTL` (expired de-duplication ids are dropped by day partition instead),
//! `SimpleAggregateFunction` (`AggregatingMergeTree` with `-State`/`-Merge` instead),
//! `LowCardinality` (needs a setting on 18.16), and insert de-duplication, which 18.16 lacks for
//! non-replicated tables (batch keys in `ReplacingMergeTree` instead).
//!
//! # Tables
//! - `usage_block_cells` (version 5): per (customer, meter, UTC minute) usage of one block of a
//!   Kafka partition (see the aggregator's `blocks` module): all of the block's usage from its
//!   first offset, written again as the block grows. Rows carry the partition, the block's first
//!   offset and the next offset after what they cover; `ReplacingMergeTree(batch_next_offset)`
//!   keeps, per cell and block, the write that reached furthest, whatever order writes land in
//!   (read with `FINAL`). A write is one INSERT of fewer rows than `max_insert_block_size` into
//!   an unpartitioned table: one part, all or nothing.
//!   Version 6 adds `dims` (the readings' dimensions as a JSON object in name order, `''` for
//!   none) to the columns and the sorting key; version 7 adds `distinct_value` (the value a
//!   `unique_count` meter counts, `''` for other meters) after it.
//! - `usage_cells` (version 1, no longer written): per-batch cells where the last write of a
//!   key won; migration 5 copies them into `usage_block_cells`.
//! - `batch_offsets`: the highest next offset per partition, fed by materialized views of
//!   `usage_cells` and `usage_block_cells` (`maxState`), checked before each write.
//! - `event_ids`: (source, id) counted per Kafka partition and day of receipt, with the offset of
//!   the record that was counted, for the de-duplication window: the same (source, id) at
//!   another offset is a duplicate, at the same offset a replay. Days older than the window are
//!   dropped with `ALTER TABLE ... DROP PARTITION`.
//! - `customers`: JSON customer records, latest `updated_ms` wins.
//! - `notifications`: threshold crossings, one per (customer, meter, period, threshold).
//! - `webhook_outbox` (version 3): the enforcer's notification webhooks not yet delivered, one
//!   row per (notification, URL) and state; the latest version wins.
//! - `billing_marks` (version 2): billing-sync's reported-until position and pending report per
//!   (customer, meter), latest `version` wins.
//! - `api_keys` (version 4): API key records (JSON with the key's hash, never the key), latest
//!   `version` wins.
//! - `meter_definitions` (version 8): the meters managed through the API (JSON records), latest
//!   `version` wins.

/// One schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
    /// For statements that cannot say `IF NOT EXISTS` (an `ALTER`): a query counting what they
    /// make; above 0, they were applied already and are skipped.
    pub unless: Option<&'static str>,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        statements: &[
            "CREATE DATABASE IF NOT EXISTS {db}",
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
            version UInt32,
            name String,
            applied_at DateTime
        ) ENGINE = ReplacingMergeTree ORDER BY version",
            "CREATE TABLE IF NOT EXISTS {db}.usage_cells (
            customer String,
            meter String,
            minute DateTime,
            value UInt64,
            last_ms Int64,
            partition UInt32,
            batch_first_offset UInt64,
            batch_next_offset UInt64
        ) ENGINE = ReplacingMergeTree
        ORDER BY (customer, meter, minute, partition, batch_first_offset)",
            "CREATE TABLE IF NOT EXISTS {db}.batch_offsets (
            partition UInt32,
            next_offset AggregateFunction(max, UInt64)
        ) ENGINE = AggregatingMergeTree ORDER BY partition",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.batch_offsets_mv TO {db}.batch_offsets AS
            SELECT partition, maxState(batch_next_offset) AS next_offset
            FROM {db}.usage_cells GROUP BY partition",
            "CREATE TABLE IF NOT EXISTS {db}.event_ids (
            day Date,
            partition UInt32,
            source String,
            id String,
            offset UInt64
        ) ENGINE = ReplacingMergeTree
        PARTITION BY day
        ORDER BY (partition, source, id)",
            "CREATE TABLE IF NOT EXISTS {db}.customers (
            id String,
            record String,
            updated_ms Int64
        ) ENGINE = ReplacingMergeTree(updated_ms) ORDER BY id",
            "CREATE TABLE IF NOT EXISTS {db}.notifications (
            customer String,
            meter String,
            period_start_ms Int64,
            threshold UInt32,
            period_end_ms Int64,
            usage UInt64,
            limit_value UInt64,
            crossed_ms Int64
        ) ENGINE = ReplacingMergeTree
        ORDER BY (customer, meter, period_start_ms, threshold)",
        ],
        unless: None,
    },
    Migration {
        version: 2,
        name: "billing-sync state",
        statements: &["CREATE TABLE IF NOT EXISTS {db}.billing_marks (
            customer String,
            meter String,
            mark String,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (customer, meter)"],
        unless: None,
    },
    Migration {
        version: 3,
        name: "webhook outbox",
        statements: &["CREATE TABLE IF NOT EXISTS {db}.webhook_outbox (
            id String,
            url String,
            done UInt8,
            delivery String,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (id, url)"],
        unless: None,
    },
    Migration {
        version: 4,
        name: "API keys",
        statements: &["CREATE TABLE IF NOT EXISTS {db}.api_keys (
            id String,
            record String,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY id"],
        unless: None,
    },
    Migration {
        version: 5,
        name: "usage in blocks, furthest write wins",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {db}.usage_block_cells (
            customer String,
            meter String,
            minute DateTime,
            value UInt64,
            last_ms Int64,
            partition UInt32,
            batch_first_offset UInt64,
            batch_next_offset UInt64
        ) ENGINE = ReplacingMergeTree(batch_next_offset)
        ORDER BY (customer, meter, minute, partition, batch_first_offset)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.block_offsets_mv TO {db}.batch_offsets AS
            SELECT partition, maxState(batch_next_offset) AS next_offset
            FROM {db}.usage_block_cells GROUP BY partition",
            // Run once, with the aggregators stopped; run again after a failure, the copied rows
            // are the same rows again and collapse.
            "INSERT INTO {db}.usage_block_cells (customer, meter, minute, value, last_ms, partition,
                batch_first_offset, batch_next_offset)
            SELECT customer, meter, minute, value, last_ms, partition, batch_first_offset,
                batch_next_offset
            FROM {db}.usage_cells",
        ],
        unless: None,
    },
    Migration {
        version: 6,
        name: "dimensions",
        // Every stored cell keeps its place with no dimensions (''); cells of one key and block
        // with different dimensions stay apart.
        statements: &["ALTER TABLE {db}.usage_block_cells ADD COLUMN dims String,
            MODIFY ORDER BY (customer, meter, minute, partition, batch_first_offset, dims)"],
        unless: Some(
            "SELECT count() FROM system.columns
             WHERE database = '{db}' AND table = 'usage_block_cells' AND name = 'dims'",
        ),
    },
    Migration {
        version: 7,
        name: "distinct values",
        // Every stored cell keeps its place with no distinct value (''); a unique_count meter's
        // cells of one key, block and dimensions are one per value.
        statements: &["ALTER TABLE {db}.usage_block_cells ADD COLUMN distinct_value String,
            MODIFY ORDER BY (customer, meter, minute, partition, batch_first_offset, dims,
                distinct_value)"],
        unless: Some(
            "SELECT count() FROM system.columns
             WHERE database = '{db}' AND table = 'usage_block_cells' AND name = 'distinct_value'",
        ),
    },
    Migration {
        version: 8,
        name: "meters managed through the API",
        statements: &["CREATE TABLE IF NOT EXISTS {db}.meter_definitions (
            name String,
            record String,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY name"],
        unless: None,
    },
];

/// The statements of `migration` for database `db`.
pub fn statements(migration: &Migration, db: &str) -> Vec<String> {
    migration
        .statements
        .iter()
        .map(|s| s.replace("{db}", db))
        .collect()
}

/// Whether `name` is safe to splice into DDL as a database name.
pub fn valid_database_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_names_are_checked() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        let all = statements(&MIGRATIONS[0], "tally_test");
        assert!(all.iter().all(|s| !s.contains("{db}")));
        assert!(valid_database_name("tally"));
        assert!(!valid_database_name("tally; DROP"));
        assert!(!valid_database_name("1tally"));
    }
}
