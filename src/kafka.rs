//! Kafka: the rskafka client, topics, the keyed partitioner and one producer task per
//! partition.
//!
//! ```text
//! shard readers ──(records of one page, split by partition)──▶ partition task (bounded mpsc)
//!                                                                 │ batches consecutive groups,
//!                                                                 │ one produce request in flight,
//!                                                                 │ retries with backoff
//!      checkpointer ◀────────────── ack (oneshot) per group ──────┘
//! ```
//!
//! One request in flight per partition keeps the records of a key in the order they were
//! handed over, even across retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{
    Compression as KafkaCompression, PartitionClient, UnknownTopicHandling,
};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Compression, KafkaConfig};
use crate::error::Error;
use crate::retry::Backoff;

/// Records waiting in a partition queue (groups, each a slice of one page).
const PARTITION_QUEUE_GROUPS: usize = 64;

/// Kafka's default partitioner for keyed records: `murmur2(key) & 0x7fffffff % n`, so Java,
/// librdkafka (`murmur2_random`) and this daemon agree on where a key lives.
pub fn partition_for(key: &[u8], partitions: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions) as i32
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Whether a Kafka error may go away by retrying (broker down, leader moving, timeouts) or
/// needs a person (record too large, not authorized).
pub fn is_retryable(err: &KafkaError) -> bool {
    match err {
        KafkaError::ServerError { protocol_error, .. } => !matches!(
            protocol_error,
            ProtocolError::MessageTooLarge
                | ProtocolError::RecordListTooLarge
                | ProtocolError::InvalidRecord
                | ProtocolError::CorruptMessage
                | ProtocolError::InvalidTopicException
                | ProtocolError::TopicAuthorizationFailed
                | ProtocolError::ClusterAuthorizationFailed
                | ProtocolError::UnsupportedForMessageFormat
                | ProtocolError::UnsupportedCompressionType
                | ProtocolError::InvalidRequiredAcks
                | ProtocolError::PolicyViolation
        ),
        _ => true,
    }
}

/// Records a partition task could not get acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("kafka topic {topic} partition {partition}: {message}")]
pub struct ProduceError {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// What happened.
    pub message: String,
}

impl From<ProduceError> for Error {
    fn from(e: ProduceError) -> Self {
        Error::Kafka {
            topic: e.topic,
            partition: e.partition,
            message: e.message,
        }
    }
}

/// The result a partition task hands back for a group of records.
pub type Ack = Result<(), ProduceError>;

/// Records for one partition, acknowledged together.
#[derive(Debug)]
pub struct Group {
    /// The records, in stream order.
    pub records: Vec<Record>,
    /// Fired once Kafka acknowledged every record (or failed for good).
    pub ack: oneshot::Sender<Ack>,
}

/// Connection to the cluster.
#[derive(Debug, Clone)]
pub struct Kafka {
    client: Arc<Client>,
    config: KafkaConfig,
    /// Fires when the shutdown deadline passed: produce retries stop.
    hard_cancel: CancellationToken,
}

/// Producing to one topic: a queue per partition.
#[derive(Debug, Clone)]
pub struct TopicProducer {
    /// The topic.
    pub topic: String,
    partitions: Vec<mpsc::Sender<Group>>,
}

impl TopicProducer {
    /// Number of partitions of the topic.
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Queues records for `partition`; waits while the queue is full. The returned receiver
    /// yields once Kafka acknowledged them.
    pub async fn send(&self, partition: i32, records: Vec<Record>) -> oneshot::Receiver<Ack> {
        let (ack, rx) = oneshot::channel();
        let queue = &self.partitions[partition as usize];
        if let Err(mpsc::error::SendError(group)) = queue.send(Group { records, ack }).await {
            let _ = group.ack.send(Err(ProduceError {
                topic: self.topic.clone(),
                partition,
                message: "producer stopped".into(),
            }));
        }
        rx
    }
}

fn to_rskafka(c: Compression) -> KafkaCompression {
    match c {
        Compression::None => KafkaCompression::NoCompression,
        Compression::Gzip => KafkaCompression::Gzip,
        Compression::Lz4 => KafkaCompression::Lz4,
        Compression::Snappy => KafkaCompression::Snappy,
        Compression::Zstd => KafkaCompression::Zstd,
    }
}

fn record_bytes(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Vec::len)
        + r.value.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 32
}

impl Kafka {
    /// Connects to the bootstrap brokers, retrying (a log line per attempt) until it works or
    /// `cancel` fires.
    pub async fn connect(
        config: &KafkaConfig,
        cancel: &CancellationToken,
        hard_cancel: CancellationToken,
    ) -> Result<Self, Error> {
        let mut backoff = Backoff::transient();
        loop {
            match Self::connect_once(config).await {
                Ok(client) => {
                    return Ok(Self {
                        client: Arc::new(client),
                        config: config.clone(),
                        hard_cancel,
                    })
                }
                Err(e) => {
                    let delay = backoff.next_delay().unwrap_or(Duration::from_secs(10));
                    warn!(
                        bootstrap_servers = ?config.bootstrap_servers,
                        attempt = backoff.attempts(),
                        retry_in_ms = delay.as_millis() as u64,
                        error = %e,
                        "cannot reach Kafka; retrying"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(e),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection attempt, bounded by the produce timeout.
    pub async fn connect_once(config: &KafkaConfig) -> Result<Client, Error> {
        let fail = |message: String| Error::Kafka {
            topic: String::new(),
            partition: -1,
            message,
        };
        let timeout = Duration::from_millis(config.produce_timeout_ms);
        let build = ClientBuilder::new(config.bootstrap_servers.clone())
            .client_id("dynamodb-cdc")
            .backoff_config(backoff_config(timeout))
            .build();
        match tokio::time::timeout(timeout, build).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(fail(format!("connect: {e}"))),
            Err(_) => Err(fail(format!(
                "connect: no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// The partition count of `topic`, creating it when missing and `kafka.create_topics` is
    /// set. Retries what may pass (a log line per attempt) until `cancel` fires.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        cancel: &CancellationToken,
    ) -> Result<u32, Error> {
        let fail = |message: String| Error::Kafka {
            topic: topic.to_owned(),
            partition: -1,
            message,
        };
        let mut backoff = Backoff::transient();
        let mut created = false;
        loop {
            let attempt: Result<Option<u32>, KafkaError> = async {
                let topics = self.client.list_topics().await?;
                if let Some(t) = topics.iter().find(|t| t.name == topic) {
                    if !t.partitions.is_empty() {
                        return Ok(Some(t.partitions.len() as u32));
                    }
                }
                Ok(None)
            }
            .await;
            match attempt {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => match self.config.create_topics {
                    None => {
                        return Err(fail(
                            "topic does not exist; create it, or set kafka.create_topics to let the daemon create it"
                                .into(),
                        ))
                    }
                    Some(ct) if !created => {
                        let res = self
                            .client
                            .controller_client()
                            .map_err(|e| fail(e.to_string()))?
                            .create_topic(
                                topic,
                                ct.partitions.get() as i32,
                                ct.replication_factor.get() as i16,
                                10_000,
                            )
                            .await;
                        match res {
                            Ok(()) => {
                                info!(topic, partitions = ct.partitions.get(), "created topic");
                                created = true;
                                continue;
                            }
                            Err(KafkaError::ServerError {
                                protocol_error: ProtocolError::TopicAlreadyExists,
                                ..
                            }) => {
                                created = true;
                                continue;
                            }
                            Err(e) if !is_retryable(&e) => return Err(fail(format!("create topic: {e}"))),
                            Err(e) => warn!(topic, error = %e, "create topic failed; retrying"),
                        }
                    }
                    // Created, metadata not visible yet.
                    Some(_) => {}
                },
                Err(e) if !is_retryable(&e) => return Err(fail(e.to_string())),
                Err(e) => warn!(topic, error = %e, "listing topics failed; retrying"),
            }
            let delay = backoff.next_delay().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = cancel.cancelled() => return Err(fail("cancelled".into())),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Starts one producer task per partition of `topic`.
    pub fn topic_producer(&self, topic: &str, partitions: u32) -> TopicProducer {
        let senders = (0..partitions as i32)
            .map(|partition| {
                let (tx, rx) = mpsc::channel(PARTITION_QUEUE_GROUPS);
                let task = PartitionTask {
                    kafka: self.clone(),
                    topic: topic.to_owned(),
                    partition,
                    client: None,
                };
                tokio::spawn(task.run(rx));
                tx
            })
            .collect();
        TopicProducer {
            topic: topic.to_owned(),
            partitions: senders,
        }
    }

    /// A client for reading a partition (tests, `check`).
    pub async fn partition_client(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionClient, KafkaError> {
        self.client
            .partition_client(topic, partition, UnknownTopicHandling::Retry)
            .await
    }
}

/// rskafka's own retries give up after `deadline`, so that our loop sees the error and logs it.
fn backoff_config(deadline: Duration) -> BackoffConfig {
    BackoffConfig {
        init_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        base: 2.0,
        deadline: Some(deadline),
    }
}

struct PartitionTask {
    kafka: Kafka,
    topic: String,
    partition: i32,
    client: Option<PartitionClient>,
}

impl PartitionTask {
    /// Runs until every sender is gone.
    async fn run(mut self, mut rx: mpsc::Receiver<Group>) {
        let max_records = self.kafka.config.batch_max_records.get();
        let max_bytes = self.kafka.config.batch_max_bytes.get();
        let mut carry: Option<Group> = None;
        loop {
            let first = match carry.take() {
                Some(g) => g,
                None => match rx.recv().await {
                    Some(g) => g,
                    None => return,
                },
            };
            let mut records = first.records;
            let mut bytes: usize = records.iter().map(record_bytes).sum();
            let mut acks = vec![first.ack];
            while records.len() < max_records && bytes < max_bytes {
                match rx.try_recv() {
                    Ok(g) => {
                        let b: usize = g.records.iter().map(record_bytes).sum();
                        if records.len() + g.records.len() > max_records || bytes + b > max_bytes {
                            carry = Some(g);
                            break;
                        }
                        bytes += b;
                        records.extend(g.records);
                        acks.push(g.ack);
                    }
                    Err(_) => break,
                }
            }
            let result = self.produce(records, bytes).await;
            for ack in acks {
                let _ = ack.send(result.clone());
            }
        }
    }

    /// Produces one batch, retrying what may pass until it is acknowledged or the shutdown
    /// deadline passed.
    async fn produce(&mut self, records: Vec<Record>, bytes: usize) -> Ack {
        let fail = |message: String| ProduceError {
            topic: self.topic.clone(),
            partition: self.partition,
            message,
        };
        let timeout = Duration::from_millis(self.kafka.config.produce_timeout_ms);
        let compression = to_rskafka(self.kafka.config.compression);
        let mut backoff = Backoff::transient();
        loop {
            let attempt = async {
                if self.client.is_none() {
                    self.client = Some(
                        self.kafka
                            .client
                            .partition_client(
                                self.topic.clone(),
                                self.partition,
                                UnknownTopicHandling::Retry,
                            )
                            .await?,
                    );
                }
                let client = self.client.as_ref().expect("set above");
                client.produce(records.clone(), compression).await
            };
            let error = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(offsets)) => {
                    debug!(
                        topic = %self.topic,
                        partition = self.partition,
                        records = records.len(),
                        bytes,
                        first_offset = offsets.first().copied().unwrap_or(-1),
                        "produced"
                    );
                    return Ok(());
                }
                Ok(Err(e)) if !is_retryable(&e) => {
                    return Err(fail(format!(
                        "produce of {} records ({bytes} bytes) refused: {e}",
                        records.len()
                    )))
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no acknowledgement within {} ms", timeout.as_millis()),
            };
            let delay = backoff.next_delay().unwrap_or(Duration::from_secs(10));
            warn!(
                topic = %self.topic,
                partition = self.partition,
                attempt = backoff.attempts(),
                records = records.len(),
                retry_in_ms = delay.as_millis() as u64,
                error = %error,
                "produce failed; retrying"
            );
            tokio::select! {
                _ = self.kafka.hard_cancel.cancelled() => {
                    return Err(fail(format!("shutdown deadline passed while retrying: {error}")))
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Groups records by partition, keeping their order within each partition.
pub fn split_by_partition(records: Vec<Record>, partitions: u32) -> HashMap<i32, Vec<Record>> {
    let mut out: HashMap<i32, Vec<Record>> = HashMap::new();
    for r in records {
        let p = partition_for(r.key.as_deref().unwrap_or_default(), partitions);
        out.entry(p).or_default().push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "{:?}",
                std::str::from_utf8(input)
            );
        }
    }

    #[test]
    fn partition_is_positive_and_stable() {
        // Kafka: toPositive(murmur2("foobar")) % 3 == (-790332482 & 0x7fffffff) % 3.
        let expected = ((-790_332_482i32 as u32 & 0x7fff_ffff) % 3) as i32;
        assert_eq!(partition_for(b"foobar", 3), expected);
        for n in 1..20 {
            let p = partition_for(br#"{"pk":"k1"}"#, n);
            assert!((0..n as i32).contains(&p));
        }
    }

    #[test]
    fn split_keeps_order_within_a_partition() {
        let rec = |k: &str, v: u8| Record {
            key: Some(k.as_bytes().to_vec()),
            value: Some(vec![v]),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        };
        let records: Vec<_> = (0..50u8).map(|i| rec(&format!("k{}", i % 7), i)).collect();
        let groups = split_by_partition(records, 4);
        for (p, rs) in &groups {
            let values: Vec<u8> = rs.iter().map(|r| r.value.as_ref().unwrap()[0]).collect();
            let mut sorted = values.clone();
            sorted.sort();
            assert_eq!(values, sorted, "partition {p} out of order");
            for r in rs {
                assert_eq!(partition_for(r.key.as_deref().unwrap(), 4), *p);
            }
        }
        assert_eq!(groups.values().map(Vec::len).sum::<usize>(), 50);
    }
}
