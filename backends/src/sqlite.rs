//! How Tally opens its embedded SQLite databases (the event log here, the usage store in the
//! aggregator): WAL mode, so readers never block the writer; `synchronous=FULL`, so a committed
//! transaction survives power loss; a busy timeout for the rare writer contention between
//! processes sharing a data directory.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

/// A shared connection could not be used: its thread panicked holding it, or the runtime is
/// shutting down. Each crate's error type turns it into its own "closed" error.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// Runs `f` on a blocking thread with the connection locked: SQLite calls never run on the async
/// workers.
pub async fn with_connection<T, E>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<Unavailable> + Send + 'static,
{
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = conn.lock().map_err(|_| Unavailable)?;
        f(&mut c)
    })
    .await
    .map_err(|_| Unavailable)?
}

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")?;
    Ok(conn)
}
