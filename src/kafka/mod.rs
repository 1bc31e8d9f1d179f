//! Kafka: the rskafka client and topics ([`Kafka`]), where a key goes ([`partitioner`]), and
//! producing ([`producer`]: one task per partition, requests within the broker's limits).
//!
//! ```text
//! shard readers ──page──▶ TopicProducer ──(split by partition)──▶ partition task
//!                                                                   │ requests within limits,
//!                                                                   │ one in flight, retries
//!      checkpointer ◀──────────── ack (oneshot) per group ──────────┘
//! ```

pub mod msk_iam;
pub mod partitioner;
pub mod producer;
pub mod security;
pub mod session;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{PartitionClient, UnknownTopicHandling};
use rskafka::record::Record;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use partitioner::{murmur2, partition_for, split_by_partition};
pub use producer::{Ack, Acks, ProduceError, TopicProducer};
pub use session::{
    is_auth_failure, ConnectError, ConnectFailure, FixedCredentials, Sasl, SaslCredentials, Session,
};

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::retry::{retry, Failure, GaveUp, Retrying};
use crate::tasks::Background;
use producer::{to_rskafka, ProduceSettings, RequestLimits, RskafkaSink};

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

/// Connection to the cluster.
#[derive(Debug, Clone)]
pub struct Kafka {
    session: Arc<Session>,
    config: KafkaConfig,
    /// Fires when the shutdown deadline passed: produce retries stop.
    hard_cancel: CancellationToken,
    /// Owns the partition tasks.
    background: Background,
}

/// Payload bytes of a record: key, value, header names and values.
pub fn payload_bytes(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Vec::len)
        + r.value.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// The one measure of a record's size on the wire, used for `kafka.batch_max_bytes`,
/// `kafka.max_message_bytes` and the memory budget: its payload, 8 bytes of framing per
/// header and 32 for the record's own framing (length, attributes, timestamp and offset
/// deltas, key and value lengths: varints of at most 5 or 10 bytes).
pub fn record_bytes(r: &Record) -> usize {
    payload_bytes(r) + 8 * r.headers.len() + 32
}

/// A record batch's own header (base offset, length, epoch, magic, CRC, attributes, offsets,
/// timestamps, producer id and epoch, base sequence, count): 61 bytes, rounded up.
pub const REQUEST_OVERHEAD_BYTES: usize = 64;

/// The size of `r` produced alone, as the broker's `message.max.bytes` counts it.
pub fn message_bytes(r: &Record) -> usize {
    record_bytes(r) + REQUEST_OVERHEAD_BYTES
}

/// How the daemon reaches the brokers: TLS and SASL, built from `kafka.tls` and
/// `kafka.sasl` (the credentials' source and the MSK token callback come from the AWS side).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The TLS client config; `None` = plaintext.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The SASL login; `None` = none.
    pub sasl: Option<Sasl>,
}

impl Kafka {
    /// Connects to the bootstrap brokers, retrying until it works or `cancel` fires: a
    /// refused login or a failed TLS handshake is an ERROR line per attempt (the
    /// credentials are read again each time), anything else a warning.
    pub async fn connect(
        config: &KafkaConfig,
        security: &Security,
        cancel: &CancellationToken,
        hard_cancel: CancellationToken,
        background: &Background,
    ) -> Result<Self, Error> {
        let log = |e: &ConnectError, r: Retrying| match e.kind {
            ConnectFailure::Auth | ConnectFailure::Tls => error!(
                bootstrap_servers = ?config.bootstrap_servers,
                attempt = r.attempt,
                retry_in_ms = r.delay.as_millis() as u64,
                error = %e,
                "cannot log in to Kafka; retrying"
            ),
            ConnectFailure::Other => warn!(
                bootstrap_servers = ?config.bootstrap_servers,
                attempt = r.attempt,
                retry_in_ms = r.delay.as_millis() as u64,
                error = %e,
                "cannot reach Kafka; retrying"
            ),
        };
        let attempt = || async {
            Self::connect_once(config, security)
                .await
                .map_err(Failure::Transient)
        };
        match retry(cancel, attempt, log).await {
            Ok(session) => Ok(Self {
                session: Arc::new(session),
                config: config.clone(),
                hard_cancel,
                background: background.clone(),
            }),
            Err(GaveUp::Fatal(e)) => Err(e.into()),
            Err(GaveUp::Cancelled(_)) => Err(Error::Cancelled),
        }
    }

    /// One connection attempt, bounded by the produce timeout.
    pub async fn connect_once(
        config: &KafkaConfig,
        security: &Security,
    ) -> Result<Session, ConnectError> {
        Session::connect(
            config.bootstrap_servers.clone(),
            security.tls.clone(),
            security.sasl.clone(),
            Duration::from_millis(config.produce_timeout_ms),
        )
        .await
    }

    /// One metadata request (the topic list), within `limit`: Kafka answers.
    pub async fn heartbeat(&self, limit: Duration) -> Result<(), String> {
        let client = self.client().1;
        match tokio::time::timeout(limit, client.list_topics()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no metadata answer within {} ms",
                limit.as_millis()
            )),
        }
    }

    /// The current client; after a refused login, a new one is made (see [`Session`]).
    fn client(&self) -> (u64, Arc<rskafka::client::Client>) {
        self.session.client()
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
        let created = std::sync::atomic::AtomicBool::new(false);
        // One attempt: the topic's partition count; creates it (once) when missing.
        let attempt = || async {
            let (generation, client) = self.client();
            let topics = client.list_topics().await;
            if let Err(e) = &topics {
                if is_auth_failure(e) {
                    let _ = self.session.renew(generation).await;
                }
            }
            let topics = topics.map_err(|e| {
                let retryable = is_retryable(&e);
                let e = fail(format!("list topics: {e}"));
                if retryable {
                    Failure::Transient(e)
                } else {
                    Failure::Fatal(e)
                }
            })?;
            if let Some(t) = topics.iter().find(|t| t.name == topic) {
                if !t.partitions.is_empty() {
                    return Ok(t.partitions.len() as u32);
                }
            }
            let Some(ct) = self.config.create_topics else {
                return Err(Failure::Fatal(fail(
                    "topic does not exist; create it, or set kafka.create_topics to let the daemon create it"
                        .into(),
                )));
            };
            if created.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Failure::Transient(fail(
                    "created; its metadata is not visible yet".into(),
                )));
            }
            let controller = client
                .controller_client()
                .map_err(|e| Failure::Fatal(fail(e.to_string())))?;
            let res = controller
                .create_topic(
                    topic,
                    ct.partitions.get() as i32,
                    ct.replication_factor.get() as i16,
                    10_000,
                )
                .await;
            match res {
                Ok(()) => info!(topic, partitions = ct.partitions.get(), "created topic"),
                Err(KafkaError::ServerError {
                    protocol_error: ProtocolError::TopicAlreadyExists,
                    ..
                }) => {}
                Err(e) => {
                    let retryable = is_retryable(&e);
                    let e = fail(format!("create topic: {e}"));
                    return Err(if retryable {
                        Failure::Transient(e)
                    } else {
                        Failure::Fatal(e)
                    });
                }
            }
            created.store(true, std::sync::atomic::Ordering::Relaxed);
            Err(Failure::Transient(fail(
                "created; waiting for its metadata".into(),
            )))
        };
        let log = |e: &Error, r: Retrying| {
            warn!(topic, attempt = r.attempt, retry_in_ms = r.delay.as_millis() as u64, error = %e, "topic not ready; retrying");
        };
        match retry(cancel, attempt, log).await {
            Ok(n) => Ok(n),
            Err(GaveUp::Fatal(e)) => Err(e),
            Err(GaveUp::Cancelled(_)) => Err(Error::Cancelled),
        }
    }

    /// Starts one producer task per partition of `topic` (owned by the background tasks).
    pub fn topic_producer(&self, topic: &str, partitions: u32) -> TopicProducer {
        let sinks = (0..partitions as i32)
            .map(|partition| RskafkaSink {
                session: self.session.clone(),
                topic: topic.to_owned(),
                partition,
                compression: to_rskafka(self.config.compression),
                partition_client: Default::default(),
                attempt_timeout: Duration::from_millis(self.config.produce_timeout_ms * 3 / 4),
            })
            .collect();
        let settings = ProduceSettings {
            limits: RequestLimits {
                max_records: self.config.batch_max_records.get(),
                max_bytes: self.config.batch_max_bytes.get(),
            },
            timeout: Duration::from_millis(self.config.produce_timeout_ms),
            hard_cancel: self.hard_cancel.clone(),
        };
        TopicProducer::start(topic, sinks, settings, |name, task| {
            self.background.spawn(name, task)
        })
    }

    /// A client for reading a partition (tests, `check`).
    pub async fn partition_client(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionClient, KafkaError> {
        self.client()
            .1
            .partition_client(topic, partition, UnknownTopicHandling::Retry)
            .await
    }
}
