//! `dynamodb-cdc`: command line, logging, exit codes.
//!
//! Exit status: 0 after a clean shutdown (or when every check passed), 1 when the pipeline
//! failed (or a check failed), 2 for a configuration error (before any network access).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dynamodb_cdc::config::LogFormat;
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
}

fn init_logging(format: LogFormat) {
    // rskafka logs every connection at INFO; its warnings are what an operator needs.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rskafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Run { config } | Command::Check { config }) = &cli.command;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // `${...}` references are resolved here, before anything connects.
    let config = match runtime.block_on(dynamodb_cdc::secrets::load_config(config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dynamodb-cdc: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run { .. } => {
            init_logging(config.log.format);
            match runtime.block_on(dynamodb_cdc::app::run(config)) {
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
