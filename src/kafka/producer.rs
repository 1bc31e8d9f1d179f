//! Producing: one task per partition that turns queued groups into produce requests.
//!
//! ```text
//! reader ──send(page)──▶ TopicProducer: split by partition (murmur2 of the key)
//!                          │ one bounded queue per partition
//!                          ▼
//!                        PartitionTask: fills a request from the queue head, never over
//!                          │ kafka.batch_max_records / kafka.batch_max_bytes (a group too
//!                          │ large for one request is split), one request in flight,
//!                          │ retries with backoff until the shutdown deadline
//!                          ▼
//!                        PartitionSink (rskafka's PartitionClient; a fake in tests)
//!      checkpointer ◀── ack (oneshot) per group, once every record of it was acknowledged
//! ```
//!
//! One request in flight per partition keeps the records of a key in the order they were
//! handed over, even across retries. Once a request fails for good, the partition stops:
//! every group queued behind it, and every later one, is failed without being produced, so
//! Kafka never holds a later page of a shard before an earlier one that is missing.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::partition::{
    Compression as KafkaCompression, PartitionClient, UnknownTopicHandling,
};
use rskafka::record::Record;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::partitioner::{partition_for, split_by_partition};
use super::session::{is_auth_failure, Session};
use super::{is_retryable, record_bytes, REQUEST_OVERHEAD_BYTES};
use crate::config::Compression;
use crate::error::Error;
use crate::retry::{retry, Failure, GaveUp, Retrying};

/// Groups waiting in a partition queue (each a slice of one page).
const PARTITION_QUEUE_GROUPS: usize = 64;

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
struct Group {
    records: Vec<Record>,
    ack: oneshot::Sender<Ack>,
}

/// The limits of one produce request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Most records (`kafka.batch_max_records`).
    pub max_records: usize,
    /// Most bytes, as counted by [`record_bytes`] plus [`REQUEST_OVERHEAD_BYTES`]
    /// (`kafka.batch_max_bytes`). A single record larger than this still goes alone.
    pub max_bytes: usize,
}

/// How a partition task produces.
#[derive(Debug, Clone)]
pub struct ProduceSettings {
    /// Request limits.
    pub limits: RequestLimits,
    /// How long one attempt may take before it is retried.
    pub timeout: Duration,
    /// Fires when the shutdown deadline passed: retries stop.
    pub hard_cancel: CancellationToken,
}

/// A failed produce attempt.
#[derive(Debug, Clone)]
pub enum AttemptError {
    /// May pass: broker down, leader moving, timeout.
    Retryable(String),
    /// Needs a person: record too large, not authorized.
    Fatal(String),
}

/// Where a partition task sends its requests: rskafka's [`PartitionClient`] in the daemon,
/// a fake in tests (to see every request's size, and to fail on demand).
pub trait PartitionSink: Send + Sync + 'static {
    /// Produces `records` as one request.
    fn produce(
        &self,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<(), AttemptError>> + Send + 'static;
}

/// The partition client made for one login generation of the session.
pub(super) type PartitionClientCell = Arc<tokio::sync::Mutex<Option<(u64, Arc<PartitionClient>)>>>;

/// The daemon's sink: a partition client of the session's current client, made on first
/// use and again after the session logged in anew.
pub(super) struct RskafkaSink {
    pub(super) session: Arc<Session>,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) compression: KafkaCompression,
    pub(super) partition_client: PartitionClientCell,
    /// Shorter than the partition task's attempt timeout, so that a stuck client is noticed
    /// here and a new one probed ([`Session::probe`]).
    pub(super) attempt_timeout: Duration,
}

impl PartitionSink for RskafkaSink {
    fn produce(
        &self,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<(), AttemptError>> + Send + 'static {
        let session = self.session.clone();
        let cell = self.partition_client.clone();
        let (topic, partition, compression) =
            (self.topic.clone(), self.partition, self.compression);
        let attempt_timeout = self.attempt_timeout;
        async move {
            let (generation, client) = session.client();
            let result = tokio::time::timeout(attempt_timeout, async {
                let mut slot = cell.lock().await;
                let partition_client = match &*slot {
                    Some((g, pc)) if *g == generation => pc.clone(),
                    _ => {
                        let pc = Arc::new(
                            client
                                .partition_client(topic, partition, UnknownTopicHandling::Retry)
                                .await?,
                        );
                        *slot = Some((generation, pc.clone()));
                        pc
                    }
                };
                drop(slot);
                partition_client.produce(records, compression).await
            })
            .await;
            let Ok(result) = result else {
                session.probe(generation);
                return Err(AttemptError::Retryable(format!(
                    "no acknowledgement within {} ms",
                    attempt_timeout.as_millis()
                )));
            };
            match result {
                Ok(_) => Ok(()),
                // A refused login (a rotated password): log in anew, then retry. Nothing of
                // this request was acknowledged, so nothing is checkpointed meanwhile.
                Err(e) if is_auth_failure(&e) => {
                    let message = e.to_string();
                    if let Err(renew) = session.renew(generation).await {
                        return Err(AttemptError::Retryable(renew.message));
                    }
                    Err(AttemptError::Retryable(message))
                }
                Err(e) if is_retryable(&e) => Err(AttemptError::Retryable(e.to_string())),
                Err(e) => Err(AttemptError::Fatal(e.to_string())),
            }
        }
    }
}

pub(super) fn to_rskafka(c: Compression) -> KafkaCompression {
    match c {
        Compression::None => KafkaCompression::NoCompression,
        Compression::Gzip => KafkaCompression::Gzip,
        Compression::Lz4 => KafkaCompression::Lz4,
        Compression::Snappy => KafkaCompression::Snappy,
        Compression::Zstd => KafkaCompression::Zstd,
    }
}

/// Producing to one topic: a queue per partition.
#[derive(Debug, Clone)]
pub struct TopicProducer {
    /// The topic.
    pub topic: String,
    partitions: Vec<mpsc::Sender<Group>>,
}

/// Acknowledgements of records handed to a [`TopicProducer`]: one per partition they went to.
pub type Acks = Vec<oneshot::Receiver<Ack>>;

impl TopicProducer {
    /// Starts one task per partition; `spawn` names and owns each task (the app supervises
    /// them: a task that dies stops the pipeline).
    pub fn start<S: PartitionSink>(
        topic: &str,
        sinks: Vec<S>,
        settings: ProduceSettings,
        mut spawn: impl FnMut(String, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> Self {
        let partitions = sinks
            .into_iter()
            .enumerate()
            .map(|(partition, sink)| {
                let (tx, rx) = mpsc::channel(PARTITION_QUEUE_GROUPS);
                let task = PartitionTask {
                    sink,
                    topic: topic.to_owned(),
                    partition: partition as i32,
                    settings: settings.clone(),
                };
                spawn(
                    format!("kafka producer {topic}/{partition}"),
                    Box::pin(task.run(rx)),
                );
                tx
            })
            .collect();
        Self {
            topic: topic.to_owned(),
            partitions,
        }
    }

    /// Number of partitions of the topic.
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Queues records, each to the partition of its key, keeping their order within each
    /// partition; waits while a queue is full. Each receiver yields once Kafka acknowledged
    /// that partition's records.
    pub async fn send(&self, records: Vec<Record>) -> Acks {
        let mut acks = Vec::new();
        if self.partitions.len() == 1 {
            if !records.is_empty() {
                acks.push(self.send_to(0, records).await);
            }
            return acks;
        }
        for (partition, group) in split_by_partition(records, self.partition_count()) {
            acks.push(self.send_to(partition, group).await);
        }
        acks
    }

    /// Queues one copy of `record` on every partition (markers every consumer must see).
    pub async fn send_to_every_partition(&self, record: &Record) -> Acks {
        let mut acks = Vec::with_capacity(self.partitions.len());
        for p in 0..self.partitions.len() as i32 {
            acks.push(self.send_to(p, vec![record.clone()]).await);
        }
        acks
    }

    /// The partition of `key`.
    pub fn partition_of(&self, key: &[u8]) -> i32 {
        partition_for(key, self.partition_count())
    }

    async fn send_to(&self, partition: i32, records: Vec<Record>) -> oneshot::Receiver<Ack> {
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

/// A group at the head of a partition queue, partly taken into requests.
struct Queued {
    records: VecDeque<Record>,
    /// Records of this group already in a request that was acknowledged or is in flight.
    taken: usize,
    ack: oneshot::Sender<Ack>,
}

/// One request: its records, their bytes, and the groups it completes.
struct Request {
    records: Vec<Record>,
    bytes: usize,
    completes: Vec<oneshot::Sender<Ack>>,
}

struct PartitionTask<S> {
    sink: S,
    topic: String,
    partition: i32,
    settings: ProduceSettings,
}

impl<S: PartitionSink> PartitionTask<S> {
    /// Runs until every sender is gone.
    async fn run(self, mut rx: mpsc::Receiver<Group>) {
        let mut queue: VecDeque<Queued> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(g) => queue.push_back(queued(g)),
                    None => return,
                }
            }
            let request = next_request(&mut queue, &mut rx, self.settings.limits);
            let result = if request.records.is_empty() {
                Ok(())
            } else {
                self.produce(request.records, request.bytes).await
            };
            match result {
                Ok(()) => {
                    for ack in request.completes {
                        let _ = ack.send(Ok(()));
                    }
                }
                Err(e) => {
                    stop_partition(&self.topic, self.partition, e, request.completes, queue, rx)
                        .await;
                    return;
                }
            }
        }
    }
}

/// After a request failed for good: fails it, every group queued behind it and every group
/// that arrives later, without producing any of them (the shards stop at their last
/// acknowledged record and are read again after a restart, in order).
async fn stop_partition(
    topic: &str,
    partition: i32,
    e: ProduceError,
    completes: Vec<oneshot::Sender<Ack>>,
    queue: VecDeque<Queued>,
    mut rx: mpsc::Receiver<Group>,
) {
    error!(
        topic = %topic,
        partition,
        error = %e.message,
        queued_groups = queue.len(),
        "produce failed for good; nothing more is produced to this partition"
    );
    let behind = ProduceError {
        message: format!("not produced: an earlier request failed ({})", e.message),
        ..e.clone()
    };
    for ack in completes {
        let _ = ack.send(Err(e.clone()));
    }
    for q in queue {
        let _ = q.ack.send(Err(if q.taken > 0 {
            e.clone()
        } else {
            behind.clone()
        }));
    }
    while let Some(g) = rx.recv().await {
        let _ = g.ack.send(Err(behind.clone()));
    }
}

impl<S: PartitionSink> PartitionTask<S> {
    /// Produces one request, retrying what may pass until it is acknowledged or the
    /// shutdown deadline passed.
    ///
    /// An attempt consumes its records; a compact copy ([`Backup`], one buffer) rebuilds
    /// them for the next attempt. Cloning the records for every attempt instead cost about a
    /// fifth of the daemon's CPU (several allocations per record, mostly the headers).
    async fn produce(&self, records: Vec<Record>, bytes: usize) -> Result<(), ProduceError> {
        let fail = |message: String| ProduceError {
            topic: self.topic.clone(),
            partition: self.partition,
            message,
        };
        let timeout = self.settings.timeout;
        let hard_cancel = self.settings.hard_cancel.clone();
        let count = records.len();
        let backup = Backup::of(&records);
        let mut next = Some(records);
        let sink = &self.sink;
        let attempt = || {
            let records = next.take().unwrap_or_else(|| backup.restore());
            let produce = sink.produce(records);
            async move {
                let started = std::time::Instant::now();
                let result = tokio::time::timeout(timeout, produce).await;
                crate::telemetry::get()
                    .produce_request(started.elapsed(), matches!(result, Ok(Ok(()))));
                match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(AttemptError::Fatal(e))) => Err(Failure::Fatal(e)),
                    Ok(Err(AttemptError::Retryable(e))) => Err(Failure::Transient(e)),
                    Err(_) => Err(Failure::Transient(format!(
                        "no acknowledgement within {} ms",
                        timeout.as_millis()
                    ))),
                }
            }
        };
        let (topic, partition) = (&self.topic, self.partition);
        let log = |e: &String, r: Retrying| {
            warn!(
                topic = %topic,
                partition,
                attempt = r.attempt,
                records = count,
                retry_in_ms = r.delay.as_millis() as u64,
                error = %e,
                "produce failed; retrying"
            );
        };
        match retry(&hard_cancel, attempt, log).await {
            Ok(()) => {
                debug!(topic = %self.topic, partition = self.partition, records = count, bytes, "produced");
                Ok(())
            }
            Err(GaveUp::Fatal(e)) => Err(fail(format!(
                "produce of {count} records ({bytes} bytes) refused: {e}"
            ))),
            Err(GaveUp::Cancelled(last)) => Err(fail(format!(
                "shutdown deadline passed while retrying: {}",
                last.unwrap_or_else(|| "not attempted".into())
            ))),
        }
    }
}

fn queued(g: Group) -> Queued {
    Queued {
        records: VecDeque::from(g.records),
        taken: 0,
        ack: g.ack,
    }
}

/// Fills the next request from the head of the queue (and groups waiting in `rx`): at least
/// one record, and never more than `limits` allow beyond that first record. A group that does
/// not fit is split; its ack waits for the request that takes its last record.
fn next_request(
    queue: &mut VecDeque<Queued>,
    rx: &mut mpsc::Receiver<Group>,
    limits: RequestLimits,
) -> Request {
    let mut request = Request {
        records: Vec::new(),
        bytes: REQUEST_OVERHEAD_BYTES,
        completes: Vec::new(),
    };
    loop {
        if queue.is_empty() {
            match rx.try_recv() {
                Ok(g) => queue.push_back(queued(g)),
                Err(_) => return request,
            }
        }
        let head = queue.front_mut().expect("not empty");
        // A whole, untouched group that fits: moved at once, without copying record by record.
        if request.records.is_empty() && head.taken == 0 && head.records.len() <= limits.max_records
        {
            let bytes: usize = head.records.iter().map(record_bytes).sum();
            if request.bytes + bytes <= limits.max_bytes {
                let head = queue.pop_front().expect("not empty");
                request.records = Vec::from(head.records);
                request.bytes += bytes;
                request.completes.push(head.ack);
                continue;
            }
        }
        while let Some(r) = head.records.front() {
            let b = record_bytes(r);
            let full =
                request.records.len() >= limits.max_records || request.bytes + b > limits.max_bytes;
            if full && !request.records.is_empty() {
                return request;
            }
            request
                .records
                .push(head.records.pop_front().expect("front exists"));
            request.bytes += b;
            head.taken += 1;
        }
        let done = queue.pop_front().expect("not empty");
        request.completes.push(done.ack);
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
        // Exactly what is written below: per record 5 words (timestamp, nanos, key and value
        // lengths, header count) and 2 per header (name and value lengths) beside the bytes.
        let size: usize = records
            .iter()
            .map(|r| super::payload_bytes(r) + 40 + 16 * r.headers.len())
            .sum();
        let mut buf = Vec::with_capacity(size);
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every request; fails (for good) the requests whose index is in `fail_at`.
    #[derive(Clone, Default)]
    struct FakeSink {
        requests: Arc<Mutex<Vec<Vec<Record>>>>,
        fail_at: Vec<usize>,
        attempts: Arc<Mutex<usize>>,
    }

    impl PartitionSink for FakeSink {
        fn produce(
            &self,
            records: Vec<Record>,
        ) -> impl Future<Output = Result<(), AttemptError>> + Send + 'static {
            let n = {
                let mut a = self.attempts.lock().unwrap();
                *a += 1;
                *a - 1
            };
            let result = if self.fail_at.contains(&n) {
                Err(AttemptError::Fatal("MESSAGE_TOO_LARGE".into()))
            } else {
                self.requests.lock().unwrap().push(records);
                Ok(())
            };
            std::future::ready(result)
        }
    }

    fn record(key: &str, seq: u32, value_bytes: usize) -> Record {
        let mut value = format!("{seq:08}").into_bytes();
        value.resize(value_bytes.max(8), b'x');
        Record {
            key: Some(key.as_bytes().to_vec()),
            value: Some(value),
            headers: [(
                "dynamodb.sequence_number".to_owned(),
                seq.to_string().into_bytes(),
            )]
            .into(),
            timestamp: chrono::DateTime::from_timestamp(1_795_452_116, 0).unwrap(),
        }
    }

    fn seq_of(r: &Record) -> u32 {
        std::str::from_utf8(&r.value.as_ref().unwrap()[..8])
            .unwrap()
            .parse()
            .unwrap()
    }

    fn producer(sink: &FakeSink, partitions: usize, limits: RequestLimits) -> TopicProducer {
        let settings = ProduceSettings {
            limits,
            timeout: Duration::from_secs(5),
            hard_cancel: CancellationToken::new(),
        };
        TopicProducer::start("t", vec![sink.clone(); partitions], settings, |_, task| {
            tokio::spawn(task);
        })
    }

    async fn all_ok(acks: Acks) -> Vec<Ack> {
        let mut out = Vec::new();
        for a in acks {
            out.push(a.await.expect("acked"));
        }
        out
    }

    /// A backlog page on a one-partition topic: 1000 records of ~1.5 KB is ~1.5 MB, over
    /// Kafka's default `message.max.bytes`. No request may exceed either limit.
    #[tokio::test]
    async fn no_request_exceeds_the_limits_however_large_the_groups() {
        let sink = FakeSink::default();
        let limits = RequestLimits {
            max_records: 300,
            max_bytes: 900 * 1024,
        };
        let p = producer(&sink, 1, limits);
        let mut acks = Vec::new();
        let mut seq = 0;
        for page in 0..3 {
            let n = [1000, 7, 450][page];
            let records: Vec<Record> = (0..n)
                .map(|_| {
                    seq += 1;
                    record("k", seq, 1500)
                })
                .collect();
            acks.extend(p.send(records).await);
        }
        // A single record over the byte limit still goes, alone.
        seq += 1;
        acks.extend(p.send(vec![record("k", seq, 1_000_000)]).await);
        for a in all_ok(acks).await {
            a.unwrap();
        }
        let requests = sink.requests.lock().unwrap().clone();
        let mut seen = Vec::new();
        for r in &requests {
            let bytes: usize = REQUEST_OVERHEAD_BYTES + r.iter().map(record_bytes).sum::<usize>();
            assert!(r.len() <= limits.max_records, "{} records", r.len());
            assert!(
                bytes <= limits.max_bytes || r.len() == 1,
                "{} records, {bytes} bytes",
                r.len()
            );
            seen.extend(r.iter().map(seq_of));
        }
        assert_eq!(
            seen,
            (1..=seq).collect::<Vec<_>>(),
            "every record once, in order"
        );
        assert!(
            requests.len() >= 1457 * 1500 / (900 * 1024),
            "{} requests",
            requests.len()
        );
    }

    /// Once a request fails for good, nothing queued behind it on that partition is produced
    /// (else Kafka would hold page N+1 without page N, then N and N+1 again after a restart).
    #[tokio::test]
    async fn a_failed_request_stops_its_partition() {
        let sink = FakeSink {
            fail_at: vec![1],
            ..Default::default()
        };
        let limits = RequestLimits {
            max_records: 10,
            max_bytes: 1 << 20,
        };
        let p = producer(&sink, 1, limits);
        // Page 1 (two requests: the second fails), then pages 2 and 3 queued behind it.
        let page = |from: u32, n: u32| (from..from + n).map(|s| record("k", s, 10)).collect();
        let first = p.send(page(0, 15)).await;
        let second = p.send(page(15, 5)).await;
        let third = p.send(page(20, 5)).await;
        let results: Vec<Ack> =
            all_ok(first.into_iter().chain(second).chain(third).collect()).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        // Pages 1 and 2 were in the failed request; page 3 waited behind it.
        for (i, r) in results.iter().enumerate() {
            let behind = r
                .as_ref()
                .unwrap_err()
                .message
                .contains("earlier request failed");
            assert_eq!(behind, i == 2, "{i}: {r:?}");
        }
        // A page sent after the failure is not produced either.
        let late = all_ok(p.send(page(25, 3)).await).await;
        assert!(late[0].is_err());
        let produced: Vec<u32> = sink
            .requests
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(seq_of)
            .collect();
        assert_eq!(
            produced,
            (0..10).collect::<Vec<_>>(),
            "only the request before the failure"
        );
        assert_eq!(
            *sink.attempts.lock().unwrap(),
            2,
            "no attempt after the failure"
        );
    }

    /// Another partition of the same topic goes on (its shard order is not at stake).
    #[tokio::test]
    async fn records_reach_the_partition_of_their_key_in_order() {
        let sink = FakeSink::default();
        let limits = RequestLimits {
            max_records: 1000,
            max_bytes: 1 << 20,
        };
        let p = producer(&sink, 4, limits);
        let records: Vec<Record> = (0..200)
            .map(|s| record(&format!("k{}", s % 9), s, 20))
            .collect();
        for a in all_ok(p.send(records).await).await {
            a.unwrap();
        }
        let requests = sink.requests.lock().unwrap().clone();
        let mut by_key: std::collections::BTreeMap<Vec<u8>, Vec<u32>> = Default::default();
        for r in requests.iter().flatten() {
            by_key
                .entry(r.key.clone().unwrap())
                .or_default()
                .push(seq_of(r));
        }
        assert_eq!(by_key.len(), 9);
        for seqs in by_key.values() {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        }
        for r in &requests {
            let p0 = p.partition_of(r[0].key.as_deref().unwrap());
            assert!(r
                .iter()
                .all(|x| p.partition_of(x.key.as_deref().unwrap()) == p0));
        }
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
        assert_eq!(
            backup.buf.len(),
            backup.buf.capacity(),
            "sized exactly: one allocation, never grown"
        );
        assert_eq!(backup.restore(), records);
        assert_eq!(backup.restore(), records, "restores any number of times");
        assert!(Backup::of(&[]).restore().is_empty());
    }
}
