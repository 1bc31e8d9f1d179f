//! Kafka broker outage (moto -> dynamodb-cdc -> a tansu broker of this test's own): the
//! broker is stopped for longer than the produce timeout while changes keep being written,
//! then started again on the same port and storage. While it is down the daemon retries
//! (WARN lines) and checkpoints nothing that Kafka does not hold; once it is back every
//! change arrives, in per-key order.
//!
//! The broker stores its log in a bucket of moto's S3 (`--storage-engine s3://bucket/`,
//! tansu's object-store engine, which needs conditional puts: moto has them), so a stopped
//! broker comes back with everything it had acknowledged.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::StreamViewType;
use common::scram::free_port;
use common::*;
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use serde_json::json;

/// How long the broker stays down (the produce timeout is `PRODUCE_TIMEOUT_MS`).
const OUTAGE: Duration = Duration::from_secs(8);
const PRODUCE_TIMEOUT_MS: u64 = 2000;
const KEYS: usize = 20;
/// Pause after each write: about 50 changes a second.
const WRITE_PAUSE: Duration = Duration::from_millis(15);
const TIMEOUT: Duration = Duration::from_secs(30);

/// Creates an S3 bucket on the local AWS endpoint (moto accepts unsigned requests).
fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = TcpStream::connect(host).expect("connect to the AWS endpoint");
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "create bucket {bucket}: {answer}"
    );
}

/// A tansu broker process on `port`, storing in `s3://bucket/` of the local AWS endpoint.
/// Killed when dropped.
struct Broker {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Broker {
    fn start(bin: &Path, port: u16, bucket: &str, cluster: &str, dir: &Path) -> Broker {
        let log = dir.join(format!("tansu-{port}-{:08x}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--cluster-id", cluster])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("s3://{bucket}/")])
            // object_store's S3 client, pointed at moto.
            .env("AWS_ENDPOINT", aws_endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_REGION", REGION)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        Broker {
            child: Some(child),
            port,
            log,
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until the broker accepts connections.
    async fn wait_ready(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(self.bootstrap()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tansu exited ({status}):\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "tansu not listening after {TIMEOUT:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 15 s). Returns how long it took and
    /// whether SIGKILL was needed.
    async fn stop(&mut self) -> (Duration, bool) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        while start.elapsed() < Duration::from_secs(15) {
            if child.try_wait().unwrap().is_some() {
                return (start.elapsed(), false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        (start.elapsed(), true)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- tansu log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Values sampled over time: (time since a start, value).
type Samples<T> = Arc<Mutex<Vec<(Duration, T)>>>;

/// Every 20 ms, appends (time since `since`, high watermark of each partition) to `out`.
async fn sample_watermarks(
    bootstrap: String,
    topic: String,
    since: Instant,
    out: Samples<HashMap<i32, i64>>,
) {
    let client = rskafka::client::ClientBuilder::new(vec![bootstrap])
        .build()
        .await
        .expect("kafka client");
    let mut partitions = Vec::new();
    for p in client
        .list_topics()
        .await
        .expect("list topics")
        .into_iter()
        .find(|t| t.name == topic)
        .expect("topic")
        .partitions
    {
        let pc = client
            .partition_client(topic.clone(), p, UnknownTopicHandling::Retry)
            .await
            .expect("partition client");
        partitions.push((p, Arc::new(pc)));
    }
    loop {
        let mut reads = tokio::task::JoinSet::new();
        for (p, pc) in &partitions {
            let (p, pc) = (*p, pc.clone());
            reads.spawn(async move { (p, pc.get_offset(OffsetAt::Latest).await.expect("offset")) });
        }
        let high: HashMap<i32, i64> = reads.join_all().await.into_iter().collect();
        // Taken after the reads: the watermarks were at least this high by then.
        out.lock().unwrap().push((since.elapsed(), high));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_checkpoints_only_what_kafka_holds() {
    if !stack_available() {
        return;
    }
    let Some(tansu) = tansu_bin_or_skip() else {
        return;
    };
    let test_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let bucket = format!("dynamodb-cdc-broker-{:08x}", rand::random::<u32>());
    create_bucket(&aws_endpoint(), &bucket);
    let cluster = unique("outage");
    let port = free_port();
    let mut broker = Broker::start(&tansu, port, &bucket, &cluster, dir.path());
    broker.wait_ready().await;
    let bootstrap = broker.bootstrap();

    let db = dynamodb().await;
    let table = unique("outage");
    create_table(&db, &table, "pk", None, StreamViewType::NewAndOldImages).await;
    let topic = format!("t.{table}");
    let cp_dir = dir.path().join("cp");
    let mut cfg = config(&[(&table, &topic)], None, &cp_dir);
    cfg["kafka"]["bootstrap_servers"] = json!([bootstrap]);
    cfg["kafka"]["produce_timeout_ms"] = json!(PRODUCE_TIMEOUT_MS);
    // /healthz calls Kafka stalled 5 s into the 8 s outage (a quiet shard's longest silence
    // is 32 x 100 ms + 1.5 s here, so 5 s is a valid limit).
    let metrics_port = free_port();
    let health_url = format!("http://127.0.0.1:{metrics_port}/healthz");
    cfg["metrics"] = json!({"listen": format!("127.0.0.1:{metrics_port}")});
    cfg["health"] = json!({"max_stall_seconds": 5});
    cfg["aws"]["request_timeout_ms"] = json!(1500);

    let (workload, writers) = Workload::start(&db, &table, KEYS, 1, 0, 100_000, WRITE_PAUSE);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let mut tail = Tail::new(&bootstrap, &topic);
    let started = wait_for(TIMEOUT, || {
        workload.written() >= 150 || workload.failure().is_some()
    })
    .await;
    assert!(started, "150 changes not written within {TIMEOUT:?}");
    wait_delivered(&mut tail, &workload, 150, &mut daemon, TIMEOUT).await;

    let (status, body) = dynamodb_cdc::telemetry::server::get(&health_url)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // /healthz through the outage and the recovery, every 200 ms.
    let health: Samples<(u16, String)> = Arc::default();
    let health_sampler = {
        let (health, url, since) = (health.clone(), health_url.clone(), Instant::now());
        tokio::spawn(async move {
            loop {
                if let Ok(answer) = dynamodb_cdc::telemetry::server::get(&url).await {
                    health.lock().unwrap().push((since.elapsed(), answer));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The outage: changes keep being written.
    let (stopping, killed) = broker.stop().await;
    let down = Instant::now();
    let written_before_outage = workload.written();
    eprintln!(
        "broker stopped ({stopping:?}{}) after {written_before_outage} changes",
        if killed {
            ", SIGKILL after SIGTERM"
        } else {
            ""
        }
    );
    // Shard checkpoints seen while the broker is down.
    let mut seen: Vec<BTreeMap<String, Option<String>>> = vec![read_checkpoints(&cp_dir, &table)];
    // What Kafka holds: read from the broker's storage through a second broker process on
    // another port; the daemon knows only the first one, which stays down.
    let mut inspector = Broker::start(&tansu, free_port(), &bucket, &cluster, dir.path());
    inspector.wait_ready().await;
    let in_kafka = within(
        TIMEOUT,
        "reading the stopped broker's storage",
        consume_from(&inspector.bootstrap(), &topic, 0, Duration::ZERO),
    )
    .await;
    drop(inspector);
    let held: HashSet<(String, String)> = in_kafka
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| {
            (
                v["shard_id"].as_str().unwrap().to_owned(),
                v["sequence_number"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut last_held: HashMap<&str, &str> = HashMap::new();
    for (shard, seq) in &held {
        let e = last_held.entry(shard).or_insert(seq);
        if seq_cmp(seq, e).is_gt() {
            *e = seq;
        }
    }
    // The outage's length is the subject; the loop samples the checkpoints meanwhile.
    while down.elapsed() < OUTAGE {
        seen.push(read_checkpoints(&cp_dir, &table));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen.push(read_checkpoints(&cp_dir, &table));
    let retries = daemon.log_events("produce failed; retrying");
    assert!(
        !retries.is_empty(),
        "no \"produce failed; retrying\" while the broker was down:\n{}",
        daemon.log_text()
    );
    assert_eq!(retries[0]["level"], "WARN");
    assert!(
        daemon.try_status().is_none(),
        "the daemon exited during the outage:\n{}",
        daemon.log_text()
    );
    let written_during_outage = workload.written() - written_before_outage;

    // The broker returns on the same port and storage.
    let up = Instant::now();
    let mut broker = Broker::start(&tansu, port, &bucket, &cluster, dir.path());
    broker.wait_ready().await;
    let backlog = workload.written();
    // Changes Kafka did not have when it came back.
    let waiting = backlog - held.len();
    // Reading records back is slow here (tansu fetches each batch from S3 on its own), so
    // the recovery time comes from samples taken from now on: the checkpoint files (the
    // daemon's record of what Kafka acknowledged) and the high watermarks (what Kafka
    // shows; coarser, as each sample takes a while). The tail starts from what the broker
    // held and confirms the backlog arrived.
    let samples: Samples<HashMap<i32, i64>> = Arc::default();
    let sampler = tokio::spawn(sample_watermarks(
        bootstrap.clone(),
        topic.clone(),
        up,
        samples.clone(),
    ));
    let cp_samples: Samples<BTreeMap<String, Option<String>>> = Arc::default();
    let cp_sampler = {
        let (cp_samples, cp_dir, table) = (cp_samples.clone(), cp_dir.clone(), table.clone());
        tokio::spawn(async move {
            loop {
                let cps = read_checkpoints(&cp_dir, &table);
                cp_samples.lock().unwrap().push((up.elapsed(), cps));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tail.reconnect();
    tail.seed(in_kafka.clone());
    wait_delivered(&mut tail, &workload, backlog, &mut daemon, TIMEOUT).await;
    // The checkpoint trails the acknowledgements by up to checkpoint.interval_ms; both
    // samplers must have looked after that (a watermark sample takes a while on a busy
    // machine).
    let settled = up.elapsed() + Duration::from_millis(500);
    within(TIMEOUT, "samples after the backlog arrived", async {
        while !(samples
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(t, _)| *t > settled)
            && cp_samples
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(t, _)| *t > settled))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    sampler.abort();
    cp_sampler.abort();

    // A little more traffic after the recovery (paces the workload; nothing waits on it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    workload.stop();
    for w in writers {
        w.await.expect("writer");
    }
    if let Some(failure) = workload.failure() {
        panic!("{failure}");
    }
    let total = workload.written();
    wait_delivered(&mut tail, &workload, total, &mut daemon, TIMEOUT).await;
    // Health: Kafka named as stalled during the outage, healthy again after it.
    let recovered = wait_for(TIMEOUT, || {
        health
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(_, (status, _))| *status == 200)
    })
    .await;
    health_sampler.abort();
    let answers = health.lock().unwrap().clone();
    let kafka_stalled = answers.iter().any(|(_, (status, body))| {
        *status == 503
            && serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| {
                v["stalled"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["check"] == "kafka"))
            })
    });
    assert!(
        kafka_stalled,
        "no 503 naming Kafka during the outage: {:?}",
        answers
            .iter()
            .map(|(t, (s, _))| (t.as_millis(), *s))
            .collect::<Vec<_>>()
    );
    assert!(
        recovered,
        "not healthy after the outage: {:?}",
        answers.last()
    );
    let (_, metrics) =
        dynamodb_cdc::telemetry::server::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .unwrap();
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dynamodb_cdc_produce_requests_total{outcome=\"error\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        errors.is_some_and(|n| n >= 1.0),
        "produce errors: {errors:?}\n{metrics}"
    );
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("stopped cleanly"));

    // Nothing was checkpointed that Kafka did not hold: every record of the stream up to a
    // checkpoint seen during the outage was in the stopped broker's storage.
    let stream = stream_sequence_numbers(&table).await;
    let mut highest_checkpoint: BTreeMap<String, String> = BTreeMap::new();
    for checkpoints in &seen {
        for (shard, cp) in checkpoints {
            let Some(cp) = cp else { continue };
            let missing: Vec<&String> = stream
                .iter()
                .filter(|(s, seq)| s == shard && seq_cmp(seq, cp).is_le())
                .filter(|(s, seq)| !held.contains(&(s.clone(), seq.clone())))
                .map(|(_, seq)| seq)
                .collect();
            assert!(
                missing.is_empty(),
                "shard {shard} was checkpointed at {cp} while the broker was down, but Kafka \
                 held only up to {:?}; not in Kafka: {missing:?}",
                last_held.get(shard.as_str())
            );
            let e = highest_checkpoint
                .entry(shard.clone())
                .or_insert(cp.clone());
            if seq_cmp(cp, e).is_gt() {
                *e = cp.clone();
            }
        }
    }
    assert!(
        !highest_checkpoint.is_empty(),
        "no checkpoint was written before the outage"
    );

    let records = within(
        TIMEOUT,
        "reading Kafka",
        consume_from(
            &bootstrap,
            &topic,
            tail.records.len(),
            Duration::from_secs(10),
        ),
    )
    .await;
    let changes = workload.changes();
    let d = check_delivery(&records, &changes);
    // Recovery: from the broker's start until every change written before it was
    // acknowledged (its first copy below every partition's high watermark; the checkpoint
    // at or past its sequence number).
    let deletes = deletes_of(&changes);
    let mut first_copy: HashMap<u64, (i32, i64, String, String)> = HashMap::new();
    for r in &records {
        let Some(v) = r.value.as_ref() else { continue };
        if let Some(id) = change_id(v, &deletes) {
            first_copy.entry(id).or_insert_with(|| {
                (
                    r.partition,
                    r.offset,
                    v["shard_id"].as_str().unwrap().to_owned(),
                    v["sequence_number"].as_str().unwrap().to_owned(),
                )
            });
        }
    }
    let mut needed_offset: HashMap<i32, i64> = HashMap::new();
    let mut needed_seq: HashMap<String, String> = HashMap::new();
    // (A lost change fails the test below.)
    for (p, o, shard, seq) in changes[..backlog]
        .iter()
        .filter_map(|c| first_copy.get(&c.id))
    {
        let e = needed_offset.entry(*p).or_insert(0);
        *e = (*e).max(o + 1);
        let e = needed_seq.entry(shard.clone()).or_insert(seq.clone());
        if seq_cmp(seq, e).is_gt() {
            *e = seq.clone();
        }
    }
    let recovery_kafka = samples
        .lock()
        .unwrap()
        .iter()
        .find(|(_, high)| {
            needed_offset
                .iter()
                .all(|(p, n)| high.get(p).is_some_and(|h| h >= n))
        })
        .map(|(t, _)| *t);
    // Reported, not asserted: in runs where the tail also missed a batch that a full read
    // holds, tansu's sampled high watermarks stayed below the offsets that read shows (the
    // delivery and checkpoint checks below hold either way).
    let recovery_checkpoint = cp_samples
        .lock()
        .unwrap()
        .iter()
        .find(|(_, cps)| {
            needed_seq.iter().all(|(shard, n)| {
                cps.get(shard)
                    .and_then(|c| c.as_deref())
                    .is_some_and(|c| seq_cmp(c, n).is_ge())
            })
        })
        .map(|(t, _)| *t)
        .expect("the checkpoint never reached the backlog");
    report(&format!(
        "broker outage report: written={} (during the {:?} outage: {written_during_outage}) \
         delivered={} (unique) duplicates={} lost={} produce retries logged={} \
         checkpoint during the outage={highest_checkpoint:?} last in Kafka={last_held:?} \
         changes waiting when the broker returned={waiting} (SIGTERM to exit: {stopping:?}) \
         recovery after the broker returned: backlog checkpointed after \
         {recovery_checkpoint:?}, in Kafka's high watermarks by {recovery_kafka:?} (None: not seen) \
         runtime={:?}",
        d.written,
        OUTAGE,
        d.delivered,
        d.duplicates,
        d.lost.len(),
        retries.len(),
        test_start.elapsed()
    ));
    assert!(
        written_during_outage > 0 && waiting > 0,
        "the outage held nothing back ({written_during_outage} changes written during it, \
         {waiting} not in Kafka when it ended)"
    );
    d.assert_complete();
    drop(broker);
}
