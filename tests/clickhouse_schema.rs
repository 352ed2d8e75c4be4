//! The ClickHouse schema of `tally_schemas::clickhouse` applies to a real ClickHouse server
//! (Debian's 18.16 here), twice without error, and its read patterns work: replayed batches
//! collapse under FINAL, the offsets view keeps the highest offset per partition.

#[path = "servers/clickhouse.rs"]
mod clickhouse;

use tally_schemas::clickhouse::{MIGRATIONS, statements};

#[test]
fn the_schema_applies_twice_and_its_read_patterns_hold() {
    let ch = clickhouse::ClickHouse::start();
    for _ in 0..2 {
        for m in MIGRATIONS {
            for sql in statements(m, "tally_it") {
                ch.query(&sql).unwrap_or_else(|e| panic!("{sql}\n-> {e}"));
            }
        }
    }
    // A batch, the same batch again (an ambiguous failure retried), and a later batch.
    let batch_a = "INSERT INTO tally_it.usage_cells VALUES \
        ('c1','api_requests','2026-11-21 10:00:00',5,0,0,100,110), \
        ('c1','api_requests','2026-11-21 10:01:00',7,0,0,100,110)";
    let batch_b = "INSERT INTO tally_it.usage_cells VALUES ('c1','api_requests','2026-11-21 10:01:00',1,0,0,110,111)";
    ch.query(batch_a).unwrap();
    ch.query(batch_a).unwrap();
    ch.query(batch_b).unwrap();
    let total = ch
        .query("SELECT sum(value) FROM tally_it.usage_cells FINAL WHERE customer = 'c1' AND meter = 'api_requests'")
        .unwrap();
    assert_eq!(total.trim(), "13");
    let hourly = ch
        .query("SELECT toStartOfHour(minute) AS h, sum(value) FROM tally_it.usage_cells FINAL WHERE customer = 'c1' GROUP BY h ORDER BY h FORMAT TSV")
        .unwrap();
    assert_eq!(hourly.trim(), "2026-11-21 10:00:00\t13");
    let offsets = ch
        .query("SELECT partition, maxMerge(next_offset) FROM tally_it.batch_offsets GROUP BY partition FORMAT TSV")
        .unwrap();
    assert_eq!(offsets.trim(), "0\t111");
    // Customers: the latest update wins.
    ch.query("INSERT INTO tally_it.customers VALUES ('c1','{\"plan\":\"free\"}',1), ('c1','{\"plan\":\"starter\"}',2)").unwrap();
    let rec = ch
        .query("SELECT record FROM tally_it.customers FINAL WHERE id = 'c1' FORMAT TSVRaw")
        .unwrap();
    assert_eq!(rec.trim(), "{\"plan\":\"starter\"}");
    // Old de-duplication days are dropped by partition.
    ch.query("INSERT INTO tally_it.event_ids VALUES ('2026-10-01',0,'edge','e-1',1), ('2026-11-21',0,'edge','e-2',2)").unwrap();
    ch.query("ALTER TABLE tally_it.event_ids DROP PARTITION '2026-10-01'")
        .unwrap();
    let ids = ch
        .query("SELECT id FROM tally_it.event_ids FORMAT TSV")
        .unwrap();
    assert_eq!(ids.trim(), "e-2");
}
