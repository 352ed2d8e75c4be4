-- The embedded usage store's schema (SQLite), applied at every open: every statement is
-- IF NOT EXISTS.
-- Cells per (customer, meter, dimensions, distinct value, minute); `dims` is the readings'
-- dimensions as a JSON object in name order, '' for none; `distinct_value` the value a
-- unique_count meter counts ('' for other meters).
CREATE TABLE IF NOT EXISTS usage_minute (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    dims TEXT NOT NULL DEFAULT '',
    distinct_value TEXT NOT NULL DEFAULT '',
    minute_ms INTEGER NOT NULL,
    value INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (customer, meter, dims, distinct_value, minute_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage_minute (minute_ms);
CREATE TABLE IF NOT EXISTS gauge_latest (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (customer, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_offsets (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS customers_by_update ON customers (updated_ms);
CREATE TABLE IF NOT EXISTS billing_marks (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    mark TEXT NOT NULL,
    PRIMARY KEY (customer, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT NOT NULL,
    url TEXT NOT NULL,
    delivery TEXT NOT NULL,
    PRIMARY KEY (id, url)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meter_definitions (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
