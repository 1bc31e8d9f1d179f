//! The snapshot part of the benchmark: a table of N items (200 B and 4 KB) loaded with
//! `sync_mode: snapshot` (4 segments, pages of 1000, no read budget) into a fresh tansu, on
//! the Streams double (generated items, one server thread) and on moto (seeded once per
//! item size). Items/s and MB/s of item data from the daemon's start to "snapshot complete";
//! the daemon's CPU over the same time.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use serde::Serialize;
use serde_json::{json, Value};

use crate::streams_double::{KeySchema, Options, StreamsDouble, ViewType};
use crate::support::broker::{self, Partitions, Tansu};
use crate::support::daemon::Daemon;
use crate::support::{summarize, Summary};

/// Where the items are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The Streams double's generated items.
    Double,
    /// moto (the local stack's DynamoDB).
    Moto,
}

/// One load.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRun {
    /// Seconds from the daemon's start to "snapshot complete".
    pub seconds: f64,
    /// Items per second.
    pub items_per_s: f64,
    /// MB (10^6 bytes) of item data per second.
    pub mb_per_s: f64,
    /// Daemon CPU seconds per 100,000 items.
    pub cpu_s_per_100k_items: f64,
    /// Peak resident memory of the daemon.
    pub peak_rss_mib: f64,
}

/// Runs of one backend and item size.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// Where the items are.
    pub backend: Backend,
    /// Bytes per item (DynamoDB's size rule).
    pub item_bytes: usize,
    /// Items in the table.
    pub items: usize,
    /// Items per second.
    pub items_per_s: Summary,
    /// MB of item data per second.
    pub mb_per_s: Summary,
    /// Daemon CPU seconds per 100,000 items.
    pub cpu_s_per_100k_items: Summary,
    /// Peak resident memory.
    pub peak_rss_mib: Summary,
    /// Every run.
    pub runs: Vec<SnapshotRun>,
}

/// What a load needs from the benchmark.
pub struct Setup<'a> {
    /// The daemon binary.
    pub daemon_bin: &'a Path,
    /// The moto endpoint (skipped when `None`).
    pub moto: Option<&'a str>,
    /// Items per table.
    pub items: usize,
    /// Runs of each measurement.
    pub runs: usize,
    /// Merged into every daemon config.
    pub extra_config: Option<&'a Value>,
}

/// Every backend and item size.
pub async fn run_part(
    setup: &Setup<'_>,
    dir: &Path,
    log: &dyn Fn(String),
) -> Result<Vec<SnapshotSummary>> {
    let mut out = Vec::new();
    let mut seeded: HashMap<usize, String> = HashMap::new();
    for backend in [Backend::Double, Backend::Moto] {
        if backend == Backend::Moto && setup.moto.is_none() {
            log("snapshot on moto: skipped (no emulator)".into());
            continue;
        }
        for item_bytes in [200usize, 4096] {
            let mut runs = Vec::new();
            for r in 0..setup.runs {
                let run_dir = dir.join(format!("snap-{backend:?}-{item_bytes}-{r}"));
                std::fs::create_dir_all(&run_dir)?;
                let run = one_load(setup, backend, item_bytes, &run_dir, &mut seeded, log)
                    .await
                    .with_context(|| {
                        format!("snapshot {backend:?} {item_bytes} B run {}", r + 1)
                    })?;
                log(format!(
                    "  snapshot {backend:?} {item_bytes} B: {:.0} items/s, {:.1} MB/s, {:.2} CPU s per 100k items, peak {:.1} MiB",
                    run.items_per_s, run.mb_per_s, run.cpu_s_per_100k_items, run.peak_rss_mib
                ));
                runs.push(run);
            }
            let f = |g: fn(&SnapshotRun) -> f64| summarize(&runs.iter().map(g).collect::<Vec<_>>());
            out.push(SnapshotSummary {
                backend,
                item_bytes,
                items: setup.items,
                items_per_s: f(|r| r.items_per_s),
                mb_per_s: f(|r| r.mb_per_s),
                cpu_s_per_100k_items: f(|r| r.cpu_s_per_100k_items),
                peak_rss_mib: f(|r| r.peak_rss_mib),
                runs,
            });
        }
    }
    Ok(out)
}

async fn one_load(
    setup: &Setup<'_>,
    backend: Backend,
    item_bytes: usize,
    dir: &Path,
    seeded: &mut HashMap<usize, String>,
    log: &dyn Fn(String),
) -> Result<SnapshotRun> {
    let tansu = Tansu::start(dir).await?;
    let client = tansu.client().await?;
    // Kept alive until the load is done.
    let mut double = None;
    let (endpoint, region, table) = match backend {
        Backend::Double => {
            let d = StreamsDouble::start_with(Options {
                record_calls: false,
                iterator_ttl: None,
                threads: 1,
                ..Options::default()
            });
            let table = format!("snap_{item_bytes}");
            d.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
            d.add_generated_items(&table, setup.items, item_bytes);
            let out = (d.endpoint(), d.region().to_owned(), table);
            double = Some(d);
            out
        }
        Backend::Moto => {
            let endpoint = setup.moto.expect("checked").to_owned();
            let table = match seeded.get(&item_bytes) {
                Some(t) => t.clone(),
                None => {
                    let t = format!("bench_snap_{item_bytes}_{}", std::process::id());
                    let started = Instant::now();
                    seed_moto(&endpoint, &t, setup.items, item_bytes).await?;
                    log(format!(
                        "  seeded moto with {} items of {item_bytes} B in {:.0} s",
                        setup.items,
                        started.elapsed().as_secs_f64()
                    ));
                    seeded.insert(item_bytes, t.clone());
                    t
                }
            };
            (endpoint, "us-east-1".to_owned(), table)
        }
    };
    let topic = format!("dynamodb.{table}");
    broker::create_topic(&client, &topic, 3).await?;
    let parts = Partitions::open(&client, std::slice::from_ref(&topic), 3).await?;
    let mut config = json!({
        "aws": { "region": region, "endpoint_url": endpoint },
        "tables": [{ "name": table }],
        "sync_mode": "snapshot",
        "kafka": { "bootstrap_servers": [tansu.bootstrap] },
        "checkpoint": { "dir": dir.join("checkpoints") },
    });
    if let Some(extra) = setup.extra_config {
        crate::merge(&mut config, extra);
    }
    let started = Instant::now();
    let mut daemon = Daemon::spawn(setup.daemon_bin, dir, &config)?;
    let deadline = started + Duration::from_secs(600);
    // Sampled while it runs: the daemon exits right after the load, and an exited process
    // has no memory figures.
    let mut rss: f64 = 0.0;
    loop {
        rss = rss.max(daemon.peak_rss_mib());
        if daemon.log_tail(5).contains("snapshot complete") {
            break;
        }
        daemon.check_running()?;
        if Instant::now() > deadline {
            bail!("no snapshot complete after 600 s:\n{}", daemon.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = daemon.cpu();
    let status = daemon.stop(Duration::from_secs(30)).await?;
    if !status.success() {
        bail!("the daemon exited with {status}");
    }
    let total = parts.total().await?;
    if total != setup.items as i64 {
        bail!("{total} records in the topic for {} items", setup.items);
    }
    drop(double);
    let items = setup.items as f64;
    Ok(SnapshotRun {
        seconds,
        items_per_s: items / seconds,
        mb_per_s: items * item_bytes as f64 / 1e6 / seconds,
        cpu_s_per_100k_items: cpu / items * 100_000.0,
        peak_rss_mib: rss,
    })
}

/// Creates `table` on moto and writes `count` items of about `item_bytes` (8 writers).
async fn seed_moto(endpoint: &str, table: &str, count: usize, item_bytes: usize) -> Result<()> {
    let client = crate::moto_client(endpoint).await;
    crate::create_stream_table(&client, table).await?;
    let pad = "x".repeat(item_bytes.saturating_sub(20));
    let writers = 8;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, table, pad) = (client.clone(), table.to_owned(), pad.clone());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (w..count).step_by(writers).collect();
            for chunk in mine.chunks(25) {
                let mut requests = Vec::with_capacity(chunk.len());
                for i in chunk {
                    let item = HashMap::from([
                        ("pk".to_owned(), AttributeValue::S(format!("item-{i:07}"))),
                        ("pad".to_owned(), AttributeValue::S(pad.clone())),
                    ]);
                    requests.push(
                        WriteRequest::builder()
                            .put_request(PutRequest::builder().set_item(Some(item)).build()?)
                            .build(),
                    );
                }
                let mut pending = HashMap::from([(table.clone(), requests)]);
                while !pending.is_empty() {
                    let out = client
                        .batch_write_item()
                        .set_request_items(Some(pending))
                        .send()
                        .await
                        .context("BatchWriteItem on moto")?;
                    pending = out.unprocessed_items.unwrap_or_default();
                    pending.retain(|_, v| !v.is_empty());
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The README table of the part.
pub fn render(summaries: &[SnapshotSummary]) -> String {
    let mut out = String::from(
        "\nsnapshot (sync_mode snapshot, 4 segments, pages of 1000): median [min-max]\n",
    );
    out.push_str("| backend | items | item | items/s | MB/s | CPU s / 100k items | peak RSS MiB |\n|---|---|---|---|---|---|---|\n");
    for s in summaries {
        let c = |x: &Summary, d: usize| {
            format!("{:.d$} [{:.d$}-{:.d$}]", x.median, x.min, x.max, d = d)
        };
        out.push_str(&format!(
            "| {:?} | {} | {} B | {} | {} | {} | {} |\n",
            s.backend,
            s.items,
            s.item_bytes,
            c(&s.items_per_s, 0),
            c(&s.mb_per_s, 1),
            c(&s.cpu_s_per_100k_items, 2),
            c(&s.peak_rss_mib, 1)
        ));
    }
    out
}
