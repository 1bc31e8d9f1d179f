//! The tables part of the benchmark: many tables found by a discovery rule (`tables` as
//! `{"include": [...]}`), each with a stream on moto holding a few items and a topic the
//! daemon creates with 3 partitions, in a fresh tansu per run. Measured: start-up (spawn to
//! `/readyz` 200, and to every item acknowledged by Kafka), the daemon's ESTABLISHED TCP
//! connections to the broker and to moto, then, once it is idle, its CPU over a window and
//! its memory.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;
use serde_json::{json, Value};

use crate::support::broker::{self, Partitions, Tansu};
use crate::support::daemon::Daemon;
use crate::support::{procfs, summarize, Summary};

/// One start of the daemon.
#[derive(Debug, Clone, Serialize)]
pub struct TablesRun {
    /// Seconds from the spawn to `/readyz` answering 200 (every table started).
    pub ready_s: f64,
    /// Seconds from the spawn to every item of every table acknowledged by Kafka.
    pub first_records_s: f64,
    /// Partitions holding records once every item is in Kafka (each table's items hash to
    /// some of its partitions; a partition's producer client opens at its first record).
    pub partitions_with_records: usize,
    /// The daemon's ESTABLISHED TCP connections to the broker's port, at the end of the idle
    /// window.
    pub broker_connections: usize,
    /// The same right after every item was in Kafka.
    pub broker_connections_at_start: usize,
    /// The daemon's ESTABLISHED TCP connections to moto's port, at the end of the idle
    /// window.
    pub moto_connections: usize,
    /// Every ESTABLISHED TCP connection of the daemon, at the end of the idle window.
    pub all_connections: usize,
    /// Seconds between the last item in Kafka and the CPU window.
    pub settle_s: f64,
    /// Length of the CPU window, seconds.
    pub window_s: f64,
    /// The daemon's CPU over the window, percent of one core.
    pub idle_cpu_percent: f64,
    /// Resident memory at the end of the window.
    pub rss_mib: f64,
    /// Peak resident memory (VmHWM) at the end of the window.
    pub peak_rss_mib: f64,
}

/// Runs of one table count.
#[derive(Debug, Clone, Serialize)]
pub struct TablesSummary {
    /// Tables the rule selects.
    pub tables: usize,
    /// Partitions of each topic (`kafka.create_topics.partitions`).
    pub partitions: u32,
    /// Items in each table's stream.
    pub items_per_table: usize,
    /// Spawn to `/readyz` 200.
    pub ready_s: Summary,
    /// Spawn to every item in Kafka.
    pub first_records_s: Summary,
    /// Partitions holding records.
    pub partitions_with_records: Summary,
    /// ESTABLISHED connections to the broker (end of the idle window).
    pub broker_connections: Summary,
    /// ESTABLISHED connections to moto (end of the idle window).
    pub moto_connections: Summary,
    /// Idle CPU, percent of one core.
    pub idle_cpu_percent: Summary,
    /// Resident memory after the idle window.
    pub rss_mib: Summary,
    /// Peak resident memory.
    pub peak_rss_mib: Summary,
    /// Every run.
    pub runs: Vec<TablesRun>,
}

/// What the part needs from the benchmark.
pub struct Setup<'a> {
    /// The daemon binary.
    pub daemon_bin: &'a Path,
    /// The moto endpoint (the part is skipped when `None`).
    pub moto: Option<&'a str>,
    /// The large table count (the part also runs 1 table).
    pub tables: usize,
    /// Items written to each table before the daemon starts.
    pub items_per_table: usize,
    /// Partitions of each topic the daemon creates.
    pub partitions: u32,
    /// Wait between the last item in Kafka and the CPU window.
    pub settle: Duration,
    /// The CPU window.
    pub window: Duration,
    /// Runs of each table count.
    pub runs: usize,
    /// Merged into every daemon config.
    pub extra_config: Option<&'a Value>,
}

/// Every table count: 1 and `setup.tables`.
pub async fn run_part(
    setup: &Setup<'_>,
    dir: &Path,
    log: &dyn Fn(String),
) -> Result<Vec<TablesSummary>> {
    let Some(endpoint) = setup.moto else {
        log("tables: skipped (no emulator)".into());
        return Ok(Vec::new());
    };
    let mut counts = vec![1, setup.tables.max(1)];
    counts.dedup();
    let client = crate::moto_client(endpoint).await;
    let mut out = Vec::new();
    for n in counts {
        let prefix = format!("bench_tables_{}_{n}_", std::process::id());
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
        let started = Instant::now();
        let seeded = seed(&client, &names, setup.items_per_table).await;
        let result = match seeded {
            Ok(()) => {
                log(format!(
                    "tables: {n} table(s) with {} item(s) each created on moto in {:.1} s",
                    setup.items_per_table,
                    started.elapsed().as_secs_f64()
                ));
                runs_of(setup, endpoint, n, &prefix, dir, log).await
            }
            Err(e) => Err(e),
        };
        // The shared emulator keeps no benchmark tables behind.
        delete(&client, &names).await;
        let runs = result?;
        let f = |g: fn(&TablesRun) -> f64| summarize(&runs.iter().map(g).collect::<Vec<_>>());
        out.push(TablesSummary {
            tables: n,
            partitions: setup.partitions,
            items_per_table: setup.items_per_table,
            ready_s: f(|r| r.ready_s),
            first_records_s: f(|r| r.first_records_s),
            partitions_with_records: f(|r| r.partitions_with_records as f64),
            broker_connections: f(|r| r.broker_connections as f64),
            moto_connections: f(|r| r.moto_connections as f64),
            idle_cpu_percent: f(|r| r.idle_cpu_percent),
            rss_mib: f(|r| r.rss_mib),
            peak_rss_mib: f(|r| r.peak_rss_mib),
            runs,
        });
    }
    Ok(out)
}

async fn runs_of(
    setup: &Setup<'_>,
    endpoint: &str,
    n: usize,
    prefix: &str,
    dir: &Path,
    log: &dyn Fn(String),
) -> Result<Vec<TablesRun>> {
    let mut runs = Vec::new();
    for r in 0..setup.runs {
        log(format!(
            "tables: {n} table(s) x {} partitions, {} s settle, {} s window, run {}/{}",
            setup.partitions,
            setup.settle.as_secs(),
            setup.window.as_secs(),
            r + 1,
            setup.runs
        ));
        let run_dir = dir.join(format!("tables-{n}-{r}"));
        std::fs::create_dir_all(&run_dir)?;
        let run = one_run(setup, endpoint, n, prefix, &run_dir)
            .await
            .with_context(|| format!("tables {n} run {}", r + 1))?;
        log(format!(
            "  ready {:.2} s, every item in Kafka {:.2} s; {} broker connection(s) ({} after start-up), {} to moto, {} in all; idle {:.2}% of a core, RSS {:.1} MiB (peak {:.1})",
            run.ready_s,
            run.first_records_s,
            run.broker_connections,
            run.broker_connections_at_start,
            run.moto_connections,
            run.all_connections,
            run.idle_cpu_percent,
            run.rss_mib,
            run.peak_rss_mib
        ));
        runs.push(run);
    }
    Ok(runs)
}

async fn one_run(
    setup: &Setup<'_>,
    endpoint: &str,
    n: usize,
    prefix: &str,
    dir: &Path,
) -> Result<TablesRun> {
    let tansu = Tansu::start(dir).await?;
    let broker_port = port_of(&tansu.bootstrap)?;
    let moto_port = port_of(endpoint)?;
    let metrics = format!("127.0.0.1:{}", broker::free_port());
    let mut config = json!({
        "aws": { "region": "us-east-1", "endpoint_url": endpoint },
        "tables": { "include": [format!("{prefix}*")], "interval_seconds": 300 },
        "kafka": {
            "bootstrap_servers": [tansu.bootstrap],
            "create_topics": { "partitions": setup.partitions, "replication_factor": 1 },
        },
        "checkpoint": { "dir": dir.join("checkpoints") },
        "metrics": { "listen": metrics },
    });
    if let Some(extra) = setup.extra_config {
        crate::merge(&mut config, extra);
    }
    let expected = n * setup.items_per_table;
    let started = Instant::now();
    let mut daemon = Daemon::spawn(setup.daemon_bin, dir, &config)?;

    // Ready: every table the rule found started.
    wait(
        &mut daemon,
        "/readyz 200",
        Duration::from_secs(300),
        async || {
            let Ok((status, body)) = http_get(&metrics, "/readyz").await else {
                return Ok(false);
            };
            let body: Value = serde_json::from_str(&body).unwrap_or_default();
            // A rule that found nothing yet would be ready with no tables.
            Ok(status == 200 && body["tables"].as_u64() == Some(n as u64))
        },
    )
    .await?;
    let ready_s = started.elapsed().as_secs_f64();

    // Every item acknowledged by Kafka, per table (the daemon's counter).
    wait(
        &mut daemon,
        "every item acknowledged",
        Duration::from_secs(300),
        async || {
            let Ok((200, text)) = http_get(&metrics, "/metrics").await else {
                return Ok(false);
            };
            let done = changes_by_table(&text)
                .into_iter()
                .filter(|(t, c)| t.starts_with(prefix) && *c >= setup.items_per_table as f64)
                .count();
            Ok(done >= n)
        },
    )
    .await?;
    let first_records_s = started.elapsed().as_secs_f64();
    let broker_connections_at_start = procfs::established_by_remote_port(daemon.pid())
        .get(&broker_port)
        .copied()
        .unwrap_or(0);

    // And in the topics (the benchmark's own client, its connections are not the daemon's).
    let client = tansu.client().await?;
    let mut topics: Vec<String> = (0..n)
        .map(|i| crate::topic_of(&format!("{prefix}{i:03}")))
        .collect();
    topics.sort();
    let parts = Partitions::open(&client, &topics, setup.partitions).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions_with_records = loop {
        let read = parts.read_all().await?;
        let total: usize = read.iter().map(|p| p.records.len()).sum();
        if total == expected {
            break read.iter().filter(|p| !p.records.is_empty()).count();
        }
        if total > expected || Instant::now() > deadline {
            bail!("{total} records in the topics for {expected} items");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(parts);
    drop(client);

    // Idle.
    let settled = Instant::now();
    tokio::time::sleep(setup.settle).await;
    daemon.check_running()?;
    let settle_s = settled.elapsed().as_secs_f64();
    let (cpu0, t0) = (daemon.cpu(), Instant::now());
    tokio::time::sleep(setup.window).await;
    let (cpu1, window_s) = (daemon.cpu(), t0.elapsed().as_secs_f64());
    daemon.check_running()?;
    let connections = procfs::established_by_remote_port(daemon.pid());
    let rss_mib = procfs::rss_kib(daemon.pid()).unwrap_or(0) as f64 / 1024.0;
    let peak_rss_mib = daemon.peak_rss_mib();

    let status = daemon.stop(Duration::from_secs(30)).await?;
    if !status.success() {
        bail!(
            "the daemon exited with {status}; its log is in {}",
            dir.display()
        );
    }
    drop(tansu);
    let count = |port: u16| connections.get(&port).copied().unwrap_or(0);
    Ok(TablesRun {
        ready_s: crate::round(ready_s, 3),
        first_records_s: crate::round(first_records_s, 3),
        partitions_with_records,
        broker_connections: count(broker_port),
        broker_connections_at_start,
        moto_connections: count(moto_port),
        all_connections: connections.values().sum(),
        settle_s: crate::round(settle_s, 2),
        window_s: crate::round(window_s, 2),
        idle_cpu_percent: crate::round((cpu1 - cpu0) / window_s * 100.0, 3),
        rss_mib: crate::round(rss_mib, 1),
        peak_rss_mib: crate::round(peak_rss_mib, 1),
    })
}

/// Polls `done` every 10 ms until it holds; fails when the daemon exits or `timeout` passes.
async fn wait(
    daemon: &mut Daemon,
    what: &str,
    timeout: Duration,
    done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    crate::wait_for(what, daemon, timeout, Duration::from_millis(10), done).await
}

/// The port of `host:port` or `http://host:port/`.
fn port_of(address: &str) -> Result<u16> {
    address
        .trim_end_matches('/')
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {address}"))
}

/// `GET path` over HTTP/1.0 (the server closes the connection after the answer): the status
/// and the body.
async fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    let (address, path) = (address.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = address.parse()?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("GET {path}: no end of headers"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("GET {path}: no status"))?;
        Ok((status, body.to_owned()))
    })
    .await?
}

/// `dynamodb_cdc_changes_total{table="..."} N` of a `/metrics` answer, by table.
fn changes_by_table(metrics: &str) -> HashMap<String, f64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("dynamodb_cdc_changes_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            let table = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("table=\""))?
                .strip_suffix('"')?;
            Some((table.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Creates the tables (streams on) and writes `items` items to each, 8 at a time.
async fn seed(client: &aws_sdk_dynamodb::Client, names: &[String], items: usize) -> Result<()> {
    for chunk in names.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for name in chunk {
            let (client, name) = (client.clone(), name.clone());
            set.spawn(async move {
                crate::create_stream_table(&client, &name).await?;
                for i in 0..items {
                    client
                        .put_item()
                        .table_name(&name)
                        .item("pk", AttributeValue::S(format!("item-{i:04}")))
                        .item("pad", AttributeValue::S("x".repeat(100)))
                        .send()
                        .await
                        .map_err(|e| {
                            anyhow!(
                                "PutItem {name}: {}",
                                aws_sdk_dynamodb::error::DisplayErrorContext(e)
                            )
                        })?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    Ok(())
}

/// Deletes the tables, ignoring errors (some may not exist).
async fn delete(client: &aws_sdk_dynamodb::Client, names: &[String]) {
    for chunk in names.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for name in chunk {
            let (client, name) = (client.clone(), name.clone());
            set.spawn(async move {
                let _ = client.delete_table().table_name(name).send().await;
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// The report's table of the part.
pub fn render(summaries: &[TablesSummary]) -> String {
    let Some(first) = summaries.first() else {
        return String::new();
    };
    let r = first.runs.first();
    let mut out = format!(
        "\nTables found by a rule (moto, {} item(s) a table, topics created by the daemon); idle: {:.0} s after start-up, over {:.0} s\n",
        first.items_per_table,
        r.map_or(0.0, |r| r.settle_s),
        r.map_or(0.0, |r| r.window_s),
    );
    let mut rows = vec![[
        "tables",
        "partitions",
        "ready s",
        "first records s",
        "broker conns",
        "moto conns",
        "idle CPU %",
        "RSS MiB",
        "peak RSS MiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for s in summaries {
        rows.push(vec![
            s.tables.to_string(),
            format!(
                "{} a topic, {} in all",
                s.partitions,
                s.tables as u64 * u64::from(s.partitions)
            ),
            crate::cell(&s.ready_s, 2),
            crate::cell(&s.first_records_s, 2),
            crate::cell(&s.broker_connections, 0),
            crate::cell(&s.moto_connections, 0),
            crate::cell(&s.idle_cpu_percent, 2),
            crate::cell(&s.rss_mib, 1),
            crate::cell(&s.peak_rss_mib, 1),
        ]);
    }
    out.push_str(&crate::table(&rows));
    out.push_str(&format!(
        "  partitions holding records (median): {}\n",
        summaries
            .iter()
            .map(|s| format!(
                "{} of {}",
                s.partitions_with_records.median,
                s.tables as u64 * u64::from(s.partitions)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}
