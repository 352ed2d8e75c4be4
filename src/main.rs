//! The `tally` command: parses the command line, loads the configuration, binds the listeners
//! and hands over to the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally::{Component, Config};
use tokio_util::sync::CancellationToken;

/// mimalloc: the request paths allocate small, short-lived buffers; measured in
/// benches/README.md (HTTP checks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Usage metering: ingest, aggregate, enforce, bill"
)]
struct Cli {
    /// Configuration file (TOML); environment variables TALLY_* override it.
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline in one process (the default).
    Run,
    /// Run only the ingest API.
    Ingest,
    /// Run only the aggregator (and the query API).
    Aggregator,
    /// Run only the enforcer (checks and customers API).
    Enforcer,
    /// Run only billing-sync.
    BillingSync,
    /// Print the effective configuration as TOML.
    Config,
    /// Create or upgrade the Kafka topics and the ClickHouse schema (idempotent).
    Migrate,
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
    /// Feed events again into the pipeline's log, idempotently: from a file of CloudEvents
    /// (NDJSON or a JSON array), a Kafka topic or an embedded events.db. Exit status 2 when
    /// some events were refused.
    Replay(ReplayArgs),
    /// Billing tools.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// API keys, in the configured store (what `/v1/keys` does, without a running process).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it on standard output: it is shown this once.
    Create {
        /// A name for people, e.g. edge-fra-1.
        #[arg(long)]
        name: String,
        /// What it may do: ingest, check, read, admin (comma-separated or repeated).
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<tally::auth::Scope>,
        /// Limit a read key to one customer.
        #[arg(long)]
        customer: Option<String>,
        /// Most events per second (ingest).
        #[arg(long)]
        ingest_rate: Option<std::num::NonZeroU32>,
        /// The key stops working after this long (e.g. 90d).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// List every key (never the keys themselves).
    List,
    /// Revoke a key at once (every process within 5 s).
    Revoke { id: String },
    /// Create a key with the same grants and print it; the old key works for the overlap.
    Rotate {
        id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        overlap: std::time::Duration,
    },
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// A file of CloudEvents: one per line (NDJSON), or one JSON array.
    #[arg(long, conflicts_with_all = ["from_topic", "from_events_db"])]
    file: Option<PathBuf>,
    /// A Kafka topic on the configured brokers (kafka_brokers).
    #[arg(long, conflicts_with = "from_events_db")]
    from_topic: Option<String>,
    /// An embedded log: a copy of a data directory's events.db (with its -wal file), or a
    /// backup made with SQLite's online backup.
    #[arg(long)]
    from_events_db: Option<PathBuf>,
    /// Partitions of the topic to replay (default: all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    partition: Vec<u32>,
    /// First offset to replay in each partition.
    #[arg(long, default_value_t = 0)]
    from_offset: u64,
    /// Offset to stop before in each partition (default: the end when the replay starts).
    #[arg(long)]
    to_offset: Option<u64>,
    /// No progress bar (it is also hidden when standard error is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Compare Tally's totals with Stripe's meter event summaries and print the differences
    /// (exit status 1 when there are any).
    Reconcile {
        /// Start, RFC 3339 (for example 2026-11-01T00:00:00Z).
        #[arg(long)]
        from: String,
        /// End (exclusive), RFC 3339.
        #[arg(long)]
        to: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (config, unknown) = Config::load(cli.config.as_deref(), &env)?;
    let components: &[Component] = match cli.command.unwrap_or(Command::Run) {
        Command::Run => &Component::ALL,
        Command::Ingest => &[Component::Ingest],
        Command::Aggregator => &[Component::Aggregator],
        Command::Enforcer => &[Component::Enforcer],
        Command::BillingSync => &[Component::BillingSync],
        Command::Replay(args) => {
            tally::telemetry::init(&config);
            return print_replay(runtime()?.block_on(replay(&config, args))?);
        }
        Command::Openapi => {
            print!("{}", tally::openapi::pretty());
            return Ok(());
        }
        Command::Config => {
            print!("{}", toml::to_string(&config)?);
            return Ok(());
        }
        Command::Billing(BillingCommand::Reconcile { from, to }) => {
            tally::telemetry::init(&config);
            return reconcile(&config, &from, &to);
        }
        // No log subscriber: standard output carries the new key alone.
        Command::Keys(command) => return runtime()?.block_on(keys(&config, command)),
        Command::Migrate => {
            tally::telemetry::init(&config);
            for line in runtime()?.block_on(tally::app::migrate(&config))? {
                println!("{line}");
            }
            return Ok(());
        }
    };
    tally::telemetry::init(&config);
    for name in unknown {
        tracing::warn!(variable = %name, "ignoring unknown TALLY_ variable");
    }
    runtime()?.block_on(serve(config, components))
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// `tally replay`'s summary; exit status 2 when events were refused.
fn print_replay(summary: tally::replay::Summary) -> anyhow::Result<()> {
    println!(
        "read {}, accepted {}, duplicates {}, rejected {}",
        summary.read,
        summary.accepted,
        summary.duplicates,
        summary.rejected_total()
    );
    for (code, n) in &summary.rejected {
        println!("  rejected {code}: {n}");
    }
    for (at, message) in &summary.examples {
        eprintln!("refused at {at}: {message}");
    }
    if summary.rejected_total() > 0 {
        std::process::exit(2);
    }
    Ok(())
}

/// `tally billing reconcile`: the differences as a table; exit status 1 when there are some.
fn reconcile(config: &Config, from: &str, to: &str) -> anyhow::Result<()> {
    let parse = |s: &str| {
        tally_schemas::period::parse_rfc3339(s)
            .with_context(|| format!("`{s}` is not an RFC 3339 time"))
    };
    let (from, to) = (parse(from)?, parse(to)?);
    let differences = runtime()?.block_on(tally::app::reconcile(config, from, to))?;
    if differences.is_empty() {
        println!("no differences");
        return Ok(());
    }
    println!("customer\tstripe_customer\tmeter\ttally\tstripe");
    for d in &differences {
        let stripe = d.stripe.map_or("no meter".to_owned(), |v| v.to_string());
        println!(
            "{}\t{}\t{}\t{}\t{stripe}",
            d.customer, d.stripe_customer_id, d.meter, d.tally
        );
    }
    std::process::exit(1);
}

async fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    use tally::keys::KeyInfo;
    let ring = tally::app::key_ring(config).await?;
    let show = |k: &KeyInfo| {
        let scopes: Vec<&str> = k.scopes.iter().map(|s| s.name()).collect();
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            k.id,
            k.name,
            scopes.join(","),
            k.customer.as_deref().unwrap_or("-"),
            k.ingest_rate.map_or("-".to_owned(), |r| r.to_string()),
            k.state,
            k.created,
            k.expires.as_deref().unwrap_or("-"),
        );
    };
    match command {
        KeysCommand::Create {
            name,
            scopes,
            customer,
            ingest_rate,
            expires_in,
        } => {
            let grant = tally::auth::KeyGrant {
                name,
                scopes,
                customer,
                ingest_rate,
                expires_in_seconds: expires_in.map(|d| d.as_secs()),
            };
            let new = ring.create(&grant).await?;
            println!("{}", new.key);
            eprintln!(
                "created key {} ({}); the key above is shown this once",
                new.record.id, new.record.name
            );
        }
        KeysCommand::List => {
            println!("id\tname\tscopes\tcustomer\tingest_rate\tstate\tcreated\texpires");
            for k in ring.list() {
                show(&KeyInfo::of(&k, ring.now_ms()));
            }
        }
        KeysCommand::Revoke { id } => {
            let k = ring.revoke(&id).await?;
            eprintln!("revoked key {}", k.id);
        }
        KeysCommand::Rotate { id, overlap } => {
            let new = ring.rotate(&id, overlap).await?;
            println!("{}", new.key);
            eprintln!(
                "created key {} replacing {id}, which stops working in {}; the key above is \
                 shown this once",
                new.record.id,
                humantime::format_duration(overlap)
            );
        }
    }
    Ok(())
}

async fn serve(config: Config, components: &[Component]) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin_listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    tally::run(
        config,
        components,
        Arc::new(tally_schemas::SystemClock),
        listener,
        admin,
        shutdown,
    )
    .await?;
    tracing::info!("tally stopped");
    Ok(())
}

/// The first SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down; send the signal again to exit at once");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<tally::replay::Summary> {
    let clock: Arc<dyn tally_schemas::Clock> = Arc::new(tally_schemas::SystemClock);
    let catalog = tally::app::load_catalog(config)?;
    let policy = tally_schemas::TimePolicy {
        late_window_ms: config.late_window.as_millis() as i64,
        future_tolerance_ms: config.future_tolerance.as_millis() as i64,
    };
    let log = tally::app::open_log(config, clock.clone())?;
    let progress = !args.no_progress;
    let summary = match &args.file {
        Some(path) => {
            tally::replay::from_file(
                path,
                &catalog,
                policy,
                clock.as_ref(),
                log.as_ref(),
                progress,
            )
            .await?
        }
        None => {
            let source = tally::replay::open_source(
                config,
                args.from_topic.as_deref(),
                args.from_events_db.as_deref(),
                clock.clone(),
            )?;
            tally::replay::from_log(
                source.as_ref(),
                &args.partition,
                args.from_offset,
                args.to_offset,
                policy,
                clock.as_ref(),
                log.as_ref(),
                progress,
            )
            .await?
        }
    };
    Ok(summary)
}
