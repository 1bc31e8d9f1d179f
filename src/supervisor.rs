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
use crate::checkpoint::SnapshotKind;
use crate::checkpoint::{CheckpointStore, ShardCheckpoint, TableState};
use crate::config::{Config, OnTrimmedData, StartPosition, SyncMode};
use crate::convert::Source;
use crate::dead_letter;
use crate::discovery::{self, DiscoveryError, ShardInfo};
use crate::error::Error;
use crate::kafka::TopicProducer;
use crate::lineage;
use crate::shard_reader::{self, AtTip, ShardContext, ShardOutcome, StartAt};
use crate::snapshot::{self, SnapshotContext, SnapshotOutcome};

/// How far before a snapshot's start the stream is read after it: ApproximateCreationDateTime
/// has whole seconds, so a change made in the second the scan started is kept. A change made
/// during the scan may appear twice (a SNAPSHOT row and a change), never zero times.
pub const HANDOFF_MARGIN_MS: i64 = 1000;

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
/// never skips records. `latest` is LATEST only in the process that started the pipeline
/// (`resumed` false); after a restart, a shard that saved no position yet resumes at
/// TRIM_HORIZON skipping what was created before the pipeline started, so the changes made
/// while the daemon was down (or read but not yet checkpointed before a crash) are kept.
pub fn start_for(
    shard_id: &str,
    checkpoint: Option<&ShardCheckpoint>,
    state: &TableState,
    resumed: bool,
    start_position: StartPosition,
) -> StartAt {
    if let Some(seq) = checkpoint.and_then(|c| c.sequence_number.clone()) {
        return StartAt::After(seq);
    }
    if let Some(ms) = checkpoint.and_then(|c| c.created_since_ms) {
        return StartAt::CreatedSince(ms);
    }
    let initial = state.initial_shards.iter().any(|s| s == shard_id);
    if let Some(started) = state.snapshot_started_at_ms {
        // The snapshot holds what the table held when its scan started: the changes from
        // just before then on follow it. Shards born later hold only later records.
        return if initial {
            StartAt::CreatedSince(started - HANDOFF_MARGIN_MS)
        } else {
            StartAt::TrimHorizon
        };
    }
    match start_position {
        StartPosition::Latest if state.initial_shards.iter().any(|s| s == shard_id) => {
            if resumed {
                StartAt::CreatedSince(state.created_at_ms)
            } else {
                StartAt::Latest
            }
        }
        StartPosition::AtTimestamp(at) if state.initial_shards.iter().any(|s| s == shard_id) => {
            StartAt::CreatedSince(at.timestamp_millis())
        }
        _ => StartAt::TrimHorizon,
    }
}

/// Records of a shard created before this are read but not produced, whatever the shard's
/// start: a shard still reading through what predates its start position (`at_timestamp`,
/// a snapshot's hand-off, `latest` after a restart) keeps skipping it after a restart from a
/// checkpoint taken part of the way. Records after a produced one are newer anyway.
pub fn skip_before_for(
    shard_id: &str,
    checkpoint: Option<&ShardCheckpoint>,
    state: &TableState,
    start_position: StartPosition,
) -> Option<i64> {
    if let Some(ms) = checkpoint.and_then(|c| c.created_since_ms) {
        return Some(ms);
    }
    if !state.initial_shards.iter().any(|s| s == shard_id) {
        return None;
    }
    if let Some(started) = state.snapshot_started_at_ms {
        return Some(started - HANDOFF_MARGIN_MS);
    }
    match start_position {
        StartPosition::Latest => Some(state.created_at_ms),
        StartPosition::AtTimestamp(at) => Some(at.timestamp_millis()),
        StartPosition::TrimHorizon => None,
    }
}

/// How long DynamoDB Streams keeps a record.
pub const STREAM_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// `start_position: {at_timestamp}` older than the stream's retention: the WARN a brand-new
/// pipeline logs (`None` when the time is within it, or for the other start positions).
pub fn start_position_warning(start_position: StartPosition, now_ms: i64) -> Option<String> {
    let StartPosition::AtTimestamp(at) = start_position else {
        return None;
    };
    let age_ms = now_ms - at.timestamp_millis();
    (age_ms > STREAM_RETENTION_MS).then(|| {
        format!(
            "start_position.at_timestamp {} is {:.1} h ago, older than the stream's 24 h retention: \
             changes made before the oldest record the stream still holds are not delivered \
             (everything it still holds is); use a snapshot (initial load) to capture the table's items",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            age_ms as f64 / 3_600_000.0
        )
    })
}

/// How a stream's pipeline state is found when the table task opens it.
enum Pipeline {
    /// A brand-new pipeline: `start_position` applies to the shards listed now, or, when
    /// it begins with a snapshot started then, the hand-off from it.
    First { snapshot_started_at_ms: Option<i64> },
    /// The state saved for this stream: a restart resumes it.
    Saved(TableState),
    /// The stream after one that was read to its end (or lost): every shard is new.
    Successor,
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
    /// DescribeStream said the stream does not exist (when it was opened).
    missing: Option<String>,
    /// The state was saved by an earlier run of the daemon.
    resumed: bool,
}

impl StreamRun {
    /// Lists `stream_arn` and loads (or starts and saves) its pipeline state and checkpoints.
    async fn open(
        ctx: &TableContext,
        stream_arn: String,
        pipeline: Pipeline,
        cancel: &CancellationToken,
    ) -> Result<Self, Error> {
        let table = &ctx.table;
        let (shards, missing) =
            match discovery::list_shards(&ctx.aws.streams, &stream_arn, cancel).await {
                Ok(l) => (l.shards, None),
                Err(DiscoveryError::StreamNotFound { message, .. }) => (Vec::new(), Some(message)),
                Err(e) => return Err(discovery_error(table, e)),
            };
        let resumed = matches!(pipeline, Pipeline::Saved(_));
        let state = match pipeline {
            Pipeline::Saved(s) => s,
            Pipeline::First { .. } | Pipeline::Successor => {
                let first = matches!(pipeline, Pipeline::First { .. });
                let s = TableState {
                    stream_arn: stream_arn.clone(),
                    // Only a brand-new pipeline honours start_position; a replaced
                    // stream's shards are all new.
                    initial_shards: if first {
                        shards.iter().map(|s| s.shard_id.clone()).collect()
                    } else {
                        Vec::new()
                    },
                    created_at_ms: chrono::Utc::now().timestamp_millis(),
                    next_stream_arn: None,
                    snapshot_started_at_ms: match pipeline {
                        Pipeline::First {
                            snapshot_started_at_ms,
                        } => snapshot_started_at_ms,
                        _ => None,
                    },
                };
                if first && s.snapshot_started_at_ms.is_none() {
                    if let Some(w) = start_position_warning(
                        ctx.config.start_position_for(&ctx.table),
                        s.created_at_ms,
                    ) {
                        warn!(table = %table, "{w}");
                    }
                }
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
            listing: shards,
            checkpoints,
            finished,
            gone: HashSet::new(),
            missing,
            resumed,
        })
    }

    /// Every listed shard ended or is gone: nothing more to read on this stream.
    fn drained(&self) -> bool {
        self.listing
            .iter()
            .all(|s| self.finished.contains(&s.shard_id) || self.gone.contains(&s.shard_id))
    }

    /// Why the stream can no longer be read at all: it no longer exists, or it lists no
    /// shard (every one trimmed). `None` while it can be.
    fn unreadable(&self) -> Option<String> {
        match &self.missing {
            Some(message) => Some(format!("DescribeStream: {message}")),
            None if self.listing.is_empty() => {
                Some("the stream lists no shard any more (every shard trimmed)".into())
            }
            None => None,
        }
    }

    /// Shards read part of the way that the stream no longer lists: the rest of them is
    /// lost. As (shard, last sequence number acknowledged).
    fn unlisted_unfinished(&self) -> Vec<(String, Option<String>)> {
        let listed: HashSet<&str> = self.listing.iter().map(|s| s.shard_id.as_str()).collect();
        let mut lost: Vec<(String, Option<String>)> = self
            .checkpoints
            .values()
            .filter(|c| !c.ended && !listed.contains(c.shard_id.as_str()))
            .map(|c| (c.shard_id.clone(), c.sequence_number.clone()))
            .collect();
        lost.sort();
        lost
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
/// error. A stream being drained when the daemon stopped, or replaced while it was down,
/// is read to its end first; when it can no longer be read, `on_trimmed_data` decides.
pub async fn run_table(ctx: TableContext, cancel: CancellationToken) -> Result<(), Error> {
    let table = ctx.table.clone();
    let mode = ctx.config.sync_mode_for(&table);
    if mode == SyncMode::Snapshot {
        // A load of its own: no stream needed, a finished one is started again.
        return match snapshot::run_snapshot(snapshot_context(&ctx, SnapshotKind::Pipeline), &cancel)
            .await?
        {
            SnapshotOutcome::Completed(_) => {
                info!(table = %table, "table loaded (sync_mode snapshot): nothing more to do for it");
                Ok(())
            }
            SnapshotOutcome::Stopped | SnapshotOutcome::Paused => Ok(()),
        };
    }
    let stream = discovery::describe_table(&ctx.aws.dynamodb, &table, &cancel)
        .await
        .map_err(|e| discovery_error(&table, e))?;
    info!(table = %table, stream_arn = %stream.stream_arn, view_type = %stream.view_type, topic = %ctx.producer.topic, sync_mode = mode.as_str(), "capturing table");
    let (arn, pipeline) = match ctx.store.load_table(&table)? {
        None => {
            let snapshot_started_at_ms = if mode == SyncMode::SnapshotCdc {
                // The snapshot's start is saved before the pipeline's state: a crash in
                // between resumes this snapshot, with the same hand-off time.
                let cp = snapshot::load_or_start(
                    ctx.store.as_ref(),
                    &table,
                    SnapshotKind::Pipeline,
                    ctx.config.snapshot.segments,
                )?;
                ctx.store
                    .save_snapshot(&table, SnapshotKind::Pipeline, &cp)?;
                Some(cp.started_at_ms)
            } else {
                None
            };
            (
                stream.stream_arn.clone(),
                Pipeline::First {
                    snapshot_started_at_ms,
                },
            )
        }
        Some(saved) => {
            if saved.stream_arn != stream.stream_arn {
                info!(table = %table, old_stream_arn = %saved.stream_arn, stream_arn = %stream.stream_arn,
                    next_stream_arn = saved.next_stream_arn.as_deref().unwrap_or(""),
                    "the table has a newer stream; reading the old one to its end first");
            }
            if mode == SyncMode::SnapshotCdc && saved.snapshot_started_at_ms.is_none() {
                snapshot::warn_existing_pipeline(&table, mode.as_str());
            }
            (saved.stream_arn.clone(), Pipeline::Saved(saved))
        }
    };
    let run = StreamRun::open(&ctx, arn, pipeline, &cancel).await?;
    let mut table_run = TableRun {
        status: TableStatus::Stream(stream.stream_arn),
        ctx,
        phase: cancel.child_token(),
        cancel,
        run,
        tasks: JoinSet::new(),
        running: HashSet::new(),
        need_listing: false,
        resnapshot: None,
        catch_up: None,
        opened: false,
    };
    if let Some(started) = table_run.run.state.snapshot_started_at_ms {
        let done = table_run
            .ctx
            .store
            .load_snapshot(&table, SnapshotKind::Pipeline)?
            .is_some_and(|c| c.completed_at_ms.is_some());
        if !done {
            if table_run.load().await? {
                return Ok(());
            }
            info!(table = %table, from_ms = started - HANDOFF_MARGIN_MS,
                "snapshot done: streaming the changes made since it started");
        }
    }
    table_run.run().await
}

/// What the table's snapshot of `kind` needs.
pub fn snapshot_context(ctx: &TableContext, kind: SnapshotKind) -> SnapshotContext {
    SnapshotContext {
        table: ctx.table.clone(),
        dynamodb: ctx.aws.dynamodb.clone(),
        producer: ctx.producer.clone(),
        budget: ctx.budget.clone(),
        store: ctx.store.clone(),
        settings: ctx.config.snapshot.clone(),
        kind,
        max_inflight_pages: ctx.config.reader.max_inflight_pages.get(),
        max_message_bytes: ctx.config.kafka.max_message_bytes.get(),
        checkpoint_interval: Duration::from_millis(ctx.config.checkpoint.interval_ms),
        dead_letter: ctx.dead_letter.clone(),
        scan_phase: None,
    }
}

/// One table task: the stream it reads, its shard readers, what DescribeTable said.
struct TableRun {
    ctx: TableContext,
    cancel: CancellationToken,
    run: StreamRun,
    status: TableStatus,
    tasks: JoinSet<(String, Result<ShardOutcome, Error>)>,
    running: HashSet<String>,
    /// A rescan is due: the timer fired, a shard ended without its children listed, or a
    /// shard is gone.
    need_listing: bool,
    /// The readers' token: a child of `cancel`, cancelled to stop every reader for a
    /// re-snapshot.
    phase: CancellationToken,
    /// A re-snapshot is due (`on_trimmed_data: resnapshot`), for these trimmed shards: once
    /// every reader stopped, the table is loaded again.
    resnapshot: Option<Vec<String>>,
    /// A stream phase between two scan phases of a snapshot: it ends once every reader
    /// reached its shard's tip, or at the deadline.
    catch_up: Option<(Arc<AtTip>, tokio::time::Instant)>,
    /// `on_stream_opened` ran for the stream being read.
    opened: bool,
}

impl TableRun {
    async fn run(mut self) -> Result<(), Error> {
        self.guarded().await
    }

    /// [`TableRun::drive`]; on an error the other readers stop at their last acknowledged
    /// record first.
    async fn guarded(&mut self) -> Result<(), Error> {
        let result = self.drive().await;
        if let Err(e) = &result {
            error!(table = %self.ctx.table, error = %e, "table stopped");
            // The others stop at their last acknowledged record.
            self.cancel.cancel();
            while self.tasks.join_next().await.is_some() {}
        }
        result
    }

    /// Runs (or resumes) the table's pipeline snapshot. A scan longer than
    /// `snapshot.scan_phase_seconds` pauses after it (its pages in flight acknowledged and
    /// saved), the stream catches up (every reader at its shard's tip, or for as long again),
    /// then the scan resumes: the scan and the stream never run at once, so a SNAPSHOT row
    /// is never produced after a change to its item made later than the row was read, and
    /// the stream's position stays far within its 24 h retention. True when shutdown
    /// stopped it.
    async fn load(&mut self) -> Result<bool, Error> {
        let phase = Duration::from_secs(self.ctx.config.snapshot.scan_phase_seconds);
        loop {
            let mut snapshot = snapshot_context(&self.ctx, SnapshotKind::Pipeline);
            snapshot.scan_phase = Some(phase);
            match snapshot::run_snapshot(snapshot, &self.cancel).await? {
                SnapshotOutcome::Completed(_) => return Ok(false),
                SnapshotOutcome::Stopped => return Ok(true),
                SnapshotOutcome::Paused => {}
            }
            info!(table = %self.ctx.table, "snapshot paused: the stream catches up before the scan goes on");
            self.catch_up = Some((
                Arc::new(AtTip::default()),
                tokio::time::Instant::now() + phase,
            ));
            self.guarded().await?;
            if self.cancel.is_cancelled() {
                return Ok(true);
            }
            info!(table = %self.ctx.table, "stream caught up: the snapshot goes on");
        }
    }

    /// The readers saved their positions as they stopped: the next ones start from those.
    fn reload_checkpoints(&mut self) -> Result<(), Error> {
        let run = &mut self.run;
        run.checkpoints = self
            .ctx
            .store
            .load_shards(&self.ctx.table)?
            .into_iter()
            .filter(|c| c.stream_arn == run.stream_arn)
            .map(|c| (c.shard_id.clone(), c))
            .collect();
        Ok(())
    }

    async fn drive(&mut self) -> Result<(), Error> {
        if !self.opened {
            self.opened = true;
            self.on_stream_opened().await?;
        }
        let reader = &self.ctx.config.reader;
        let mut rescan = tokio::time::interval(Duration::from_millis(reader.rescan_interval_ms));
        rescan.set_missed_tick_behavior(MissedTickBehavior::Skip);
        rescan.tick().await;
        let cancel = self.cancel.clone();
        loop {
            if self.need_listing && !cancel.is_cancelled() {
                self.need_listing = false;
                self.relist().await?;
            }
            if self.resnapshot.is_some() && self.tasks.is_empty() && !cancel.is_cancelled() {
                if Box::pin(self.load_again()).await? {
                    return Ok(());
                }
                continue;
            }
            if !cancel.is_cancelled()
                && self.resnapshot.is_none()
                && self.switch_stream_if_drained().await?
            {
                continue;
            }
            if !cancel.is_cancelled() && self.resnapshot.is_none() && !self.phase.is_cancelled() {
                self.start_readable();
                crate::telemetry::get().table_started(&self.ctx.table);
            }
            if let Some((tip, deadline)) = &self.catch_up {
                if !self.phase.is_cancelled()
                    && (tip.all(&self.running) || tokio::time::Instant::now() >= *deadline)
                {
                    // Every reader stops at its last acknowledged record.
                    self.phase.cancel();
                }
                if self.phase.is_cancelled() && self.tasks.is_empty() {
                    self.catch_up = None;
                    self.reload_checkpoints()?;
                    self.phase = self.cancel.child_token();
                    self.publish_shards();
                    return Ok(());
                }
            }
            self.publish_shards();
            if cancel.is_cancelled() && self.tasks.is_empty() {
                return Ok(());
            }
            tokio::select! {
                biased;
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.on_joined(joined.expect("set is not empty"))?;
                    // Shards that ended meanwhile: one listing serves them all.
                    while let Some(joined) = self.tasks.try_join_next() {
                        self.on_joined(joined)?;
                    }
                }
                _ = rescan.tick(), if !cancel.is_cancelled() => self.need_listing = true,
                _ = async { self.catch_up.as_ref().expect("guarded").0.changed().await },
                    if self.catch_up.is_some() && !self.phase.is_cancelled() => {}
                _ = tokio::time::sleep_until(self.catch_up.as_ref().map_or_else(tokio::time::Instant::now, |c| c.1)),
                    if self.catch_up.is_some() && !self.phase.is_cancelled() => {}
                _ = cancel.cancelled(), if !cancel.is_cancelled() => {
                    info!(table = %self.ctx.table, shards = self.tasks.len(), "stopping: draining shard readers");
                }
            }
        }
    }

    /// DescribeStream (every page), then DescribeTable.
    async fn relist(&mut self) -> Result<(), Error> {
        let (ctx, run) = (&self.ctx, &mut self.run);
        match discovery::list_shards(&ctx.aws.streams, &run.stream_arn, &self.cancel).await {
            Ok(l) => run.listing = l.shards,
            Err(DiscoveryError::Cancelled) => {}
            Err(DiscoveryError::StreamNotFound { message, .. }) => {
                warn!(table = %ctx.table, stream_arn = %run.stream_arn, error = %message, "stream no longer exists");
                run.gone
                    .extend(run.listing.iter().map(|s| s.shard_id.clone()));
            }
            Err(e) => return Err(discovery_error(&ctx.table, e)),
        }
        match table_status(ctx, &self.cancel).await {
            Ok(s) => self.status = s,
            Err(e) if self.cancel.is_cancelled() => {
                debug!(error = %e, "describe table cancelled")
            }
            Err(e) => {
                warn!(table = %ctx.table, error = %e, "DescribeTable failed; trying again at the next rescan")
            }
        }
        self.note_next_stream()
    }

    /// The table has a newer stream than the one read: saves that this one is being
    /// drained and which stream follows (the first newer one seen), so that a restart
    /// finishes the drain first.
    fn note_next_stream(&mut self) -> Result<(), Error> {
        let TableStatus::Stream(latest) = &self.status else {
            return Ok(());
        };
        let state = &mut self.run.state;
        if *latest == self.run.stream_arn || state.next_stream_arn.is_some() {
            return Ok(());
        }
        info!(table = %self.ctx.table, stream_arn = %self.run.stream_arn, next_stream_arn = %latest,
            "the table has a new stream; reading the old one to its end first");
        state.next_stream_arn = Some(latest.clone());
        self.ctx.store.save_table(&self.ctx.table, state)
    }

    /// After a stream was opened: notes a newer stream, and applies `on_trimmed_data` when
    /// the stream being drained lost records that were never read.
    async fn on_stream_opened(&mut self) -> Result<(), Error> {
        self.note_next_stream()?;
        let Some(next) = self.run.state.next_stream_arn.clone() else {
            return Ok(());
        };
        let run = &self.run;
        let unreadable = run.unreadable();
        let mut lost = run.unlisted_unfinished();
        if unreadable.is_none() && lost.is_empty() {
            return Ok(());
        }
        if unreadable.is_some() && lost.is_empty() {
            // No shard read part of the way: what the stream held is unknown, and lost.
            lost.push((String::new(), None));
        }
        let reason = unreadable.unwrap_or_else(|| "shards were trimmed".into());
        let shards = lost
            .iter()
            .map(|(id, seq)| {
                let id = if id.is_empty() { "unknown" } else { id };
                format!("{id} after {}", seq.as_deref().unwrap_or("its start"))
            })
            .collect::<Vec<_>>()
            .join(", ");
        if self.ctx.config.on_trimmed_data == OnTrimmedData::Fail {
            return Err(Error::Table {
                table: self.ctx.table.clone(),
                message: format!(
                    "the old stream {} can no longer be read to its end ({reason}): the records \
                     it held after the checkpoints were lost before they could be read (shards: \
                     {shards}). Set on_trimmed_data to \"skip_to_trim_horizon\" to continue with \
                     the table's stream {next}, with a DATA_LOSS marker on the topic",
                    run.stream_arn
                ),
            });
        }
        error!(
            table = %self.ctx.table,
            stream_arn = %run.stream_arn,
            next_stream_arn = %next,
            reason = %reason,
            lost_shards = %shards,
            on_trimmed_data = ?self.ctx.config.on_trimmed_data,
            "DATA LOSS: the old stream can no longer be read to its end; records it held were lost before they were read"
        );
        if self.ctx.config.on_trimmed_data == OnTrimmedData::Resnapshot {
            self.resnapshot = Some(Vec::new());
        }
        let markers = lost
            .iter()
            .map(|(shard_id, seq)| {
                let source = Source {
                    table: self.ctx.table.clone(),
                    stream_arn: run.stream_arn.clone(),
                    shard_id: shard_id.clone(),
                };
                dead_letter::data_loss_marker(&source, seq.as_deref(), None)
            })
            .collect::<Vec<_>>();
        let count = markers.len() as u64;
        send_on_every_partition(&self.ctx.producer, markers).await?;
        crate::telemetry::get().data_loss(&self.ctx.table, count);
        // Reported once: the stream no longer holds them.
        for (shard_id, _) in lost.iter().filter(|(id, _)| !id.is_empty()) {
            self.ctx.store.remove_shard(&self.ctx.table, shard_id)?;
            self.run.checkpoints.remove(shard_id);
        }
        Ok(())
    }

    /// The stream was read to its end and every reader stopped: moves on to the next
    /// stream, waits for one (WARN), or stops for a deleted table. True when it switched.
    async fn switch_stream_if_drained(&mut self) -> Result<bool, Error> {
        if !self.running.is_empty() || !self.run.drained() {
            return Ok(false);
        }
        let table = &self.ctx.table;
        let next = match (&self.run.state.next_stream_arn, &self.status) {
            (Some(next), _) => next.clone(),
            (None, TableStatus::Stream(arn)) if *arn == self.run.stream_arn => return Ok(false),
            (None, TableStatus::Stream(arn)) => arn.clone(),
            (None, TableStatus::NoStream) => {
                warn!(
                    table = %table,
                    stream_arn = %self.run.stream_arn,
                    "the table's stream is disabled and was read to its end; waiting for a stream to be enabled"
                );
                return Ok(false);
            }
            (None, TableStatus::Deleted) => {
                return Err(Error::TableDeleted {
                    table: table.clone(),
                    stream_arn: self.run.stream_arn.clone(),
                })
            }
        };
        info!(table = %table, old_stream_arn = %self.run.stream_arn, stream_arn = %next, "old stream read to its end; switching to the table's new stream");
        self.run = StreamRun::open(&self.ctx, next, Pipeline::Successor, &self.cancel).await?;
        self.on_stream_opened().await?;
        Ok(true)
    }

    /// `dynamodb_cdc_shards`: the stream's shards being read, waiting for their parent,
    /// and finished.
    fn publish_shards(&self) {
        let run = &self.run;
        let finished = run
            .listing
            .iter()
            .filter(|s| run.finished.contains(&s.shard_id))
            .count();
        let waiting = run
            .listing
            .iter()
            .filter(|s| {
                !run.finished.contains(&s.shard_id)
                    && !self.running.contains(&s.shard_id)
                    && !run.gone.contains(&s.shard_id)
            })
            .count();
        crate::telemetry::get().set_shards(&self.ctx.table, self.running.len(), waiting, finished);
    }

    /// Starts a reader on every shard lineage allows.
    fn start_readable(&mut self) {
        let (ctx, run) = (&self.ctx, &mut self.run);
        let table = &ctx.table;
        prune(ctx, &run.listing, &mut run.checkpoints);
        let readable: Vec<ShardInfo> =
            lineage::readable(&run.listing, &run.finished, &self.running)
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
                run.resumed,
                ctx.config.start_position_for(&ctx.table),
            );
            info!(table = %table, shard_id = %id, parent_shard_id = shard.parent_shard_id.as_deref().unwrap_or(""), start = ?start, "starting shard reader");
            let mut shard_ctx = shard_context(ctx, &run.state, &id);
            shard_ctx.skip_created_before_ms = skip_before_for(
                &id,
                run.checkpoints.get(&id),
                &run.state,
                ctx.config.start_position_for(&ctx.table),
            );
            shard_ctx.at_tip = self.catch_up.as_ref().map(|c| c.0.clone());
            let previous = run.checkpoints.get(&id).cloned();
            let span = tracing::info_span!("shard", table = %table, shard_id = %id);
            let shard_cancel = self.phase.clone();
            self.running.insert(id.clone());
            self.tasks.spawn(
                async move {
                    let r = shard_reader::run_shard(shard_ctx, start, previous, shard_cancel).await;
                    (id, r)
                }
                .instrument(span),
            );
        }
    }

    /// `on_trimmed_data: resnapshot`, once every reader stopped: loads the table again
    /// (a new snapshot of the pipeline), and has each trimmed shard read from TRIM_HORIZON
    /// skipping what was created more than a second before that snapshot started; the other
    /// shards resume at their checkpoints. A restart during the load resumes it first (the
    /// table state names it). True when shutdown stopped the load.
    async fn load_again(&mut self) -> Result<bool, Error> {
        let (ctx, run) = (&self.ctx, &mut self.run);
        let table = &ctx.table;
        let trimmed = self.resnapshot.clone().unwrap_or_default();
        let started = chrono::Utc::now().timestamp_millis();
        let snapshot =
            crate::checkpoint::SnapshotCheckpoint::start(started, ctx.config.snapshot.segments);
        ctx.store
            .save_snapshot(table, SnapshotKind::Pipeline, &snapshot)?;
        for shard_id in &trimmed {
            let c = ShardCheckpoint {
                stream_arn: run.stream_arn.clone(),
                shard_id: shard_id.clone(),
                sequence_number: None,
                ended: false,
                updated_at_ms: started,
                created_since_ms: Some(started - HANDOFF_MARGIN_MS),
            };
            ctx.store.save_shard(table, &c)?;
            run.checkpoints.insert(shard_id.clone(), c);
        }
        run.state.snapshot_started_at_ms = Some(started);
        ctx.store.save_table(table, &run.state)?;
        warn!(table = %table, trimmed_shards = %trimmed.join(","),
            "loading the table again after trimmed records (on_trimmed_data = resnapshot); the stream follows");
        self.resnapshot = None;
        // The readers saved their positions as they stopped: start from those.
        self.reload_checkpoints()?;
        self.phase = self.cancel.child_token();
        if self.load().await? {
            return Ok(true);
        }
        self.reload_checkpoints()?;
        Ok(false)
    }

    /// A reader stopped.
    fn on_joined(
        &mut self,
        joined: Result<(String, Result<ShardOutcome, Error>), tokio::task::JoinError>,
    ) -> Result<(), Error> {
        let table = &self.ctx.table;
        let (shard_id, result) = joined
            .map_err(|e| Error::Internal(format!("table {table}: a shard task panicked: {e}")))?;
        self.running.remove(&shard_id);
        self.on_shard_done(shard_id, result?);
        Ok(())
    }

    fn on_shard_done(&mut self, shard_id: String, outcome: ShardOutcome) {
        let run = &mut self.run;
        match outcome {
            ShardOutcome::Ended => {
                // Its children may be listed now, unless the last listing showed them.
                if !run
                    .listing
                    .iter()
                    .any(|s| s.parent_shard_id.as_deref() == Some(shard_id.as_str()))
                {
                    self.need_listing = true;
                }
                run.finished.insert(shard_id.clone());
                run.checkpoints.insert(
                    shard_id.clone(),
                    ShardCheckpoint {
                        stream_arn: run.stream_arn.clone(),
                        shard_id,
                        sequence_number: None,
                        ended: true,
                        updated_at_ms: chrono::Utc::now().timestamp_millis(),
                        created_since_ms: None,
                    },
                );
            }
            ShardOutcome::Stopped => {}
            ShardOutcome::Trimmed => {
                // Every reader stops at its last acknowledged record; then the table is
                // loaded again (`load_again`).
                self.resnapshot.get_or_insert_with(Vec::new).push(shard_id);
                self.phase.cancel();
            }
            ShardOutcome::Gone(message) => {
                warn!(table = %self.ctx.table, shard_id = %shard_id, stream_arn = %run.stream_arn, error = %message,
                    "shard or stream no longer exists (stream disabled or table deleted)");
                run.gone.insert(shard_id);
                self.need_listing = true;
            }
        }
    }
}

/// What a shard reader of `stream_arn` needs.
fn shard_context(ctx: &TableContext, state: &TableState, shard_id: &str) -> ShardContext {
    let reader = &ctx.config.reader;
    ShardContext {
        source: Source {
            table: ctx.table.clone(),
            stream_arn: state.stream_arn.clone(),
            shard_id: shard_id.to_owned(),
        },
        streams: ctx.aws.streams.clone(),
        producer: ctx.producer.clone(),
        budget: ctx.budget.clone(),
        pipeline_started_ms: state.created_at_ms,
        store: ctx.store.clone(),
        tombstones: ctx.config.kafka.tombstones,
        max_calls_per_second: reader.max_calls_per_second_per_shard,
        get_records_client: reader.get_records_client,
        idle_poll_interval: Duration::from_millis(reader.idle_poll_interval_ms),
        max_inflight_pages: reader.max_inflight_pages.get(),
        checkpoint_interval: Duration::from_millis(ctx.config.checkpoint.interval_ms),
        on_trimmed_data: ctx.config.on_trimmed_data,
        dead_letter: ctx.dead_letter.clone(),
        max_message_bytes: ctx.config.kafka.max_message_bytes.get(),
        at_tip: None,
        skip_created_before_ms: None,
    }
}

/// Sends each record on every partition of the topic and waits until Kafka acknowledged
/// them all.
async fn send_on_every_partition(
    producer: &TopicProducer,
    records: Vec<rskafka::record::Record>,
) -> Result<(), Error> {
    let mut acks = Vec::new();
    for record in &records {
        acks.extend(producer.send_to_every_partition(record).await);
    }
    for ack in acks {
        ack.await
            .map_err(|_| Error::Internal("a partition producer stopped".into()))??;
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
            next_stream_arn: None,
            snapshot_started_at_ms: None,
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
            created_since_ms: None,
        };
        let st = state();
        assert_eq!(
            start_for("old", None, &st, false, StartPosition::Latest),
            StartAt::Latest
        );
        assert_eq!(
            start_for("new", None, &st, false, StartPosition::Latest),
            StartAt::TrimHorizon
        );
        assert_eq!(
            start_for("old", None, &st, false, StartPosition::TrimHorizon),
            StartAt::TrimHorizon
        );
        assert_eq!(
            start_for("old", Some(&cp), &st, true, StartPosition::Latest),
            StartAt::After("42".into())
        );
        // A restart before the shard saved a position: no LATEST again (it would skip what
        // was written meanwhile), but TRIM_HORIZON without what predates the pipeline.
        assert_eq!(
            start_for("old", None, &st, true, StartPosition::Latest),
            StartAt::CreatedSince(st.created_at_ms)
        );
        assert_eq!(
            start_for("new", None, &st, true, StartPosition::Latest),
            StartAt::TrimHorizon
        );
    }

    #[test]
    fn at_timestamp_skips_what_predates_it_on_initial_shards_only() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .to_utc();
        let pos = StartPosition::AtTimestamp(at);
        let ms = at.timestamp_millis();
        let st = state();
        let cp = ShardCheckpoint {
            stream_arn: "s".into(),
            shard_id: "old".into(),
            sequence_number: Some("7".into()),
            ended: false,
            updated_at_ms: 0,
            created_since_ms: None,
        };
        for resumed in [false, true] {
            assert_eq!(
                start_for("old", None, &st, resumed, pos),
                StartAt::CreatedSince(ms)
            );
            // A shard found later holds only later records: all of them.
            assert_eq!(
                start_for("new", None, &st, resumed, pos),
                StartAt::TrimHorizon
            );
            assert_eq!(
                start_for("old", Some(&cp), &st, resumed, pos),
                StartAt::After("7".into())
            );
        }
    }

    #[test]
    fn after_a_snapshot_initial_shards_start_a_second_before_it() {
        let st = TableState {
            snapshot_started_at_ms: Some(1_700_000_000_500),
            ..state()
        };
        let cp = ShardCheckpoint {
            stream_arn: "s".into(),
            shard_id: "old".into(),
            sequence_number: Some("9".into()),
            ended: false,
            updated_at_ms: 0,
            created_since_ms: None,
        };
        for pos in [StartPosition::Latest, StartPosition::TrimHorizon] {
            for resumed in [false, true] {
                assert_eq!(
                    start_for("old", None, &st, resumed, pos),
                    StartAt::CreatedSince(1_699_999_999_500)
                );
                assert_eq!(
                    start_for("new", None, &st, resumed, pos),
                    StartAt::TrimHorizon
                );
                assert_eq!(
                    start_for("old", Some(&cp), &st, resumed, pos),
                    StartAt::After("9".into())
                );
            }
        }
    }

    #[test]
    fn skipping_outlives_the_first_checkpoint() {
        let at = chrono::DateTime::from_timestamp_millis(7_000).unwrap();
        let cp = ShardCheckpoint {
            stream_arn: "s".into(),
            shard_id: "old".into(),
            sequence_number: Some("3".into()),
            ended: false,
            updated_at_ms: 0,
            created_since_ms: None,
        };
        let st = state();
        let pos = StartPosition::AtTimestamp(at);
        assert_eq!(skip_before_for("old", Some(&cp), &st, pos), Some(7_000));
        assert_eq!(skip_before_for("new", Some(&cp), &st, pos), None);
        assert_eq!(
            skip_before_for("old", Some(&cp), &st, StartPosition::TrimHorizon),
            None
        );
        assert_eq!(
            skip_before_for("old", None, &st, StartPosition::Latest),
            Some(st.created_at_ms)
        );
        let snap = TableState {
            snapshot_started_at_ms: Some(10_000),
            ..state()
        };
        assert_eq!(skip_before_for("old", Some(&cp), &snap, pos), Some(9_000));
        let reloaded = ShardCheckpoint {
            created_since_ms: Some(20_000),
            ..cp
        };
        assert_eq!(
            skip_before_for("new", Some(&reloaded), &snap, pos),
            Some(20_000)
        );
    }

    #[test]
    fn a_reloaded_shard_starts_where_its_re_snapshot_began() {
        let cp = ShardCheckpoint {
            stream_arn: "s".into(),
            shard_id: "old".into(),
            sequence_number: None,
            ended: false,
            updated_at_ms: 0,
            created_since_ms: Some(5_000),
        };
        let st = TableState {
            snapshot_started_at_ms: Some(6_000),
            ..state()
        };
        assert_eq!(
            start_for("old", Some(&cp), &st, true, StartPosition::Latest),
            StartAt::CreatedSince(5_000)
        );
        let read = ShardCheckpoint {
            sequence_number: Some("12".into()),
            ..cp
        };
        assert_eq!(
            start_for("old", Some(&read), &st, true, StartPosition::Latest),
            StartAt::After("12".into())
        );
    }

    #[test]
    fn at_timestamp_beyond_retention_warns() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .to_utc();
        let ms = at.timestamp_millis();
        let pos = StartPosition::AtTimestamp(at);
        assert_eq!(start_position_warning(pos, ms + STREAM_RETENTION_MS), None);
        let w = start_position_warning(pos, ms + STREAM_RETENTION_MS + 3_600_000).unwrap();
        assert!(
            w.contains("2026-11-30T12:00:00Z") && w.contains("25.0 h"),
            "{w}"
        );
        assert_eq!(
            start_position_warning(StartPosition::Latest, i64::MAX),
            None
        );
    }
}
