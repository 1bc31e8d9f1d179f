//! The supervisor: one task per table that discovers its stream, starts a reader per
//! readable shard (lineage order), rescans for new shards, and drains on shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::aws::AwsClients;
use crate::budget::Budget;
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
    /// Pipeline memory, shared by every table.
    pub budget: Budget,
    /// Checkpoints.
    pub store: Arc<dyn CheckpointStore>,
    /// The whole configuration.
    pub config: Arc<Config>,
    /// The dead-letter topic, when `on_poison_record` is `dead_letter`.
    pub dead_letter: Option<TopicProducer>,
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

/// What the table task knows about the stream it reads.
struct StreamRun {
    stream_arn: String,
    state: TableState,
    listing: Vec<ShardInfo>,
    checkpoints: HashMap<String, ShardCheckpoint>,
    finished: HashSet<String>,
    /// Shards the stream no longer has (ResourceNotFound): nothing more to read there.
    gone: HashSet<String>,
}

impl StreamRun {
    /// Loads (or starts) the pipeline state of `stream_arn`. `first_start` marks a brand-new
    /// pipeline, the only case where `start_position` applies.
    async fn open(
        ctx: &TableContext,
        stream_arn: String,
        cancel: &CancellationToken,
    ) -> Result<Self, Error> {
        let table = &ctx.table;
        let listing = discovery::list_shards(&ctx.aws.streams, &stream_arn, cancel)
            .await
            .map_err(|e| discovery_error(table, e))?;
        let state = match ctx.store.load_table(table)? {
            Some(s) if s.stream_arn == stream_arn => s,
            previous => {
                if let Some(old) = &previous {
                    warn!(table = %table, old_stream_arn = %old.stream_arn, stream_arn = %stream_arn,
                        "the table has a new stream; reading it from TRIM_HORIZON");
                }
                let s = TableState {
                    stream_arn: stream_arn.clone(),
                    // Only a brand-new pipeline honours start_position; a replaced
                    // stream's shards are all new.
                    initial_shards: if previous.is_none() {
                        listing.shards.iter().map(|s| s.shard_id.clone()).collect()
                    } else {
                        Vec::new()
                    },
                    created_at_ms: chrono::Utc::now().timestamp_millis(),
                };
                ctx.store.save_table(table, &s)?;
                s
            }
        };
        let checkpoints: HashMap<String, ShardCheckpoint> = ctx
            .store
            .load_shards(table)?
            .into_iter()
            .filter(|c| c.stream_arn == stream_arn)
            .map(|c| (c.shard_id.clone(), c))
            .collect();
        let finished = shard_reader::finished_shards(&checkpoints);
        Ok(Self {
            stream_arn,
            state,
            listing: listing.shards,
            checkpoints,
            finished,
            gone: HashSet::new(),
        })
    }

    /// Every listed shard ended or is gone: nothing more to read on this stream.
    fn drained(&self) -> bool {
        self.listing
            .iter()
            .all(|s| self.finished.contains(&s.shard_id) || self.gone.contains(&s.shard_id))
    }
}

/// What DescribeTable said at the last rescan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TableStatus {
    /// The table's current stream.
    Stream(String),
    /// The table has no enabled stream.
    NoStream,
    /// The table does not exist.
    Deleted,
}

async fn table_status(
    ctx: &TableContext,
    cancel: &CancellationToken,
) -> Result<TableStatus, Error> {
    match discovery::describe_table(&ctx.aws.dynamodb, &ctx.table, cancel).await {
        Ok(s) => Ok(TableStatus::Stream(s.stream_arn)),
        Err(DiscoveryError::NoStream { .. }) => Ok(TableStatus::NoStream),
        Err(DiscoveryError::TableNotFound { .. }) => Ok(TableStatus::Deleted),
        Err(e) => Err(discovery_error(&ctx.table, e)),
    }
}

/// Runs one table until `cancel` fires (then drains) or a shard fails.
///
/// When the stream goes away (stream disabled, table deleted), the readers finish what the
/// stream still holds; then a new stream of the table is read from TRIM_HORIZON, a table
/// without a stream is waited for (WARN each rescan), and a deleted table stops with an
/// error.
pub async fn run_table(ctx: TableContext, cancel: CancellationToken) -> Result<(), Error> {
    let table = ctx.table.clone();
    let stream = discovery::describe_table(&ctx.aws.dynamodb, &table, &cancel)
        .await
        .map_err(|e| discovery_error(&table, e))?;
    info!(table = %table, stream_arn = %stream.stream_arn, view_type = %stream.view_type, topic = %ctx.producer.topic, "capturing table");
    let mut run = StreamRun::open(&ctx, stream.stream_arn, &cancel).await?;
    let mut status = TableStatus::Stream(run.stream_arn.clone());

    let reader = &ctx.config.reader;
    let mut rescan = tokio::time::interval(Duration::from_millis(reader.rescan_interval_ms));
    rescan.set_missed_tick_behavior(MissedTickBehavior::Skip);
    rescan.tick().await;
    let mut tasks: JoinSet<(String, Result<ShardOutcome, Error>)> = JoinSet::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut failure: Option<Error> = None;
    let mut need_listing = false;

    loop {
        if need_listing && !cancel.is_cancelled() {
            need_listing = false;
            match discovery::list_shards(&ctx.aws.streams, &run.stream_arn, &cancel).await {
                Ok(l) => run.listing = l.shards,
                Err(DiscoveryError::Cancelled) => {}
                Err(DiscoveryError::StreamNotFound { message, .. }) => {
                    warn!(table = %table, stream_arn = %run.stream_arn, error = %message, "stream no longer exists");
                    run.gone
                        .extend(run.listing.iter().map(|s| s.shard_id.clone()));
                }
                Err(e) => {
                    failure = Some(discovery_error(&table, e));
                    break;
                }
            }
            match table_status(&ctx, &cancel).await {
                Ok(s) => status = s,
                Err(e) if cancel.is_cancelled() => debug!(error = %e, "describe table cancelled"),
                Err(e) => {
                    warn!(table = %table, error = %e, "DescribeTable failed; trying again at the next rescan")
                }
            }
        }
        if !cancel.is_cancelled()
            && running.is_empty()
            && run.drained()
            && status != TableStatus::Stream(run.stream_arn.clone())
        {
            match &status {
                TableStatus::Stream(new_arn) => {
                    info!(table = %table, old_stream_arn = %run.stream_arn, stream_arn = %new_arn, "old stream read to its end; switching to the table's new stream");
                    run = match StreamRun::open(&ctx, new_arn.clone(), &cancel).await {
                        Ok(r) => r,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    };
                    continue;
                }
                TableStatus::NoStream => warn!(
                    table = %table,
                    stream_arn = %run.stream_arn,
                    "the table's stream is disabled and was read to its end; waiting for a stream to be enabled"
                ),
                TableStatus::Deleted => {
                    failure = Some(Error::Table {
                        table: table.clone(),
                        message: format!(
                            "the table was deleted; its stream {} was read to its end. Remove the table from the config",
                            run.stream_arn
                        ),
                    });
                    break;
                }
            }
        }
        if !cancel.is_cancelled() {
            prune(&ctx, &run.listing, &mut run.checkpoints);
            let readable: Vec<ShardInfo> = lineage::readable(&run.listing, &run.finished, &running)
                .into_iter()
                .filter(|s| !run.gone.contains(&s.shard_id))
                .cloned()
                .collect();
            for shard in readable {
                let id = shard.shard_id.clone();
                let start = start_for(
                    &id,
                    run.checkpoints.get(&id),
                    &run.state,
                    ctx.config.start_position,
                );
                info!(table = %table, shard_id = %id, parent_shard_id = shard.parent_shard_id.as_deref().unwrap_or(""), start = ?start, "starting shard reader");
                let shard_ctx = ShardContext {
                    source: Source {
                        table: table.clone(),
                        stream_arn: run.stream_arn.clone(),
                        shard_id: id.clone(),
                    },
                    streams: ctx.aws.streams.clone(),
                    producer: ctx.producer.clone(),
                    budget: ctx.budget.clone(),
                    pipeline_started_ms: run.state.created_at_ms,
                    store: ctx.store.clone(),
                    tombstones: ctx.config.kafka.tombstones,
                    idle_poll_interval: Duration::from_millis(reader.idle_poll_interval_ms),
                    max_inflight_pages: reader.max_inflight_pages.get(),
                    checkpoint_interval: Duration::from_millis(ctx.config.checkpoint.interval_ms),
                    on_trimmed_data: ctx.config.on_trimmed_data,
                    dead_letter: ctx.dead_letter.clone(),
                    max_message_bytes: ctx.config.kafka.max_message_bytes.get(),
                };
                let previous = run.checkpoints.get(&id).cloned();
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
                        run.finished.insert(shard_id.clone());
                        run.checkpoints.insert(shard_id.clone(), ShardCheckpoint {
                            stream_arn: run.stream_arn.clone(),
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
                        warn!(table = %table, shard_id = %shard_id, stream_arn = %run.stream_arn, error = %message,
                            "shard or stream no longer exists (stream disabled or table deleted)");
                        run.gone.insert(shard_id);
                        need_listing = true;
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
