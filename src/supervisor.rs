//! The supervisor: one task per table that discovers its stream, starts a reader per
//! readable shard (lineage order), rescans for new shards, and drains on shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::aws::AwsClients;
use crate::checkpoint::{CheckpointStore, ShardCheckpoint, TableState};
use crate::config::{Config, StartPosition};
use crate::convert::Source;
use crate::discovery::{self, DiscoveryError, ShardInfo};
use crate::error::Error;
use crate::kafka::TopicProducer;
use crate::lineage;
use crate::shard_reader::{self, ShardContext, ShardOutcome, StartAt};

/// Everything a table task needs.
#[derive(Debug, Clone)]
pub struct TableContext {
    /// The table.
    pub table: String,
    /// AWS clients.
    pub aws: AwsClients,
    /// Its topic.
    pub producer: TopicProducer,
    /// Checkpoints.
    pub store: Arc<dyn CheckpointStore>,
    /// The whole configuration.
    pub config: Arc<Config>,
}

fn discovery_error(table: &str, e: DiscoveryError) -> Error {
    Error::Table {
        table: table.to_owned(),
        message: e.to_string(),
    }
}

/// Where a shard without a checkpoint starts: `start_position` only for shards that existed
/// when the pipeline first started; every later shard from TRIM_HORIZON, so that a rollover
/// never skips records.
pub fn start_for(
    shard_id: &str,
    checkpoint: Option<&ShardCheckpoint>,
    state: &TableState,
    start_position: StartPosition,
) -> StartAt {
    if let Some(seq) = checkpoint.and_then(|c| c.sequence_number.clone()) {
        return StartAt::After(seq);
    }
    match start_position {
        StartPosition::Latest if state.initial_shards.iter().any(|s| s == shard_id) => {
            StartAt::Latest
        }
        _ => StartAt::TrimHorizon,
    }
}

/// Runs one table until `cancel` fires (then drains) or a shard fails.
pub async fn run_table(ctx: TableContext, cancel: CancellationToken) -> Result<(), Error> {
    let table = ctx.table.clone();
    let stream = discovery::describe_table(&ctx.aws.dynamodb, &table, &cancel)
        .await
        .map_err(|e| discovery_error(&table, e))?;
    let stream_arn = stream.stream_arn.clone();
    info!(table = %table, stream_arn = %stream_arn, view_type = %stream.view_type, topic = %ctx.producer.topic, "capturing table");

    let mut listing = discovery::list_shards(&ctx.aws.streams, &stream_arn, &cancel)
        .await
        .map_err(|e| discovery_error(&table, e))?;
    let state = match ctx.store.load_table(&table)? {
        Some(s) if s.stream_arn == stream_arn => s,
        previous => {
            let first_start = previous.is_none();
            if let Some(old) = previous {
                warn!(table = %table, old_stream_arn = %old.stream_arn, stream_arn = %stream_arn,
                    "the table has a new stream; reading it from TRIM_HORIZON");
            }
            let s = TableState {
                stream_arn: stream_arn.clone(),
                // Only a brand-new pipeline honours start_position; a replaced stream's
                // shards are all new.
                initial_shards: if first_start {
                    listing.shards.iter().map(|s| s.shard_id.clone()).collect()
                } else {
                    Vec::new()
                },
                created_at_ms: chrono::Utc::now().timestamp_millis(),
            };
            ctx.store.save_table(&table, &s)?;
            s
        }
    };
    let mut checkpoints: HashMap<String, ShardCheckpoint> = ctx
        .store
        .load_shards(&table)?
        .into_iter()
        .filter(|c| c.stream_arn == stream_arn)
        .map(|c| (c.shard_id.clone(), c))
        .collect();
    let mut finished = shard_reader::finished_shards(&checkpoints);

    let reader = &ctx.config.reader;
    let mut rescan = tokio::time::interval(Duration::from_millis(reader.rescan_interval_ms));
    rescan.set_missed_tick_behavior(MissedTickBehavior::Skip);
    rescan.tick().await;
    let mut tasks: JoinSet<(String, Result<ShardOutcome, Error>)> = JoinSet::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut failure: Option<Error> = None;
    let mut need_listing = false;

    loop {
        if need_listing {
            need_listing = false;
            match discovery::list_shards(&ctx.aws.streams, &stream_arn, &cancel).await {
                Ok(l) => listing = l,
                Err(DiscoveryError::Cancelled) => {}
                Err(e) => {
                    failure = Some(discovery_error(&table, e));
                    break;
                }
            }
        }
        if !cancel.is_cancelled() {
            prune(&ctx, &listing.shards, &mut checkpoints);
            for shard in lineage::readable(&listing.shards, &finished, &running) {
                let start = start_for(
                    &shard.shard_id,
                    checkpoints.get(&shard.shard_id),
                    &state,
                    ctx.config.start_position,
                );
                info!(table = %table, shard_id = %shard.shard_id, parent_shard_id = shard.parent_shard_id.as_deref().unwrap_or(""), start = ?start, "starting shard reader");
                let shard_ctx = ShardContext {
                    source: Source {
                        table: table.clone(),
                        stream_arn: stream_arn.clone(),
                        shard_id: shard.shard_id.clone(),
                    },
                    streams: ctx.aws.streams.clone(),
                    producer: ctx.producer.clone(),
                    store: ctx.store.clone(),
                    tombstones: ctx.config.kafka.tombstones,
                    idle_poll_interval: Duration::from_millis(reader.idle_poll_interval_ms),
                    max_inflight_pages: reader.max_inflight_pages.get(),
                    checkpoint_interval: Duration::from_millis(ctx.config.checkpoint.interval_ms),
                };
                let previous = checkpoints.get(&shard.shard_id).cloned();
                let id = shard.shard_id.clone();
                let span = tracing::info_span!("shard", table = %table, shard_id = %id);
                let shard_cancel = cancel.clone();
                running.insert(id.clone());
                tasks.spawn(
                    async move {
                        let r =
                            shard_reader::run_shard(shard_ctx, start, previous, shard_cancel).await;
                        (id, r)
                    }
                    .instrument(span),
                );
            }
        }
        if cancel.is_cancelled() && tasks.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            joined = tasks.join_next(), if !tasks.is_empty() => {
                let (shard_id, result) = match joined.expect("set is not empty") {
                    Ok(r) => r,
                    Err(e) => {
                        failure = Some(Error::Internal(format!("table {table}: a shard task panicked: {e}")));
                        break;
                    }
                };
                running.remove(&shard_id);
                match result {
                    Ok(ShardOutcome::Ended) => {
                        finished.insert(shard_id.clone());
                        checkpoints.insert(shard_id.clone(), ShardCheckpoint {
                            stream_arn: stream_arn.clone(),
                            shard_id,
                            sequence_number: None,
                            ended: true,
                            updated_at_ms: chrono::Utc::now().timestamp_millis(),
                        });
                        // Its children may be listed now.
                        need_listing = true;
                    }
                    Ok(ShardOutcome::Stopped) => {}
                    Ok(ShardOutcome::Gone(message)) => {
                        failure = Some(Error::Table {
                            table: table.clone(),
                            message: format!(
                                "stream {stream_arn} or shard {shard_id} no longer exists \
                                 (table deleted or stream disabled): {message}"
                            ),
                        });
                        break;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            _ = rescan.tick(), if !cancel.is_cancelled() => need_listing = true,
            _ = cancel.cancelled(), if !cancel.is_cancelled() => {
                info!(table = %table, shards = tasks.len(), "stopping: draining shard readers");
            }
        }
    }
    if let Some(e) = failure {
        error!(table = %table, error = %e, "table stopped");
        // The others stop at their last acknowledged record.
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
        return Err(e);
    }
    Ok(())
}

/// Forgets ended shards the stream no longer lists (trimmed after 24 h): they cannot block
/// a child any more.
fn prune(
    ctx: &TableContext,
    listing: &[ShardInfo],
    checkpoints: &mut HashMap<String, ShardCheckpoint>,
) {
    let listed: HashSet<&str> = listing.iter().map(|s| s.shard_id.as_str()).collect();
    let gone: Vec<String> = checkpoints
        .values()
        .filter(|c| c.ended && !listed.contains(c.shard_id.as_str()))
        .map(|c| c.shard_id.clone())
        .collect();
    for id in gone {
        match ctx.store.remove_shard(&ctx.table, &id) {
            Ok(()) => {
                checkpoints.remove(&id);
            }
            Err(e) => {
                warn!(table = %ctx.table, shard_id = %id, error = %e, "cannot remove an old checkpoint")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TableState {
        TableState {
            stream_arn: "s".into(),
            initial_shards: vec!["old".into()],
            created_at_ms: 0,
        }
    }

    #[test]
    fn latest_applies_only_to_initial_shards_without_checkpoint() {
        let cp = ShardCheckpoint {
            stream_arn: "s".into(),
            shard_id: "old".into(),
            sequence_number: Some("42".into()),
            ended: false,
            updated_at_ms: 0,
        };
        let st = state();
        assert_eq!(
            start_for("old", None, &st, StartPosition::Latest),
            StartAt::Latest
        );
        assert_eq!(
            start_for("new", None, &st, StartPosition::Latest),
            StartAt::TrimHorizon
        );
        assert_eq!(
            start_for("old", None, &st, StartPosition::TrimHorizon),
            StartAt::TrimHorizon
        );
        assert_eq!(
            start_for("old", Some(&cp), &st, StartPosition::Latest),
            StartAt::After("42".into())
        );
    }
}
