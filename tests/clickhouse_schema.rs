//! The ClickHouse schema of `tally_backends::store::clickhouse::schema` applies to a real
//! ClickHouse server (Debian's 18.16 here), twice without error, and its read patterns work: the
//! furthest write of a block wins under FINAL whatever order writes land in, the offsets view
//! keeps the highest offset per partition, cells with other dimensions stay apart.

#[path = "servers/mod.rs"]
mod servers;

use tally_backends::store::clickhouse::schema::{MIGRATIONS, statements};

#[test]
fn the_schema_applies_twice_and_its_read_patterns_hold() {
    if servers::skip_without_servers(false) {
        return;
    }
    let ch = servers::ClickHouse::shared();
    let db = servers::unique_name("schema");
    let q = |sql: &str| ch.query(&sql.replace("{db}", &db));
    let apply = |migrations: &[tally_backends::store::clickhouse::schema::Migration]| {
        for m in migrations {
            let applied = m.unless.is_some_and(|u| {
                ch.query(&u.replace("{db}", &db))
                    .is_ok_and(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
            });
            if applied {
                continue;
            }
            for sql in statements(m, &db) {
                ch.query(&sql).unwrap_or_else(|e| panic!("{sql}\n-> {e}"));
            }
        }
    };
    // Usage of the per-batch table (before version 5), then every migration, twice: the
    // copy into the block table counts it once.
    apply(&MIGRATIONS[..4]);
    q("INSERT INTO {db}.usage_cells VALUES ('c0','api_requests','2026-11-21 09:00:00',4,0,0,0,100)")
        .unwrap();
    apply(MIGRATIONS);
    apply(MIGRATIONS);
    // A block as it grows, the same write again (an ambiguous failure retried), a stale shorter
    // write of it landing last (a writer that stalled), and the next block.
    let block_to_110 = "INSERT INTO {db}.usage_block_cells (customer, meter, minute, value, last_ms, partition, batch_first_offset, batch_next_offset) VALUES \
        ('c1','api_requests','2026-11-21 10:00:00',5,0,0,100,110), \
        ('c1','api_requests','2026-11-21 10:01:00',7,0,0,100,110)";
    let block_to_105 = "INSERT INTO {db}.usage_block_cells (customer, meter, minute, value, last_ms, partition, batch_first_offset, batch_next_offset) VALUES \
        ('c1','api_requests','2026-11-21 10:00:00',2,0,0,100,105), \
        ('c1','api_requests','2026-11-21 10:01:00',3,0,0,100,105)";
    let next_block = "INSERT INTO {db}.usage_block_cells (customer, meter, minute, value, last_ms, partition, batch_first_offset, batch_next_offset) VALUES ('c1','api_requests','2026-11-21 10:01:00',1,0,0,110,111)";
    q(block_to_110).unwrap();
    q(block_to_110).unwrap();
    q(block_to_105).unwrap();
    q(next_block).unwrap();
    let total = |customer: &str| {
        q(&format!("SELECT sum(value) FROM {{db}}.usage_block_cells FINAL WHERE customer = '{customer}' AND meter = 'api_requests'"))
            .unwrap()
    };
    assert_eq!(total("c1").trim(), "13");
    assert_eq!(total("c0").trim(), "4", "the copied per-batch usage, once");
    let hourly = q("SELECT toStartOfHour(minute) AS h, sum(value) FROM {db}.usage_block_cells FINAL WHERE customer = 'c1' GROUP BY h ORDER BY h FORMAT TSV")
        .unwrap();
    assert_eq!(hourly.trim(), "2026-11-21 10:00:00\t13");
    // Merged, the same.
    q("OPTIMIZE TABLE {db}.usage_block_cells FINAL").unwrap();
    assert_eq!(total("c1").trim(), "13");
    let offsets = q("SELECT partition, maxMerge(next_offset) FROM {db}.batch_offsets GROUP BY partition FORMAT TSV")
        .unwrap();
    assert_eq!(offsets.trim(), "0\t111");
    let resume = q("SELECT argMax(batch_first_offset, batch_next_offset), max(batch_next_offset) FROM {db}.usage_block_cells WHERE partition = 0 FORMAT TSV")
        .unwrap();
    assert_eq!(resume.trim(), "110\t111", "the furthest block's start");
    // Cells of one key and block with other dimensions stay apart; the copied cells have none.
    q(r#"INSERT INTO {db}.usage_block_cells VALUES
        ('c2','request_bytes','2026-11-21 10:00:00',5,0,1,0,1,'{"region":"eu"}',''),
        ('c2','request_bytes','2026-11-21 10:00:00',7,0,1,0,1,'{"region":"us"}',''),
        ('c2','request_bytes','2026-11-21 10:00:00',7,0,1,0,1,'{"region":"us"}','')"#)
    .unwrap();
    q("OPTIMIZE TABLE {db}.usage_block_cells FINAL").unwrap();
    let by_region = q("SELECT visitParamExtractString(dims, 'region') AS r, sum(value) FROM {db}.usage_block_cells FINAL WHERE customer = 'c2' GROUP BY r ORDER BY r FORMAT TSV")
        .unwrap();
    assert_eq!(by_region.trim(), "eu\t5\nus\t7");
    let copied =
        q("SELECT dims FROM {db}.usage_block_cells WHERE customer = 'c0' FORMAT TSV").unwrap();
    assert_eq!(copied.trim(), "");
    // A unique_count meter's cells are one per value: the same value in one minute and block
    // collapses, in other minutes or blocks it counts once in the period.
    q("INSERT INTO {db}.usage_block_cells VALUES
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','ann'),
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','ann'),
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','bob'),
        ('c3','active_users','2026-11-22 09:00:00',1,0,2,1,2,'','ann')")
    .unwrap();
    q("OPTIMIZE TABLE {db}.usage_block_cells FINAL").unwrap();
    let rows =
        q("SELECT count() FROM {db}.usage_block_cells WHERE customer = 'c3' FORMAT TSV").unwrap();
    assert_eq!(rows.trim(), "3", "a cell written twice collapses");
    let users = q("SELECT uniqExact(distinct_value) FROM {db}.usage_block_cells FINAL WHERE customer = 'c3' AND meter = 'active_users' FORMAT TSV")
        .unwrap();
    assert_eq!(users.trim(), "2");
    let before = q("SELECT distinct_value FROM {db}.usage_block_cells WHERE customer = 'c1' GROUP BY distinct_value FORMAT TSV")
        .unwrap();
    assert_eq!(
        before.trim(),
        "",
        "cells from before version 7 have no distinct value"
    );
    // Customers: the latest update wins.
    q("INSERT INTO {db}.customers VALUES ('c1','{\"plan\":\"free\"}',1), ('c1','{\"plan\":\"starter\"}',2)").unwrap();
    let rec = q("SELECT record FROM {db}.customers FINAL WHERE id = 'c1' FORMAT TSVRaw").unwrap();
    assert_eq!(rec.trim(), "{\"plan\":\"starter\"}");
    // Meter records: the latest version wins.
    q("INSERT INTO {db}.meter_definitions VALUES ('tokens','{\"v\":2}',2), ('tokens','{\"v\":1}',1)").unwrap();
    let meters = q("SELECT name, argMax(record, version) FROM {db}.meter_definitions GROUP BY name FORMAT TSVRaw").unwrap();
    assert_eq!(meters.trim(), "tokens\t{\"v\":2}");
    // Old de-duplication days are dropped by partition.
    q("INSERT INTO {db}.event_ids VALUES ('2026-10-01',0,'edge','e-1',1), ('2026-11-21',0,'edge','e-2',2)").unwrap();
    q("ALTER TABLE {db}.event_ids DROP PARTITION '2026-10-01'").unwrap();
    let ids = q("SELECT id FROM {db}.event_ids FORMAT TSV").unwrap();
    assert_eq!(ids.trim(), "e-2");
}

/// The same schema, with its read patterns, on a current ClickHouse engine (chdb, in process),
/// so the statements hold on today's releases as well as on 18.16.
#[test]
fn the_schema_and_its_read_patterns_hold_on_current_clickhouse() {
    let python = std::env::var("TALLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_chdb = std::process::Command::new(&python)
        .args(["-c", "import chdb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if servers::skip_without_tool("chdb (Python)", has_chdb) {
        return;
    }
    let db = "tally_current";
    let mut statements: Vec<String> = MIGRATIONS.iter().flat_map(|m| statements(m, db)).collect();
    let cells = "INSERT INTO {db}.usage_block_cells VALUES \
        ('c1','api_requests','2026-11-21 10:00:00',5,0,0,100,110,'',''), \
        ('c1','api_requests','2026-11-21 10:00:00',2,0,0,100,105,'',''), \
        ('c1','api_requests','2026-11-21 10:01:00',1,0,0,110,111,'',''), \
        ('c2','request_bytes','2026-11-21 10:00:00',5,0,1,0,1,'{\"region\":\"eu\"}',''), \
        ('c2','request_bytes','2026-11-21 10:00:00',7,0,1,0,1,'{\"region\":\"us\"}',''), \
        ('c2','request_bytes','2026-11-21 10:00:00',7,0,1,0,1,'{\"region\":\"us\"}',''), \
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','ann'), \
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','ann'), \
        ('c3','active_users','2026-11-21 10:00:00',1,0,2,0,1,'','bob'), \
        ('c3','active_users','2026-11-22 09:00:00',1,0,2,1,2,'','ann')";
    statements.push(cells.replace("{db}", db));
    statements.push(format!(
        "INSERT INTO {db}.meter_definitions VALUES ('tokens','v2',2), ('tokens','v1',1)"
    ));
    let checks: Vec<(String, &str)> = [
        (
            "SELECT name, argMax(record, version) FROM {db}.meter_definitions GROUP BY name",
            "tokens\tv2",
        ),
        (
            "SELECT sum(value) FROM {db}.usage_block_cells FINAL WHERE customer = 'c1'",
            "6",
        ),
        (
            "SELECT partition, maxMerge(next_offset) FROM {db}.batch_offsets GROUP BY partition ORDER BY partition",
            "0\t111\n1\t1\n2\t2",
        ),
        (
            "SELECT argMax(batch_first_offset, batch_next_offset), max(batch_next_offset) FROM {db}.usage_block_cells WHERE partition = 0",
            "110\t111",
        ),
        (
            "SELECT dims, sum(bitShiftRight(value, 32)) AS h, sum(bitAnd(value, 4294967295)) AS l FROM {db}.usage_block_cells FINAL WHERE customer = 'c2' AND meter = 'request_bytes' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000) GROUP BY dims ORDER BY dims",
            "{\"region\":\"eu\"}\t0\t5\n{\"region\":\"us\"}\t0\t7",
        ),
        (
            "SELECT count() FROM system.columns WHERE database = '{db}' AND table = 'usage_block_cells' AND name = 'dims'",
            "1",
        ),
        // The figures of `max` and `min` meters, split as the reader reads them.
        (
            "SELECT bitShiftRight(max(value), 32) AS h, bitAnd(max(value), 4294967295) AS l FROM {db}.usage_block_cells FINAL WHERE customer = 'c2' AND meter = 'request_bytes' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000)",
            "0\t7",
        ),
        (
            "SELECT customer, h + bitShiftRight(l, 32) AS hi, bitAnd(l, 4294967295) AS lo FROM (SELECT customer, bitShiftRight(min(value), 32) AS h, bitAnd(min(value), 4294967295) AS l FROM {db}.usage_block_cells FINAL WHERE meter = 'request_bytes' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000) GROUP BY customer HAVING h > 0 OR l > 0) ORDER BY hi DESC, lo DESC, customer LIMIT 10",
            "c2\t0\t5",
        ),
        // A unique_count meter's figure and its values, as the reader reads them.
        (
            "SELECT bitShiftRight(uniqExact(distinct_value), 32) AS h, bitAnd(uniqExact(distinct_value), 4294967295) AS l FROM {db}.usage_block_cells FINAL WHERE customer = 'c3' AND meter = 'active_users' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000)",
            "0\t2",
        ),
        (
            "SELECT DISTINCT distinct_value FROM {db}.usage_block_cells FINAL WHERE customer = 'c3' AND meter = 'active_users' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000) ORDER BY distinct_value",
            "ann\nbob",
        ),
        (
            "SELECT toString(toStartOfDay(minute)) AS b, distinct_value FROM {db}.usage_block_cells FINAL WHERE customer = 'c3' AND meter = 'active_users' AND minute >= toDateTime(0) AND minute < toDateTime(2000000000) GROUP BY b, distinct_value ORDER BY b, distinct_value",
            "2026-11-21 00:00:00\tann\n2026-11-21 00:00:00\tbob\n2026-11-22 00:00:00\tann",
        ),
    ]
    .into_iter()
    .map(|(sql, want)| (sql.replace("{db}", db), want))
    .collect();
    let job = serde_json::json!({"statements": statements, "checks": checks});
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/chdb_schema.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        job.to_string().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("checks passed"), "{text}");
}
