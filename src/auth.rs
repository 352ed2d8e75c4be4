//! API keys and access control of the public listener.
//!
//! # Keys
//! A key reads `tly_<id>_<secret>`: `id` is 16 hex digits and public (it names the key in lists,
//! logs and the admin API); `secret` is 48 hex digits, 192 random bits from the operating
//! system. The store keeps the id, the SHA-256 of the secret and the key's grants, never the key:
//! it is shown once, when created or rotated. A presented key is found by its id and its
//! secret's SHA-256 compared with the stored one in constant time. Keys never appear in logs or
//! metrics (ids may). `TALLY_ADMIN_KEY` adds one bootstrap key with every scope, compared the same
//! way; it is not stored.
//!
//! Send a key as `Authorization: Bearer <key>` or `X-Tally-Key: <key>` (gateways that forward
//! their client's own `Authorization` header use the second), and as the same metadata on gRPC.
//!
//! # Scopes
//! | scope | may call |
//! |---|---|
//! | `ingest` | `POST /v1/events` (under the key's event rate, if it has one) |
//! | `check` | `/v1/check`, `/v1/forward-auth/*`, the gRPC rate-limit and ext_authz checks |
//! | `read` | `/v1/usage`, `/v1/usage/summary`, `GET /v1/customers/{id}`; unless limited to one customer also `/v1/usage/top`, `/v1/usage/totals`, `/v1/operator/stats`, `/v1/billing/status` |
//! | `admin` | everything, including `PUT /v1/customers/{id}` and `/v1/keys` |
//!
//! A `read` key limited to a customer reads that customer only: any other customer, and every
//! cross-customer view, is refused with 403. Without a key: `/openapi.json`, the dashboard's
//! page (its data calls need a key) and `/v1/webhooks/stripe` (Stripe's signature authenticates
//! it). Everything else needs a key; unknown paths need an admin key, so they answer 401 rather
//! than 404 to callers without one.
//!
//! # Open on loopback
//! The embedded default (no Kafka, no ClickHouse) listening on a loopback address only, with no
//! `TALLY_ADMIN_KEY`, runs open until the first key exists, and says so in the log at start-up.
//! Once a key was made, revoking or expiring every key does not open it again. While open, a
//! request whose `Host` is not a loopback name (`localhost`, `127.0.0.1`, `[::1]`) is refused
//! with 403 `host_not_allowed`: a web page cannot reach the open API through a name rebound to
//! 127.0.0.1 (DNS rebinding).
//! A process listening beyond loopback, or using Kafka or ClickHouse, never runs open: without
//! keys it refuses every call that needs one.
//!
//! # Propagation
//! Every process reads the key records from the store at start-up and every [`KEY_REFRESH`]. A
//! key created, revoked or rotated through a process applies there at once, and in the other
//! processes within [`KEY_REFRESH`]. Rotation gives the new key the old one's grants and lets
//! the old one work until the overlap ends.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tally_backends::store::ApiKeys;

use crate::metrics;
use tally_http::problem::ApiError;
use tally_ingest::EventAllowance;
use tally_schemas::Clock;

/// How often every process reads the key records again.
pub const KEY_REFRESH: Duration = Duration::from_secs(5);

/// What a key may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Send usage events.
    Ingest,
    /// Ask for quota decisions.
    Check,
    /// Read usage (optionally of one customer only).
    Read,
    /// Everything: customers, keys, and every other scope.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Check, Scope::Read, Scope::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Check => "check",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.name() == s)
            .ok_or_else(|| format!("unknown scope `{s}` (ingest, check, read or admin)"))
    }
}

/// A key's stored record: its grants and the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    /// A `read` key limited to this customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Most events per second this key may send (ingest); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_rate: Option<NonZeroU32>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created_ms: i64,
    /// When the key stops working (set by rotation or at creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
    /// The key this one replaced (rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
}

impl ApiKey {
    pub fn active(&self, now_ms: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| now_ms < e)
    }

    /// `active`, `expired` or `revoked`.
    pub fn state(&self, now_ms: i64) -> &'static str {
        if self.revoked_ms.is_some() {
            "revoked"
        } else if self.active(now_ms) {
            "active"
        } else {
            "expired"
        }
    }

    fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Whether the key grants `need`.
    pub fn permits(&self, need: &Need) -> Result<(), Denied> {
        let all_customers = self.customer.is_none() || self.has(Scope::Admin);
        match need {
            Need::Public => Ok(()),
            Need::Scope(s) if self.has(*s) => Ok(()),
            Need::Customer(c) if self.has(Scope::Read) => {
                if all_customers || self.customer.as_deref() == Some(c.as_str()) {
                    Ok(())
                } else {
                    Err(Denied::OtherCustomer)
                }
            }
            Need::AllCustomers if self.has(Scope::Read) => {
                if all_customers {
                    Ok(())
                } else {
                    Err(Denied::OtherCustomer)
                }
            }
            Need::Scope(s) => Err(Denied::Scope(*s)),
            Need::Customer(_) | Need::AllCustomers => Err(Denied::Scope(Scope::Read)),
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Public,
    Scope(Scope),
    /// Reading one customer's usage.
    Customer(String),
    /// Reading across customers.
    AllCustomers,
}

/// Why a valid key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Scope(Scope),
    OtherCustomer,
}

/// What a request to `path` needs (the path as routed, the query string as sent).
pub fn need(method: &Method, path: &str, query: Option<&str>) -> Need {
    let customer_param = || {
        let mut found = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "customer")
            .map(|(_, v)| v.into_owned());
        match (found.next(), found.next()) {
            (Some(c), None) => Need::Customer(c),
            // Missing (the handler refuses it) or repeated: only an all-customer key.
            _ => Need::AllCustomers,
        }
    };
    match path {
        "/v1/events" => Need::Scope(Scope::Ingest),
        "/v1/check" => Need::Scope(Scope::Check),
        "/v1/usage" | "/v1/usage/summary" => customer_param(),
        "/v1/usage/top" | "/v1/usage/totals" | "/v1/operator/stats" | "/v1/billing/status" => {
            Need::AllCustomers
        }
        "/v1/webhooks/stripe" | "/openapi.json" | "/" => Need::Public,
        "/v1/keys" => Need::Scope(Scope::Admin),
        "/v1/meters" | "/v1/plans" if *method == Method::GET => Need::Scope(Scope::Read),
        _ if path.starts_with("/v1/meters/") && *method == Method::GET => Need::Scope(Scope::Read),
        _ if path == "/dashboard" || path.starts_with("/dashboard/") => Need::Public,
        _ if path.starts_with("/v1/forward-auth/") => Need::Scope(Scope::Check),
        _ if path.starts_with("/envoy.service.") => Need::Scope(Scope::Check),
        _ => match path.strip_prefix("/v1/customers/") {
            Some(id) if !id.contains('/') && *method == Method::GET => Need::Customer(
                percent_encoding::percent_decode_str(id)
                    .decode_utf8_lossy()
                    .into_owned(),
            ),
            _ => Need::Scope(Scope::Admin),
        },
    }
}

/// A key as created: the key itself (shown once) and its record.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: String,
    pub record: ApiKey,
}

/// What a new key may do.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyGrant {
    /// A name for people, e.g. `edge-fra-1`.
    pub name: String,
    pub scopes: Vec<Scope>,
    /// Limit a `read` key to one customer.
    #[serde(default)]
    pub customer: Option<String>,
    /// Most events per second (ingest).
    #[serde(default)]
    #[schema(value_type = Option<u32>)]
    pub ingest_rate: Option<NonZeroU32>,
    /// The key stops working after this many seconds.
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

/// Errors of key management.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no key with id `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] tally_backends::Error),
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(buf.as_mut_slice());
    hex::encode(buf)
}

/// Splits `tly_<id>_<secret>`.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("tly_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && !secret.is_empty()).then_some((id, secret))
}

impl KeyGrant {
    fn validate(&self) -> Result<(), KeyError> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(KeyError::Invalid(
                "a key needs a name of 1 to 128 characters".into(),
            ));
        }
        if self.scopes.is_empty() {
            return Err(KeyError::Invalid(
                "a key needs at least one scope (ingest, check, read, admin)".into(),
            ));
        }
        if let Some(c) = &self.customer {
            tally_schemas::event::check_customer_id(c)
                .map_err(|e| KeyError::Invalid(format!("customer: {e}")))?;
            if self.scopes.iter().any(|s| *s != Scope::Read) {
                return Err(KeyError::Invalid(
                    "a key limited to a customer may only have the read scope".into(),
                ));
            }
        }
        Ok(())
    }

    /// A new random key with these grants.
    pub fn generate(&self, now_ms: i64) -> Result<NewKey, KeyError> {
        self.validate()?;
        let id = random_hex(8);
        let secret = random_hex(24);
        let mut scopes = self.scopes.clone();
        scopes.sort();
        scopes.dedup();
        Ok(NewKey {
            key: format!("tly_{id}_{secret}"),
            record: ApiKey {
                id,
                name: self.name.trim().to_owned(),
                scopes,
                customer: self.customer.clone(),
                ingest_rate: self.ingest_rate,
                secret_sha256: hex::encode(sha256(secret.as_bytes())),
                created_ms: now_ms,
                expires_ms: self
                    .expires_in_seconds
                    .map(|s| now_ms.saturating_add((s as i64).saturating_mul(1000))),
                revoked_ms: None,
                rotated_from: None,
            },
        })
    }
}

/// Who a request is.
enum Principal {
    Bootstrap,
    Key(Entry),
}

#[derive(Clone)]
struct Entry {
    key: Arc<ApiKey>,
    secret_sha256: [u8; 32],
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

/// The keys of this process, refreshed from the store; decides every request.
pub struct KeyRing {
    store: Arc<dyn ApiKeys>,
    clock: Arc<dyn Clock>,
    entries: RwLock<HashMap<String, Entry>>,
    bootstrap: Option<[u8; 32]>,
    open_allowed: bool,
    /// Some key record exists, active or not: open mode is over for good (revoking the last
    /// key must not open the API again).
    any_key: AtomicBool,
    /// The keys were read from the store at least once.
    loaded: AtomicBool,
    /// Smallest burst of a key's event allowance: one full request always fits.
    min_burst: NonZeroU32,
}

impl KeyRing {
    /// `open_allowed`: the process may run open while no key exists (see the module docs).
    pub fn new(
        store: Arc<dyn ApiKeys>,
        clock: Arc<dyn Clock>,
        bootstrap: Option<&str>,
        open_allowed: bool,
        max_batch_events: usize,
    ) -> KeyRing {
        KeyRing {
            store,
            clock,
            entries: RwLock::new(HashMap::new()),
            bootstrap: bootstrap.map(|k| sha256(k.as_bytes())),
            open_allowed: open_allowed && bootstrap.is_none(),
            any_key: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            min_burst: NonZeroU32::new(max_batch_events.clamp(1, u32::MAX as usize) as u32)
                .unwrap_or(NonZeroU32::MIN),
        }
    }

    /// Reads every key record from the store.
    pub async fn refresh(&self) -> Result<(), KeyError> {
        let rows = self.store.api_keys().await?;
        let mut keys = Vec::with_capacity(rows.len());
        for (id, record) in rows {
            match serde_json::from_str::<ApiKey>(&record) {
                Ok(k) => keys.push(k),
                Err(e) => tracing::error!(key_id = %id, error = %e, "unreadable API key record"),
            }
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            self.install(&mut entries, k);
        }
        self.update_open(&entries);
        self.loaded.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn install(&self, entries: &mut HashMap<String, Entry>, key: ApiKey) {
        let Ok(Ok(secret_sha256)) = hex::decode(&key.secret_sha256).map(<[u8; 32]>::try_from)
        else {
            tracing::error!(key_id = %key.id, "API key record without a valid hash");
            return;
        };
        let limiter = match entries.get(&key.id) {
            Some(e) if e.key.ingest_rate == key.ingest_rate => e.limiter.clone(),
            _ => key.ingest_rate.map(|rate| {
                let burst = rate.max(self.min_burst);
                Arc::new(RateLimiter::direct(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }),
        };
        entries.insert(
            key.id.clone(),
            Entry {
                key: Arc::new(key),
                secret_sha256,
                limiter,
            },
        );
    }

    fn update_open(&self, entries: &HashMap<String, Entry>) {
        if entries.is_empty() {
            return;
        }
        let was = self.any_key.swap(true, Ordering::Relaxed);
        if self.open_allowed && !was {
            tracing::info!("an API key exists: the API now requires keys");
        }
    }

    /// Whether requests pass without a key now. Never before the keys were read once.
    pub fn is_open(&self) -> bool {
        self.open_allowed
            && self.loaded.load(Ordering::Relaxed)
            && !self.any_key.load(Ordering::Relaxed)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn open_allowed(&self) -> bool {
        self.open_allowed
    }

    fn authenticate(&self, presented: &str) -> Option<Principal> {
        if let Some((id, secret)) = parse_key(presented) {
            let entry = self
                .entries
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned();
            if let Some(entry) = entry {
                let ok = entry.secret_sha256.ct_eq(&sha256(secret.as_bytes())).into();
                return (ok && entry.key.active(self.clock.now_ms()))
                    .then_some(Principal::Key(entry));
            }
        }
        let bootstrap = self.bootstrap?;
        bool::from(bootstrap.ct_eq(&sha256(presented.as_bytes()))).then_some(Principal::Bootstrap)
    }

    /// Every key record.
    pub fn list(&self) -> Vec<ApiKey> {
        let mut keys: Vec<ApiKey> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| (*e.key).clone())
            .collect();
        keys.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        keys
    }

    fn get(&self, id: &str) -> Option<ApiKey> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|e| (*e.key).clone())
    }

    async fn put(&self, key: ApiKey) -> Result<(), KeyError> {
        let record = serde_json::to_string(&key).map_err(|e| KeyError::Invalid(e.to_string()))?;
        self.store
            .put_api_key(&key.id, &record, tally_backends::store::version_now())
            .await?;
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        self.install(&mut entries, key);
        self.update_open(&entries);
        Ok(())
    }

    /// Creates and stores a key; the returned key is shown once.
    pub async fn create(&self, grant: &KeyGrant) -> Result<NewKey, KeyError> {
        let new = grant.generate(self.clock.now_ms())?;
        self.put(new.record.clone()).await?;
        tracing::info!(key_id = %new.record.id, name = %new.record.name, scopes = ?new.record.scopes, "API key created");
        Ok(new)
    }

    /// Revokes a key at once.
    pub async fn revoke(&self, id: &str) -> Result<ApiKey, KeyError> {
        self.refresh().await?;
        let mut key = self
            .get(id)
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        if key.revoked_ms.is_none() {
            key.revoked_ms = Some(self.clock.now_ms());
            self.put(key.clone()).await?;
            tracing::info!(key_id = %id, "API key revoked");
        }
        Ok(key)
    }

    /// A new key with `id`'s grants; `id` keeps working for `overlap`, then expires.
    pub async fn rotate(&self, id: &str, overlap: Duration) -> Result<NewKey, KeyError> {
        self.refresh().await?;
        let mut old = self
            .get(id)
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        let now = self.clock.now_ms();
        if !old.active(now) {
            return Err(KeyError::Invalid(format!(
                "key `{id}` is {}; only an active key can be rotated",
                old.state(now)
            )));
        }
        let grant = KeyGrant {
            name: old.name.clone(),
            scopes: old.scopes.clone(),
            customer: old.customer.clone(),
            ingest_rate: old.ingest_rate,
            expires_in_seconds: None,
        };
        let mut new = grant.generate(now)?;
        new.record.expires_ms = old.expires_ms;
        new.record.rotated_from = Some(old.id.clone());
        self.put(new.record.clone()).await?;
        let until = now.saturating_add(overlap.as_millis() as i64);
        old.expires_ms = Some(old.expires_ms.map_or(until, |e| e.min(until)));
        self.put(old).await?;
        tracing::info!(key_id = %id, new_key_id = %new.record.id, overlap_s = overlap.as_secs(), "API key rotated");
        Ok(new)
    }

    /// Refreshes the keys every [`KEY_REFRESH`] until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        tally_backends::periodic::every(KEY_REFRESH, shutdown, "API keys refresh", || {
            self.refresh()
        })
        .await;
    }
}

/// The key of a request: `X-Tally-Key`, else `Authorization: Bearer`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-tally-key") {
        return v.to_str().ok().map(str::trim);
    }
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The access layer of the public listener (see the module docs).
pub async fn require(State(ring): State<Arc<KeyRing>>, mut req: Request, next: Next) -> Response {
    let need = need(req.method(), req.uri().path(), req.uri().query());
    if need == Need::Public {
        return next.run(req).await;
    }
    if ring.is_open() {
        // Open mode trusts local callers only: a page on another site that a browser reaches
        // through a name rebound to 127.0.0.1 sends that name as the Host.
        if !loopback_host(&req) {
            return refuse(
                false,
                "host",
                "host_not_allowed",
                "while no API key exists, only requests to a loopback name (localhost, \
                 127.0.0.1, [::1]) are served",
            );
        }
        return next.run(req).await;
    }
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let Some(key) = presented(req.headers()).filter(|k| !k.is_empty()) else {
        if !ring.loaded.load(Ordering::Relaxed) && ring.open_allowed {
            // Open once the store says no key exists; it has not said yet.
            return refuse(grpc, "unavailable", "keys_unavailable", UNAVAILABLE);
        }
        return refuse(
            grpc,
            "missing",
            "missing_api_key",
            "this endpoint needs an API key: send `Authorization: Bearer <key>`",
        );
    };
    let entry = match ring.authenticate(key) {
        None if !ring.loaded.load(Ordering::Relaxed) => {
            // The store could not be read yet: the key may well be valid.
            return refuse(grpc, "unavailable", "keys_unavailable", UNAVAILABLE);
        }
        None => {
            return refuse(
                grpc,
                "invalid",
                "invalid_api_key",
                "the API key is unknown, revoked or expired",
            );
        }
        Some(Principal::Bootstrap) => None,
        Some(Principal::Key(entry)) => Some(entry),
    };
    if let Some(entry) = entry {
        if let Err(denied) = entry.key.permits(&need) {
            let message = match denied {
                Denied::Scope(s) => format!("this API key lacks the `{}` scope", s.name()),
                Denied::OtherCustomer => {
                    "this API key may only read its own customer's usage".to_owned()
                }
            };
            return refuse(grpc, "forbidden", "forbidden", &message);
        }
        if need == Need::Scope(Scope::Ingest)
            && let Some(limiter) = entry.limiter.clone()
        {
            req.extensions_mut()
                .insert(EventAllowance(Arc::new(move |n| allow(&limiter, n))));
        }
    }
    next.run(req).await
}

/// Whether the request names a loopback host (`Host`, or the HTTP/2 authority): `localhost`,
/// a name under `.localhost`, an address in 127.0.0.0/8 or `[::1]`, with any port; or names
/// none.
fn loopback_host(req: &Request) -> bool {
    let host = match req.headers().get(header::HOST) {
        Some(v) => v.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    };
    let Some(host) = host else {
        // No name at all (HTTP/1.0, an in-process call): not a browser, which always names
        // the host it thinks it talks to.
        return true;
    };
    // Strip the port: `[::1]:8080`, `127.0.0.1:8080`, `localhost:8080`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn allow(limiter: &DefaultDirectRateLimiter, n: u32) -> Result<(), Duration> {
    let Some(n) = NonZeroU32::new(n) else {
        return Ok(());
    };
    match limiter.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
        // Larger than the burst, which is at least one full request: cannot happen; refuse
        // for a second rather than let it through.
        Err(_) => Err(Duration::from_secs(1)),
    }
}

const UNAVAILABLE: &str = "API keys cannot be checked now; retry later";

/// The refusal of the access layer, by `reason` (the metric's label): `missing` and `invalid`
/// are 401 (gRPC UNAUTHENTICATED), `forbidden` 403 (PERMISSION_DENIED), `unavailable` 503 with
/// `Retry-After` (UNAVAILABLE).
fn refuse(grpc: bool, reason: &'static str, code: &'static str, message: &str) -> Response {
    metrics::AUTH_REFUSED.with_label_values(&[reason]).inc();
    let (status, grpc_status) = match reason {
        "forbidden" | "host" => (StatusCode::FORBIDDEN, "7"),
        "unavailable" => (StatusCode::SERVICE_UNAVAILABLE, "14"),
        _ => (StatusCode::UNAUTHORIZED, "16"),
    };
    if grpc {
        // gRPC clients read the status from the headers of a trailers-only reply.
        let mut resp = StatusCode::OK.into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(grpc_status));
        if let Ok(v) = HeaderValue::from_str(message) {
            h.insert("grpc-message", v);
        }
        return resp;
    }
    let mut e = ApiError::new(status, code, message);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        e.retry_after = Some(1);
    }
    let mut resp = e.into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tally\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scopes: &[Scope], customer: Option<&str>) -> ApiKey {
        KeyGrant {
            name: "k".into(),
            scopes: scopes.to_vec(),
            customer: customer.map(str::to_owned),
            ..KeyGrant::default()
        }
        .generate(0)
        .unwrap()
        .record
    }

    #[test]
    fn open_mode_serves_loopback_hosts_only() {
        let with_host = |h: Option<&str>| {
            let mut b = axum::http::Request::get("/v1/usage");
            if let Some(h) = h {
                b = b.header(header::HOST, h);
            }
            loopback_host(&b.body(axum::body::Body::empty()).unwrap())
        };
        for h in [
            "localhost",
            "LOCALHOST:80",
            "a.localhost",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]",
            "[::1]:1",
            "localhost.",
        ] {
            assert!(with_host(Some(h)), "{h}");
        }
        for h in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]",
            "0.0.0.0",
            "[::1",
            "1270.0.0.1",
        ] {
            assert!(!with_host(Some(h)), "{h}");
        }
        assert!(with_host(None));
        let h2 = axum::http::Request::get("http://evil.example/v1/usage")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(
            !loopback_host(&h2),
            "the HTTP/2 authority counts when there is no Host"
        );
    }

    #[test]
    fn routes_need_their_scope() {
        let get = Method::GET;
        assert_eq!(
            need(&Method::POST, "/v1/events", None),
            Need::Scope(Scope::Ingest)
        );
        assert_eq!(
            need(&get, "/v1/check", Some("customer=a")),
            Need::Scope(Scope::Check)
        );
        assert_eq!(
            need(&get, "/v1/forward-auth/nginx/x", None),
            Need::Scope(Scope::Check)
        );
        assert_eq!(
            need(
                &Method::POST,
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                None
            ),
            Need::Scope(Scope::Check)
        );
        assert_eq!(
            need(&get, "/v1/usage", Some("meter=x&customer=cust%5F1")),
            Need::Customer("cust_1".into())
        );
        assert_eq!(
            need(&get, "/v1/usage/summary", Some("customer=a&customer=b")),
            Need::AllCustomers
        );
        assert_eq!(need(&get, "/v1/usage", None), Need::AllCustomers);
        assert_eq!(
            need(&get, "/v1/usage/top", Some("customer=a")),
            Need::AllCustomers
        );
        assert_eq!(
            need(&get, "/v1/customers/a%40b", None),
            Need::Customer("a@b".into())
        );
        assert_eq!(
            need(&Method::PUT, "/v1/customers/a", None),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(need(&get, "/v1/keys", None), Need::Scope(Scope::Admin));
        assert_eq!(need(&get, "/v1/meters", None), Need::Scope(Scope::Read));
        assert_eq!(need(&get, "/v1/meters/a", None), Need::Scope(Scope::Read));
        assert_eq!(need(&get, "/v1/plans", None), Need::Scope(Scope::Read));
        assert_eq!(
            need(&Method::POST, "/v1/meters", None),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(
            need(&get, "/v1/keys/abc/rotate", None),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(need(&get, "/v1/nothing", None), Need::Scope(Scope::Admin));
        assert_eq!(need(&get, "/dashboard/app.js", None), Need::Public);
        assert_eq!(need(&get, "/dashboardx", None), Need::Scope(Scope::Admin));
        assert_eq!(
            need(&Method::POST, "/v1/webhooks/stripe", None),
            Need::Public
        );
    }

    #[test]
    fn scopes_and_customer_limits() {
        let ingest = key(&[Scope::Ingest], None);
        assert!(ingest.permits(&Need::Scope(Scope::Ingest)).is_ok());
        assert_eq!(
            ingest.permits(&Need::Scope(Scope::Check)),
            Err(Denied::Scope(Scope::Check))
        );
        assert!(ingest.permits(&Need::Customer("a".into())).is_err());
        let reader = key(&[Scope::Read], Some("a"));
        assert!(reader.permits(&Need::Customer("a".into())).is_ok());
        assert_eq!(
            reader.permits(&Need::Customer("b".into())),
            Err(Denied::OtherCustomer)
        );
        assert_eq!(
            reader.permits(&Need::AllCustomers),
            Err(Denied::OtherCustomer)
        );
        assert!(reader.permits(&Need::Scope(Scope::Admin)).is_err());
        let all = key(&[Scope::Read], None);
        assert!(all.permits(&Need::AllCustomers).is_ok());
        let admin = key(&[Scope::Admin], None);
        for need in [
            Need::Scope(Scope::Ingest),
            Need::Scope(Scope::Check),
            Need::Customer("z".into()),
            Need::AllCustomers,
        ] {
            assert!(admin.permits(&need).is_ok());
        }
    }

    #[test]
    fn grants_are_checked() {
        let bad = |g: KeyGrant| g.generate(0).unwrap_err().to_string();
        assert!(
            bad(KeyGrant {
                name: "x".into(),
                ..KeyGrant::default()
            })
            .contains("scope")
        );
        assert!(
            bad(KeyGrant {
                name: "x".into(),
                scopes: vec![Scope::Ingest],
                customer: Some("a".into()),
                ..KeyGrant::default()
            })
            .contains("only have the read scope")
        );
        assert!(
            bad(KeyGrant {
                scopes: vec![Scope::Read],
                ..KeyGrant::default()
            })
            .contains("name")
        );
    }

    #[test]
    fn keys_are_random_and_only_their_hash_is_kept() {
        let a = KeyGrant {
            name: "a".into(),
            scopes: vec![Scope::Read],
            ..KeyGrant::default()
        };
        let (x, y) = (a.generate(0).unwrap(), a.generate(0).unwrap());
        assert_ne!(x.key, y.key);
        assert_ne!(x.record.id, y.record.id);
        let (id, secret) = parse_key(&x.key).unwrap();
        assert_eq!(id, x.record.id);
        assert_eq!(secret.len(), 48);
        let stored = serde_json::to_string(&x.record).unwrap();
        assert!(!stored.contains(secret));
        assert_eq!(
            x.record.secret_sha256,
            hex::encode(sha256(secret.as_bytes()))
        );
    }

    #[test]
    fn the_event_allowance_refuses_past_the_rate() {
        let limiter = RateLimiter::direct(
            Quota::per_second(NonZeroU32::new(10).unwrap())
                .allow_burst(NonZeroU32::new(100).unwrap()),
        );
        assert_eq!(allow(&limiter, 100), Ok(()));
        let wait = allow(&limiter, 5).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(allow(&limiter, 0), Ok(()));
    }
}
