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
    /// Billing tools.
    #[command(subcommand)]
    Billing(BillingCommand),
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
            let parse = |s: &str| {
                tally_schemas::period::parse_rfc3339(s)
                    .with_context(|| format!("`{s}` is not an RFC 3339 time"))
            };
            let (from, to) = (parse(&from)?, parse(&to)?);
            let differences = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(tally::app::reconcile(&config, from, to))?;
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
        Command::Migrate => {
            tally::telemetry::init(&config);
            let done = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(tally::app::migrate(&config))?;
            for line in done {
                println!("{line}");
            }
            return Ok(());
        }
    };
    tally::telemetry::init(&config);
    for name in unknown {
        tracing::warn!(variable = %name, "ignoring unknown TALLY_ variable");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config, components))
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
