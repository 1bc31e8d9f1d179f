//! The two commands: `run` wires config -> credentials -> Kafka -> one supervisor per table
//! and owns shutdown; `check` reaches every dependency once and reports.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::aws;
use crate::checkpoint::{CheckpointStore, FileStore};
use crate::config::{Config, OnPoisonRecord};
use crate::discovery;
use crate::error::Error;
use crate::kafka::Kafka;
use crate::supervisor::{self, TableContext};

/// Cancels `soft` on the first SIGTERM/SIGINT and `hard` on the second.
fn watch_signals(soft: CancellationToken, hard: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        for round in 0.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if round == 0 {
                info!(
                    signal = name,
                    "shutting down: finishing in-flight records and writing checkpoints"
                );
                soft.cancel();
            } else {
                warn!(
                    signal = name,
                    "second signal: stopping without waiting for Kafka"
                );
                hard.cancel();
            }
        }
    });
}

/// Runs the pipeline until a signal (then drains within `shutdown_timeout_ms`) or a failure.
pub async fn run(config: Config) -> Result<(), Error> {
    let cancel = CancellationToken::new();
    let hard = CancellationToken::new();
    watch_signals(cancel.clone(), hard.clone());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        tables = config.tables.len(),
        checkpoint_dir = %config.checkpoint.dir.display(),
        "starting dynamodb-cdc"
    );
    let started = start(config, cancel.clone(), hard.clone()).await;
    let mut tables = match started {
        Ok(t) => t,
        // A signal during start-up is a clean stop, not a failure.
        Err(_) if cancel.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    let config_deadline = tables.1;
    let mut failure: Option<Error> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let sleep_until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
        tokio::select! {
            joined = tables.0.join_next() => {
                let Some(joined) = joined else { break };
                let result = joined.unwrap_or_else(|e| Err(Error::Internal(format!("a table task panicked: {e}"))));
                if let Err(e) = result {
                    if failure.is_none() {
                        error!(error = %e, "pipeline failed; stopping the other tables at their last acknowledged record");
                        failure = Some(e);
                    }
                    cancel.cancel();
                }
            }
            _ = cancel.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + config_deadline);
            }
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                error!(timeout_ms = config_deadline.as_millis() as u64, "shutdown deadline passed: stopping without waiting for Kafka; unacknowledged records will be read again after a restart");
                hard.cancel();
                tables.0.abort_all();
                return Err(failure.unwrap_or_else(|| Error::Internal("shutdown deadline passed".into())));
            }
            _ = hard.cancelled() => {
                tables.0.abort_all();
                return Err(failure.unwrap_or_else(|| Error::Internal("stopped by a second signal".into())));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            info!("stopped cleanly; every record read was acknowledged and checkpointed");
            Ok(())
        }
    }
}

type Tables = (JoinSet<Result<(), Error>>, Duration);

async fn start(
    config: Config,
    cancel: CancellationToken,
    hard: CancellationToken,
) -> Result<Tables, Error> {
    let config = Arc::new(config);
    let store: Arc<dyn CheckpointStore> = Arc::new(FileStore::open(&config.checkpoint.dir)?);
    let aws = aws::connect(&config.aws, &cancel).await?;
    let kafka = Kafka::connect(&config.kafka, &cancel, hard).await?;
    let dead_letter = match config.on_poison_record {
        OnPoisonRecord::Fail => None,
        OnPoisonRecord::DeadLetter => {
            let topic = config.dead_letter_topic();
            let partitions = kafka.ensure_topic(&topic, &cancel).await?;
            Some(kafka.topic_producer(&topic, partitions))
        }
    };
    let mut set = JoinSet::new();
    for table in &config.tables {
        let topic = config.topic_for(table);
        let partitions = kafka.ensure_topic(&topic, &cancel).await?;
        let ctx = TableContext {
            table: table.name.clone(),
            aws: aws.clone(),
            producer: kafka.topic_producer(&topic, partitions),
            store: store.clone(),
            config: config.clone(),
            dead_letter: dead_letter.clone(),
        };
        set.spawn(supervisor::run_table(ctx, cancel.clone()));
    }
    Ok((set, Duration::from_millis(config.shutdown_timeout_ms)))
}

/// Checks the config's dependencies, printing one line per check; true when all pass.
pub async fn check(config: Config) -> bool {
    let mut ok = true;
    let mut report = |passed: bool, what: String| {
        ok &= passed;
        println!("{} {what}", if passed { "OK  " } else { "FAIL" });
    };
    report(true, format!("config: {} table(s)", config.tables.len()));
    match FileStore::open(&config.checkpoint.dir) {
        Ok(_) => report(
            true,
            format!(
                "checkpoint dir {} is writable",
                config.checkpoint.dir.display()
            ),
        ),
        Err(Error::CheckpointInUse { path }) => report(
            true,
            format!(
                "checkpoint dir {} is in use by a running dynamodb-cdc",
                path.display()
            ),
        ),
        Err(e) => report(false, format!("checkpoint dir: {e}")),
    }
    // Every network check gives up after this long instead of retrying forever.
    let limit = Duration::from_millis(config.aws.request_timeout_ms.max(5_000));
    let cancel = CancellationToken::new();
    let timer = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit * 2).await;
            cancel.cancel();
        })
    };
    let aws = match aws::connect(&config.aws, &cancel).await {
        Ok(a) => {
            match (&config.aws.assume_role, &a.role) {
                (Some(r), Some(creds)) => {
                    let expiry = creds
                        .current()
                        .expiry()
                        .map(|e| chrono::DateTime::<chrono::Utc>::from(e).to_rfc3339())
                        .unwrap_or_default();
                    report(
                        true,
                        format!("assume role {} (session expires {expiry})", r.role_arn),
                    );
                }
                _ => report(
                    true,
                    "AWS credentials: default chain (no assume_role)".into(),
                ),
            }
            Some(a)
        }
        Err(e) => {
            report(false, e.to_string());
            None
        }
    };
    if let Some(aws) = &aws {
        for table in &config.tables {
            let result = async {
                let s = discovery::describe_table(&aws.dynamodb, &table.name, &cancel).await?;
                let l = discovery::list_shards(&aws.streams, &s.stream_arn, &cancel).await?;
                Ok::<_, discovery::DiscoveryError>((s, l))
            }
            .await;
            match result {
                Ok((s, l)) => report(
                    true,
                    format!(
                        "table {}: stream {} ({}, {}), {} shard(s)",
                        table.name,
                        s.stream_arn,
                        s.view_type,
                        l.status,
                        l.shards.len()
                    ),
                ),
                Err(discovery::DiscoveryError::Cancelled) => report(
                    false,
                    format!(
                        "table {}: no answer within {} s",
                        table.name,
                        (limit * 2).as_secs()
                    ),
                ),
                Err(e) => report(false, format!("table {}: {e}", table.name)),
            }
        }
    }
    match Kafka::connect_once(&config.kafka).await {
        Ok(client) => {
            report(
                true,
                format!("kafka {}", config.kafka.bootstrap_servers.join(",")),
            );
            let topics = client.list_topics().await;
            for table in &config.tables {
                let topic = config.topic_for(table);
                match &topics {
                    Err(e) => report(false, format!("topic {topic}: cannot list topics: {e}")),
                    Ok(list) => match list.iter().find(|t| t.name == topic) {
                        Some(t) => report(
                            true,
                            format!("topic {topic}: {} partition(s)", t.partitions.len()),
                        ),
                        None => match config.kafka.create_topics {
                            Some(ct) => report(
                                true,
                                format!(
                                    "topic {topic}: missing; will be created with {} partition(s)",
                                    ct.partitions
                                ),
                            ),
                            None => report(
                                false,
                                format!(
                                    "topic {topic}: missing; create it or set kafka.create_topics"
                                ),
                            ),
                        },
                    },
                }
            }
        }
        Err(e) => report(false, e.to_string()),
    }
    timer.abort();
    cancel.cancel();
    ok
}
