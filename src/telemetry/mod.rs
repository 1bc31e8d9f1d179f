//! What the daemon tells operators about itself: Prometheus metrics, the progress that
//! `/healthz` and systemd's watchdog judge, and systemd's one-line `STATUS=`.
//!
//! ```text
//! shard readers ──▶ ShardProgress (last GetRecords, pages read but not acknowledged,
//!   │                 acknowledged but not checkpointed)
//!   │ checkpointer ──▶ changes_total, last change / checkpoint times
//! AWS retry loop ──▶ aws_requests_total{operation,outcome}, aws_request_duration_seconds
//! partition tasks ─▶ produce_requests_total, produce_duration_seconds, Kafka last OK
//! supervisors ─────▶ shards{state}, table started (readiness)
//!                          │ one Telemetry per process (telemetry::get())
//!            ┌─────────────┼────────────────────┐
//!   server.rs: /metrics /healthz /readyz   systemd.rs: READY, STATUS, WATCHDOG
//!                  (health.rs judges progress against health.max_stall_seconds)
//! ```
//!
//! No label holds a shard id or an item key: shards roll every few hours and keys are
//! unbounded, so the series stay bounded by the number of tables. Shard ids appear only
//! in `/healthz`'s JSON body.

pub mod bars;
pub mod health;
pub mod server;
pub mod systemd;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::aws::RoleCredentials;
use crate::budget::Budget;
use crate::error::AwsErrorKind;

/// A series per table.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardStateLabel {
    table: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsLabel {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// A gauge without labels that is served only once it was set (without a role there is
/// no expiry to show, and a `0` would look like an expired session).
#[derive(Debug, Clone, Default)]
struct Optional {
    value: Arc<Mutex<Option<f64>>>,
}

impl Optional {
    fn set(&self, v: f64) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }
}

/// Serves an [`Optional`] under `name`.
#[derive(Debug)]
struct OptionalCollector {
    name: &'static str,
    help: &'static str,
    gauge: Optional,
}

impl prometheus_client::collector::Collector for OptionalCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let value = *self.gauge.value.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = value {
            let metric = prometheus_client::metrics::gauge::ConstGauge::new(v);
            let m = encoder.encode_descriptor(self.name, self.help, None, metric.metric_type())?;
            metric.encode(m)?;
        }
        Ok(())
    }
}
type FloatGauges = Family<TableLabel, Gauge<f64, AtomicU64>>;

/// The shard states of `dynamodb_cdc_shards`.
pub const SHARD_STATES: [&str; 3] = ["reading", "waiting_for_parent", "finished"];

/// Buckets of `dynamodb_cdc_produce_duration_seconds` and
/// `dynamodb_cdc_aws_request_duration_seconds`: 1 ms to ~16 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// A histogram of [`duration_buckets`], the constructor of a family of them.
fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// Every metric family; gauges that describe state are set from [`State`] at each scrape.
#[derive(Debug)]
struct Families {
    changes: Family<TableLabel, Counter>,
    snapshot_rows: Family<TableLabel, Counter>,
    dead_letters: Family<TableLabel, Counter>,
    data_loss: Family<TableLabel, Counter>,
    lag: FloatGauges,
    last_change_age: FloatGauges,
    checkpoint_age: FloatGauges,
    snapshot_progress: FloatGauges,
    shards: Family<ShardStateLabel, Gauge>,
    aws_requests: Family<AwsLabel, Counter>,
    aws_request_duration: Family<OperationLabel, Histogram, fn() -> Histogram>,
    produce_requests: Family<OutcomeLabel, Counter>,
    produce_duration: Histogram,
    buffered_bytes: Gauge,
    credentials_expiry: Optional,
    healthy: Gauge,
    ready: Gauge,
    discovery_rounds: Family<OutcomeLabel, Counter>,
    discovered_tables: Gauge,
    skipped_tables: Gauge,
}

impl Families {
    fn register() -> (Registry, Self) {
        let f = Families {
            changes: Family::default(),
            snapshot_rows: Family::default(),
            dead_letters: Family::default(),
            data_loss: Family::default(),
            lag: Family::default(),
            last_change_age: Family::default(),
            checkpoint_age: Family::default(),
            snapshot_progress: Family::default(),
            shards: Family::default(),
            aws_requests: Family::default(),
            aws_request_duration: Family::new_with_constructor(duration_histogram),
            produce_requests: Family::default(),
            produce_duration: duration_histogram(),
            buffered_bytes: Gauge::default(),
            credentials_expiry: Optional::default(),
            healthy: Gauge::default(),
            ready: Gauge::default(),
            discovery_rounds: Family::default(),
            discovered_tables: Gauge::default(),
            skipped_tables: Gauge::default(),
        };
        let mut r = Registry::with_prefix("dynamodb_cdc");
        r.register(
            "changes",
            "Changes acknowledged by Kafka (stream records; tombstones and markers not counted)",
            f.changes.clone(),
        );
        r.register(
            "snapshot_rows",
            "Snapshot rows acknowledged by Kafka",
            f.snapshot_rows.clone(),
        );
        r.register(
            "dead_letters",
            "Poison records written to the dead-letter topic",
            f.dead_letters.clone(),
        );
        r.register(
            "data_loss",
            "DATA_LOSS markers written (records trimmed from the stream before they were read)",
            f.data_loss.clone(),
        );
        r.register(
            "lag_seconds",
            "Largest, over the table's open shards, of now minus the creation time of the oldest change read but not yet acknowledged (0 when caught up); a shard whose reads are overdue counts the time since its last GetRecords",
            f.lag.clone(),
        );
        r.register(
            "last_change_age_seconds",
            "Seconds since the table's last change was acknowledged by Kafka (absent before the first)",
            f.last_change_age.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Seconds since the table's last checkpoint write (absent before the first)",
            f.checkpoint_age.clone(),
        );
        r.register(
            "snapshot_progress_ratio",
            "Share of the table's initial load done, 0 to 1 (absent without a snapshot)",
            f.snapshot_progress.clone(),
        );
        r.register(
            "shards",
            "Shards of the stream being read, by state (reading, waiting_for_parent, finished)",
            f.shards.clone(),
        );
        r.register(
            "aws_requests",
            "AWS calls by operation and outcome (ok, throttled, expired_iterator, server_error, client_error)",
            f.aws_requests.clone(),
        );
        r.register(
            "aws_request_duration_seconds",
            "Time of one AWS call attempt by operation, from sending it to its answer read in full (or its failure)",
            f.aws_request_duration.clone(),
        );
        r.register(
            "produce_requests",
            "Kafka produce requests (attempts) by outcome (ok, error)",
            f.produce_requests.clone(),
        );
        r.register(
            "produce_duration_seconds",
            "Time from sending a produce request to its acknowledgement (or failure)",
            f.produce_duration.clone(),
        );
        r.register(
            "buffered_bytes",
            "Bytes of kafka.max_buffered_bytes reserved: pages being read, converted or waiting for Kafka's acknowledgement",
            f.buffered_bytes.clone(),
        );
        r.register_collector(Box::new(OptionalCollector {
            name: "credentials_expiry_timestamp_seconds",
            help: "When the assumed-role session expires, in seconds since the epoch (absent without aws.assume_role)",
            gauge: f.credentials_expiry.clone(),
        }));
        r.register(
            "healthy",
            "1 when /healthz answers 200 (every shard, checkpoint, credentials and Kafka progressing)",
            f.healthy.clone(),
        );
        r.register(
            "ready",
            "1 when /readyz answers 200 (every table started)",
            f.ready.clone(),
        );
        r.register(
            "discovery_rounds",
            "Listings of the account's tables by the rules of tables, by outcome (ok, error)",
            f.discovery_rounds.clone(),
        );
        r.register(
            "discovered_tables",
            "Tables the rules of tables selected at the last round",
            f.discovered_tables.clone(),
        );
        r.register(
            "skipped_tables",
            "Tables a rule matches that are not captured (no stream, a KEYS_ONLY stream, a topic collision) at the last round",
            f.skipped_tables.clone(),
        );
        let build: Family<VersionLabel, Gauge> = Family::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The daemon's version (always 1)", build);
        (r, f)
    }
}

/// How progress is judged.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `health.max_stall_seconds`.
    pub max_stall: Duration,
    /// A shard without a completed GetRecords for longer than this counts the time since
    /// its last one as lag (the longest idle pause plus one request timeout).
    pub poll_overdue: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stall: Duration::from_secs(crate::config::defaults::HEALTH_MAX_STALL_SECONDS),
            poll_overdue: Duration::from_secs(30),
        }
    }
}

/// One shard reader's progress.
#[derive(Debug)]
struct ShardProgress {
    /// The last GetRecords that completed (or when the reader started).
    last_poll: Instant,
    /// Pages handed to Kafka and not yet acknowledged, oldest first: the creation time of
    /// each page's oldest record (ms since the epoch), `None` for a page of markers only.
    pending: VecDeque<Option<i64>>,
    /// The first page acknowledged since the last checkpoint write.
    unsaved_since: Option<Instant>,
}

/// One table's progress.
#[derive(Debug)]
struct TableProgress {
    started: bool,
    shards: BTreeMap<String, Arc<Mutex<ShardProgress>>>,
    last_change: Option<SystemTime>,
    last_checkpoint: Option<SystemTime>,
    changes: Counter,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    started_at: Instant,
    /// The tables the config lists: readiness waits for each of them.
    expected: Vec<String>,
    tables: BTreeMap<String, TableProgress>,
    kafka_ok: Option<Instant>,
    credentials: Option<RoleCredentials>,
    budget: Option<(Budget, usize)>,
}

/// The process's telemetry ([`get`]).
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    families: Families,
    state: Mutex<State>,
    /// Every change acknowledged, all tables together (for STATUS's changes/s).
    total_changes: AtomicU64,
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(Telemetry::new);

/// The process's telemetry: every part of the pipeline reports here.
pub fn get() -> &'static Telemetry {
    &TELEMETRY
}

/// The `outcome` label of an AWS call's result.
pub fn aws_outcome(kind: Option<AwsErrorKind>) -> &'static str {
    match kind {
        None => "ok",
        Some(AwsErrorKind::Throttled) => "throttled",
        Some(AwsErrorKind::ExpiredIterator) => "expired_iterator",
        Some(AwsErrorKind::Transient) => "server_error",
        Some(AwsErrorKind::TrimmedData | AwsErrorKind::NotFound | AwsErrorKind::Fatal) => {
            "client_error"
        }
    }
}

impl Telemetry {
    fn new() -> Self {
        let (registry, families) = Families::register();
        Self {
            registry,
            families,
            state: Mutex::new(State {
                limits: Limits::default(),
                started_at: Instant::now(),
                expected: Vec::new(),
                tables: BTreeMap::new(),
                kafka_ok: None,
                credentials: None,
                budget: None,
            }),
            total_changes: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts judging a pipeline: its limits, the tables it must start, its memory budget
    /// (`kafka.max_buffered_bytes`).
    pub fn start_pipeline(&self, limits: Limits, tables: Vec<String>, budget: (Budget, usize)) {
        let mut s = self.state();
        s.limits = limits;
        s.started_at = Instant::now();
        s.expected = tables;
        s.budget = Some(budget);
    }

    /// The assumed-role session whose expiry is reported and checked.
    pub fn set_credentials(&self, credentials: RoleCredentials) {
        self.state().credentials = Some(credentials);
    }

    /// The tables readiness waits for (after a reload).
    pub fn set_expected_tables(&self, tables: Vec<String>) {
        self.state().expected = tables;
    }

    /// A table no longer captured (removed by a reload): its state series go.
    pub fn forget_table(&self, table: &str) {
        self.state().tables.remove(table);
        let f = &self.families;
        let label = TableLabel {
            table: table.to_owned(),
        };
        for g in [
            &f.lag,
            &f.last_change_age,
            &f.checkpoint_age,
            &f.snapshot_progress,
        ] {
            g.remove(&label);
        }
        for state in SHARD_STATES {
            f.shards.remove(&ShardStateLabel {
                table: table.to_owned(),
                state,
            });
        }
    }

    fn table<'a>(&self, s: &'a mut State, table: &str) -> &'a mut TableProgress {
        s.tables.entry(table.to_owned()).or_insert_with(|| {
            // Counters start at 0 for every table, so that `increase()` sees their first step.
            let label = TableLabel {
                table: table.to_owned(),
            };
            let f = &self.families;
            for c in [&f.snapshot_rows, &f.dead_letters, &f.data_loss] {
                c.get_or_create(&label).inc_by(0);
            }
            TableProgress {
                started: false,
                shards: BTreeMap::new(),
                last_change: None,
                last_checkpoint: None,
                changes: f.changes.get_or_create_owned(&label),
            }
        })
    }

    /// The table's readers were started (the first time: readiness).
    pub fn table_started(&self, table: &str) {
        let mut s = self.state();
        self.table(&mut s, table).started = true;
    }

    /// The table's shards by state, after each supervisor round.
    pub fn set_shards(
        &self,
        table: &str,
        reading: usize,
        waiting_for_parent: usize,
        finished: usize,
    ) {
        for (state, n) in SHARD_STATES
            .into_iter()
            .zip([reading, waiting_for_parent, finished])
        {
            self.families
                .shards
                .get_or_create(&ShardStateLabel {
                    table: table.to_owned(),
                    state,
                })
                .set(n as i64);
        }
    }

    /// A shard reader starts: its progress is watched until the handle is dropped.
    pub fn shard(&self, table: &str, shard_id: &str) -> ShardHandle {
        let progress = Arc::new(Mutex::new(ShardProgress {
            last_poll: Instant::now(),
            pending: VecDeque::new(),
            unsaved_since: None,
        }));
        let mut s = self.state();
        self.table(&mut s, table)
            .shards
            .insert(shard_id.to_owned(), progress.clone());
        ShardHandle {
            table: table.to_owned(),
            shard_id: shard_id.to_owned(),
            progress,
        }
    }

    /// One AWS call attempt: how long it took and its outcome (`None`: it succeeded).
    pub fn aws_request(
        &self,
        operation: &'static str,
        took: Duration,
        failure: Option<AwsErrorKind>,
    ) {
        let f = &self.families;
        f.aws_requests
            .get_or_create(&AwsLabel {
                operation,
                outcome: aws_outcome(failure),
            })
            .inc();
        f.aws_request_duration
            .get_or_create(&OperationLabel { operation })
            .observe(took.as_secs_f64());
    }

    /// One produce attempt, how long it took and whether Kafka acknowledged it.
    pub fn produce_request(&self, took: Duration, ok: bool) {
        let f = &self.families;
        f.produce_duration.observe(took.as_secs_f64());
        f.produce_requests
            .get_or_create(&OutcomeLabel {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.kafka_ok();
        }
    }

    /// Kafka answered a produce or metadata request.
    pub fn kafka_ok(&self) {
        self.state().kafka_ok = Some(Instant::now());
    }

    /// When Kafka last answered.
    pub fn kafka_ok_at(&self) -> Option<Instant> {
        self.state().kafka_ok
    }

    /// A poison record went to the dead-letter topic.
    pub fn dead_letter(&self, table: &str) {
        self.families
            .dead_letters
            .get_or_create(&TableLabel {
                table: table.to_owned(),
            })
            .inc();
    }

    /// A round of table discovery: the tables it selected and skipped, or `None` when it failed.
    pub fn discovery_round(&self, outcome: Option<(usize, usize)>) {
        let label = OutcomeLabel {
            outcome: if outcome.is_some() { "ok" } else { "error" },
        };
        self.families.discovery_rounds.get_or_create(&label).inc();
        if let Some((selected, skipped)) = outcome {
            self.families.discovered_tables.set(selected as i64);
            self.families.skipped_tables.set(skipped as i64);
        }
    }

    /// `markers` DATA_LOSS markers were written for the table.
    pub fn data_loss(&self, table: &str, markers: u64) {
        self.families
            .data_loss
            .get_or_create(&TableLabel {
                table: table.to_owned(),
            })
            .inc_by(markers);
    }

    /// Snapshot rows acknowledged, and the share of the load done.
    pub fn snapshot_rows(&self, table: &str, rows: u64, progress: f64) {
        let label = TableLabel {
            table: table.to_owned(),
        };
        self.families
            .snapshot_rows
            .get_or_create(&label)
            .inc_by(rows);
        self.families
            .snapshot_progress
            .get_or_create(&label)
            .set(progress.clamp(0.0, 1.0));
    }

    /// Every table of the config started its readers.
    pub fn ready(&self) -> bool {
        let s = self.state();
        s.expected
            .iter()
            .all(|t| s.tables.get(t).is_some_and(|p| p.started))
    }

    /// Tables started, of those expected.
    pub fn tables_started(&self) -> (usize, usize) {
        let s = self.state();
        let started = s
            .expected
            .iter()
            .filter(|t| s.tables.get(*t).is_some_and(|p| p.started))
            .count();
        (started, s.expected.len())
    }

    /// Changes acknowledged so far, all tables.
    pub fn total_changes(&self) -> u64 {
        self.total_changes.load(Ordering::Relaxed)
    }

    /// What `/healthz` answers now.
    pub fn health(&self) -> health::Health {
        let s = self.state();
        health::judge(&snapshot(&s), Instant::now(), SystemTime::now())
    }

    /// The largest lag of any table, in seconds.
    pub fn max_lag_seconds(&self) -> f64 {
        let s = self.state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        s.tables
            .values()
            .map(|t| table_lag(t, s.limits.poll_overdue, now, wall))
            .fold(0.0, f64::max)
    }

    /// Shards being read, all tables.
    pub fn shards_reading(&self) -> usize {
        self.state().tables.values().map(|t| t.shards.len()).sum()
    }

    /// The metrics in the Prometheus text (OpenMetrics) format, state gauges set to now.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Sets the gauges that describe state (lag, ages, memory, expiry, health).
    fn refresh(&self) {
        let health = self.health();
        let ready = self.ready();
        let f = &self.families;
        let s = self.state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (name, t) in &s.tables {
            let label = TableLabel {
                table: name.clone(),
            };
            f.lag
                .get_or_create(&label)
                .set(table_lag(t, s.limits.poll_overdue, now, wall));
            let age = |at: Option<SystemTime>| {
                at.map(|at| wall.duration_since(at).unwrap_or_default().as_secs_f64())
            };
            if let Some(a) = age(t.last_change) {
                f.last_change_age.get_or_create(&label).set(a);
            }
            if let Some(a) = age(t.last_checkpoint) {
                f.checkpoint_age.get_or_create(&label).set(a);
            }
        }
        if let Some((budget, total)) = &s.budget {
            let free = budget.available_kib() * 1024;
            f.buffered_bytes.set(total.saturating_sub(free) as i64);
        }
        if let Some(expiry) = s.credentials.as_ref().and_then(|c| c.current().expiry()) {
            let secs = expiry
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            f.credentials_expiry.set(secs);
        }
        f.healthy.set(i64::from(health.healthy));
        f.ready.set(i64::from(ready));
    }
}

/// The lag of one table (see `dynamodb_cdc_lag_seconds`).
fn table_lag(t: &TableProgress, overdue: Duration, now: Instant, wall: SystemTime) -> f64 {
    let wall_ms = wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    t.shards
        .values()
        .map(|p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            let unacknowledged = p
                .pending
                .iter()
                .flatten()
                .min()
                .map_or(0.0, |&oldest| (wall_ms - oldest).max(0) as f64 / 1000.0);
            let since_poll = now.duration_since(p.last_poll);
            let unread = if since_poll > overdue {
                since_poll.as_secs_f64()
            } else {
                0.0
            };
            unacknowledged.max(unread)
        })
        .fold(0.0, f64::max)
}

/// What health judges, copied out of the state.
fn snapshot(s: &State) -> health::Observed {
    let shards = s
        .tables
        .iter()
        .flat_map(|(table, t)| {
            t.shards.iter().map(move |(id, p)| {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                health::ShardObserved {
                    table: table.clone(),
                    shard_id: id.clone(),
                    last_poll: p.last_poll,
                    unsaved_since: p.unsaved_since,
                }
            })
        })
        .collect();
    health::Observed {
        max_stall: s.limits.max_stall,
        started_at: s.started_at,
        shards,
        kafka_ok: s.kafka_ok,
        credentials_expiry: s.credentials.as_ref().and_then(|c| c.current().expiry()),
    }
}

/// A shard reader's link to its progress; dropping it stops the watch.
#[derive(Debug)]
pub struct ShardHandle {
    table: String,
    shard_id: String,
    progress: Arc<Mutex<ShardProgress>>,
}

impl ShardHandle {
    fn progress(&self) -> MutexGuard<'_, ShardProgress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A GetRecords call completed.
    pub fn polled(&self) {
        self.progress().last_poll = Instant::now();
    }

    /// A page was handed to Kafka; `oldest_created_ms` is its oldest record's creation time.
    pub fn page_sent(&self, oldest_created_ms: Option<i64>) {
        self.progress().pending.push_back(oldest_created_ms);
    }

    /// Kafka acknowledged the oldest page handed to it, holding `changes` changes.
    pub fn page_acknowledged(&self, changes: u64) {
        self.progress().pending.pop_front();
        if changes > 0 {
            let t = get();
            t.total_changes.fetch_add(changes, Ordering::Relaxed);
            let mut s = t.state();
            let table = t.table(&mut s, &self.table);
            table.changes.inc_by(changes);
            table.last_change = Some(SystemTime::now());
        }
    }

    /// The shard's position moved and waits to be written.
    pub fn unsaved(&self) {
        self.progress()
            .unsaved_since
            .get_or_insert_with(Instant::now);
    }

    /// The shard's position was written.
    pub fn checkpointed(&self) {
        self.progress().unsaved_since = None;
        let t = get();
        let mut s = t.state();
        t.table(&mut s, &self.table).last_checkpoint = Some(SystemTime::now());
    }
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        let t = get();
        let mut s = t.state();
        if let Some(table) = s.tables.get_mut(&self.table) {
            // A newer reader of the same shard may have registered meanwhile.
            if table
                .shards
                .get(&self.shard_id)
                .is_some_and(|p| Arc::ptr_eq(p, &self.progress))
            {
                table.shards.remove(&self.shard_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the issue names is served, with the names dashboards and alerts use,
    /// and no label takes a shard id.
    #[test]
    fn metrics_are_served_with_their_names() {
        let t = get();
        let shard = t.shard("metrics-table", "shardId-0001");
        shard.page_sent(Some(0));
        shard.page_acknowledged(3);
        shard.checkpointed();
        t.set_shards("metrics-table", 1, 0, 2);
        t.aws_request("GetRecords", Duration::from_millis(20), None);
        t.aws_request(
            "GetRecords",
            Duration::from_millis(5),
            Some(AwsErrorKind::Throttled),
        );
        t.produce_request(Duration::from_millis(3), true);
        t.dead_letter("metrics-table");
        t.data_loss("metrics-table", 1);
        t.snapshot_rows("metrics-table", 0, 0.0);
        let text = t.encode();
        for name in [
            "dynamodb_cdc_changes_total{table=\"metrics-table\"}",
            "dynamodb_cdc_snapshot_rows_total{table=\"metrics-table\"}",
            "dynamodb_cdc_lag_seconds{table=\"metrics-table\"}",
            "dynamodb_cdc_last_change_age_seconds{table=\"metrics-table\"}",
            "dynamodb_cdc_checkpoint_age_seconds{table=\"metrics-table\"}",
            "dynamodb_cdc_shards{table=\"metrics-table\",state=\"finished\"} 2",
            "dynamodb_cdc_aws_requests_total{operation=\"GetRecords\",outcome=\"throttled\"} 1",
            "dynamodb_cdc_produce_requests_total{outcome=\"ok\"}",
            "dynamodb_cdc_produce_duration_seconds_bucket{le=",
            "dynamodb_cdc_buffered_bytes",
            "dynamodb_cdc_dead_letters_total{table=\"metrics-table\"} 1",
            "dynamodb_cdc_data_loss_total{table=\"metrics-table\"} 1",
            "dynamodb_cdc_snapshot_progress_ratio{table=\"metrics-table\"}",
            "dynamodb_cdc_healthy",
            "dynamodb_cdc_ready",
            "dynamodb_cdc_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        // Call times by operation, in the buckets that hold them (cumulative).
        t.aws_request("MetricsTestCall", Duration::from_millis(20), None);
        t.aws_request("MetricsTestCall", Duration::from_millis(5), None);
        let text_with_calls = t.encode();
        let bucket = |le: &str| {
            text_with_calls
                .lines()
                .find(|l| {
                    l.starts_with("dynamodb_cdc_aws_request_duration_seconds_bucket{")
                        && l.contains("operation=\"MetricsTestCall\"")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in:\n{text_with_calls}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(bucket("0.004"), "0");
        assert_eq!(bucket("0.008"), "1");
        assert_eq!(bucket("0.032"), "2");
        // A page that waited since the epoch: the lag is about now.
        let lag_line = text
            .lines()
            .find(|l| l.starts_with("dynamodb_cdc_lag_seconds{table=\"metrics-table\"}"))
            .unwrap();
        assert!(lag_line.ends_with(" 0.0"), "acknowledged: {lag_line}");
        assert!(!text.contains("shardId-0001"), "a shard id in a label");
        drop(shard);
        t.forget_table("metrics-table");
        assert!(!t.encode().contains("lag_seconds{table=\"metrics-table\"}"));
    }

    /// Every `dynamodb_cdc_*` name the Grafana dashboard and the alert rules use is one
    /// the daemon serves (`contrib/check.sh` checks the files themselves with promtool).
    #[test]
    fn the_dashboard_and_alerts_use_only_served_metrics() {
        // A series in every family (a family without one is not described).
        let t = get();
        let shard = t.shard("contrib-table", "shardId-1");
        t.set_shards("contrib-table", 1, 0, 0);
        t.aws_request("GetRecords", Duration::from_millis(1), None);
        t.produce_request(Duration::from_millis(1), false);
        t.snapshot_rows("contrib-table", 1, 0.5);
        t.families.credentials_expiry.set(1.0);
        shard.page_sent(None);
        shard.page_acknowledged(1);
        shard.checkpointed();
        let text = t.encode();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
        let mut used = std::collections::BTreeSet::new();
        for file in ["grafana/dynamodb-cdc.json", "prometheus/alerts.yml"] {
            let body = std::fs::read_to_string(root.join(file)).unwrap();
            let mut rest = body.as_str();
            while let Some(at) = rest.find("dynamodb_cdc_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
        assert!(used.len() >= 15, "{used:?}");
        for name in &used {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(name);
            let counter = family
                .strip_suffix("_total")
                .is_some_and(|base| text.contains(&format!("# TYPE {base} counter")));
            assert!(
                counter || text.contains(&format!("# TYPE {family} ")),
                "contrib uses {name}, which /metrics does not serve:\n{text}"
            );
        }
    }

    /// The lag is the age of the oldest page not yet acknowledged, and the time since the
    /// last GetRecords once that is overdue.
    #[test]
    fn lag_follows_the_oldest_unacknowledged_page_and_overdue_reads() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let wall_ms = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let shard = |last_poll: Instant, pending: Vec<Option<i64>>| {
            Arc::new(Mutex::new(ShardProgress {
                last_poll,
                pending: pending.into(),
                unsaved_since: None,
            }))
        };
        let mut table = TableProgress {
            started: true,
            shards: BTreeMap::new(),
            last_change: None,
            last_checkpoint: None,
            changes: Counter::default(),
        };
        let overdue = Duration::from_secs(30);
        assert_eq!(table_lag(&table, overdue, now, wall), 0.0);
        table.shards.insert(
            "a".into(),
            shard(
                now,
                vec![None, Some(wall_ms - 4_000), Some(wall_ms - 1_000)],
            ),
        );
        table.shards.insert("b".into(), shard(now, vec![]));
        assert_eq!(table_lag(&table, overdue, now, wall), 4.0);
        let later = now + Duration::from_secs(45);
        let lag = table_lag(&table, overdue, later, wall);
        assert_eq!(
            lag, 45.0,
            "both shards overdue: the time since their last read"
        );
    }
}
