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
use crate::budget::{self, Budget, Reservation, RECORD_OVERHEAD_BYTES};
use crate::checkpoint::{CheckpointStore, ShardCheckpoint};
use crate::config::OnTrimmedData;
use crate::convert::{self, Source};
use crate::dead_letter;
use crate::error::{AwsErrorKind, Error};
use crate::kafka::{self, Ack, TopicProducer};
use crate::retry::Backoff;

mod fast_path;
mod lean;
mod pacing;

use fast_path::{fast_path_client, FastPathConfig, PageSlot};
use lean::LeanGetRecords;
use pacing::{
    next_limit, CallAllowance, IdlePolling, FIRST_PAGE_ESTIMATE_BYTES, FIRST_PAGE_LIMIT,
    PAGE_TARGET_BYTES,
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
    /// The oldest record the shard holds, skipping records created before this moment
    /// (milliseconds since the epoch; records carry whole seconds, so a record of the same
    /// second is kept): `latest` for a pipeline that already started, without a gap.
    CreatedSince(i64),
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
    /// Records after the checkpoint were trimmed; the `DATA_LOSS` marker was acknowledged
    /// and the table is to be loaded again (`on_trimmed_data: resnapshot`).
    Trimmed,
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
    /// Pipeline memory, shared by every shard.
    pub budget: Budget,
    /// When the pipeline first started on this stream (ms since the epoch): a shard that
    /// started at LATEST and loses its iterator before reading anything resumes from
    /// TRIM_HORIZON, skipping records created before this.
    pub pipeline_started_ms: i64,
    /// Checkpoints.
    pub store: Arc<dyn CheckpointStore>,
    /// Produce a tombstone after each REMOVE.
    pub tombstones: bool,
    /// GetRecords calls the shard may start per second (`reader.max_calls_per_second_per_shard`).
    pub max_calls_per_second: f64,
    /// How GetRecords is sent (`reader.get_records_client`).
    pub get_records_client: crate::config::GetRecordsClient,
    /// First pause after an empty page (`reader.idle_poll_interval_ms`).
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
    /// Told when the reader reached the end of what the shard holds (a stream phase between
    /// two scan phases of a long snapshot ends once every reader did).
    pub at_tip: Option<Arc<AtTip>>,
    /// Records created before this (ms since the epoch) are read but not produced, also
    /// when the shard resumes from a checkpoint ([`crate::supervisor::skip_before_for`]).
    pub skip_created_before_ms: Option<i64>,
}

/// Empty pages in a row after which a shard counts as read up to now (DynamoDB Streams may
/// answer an empty page before later records, rarely twice).
pub const TIP_EMPTY_PAGES: u32 = 3;

/// Which shards of a table were read up to now: each reader adds itself after
/// [`TIP_EMPTY_PAGES`] empty pages in a row, or when its shard ended.
#[derive(Debug, Default)]
pub struct AtTip {
    shards: std::sync::Mutex<std::collections::HashSet<String>>,
    notify: tokio::sync::Notify,
}

impl AtTip {
    fn reached(&self, shard_id: &str) {
        let new = self
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard_id.to_owned());
        if new {
            // One waiter (the table task); a permit is kept when it is not waiting yet.
            self.notify.notify_one();
        }
    }

    /// Every shard of `shards` reached its tip.
    pub fn all(&self, shards: &std::collections::HashSet<String>) -> bool {
        let at = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        shards.iter().all(|s| at.contains(s))
    }

    /// Waits until a shard reaches its tip.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// A page handed to Kafka, waiting for its acknowledgements.
struct PendingPage {
    last_sequence_number: Option<String>,
    acks: Vec<oneshot::Receiver<Ack>>,
    /// The shard ended after this page.
    end: bool,
    /// The page's share of `kafka.max_buffered_bytes`, freed once it is acknowledged.
    reservation: Option<Reservation>,
    /// Changes (stream records produced) it holds, for `dynamodb_cdc_changes_total`.
    changes: u64,
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
    let progress = crate::telemetry::get().shard(&ctx.source.table, &ctx.source.shard_id);
    let (tx, rx) = mpsc::channel(ctx.max_inflight_pages);
    let fast_page = PageSlot::default();
    let fast_config = || FastPathConfig {
        slot: fast_page.clone(),
        source: ctx.source.clone(),
        tombstones: ctx.tombstones,
        max_message_bytes: ctx.max_message_bytes,
    };
    let lean = match ctx.get_records_client {
        crate::config::GetRecordsClient::Lean => {
            let lean = LeanGetRecords::new(&ctx.streams, fast_config());
            if lean.is_none() {
                debug!(
                    table = %ctx.source.table,
                    shard_id = %ctx.source.shard_id,
                    "the lean GetRecords path cannot serve this client; using the SDK's"
                );
            }
            lean
        }
        crate::config::GetRecordsClient::Sdk => None,
    };
    let reader = Reader {
        ctx: &ctx,
        streams: fast_path_client(&ctx.streams, fast_config()),
        lean,
        fast_page,
        progress: &progress,
        early_changes: 0,
        cancel: &stop,
        last_read: match &start {
            StartAt::After(s) => Some(s.clone()),
            _ => None,
        },
        skip_before_ms: match start {
            StartAt::CreatedSince(ms) => Some(ms),
            _ => ctx.skip_created_before_ms,
        },
        start,
        pending_loss: None,
    }
    .run(tx);
    let target = CheckpointTarget {
        store: ctx.store.clone(),
        table: ctx.source.table.clone(),
        stream_arn: ctx.source.stream_arn.clone(),
        shard_id: ctx.source.shard_id.clone(),
        interval: ctx.checkpoint_interval,
        progress: &progress,
    };
    let checkpointer = checkpoint(&target, previous, rx, &stop);
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
        StartAt::TrimHorizon | StartAt::CreatedSince(_) => (ShardIteratorType::TrimHorizon, None),
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
        code: None,
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
    /// The lean GetRecords path (`reader.get_records_client: lean`), when it can serve
    /// `ctx.streams`; otherwise every call goes through `streams`.
    lean: Option<LeanGetRecords>,
    /// Where the fast path leaves the page it converted.
    fast_page: PageSlot,
    /// What `/healthz` and the metrics see of this shard.
    progress: &'a crate::telemetry::ShardHandle,
    /// Changes of the page being converted that were produced before a dead letter.
    early_changes: u64,
    cancel: &'a CancellationToken,
    start: StartAt,
    /// The last sequence number handed to Kafka (or the checkpoint it started after).
    last_read: Option<String>,
    /// A `DATA_LOSS` marker is owed: records after this one were trimmed.
    pending_loss: Option<Option<String>>,
    /// Records created before this (ms since the epoch) are read but not produced.
    skip_before_ms: Option<i64>,
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
        if self.ctx.on_trimmed_data == OnTrimmedData::Resnapshot {
            error!(
                table = %self.ctx.source.table,
                shard_id = %self.ctx.source.shard_id,
                lost_after_sequence_number = self.last_read.as_deref().unwrap_or("none"),
                error = %f.message,
                "DATA LOSS: records were trimmed from the stream before they were read; loading the table again (on_trimmed_data = resnapshot)"
            );
            self.pending_loss = Some(self.last_read.clone());
            let mut acks = Vec::new();
            self.send_loss_marker(None, &mut acks).await;
            for ack in acks {
                match ack.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(Err(e.into())),
                    Err(_) => {
                        return Err(Err(Error::Internal("a partition producer stopped".into())))
                    }
                }
            }
            return Err(Ok(ShardOutcome::Trimmed));
        }
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
                .and_then(|c| match c.records.iter().map(kafka::message_bytes).max() {
                    Some(size) if size > ctx.max_message_bytes => Err(format!(
                        "change event is {size} bytes, over kafka.max_message_bytes ({})",
                        ctx.max_message_bytes
                    )),
                    _ => Ok(c),
                });
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
                    crate::telemetry::get().dead_letter(&ctx.source.table);
                    // Records before it in this page go first, so their order holds.
                    let before = self.unskipped(std::mem::take(&mut out));
                    self.early_changes += changes_in(&before);
                    acks.extend(ctx.producer.send(before).await);
                    acks.extend(dlq.send(vec![letter]).await);
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
            acks.extend(self.ctx.producer.send_to_every_partition(&marker).await);
            crate::telemetry::get().data_loss(&self.ctx.source.table, 1);
        }
    }

    /// Drops the records created before `skip_before_ms` (a shard resumed from TRIM_HORIZON
    /// in place of LATEST); they still count as read.
    fn unskipped(&self, mut records: Vec<rskafka::record::Record>) -> Vec<rskafka::record::Record> {
        if let Some(since) = self.skip_before_ms {
            // Creation times have whole seconds: keep every record of the starting second.
            let cutoff = since.div_euclid(1000) * 1000;
            records.retain(|r| r.timestamp.timestamp_millis() >= cutoff);
        }
        records
    }

    /// Where to resume after an expired iterator: right after the last record handed to
    /// Kafka (the records before it are queued and will be acknowledged, so nothing is
    /// skipped). A shard that started at LATEST and has read nothing yet resumes at
    /// TRIM_HORIZON, skipping what was created before the pipeline started: a fresh LATEST
    /// would skip everything written since the first one.
    fn resume_point(&mut self) -> StartAt {
        match (&self.last_read, &self.start) {
            (Some(seq), _) => StartAt::After(seq.clone()),
            (None, StartAt::Latest) => {
                self.skip_before_ms = Some(self.ctx.pipeline_started_ms);
                StartAt::CreatedSince(self.ctx.pipeline_started_ms)
            }
            (None, start) => start.clone(),
        }
    }

    /// Reads until the shard ends, shutdown, or an error; ends by dropping `tx`.
    ///
    /// Memory: before each GetRecords the reader reserves, from the shared budget, what the
    /// records it asks for will take (the last page's bytes per record times the limit) and
    /// lowers the limit to what it got; once the page is converted, the reservation becomes
    /// what the page really holds ([`budget::page_bytes`]) until Kafka acknowledged it.
    async fn run(mut self, tx: mpsc::Sender<PendingPage>) -> Stop {
        let ctx = self.ctx;
        let start = self.start.clone();
        let mut iterator = match self.iterator(&start).await {
            Ok(it) => it,
            Err(stop) => return stop,
        };
        debug!(
            table = %ctx.source.table,
            shard_id = %ctx.source.shard_id,
            start = ?start,
            "shard iterator obtained"
        );
        let mut idle = IdlePolling::new(ctx.idle_poll_interval);
        let mut allowance = CallAllowance::new(ctx.max_calls_per_second);
        // The last page had records but was not full: the shard flows.
        let mut flowing = false;
        // Memory a stream record takes while it is read, converted and produced; from the
        // last page with records (an empty page tells nothing, so it is kept).
        let mut per_record = FIRST_PAGE_ESTIMATE_BYTES / FIRST_PAGE_LIMIT as usize;
        let mut limit = FIRST_PAGE_LIMIT;
        // Repeated ExpiredIterator answers back off like any other transient failure.
        let mut expired = Backoff::transient();
        let mut empty_pages = 0u32;
        loop {
            // Waiting for the call allowance holds no memory of the budget.
            if let Some(at) = allowance.next_start(flowing) {
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
            }
            let reservation = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                r = ctx.budget.reserve(per_record.saturating_mul(limit as usize)) => r,
            };
            // A budget smaller than a page: ask for what fits.
            let ask = ((reservation.bytes() / per_record).max(1) as i32).min(limit);
            allowance.started(Instant::now());
            let it = iterator.clone();
            let (streams, lean, it) = (&self.streams, self.lean.as_ref(), &it);
            let result = retrying("GetRecords", self.cancel, || async move {
                match lean {
                    Some(lean) => lean.get_records(it, ask).await,
                    None => {
                        streams
                            .get_records()
                            .shard_iterator(it)
                            .limit(ask)
                            .send()
                            .await
                    }
                }
            })
            .await;
            let out = match result {
                Ok(out) => {
                    expired.reset();
                    self.progress.polled();
                    out
                }
                Err(f) if f.kind == Some(AwsErrorKind::ExpiredIterator) => {
                    drop(reservation);
                    let delay = if expired.attempts() == 0 {
                        // The first expiry after a good page: a new iterator at once.
                        let _ = expired.next_delay();
                        Duration::ZERO
                    } else {
                        expired.next_delay().unwrap_or(Duration::from_secs(10))
                    };
                    let resume = self.resume_point();
                    info!(
                        table = %ctx.source.table,
                        shard_id = %ctx.source.shard_id,
                        after = self.last_read.as_deref().unwrap_or("start"),
                        resume = ?resume,
                        attempt = expired.attempts(),
                        retry_in_ms = delay.as_millis() as u64,
                        "shard iterator expired; getting a new one"
                    );
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    iterator = match self.iterator(&resume).await {
                        Ok(it) => it,
                        Err(stop) => return stop,
                    };
                    continue;
                }
                Err(f) if f.kind == Some(AwsErrorKind::TrimmedData) => {
                    drop(reservation);
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
                Some((page, _)) => (page.stream_records, page.first_sequence_number.clone()),
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
            let mut reservation = Some(reservation);
            let mut changes = 0;
            let mut oldest_ms = None;
            if count > 0 {
                let (kafka_records, body_bytes) = match fast {
                    Some((page, body_bytes)) => {
                        if page.last_sequence_number.is_some() {
                            self.last_read = page.last_sequence_number;
                        }
                        (page.records, body_bytes)
                    }
                    None => {
                        let (kafka_records, stop) = self.convert_page(records, &mut acks).await;
                        poison = stop;
                        (kafka_records, 0)
                    }
                };
                let kafka_records = self.unskipped(kafka_records);
                // Sizes are summed once for the page's limit and its memory reservation.
                let bytes: usize = kafka_records.iter().map(kafka::record_bytes).sum();
                let converted = bytes + kafka_records.len() * RECORD_OVERHEAD_BYTES;
                full = count >= ask as usize || converted >= PAGE_TARGET_BYTES / 2;
                limit = next_limit(converted, count);
                let held = budget::page_bytes_of(bytes, kafka_records.len(), 0);
                per_record = ((held + body_bytes) / count).max(1);
                // The body is gone now: hold what the records keep alive until acknowledged.
                if let Some(r) = reservation.as_mut() {
                    r.resize(held);
                }
                let produced = kafka_records.len();
                changes = changes_in(&kafka_records) + std::mem::take(&mut self.early_changes);
                oldest_ms = kafka_records
                    .iter()
                    .map(|r| r.timestamp.timestamp_millis())
                    .min();
                acks.extend(ctx.producer.send(kafka_records).await);
                debug!(
                    table = %ctx.source.table,
                    shard_id = %ctx.source.shard_id,
                    records = produced,
                    last_sequence_number = self.last_read.as_deref().unwrap_or(""),
                    "page handed to Kafka"
                );
            }
            if !acks.is_empty() || (count > 0 && self.last_read.is_some()) {
                let page = PendingPage {
                    last_sequence_number: self.last_read.clone(),
                    acks,
                    end: false,
                    reservation: reservation.take(),
                    changes,
                };
                self.progress.page_sent(oldest_ms);
                if tx.send(page).await.is_err() {
                    // The checkpointer stopped on an error; it reports it.
                    return Ok(ShardOutcome::Stopped);
                }
            }
            if let Some(e) = poison {
                return Err(e);
            }
            empty_pages = if count == 0 { empty_pages + 1 } else { 0 };
            if let Some(tip) = &ctx.at_tip {
                if empty_pages >= TIP_EMPTY_PAGES || out.next_shard_iterator().is_none() {
                    tip.reached(&ctx.source.shard_id);
                }
            }
            match out.next_shard_iterator() {
                None => {
                    let _ = tx
                        .send(PendingPage {
                            last_sequence_number: None,
                            acks: Vec::new(),
                            end: true,
                            reservation: None,
                            changes: 0,
                        })
                        .await;
                    return Ok(ShardOutcome::Ended);
                }
                Some(next) => iterator = next.to_owned(),
            }
            drop(reservation);
            // Flowing or a backlog: the allowance decides when the next call starts.
            flowing = count > 0 && !full;
            if count > 0 {
                idle.records();
            } else {
                let at = idle.wake_at(Instant::now());
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(ShardOutcome::Stopped),
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
            }
        }
    }
}

/// Where a shard's checkpoints go.
#[derive(Debug, Clone)]
struct CheckpointTarget<'a> {
    store: Arc<dyn CheckpointStore>,
    table: String,
    stream_arn: String,
    shard_id: String,
    /// Shortest time between two writes while records flow.
    interval: Duration,
    /// What `/healthz` and the metrics see of this shard.
    progress: &'a crate::telemetry::ShardHandle,
}

impl CheckpointTarget<'_> {
    /// Writes the shard's position on the blocking pool: a checkpoint write fsyncs twice
    /// (the file and its directory), which must not stall the runtime's workers (and every
    /// shard and partition task on them).
    async fn save(&self, position: &Option<String>, ended: bool) -> Result<(), Error> {
        let store = self.store.clone();
        let table = self.table.clone();
        let checkpoint = ShardCheckpoint {
            stream_arn: self.stream_arn.clone(),
            shard_id: self.shard_id.clone(),
            sequence_number: position.clone(),
            ended,
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            created_since_ms: None,
        };
        tokio::task::spawn_blocking(move || store.save_shard(&table, &checkpoint))
            .await
            .map_err(|e| Error::Internal(format!("checkpoint writer panicked: {e}")))??;
        self.progress.checkpointed();
        Ok(())
    }
}

/// The checkpointing half: waits for each page's acknowledgements in order and writes the
/// position (at most once per `interval` while records flow, and at the end).
async fn checkpoint(
    target: &CheckpointTarget<'_>,
    previous: Option<ShardCheckpoint>,
    mut rx: mpsc::Receiver<PendingPage>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let mut position = previous.and_then(|c| c.sequence_number);
    let mut dirty = false;
    let mut last_write = Instant::now();
    let shard_error = |position: &Option<String>, message: String| Error::Shard {
        table: target.table.clone(),
        shard_id: target.shard_id.clone(),
        sequence_number: position.clone(),
        message,
    };
    loop {
        let flush_at = last_write + target.interval;
        let page = tokio::select! {
            page = rx.recv() => page,
            _ = tokio::time::sleep_until(flush_at.into()), if dirty => {
                target.save(&position, false).await?;
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
                    target.save(&position, false).await?;
                }
                warn!(
                    table = %target.table,
                    shard_id = %target.shard_id,
                    checkpoint = position.as_deref().unwrap_or("none"),
                    error = %e,
                    "produce failed; shard stops at its last acknowledged record"
                );
                return Err(shard_error(&position, e.to_string()));
            }
        }
        // Acknowledged: its memory is free for the next pages of every shard.
        drop(page.reservation);
        if !page.end {
            target.progress.page_acknowledged(page.changes);
        }
        if page.end {
            target.save(&position, true).await?;
            info!(
                table = %target.table,
                shard_id = %target.shard_id,
                last_sequence_number = position.as_deref().unwrap_or("none"),
                "shard ended and fully checkpointed"
            );
            return Ok(());
        }
        if let Some(seq) = page.last_sequence_number {
            position = Some(seq);
            dirty = true;
            target.progress.unsaved();
        }
        if dirty && last_write.elapsed() >= target.interval {
            target.save(&position, false).await?;
            dirty = false;
            last_write = Instant::now();
        }
    }
    if dirty {
        target.save(&position, false).await?;
    }
    Ok(())
}

/// Changes among produced records: tombstones (no value) are not changes of their own.
fn changes_in(records: &[rskafka::record::Record]) -> u64 {
    records.iter().filter(|r| r.value.is_some()).count() as u64
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use super::*;
    use crate::checkpoint::TableState;

    /// Remembers every save and the thread it ran on.
    #[derive(Debug, Default)]
    struct Recording {
        saves: Mutex<Vec<(ThreadId, ShardCheckpoint)>>,
    }

    impl CheckpointStore for Recording {
        fn load_table(&self, _: &str) -> Result<Option<TableState>, Error> {
            Ok(None)
        }
        fn save_table(&self, _: &str, _: &TableState) -> Result<(), Error> {
            Ok(())
        }
        fn load_shards(&self, _: &str) -> Result<Vec<ShardCheckpoint>, Error> {
            Ok(Vec::new())
        }
        fn save_shard(&self, _: &str, c: &ShardCheckpoint) -> Result<(), Error> {
            self.saves
                .lock()
                .unwrap()
                .push((std::thread::current().id(), c.clone()));
            Ok(())
        }
        fn remove_shard(&self, _: &str, _: &str) -> Result<(), Error> {
            Ok(())
        }
        fn load_snapshot(
            &self,
            _: &str,
            _: crate::checkpoint::SnapshotKind,
        ) -> Result<Option<crate::checkpoint::SnapshotCheckpoint>, Error> {
            Ok(None)
        }
        fn save_snapshot(
            &self,
            _: &str,
            _: crate::checkpoint::SnapshotKind,
            _: &crate::checkpoint::SnapshotCheckpoint,
        ) -> Result<(), Error> {
            Ok(())
        }
    }

    fn acked_page(seq: u64) -> PendingPage {
        let (tx, rx) = oneshot::channel();
        tx.send(Ok(())).unwrap();
        PendingPage {
            last_sequence_number: Some(format!("{seq:021}")),
            acks: vec![rx],
            end: false,
            reservation: None,
            changes: 1,
        }
    }

    /// Checkpoint writes (two fsyncs each) run off the runtime's threads, and a busy shard
    /// writes at most once per interval plus the final flush.
    #[test]
    fn checkpoints_are_written_off_the_runtime_and_coalesced() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(Recording::default());
        let progress = crate::telemetry::get().shard("t", "shardId-1");
        let target = CheckpointTarget {
            store: store.clone(),
            table: "t".into(),
            stream_arn: "arn:s".into(),
            shard_id: "shardId-1".into(),
            interval: Duration::from_secs(3600),
            progress: &progress,
        };
        let runtime_thread = std::thread::current().id();
        runtime.block_on(async {
            let (tx, rx) = mpsc::channel(4);
            let stop = CancellationToken::new();
            let feeder = async move {
                for seq in 1..=500 {
                    tx.send(acked_page(seq)).await.unwrap();
                }
            };
            let (result, ()) = tokio::join!(checkpoint(&target, None, rx, &stop), feeder);
            result.unwrap();
        });
        let saves = store.saves.lock().unwrap();
        assert!(
            saves.iter().all(|(thread, _)| *thread != runtime_thread),
            "a checkpoint was written on the runtime's thread"
        );
        // 500 pages within one interval: the first write waits for the interval, so the
        // only write is the final flush, at the last acknowledged position.
        assert_eq!(saves.len(), 1, "{} writes", saves.len());
        assert_eq!(
            saves[0].1.sequence_number.as_deref(),
            Some(format!("{:021}", 500).as_str())
        );
    }
}
