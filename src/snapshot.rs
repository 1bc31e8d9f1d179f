//! Snapshots (initial load): a parallel Scan of a table into its topic as SNAPSHOT rows,
//! paced by a read budget, resumable per segment.
//!
//! ```text
//!  DescribeTable (key schema, ItemCount, billing mode / read capacity ─▶ read budget)
//!       │
//!  segment 0..T: reserve memory ─▶ read budget ─▶ Scan(Segment, ExclusiveStartKey)
//!       │           (kafka.max_buffered_bytes)      │ ConsumedCapacity ─▶ read budget
//!       │                                           ▼
//!       │                          convert::snapshot_record ─▶ Kafka (same key as changes)
//!       ▼                                                        │ acks
//!  segment checkpointer: every ack of a page in ─▶ its LastEvaluatedKey ─▶ snapshot.json
//! ```
//!
//! A segment's position moves only once Kafka acknowledged every row before it, so a
//! restart continues each segment after its last acknowledged page: rows of the pages in
//! flight when the process died are delivered again, nothing is skipped. The snapshot is
//! finished when every segment is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, BillingMode, KeyType, ReturnConsumedCapacity};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::aws::retrying;
use crate::budget::{self, Budget, Reservation, RECORD_OVERHEAD_BYTES};
use crate::checkpoint::{CheckpointStore, SnapshotCheckpoint, SnapshotKind};
use crate::config::{defaults, SnapshotConfig};
use crate::convert::{self, SnapshotOrigin};
use crate::error::{AwsErrorKind, Error};
use crate::kafka::producer::Ack;
use crate::kafka::{message_bytes, TopicProducer};

/// What a snapshot needs.
#[derive(Debug, Clone)]
pub struct SnapshotContext {
    /// The table.
    pub table: String,
    /// DynamoDB (DescribeTable, Scan).
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// The table's topic.
    pub producer: TopicProducer,
    /// Pipeline memory, shared with every shard reader and snapshot.
    pub budget: Budget,
    /// Checkpoints.
    pub store: Arc<dyn CheckpointStore>,
    /// `snapshot`.
    pub settings: SnapshotConfig,
    /// Which snapshot of the table this is (its own checkpoint file).
    pub kind: SnapshotKind,
    /// Pages of one segment that may wait for Kafka acknowledgement at once.
    pub max_inflight_pages: usize,
    /// Largest record produced (`kafka.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Shortest time between two writes of the snapshot's checkpoint file.
    pub checkpoint_interval: Duration,
    /// Where an item that cannot be produced goes (`on_poison_record: dead_letter`); `None`:
    /// such an item stops the snapshot.
    pub dead_letter: Option<TopicProducer>,
    /// Pause the scan after this long ([`SnapshotOutcome::Paused`]): the stream catches up
    /// between scan phases. `None`: scan to the end.
    pub scan_phase: Option<Duration>,
}

/// How a snapshot run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotOutcome {
    /// Every segment was read to its end and acknowledged.
    Completed(SnapshotCheckpoint),
    /// Shutdown: every row read was acknowledged and its position saved.
    Stopped,
    /// The scan phase is over: every row read was acknowledged and its position saved; run
    /// again to go on.
    Paused,
}

/// The table as DescribeTable describes it for a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct TableShape {
    /// The key schema's attribute names (partition key first).
    pub key_names: Vec<String>,
    /// DynamoDB's ItemCount (updated about every six hours).
    pub item_count: Option<i64>,
    /// Provisioned read capacity units; `None` for an on-demand table.
    pub provisioned_read_units: Option<i64>,
}

impl TableShape {
    /// The share of the table `rows` make by ItemCount (0 when unknown; at most 0.99 until
    /// the snapshot is complete, since ItemCount lags).
    pub fn fraction(&self, rows: u64) -> f64 {
        match self.item_count {
            Some(n) if n > 0 => (rows as f64 / n as f64).min(0.99),
            _ => 0.0,
        }
    }
}

/// The read budget of a table's snapshot, in read units per second: the configured one, else
/// half of a provisioned table's read capacity, else none (on-demand).
pub fn read_budget_for(settings: &SnapshotConfig, shape: &TableShape) -> Option<f64> {
    settings.max_read_units_per_second.or_else(|| {
        shape
            .provisioned_read_units
            .filter(|&u| u > 0)
            .map(|u| u as f64 * defaults::SNAPSHOT_PROVISIONED_SHARE)
    })
}

/// Read units an eventually consistent Scan page of `bytes` consumes by DynamoDB's rule (one
/// unit per 4 KB, half for eventually consistent reads): used when a response has no
/// ConsumedCapacity.
pub fn estimated_units(bytes: usize, consistent_read: bool) -> f64 {
    let units = bytes.div_ceil(4096).max(1) as f64;
    if consistent_read {
        units
    } else {
        units / 2.0
    }
}

/// Read units per second shared by every segment of a table's snapshot: a segment waits
/// until the budget is not in debt, is charged the last page's units before its Scan (so
/// that segments starting together space themselves out), and the difference to the page's
/// real ConsumedCapacity once it returns. Over any interval the units consumed stay within
/// the rate times its length plus one page per segment.
#[derive(Debug)]
pub struct ReadBudget {
    rate: Option<f64>,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// Units available (negative: in debt).
    tokens: f64,
    refilled_at: Option<tokio::time::Instant>,
    /// The last page's units: the charge before the next Scan.
    units_per_page: f64,
}

impl ReadBudget {
    /// A budget of `rate` units per second (`None`: unlimited). It starts empty: the first
    /// Scan runs at once, the next ones as the budget allows.
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            rate,
            state: Mutex::new(BucketState {
                tokens: 0.0,
                refilled_at: None,
                units_per_page: 1.0,
            }),
        }
    }

    fn refill(&self, s: &mut BucketState, now: tokio::time::Instant) {
        let Some(rate) = self.rate else { return };
        if let Some(at) = s.refilled_at {
            // At most one second of unused budget is saved up.
            s.tokens = (s.tokens + rate * now.duration_since(at).as_secs_f64()).min(rate);
        }
        s.refilled_at = Some(now);
    }

    /// Waits until a Scan may start and charges it the last page's units; returns the
    /// charge (0 without a budget), to settle with [`ReadBudget::settle`]. `None` when
    /// cancelled.
    pub async fn admit(&self, cancel: &CancellationToken) -> Option<f64> {
        let Some(rate) = self.rate else {
            return Some(0.0);
        };
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                self.refill(&mut s, tokio::time::Instant::now());
                if s.tokens >= 0.0 {
                    let charge = s.units_per_page;
                    s.tokens -= charge;
                    return Some(charge);
                }
                Duration::from_secs_f64(-s.tokens / rate)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }

    /// A Scan charged `charged` consumed `units`.
    pub fn settle(&self, charged: f64, units: f64) {
        if self.rate.is_none() {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut s, tokio::time::Instant::now());
        s.tokens -= units - charged;
        s.units_per_page = units.max(0.5);
    }
}

/// DescribeTable: the key schema, ItemCount and read capacity.
pub async fn describe(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    cancel: &CancellationToken,
) -> Result<TableShape, Error> {
    let out = retrying("DescribeTable", cancel, || {
        dynamodb.describe_table().table_name(table).send()
    })
    .await
    .map_err(|f| Error::Table {
        table: table.to_owned(),
        message: match f.kind {
            Some(AwsErrorKind::NotFound) => {
                "the table does not exist (DescribeTable: ResourceNotFoundException)".into()
            }
            _ => format!("DescribeTable for the snapshot: {}", f.message),
        },
    })?;
    let desc = out.table().ok_or_else(|| Error::Table {
        table: table.to_owned(),
        message: "DescribeTable answered without a table description".into(),
    })?;
    let mut key_names: Vec<(bool, String)> = desc
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.key_type() != &KeyType::Hash,
                k.attribute_name().to_owned(),
            )
        })
        .collect();
    key_names.sort();
    if key_names.is_empty() {
        return Err(Error::Table {
            table: table.to_owned(),
            message: "DescribeTable gave no key schema".into(),
        });
    }
    let on_demand = desc
        .billing_mode_summary()
        .and_then(|b| b.billing_mode())
        .is_some_and(|m| *m == BillingMode::PayPerRequest);
    let provisioned_read_units = if on_demand {
        None
    } else {
        desc.provisioned_throughput()
            .and_then(|p| p.read_capacity_units())
            .filter(|&u| u > 0)
    };
    Ok(TableShape {
        key_names: key_names.into_iter().map(|(_, n)| n).collect(),
        item_count: desc.item_count(),
        provisioned_read_units,
    })
}

/// A Scan key (LastEvaluatedKey) as DynamoDB JSON for the checkpoint file. Key attributes
/// are S, N or B.
pub fn key_to_json(key: &HashMap<String, AttributeValue>) -> Value {
    let map: Map<String, Value> = key
        .iter()
        .map(|(name, v)| {
            let typed = match v {
                AttributeValue::S(s) => json!({ "S": s }),
                AttributeValue::N(n) => json!({ "N": n }),
                AttributeValue::B(b) => json!({
                    "B": base64::engine::general_purpose::STANDARD.encode(b.as_ref())
                }),
                // Not a key type; kept as null so that a resume fails loudly.
                _ => Value::Null,
            };
            (name.clone(), typed)
        })
        .collect();
    Value::Object(map)
}

/// The checkpoint file's key back into a Scan's ExclusiveStartKey.
pub fn key_from_json(value: &Value) -> Option<HashMap<String, AttributeValue>> {
    let map = value.as_object()?;
    let mut out = HashMap::with_capacity(map.len());
    for (name, typed) in map {
        let typed = typed.as_object()?;
        let v = if let Some(s) = typed.get("S").and_then(Value::as_str) {
            AttributeValue::S(s.to_owned())
        } else if let Some(n) = typed.get("N").and_then(Value::as_str) {
            AttributeValue::N(n.to_owned())
        } else if let Some(b) = typed.get("B").and_then(Value::as_str) {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
            AttributeValue::B(aws_smithy_types::Blob::new(bytes))
        } else {
            return None;
        };
        out.insert(name.clone(), v);
    }
    (!out.is_empty()).then_some(out)
}

/// One Scan page handed to Kafka, waiting for its acknowledgements.
struct ScanPage {
    acks: Vec<oneshot::Receiver<Ack>>,
    /// LastEvaluatedKey after the page; `None`: the segment ends with it.
    last_evaluated_key: Option<Value>,
    rows: u64,
    bytes: u64,
    /// The page's share of `kafka.max_buffered_bytes`, freed once it is acknowledged.
    _reservation: Reservation,
}

/// What the segments of one run share.
struct Shared {
    ctx: SnapshotContext,
    shape: TableShape,
    read_budget: ReadBudget,
    checkpoint: Mutex<SnapshotCheckpoint>,
    /// Serialises writes of the checkpoint file; holds when it was last written.
    saved_at: tokio::sync::Mutex<Option<Instant>>,
    /// The terminal's progress bar, when there is one.
    bar: Option<indicatif::ProgressBar>,
}

impl Shared {
    /// Writes the checkpoint file if the last write is older than the interval (or `force`).
    async fn save(&self, force: bool) -> Result<(), Error> {
        let mut saved_at = self.saved_at.lock().await;
        if !force && saved_at.is_some_and(|at| at.elapsed() < self.ctx.checkpoint_interval) {
            return Ok(());
        }
        let snapshot = self
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let store = self.ctx.store.clone();
        let (table, kind) = (self.ctx.table.clone(), self.ctx.kind);
        tokio::task::spawn_blocking(move || store.save_snapshot(&table, kind, &snapshot))
            .await
            .map_err(|e| Error::Internal(format!("snapshot checkpoint task: {e}")))??;
        *saved_at = Some(Instant::now());
        Ok(())
    }

    fn origin(&self, segment: u32) -> SnapshotOrigin {
        let c = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        SnapshotOrigin {
            segment,
            total_segments: c.total_segments,
            started_at_ms: c.started_at_ms,
        }
    }
}

/// The snapshot of `kind` to run: the saved one when it is unfinished (resumed), else a new
/// one starting now.
pub fn load_or_start(
    store: &dyn CheckpointStore,
    table: &str,
    kind: SnapshotKind,
    segments: u32,
) -> Result<SnapshotCheckpoint, Error> {
    match store.load_snapshot(table, kind)? {
        Some(saved) if saved.completed_at_ms.is_none() => Ok(saved),
        _ => Ok(SnapshotCheckpoint::start(
            chrono::Utc::now().timestamp_millis(),
            segments,
        )),
    }
}

/// Runs (or resumes) the table's snapshot of `ctx.kind` until every segment is read and
/// acknowledged, or `cancel` fires (then every page read is acknowledged and saved first).
pub async fn run_snapshot(
    ctx: SnapshotContext,
    cancel: &CancellationToken,
) -> Result<SnapshotOutcome, Error> {
    let table = ctx.table.clone();
    let checkpoint = load_or_start(ctx.store.as_ref(), &table, ctx.kind, ctx.settings.segments)?;
    if checkpoint.segments.len() != checkpoint.total_segments as usize {
        return Err(Error::Table {
            table,
            message: format!(
                "the snapshot checkpoint lists {} segments for a scan of {}: the file is \
                 damaged; delete it to start the snapshot again",
                checkpoint.segments.len(),
                checkpoint.total_segments
            ),
        });
    }
    let resumed_rows = checkpoint.rows();
    if resumed_rows > 0 || checkpoint.segments_done() > 0 {
        info!(table = %table, kind = ctx.kind.as_str(), rows = resumed_rows,
            segments_done = checkpoint.segments_done(), total_segments = checkpoint.total_segments,
            started_at_ms = checkpoint.started_at_ms, "resuming the snapshot where each segment stopped");
        if checkpoint.total_segments != ctx.settings.segments {
            info!(table = %table, total_segments = checkpoint.total_segments, configured = ctx.settings.segments,
                "snapshot.segments changed: this snapshot keeps its segments until it is done");
        }
    }
    let shape = describe(&ctx.dynamodb, &table, cancel).await?;
    let rate = read_budget_for(&ctx.settings, &shape);
    info!(table = %table, kind = ctx.kind.as_str(), segments = checkpoint.total_segments,
        page_items = ctx.settings.page_items, consistent_read = ctx.settings.consistent_read,
        max_read_units_per_second = rate.map_or("none".to_owned(), |r| format!("{r}")),
        approximate_item_count = shape.item_count.unwrap_or(-1), topic = %ctx.producer.topic,
        "snapshot started");
    let bar = crate::telemetry::bars::snapshot_bar(
        &table,
        shape.item_count.filter(|&n| n > 0).map(|n| n as u64),
        resumed_rows,
    );
    let shared = Arc::new(Shared {
        bar,
        read_budget: ReadBudget::new(rate),
        shape,
        checkpoint: Mutex::new(checkpoint.clone()),
        saved_at: tokio::sync::Mutex::new(None),
        ctx,
    });
    shared.save(true).await?;
    crate::telemetry::get().table_started(&table);

    // `abort` (shutdown, a failure) drops the Scans in flight; `stop` (also the end of a
    // scan phase) only keeps new Scans from starting, so that a phase shorter than a slow
    // Scan still makes progress.
    let abort = cancel.child_token();
    let stop = abort.child_token();
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    for (segment, seg) in checkpoint.segments.iter().enumerate() {
        if seg.done {
            continue;
        }
        let start_key = match &seg.last_evaluated_key {
            None => None,
            Some(v) => Some(key_from_json(v).ok_or_else(|| Error::Table {
                table: table.clone(),
                message: format!(
                    "the snapshot checkpoint of segment {segment} holds a key that is not \
                     DynamoDB JSON of S, N or B attributes: the file is damaged; delete it \
                     to start the snapshot again"
                ),
            })?),
        };
        let (tx, rx) = mpsc::channel(shared.ctx.max_inflight_pages.max(1));
        let segment = segment as u32;
        tasks.spawn(read_segment(
            shared.clone(),
            segment,
            start_key,
            tx,
            stop.clone(),
            abort.clone(),
        ));
        tasks.spawn(acknowledge_segment(shared.clone(), segment, rx));
    }

    let progress = Progress::new(resumed_rows);
    let mut ticker = tokio::time::interval(Duration::from_millis(
        defaults::SNAPSHOT_PROGRESS_INTERVAL_MS,
    ));
    ticker.tick().await;
    let mut failure = None;
    let phase_end = shared
        .ctx
        .scan_phase
        .map(|p| tokio::time::Instant::now() + p);
    let mut paused = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(phase_end.unwrap_or_else(tokio::time::Instant::now)),
                if phase_end.is_some() && !paused && !stop.is_cancelled() => {
                // The pages being read finish and are acknowledged; no new Scan starts.
                paused = true;
                stop.cancel();
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    failure.get_or_insert(e);
                    abort.cancel();
                }
                Some(Err(e)) => {
                    failure.get_or_insert(Error::Internal(format!("table {table}: a snapshot task panicked: {e}")));
                    abort.cancel();
                }
            },
            _ = ticker.tick() => progress.log(&shared),
        }
    }
    shared.save(true).await?;
    if let Some(bar) = &shared.bar {
        bar.finish_and_clear();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let mut done = shared
        .checkpoint
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if done.segments_done() < done.segments.len() {
        if paused && !cancel.is_cancelled() {
            progress.log(&shared);
            return Ok(SnapshotOutcome::Paused);
        }
        info!(table = %table, rows = done.rows(), segments_done = done.segments_done(),
            total_segments = done.total_segments, "snapshot stopped; it resumes at the next start");
        return Ok(SnapshotOutcome::Stopped);
    }
    done.completed_at_ms = Some(chrono::Utc::now().timestamp_millis());
    *shared.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = done.clone();
    shared.save(true).await?;
    let seconds = (done.completed_at_ms.unwrap_or_default() - done.started_at_ms) as f64 / 1000.0;
    let bytes: u64 = done.segments.iter().map(|s| s.bytes).sum();
    crate::telemetry::get().snapshot_rows(&table, 0, 1.0);
    info!(table = %table, kind = shared.ctx.kind.as_str(), rows = done.rows(),
        mb = format!("{:.1}", bytes as f64 / 1e6), seconds = format!("{seconds:.1}"),
        "snapshot complete");
    Ok(SnapshotOutcome::Completed(done))
}

/// Progress lines: items, MB, items/s of this run, segments done, ETA from ItemCount.
struct Progress {
    started: Instant,
    resumed_rows: u64,
}

impl Progress {
    fn new(resumed_rows: u64) -> Self {
        Self {
            started: Instant::now(),
            resumed_rows,
        }
    }

    fn log(&self, shared: &Shared) {
        let c = shared
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rows = c.rows();
        let bytes: u64 = c.segments.iter().map(|s| s.bytes).sum();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = rows.saturating_sub(self.resumed_rows) as f64 / secs;
        let total = shared.shape.item_count.filter(|&n| n > 0).map(|n| n as u64);
        let eta = match total {
            // Approximate: DynamoDB updates ItemCount about every six hours.
            Some(t) if rate > 0.0 && t > rows => format!("~{:.0} s", (t - rows) as f64 / rate),
            Some(_) => "~0 s".to_owned(),
            None => "unknown".to_owned(),
        };
        info!(
            table = %shared.ctx.table,
            rows,
            approximate_item_count = total.map_or(-1, |t| t as i64),
            mb = format!("{:.1}", bytes as f64 / 1e6),
            rows_per_second = format!("{rate:.0}"),
            segments_done = c.segments_done(),
            total_segments = c.total_segments,
            eta = %eta,
            "snapshot progress"
        );
    }
}

/// Reads one segment page by page until its end or `stop`, handing each page to Kafka and
/// then to the segment's checkpointer.
async fn read_segment(
    shared: Arc<Shared>,
    segment: u32,
    mut start_key: Option<HashMap<String, AttributeValue>>,
    tx: mpsc::Sender<ScanPage>,
    stop: CancellationToken,
    abort: CancellationToken,
) -> Result<(), Error> {
    let ctx = &shared.ctx;
    let table = &ctx.table;
    let origin = shared.origin(segment);
    let limit = ctx.settings.page_items as i32;
    // Bytes a row keeps alive until acknowledged, learnt from each page.
    let mut per_row = 1024 + 2 * RECORD_OVERHEAD_BYTES;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let mut reservation = tokio::select! {
            r = ctx.budget.reserve(per_row.saturating_mul(limit as usize)) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(charged) = shared.read_budget.admit(&stop).await else {
            return Ok(());
        };
        let key = start_key.clone();
        // A Scan that started finishes (and is acknowledged) even when the phase ends.
        let result = retrying("Scan", &abort, || {
            ctx.dynamodb
                .scan()
                .table_name(table)
                .segment(segment as i32)
                .total_segments(origin.total_segments as i32)
                .limit(limit)
                .set_exclusive_start_key(key.clone())
                .consistent_read(ctx.settings.consistent_read)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
        })
        .await;
        let out = match result {
            Ok(out) => out,
            Err(f) if f.kind.is_none() => return Ok(()),
            Err(f) => {
                return Err(Error::Table {
                    table: table.clone(),
                    message: format!(
                        "snapshot segment {segment} of {}: Scan: {}",
                        origin.total_segments, f.message
                    ),
                })
            }
        };
        let read_at_ms = chrono::Utc::now().timestamp_millis();
        let mut records = Vec::with_capacity(out.items().len());
        let mut acks = Vec::new();
        let mut bytes = 0usize;
        for item in out.items() {
            let converted =
                convert::snapshot_record(item, &shared.shape.key_names, table, origin, read_at_ms)
                    .map_err(|e| format!("the item cannot be converted: {e}"))
                    .and_then(|record| match message_bytes(&record) {
                        size if size > ctx.max_message_bytes => Err(format!(
                            "the item converts to a {size}-byte record, more than \
                     kafka.max_message_bytes ({}); raise it (and the topic's max.message.bytes)",
                            ctx.max_message_bytes
                        )),
                        _ => Ok(record),
                    });
            match converted {
                Ok(record) => {
                    bytes += record.value.as_ref().map_or(0, Vec::len);
                    records.push(record);
                }
                Err(why) => {
                    let Some(dlq) = &ctx.dead_letter else {
                        return Err(Error::Table {
                            table: table.clone(),
                            message: format!(
                                "snapshot segment {segment}: {why} (its key attributes are {}; \
                                 on_poison_record \"dead_letter\" sends it to the dead-letter topic)",
                                shared.shape.key_names.join(", ")
                            ),
                        });
                    };
                    error!(table = %table, segment, error = %why, topic = %dlq.topic,
                        "snapshot item sent to the dead-letter topic");
                    // The rows before it go first, each to its partition, in order.
                    acks.extend(ctx.producer.send(std::mem::take(&mut records)).await);
                    let letter = crate::dead_letter::snapshot_dead_letter(
                        item,
                        &shared.shape.key_names,
                        table,
                        origin,
                        &why,
                        ctx.max_message_bytes,
                    );
                    acks.extend(dlq.send(vec![letter]).await);
                    crate::telemetry::get().dead_letter(table);
                }
            }
        }
        let units = out
            .consumed_capacity()
            .and_then(|c| c.capacity_units())
            .unwrap_or_else(|| estimated_units(bytes, ctx.settings.consistent_read));
        shared.read_budget.settle(charged, units);
        let rows = records.len() as u64;
        if rows > 0 {
            per_row = (budget::page_bytes(&records, 0) / rows as usize).max(1);
        }
        reservation.resize(budget::page_bytes(&records, 0));
        let last_evaluated_key = out.last_evaluated_key().filter(|k| !k.is_empty());
        acks.extend(ctx.producer.send(records).await);
        let page = ScanPage {
            acks,
            last_evaluated_key: last_evaluated_key.map(key_to_json),
            rows,
            bytes: bytes as u64,
            _reservation: reservation,
        };
        start_key = last_evaluated_key.cloned();
        let end = start_key.is_none();
        if tx.send(page).await.is_err() {
            return Ok(());
        }
        if end {
            return Ok(());
        }
    }
}

/// Waits for each page's acknowledgements in order, then moves the segment's position.
async fn acknowledge_segment(
    shared: Arc<Shared>,
    segment: u32,
    mut rx: mpsc::Receiver<ScanPage>,
) -> Result<(), Error> {
    let table = &shared.ctx.table;
    while let Some(page) = rx.recv().await {
        for ack in page.acks {
            ack.await
                .map_err(|_| Error::Internal("a partition producer stopped".into()))??;
        }
        let end = page.last_evaluated_key.is_none();
        let rows = {
            let mut c = shared.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            let seg = &mut c.segments[segment as usize];
            seg.rows += page.rows;
            seg.bytes += page.bytes;
            seg.done = end;
            seg.last_evaluated_key = page.last_evaluated_key;
            c.rows()
        };
        crate::telemetry::get().snapshot_rows(table, page.rows, shared.shape.fraction(rows));
        if let Some(bar) = &shared.bar {
            bar.inc(page.rows);
        }
        shared.save(end).await?;
        if end {
            info!(table = %table, segment, "snapshot segment read to its end");
        }
    }
    Ok(())
}

/// Logs why a snapshot is not run for a table whose pipeline already exists.
pub fn warn_existing_pipeline(table: &str, mode: &str) {
    warn!(table = %table, sync_mode = mode,
        "the table's pipeline started earlier without a snapshot: sync_mode applies to a new \
         pipeline only; run `dynamodb-cdc snapshot --table` to load the table now");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_budget_defaults_to_half_the_provisioned_capacity() {
        let mut settings = SnapshotConfig::default();
        let provisioned = TableShape {
            key_names: vec!["pk".into()],
            item_count: Some(10),
            provisioned_read_units: Some(100),
        };
        let on_demand = TableShape {
            provisioned_read_units: None,
            ..provisioned.clone()
        };
        assert_eq!(read_budget_for(&settings, &provisioned), Some(50.0));
        assert_eq!(read_budget_for(&settings, &on_demand), None);
        settings.max_read_units_per_second = Some(7.5);
        assert_eq!(read_budget_for(&settings, &provisioned), Some(7.5));
        assert_eq!(read_budget_for(&settings, &on_demand), Some(7.5));
    }

    #[test]
    fn estimated_units_follow_dynamodbs_rule() {
        assert_eq!(estimated_units(0, false), 0.5);
        assert_eq!(estimated_units(4096, false), 0.5);
        assert_eq!(estimated_units(4097, false), 1.0);
        assert_eq!(estimated_units(4097, true), 2.0);
        assert_eq!(estimated_units(1_000_000, false), 122.5);
    }

    #[test]
    fn scan_keys_round_trip_through_the_checkpoint() {
        let key = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("a/b".into())),
            ("sk".to_owned(), AttributeValue::N("-1.50E+3".into())),
            (
                "bin".to_owned(),
                AttributeValue::B(aws_smithy_types::Blob::new(vec![0, 255, 7])),
            ),
        ]);
        let json = key_to_json(&key);
        assert_eq!(json["sk"], json!({"N": "-1.50E+3"}));
        assert_eq!(key_from_json(&json), Some(key));
        assert_eq!(key_from_json(&json!({"pk": {"BOOL": true}})), None);
        assert_eq!(key_from_json(&json!({})), None);
    }

    #[tokio::test(start_paused = true)]
    async fn read_budget_paces_pages_to_the_rate() {
        let budget = ReadBudget::new(Some(256.0));
        let cancel = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let mut starts = Vec::new();
        for _ in 0..20 {
            let charged = budget.admit(&cancel).await.unwrap();
            starts.push(start.elapsed());
            budget.settle(charged, 128.0);
        }
        // The k-th page starts once the 128 units of each page before it are paid for.
        for (k, at) in starts.iter().enumerate() {
            assert!(
                at.as_secs_f64() + 1e-3 >= k as f64 * 0.5,
                "page {k} at {at:?}"
            );
        }
        assert!(
            starts[19] >= Duration::from_millis(9_499),
            "{:?}",
            starts[19]
        );
        let unlimited = ReadBudget::new(None);
        assert_eq!(unlimited.admit(&cancel).await, Some(0.0));
    }
}
