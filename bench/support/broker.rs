//! The benchmark's own Kafka broker (tansu, memory storage, a free port) and what the
//! benchmark does with Kafka: topics, high watermarks, reading a topic back, and the raw
//! producer that measures the limit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamodb_cdc::kafka::{record_bytes, REQUEST_OVERHEAD_BYTES};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use super::procfs;
use anyhow::{anyhow, Result};

/// Where `localstack/up.sh` installs tansu; `DYNAMODB_CDC_TANSU` or `TANSU_BIN` overrides it.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) =
        std::env::var_os("DYNAMODB_CDC_TANSU").or_else(|| std::env::var_os("TANSU_BIN"))
    {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("dynamodb-cdc/tansu-dynostore-libsql/bin/tansu")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A tansu broker of our own; killed on drop.
#[derive(Debug)]
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub bootstrap: String,
}

impl Tansu {
    /// Starts tansu with memory storage on a free port and waits until it answers.
    pub async fn start(log_dir: &Path) -> Result<Self> {
        let bin = tansu_bin();
        if !bin.exists() {
            return Err(anyhow!(
                "tansu not found at {} (run ./localstack/up.sh once to install it, or set TANSU_BIN)",
                bin.display()
            ));
        }
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(log_dir.join(format!("tansu-{port}.log")))?;
        let child = Command::new(&bin)
            .args([
                "broker",
                "--cluster-id",
                "dynamodb-cdc-bench",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut tansu = Self {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = tansu.child.try_wait()? {
                return Err(anyhow!("tansu exited at start-up: {status}"));
            }
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(2), tansu.client_once()).await
            {
                if c.list_topics().await.is_ok() {
                    return Ok(tansu);
                }
            }
            if Instant::now() > deadline {
                return Err(anyhow!("tansu did not answer within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client_once(&self) -> Result<Client, rskafka::client::error::Error> {
        ClientBuilder::new(vec![self.bootstrap.clone()])
            .client_id("dynamodb-cdc-bench")
            .build()
            .await
    }

    /// A new client.
    pub async fn client(&self) -> Result<Client> {
        Ok(self.client_once().await?)
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds the broker used so far.
    pub fn cpu(&self) -> f64 {
        procfs::process_cpu(self.pid()).unwrap_or(0.0)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `topic` with `partitions` partitions and waits until its metadata shows them.
pub async fn create_topic(client: &Client, topic: &str, partitions: u32) -> Result<()> {
    client
        .controller_client()?
        .create_topic(topic, partitions as i32, 1, 10_000)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let topics = client.list_topics().await?;
        if topics
            .iter()
            .any(|t| t.name == topic && t.partitions.len() == partitions as usize)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("topic {topic} not visible after 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients of every partition of some topics.
#[derive(Debug)]
pub struct Partitions {
    clients: Vec<PartitionClient>,
    known: std::sync::Mutex<Vec<i64>>,
}

impl Partitions {
    /// Clients for partitions `0..partitions` of each topic.
    pub async fn open(client: &Client, topics: &[String], partitions: u32) -> Result<Self> {
        let mut clients = Vec::new();
        for t in topics {
            for p in 0..partitions as i32 {
                clients.push(
                    client
                        .partition_client(t.clone(), p, UnknownTopicHandling::Retry)
                        .await?,
                );
            }
        }
        let known = std::sync::Mutex::new(vec![0; clients.len()]);
        Ok(Self { clients, known })
    }

    /// Sum of the high watermarks: records in these partitions (offsets start at 0).
    ///
    /// Taken from fetch responses: tansu 0.6 answers ListOffsets(latest) with the last
    /// batch's base offset + 1, not the end of the log. Each fetch starts at the high
    /// watermark seen last, so it carries at most one batch.
    pub async fn total(&self) -> Result<i64> {
        let mut known = self.known.lock().unwrap().clone();
        for (c, k) in self.clients.iter().zip(known.iter_mut()) {
            let (_, high) = c.fetch_records(*k, 1..2, 0).await?;
            *k = (*k).max(high);
        }
        let sum = known.iter().sum();
        *self.known.lock().unwrap() = known;
        Ok(sum)
    }

    /// Every record, per (topic, partition), in offset order.
    pub async fn read_all(&self) -> Result<Vec<PartitionRecords>> {
        let mut out = Vec::new();
        for c in &self.clients {
            let (_, high) = c.fetch_records(0, 1..2, 0).await?;
            let mut records = Vec::with_capacity(high as usize);
            let mut offset = 0;
            while offset < high {
                let (batch, _) = c.fetch_records(offset, 1..32_000_000, 1_000).await?;
                if batch.is_empty() {
                    return Err(anyhow!(
                        "{}[{}]: empty fetch at offset {offset} below the high watermark {high}",
                        c.topic(),
                        c.partition()
                    ));
                }
                for r in batch {
                    if r.offset >= offset {
                        offset = r.offset + 1;
                        records.push(r.record);
                    }
                }
            }
            out.push(PartitionRecords {
                topic: c.topic().to_owned(),
                partition: c.partition(),
                records,
            });
        }
        Ok(out)
    }
}

/// The records of one partition.
#[derive(Debug, Clone)]
pub struct PartitionRecords {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Records in offset order.
    pub records: Vec<Record>,
}

/// Payload bytes of a record: key, value, header names and values.
pub fn payload_bytes(r: &Record) -> usize {
    dynamodb_cdc::kafka::payload_bytes(r)
}

/// Splits a partition's records into produce requests the way the daemon's partition
/// producer fills them at most: up to `max_records` records and `max_bytes` bytes.
pub fn batches(records: &[Record], max_records: usize, max_bytes: usize) -> Vec<Vec<Record>> {
    let mut out = Vec::new();
    let mut batch: Vec<Record> = Vec::new();
    let mut bytes = REQUEST_OVERHEAD_BYTES;
    for r in records {
        let b = record_bytes(r);
        if !batch.is_empty() && (batch.len() >= max_records || bytes + b > max_bytes) {
            out.push(std::mem::take(&mut batch));
            bytes = REQUEST_OVERHEAD_BYTES;
        }
        bytes += b;
        batch.push(r.clone());
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// What the raw producer measured.
#[derive(Debug, Clone, Copy)]
pub struct RawRun {
    /// Wall time from the first request to the last acknowledgement.
    pub elapsed: Duration,
    /// Records acknowledged.
    pub records: u64,
    /// CPU seconds of this process (the producer) meanwhile.
    pub producer_cpu_s: f64,
    /// CPU seconds of the broker meanwhile.
    pub broker_cpu_s: f64,
}

/// The limit: produces `data` (already split into requests) straight to a fresh broker, one
/// task and one request in flight per partition like the daemon, no reading, no conversion.
pub async fn raw_produce(
    tansu: &Tansu,
    data: &[PartitionRecords],
    partitions: u32,
    max_records: usize,
    max_bytes: usize,
) -> Result<RawRun> {
    let client = tansu.client().await?;
    let mut topics: Vec<String> = data.iter().map(|d| d.topic.clone()).collect();
    topics.dedup();
    for t in &topics {
        create_topic(&client, t, partitions).await?;
    }
    let mut work = Vec::new();
    for d in data {
        let pc = client
            .partition_client(d.topic.clone(), d.partition, UnknownTopicHandling::Retry)
            .await?;
        // Warm the connection so the timing holds produce requests only.
        pc.get_offset(OffsetAt::Latest).await?;
        work.push((pc, batches(&d.records, max_records, max_bytes)));
    }
    let cpu0 = procfs::self_cpu();
    let broker0 = tansu.cpu();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (pc, batches) in work {
        set.spawn(async move {
            let mut n = 0u64;
            for b in batches {
                n += b.len() as u64;
                pc.produce(b, Compression::NoCompression).await?;
            }
            Ok::<u64, rskafka::client::error::Error>(n)
        });
    }
    let mut records = 0;
    while let Some(r) = set.join_next().await {
        records += r.map_err(|e| anyhow!("raw producer task: {e}"))??;
    }
    let elapsed = start.elapsed();
    Ok(RawRun {
        elapsed,
        records,
        producer_cpu_s: procfs::self_cpu() - cpu0,
        broker_cpu_s: tansu.cpu() - broker0,
    })
}
