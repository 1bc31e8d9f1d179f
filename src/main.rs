//! `dynamodb-cdc`: command line, logging, exit codes.
//!
//! Exit status: 0 after a clean shutdown (or when every check passed), 1 when the pipeline
//! failed (or a check failed), 2 for a configuration error (before any network access).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dynamodb_cdc::config::LogFormat;
use dynamodb_cdc::integration::{self, Format};
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: the pipeline allocates a dozen buffers per change
/// (key, value, headers) on one thread and frees them on another, and glibc's allocator
/// took about 28% of the daemon's CPU at full throughput (README, "Benchmark").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dynamodb-cdc",
    version,
    about = "DynamoDB Streams to Kafka, one topic per table, under an assumed IAM role"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline in the foreground until SIGTERM or SIGINT.
    Run {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and reach every dependency; one line per check.
    Check {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Load one table's items into its topic once (SNAPSHOT rows), then exit; beside a
    /// running daemon too (its checkpoints are untouched). An interrupted run resumes.
    Snapshot {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The table (one of the config's `tables`).
        #[arg(long)]
        table: String,
    },
    /// Where every table and shard stands, from the checkpoint files (no AWS or Kafka
    /// call; safe beside the running daemon).
    Status {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The daemon's metrics endpoint (`http://127.0.0.1:9464/metrics`), for the live lag.
        #[arg(long)]
        metrics_url: Option<String>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// What `tables` selects now (names and rules: table, topic, sync mode, stream, or why
    /// a table is skipped), then exit; safe to try a rule with (nothing is read or written).
    Tables {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object a line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// What IAM needs for this config: permission and trust policies.
    #[command(subcommand)]
    Integration(Integration),
}

#[derive(Debug, Subcommand)]
enum Integration {
    /// Print the least-privilege permission policies of this config (no AWS call).
    Policy {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// AWS_MSK_IAM: the cluster's ARN (arn:aws:kafka:REGION:ACCOUNT:cluster/NAME/UUID),
        /// to scope the Kafka statements to it.
        #[arg(long)]
        msk_cluster_arn: Option<String>,
    },
    /// Print the trust policy of each role (principal and external ID).
    TrustPolicy {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The identity that assumes the role (default: the base credentials' own,
        /// from sts:GetCallerIdentity).
        #[arg(long)]
        principal: Option<String>,
        /// Print the deny-all policy to create the role with before the principal is known.
        #[arg(long)]
        placeholder: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Create or update the roles (trust policy, inline policy `dynamodb-cdc`) with your own
    /// (admin) credentials.
    Setup {
        /// The JSON configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The daemon's base identity, which the role must trust (a user or role ARN; an
        /// assumed-role session ARN is turned into its role).
        #[arg(long)]
        principal: String,
        /// AWS profile with the operator's credentials (default: the standard chain).
        #[arg(long)]
        profile: Option<String>,
        /// AWS_MSK_IAM: the cluster's ARN, to scope the Kafka statements to it.
        #[arg(long)]
        msk_cluster_arn: Option<String>,
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

fn init_logging(format: LogFormat) {
    // rskafka logs every connection at INFO; its warnings are what an operator needs.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rskafka=warn"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal);
    match format {
        // On a terminal, snapshots draw progress bars below the log lines.
        LogFormat::Text if terminal => builder
            .with_writer(dynamodb_cdc::telemetry::bars::enable())
            .init(),
        LogFormat::Text => builder.with_writer(std::io::stderr).init(),
        LogFormat::Json => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn integration(runtime: &tokio::runtime::Runtime, command: Integration) -> ExitCode {
    use dynamodb_cdc::error::Error;
    let result = runtime.block_on(async {
        match &command {
            Integration::Policy {
                config,
                format,
                msk_cluster_arn,
            } => integration::policy(config, *format, msk_cluster_arn.as_deref()).await,
            Integration::TrustPolicy {
                config,
                principal,
                placeholder,
                format,
            } => {
                integration::trust_policy(config, principal.as_deref(), *placeholder, *format).await
            }
            Integration::Setup {
                config,
                principal,
                profile,
                msk_cluster_arn,
                dry_run,
                format,
            } => {
                integration::setup(
                    config,
                    principal,
                    profile.as_deref(),
                    msk_cluster_arn.as_deref(),
                    *dry_run,
                    *format,
                )
                .await
            }
        }
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(Error::Config(e)) => {
            eprintln!("dynamodb-cdc: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("dynamodb-cdc: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `status`: the config with `${secretsmanager:...}` left unresolved (no AWS call).
fn status(
    runtime: &tokio::runtime::Runtime,
    path: &std::path::Path,
    metrics_url: Option<&str>,
    json: bool,
) -> ExitCode {
    let result = runtime.block_on(async {
        let text = std::fs::read_to_string(path).map_err(|source| {
            dynamodb_cdc::error::ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        let (config, _) =
            dynamodb_cdc::secrets::load_unresolved(&text, &|v: &str| std::env::var_os(v)).await?;
        let mut tables: Vec<String> = config.tables.iter().map(|t| t.name.clone()).collect();
        // Tables a rule found: those with checkpoints whose name a rule's patterns select.
        tables.extend(dynamodb_cdc::table_discovery::checkpointed_rule_tables(
            &config,
        ));
        dynamodb_cdc::status::status(&config.checkpoint.dir, &tables, metrics_url, json)
            .await
            .map_err(StatusError::Other)
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(StatusError::Config(e)) => {
            eprintln!("dynamodb-cdc: {e}");
            ExitCode::from(2)
        }
        Err(StatusError::Other(e)) => {
            eprintln!("dynamodb-cdc: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why `status` could not report.
#[derive(Debug)]
enum StatusError {
    Config(dynamodb_cdc::error::ConfigError),
    Other(dynamodb_cdc::error::Error),
}

impl From<dynamodb_cdc::error::ConfigError> for StatusError {
    fn from(e: dynamodb_cdc::error::ConfigError) -> Self {
        Self::Config(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let config = match cli.command {
        Command::Integration(command) => return integration(&runtime, command),
        Command::Status {
            ref config,
            ref metrics_url,
            json,
        } => return status(&runtime, config, metrics_url.as_deref(), json),
        Command::Run { ref config }
        | Command::Check { ref config }
        | Command::Tables { ref config, .. }
        | Command::Snapshot { ref config, .. } => config,
    };
    // `${...}` references are resolved here, before anything connects.
    let config = match runtime.block_on(dynamodb_cdc::secrets::load_config(config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dynamodb-cdc: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run { config: path } => {
            init_logging(config.log.format);
            match runtime.block_on(dynamodb_cdc::app::run(config, Some(path))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(dynamodb_cdc::error::Error::Config(e)) => {
                    tracing::error!(error = %e, "dynamodb-cdc cannot start: configuration error");
                    ExitCode::from(2)
                }
                Err(e) => {
                    tracing::error!(error = %e, "dynamodb-cdc stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Snapshot { table, .. } => {
            init_logging(config.log.format);
            match runtime.block_on(dynamodb_cdc::app::snapshot_table(config, &table)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(dynamodb_cdc::error::Error::Config(e)) => {
                    eprintln!("dynamodb-cdc: {e}");
                    ExitCode::from(2)
                }
                Err(dynamodb_cdc::error::Error::Cancelled) => {
                    tracing::warn!(table = %table, "snapshot stopped before it was done; run the command again to resume it");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %e, "snapshot failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Tables { json, .. } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(config.log.format);
            }
            match runtime.block_on(dynamodb_cdc::app::tables(config, json)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dynamodb-cdc: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Integration(_) | Command::Status { .. } => unreachable!("handled above"),
        Command::Check { .. } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(config.log.format);
            }
            if runtime.block_on(dynamodb_cdc::app::check(config)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
