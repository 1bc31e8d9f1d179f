//! One task per shard: iterator, GetRecords loop, conversion, hand-off to the partition
//! producers, and the checkpointer that moves the shard's position only over what Kafka
//! acknowledged.
//!
//! ```text
//! reader:       GetShardIterator ─▶ GetRecords ─▶ convert ─▶ partition queues ─┐
//!                      ▲ expired: new iterator after the last record read      │ page acks
//! checkpointer: ◀── pages in order (bounded: reader.max_inflight_pages) ◀──────┘
//!               all acks of a page in ─▶ position = page's last sequence number ─▶ file
//! ```
//!
//! The next GetRecords runs while earlier pages are still being produced; at most
//! `max_inflight_pages` pages wait for acknowledgement, which bounds memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::aws::{retrying, AwsFailure};
use crate::checkpoint::{CheckpointStore, ShardCheckpoint};
use crate::convert::{self, Source};
use crate::error::{AwsErrorKind, Error};
use crate::kafka::{self, Ack, TopicProducer};

/// Most records one GetRecords call returns.
pub const GET_RECORDS_LIMIT: i32 = 1000;

/// Where a shard starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Right after this sequence number (the checkpoint).
    After(String),
    /// The oldest record the shard holds.
    TrimHorizon,
    /// Only records added from now on.
    Latest,
}

/// How a shard task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOutcome {
    /// The shard is closed and everything in it was acknowledged and checkpointed.
    Ended,
    /// Shutdown: everything read was acknowledged and checkpointed.
    Stopped,
    /// The stream or shard no longer exists (table deleted, stream disabled).
    Gone(String),
}

/// What a shard task needs.
#[derive(Debug, Clone)]
pub struct ShardContext {
    /// Names put into every event.
    pub source: Source,
    /// DynamoDB Streams.
    pub streams: aws_sdk_dynamodbstreams::Client,
    /// The table's topic.
    pub producer: TopicProducer,
    /// Checkpoints.
    pub store: Arc<dyn CheckpointStore>,
    /// Produce a tombstone after each REMOVE.
    pub tombstones: bool,
    /// Longest pause between polls of an idle shard.
    pub idle_poll_interval: Duration,
    /// Pages that may wait for acknowledgement at once.
    pub max_inflight_pages: usize,
    /// Shortest time between two checkpoint writes of a shard while records flow.
    pub checkpoint_interval: Duration,
}

/// A page handed to Kafka, waiting for its acknowledgements.
struct PendingPage {
    last_sequence_number: Option<String>,
    acks: Vec<oneshot::Receiver<Ack>>,
    /// The shard ended after this page.
    end: bool,
}

/// Reads one shard until it ends, its stream disappears, an error stops it, or `cancel`
/// fires; returns once everything read was acknowledged and checkpointed.
pub async fn run_shard(
    ctx: ShardContext,
    start: StartAt,
    previous: Option<ShardCheckpoint>,
    cancel: CancellationToken,
) -> Result<ShardOutcome, Error> {
    // Stops the reader when the checkpointer fails.
    let stop = cancel.child_token();
    let (tx, rx) = mpsc::channel(ctx.max_inflight_pages);
    let reader = read(&ctx, start, tx, &stop);
    let checkpointer = checkpoint(&ctx, previous, rx, &stop);
    let (read_result, checkpoint_result) = tokio::join!(reader, checkpointer);
    checkpoint_result?;
    read_result
}

fn shard_error(ctx: &ShardContext, sequence_number: Option<&str>, message: String) -> Error {
    Error::Shard {
        table: ctx.source.table.clone(),
        shard_id: ctx.source.shard_id.clone(),
        sequence_number: sequence_number.map(str::to_owned),
        message,
    }
}

async fn get_iterator(
    ctx: &ShardContext,
    start: &StartAt,
    cancel: &CancellationToken,
) -> Result<String, AwsFailure> {
    let (kind, seq) = match start {
        StartAt::After(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
        StartAt::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
        StartAt::Latest => (ShardIteratorType::Latest, None),
    };
    let out = retrying("GetShardIterator", cancel, || {
        ctx.streams
            .get_shard_iterator()
            .stream_arn(&ctx.source.stream_arn)
            .shard_id(&ctx.source.shard_id)
            .shard_iterator_type(kind.clone())
            .set_sequence_number(seq.clone())
            .send()
    })
    .await?;
    out.shard_iterator.ok_or_else(|| AwsFailure {
        kind: Some(AwsErrorKind::Fatal),
        message: "GetShardIterator returned no iterator".into(),
    })
}

/// The reading half: ends by dropping `tx`.
async fn read(
    ctx: &ShardContext,
    start: StartAt,
    tx: mpsc::Sender<PendingPage>,
    cancel: &CancellationToken,
) -> Result<ShardOutcome, Error> {
    let mut last_read: Option<String> = match &start {
        StartAt::After(s) => Some(s.clone()),
        _ => None,
    };
    let failure =
        |f: AwsFailure, last: &Option<String>, call: &str| -> Result<ShardOutcome, Error> {
            match f.kind {
                None => Ok(ShardOutcome::Stopped),
                Some(AwsErrorKind::NotFound) => Ok(ShardOutcome::Gone(f.message)),
                Some(AwsErrorKind::TrimmedData) => Err(shard_error(
                    ctx,
                    last.as_deref(),
                    format!(
                        "{call}: the stream no longer holds the records after the checkpoint \
                     (older than 24 hours): changes were lost before they could be read. \
                     Move the shard's checkpoint file away to restart it at TRIM_HORIZON. ({})",
                        f.message
                    ),
                )),
                Some(kind) => Err(shard_error(
                    ctx,
                    last.as_deref(),
                    format!("{call} failed ({kind:?}): {}", f.message),
                )),
            }
        };
    let mut iterator = match get_iterator(ctx, &start, cancel).await {
        Ok(it) => it,
        Err(f) => return failure(f, &last_read, "GetShardIterator"),
    };
    let idle_floor = (ctx.idle_poll_interval / 8).max(Duration::from_millis(1));
    let mut idle = idle_floor;
    loop {
        if cancel.is_cancelled() {
            return Ok(ShardOutcome::Stopped);
        }
        let it = iterator.clone();
        let result = retrying("GetRecords", cancel, || {
            ctx.streams
                .get_records()
                .shard_iterator(&it)
                .limit(GET_RECORDS_LIMIT)
                .send()
        })
        .await;
        let out = match result {
            Ok(out) => out,
            Err(f) if f.kind == Some(AwsErrorKind::ExpiredIterator) => {
                // Resume right after the last record handed to Kafka: the records read
                // before it are queued and will be acknowledged, so nothing is skipped.
                let resume = last_read.clone().map_or(start.clone(), StartAt::After);
                info!(
                    table = %ctx.source.table,
                    shard_id = %ctx.source.shard_id,
                    after = last_read.as_deref().unwrap_or("start"),
                    "shard iterator expired; getting a new one"
                );
                iterator = match get_iterator(ctx, &resume, cancel).await {
                    Ok(it) => it,
                    Err(f) => return failure(f, &last_read, "GetShardIterator"),
                };
                continue;
            }
            Err(f) => return failure(f, &last_read, "GetRecords"),
        };
        let records = out.records();
        if !records.is_empty() {
            idle = idle_floor;
            let mut kafka_records = Vec::with_capacity(records.len() + records.len() / 8);
            for r in records {
                let converted =
                    convert::convert(r, &ctx.source, ctx.tombstones).map_err(|source| {
                        Error::Convert {
                            table: ctx.source.table.clone(),
                            shard_id: ctx.source.shard_id.clone(),
                            sequence_number: r
                                .dynamodb()
                                .and_then(|d| d.sequence_number())
                                .map(str::to_owned),
                            source,
                        }
                    })?;
                last_read = Some(converted.sequence_number);
                kafka_records.extend(converted.records);
            }
            let count = kafka_records.len();
            let groups = kafka::split_by_partition(kafka_records, ctx.producer.partition_count());
            let mut acks = Vec::with_capacity(groups.len());
            // Partition order does not matter; within a partition, pages go in order.
            for (partition, group) in groups {
                acks.push(ctx.producer.send(partition, group).await);
            }
            debug!(
                table = %ctx.source.table,
                shard_id = %ctx.source.shard_id,
                records = count,
                last_sequence_number = last_read.as_deref().unwrap_or(""),
                "page handed to Kafka"
            );
            let page = PendingPage {
                last_sequence_number: last_read.clone(),
                acks,
                end: false,
            };
            if tx.send(page).await.is_err() {
                // The checkpointer stopped on an error; it reports it.
                return Ok(ShardOutcome::Stopped);
            }
        }
        match out.next_shard_iterator() {
            None => {
                let _ = tx
                    .send(PendingPage {
                        last_sequence_number: None,
                        acks: Vec::new(),
                        end: true,
                    })
                    .await;
                return Ok(ShardOutcome::Ended);
            }
            Some(next) => iterator = next.to_owned(),
        }
        if records.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                _ = tokio::time::sleep(idle) => {}
            }
            idle = (idle * 2).min(ctx.idle_poll_interval);
        }
    }
}

/// The checkpointing half: waits for each page's acknowledgements in order and writes the
/// position (at most every `checkpoint_interval` while records flow, and at the end).
async fn checkpoint(
    ctx: &ShardContext,
    previous: Option<ShardCheckpoint>,
    mut rx: mpsc::Receiver<PendingPage>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let mut position = previous.and_then(|c| c.sequence_number);
    let mut dirty = false;
    let mut last_write = Instant::now();
    let save = |position: &Option<String>, ended: bool| {
        ctx.store.save_shard(
            &ctx.source.table,
            &ShardCheckpoint {
                stream_arn: ctx.source.stream_arn.clone(),
                shard_id: ctx.source.shard_id.clone(),
                sequence_number: position.clone(),
                ended,
                updated_at_ms: chrono::Utc::now().timestamp_millis(),
            },
        )
    };
    loop {
        let flush_at = last_write + ctx.checkpoint_interval;
        let page = tokio::select! {
            page = rx.recv() => page,
            _ = tokio::time::sleep_until(flush_at.into()), if dirty => {
                save(&position, false)?;
                dirty = false;
                last_write = Instant::now();
                continue;
            }
        };
        let Some(page) = page else { break };
        for ack in page.acks {
            let result: Result<(), Error> = match ack.await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Internal("a partition producer stopped".into())),
            };
            if let Err(e) = result {
                stop.cancel();
                // Keep what was acknowledged before the failed page.
                if dirty {
                    save(&position, false)?;
                }
                warn!(
                    table = %ctx.source.table,
                    shard_id = %ctx.source.shard_id,
                    checkpoint = position.as_deref().unwrap_or("none"),
                    error = %e,
                    "produce failed; shard stops at its last acknowledged record"
                );
                return Err(shard_error(ctx, position.as_deref(), e.to_string()));
            }
        }
        if page.end {
            save(&position, true)?;
            info!(
                table = %ctx.source.table,
                shard_id = %ctx.source.shard_id,
                last_sequence_number = position.as_deref().unwrap_or("none"),
                "shard ended and fully checkpointed"
            );
            return Ok(());
        }
        if let Some(seq) = page.last_sequence_number {
            position = Some(seq);
            dirty = true;
        }
        if dirty && last_write.elapsed() >= ctx.checkpoint_interval {
            save(&position, false)?;
            dirty = false;
            last_write = Instant::now();
        }
    }
    if dirty {
        save(&position, false)?;
    }
    Ok(())
}

/// Shard ids of a listing that are finished, from checkpoints.
pub fn finished_shards(
    checkpoints: &HashMap<String, ShardCheckpoint>,
) -> std::collections::HashSet<String> {
    checkpoints
        .values()
        .filter(|c| c.ended)
        .map(|c| c.shard_id.clone())
        .collect()
}
