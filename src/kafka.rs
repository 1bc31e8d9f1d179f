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
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
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
    /// Shared by every topic and shard.
    budget: Budget,
}

/// Producing to one topic: a queue per partition.
#[derive(Debug, Clone)]
pub struct TopicProducer {
    /// The topic.
    pub topic: String,
    partitions: Vec<mpsc::Sender<Group>>,
    budget: Budget,
}

/// Approximate memory a record takes while it waits for Kafka: its bytes and the
/// allocations around them (the headers map, the key and value buffers).
pub fn buffered_bytes(r: &Record) -> usize {
    record_bytes(r) + 512
}

/// The memory budget of converted records between GetRecords and Kafka's acknowledgement,
/// shared by every shard of every table (`kafka.max_buffered_bytes`), like the Java
/// producer's `buffer.memory`. Shards reserve before they read; a shard waits while the
/// budget is spent, so memory stays bounded however many shards have a backlog.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    /// The budget in KiB (one permit each).
    kib: u32,
}

/// Part of the [`Budget`], held until dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    budget: Budget,
}

impl Budget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).clamp(1, u32::MAX as usize / 2) as u32;
        Self {
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    fn kib_of(&self, bytes: usize) -> u32 {
        (bytes.div_ceil(1024).min(self.kib as usize)) as u32
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds them.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let kib = self.kib_of(bytes);
        let permit = if kib == 0 {
            None
        } else {
            Some(
                self.permits
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .expect("the budget is never closed"),
            )
        };
        Reservation {
            permit,
            budget: self.clone(),
        }
    }

    /// KiB not reserved right now.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

impl Reservation {
    /// Holds `bytes` from now on: frees what is no longer needed, and takes more only if it
    /// is free right now. It never waits: a shard already holding part of the budget must
    /// not wait for more (all shards could wait on each other), so a page larger than its
    /// reservation may go over the budget by the difference.
    pub fn resize(&mut self, bytes: usize) {
        let want = self.budget.kib_of(bytes) as usize;
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        if want < held {
            let permit = self.permit.as_mut().expect("held > 0");
            drop(permit.split(held - want));
            if want == 0 {
                self.permit = None;
            }
        } else if want > held {
            let more = self
                .budget
                .permits
                .clone()
                .try_acquire_many_owned((want - held) as u32);
            if let Ok(more) = more {
                match &mut self.permit {
                    Some(p) => p.merge(more),
                    None => self.permit = Some(more),
                }
            }
        }
    }

    /// Bytes held (rounded to KiB).
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits() * 1024)
    }
}

impl TopicProducer {
    /// The memory budget shared by every topic.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

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

/// Bytes of a record as counted for `kafka.batch_max_bytes`: key, value, headers, and 32 for
/// the record's framing.
pub fn record_bytes(r: &Record) -> usize {
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
                        budget: Budget::new(config.max_buffered_bytes.get()),
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
            budget: self.budget.clone(),
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
            let mut count = first.records.len();
            let mut bytes: usize = first.records.iter().map(record_bytes).sum();
            let mut groups = vec![first.records];
            let mut acks = vec![first.ack];
            while count < max_records && bytes < max_bytes {
                match rx.try_recv() {
                    Ok(g) => {
                        let b: usize = g.records.iter().map(record_bytes).sum();
                        if count + g.records.len() > max_records || bytes + b > max_bytes {
                            carry = Some(g);
                            break;
                        }
                        bytes += b;
                        count += g.records.len();
                        groups.push(g.records);
                        acks.push(g.ack);
                    }
                    Err(_) => break,
                }
            }
            // One allocation of the final size instead of growing the first group.
            let records = if groups.len() == 1 {
                groups.pop().expect("one group")
            } else {
                let mut all = Vec::with_capacity(count);
                for g in groups {
                    all.extend(g);
                }
                all
            };
            let result = self.produce(records, bytes).await;
            for ack in acks {
                let _ = ack.send(result.clone());
            }
        }
    }

    /// Produces one batch, retrying what may pass until it is acknowledged or the shutdown
    /// deadline passed.
    ///
    /// An attempt consumes its records; a compact copy ([`Backup`], one buffer) rebuilds
    /// them for the next attempt. Cloning the records for every attempt instead cost about a
    /// fifth of the daemon's CPU (several allocations per record, mostly the headers).
    async fn produce(&mut self, records: Vec<Record>, bytes: usize) -> Ack {
        let fail = |message: String| ProduceError {
            topic: self.topic.clone(),
            partition: self.partition,
            message,
        };
        let timeout = Duration::from_millis(self.kafka.config.produce_timeout_ms);
        let compression = to_rskafka(self.kafka.config.compression);
        let mut backoff = Backoff::transient();
        let count = records.len();
        let backup = Backup::of(&records);
        let mut next = Some(records);
        loop {
            let records = next.take().unwrap_or_else(|| backup.restore());
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
                client.produce(records, compression).await
            };
            let error = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(offsets)) => {
                    debug!(
                        topic = %self.topic,
                        partition = self.partition,
                        records = count,
                        bytes,
                        first_offset = offsets.first().copied().unwrap_or(-1),
                        "produced"
                    );
                    return Ok(());
                }
                Ok(Err(e)) if !is_retryable(&e) => {
                    return Err(fail(format!(
                        "produce of {count} records ({bytes} bytes) refused: {e}"
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
                records = count,
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

/// A batch as one buffer, to produce it again after a failed attempt: per record the
/// timestamp, key, value and headers, each length-prefixed. Restoring gives records equal to
/// the originals.
struct Backup {
    buf: Vec<u8>,
    count: usize,
}

impl Backup {
    fn of(records: &[Record]) -> Self {
        let size: usize = records.iter().map(record_bytes).sum();
        let mut buf = Vec::with_capacity(size + records.len() * 24);
        let put_bytes = |buf: &mut Vec<u8>, b: Option<&[u8]>| match b {
            None => buf.extend_from_slice(&u64::MAX.to_le_bytes()),
            Some(b) => {
                buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
                buf.extend_from_slice(b);
            }
        };
        for r in records {
            buf.extend_from_slice(&r.timestamp.timestamp().to_le_bytes());
            buf.extend_from_slice(&u64::from(r.timestamp.timestamp_subsec_nanos()).to_le_bytes());
            put_bytes(&mut buf, r.key.as_deref());
            put_bytes(&mut buf, r.value.as_deref());
            buf.extend_from_slice(&(r.headers.len() as u64).to_le_bytes());
            for (k, v) in &r.headers {
                put_bytes(&mut buf, Some(k.as_bytes()));
                put_bytes(&mut buf, Some(v));
            }
        }
        Self {
            buf,
            count: records.len(),
        }
    }

    fn restore(&self) -> Vec<Record> {
        let mut at = 0;
        let u64_at = |at: &mut usize| {
            let v = u64::from_le_bytes(self.buf[*at..*at + 8].try_into().expect("8 bytes"));
            *at += 8;
            v
        };
        let mut out = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            let secs = u64_at(&mut at) as i64;
            let nanos = u64_at(&mut at) as u32;
            let bytes = |at: &mut usize| -> Option<Vec<u8>> {
                let len = u64_at(at);
                (len != u64::MAX).then(|| {
                    let b = self.buf[*at..*at + len as usize].to_vec();
                    *at += len as usize;
                    b
                })
            };
            let key = bytes(&mut at);
            let value = bytes(&mut at);
            let headers = (0..u64_at(&mut at))
                .map(|_| {
                    let k = bytes(&mut at).unwrap_or_default();
                    let v = bytes(&mut at).unwrap_or_default();
                    (String::from_utf8(k).expect("was a String"), v)
                })
                .collect();
            let timestamp =
                chrono::DateTime::from_timestamp(secs, nanos).expect("was a valid timestamp");
            out.push(Record {
                key,
                value,
                headers,
                timestamp,
            });
        }
        out
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

    #[tokio::test]
    async fn the_budget_bounds_reservations_and_never_waits_to_grow() {
        let budget = Budget::new(10 * 1024);
        let mut a = budget.reserve(4 * 1024).await;
        assert_eq!((a.bytes(), budget.available_kib()), (4096, 6));
        // More than the budget is capped at the budget (it would never be granted).
        let b = budget.reserve(1 << 30);
        let b = tokio::time::timeout(Duration::from_millis(50), b).await;
        assert!(b.is_err(), "waits while the budget is spent");
        // Growing takes only what is free.
        a.resize(20 * 1024);
        assert_eq!((a.bytes(), budget.available_kib()), (10 * 1024, 0));
        a.resize(1024);
        assert_eq!((a.bytes(), budget.available_kib()), (1024, 9));
        a.resize(0);
        assert_eq!((a.bytes(), budget.available_kib()), (0, 10));
        a.resize(3000);
        assert_eq!((a.bytes(), budget.available_kib()), (3072, 7));
        drop(a);
        assert_eq!(budget.available_kib(), 10);
        let whole = budget.reserve(1 << 30).await;
        assert_eq!(whole.bytes(), 10 * 1024);
        assert_eq!(budget.reserve(0).await.bytes(), 0, "nothing to wait for");
    }

    #[test]
    fn a_backup_restores_the_records_exactly() {
        let records = vec![
            Record {
                key: Some(br#"{"pk":"k1"}"#.to_vec()),
                value: Some(br#"{"event_name":"INSERT"}"#.to_vec()),
                headers: [
                    ("dynamodb.table".to_owned(), b"orders".to_vec()),
                    ("dynamodb.sequence_number".to_owned(), b"100".to_vec()),
                    ("empty".to_owned(), Vec::new()),
                ]
                .into(),
                timestamp: chrono::DateTime::from_timestamp(1_795_452_116, 123_456_789).unwrap(),
            },
            // A tombstone.
            Record {
                key: Some(br#"{"pk":"k1"}"#.to_vec()),
                value: None,
                headers: Default::default(),
                timestamp: chrono::DateTime::from_timestamp(-5, 0).unwrap(),
            },
            Record {
                key: None,
                value: Some(Vec::new()),
                headers: Default::default(),
                timestamp: chrono::DateTime::<chrono::Utc>::MAX_UTC,
            },
        ];
        let backup = Backup::of(&records);
        assert_eq!(backup.restore(), records);
        assert_eq!(backup.restore(), records, "restores any number of times");
        assert!(Backup::of(&[]).restore().is_empty());
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
