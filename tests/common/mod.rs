//! Helpers for integration tests against the local stack (moto on 127.0.0.1:4566, a Kafka
//! broker on 127.0.0.1:9092 or `KAFKA_BOOTSTRAP`). Every test uses its own table and topic
//! names so tests can share one stack.
#![allow(dead_code)]

pub mod scram;
pub mod streams_double;
pub mod tls;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, KeySchemaElement, KeyType, ProvisionedThroughput,
    ScalarAttributeType, StreamSpecification, StreamViewType,
};
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use rskafka::record::RecordAndOffset;
use serde_json::{json, Value};

pub const REGION: &str = "us-east-1";
pub const ACCOUNT: &str = "123456789012";

/// The AWS endpoint of the local stack.
pub fn aws_endpoint() -> String {
    std::env::var("DYNAMODB_CDC_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// The Kafka bootstrap server of the local stack.
pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn reachable(addr: &str) -> bool {
    let addr = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// True when the stack is up. When it is not: panics under CI (`CI` set), else reports the
/// skip (see [`skip`]) and returns false so the test can return early.
pub fn stack_available() -> bool {
    let aws = aws_endpoint();
    let kafka = kafka_bootstrap();
    let missing: Vec<String> = [(aws.as_str(), "AWS endpoint"), (kafka.as_str(), "Kafka")]
        .into_iter()
        .filter(|(addr, _)| !reachable(addr))
        .map(|(addr, name)| format!("no {name} on {addr}"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!("{}; run ./localstack/test.sh", missing.join(", ")));
    false
}

/// Reports that the calling test is skipped because of `reason` (something of the local
/// stack is missing): a panic under CI (`CI` set), else one `SKIPPED <test>: <reason>` line.
/// The line goes to the process's stderr handle, not through `eprintln!`, which the test
/// harness captures and drops for a test that passes: a green run that tested nothing must
/// say so.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    // The harness runs each test on a thread named after it.
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason} (CI is set: a test may not skip)");
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "SKIPPED {test}: {reason}");
    let _ = err.flush();
}

/// The tansu binary for brokers of a test's own: `DYNAMODB_CDC_TANSU` (localstack/test.sh
/// sets it), `TANSU_BIN`, the one `localstack/up.sh` caches
/// (`~/.cache/dynamodb-cdc/tansu-dynostore-libsql/bin/tansu`: S3 and sqlite storage), or
/// `tansu` on PATH. Err says where it looked.
pub fn tansu_bin() -> Result<PathBuf, String> {
    for var in ["DYNAMODB_CDC_TANSU", "TANSU_BIN"] {
        if let Some(bin) = std::env::var_os(var) {
            let bin = PathBuf::from(bin);
            return if bin.is_file() {
                Ok(bin)
            } else {
                Err(format!("{var}={} does not exist", bin.display()))
            };
        }
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    let installed = cache.map(|c| c.join("dynamodb-cdc/tansu-dynostore-libsql/bin/tansu"));
    if let Some(bin) = installed.iter().find(|b| b.is_file()) {
        return Ok(bin.clone());
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("tansu"))
                .find(|b| b.is_file())
        })
        .ok_or_else(|| {
            format!(
                "tansu not found (DYNAMODB_CDC_TANSU, TANSU_BIN, {}, PATH); \
                 ./localstack/up.sh installs it",
                installed.map_or("the cache".into(), |b| b.display().to_string())
            )
        })
}

/// [`tansu_bin`], or None after reporting the skip (a panic under `CI`, see [`skip`]).
pub fn tansu_bin_or_skip() -> Option<PathBuf> {
    match tansu_bin() {
        Ok(bin) => Some(bin),
        Err(reason) => {
            skip(&reason);
            None
        }
    }
}

/// Polls `done` every 20 ms until it holds (true) or `timeout` passes (false): the wait on a
/// condition that replaces a fixed sleep.
pub async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name unique to this test run: `prefix` + random suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// SDK config with static test credentials against `endpoint`.
pub async fn sdk_config(
    endpoint: &str,
    key: &str,
    secret: &str,
    token: Option<&str>,
) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            key,
            secret,
            token.map(str::to_owned),
            None,
            "test",
        ))
        .load()
        .await
}

/// A DynamoDB client with dummy credentials (moto without auth accepts any).
pub async fn dynamodb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(&aws_endpoint(), "test", "test", None).await)
}

/// Creates a table with a stream. `range` adds a numeric sort key.
pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
    hash: &str,
    range: Option<&str>,
    view: StreamViewType,
) {
    create_table_with(client, name, hash, range, Some(view), &[]).await
}

/// Creates a table: `range` adds a numeric sort key, `view` a stream, `tags` its tags.
pub async fn create_table_with(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
    hash: &str,
    range: Option<&str>,
    view: Option<StreamViewType>,
    tags: &[(&str, &str)],
) {
    let mut req = client
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(hash)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(hash)
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .provisioned_throughput(
            ProvisionedThroughput::builder()
                .read_capacity_units(100)
                .write_capacity_units(100)
                .build()
                .unwrap(),
        );
    if let Some(view) = view {
        req = req.stream_specification(stream_of(view));
    }
    for (k, v) in tags {
        req = req.tags(
            aws_sdk_dynamodb::types::Tag::builder()
                .key(*k)
                .value(*v)
                .build()
                .unwrap(),
        );
    }
    if let Some(range) = range {
        req = req
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(range)
                    .attribute_type(ScalarAttributeType::N)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(range)
                    .key_type(KeyType::Range)
                    .build()
                    .unwrap(),
            );
    }
    req.send().await.expect("create table");
}

/// An enabled stream of `view`.
pub fn stream_of(view: StreamViewType) -> StreamSpecification {
    StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(view)
        .build()
        .unwrap()
}

/// The table's ARN.
pub async fn table_arn(client: &aws_sdk_dynamodb::Client, name: &str) -> String {
    client
        .describe_table()
        .table_name(name)
        .send()
        .await
        .expect("describe table")
        .table()
        .and_then(|t| t.table_arn())
        .expect("a table ARN")
        .to_owned()
}

/// Tags the table with `key` = `value`.
pub async fn tag_table(client: &aws_sdk_dynamodb::Client, name: &str, key: &str, value: &str) {
    client
        .tag_resource()
        .resource_arn(table_arn(client, name).await)
        .tags(
            aws_sdk_dynamodb::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("tag table");
}

/// Shorthand for a string attribute.
pub fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

/// Shorthand for a number attribute.
pub fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.to_owned())
}

/// Puts an item.
pub async fn put(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    item: Vec<(&str, AttributeValue)>,
) {
    client
        .put_item()
        .table_name(table)
        .set_item(Some(
            item.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ))
        .send()
        .await
        .expect("put item");
}

/// Deletes an item.
pub async fn delete(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    key: Vec<(&str, AttributeValue)>,
) {
    client
        .delete_item()
        .table_name(table)
        .set_key(Some(
            key.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ))
        .send()
        .await
        .expect("delete item");
}

/// Creates the IAM role the daemon assumes, allowed to read streams.
pub async fn create_reader_role(endpoint: &str, name: &str) -> String {
    let iam = aws_sdk_iam::Client::new(&sdk_config(endpoint, "test", "test", None).await);
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")}, "Action": "sts:AssumeRole"}]
    });
    let out = iam
        .create_role()
        .role_name(name)
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .expect("create role");
    iam.put_role_policy()
        .role_name(name)
        .policy_name("read-streams")
        .policy_document(reader_policy().to_string())
        .send()
        .await
        .expect("put role policy");
    out.role().unwrap().arn().to_owned()
}

/// What the daemon's role may do.
pub fn reader_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": [
            "dynamodb:DescribeTable", "dynamodb:DescribeStream", "dynamodb:GetShardIterator",
            "dynamodb:GetRecords", "dynamodb:ListStreams", "dynamodb:Scan"
        ], "Resource": "*"}]
    })
}

/// A config document for the daemon; tests patch it further.
pub fn config(tables: &[(&str, &str)], role_arn: Option<&str>, checkpoint_dir: &Path) -> Value {
    let mut c = json!({
        "aws": {"region": REGION, "endpoint_url": aws_endpoint()},
        "tables": tables.iter().map(|(t, topic)| json!({"name": t, "topic": topic})).collect::<Vec<_>>(),
        "kafka": {
            "bootstrap_servers": [kafka_bootstrap()],
            "create_topics": {"partitions": 3, "replication_factor": 1},
            "produce_timeout_ms": 10000
        },
        "checkpoint": {"dir": checkpoint_dir, "interval_ms": 200},
        "reader": {"idle_poll_interval_ms": 100, "rescan_interval_ms": 2000},
        "log": {"format": "json"},
        "shutdown_timeout_ms": 20000
    });
    if let Some(arn) = role_arn {
        c["aws"]["assume_role"] = json!({"role_arn": arn, "external_id": "test-external-id"});
    }
    c
}

/// A daemon config for tables read from the Streams double.
pub fn double_config(
    double: &streams_double::StreamsDouble,
    tables: &[(&str, &str)],
    dir: &Path,
) -> Value {
    let mut cfg = config(tables, None, &dir.join("cp"));
    cfg["aws"]["endpoint_url"] = json!(double.endpoint());
    cfg
}

/// A running daemon, its stderr going to a log file.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `dynamodb-cdc run` with `config` written into `dir`.
    pub fn start(dir: &Path, config: &Value, env: &[(&str, &str)]) -> Daemon {
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let log = dir.join(format!("daemon-{}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"));
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,dynamodb_cdc=debug")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start dynamodb-cdc");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Sends SIGTERM and waits for the exit status (at most `within`).
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "daemon did not stop within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (e.g. "HUP") to the daemon.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// A field of /proc/PID/status in KiB (e.g. "VmHWM", the peak resident set size).
    pub fn status_kib(&self, field: &str) -> u64 {
        let pid = self.pid().expect("running");
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// Waits for the daemon to exit by itself (at most `within`, then panics with its log);
    /// its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still running after {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if it already exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines (JSON objects) whose message is `message`.
    pub fn log_events(&self, message: &str) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Value>,
    pub headers: HashMap<String, String>,
    pub timestamp_ms: i64,
}

/// Reads every record of `topic` (all partitions, from offset 0) until at least `count`
/// records arrived or `timeout` passed. Returns them sorted by (partition, offset).
pub async fn consume(topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
    let client = ClientBuilder::new(vec![kafka_bootstrap()])
        .build()
        .await
        .expect("kafka client");
    let deadline = Instant::now() + timeout;
    loop {
        let mut out = Vec::new();
        let partitions = client
            .list_topics()
            .await
            .expect("list topics")
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions)
            .unwrap_or_default();
        for p in partitions {
            let pc = client
                .partition_client(topic, p, UnknownTopicHandling::Retry)
                .await
                .expect("partition client");
            let high = pc
                .get_offset(OffsetAt::Latest)
                .await
                .expect("high watermark");
            let mut offset = 0;
            while offset < high {
                let (records, _) = pc
                    .fetch_records(offset, 1..10_000_000, 100)
                    .await
                    .expect("fetch");
                if records.is_empty() {
                    break;
                }
                for RecordAndOffset { record, offset: o } in records {
                    offset = offset.max(o + 1);
                    out.push(Consumed {
                        partition: p,
                        offset: o,
                        key: record.key.map(|k| String::from_utf8(k).unwrap()),
                        value: record
                            .value
                            .map(|v| serde_json::from_slice(&v).expect("value is JSON")),
                        headers: record
                            .headers
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
                            .collect(),
                        timestamp_ms: record.timestamp.timestamp_millis(),
                    });
                }
            }
        }
        out.sort_by_key(|c| (c.partition, c.offset));
        if out.len() >= count || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes a file in `dir` (for logs and configs of a test).
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Helpers for the crash and broker-outage tests: a consumer for any broker, an incremental
// tail, checkpoint files, the stream itself, and a workload of uniquely numbered changes
// with the check that every one of them reached Kafka in per-key order.

fn to_consumed(partition: i32, r: RecordAndOffset) -> Consumed {
    let RecordAndOffset { record, offset } = r;
    Consumed {
        partition,
        offset,
        key: record.key.map(|k| String::from_utf8(k).unwrap()),
        value: record
            .value
            .map(|v| serde_json::from_slice(&v).expect("value is JSON")),
        headers: record
            .headers
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect(),
        timestamp_ms: record.timestamp.timestamp_millis(),
    }
}

/// [`consume`] against the broker at `bootstrap`: every record of `topic` from offset 0,
/// until at least `count` arrived and every partition was read up to its high watermark,
/// or `timeout` passed; sorted by (partition, offset).
pub async fn consume_from(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let mut tail = Tail::new(bootstrap, topic);
    loop {
        tail.poll().await;
        if (tail.records.len() >= count && tail.caught_up()) || Instant::now() > deadline {
            let mut out = tail.records;
            out.sort_by_key(|c| (c.partition, c.offset));
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of `topic` once nothing new arrived for `quiet`: a produce request a killed
/// daemon left in the broker's socket buffer is still appended, and there is no other sign
/// of when that is done. Panics after `timeout` if records keep arriving.
pub async fn read_settled(
    bootstrap: &str,
    topic: &str,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    let start = Instant::now();
    let mut tail = Tail::new(bootstrap, topic);
    let mut last_new = Instant::now();
    loop {
        if tail.poll().await > 0 {
            last_new = Instant::now();
        } else if last_new.elapsed() >= quiet {
            let mut out = tail.records;
            out.sort_by_key(|c| (c.partition, c.offset));
            return out;
        }
        assert!(
            start.elapsed() < timeout,
            "{topic}: records still arriving after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a topic incrementally: each [`Tail::poll`] appends what arrived since the last one
/// to `records` (each partition in offset order). It starts at offset 0 and then always
/// fetches from the end of the last batch it read (tansu may skip a batch when a fetch
/// starts inside it). Unlike [`consume`], it does not wait a second on each fetch.
#[derive(Debug)]
pub struct Tail {
    bootstrap: String,
    topic: String,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    sasl: Option<rskafka::client::SaslConfig>,
    client: Option<rskafka::client::Client>,
    /// (partition, its client); the next offsets are in `next`.
    partitions: Vec<(i32, rskafka::client::partition::PartitionClient)>,
    next: HashMap<i32, i64>,
    /// High watermarks seen by the last poll.
    high: HashMap<i32, i64>,
    /// Every record read so far.
    pub records: Vec<Consumed>,
}

impl Tail {
    pub fn new(bootstrap: &str, topic: &str) -> Tail {
        Tail {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            tls: None,
            sasl: None,
            client: None,
            partitions: Vec::new(),
            next: HashMap::new(),
            high: HashMap::new(),
            records: Vec::new(),
        }
    }

    /// Connects over TLS with `config` (see [`tls::client_config`]).
    pub fn tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Tail {
        self.tls = Some(config);
        self
    }

    /// Logs in with `sasl` (see [`scram::Mechanism::sasl_config`]).
    pub fn sasl(mut self, sasl: rskafka::client::SaslConfig) -> Tail {
        self.sasl = Some(sasl);
        self
    }

    /// Takes `records` (a full read of the topic, e.g. through another broker on the same
    /// storage) as read: the next poll starts after them.
    pub fn seed(&mut self, records: Vec<Consumed>) {
        for r in &records {
            let next = self.next.entry(r.partition).or_insert(0);
            *next = (*next).max(r.offset + 1);
        }
        self.records = records;
    }

    /// Whether the last poll read every partition up to the high watermark it saw.
    pub fn caught_up(&self) -> bool {
        self.high
            .iter()
            .all(|(p, h)| self.next.get(p).copied().unwrap_or(0) >= *h)
    }

    /// Drops the connections, keeping the offsets (after the broker restarted).
    pub fn reconnect(&mut self) {
        self.partitions.clear();
        self.client = None;
    }

    /// Reads what arrived since the last call; returns how many records that was (0 while
    /// the topic does not exist yet). Waits (rskafka retries) while the broker is down.
    pub async fn poll(&mut self) -> usize {
        if self.client.is_none() {
            let mut builder = ClientBuilder::new(vec![self.bootstrap.clone()]);
            if let Some(tls) = &self.tls {
                builder = builder.tls_config(tls.clone());
            }
            if let Some(sasl) = &self.sasl {
                builder = builder.sasl_config(sasl.clone());
            }
            self.client = Some(builder.build().await.expect("kafka client"));
        }
        let client = self.client.as_ref().unwrap();
        if self.partitions.is_empty() {
            let partitions = client
                .list_topics()
                .await
                .expect("list topics")
                .into_iter()
                .find(|t| t.name == self.topic)
                .map(|t| t.partitions)
                .unwrap_or_default();
            for p in partitions {
                let pc = client
                    .partition_client(self.topic.clone(), p, UnknownTopicHandling::Retry)
                    .await
                    .expect("partition client");
                self.partitions.push((p, pc));
            }
        }
        let mut read = 0;
        for (p, pc) in &self.partitions {
            let next = self.next.entry(*p).or_insert(0);
            let high = pc
                .get_offset(OffsetAt::Latest)
                .await
                .expect("high watermark");
            self.high.insert(*p, high);
            while *next < high {
                // A short max wait: tansu 0.6 sleeps half of it even when it has records.
                let (records, _) = pc
                    .fetch_records(*next, 1..10_000_000, 20)
                    .await
                    .expect("fetch");
                if records.is_empty() {
                    break;
                }
                for r in records {
                    if r.offset < *next {
                        continue;
                    }
                    *next = r.offset + 1;
                    self.records.push(to_consumed(*p, r));
                    read += 1;
                }
            }
        }
        read
    }
}

/// A Kafka client for `bootstrap`, over TLS with `tls` and logged in with `sasl` when
/// given, that gives up after `deadline` (rskafka otherwise retries a refused connection
/// forever). Err is rskafka's error as text (it names the TLS or SASL failure).
pub async fn kafka_client(
    bootstrap: &str,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    sasl: Option<rskafka::client::SaslConfig>,
    deadline: Duration,
) -> Result<rskafka::client::Client, String> {
    let mut builder =
        ClientBuilder::new(vec![bootstrap.to_owned()]).backoff_config(rskafka::BackoffConfig {
            deadline: Some(deadline),
            ..Default::default()
        });
    if let Some(tls) = tls {
        builder = builder.tls_config(tls);
    }
    if let Some(sasl) = sasl {
        builder = builder.sasl_config(sasl);
    }
    // The deadline bounds when rskafka stops retrying, not one attempt: a SCRAM login
    // takes up to a second in a debug build (PBKDF2), and the last backoff may overshoot.
    // This bound only catches an attempt that hangs.
    let hang = deadline + Duration::from_secs(30);
    match tokio::time::timeout(hang, builder.build()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from {bootstrap} within {hang:?}")),
    }
}

/// Orders two DynamoDB Streams sequence numbers (decimal strings of different lengths).
pub fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The checkpoint files of `table` under `checkpoint_dir`: shard id -> sequence number.
pub fn read_checkpoints(
    checkpoint_dir: &Path,
    table: &str,
) -> std::collections::BTreeMap<String, Option<String>> {
    let dir = checkpoint_dir.join(table).join("shards");
    let mut out = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("checkpoint {}: {e}: {text}", path.display()));
            out.insert(
                v["shard_id"].as_str().unwrap().to_owned(),
                v["sequence_number"].as_str().map(str::to_owned),
            );
        }
    }
    out
}

/// Every record the table's stream holds: (shard id, sequence number), each shard read from
/// TRIM_HORIZON until it has nothing more.
pub async fn stream_sequence_numbers(table: &str) -> Vec<(String, String)> {
    let conf = sdk_config(&aws_endpoint(), "test", "test", None).await;
    let db = aws_sdk_dynamodb::Client::new(&conf);
    let streams = aws_sdk_dynamodbstreams::Client::new(&conf);
    let arn = db
        .describe_table()
        .table_name(table)
        .send()
        .await
        .expect("describe table")
        .table
        .and_then(|t| t.latest_stream_arn)
        .expect("stream arn");
    let mut shards = Vec::new();
    let mut start: Option<String> = None;
    loop {
        let out = streams
            .describe_stream()
            .stream_arn(&arn)
            .set_exclusive_start_shard_id(start.clone())
            .send()
            .await
            .expect("describe stream");
        let desc = out.stream_description.expect("stream description");
        shards.extend(
            desc.shards()
                .iter()
                .filter_map(|s| s.shard_id().map(str::to_owned)),
        );
        start = desc.last_evaluated_shard_id;
        if start.is_none() {
            break;
        }
    }
    let mut out = Vec::new();
    for shard in shards {
        let mut iterator = streams
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&shard)
            .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("get shard iterator")
            .shard_iterator;
        while let Some(it) = iterator {
            let page = streams
                .get_records()
                .shard_iterator(it)
                .limit(1000)
                .send()
                .await
                .expect("get records");
            for r in page.records() {
                let seq = r.dynamodb().and_then(|d| d.sequence_number()).unwrap();
                out.push((shard.clone(), seq.to_owned()));
            }
            if page.records().is_empty() {
                break;
            }
            iterator = page.next_shard_iterator;
        }
    }
    out
}

/// What one change of a [`Workload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// PutItem: INSERT or MODIFY.
    Put,
    /// UpdateItem of an existing item: MODIFY.
    Update,
    /// DeleteItem of an existing item whose last change was `prev`: REMOVE.
    Delete { prev: u64 },
}

/// One change a [`Workload`] made (the write returned successfully).
#[derive(Debug, Clone)]
pub struct Change {
    /// Unique, increasing per key; the item's `w` attribute (not set by a delete).
    pub id: u64,
    /// The item's `pk`.
    pub key: String,
    pub kind: ChangeKind,
    /// When the write returned.
    pub at: Instant,
}

/// Writers that make uniquely numbered changes (puts, updates, deletes) to items `pk` =
/// `k000`… of a table with a `pk` hash key, and the log of what they wrote.
#[derive(Debug, Default)]
pub struct Workload {
    next_id: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    changes: std::sync::Mutex<Vec<Change>>,
    failure: std::sync::Mutex<Option<String>>,
}

impl Workload {
    /// Starts `writers` tasks over `keys` keys (each key belongs to one writer, so a key's
    /// changes are written one after the other). They write until [`Workload::stop`] was
    /// called and at least `min` changes were made, or `max` were made, pausing `pause`
    /// after each write. A failed write (its outcome unknown) stops every writer and is
    /// reported by [`Workload::failure`].
    pub fn start(
        db: &aws_sdk_dynamodb::Client,
        table: &str,
        keys: usize,
        writers: usize,
        min: usize,
        max: usize,
        pause: Duration,
    ) -> (std::sync::Arc<Workload>, Vec<tokio::task::JoinHandle<()>>) {
        let workload = std::sync::Arc::new(Workload::default());
        // No SDK retries: a retried write could land twice.
        let db = aws_sdk_dynamodb::Client::from_conf(
            db.config()
                .to_builder()
                .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
                .build(),
        );
        let handles = (0..writers)
            .map(|w| {
                let keys: Vec<String> = (0..keys)
                    .filter(|k| k % writers == w)
                    .map(|k| format!("k{k:03}"))
                    .collect();
                let task =
                    workload
                        .clone()
                        .write(db.clone(), table.to_owned(), keys, min, max, pause);
                tokio::spawn(task)
            })
            .collect();
        (workload, handles)
    }

    async fn write(
        self: std::sync::Arc<Self>,
        db: aws_sdk_dynamodb::Client,
        table: String,
        keys: Vec<String>,
        min: usize,
        max: usize,
        pause: Duration,
    ) {
        use rand::{Rng, SeedableRng};
        use std::sync::atomic::Ordering::SeqCst;
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        // Items that exist: key -> id of their last change.
        let mut items: HashMap<String, u64> = HashMap::new();
        loop {
            let written = self.written();
            if written >= max
                || (written >= min && self.stop.load(SeqCst))
                || self.failure().is_some()
            {
                return;
            }
            let key = keys[rng.random_range(0..keys.len())].clone();
            let id = self.next_id.fetch_add(1, SeqCst) + 1;
            let roll: f64 = rng.random();
            let kind = match items.get(&key) {
                Some(&prev) if roll < 0.07 => ChangeKind::Delete { prev },
                Some(_) if roll < 0.45 => ChangeKind::Update,
                _ => ChangeKind::Put,
            };
            let result = match kind {
                ChangeKind::Put => db
                    .put_item()
                    .table_name(&table)
                    .item("pk", s(&key))
                    .item("w", n(&id.to_string()))
                    .item("op", s("put"))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{:?}", aws_sdk_dynamodb::error::DisplayErrorContext(e))),
                ChangeKind::Update => db
                    .update_item()
                    .table_name(&table)
                    .key("pk", s(&key))
                    .update_expression("SET #w = :w, #op = :op")
                    .expression_attribute_names("#w", "w")
                    .expression_attribute_names("#op", "op")
                    .expression_attribute_values(":w", n(&id.to_string()))
                    .expression_attribute_values(":op", s("update"))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{:?}", aws_sdk_dynamodb::error::DisplayErrorContext(e))),
                ChangeKind::Delete { .. } => db
                    .delete_item()
                    .table_name(&table)
                    .key("pk", s(&key))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{:?}", aws_sdk_dynamodb::error::DisplayErrorContext(e))),
            };
            if let Err(e) = result {
                *self.failure.lock().unwrap() =
                    Some(format!("write {id} ({kind:?} {key}) failed: {e}"));
                return;
            }
            match kind {
                ChangeKind::Delete { .. } => items.remove(&key),
                _ => items.insert(key.clone(), id),
            };
            self.changes.lock().unwrap().push(Change {
                id,
                key,
                kind,
                at: Instant::now(),
            });
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Lets the writers finish (once `min` changes were made).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why the writers stopped early, if they did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// Changes written so far.
    pub fn written(&self) -> usize {
        self.changes.lock().unwrap().len()
    }

    /// The changes written so far, in the order their writes returned.
    pub fn changes(&self) -> Vec<Change> {
        self.changes.lock().unwrap().clone()
    }
}

/// The id of the change an event reports: its `new_image.w`, or for a REMOVE the id of the
/// delete that followed the change in its `old_image`. `deletes` maps that previous id to
/// the delete's id.
pub fn change_id(event: &Value, deletes: &HashMap<u64, u64>) -> Option<u64> {
    match event["event_name"].as_str()? {
        "REMOVE" => deletes.get(&event["old_image"]["w"].as_u64()?).copied(),
        _ => event["new_image"]["w"].as_u64(),
    }
}

/// For [`change_id`]: previous change id -> id of the delete that followed it.
pub fn deletes_of(changes: &[Change]) -> HashMap<u64, u64> {
    changes
        .iter()
        .filter_map(|c| match c.kind {
            ChangeKind::Delete { prev } => Some((prev, c.id)),
            _ => None,
        })
        .collect()
}

/// Ids of the changes among `records` (in any order).
pub fn delivered_ids(records: &[Consumed], changes: &[Change]) -> std::collections::HashSet<u64> {
    let deletes = deletes_of(changes);
    records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .filter_map(|v| change_id(v, &deletes))
        .collect()
}

/// How a [`Workload`]'s changes arrived in a topic.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Changes written.
    pub written: usize,
    /// Change events in the topic (tombstones not counted).
    pub events: usize,
    /// Tombstones in the topic.
    pub tombstones: usize,
    /// Distinct changes delivered.
    pub delivered: usize,
    /// Events beyond the first copy of their sequence number.
    pub duplicates: usize,
    /// Written changes with no event.
    pub lost: Vec<u64>,
    /// Unknown events, events that do not match their change, per-key order violations,
    /// copies with different sequence numbers.
    pub problems: Vec<String>,
}

impl Delivery {
    /// Asserts that every change arrived and nothing broke order or identity.
    pub fn assert_complete(&self) {
        assert!(
            self.lost.is_empty(),
            "{} changes lost: {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(50)]
        );
        assert!(
            self.problems.is_empty(),
            "{} problems, e.g.:\n{}",
            self.problems.len(),
            self.problems[..self.problems.len().min(30)].join("\n")
        );
        assert_eq!(self.delivered, self.written);
    }
}

/// Checks `records` (each partition in offset order) against the changes written: every
/// change has an event of the right kind and key; every copy of a change carries the same
/// sequence number; for each key, the changes in the order of their first delivery are
/// in the order they were written.
pub fn check_delivery(records: &[Consumed], changes: &[Change]) -> Delivery {
    let deletes = deletes_of(changes);
    let by_id: HashMap<u64, &Change> = changes.iter().map(|c| (c.id, c)).collect();
    let mut d = Delivery {
        written: changes.len(),
        ..Delivery::default()
    };
    let mut seq_of: HashMap<u64, String> = HashMap::new();
    let mut id_of_seq: HashMap<String, u64> = HashMap::new();
    let mut last_first: HashMap<String, u64> = HashMap::new();
    for r in records {
        let Some(v) = &r.value else {
            d.tombstones += 1;
            continue;
        };
        d.events += 1;
        let seq = v["sequence_number"].as_str().unwrap_or_default().to_owned();
        let Some(id) = change_id(v, &deletes) else {
            d.problems.push(format!(
                "event of no known change (p{} @{}): {v}",
                r.partition, r.offset
            ));
            continue;
        };
        let Some(change) = by_id.get(&id) else {
            d.problems
                .push(format!("event of change {id}, which was not written: {v}"));
            continue;
        };
        let expected_key = json!({ "pk": change.key }).to_string();
        if r.key.as_deref() != Some(expected_key.as_str()) {
            d.problems.push(format!(
                "change {id}: key {:?}, expected {expected_key}",
                r.key
            ));
        }
        let name = v["event_name"].as_str().unwrap_or_default();
        let kind_ok = match change.kind {
            ChangeKind::Put => name == "INSERT" || name == "MODIFY",
            ChangeKind::Update => name == "MODIFY",
            ChangeKind::Delete { .. } => name == "REMOVE",
        };
        if !kind_ok {
            d.problems
                .push(format!("change {id} ({:?}) arrived as {name}", change.kind));
        }
        match seq_of.get(&id) {
            Some(first) => {
                d.duplicates += 1;
                if *first != seq {
                    d.problems.push(format!(
                        "change {id} arrived with sequence numbers {first} and {seq}"
                    ));
                }
            }
            None => {
                if let Some(other) = id_of_seq.insert(seq.clone(), id) {
                    d.problems.push(format!(
                        "sequence number {seq} carries changes {other} and {id}"
                    ));
                }
                seq_of.insert(id, seq);
                // First delivery: must come after the key's previous first delivery.
                if let Some(prev) = last_first.insert(change.key.clone(), id) {
                    if prev > id {
                        d.problems.push(format!(
                            "key {}: change {id} first arrived after change {prev} (p{} @{})",
                            change.key, r.partition, r.offset
                        ));
                    }
                }
            }
        }
    }
    d.delivered = seq_of.len();
    d.lost = changes
        .iter()
        .map(|c| c.id)
        .filter(|id| !seq_of.contains_key(id))
        .collect();
    d.lost.sort_unstable();
    d
}

/// `fut`, or a panic naming `what` when it takes longer than `limit` (a Kafka client waits
/// forever for a broker that went away).
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        panic!("{what}: no answer within {limit:?}; is the local stack up? (./localstack/up.sh)")
    })
}

/// Waits (at most `timeout`) until the daemon logged `message`; returns those log events.
pub async fn wait_for_log(daemon: &Daemon, message: &str, timeout: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let events = daemon.log_events(message);
        if !events.is_empty() {
            return events;
        }
        assert!(
            start.elapsed() < timeout,
            "no {message:?} in the log after {timeout:?}:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `tail` until the first `upto` changes of `workload` (in the order their writes
/// returned) are in it; returns how long that took. Panics when the daemon exits, a writer
/// failed, or `timeout` passes.
pub async fn wait_delivered(
    tail: &mut Tail,
    workload: &Workload,
    upto: usize,
    daemon: &mut Daemon,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    let mut last_full_read = Instant::now();
    loop {
        within(timeout, "reading Kafka", tail.poll()).await;
        if let Some(failure) = workload.failure() {
            panic!("{failure}");
        }
        let changes = workload.changes();
        let got = delivered_ids(&tail.records, &changes);
        let missing: Vec<u64> = changes[..upto]
            .iter()
            .map(|c| c.id)
            .filter(|id| !got.contains(id))
            .collect();
        if missing.is_empty() {
            return start.elapsed();
        }
        if let Some(status) = daemon.try_status() {
            panic!("daemon exited ({status:?}):\n{}", daemon.log_text());
        }
        // Read up to the high watermarks and still missing some (tansu can skip a batch
        // when a fetch starts inside it), or out of time: a full read from offset 0 tells
        // whether Kafka holds them. When it does, it replaces what the tail read; after the
        // timeout, what it lacks is reported.
        let timed_out = start.elapsed() > timeout;
        if timed_out || (tail.caught_up() && last_full_read.elapsed() > Duration::from_secs(2)) {
            last_full_read = Instant::now();
            let all = within(
                timeout,
                "reading Kafka",
                consume_from(&tail.bootstrap, &tail.topic, 0, Duration::ZERO),
            )
            .await;
            let got = delivered_ids(&all, &changes);
            let really: Vec<&u64> = missing.iter().filter(|id| !got.contains(id)).collect();
            if really.is_empty() {
                report(&format!(
                    "{}: the tail missed {} change(s) a full read holds (a fetch that skipped a batch); taking the full read",
                    tail.topic,
                    missing.len()
                ));
                tail.seed(all);
                continue;
            }
            if timed_out {
                panic!(
                    "{} of the first {upto} changes not in Kafka after {timeout:?} ({} per a \
                     full read): {:?}…",
                    missing.len(),
                    really.len(),
                    &really[..really.len().min(20)]
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints a report line to the real stdout, so it shows even when the test harness captures
/// the output of a passing test.
pub fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `dynamodb-cdc check` on `config` (written into `dir`) with the AWS keys `key` and
/// `secret`; (exit code, stdout and stderr).
pub fn run_check_as(dir: &Path, config: &Value, key: &str, secret: &str) -> (i32, String) {
    let path = dir.join(format!("check-{}.json", rand::random::<u32>()));
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
        .args(["check", "--config"])
        .arg(&path)
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every file under `dir` (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Runs `dynamodb-cdc integration ARGS --format json --config CONFIG` (written into `dir`)
/// with the AWS credentials (key, secret, session token); (exit code, parsed stdout or
/// Null, stderr).
pub fn run_integration(
    dir: &Path,
    config: &Value,
    args: &[&str],
    credentials: (&str, &str, Option<&str>),
) -> (i32, Value, String) {
    let path = dir.join(format!("integration-{}.json", rand::random::<u32>()));
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"));
    cmd.arg("integration")
        .args(args)
        .args(["--format", "json", "--config"])
        .arg(&path)
        .env("AWS_ACCESS_KEY_ID", credentials.0)
        .env("AWS_SECRET_ACCESS_KEY", credentials.1)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    if let Some(token) = credentials.2 {
        cmd.env("AWS_SESSION_TOKEN", token);
    }
    let out = cmd.output().expect("run dynamodb-cdc integration");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
