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
use tracing::{debug, error, info, warn};

use crate::aws::{retrying, AwsFailure};
use crate::checkpoint::{CheckpointStore, ShardCheckpoint};
use crate::config::OnTrimmedData;
use crate::convert::{self, Source};
use crate::dead_letter;
use crate::error::{AwsErrorKind, Error};
use crate::kafka::{self, Ack, Reservation, TopicProducer};

mod fast_path;
mod pacing;

use fast_path::{fast_path_client, FastPathConfig, PageSlot};
use pacing::{
    next_limit, IdlePolling, FIRST_PAGE_ESTIMATE_BYTES, FIRST_PAGE_LIMIT, PAGE_TARGET_BYTES,
};

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
    /// What to do when the checkpoint's records were trimmed.
    pub on_trimmed_data: OnTrimmedData,
    /// Where poison records go; `None` means a poison record stops the shard.
    pub dead_letter: Option<TopicProducer>,
    /// Largest record produced; a bigger event is a poison record.
    pub max_message_bytes: usize,
}

/// A page handed to Kafka, waiting for its acknowledgements.
struct PendingPage {
    last_sequence_number: Option<String>,
    acks: Vec<oneshot::Receiver<Ack>>,
    /// The shard ended after this page.
    end: bool,
    /// The page's share of `kafka.max_buffered_bytes`, freed once it is acknowledged.
    reservation: Option<Reservation>,
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
    let fast_page = PageSlot::default();
    let reader = Reader {
        ctx: &ctx,
        streams: fast_path_client(
            &ctx.streams,
            FastPathConfig {
                slot: fast_page.clone(),
                source: ctx.source.clone(),
                tombstones: ctx.tombstones,
                max_message_bytes: ctx.max_message_bytes,
            },
        ),
        fast_page,
        cancel: &stop,
        last_read: match &start {
            StartAt::After(s) => Some(s.clone()),
            _ => None,
        },
        start,
        pending_loss: None,
    }
    .run(tx);
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

/// Why reading stopped early.
type Stop = Result<ShardOutcome, Error>;

/// The reading half's state.
struct Reader<'a> {
    ctx: &'a ShardContext,
    /// `ctx.streams` with the GetRecords fast path installed.
    streams: aws_sdk_dynamodbstreams::Client,
    /// Where the fast path leaves the page it converted.
    fast_page: PageSlot,
    cancel: &'a CancellationToken,
    start: StartAt,
    /// The last sequence number handed to Kafka (or the checkpoint it started after).
    last_read: Option<String>,
    /// A `DATA_LOSS` marker is owed: records after this one were trimmed.
    pending_loss: Option<Option<String>>,
}

impl Reader<'_> {
    fn stop(&self, f: AwsFailure, call: &str) -> Stop {
        match f.kind {
            None => Ok(ShardOutcome::Stopped),
            Some(AwsErrorKind::NotFound) => Ok(ShardOutcome::Gone(f.message)),
            Some(AwsErrorKind::TrimmedData) => Err(shard_error(
                self.ctx,
                self.last_read.as_deref(),
                format!(
                    "{call}: the stream no longer holds the records after the checkpoint \
                     (older than 24 hours): changes were lost before they could be read. \
                     Set on_trimmed_data to \"skip_to_trim_horizon\" to continue from the oldest \
                     record the stream holds, with a DATA_LOSS marker on the topic ({})",
                    f.message
                ),
            )),
            Some(kind) => Err(shard_error(
                self.ctx,
                self.last_read.as_deref(),
                format!("{call} failed ({kind:?}): {}", f.message),
            )),
        }
    }

    /// An iterator at `at`; when that position was trimmed and the policy allows it, an
    /// iterator at TRIM_HORIZON with a `DATA_LOSS` marker owed.
    async fn iterator(&mut self, at: &StartAt) -> Result<String, Stop> {
        match get_iterator(self.ctx, at, self.cancel).await {
            Ok(it) => Ok(it),
            Err(f) if f.kind == Some(AwsErrorKind::TrimmedData) => {
                self.skip_trimmed(f, "GetShardIterator").await
            }
            Err(f) => Err(self.stop(f, "GetShardIterator")),
        }
    }

    async fn skip_trimmed(&mut self, f: AwsFailure, call: &str) -> Result<String, Stop> {
        if self.ctx.on_trimmed_data != OnTrimmedData::SkipToTrimHorizon {
            return Err(self.stop(f, call));
        }
        error!(
            table = %self.ctx.source.table,
            shard_id = %self.ctx.source.shard_id,
            lost_after_sequence_number = self.last_read.as_deref().unwrap_or("none"),
            error = %f.message,
            "DATA LOSS: records were trimmed from the stream before they were read; continuing from TRIM_HORIZON (on_trimmed_data = skip_to_trim_horizon)"
        );
        self.pending_loss = Some(self.last_read.clone());
        match get_iterator(self.ctx, &StartAt::TrimHorizon, self.cancel).await {
            Ok(it) => Ok(it),
            Err(f) => Err(self.stop(f, "GetShardIterator")),
        }
    }

    /// Converts a page into Kafka records; poison records become dead letters or stop the shard.
    async fn convert_page(
        &mut self,
        records: &[aws_sdk_dynamodbstreams::types::Record],
        acks: &mut Vec<oneshot::Receiver<Ack>>,
    ) -> (Vec<rskafka::record::Record>, Option<Error>) {
        let ctx = self.ctx;
        let mut out = Vec::with_capacity(records.len() + records.len() / 8);
        for r in records {
            let seq = r.dynamodb().and_then(|d| d.sequence_number());
            let result = convert::convert(r, &ctx.source, ctx.tombstones)
                .map_err(|e| e.to_string())
                .and_then(
                    |c| match c.records.iter().map(dead_letter::record_size).max() {
                        Some(size) if size > ctx.max_message_bytes => Err(format!(
                            "change event is {size} bytes, over kafka.max_message_bytes ({})",
                            ctx.max_message_bytes
                        )),
                        _ => Ok(c),
                    },
                );
            match result {
                Ok(c) => {
                    self.last_read = Some(c.sequence_number);
                    out.extend(c.records);
                }
                Err(message) => {
                    let Some(dlq) = ctx.dead_letter.as_ref() else {
                        // The records before it are still delivered and checkpointed.
                        let error = shard_error(
                            ctx,
                            seq,
                            format!(
                                "poison record: {message}. Set on_poison_record to \"dead_letter\" \
                                 to write such records to a dead-letter topic and continue"
                            ),
                        );
                        return (out, Some(error));
                    };
                    error!(
                        table = %ctx.source.table,
                        shard_id = %ctx.source.shard_id,
                        sequence_number = seq.unwrap_or("none"),
                        dead_letter_topic = %dlq.topic,
                        error = %message,
                        "poison record sent to the dead-letter topic"
                    );
                    let letter =
                        dead_letter::dead_letter(r, &ctx.source, &message, ctx.max_message_bytes);
                    let partition = kafka::partition_for(
                        letter.key.as_deref().unwrap_or_default(),
                        dlq.partition_count(),
                    );
                    // Records before it in this page go first, so their order holds.
                    for (p, group) in kafka::split_by_partition(
                        std::mem::take(&mut out),
                        ctx.producer.partition_count(),
                    ) {
                        acks.push(ctx.producer.send(p, group).await);
                    }
                    acks.push(dlq.send(partition, vec![letter]).await);
                    if let Some(seq) = seq {
                        self.last_read = Some(seq.to_owned());
                    }
                }
            }
        }
        (out, None)
    }

    /// The marker owed after a trimmed range, on every partition so every consumer sees it.
    async fn send_loss_marker(
        &mut self,
        first_available: Option<&str>,
        acks: &mut Vec<oneshot::Receiver<Ack>>,
    ) {
        if let Some(lost_after) = self.pending_loss.take() {
            let marker = dead_letter::data_loss_marker(
                &self.ctx.source,
                lost_after.as_deref(),
                first_available,
            );
            for p in 0..self.ctx.producer.partition_count() as i32 {
                acks.push(self.ctx.producer.send(p, vec![marker.clone()]).await);
            }
        }
    }

    /// Reads until the shard ends, shutdown, or an error; ends by dropping `tx`.
    async fn run(mut self, tx: mpsc::Sender<PendingPage>) -> Stop {
        let ctx = self.ctx;
        let start = self.start.clone();
        let mut iterator = match self.iterator(&start).await {
            Ok(it) => it,
            Err(stop) => return stop,
        };
        let mut idle = IdlePolling::new(ctx.idle_poll_interval);
        // Memory for the next page, reserved before reading it: the last page's size.
        let mut estimate = FIRST_PAGE_ESTIMATE_BYTES;
        let mut limit = FIRST_PAGE_LIMIT;
        loop {
            let mut reservation = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                r = ctx.producer.budget().reserve(estimate) => Some(r),
            };
            let it = iterator.clone();
            let result = retrying("GetRecords", self.cancel, || {
                self.streams
                    .get_records()
                    .shard_iterator(&it)
                    .limit(limit)
                    .send()
            })
            .await;
            let out = match result {
                Ok(out) => out,
                Err(f) if f.kind == Some(AwsErrorKind::ExpiredIterator) => {
                    // Resume right after the last record handed to Kafka: the records read
                    // before it are queued and will be acknowledged, so nothing is skipped.
                    let resume = self.last_read.clone().map_or(start.clone(), StartAt::After);
                    info!(
                        table = %ctx.source.table,
                        shard_id = %ctx.source.shard_id,
                        after = self.last_read.as_deref().unwrap_or("start"),
                        "shard iterator expired; getting a new one"
                    );
                    iterator = match self.iterator(&resume).await {
                        Ok(it) => it,
                        Err(stop) => return stop,
                    };
                    continue;
                }
                Err(f) if f.kind == Some(AwsErrorKind::TrimmedData) => {
                    iterator = match self.skip_trimmed(f, "GetRecords").await {
                        Ok(it) => it,
                        Err(stop) => return stop,
                    };
                    continue;
                }
                Err(f) => return self.stop(f, "GetRecords"),
            };
            // The fast path converted the page, or the SDK deserialized it for
            // `convert_page` (see `FastPath`).
            let fast = self.fast_page.lock().expect("page slot").take();
            let records = out.records();
            let (count, first) = match &fast {
                Some(page) => (page.stream_records, page.first_sequence_number.clone()),
                None => (
                    records.len(),
                    records
                        .first()
                        .and_then(|r| r.dynamodb())
                        .and_then(|d| d.sequence_number())
                        .map(str::to_owned),
                ),
            };
            let mut acks = Vec::new();
            self.send_loss_marker(first.as_deref(), &mut acks).await;
            let mut poison = None;
            // A full page means a backlog: read on at once.
            let mut full = false;
            if count > 0 {
                let kafka_records = match fast {
                    Some(page) => {
                        if page.last_sequence_number.is_some() {
                            self.last_read = page.last_sequence_number;
                        }
                        page.records
                    }
                    None => {
                        let (kafka_records, stop) = self.convert_page(records, &mut acks).await;
                        poison = stop;
                        kafka_records
                    }
                };
                estimate = kafka_records.iter().map(kafka::buffered_bytes).sum();
                full = count >= limit as usize || estimate >= PAGE_TARGET_BYTES / 2;
                limit = next_limit(estimate, count);
                let count = kafka_records.len();
                if let Some(r) = reservation.as_mut() {
                    r.resize(estimate);
                }
                // Partition order does not matter; within a partition, pages go in order.
                for (partition, group) in
                    kafka::split_by_partition(kafka_records, ctx.producer.partition_count())
                {
                    acks.push(ctx.producer.send(partition, group).await);
                }
                debug!(
                    table = %ctx.source.table,
                    shard_id = %ctx.source.shard_id,
                    records = count,
                    last_sequence_number = self.last_read.as_deref().unwrap_or(""),
                    "page handed to Kafka"
                );
            }
            if !acks.is_empty() {
                let page = PendingPage {
                    last_sequence_number: self.last_read.clone(),
                    acks,
                    end: false,
                    reservation: reservation.take(),
                };
                if tx.send(page).await.is_err() {
                    // The checkpointer stopped on an error; it reports it.
                    return Ok(ShardOutcome::Stopped);
                }
            }
            if let Some(e) = poison {
                return Err(e);
            }
            match out.next_shard_iterator() {
                None => {
                    let _ = tx
                        .send(PendingPage {
                            last_sequence_number: None,
                            acks: Vec::new(),
                            end: true,
                            reservation: None,
                        })
                        .await;
                    return Ok(ShardOutcome::Ended);
                }
                Some(next) => iterator = next.to_owned(),
            }
            drop(reservation);
            if !full {
                let pause = if count > 0 {
                    idle.records()
                } else {
                    estimate = 0;
                    idle.empty_page()
                };
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
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
        // Acknowledged: its memory is free for the next pages of every shard.
        drop(page.reservation);
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
