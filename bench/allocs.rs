//! The allocs part of the benchmark: heap allocations per change of the daemon's pipeline,
//! and of the conversion alone.
//!
//! ```text
//!  bench runtime (not counted) ──▶ streams double (own thread, not counted)
//!     │ spawns                          ▲ HTTP + SigV4
//!     ▼                                 │
//!  daemon runtime (its own, like the binary's; every worker and blocking thread counted)
//!     └─ dynamodb_cdc::app::run_until ──┴──▶ tansu (own process) ◀── high watermarks (bench)
//! ```
//!
//! The daemon runs in this process, on a runtime of its own whose threads opt in to
//! counting ([`Counting`], the bench's global allocator), so the streams double, the bench's
//! Kafka clients and the orchestrating runtime are not counted. The counters are read when
//! the first GetRecords answer with records is served and again when the topics' high
//! watermarks hold every change: start-up (config, clients, metadata, shard discovery) and
//! shutdown are outside the window. Allocations per change = delta / changes.
//!
//! Separately, `dynamodb_cdc::convert::convert_page` converts one GetRecords body of the
//! double (1000 INSERT records, then 1000 MODIFY records with both images) on the
//! orchestrating thread with counting on: the conversion's share of the pipeline's
//! allocations (the rest: HTTP and SDK, budget, partitioning, producer, acks, checkpoints).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::streams_double::{Generated, Options, StreamsDouble, ViewType};
use crate::support::broker::{self, Partitions, Tansu};
use crate::support::{summarize, Summary};
use dynamodb_cdc::config::defaults;

// ---- the counting allocator -------------------------------------------------------------

thread_local! {
    /// Whether this thread's allocations are counted. Const-initialized and without a
    /// destructor: reading it never allocates (no lazy initialization, no registration), so
    /// the allocator cannot recurse into itself.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Allocation calls (`alloc`, `alloc_zeroed`, `realloc`) on counted threads.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Of those, `realloc` calls.
static REALLOCS: AtomicU64 = AtomicU64::new(0);
/// Bytes asked for: an allocation's size, a `realloc`'s growth (nothing when it shrinks).
static BYTES: AtomicU64 = AtomicU64::new(0);

/// A global allocator that counts the allocations of the threads that opted in
/// ([`set_counted`]) and passes every call on to `A`. A thread that did not opt in pays one
/// thread-local read per allocation. A `realloc` counts as one allocation (growing a buffer
/// is a call to the allocator the code asked for, even when jemalloc grows it in place) of
/// the bytes it adds, so a buffer grown step by step to N bytes counts N bytes; frees are
/// not counted.
#[derive(Debug)]
pub struct Counting<A>(A);

impl<A> Counting<A> {
    /// Wraps `inner`.
    pub const fn new(inner: A) -> Self {
        Self(inner)
    }
}

#[inline]
fn count(bytes: usize, realloc: bool) {
    // `try_with`: a thread being torn down has no thread-locals left; it is not counted.
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if realloc {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

// The bench's only unsafe code: a GlobalAlloc must be an `unsafe impl`. Every method
// forwards to the wrapped allocator with the caller's arguments unchanged, so it upholds
// exactly the contract the wrapped allocator does.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), false);
        // SAFETY: the caller's contract (non-zero size) is passed on unchanged.
        unsafe { self.0.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), false);
        // SAFETY: as `alloc`.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `self.0` (every allocation goes through it) with
        // `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()), true);
        // SAFETY: as `dealloc`, and the caller's contract on `new_size` is passed on.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Turns counting on or off for the calling thread.
pub fn set_counted(on: bool) {
    COUNTED.with(|c| c.set(on));
}

/// Allocations and bytes counted so far (every counted thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Allocation calls (reallocs included).
    pub allocations: u64,
    /// Of those, reallocs.
    pub reallocs: u64,
    /// Bytes asked for (a realloc: its growth).
    pub bytes: u64,
}

impl Counts {
    /// The counters now.
    pub fn now() -> Self {
        Self {
            allocations: ALLOCATIONS.load(Ordering::Relaxed),
            reallocs: REALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            allocations: self.allocations - earlier.allocations,
            reallocs: self.reallocs - earlier.reallocs,
            bytes: self.bytes - earlier.bytes,
        }
    }
}

/// Counts what `f` allocates on this thread (nothing else may be counted meanwhile).
fn counting<T>(f: impl FnOnce() -> T) -> (T, Counts) {
    let before = Counts::now();
    set_counted(true);
    let out = f();
    set_counted(false);
    (out, Counts::now().since(before))
}

// ---- the part ---------------------------------------------------------------------------

/// What the part needs from the benchmark.
#[derive(Debug)]
pub struct Setup<'a> {
    /// Shard counts (16: 4 tables, fewer: 1 table, as in the throughput part).
    pub shards: &'a [usize],
    /// Item sizes in bytes.
    pub item_bytes: &'a [usize],
    /// Changes of a scenario with items up to 1 KiB.
    pub changes_small: u64,
    /// Changes of a scenario with larger items.
    pub changes_large: u64,
    /// Partitions of each topic.
    pub partitions: u32,
    /// Runs of each scenario (allocation counts barely vary: 1 is enough).
    pub runs: usize,
    /// Merged into every daemon config.
    pub extra_config: Option<&'a Value>,
    /// `reader.max_calls_per_second_per_shard` (`--throughput-calls-per-second`).
    pub calls_per_second: f64,
}

/// One in-process pipeline run.
#[derive(Debug, Clone, Serialize)]
pub struct AllocsRun {
    /// Changes in the counted window.
    pub changes: u64,
    /// Seconds from the first GetRecords answer to every change in Kafka.
    pub elapsed_s: f64,
    /// Allocations in the window (every daemon thread; reallocs included).
    pub allocations: u64,
    /// Of those, reallocs.
    pub reallocs: u64,
    /// Bytes asked for in the window.
    pub bytes: u64,
    /// Allocations per change.
    pub allocations_per_change: f64,
    /// Reallocs per change.
    pub reallocs_per_change: f64,
    /// Bytes allocated per change.
    pub bytes_per_change: f64,
    /// Allocations before the window: start-up (config, AWS and Kafka clients, shard
    /// discovery, the first GetRecords).
    pub startup_allocations: u64,
}

/// `convert_page` on one page of the double.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PageCounts {
    /// Records in the page.
    pub records: usize,
    /// Allocations of the call (its result included; reallocs included).
    pub allocations: u64,
    /// Of those, reallocs.
    pub reallocs: u64,
    /// Bytes asked for.
    pub bytes: u64,
    /// Allocations per record.
    pub allocations_per_change: f64,
    /// Bytes per record.
    pub bytes_per_change: f64,
}

impl PageCounts {
    fn new(records: usize, c: Counts) -> Self {
        Self {
            records,
            allocations: c.allocations,
            reallocs: c.reallocs,
            bytes: c.bytes,
            allocations_per_change: round(c.allocations as f64 / records as f64, 2),
            bytes_per_change: round(c.bytes as f64 / records as f64, 0),
        }
    }
}

/// The conversion alone, at the scenario's mix of INSERT (new image) and MODIFY (both
/// images) records.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConversionCounts {
    /// A page of INSERT records (new image only).
    pub insert_page: PageCounts,
    /// A page of MODIFY records (new and old image).
    pub modify_page: PageCounts,
    /// Share of the scenario's changes that are INSERTs (the generated stream's first
    /// change to each key).
    pub insert_share: f64,
    /// Allocations per change at that mix.
    pub allocations_per_change: f64,
    /// Bytes per change at that mix.
    pub bytes_per_change: f64,
}

/// Runs of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct AllocsSummary {
    /// Shards.
    pub shards: usize,
    /// Tables (topics).
    pub tables: usize,
    /// Approximate JSON size of one image.
    pub item_bytes: usize,
    /// Partitions of each topic.
    pub partitions_per_topic: u32,
    /// Changes of each run.
    pub changes_per_run: u64,
    /// Pipeline allocations per change (every daemon thread; reallocs included).
    pub allocations_per_change: Summary,
    /// Of those, reallocs.
    pub reallocs_per_change: Summary,
    /// Pipeline bytes allocated per change.
    pub bytes_per_change: Summary,
    /// `convert_page` alone.
    pub conversion: ConversionCounts,
    /// Conversion allocations / pipeline allocations (medians).
    pub conversion_share: f64,
    /// Every run.
    pub runs: Vec<AllocsRun>,
}

/// One scenario, sized like the throughput part's.
fn scenario(setup: &Setup, shards: usize, item_bytes: usize) -> crate::Scenario {
    let tables = if shards >= 16 { 4 } else { 1 };
    let total = if item_bytes <= 1024 {
        setup.changes_small
    } else {
        setup.changes_large
    };
    crate::Scenario {
        shards,
        item_bytes,
        tables,
        records_per_shard: total.div_ceil(shards as u64).max(1),
    }
}

/// Share of INSERTs in a generated stream as `generated_double` builds it: per table,
/// `shards / tables * 2500` keys, and change `g` is an INSERT when `g < keys`.
fn insert_share(sc: &crate::Scenario) -> f64 {
    let per_table = (sc.shards / sc.tables) as u64;
    let keys = per_table * 2_500;
    let changes = per_table * sc.records_per_shard;
    keys.min(changes) as f64 / changes as f64
}

/// Every scenario: 16 and 1 shards, 200 B and 4 KB items (as set up).
pub async fn run_part(
    setup: &Setup<'_>,
    dir: &Path,
    log: &dyn Fn(String),
) -> Result<Vec<AllocsSummary>> {
    let ((), probe) = counting(|| drop(std::hint::black_box(vec![0u8; 64])));
    if probe.allocations == 0 {
        bail!("allocs: the bench's global allocator does not count (expected allocs::Counting)");
    }
    // The conversion first, while no daemon thread runs: nothing else is counted.
    let mut conversions = Vec::new();
    for &item_bytes in setup.item_bytes {
        conversions.push(conversion_counts(item_bytes).await?);
    }
    daemon_environment();
    install_daemon_logging(dir);
    let mut out = Vec::new();
    for (&item_bytes, conversion) in setup.item_bytes.iter().zip(conversions) {
        for &shards in setup.shards {
            let sc = scenario(setup, shards, item_bytes);
            let label = format!("{shards} shards x {item_bytes} B");
            let share = insert_share(&sc);
            let conversion = ConversionCounts {
                insert_share: round(share, 4),
                allocations_per_change: round(
                    share * conversion.0.allocations_per_change
                        + (1.0 - share) * conversion.1.allocations_per_change,
                    2,
                ),
                bytes_per_change: round(
                    share * conversion.0.bytes_per_change
                        + (1.0 - share) * conversion.1.bytes_per_change,
                    0,
                ),
                insert_page: conversion.0,
                modify_page: conversion.1,
            };
            let mut runs = Vec::new();
            for r in 0..setup.runs.max(1) {
                log(format!(
                    "allocs {label} ({} tables, {} changes, daemon in-process), run {}/{}",
                    sc.tables,
                    sc.total(),
                    r + 1,
                    setup.runs.max(1)
                ));
                let run_dir = dir.join(format!("{shards}x{item_bytes}-{r}"));
                std::fs::create_dir_all(&run_dir)?;
                let run = pipeline_run(setup, &sc, &run_dir)
                    .await
                    .with_context(|| format!("allocs {label} run {}", r + 1))?;
                log(format!(
                    "  {:.1} allocations/change, {:.0} bytes/change ({:.1} s; conversion alone {:.1}/change)",
                    run.allocations_per_change,
                    run.bytes_per_change,
                    run.elapsed_s,
                    conversion.allocations_per_change
                ));
                runs.push(run);
            }
            let f = |g: fn(&AllocsRun) -> f64| summarize(&runs.iter().map(g).collect::<Vec<_>>());
            let allocations_per_change = f(|r| r.allocations_per_change);
            out.push(AllocsSummary {
                shards,
                tables: sc.tables,
                item_bytes,
                partitions_per_topic: setup.partitions,
                changes_per_run: sc.total(),
                conversion_share: round(
                    conversion.allocations_per_change / allocations_per_change.median,
                    3,
                ),
                allocations_per_change,
                reallocs_per_change: f(|r| r.reallocs_per_change),
                bytes_per_change: f(|r| r.bytes_per_change),
                conversion,
                runs,
            });
        }
    }
    Ok(out)
}

/// The `allocs` section of the results.
pub fn results(summaries: &[AllocsSummary]) -> Result<Value> {
    Ok(json!({
        "scenarios": serde_json::to_value(summaries)?,
        "daemon_worker_threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "notes": [
            "the daemon runs in the benchmark's process (dynamodb_cdc::app::run_until) on its own multi-thread tokio runtime, built as the binary builds its own; only that runtime's worker and blocking threads are counted (not the streams double, tansu's clients or the orchestrating runtime)",
            "counted window: from the first GetRecords answer with records to the moment the topics' high watermarks hold every change (start-up and shutdown excluded); per change = count / changes",
            "an allocation is one alloc, alloc_zeroed or realloc call (reallocs also counted apart); bytes: the sizes asked for, a realloc's growth (a buffer grown to N bytes counts N); frees are not counted",
            "conversion: dynamodb_cdc::convert::convert_page on one GetRecords body of the double (1000 INSERT records, 1000 MODIFY records with both images), weighted by the scenario's share of INSERTs",
        ],
    }))
}

/// The printed table.
pub fn render(summaries: &[AllocsSummary]) -> String {
    let mut out = String::from(
        "\nHeap allocations per change (daemon in-process, counted from the first GetRecords answer to every change in Kafka)\n",
    );
    let cell = crate::cell;
    let mut rows = vec![[
        "scenario",
        "changes",
        "allocs/change (pipeline)",
        "of which reallocs",
        "bytes/change",
        "conversion allocs/change",
        "conversion bytes/change",
        "conversion share",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for s in summaries {
        rows.push(vec![
            format!("{} shards ({}t) x {} B", s.shards, s.tables, s.item_bytes),
            s.changes_per_run.to_string(),
            cell(&s.allocations_per_change, 1),
            cell(&s.reallocs_per_change, 1),
            cell(&s.bytes_per_change, 0),
            format!("{:.1}", s.conversion.allocations_per_change),
            format!("{:.0}", s.conversion.bytes_per_change),
            format!("{:.0}%", s.conversion_share * 100.0),
        ]);
    }
    out.push_str(&crate::table(&rows));
    out.push_str("  (an allocation: alloc or realloc; conversion: convert_page alone, at the scenario's INSERT/MODIFY mix)\n");
    out
}

// ---- the in-process daemon --------------------------------------------------------------

/// The base credentials and settings the benchmark's daemon processes get (Daemon::spawn):
/// the in-process daemon reads them from this process's environment. Set before anything
/// of the part runs (the other parts' daemons get their environment explicitly).
fn daemon_environment() {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("AWS_")) {
            std::env::remove_var(k);
        }
    }
    std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDBENCHMARK0000000");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "benchmark-secret-key");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
}

/// The binary's logging (`info,rskafka=warn`, or BENCH_DAEMON_LOG), into `dir/daemon.log`:
/// what the daemon logs is part of what it allocates.
fn install_daemon_logging(dir: &Path) {
    let filter = std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "info,rskafka=warn".into());
    let Ok(file) = std::fs::File::create(dir.join("daemon.log")) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

async fn pipeline_run(setup: &Setup<'_>, sc: &crate::Scenario, dir: &Path) -> Result<AllocsRun> {
    let expected = sc.total();
    let names: Vec<String> = (0..sc.tables).map(|t| format!("bench_{t}")).collect();
    let topics: Vec<String> = names.iter().map(|n| crate::topic_of(n)).collect();
    let tansu = Tansu::start(dir).await?;
    let client = tansu.client().await?;
    for t in &topics {
        broker::create_topic(&client, t, setup.partitions).await?;
    }
    let parts = Partitions::open(&client, &topics, setup.partitions).await?;
    let double = crate::generated_double(sc, &names, sc.records_per_shard, true, false);
    let mut document = crate::daemon_config(
        setup.extra_config,
        &double.endpoint(),
        double.region(),
        &names,
        &tansu.bootstrap,
        dir,
    );
    crate::unpaced(&mut document, setup.calls_per_second);
    // As the binary loads it: from a file, `${...}` resolved, environment overrides applied.
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&document)?)?;
    let config = dynamodb_cdc::secrets::load_config(&config_path)
        .await
        .map_err(|e| anyhow!("daemon config: {e}"))?;

    // The binary's runtime (src/main.rs: multi-thread, default workers, everything
    // enabled); its threads count their allocations from their first instruction.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("daemon")
        .on_thread_start(|| set_counted(true))
        .on_thread_stop(|| set_counted(false))
        .build()
        .context("the daemon's runtime")?;
    let (cancel, hard) = (CancellationToken::new(), CancellationToken::new());
    let started = Counts::now();
    let mut daemon = runtime.spawn(dynamodb_cdc::app::run_until(
        config,
        cancel.clone(),
        hard.clone(),
    ));

    let measured = measure(&double, &parts, &daemon, expected).await;
    cancel.cancel();
    let stopped = match tokio::time::timeout(Duration::from_secs(30), &mut daemon).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(anyhow!("the daemon stopped with an error: {e}")),
        Ok(Err(e)) => Err(anyhow!("the daemon's task: {e}")),
        Err(_) => {
            // Not judged here: the counts are taken.
            hard.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut daemon).await;
            Ok(())
        }
    };
    // Wait for its threads to end: none of them may count into the next measurement (and
    // a runtime must not be dropped on an async thread).
    tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(10))).await?;
    let (c0, c1, elapsed) = match (measured, stopped) {
        (Ok(m), Ok(())) => m,
        (Ok(_), Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(stop)) => return Err(e.context(stop)),
    };
    let in_kafka = parts.total().await?;
    if in_kafka != expected as i64 {
        bail!("{in_kafka} records in Kafka, expected {expected} (duplicates?)");
    }
    drop(parts);
    drop(client);
    drop(double);
    drop(tansu);

    let window = c1.since(c0);
    Ok(AllocsRun {
        changes: expected,
        elapsed_s: round(elapsed, 3),
        allocations: window.allocations,
        reallocs: window.reallocs,
        bytes: window.bytes,
        allocations_per_change: round(window.allocations as f64 / expected as f64, 2),
        reallocs_per_change: round(window.reallocs as f64 / expected as f64, 2),
        bytes_per_change: round(window.bytes as f64 / expected as f64, 0),
        startup_allocations: c0.since(started).allocations,
    })
}

/// The counters at the first GetRecords answer with records and when the topics hold
/// every change, and the seconds between.
async fn measure(
    double: &StreamsDouble,
    parts: &Partitions,
    daemon: &DaemonTask,
    expected: u64,
) -> Result<(Counts, Counts, f64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while double.records_served() == 0 {
        check(daemon, deadline, "the first GetRecords")?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (c0, t0) = (Counts::now(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60 + expected / 2_000);
    let mut seen = 0;
    loop {
        seen = parts.total().await.unwrap_or(seen);
        if seen >= expected as i64 {
            return Ok((c0, Counts::now(), t0.elapsed().as_secs_f64()));
        }
        check(daemon, deadline, "every change in Kafka")
            .with_context(|| format!("{seen} of {expected} changes in Kafka"))?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type DaemonTask = tokio::task::JoinHandle<Result<(), dynamodb_cdc::error::Error>>;

/// Fails when the daemon's task ended or `deadline` passed.
fn check(daemon: &DaemonTask, deadline: Instant, what: &str) -> Result<()> {
    if daemon.is_finished() {
        bail!("the daemon stopped while waiting for {what}");
    }
    if Instant::now() > deadline {
        bail!("timed out waiting for {what}");
    }
    Ok(())
}

// ---- the conversion alone ---------------------------------------------------------------

/// Records of a conversion page: the daemon's (and DynamoDB's) largest GetRecords page.
const PAGE_RECORDS: u64 = 1000;

/// `convert_page`'s counts on a page of 1000 INSERT records, then on one of 1000 MODIFY
/// records, of a generated table of the double with `item_bytes` images.
async fn conversion_counts(item_bytes: usize) -> Result<(PageCounts, PageCounts)> {
    let double = StreamsDouble::start_with(Options {
        record_calls: false,
        iterator_ttl: None,
        threads: 1,
        ..Options::default()
    });
    let table = "bench_convert";
    let stream_arn = double.add_generated_table(
        table,
        Generated {
            shards: 1,
            records_per_shard: 2 * PAGE_RECORDS,
            item_bytes,
            // Records 0..1000 are the first change of their key (INSERT), 1000..2000 the
            // second (MODIFY, both images).
            keys: PAGE_RECORDS,
            close: true,
            view_type: ViewType::NewAndOldImages,
        },
    );
    let shard_id = double
        .shards(&stream_arn)
        .first()
        .map(|s| s.shard_id.clone())
        .context("the generated shard")?;
    let endpoint = double.endpoint();
    let (arn, shard) = (stream_arn.clone(), shard_id.clone());
    let (insert_body, modify_body) = tokio::task::spawn_blocking(move || -> Result<_> {
        let it = call(
            &endpoint,
            "GetShardIterator",
            &json!({ "StreamArn": arn, "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON" }),
        )?;
        let it: Value = serde_json::from_slice(&it)?;
        let it = it["ShardIterator"].as_str().context("ShardIterator")?;
        let first = call(
            &endpoint,
            "GetRecords",
            &json!({ "ShardIterator": it, "Limit": PAGE_RECORDS }),
        )?;
        let next: Value = serde_json::from_slice(&first)?;
        let next = next["NextShardIterator"]
            .as_str()
            .context("NextShardIterator")?;
        let second = call(
            &endpoint,
            "GetRecords",
            &json!({ "ShardIterator": next, "Limit": PAGE_RECORDS }),
        )?;
        Ok((first, second))
    })
    .await??;
    drop(double);

    let source = dynamodb_cdc::convert::Source {
        table: table.into(),
        stream_arn,
        shard_id,
    };
    let measure = |body: &[u8], event: &str| -> Result<PageCounts> {
        let convert = || {
            dynamodb_cdc::convert::convert_page(
                body,
                &source,
                defaults::TOMBSTONES,
                defaults::MAX_MESSAGE_BYTES,
            )
        };
        // Once uncounted (first-use initialization), then counted.
        let page = convert().context("convert_page took the page off the fast path")?;
        if page.stream_records != PAGE_RECORDS as usize {
            bail!("the {event} page holds {} records", page.stream_records);
        }
        drop(page);
        let (page, c) = counting(convert);
        let page = page.context("convert_page")?;
        let events = page.records.iter().filter(|r| r.value.is_some()).count();
        if events != page.stream_records {
            bail!("{events} events from {} records", page.stream_records);
        }
        Ok(PageCounts::new(page.stream_records, c))
    };
    Ok((
        measure(&insert_body, "INSERT")?,
        measure(&modify_body, "MODIFY")?,
    ))
}

/// One AWS JSON 1.0 call to the double (unsigned: it reads the signer, never checks it);
/// the 200 answer's body.
fn call(endpoint: &str, op: &str, body: &Value) -> Result<Vec<u8>> {
    let addr = endpoint.trim_start_matches("http://");
    let body = serde_json::to_vec(body)?;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/x-amz-json-1.0\r\nx-amz-target: DynamoDBStreams_20120810.{op}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("an HTTP answer")?;
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let body = answer[split + 4..].to_vec();
    if !head.starts_with("http/1.1 200") {
        bail!(
            "{op}: {} {}",
            head.lines().next().unwrap_or(""),
            String::from_utf8_lossy(&body)
        );
    }
    if head.contains("transfer-encoding: chunked") {
        bail!("{op}: a chunked answer (not read here)");
    }
    Ok(body)
}

fn round(x: f64, digits: i32) -> f64 {
    crate::round(x, digits)
}
