//! The ClickHouse schema of `tally_schemas::clickhouse` applies to a real ClickHouse server
//! (Debian's 18.16 here), twice without error, and its read patterns work: replayed batches
//! collapse under FINAL, the offsets view keeps the highest offset per partition.

#[path = "servers/mod.rs"]
mod servers;

use tally_schemas::clickhouse::{MIGRATIONS, statements};

#[test]
fn the_schema_applies_twice_and_its_read_patterns_hold() {
    let ch = servers::ClickHouse::shared();
    let db = servers::unique_name("schema");
    for _ in 0..2 {
        for m in MIGRATIONS {
            for sql in statements(m, &db) {
                ch.query(&sql).unwrap_or_else(|e| panic!("{sql}\n-> {e}"));
            }
        }
    }
    let q = |sql: &str| ch.query(&sql.replace("{db}", &db));
    // A batch, the same batch again (an ambiguous failure retried), and a later batch.
    let batch_a = "INSERT INTO {db}.usage_cells VALUES \
        ('c1','api_requests','2026-11-21 10:00:00',5,0,0,100,110), \
        ('c1','api_requests','2026-11-21 10:01:00',7,0,0,100,110)";
    let batch_b = "INSERT INTO {db}.usage_cells VALUES ('c1','api_requests','2026-11-21 10:01:00',1,0,0,110,111)";
    q(batch_a).unwrap();
    q(batch_a).unwrap();
    q(batch_b).unwrap();
    let total = q("SELECT sum(value) FROM {db}.usage_cells FINAL WHERE customer = 'c1' AND meter = 'api_requests'")
        .unwrap();
    assert_eq!(total.trim(), "13");
    let hourly = q("SELECT toStartOfHour(minute) AS h, sum(value) FROM {db}.usage_cells FINAL WHERE customer = 'c1' GROUP BY h ORDER BY h FORMAT TSV")
        .unwrap();
    assert_eq!(hourly.trim(), "2026-11-21 10:00:00\t13");
    let offsets = q("SELECT partition, maxMerge(next_offset) FROM {db}.batch_offsets GROUP BY partition FORMAT TSV")
        .unwrap();
    assert_eq!(offsets.trim(), "0\t111");
    // Customers: the latest update wins.
    q("INSERT INTO {db}.customers VALUES ('c1','{\"plan\":\"free\"}',1), ('c1','{\"plan\":\"starter\"}',2)").unwrap();
    let rec = q("SELECT record FROM {db}.customers FINAL WHERE id = 'c1' FORMAT TSVRaw").unwrap();
    assert_eq!(rec.trim(), "{\"plan\":\"starter\"}");
    // Old de-duplication days are dropped by partition.
    q("INSERT INTO {db}.event_ids VALUES ('2026-10-01',0,'edge','e-1',1), ('2026-11-21',0,'edge','e-2',2)").unwrap();
    q("ALTER TABLE {db}.event_ids DROP PARTITION '2026-10-01'").unwrap();
    let ids = q("SELECT id FROM {db}.event_ids FORMAT TSV").unwrap();
    assert_eq!(ids.trim(), "e-2");
}
