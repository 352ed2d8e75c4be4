-- Tally's ClickHouse schema for a cluster: shards for write and read throughput, replicas for
-- availability. For current ClickHouse releases with ClickHouse Keeper (or ZooKeeper) and the
-- macros {shard} and {replica} set on every node. Replace the cluster name `tally` with yours,
-- apply once (clickhouse-client --multiquery < cluster.sql), then run `tally migrate`: its
-- statements are all `IF NOT EXISTS`, so it only records the schema version.
--
-- Layout. Tally reads and writes the tables it knows by name (usage_block_cells, batch_offsets,
-- event_ids, customers, ...):
--   * usage_block_cells and event_ids are Distributed tables over *_local tables, sharded by the
--     Kafka partition. All rows and the offsets of one partition live on one shard, and each
--     shard receives its share of an aggregator batch as one block, so a batch that fails on
--     some shards and is written again collapses where it had landed (same keys,
--     ReplacingMergeTree by batch_next_offset: the furthest write of a block wins) and the
--     exactly-once contract holds per partition. A customer's events share a partition (the
--     Kafka key), so a customer's usage is on one shard.
--   * usage_cells is the table of schema versions before 5, no longer written; kept so that
--     `tally migrate` can copy it (empty on a new cluster).
--   * batch_offsets is fed per shard by materialized views of the cells and read through a
--     Distributed table (maxMerge over the shards).
--   * customers, notifications, billing_marks, webhook_outbox, api_keys, meter_definitions and schema_migrations are small
--     and replicated to every node (one replica path for the whole cluster).
--
-- Tally's user needs, in its profile:
--   <insert_distributed_sync>1</insert_distributed_sync>  (distributed_foreground_insert in
--   recent releases): an insert returns once every shard has its block.
-- Expired de-duplication ids leave event_ids_local by TTL.

CREATE DATABASE IF NOT EXISTS tally ON CLUSTER tally;

CREATE TABLE IF NOT EXISTS tally.usage_cells_local ON CLUSTER tally (
    customer String,
    meter String,
    minute DateTime,
    value UInt64,
    last_ms Int64,
    partition UInt32,
    batch_first_offset UInt64,
    batch_next_offset UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tally/usage_cells', '{replica}')
ORDER BY (customer, meter, minute, partition, batch_first_offset);

CREATE TABLE IF NOT EXISTS tally.usage_cells ON CLUSTER tally AS tally.usage_cells_local
ENGINE = Distributed(tally, tally, usage_cells_local, partition);

CREATE TABLE IF NOT EXISTS tally.usage_block_cells_local ON CLUSTER tally (
    customer String,
    meter String,
    minute DateTime,
    value UInt64,
    last_ms Int64,
    partition UInt32,
    batch_first_offset UInt64,
    batch_next_offset UInt64,
    dims String,
    distinct_value String
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tally/usage_block_cells', '{replica}', batch_next_offset)
ORDER BY (customer, meter, minute, partition, batch_first_offset, dims, distinct_value);

CREATE TABLE IF NOT EXISTS tally.usage_block_cells ON CLUSTER tally AS tally.usage_block_cells_local
ENGINE = Distributed(tally, tally, usage_block_cells_local, partition);

CREATE TABLE IF NOT EXISTS tally.batch_offsets_local ON CLUSTER tally (
    partition UInt32,
    next_offset AggregateFunction(max, UInt64)
) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/tally/batch_offsets', '{replica}')
ORDER BY partition;

-- Named as `tally migrate` names its view, so that migrate leaves it alone.
CREATE MATERIALIZED VIEW IF NOT EXISTS tally.batch_offsets_mv ON CLUSTER tally
TO tally.batch_offsets_local AS
SELECT partition, maxState(batch_next_offset) AS next_offset
FROM tally.usage_cells_local GROUP BY partition;

CREATE MATERIALIZED VIEW IF NOT EXISTS tally.block_offsets_mv ON CLUSTER tally
TO tally.batch_offsets_local AS
SELECT partition, maxState(batch_next_offset) AS next_offset
FROM tally.usage_block_cells_local GROUP BY partition;

CREATE TABLE IF NOT EXISTS tally.batch_offsets ON CLUSTER tally AS tally.batch_offsets_local
ENGINE = Distributed(tally, tally, batch_offsets_local, partition);

CREATE TABLE IF NOT EXISTS tally.event_ids_local ON CLUSTER tally (
    day Date,
    partition UInt32,
    source String,
    id String,
    offset UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tally/event_ids', '{replica}')
PARTITION BY day
ORDER BY (partition, source, id)
TTL day + INTERVAL 37 DAY;

CREATE TABLE IF NOT EXISTS tally.event_ids ON CLUSTER tally AS tally.event_ids_local
ENGINE = Distributed(tally, tally, event_ids_local, partition);

CREATE TABLE IF NOT EXISTS tally.schema_migrations ON CLUSTER tally (
    version UInt32,
    name String,
    applied_at DateTime
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/schema_migrations', '{replica}')
ORDER BY version;

CREATE TABLE IF NOT EXISTS tally.customers ON CLUSTER tally (
    id String,
    record String,
    updated_ms Int64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/customers', '{replica}', updated_ms)
ORDER BY id;

CREATE TABLE IF NOT EXISTS tally.notifications ON CLUSTER tally (
    customer String,
    meter String,
    period_start_ms Int64,
    threshold UInt32,
    period_end_ms Int64,
    usage UInt64,
    limit_value UInt64,
    crossed_ms Int64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/notifications', '{replica}')
ORDER BY (customer, meter, period_start_ms, threshold);

CREATE TABLE IF NOT EXISTS tally.billing_marks ON CLUSTER tally (
    customer String,
    meter String,
    mark String,
    version UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/billing_marks', '{replica}', version)
ORDER BY (customer, meter);

CREATE TABLE IF NOT EXISTS tally.webhook_outbox ON CLUSTER tally (
    id String,
    url String,
    done UInt8,
    delivery String,
    version UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/webhook_outbox', '{replica}', version)
ORDER BY (id, url);

CREATE TABLE IF NOT EXISTS tally.api_keys ON CLUSTER tally (
    id String,
    record String,
    version UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/api_keys', '{replica}', version)
ORDER BY id;

CREATE TABLE IF NOT EXISTS tally.meter_definitions ON CLUSTER tally (
    name String,
    record String,
    version UInt64
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/meter_definitions', '{replica}', version)
ORDER BY name;
