//! How Tally opens its embedded SQLite databases (the event log here, the usage store in the
//! aggregator): WAL mode, so readers never block the writer; `synchronous=FULL`, so a committed
//! transaction survives power loss; a busy timeout for the rare writer contention between
//! processes sharing a data directory.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")?;
    Ok(conn)
}
