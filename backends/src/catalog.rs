//! The live catalogue: the catalogue file's meters and plans, plus the meters managed through the
//! API (`/v1/meters`), which the store keeps ([`MeterDefinitions`]). Every process reads the
//! stored meters back every refresh interval (`meters_refresh`, 2 s by default), so a meter
//! created, changed or archived in one process reaches the others within that interval, with no
//! restart. The process that made the change sees it at once.
//!
//! # Order of knowledge
//! Ingest reads an event's meters when it accepts the event, and it only knows meters that are
//! in the store already. A stage further down (the aggregator, the enforcer) that meets a
//! reading of a meter it does not know yet reads the store again before folding it
//! ([`LiveCatalog::knowing`]): a reading is never folded under a guessed aggregation nor left
//! uncounted because its meter is new. A name still unknown after that (a meter removed from the
//! catalogue file) is looked up again at most every [`MISS_RETRY`]. On a ClickHouse cluster the
//! records are on a replicated table: a replica that lags returns the meter on a later read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tally_schemas::{Catalog, ManagedMeter, Record};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{MeterDefinitions, version_now};
use crate::{Error, Result};

/// How soon a meter name unknown after a read of the store is looked up again.
pub const MISS_RETRY: Duration = Duration::from_secs(5);

/// The catalogue in force in this process, kept up to date from the store.
pub struct LiveCatalog {
    base: Catalog,
    store: Option<Arc<dyn MeterDefinitions>>,
    current: ArcSwap<Catalog>,
    changes: watch::Sender<Arc<Catalog>>,
    /// One read of the store at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Names unknown after a read of the store, with when.
    misses: Mutex<HashMap<String, Instant>>,
}

impl LiveCatalog {
    /// A catalogue that never changes (no store): tests, benchmarks, one-off commands.
    pub fn fixed(catalog: Catalog) -> Arc<LiveCatalog> {
        Self::build(catalog, None)
    }

    /// The file's catalogue, with the store's meters once [`LiveCatalog::refresh`] read them.
    pub fn new(base: Catalog, store: Arc<dyn MeterDefinitions>) -> Arc<LiveCatalog> {
        Self::build(base, Some(store))
    }

    fn build(base: Catalog, store: Option<Arc<dyn MeterDefinitions>>) -> Arc<LiveCatalog> {
        let current = Arc::new(base.clone());
        Arc::new(LiveCatalog {
            base,
            store,
            current: ArcSwap::new(current.clone()),
            changes: watch::Sender::new(current),
            refreshing: tokio::sync::Mutex::new(()),
            misses: Mutex::new(HashMap::new()),
        })
    }

    /// The catalogue in force.
    pub fn get(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// The catalogue file's part.
    pub fn base(&self) -> &Catalog {
        &self.base
    }

    /// Sees every change of the catalogue in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.changes.subscribe()
    }

    /// Reads the stored meters and puts the catalogue they make in force. A record that cannot
    /// be read is left out, and a set of records that does not make a valid catalogue keeps the
    /// catalogue in force; both are logged. Errors are the store's.
    pub async fn refresh(&self) -> Result<Arc<Catalog>> {
        let Some(store) = &self.store else {
            return Ok(self.get());
        };
        let _one = self.refreshing.lock().await;
        let rows = store.meter_definitions().await?;
        let mut managed = Vec::with_capacity(rows.len());
        for (name, record) in rows {
            match serde_json::from_str::<ManagedMeter>(&record) {
                Ok(m) if m.name == name => {
                    if self.base.meter(&name).is_some() {
                        tracing::warn!(meter = %name, "a stored meter has the name of a catalogue file's meter; the file's is in force");
                    }
                    managed.push(m);
                }
                Ok(_) => tracing::error!(meter = %name, "stored meter record names another meter"),
                Err(e) => tracing::error!(meter = %name, error = %e, "unreadable meter record"),
            }
        }
        let current = self.get();
        let next = match self.base.with_managed(managed) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "the stored meters do not make a valid catalogue; the one in force stays");
                return Ok(current);
            }
        };
        if *current == next {
            return Ok(current);
        }
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.changes.send_replace(next.clone());
        tracing::info!(meters = next.meters.len(), "catalogue updated");
        Ok(next)
    }

    /// The catalogue in force, read again from the store first if it lacks one of `meters`
    /// (see the module docs).
    pub async fn knowing<'a>(
        &self,
        meters: impl IntoIterator<Item = &'a str>,
    ) -> Result<Arc<Catalog>> {
        let current = self.get();
        let now = Instant::now();
        let mut missing = false;
        for m in meters {
            if current.meter(m).is_some() {
                continue;
            }
            let misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
            if misses
                .get(m)
                .is_none_or(|t| now.duration_since(*t) >= MISS_RETRY)
            {
                missing = true;
                break;
            }
        }
        if !missing {
            return Ok(current);
        }
        let next = self.refresh().await?;
        Ok(next)
    }

    /// Notes the names of `meters` that the catalogue in force lacks after a read of the store,
    /// so [`LiveCatalog::knowing`] does not read it again for them before [`MISS_RETRY`].
    pub fn note_unknown<'a>(&self, meters: impl IntoIterator<Item = &'a str>) {
        let current = self.get();
        let now = Instant::now();
        let mut misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        for m in meters {
            if current.meter(m).is_none() {
                misses.insert(m.to_owned(), now);
            }
        }
        if misses.len() > 10_000 {
            misses.retain(|_, t| now.duration_since(*t) < MISS_RETRY);
        }
    }

    /// Stores a managed meter's record and puts it in force here at once.
    pub async fn put(&self, meter: &ManagedMeter) -> Result<Arc<Catalog>> {
        let Some(store) = &self.store else {
            return Err(Error::Config("this catalogue is fixed".into()));
        };
        let record = serde_json::to_string(meter)?;
        store
            .put_meter_definition(&meter.name, &record, version_now())
            .await?;
        self.refresh().await
    }

    /// Reads the store every `every` until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        if self.store.is_none() {
            return;
        }
        crate::periodic::every(every, shutdown, "meters refresh", || self.refresh()).await;
    }
}

/// The meters the readings of `records` name; a name once for each run of records naming it.
pub fn meters_of(records: &[Record]) -> impl Iterator<Item = &str> + '_ {
    let mut last: Option<&str> = None;
    records
        .iter()
        .flat_map(|r| r.event.readings().map(|x| x.meter))
        .filter(move |m| {
            let again = last == Some(*m);
            last = Some(m);
            !again
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use tally_schemas::Aggregation;

    fn tokens(created_ms: i64) -> ManagedMeter {
        ManagedMeter {
            name: "tokens".into(),
            meter: serde_json::from_value(serde_json::json!({
                "aggregation": "sum", "unit": "tokens", "event_type": "llm.call",
                "value": "$.tokens", "group_by": {"model": "$.model"}
            }))
            .unwrap(),
            created_ms,
            updated_ms: created_ms,
            archived_ms: None,
        }
    }

    #[tokio::test]
    async fn a_stored_meter_reaches_another_process_on_refresh_and_archiving_stops_its_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<SqliteStore> = Arc::new(SqliteStore::open(dir.path().join("u.db")).unwrap());
        let here = LiveCatalog::new(Catalog::builtin(), store.clone());
        let there = LiveCatalog::new(Catalog::builtin(), store.clone());
        let mut seen = there.subscribe();
        let made = here.put(&tokens(1_000)).await.unwrap();
        assert_eq!(made.meter("tokens").unwrap().aggregation, Aggregation::Sum);
        assert!(made.event_type("llm.call").is_some());
        // The other process knows it once it reads the store, when a reading names it.
        assert!(there.get().meter("tokens").is_none());
        let known = there.knowing(["api_requests", "tokens"]).await.unwrap();
        assert!(known.meter("tokens").is_some());
        assert!(seen.has_changed().unwrap());
        assert!(seen.borrow_and_update().meter("tokens").is_some());
        // Managed meters come after the file's in the stable order.
        let order = known.meter_order();
        assert_eq!(order.last(), Some(&"tokens"));
        assert_eq!(order.len(), Catalog::builtin().meters.len() + 1);
        // Archived: still a meter, reading no events.
        let mut archived = tokens(1_000);
        archived.archived_ms = Some(2_000);
        here.put(&archived).await.unwrap();
        let now = there.refresh().await.unwrap();
        assert!(now.meter("tokens").is_some());
        assert!(now.is_archived("tokens"));
        assert!(now.event_type("llm.call").is_none());
    }

    #[tokio::test]
    async fn a_name_unknown_after_a_read_is_not_read_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<SqliteStore> = Arc::new(SqliteStore::open(dir.path().join("u.db")).unwrap());
        let live = LiveCatalog::new(Catalog::builtin(), store.clone());
        live.knowing(["gone"]).await.unwrap();
        live.note_unknown(["gone"]);
        // Stored behind its back: a read for "gone" again within MISS_RETRY does not happen, so
        // the new meter is not seen yet; a refresh sees it.
        let other = LiveCatalog::new(Catalog::builtin(), store.clone());
        other.put(&tokens(5)).await.unwrap();
        assert!(
            live.knowing(["gone"])
                .await
                .unwrap()
                .meter("tokens")
                .is_none()
        );
        assert!(
            live.knowing(["tokens"])
                .await
                .unwrap()
                .meter("tokens")
                .is_some()
        );
    }
}
