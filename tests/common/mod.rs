//! Helpers for integration tests against the local stack (moto on 127.0.0.1:4566, a Kafka
//! broker on 127.0.0.1:9092 or `KAFKA_BOOTSTRAP`). Every test uses its own table and topic
//! names so tests can share one stack.
#![allow(dead_code)]

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

/// True when the stack is up. When it is not: panics under CI (`CI` set), else prints why
/// and returns false so the test can return early.
pub fn stack_available() -> bool {
    let aws = aws_endpoint();
    let kafka = kafka_bootstrap();
    let missing: Vec<&str> = [(aws.as_str(), "AWS endpoint"), (kafka.as_str(), "Kafka")]
        .into_iter()
        .filter(|(addr, _)| !reachable(addr))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "local stack not reachable ({}); start it with ./localstack/up.sh",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
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
        )
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(view)
                .build()
                .unwrap(),
        );
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
            "dynamodb:GetRecords", "dynamodb:ListStreams"
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
                    .fetch_records(offset, 1..10_000_000, 1_000)
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
