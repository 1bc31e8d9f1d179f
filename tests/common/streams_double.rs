//! A DynamoDB Streams test double: an HTTP server that speaks AWS JSON 1.0 (DynamoDB Streams,
//! DynamoDB `DescribeTable` and `Scan`) and the STS query protocol (`AssumeRole`), so the
//! daemon's real SDK clients talk to it through an endpoint override. Unlike the emulator it
//! can split and close shards, trim, expire iterators, throttle, fail, and record every call.
//!
//! ```text
//!  test script ──▶ StreamsDouble (tables, items, streams, shards, faults) ◀── calls() / stats
//!                          │ Arc<Shared> (one mutex)
//!  SDK clients ──HTTP──▶ server.rs (own thread, own tokio runtime)
//!                          ├─ model.rs   state, sequence numbers, iterators
//!                          ├─ items.rs   item store, scan order, segments, sizes
//!                          └─ render.rs  GetRecords and Scan bodies (generated records and
//!                                        items from templates)
//! ```
//!
//! Self-contained: the benchmark includes it with
//! `#[path = "../tests/common/streams_double.rs"] mod streams_double;`.
//!
//! Conventions:
//! - Sequence numbers are 21-digit decimal strings from one global counter: strictly
//!   increasing within a shard, and a shard created later (a child) has larger ones.
//! - Shard ids sort in creation order; DescribeStream lists them in that order.
//! - `put`/`update`/`delete` write to the table's current stream: to the open, non-generated
//!   shard the item's key hashes to (FNV-1a of the key values, modulo the number of such
//!   shards, in id order). A key stays on one shard while the set of open shards is stable.
//!   Use [`StreamsDouble::push_record`] to choose the shard.
//! - A closed shard read to its end answers without `NextShardIterator` (in the same response
//!   as its last records).
//! - Every table keeps its current items: `put`/`update`/`delete` change them (and write
//!   records), [`StreamsDouble::insert_items`] and [`StreamsDouble::add_generated_items`]
//!   add items without records (data from before the stream). DescribeTable's `ItemCount`
//!   and `TableSizeBytes` are live (AWS refreshes them about every six hours).
//! - Scan order: by a 64-bit hash of the partition key's JSON text (FNV-1a, then
//!   MurmurHash3's finalizer), then by the key's text; stable while the items stay. Segment
//!   `s` of `TotalSegments` `t` is the hash range `[s * 2^64 / t, (s + 1) * 2^64 / t)`, i.e.
//!   an item's segment is `hash * t >> 64`: every item is in exactly one segment, and all
//!   items of one partition key in the same one ([`StreamsDouble::scan_segment`]).
//!   `ExclusiveStartKey` continues after that key (which need not exist any more) and must
//!   map to the segment asked for.
//! - A Scan page holds at most `Limit` items (default and cap 1000; larger Limits are
//!   accepted and act as 1000) and at most 1 MiB of item data (at least one item), sizes
//!   by DynamoDB's rules (attribute names plus values: S UTF-8 bytes, N one byte per two
//!   significant digits plus one, B decoded bytes, BOOL/NULL 1, sets their elements, M/L 3
//!   plus 1 per element). `LastEvaluatedKey` only when the segment has more items.
//!   Consumed capacity: the page's item bytes rounded up to 4 KiB, one unit per 4 KiB
//!   (at least one), halved unless `ConsistentRead`; or exactly what
//!   [`StreamsDouble::set_scan_units_per_page`] sets. `ConsumedCapacity` is answered for
//!   `ReturnConsumedCapacity` TOTAL or INDEXES. Filters, projections, `Select` other than
//!   ALL_ATTRIBUTES and indexes are refused (ValidationException).
//! - Time: records' ApproximateCreationDateTime is [`RecordSpec::approximate_creation_epoch_s`]
//!   when set, else the double's clock: the wall clock shifted by
//!   [`StreamsDouble::set_clock_offset`] (generated shards: their table's CreationDateTime).
//! - The server runs on its own thread with its own runtime (one worker by default), so it
//!   keeps serving whatever the test's runtime does (paused clock included) and its CPU use
//!   is one core.
#![allow(dead_code)]

#[path = "streams_double/items.rs"]
mod items;
#[path = "streams_double/model.rs"]
mod model;
#[path = "streams_double/render.rs"]
mod render;
#[path = "streams_double/server.rs"]
mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How the double starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Region in ARNs and records.
    pub region: String,
    /// Account in ARNs.
    pub account: String,
    /// Iterators older than this expire (ExpiredIteratorException); `None`: never.
    pub iterator_ttl: Option<Duration>,
    /// Server worker threads (1: a current-thread runtime).
    pub threads: usize,
    /// Keep a [`Call`] per request (turn off for very long benchmarks).
    pub record_calls: bool,
    /// Requests signed with a session this double issued that has expired get
    /// ExpiredTokenException.
    pub reject_expired_sessions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            account: "123456789012".into(),
            iterator_ttl: None,
            threads: 1,
            record_calls: true,
            reject_expired_sessions: true,
        }
    }
}

/// A key attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAttr {
    /// Attribute name.
    pub name: String,
    /// `S`, `N` or `B`.
    pub attr_type: String,
}

impl KeyAttr {
    /// A string key attribute.
    pub fn s(name: &str) -> Self {
        Self {
            name: name.into(),
            attr_type: "S".into(),
        }
    }
    /// A number key attribute.
    pub fn n(name: &str) -> Self {
        Self {
            name: name.into(),
            attr_type: "N".into(),
        }
    }
}

/// A table's primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchema {
    /// Partition key.
    pub hash: KeyAttr,
    /// Sort key.
    pub range: Option<KeyAttr>,
}

impl KeySchema {
    /// A string partition key.
    pub fn hash(name: &str) -> Self {
        Self {
            hash: KeyAttr::s(name),
            range: None,
        }
    }
    /// String partition and sort keys.
    pub fn hash_range(hash: &str, range: &str) -> Self {
        Self {
            hash: KeyAttr::s(hash),
            range: Some(KeyAttr::s(range)),
        }
    }
}

/// A stream's view type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewType {
    /// KEYS_ONLY.
    KeysOnly,
    /// NEW_IMAGE.
    NewImage,
    /// OLD_IMAGE.
    OldImage,
    /// NEW_AND_OLD_IMAGES.
    NewAndOldImages,
}

impl ViewType {
    /// The name AWS uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ViewType::KeysOnly => "KEYS_ONLY",
            ViewType::NewImage => "NEW_IMAGE",
            ViewType::OldImage => "OLD_IMAGE",
            ViewType::NewAndOldImages => "NEW_AND_OLD_IMAGES",
        }
    }
}

/// A record's event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventName {
    /// INSERT.
    #[default]
    Insert,
    /// MODIFY.
    Modify,
    /// REMOVE.
    Remove,
}

impl EventName {
    /// The name AWS uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EventName::Insert => "INSERT",
            EventName::Modify => "MODIFY",
            EventName::Remove => "REMOVE",
        }
    }
}

/// A record for [`StreamsDouble::push_record`]. Images are attribute-value JSON
/// (`{"pk": {"S": "a"}}`) and are written as given, whatever the view type.
#[derive(Debug, Clone, Default)]
pub struct RecordSpec {
    /// INSERT, MODIFY or REMOVE.
    pub event_name: EventName,
    /// The key attributes.
    pub keys: Value,
    /// NewImage.
    pub new_image: Option<Value>,
    /// OldImage.
    pub old_image: Option<Value>,
    /// ApproximateCreationDateTime in epoch seconds (default: now).
    pub approximate_creation_epoch_s: Option<f64>,
    /// `userIdentity` as (PrincipalId, Type).
    pub user_identity: Option<(String, String)>,
    /// eventID (default: derived from the sequence number).
    pub event_id: Option<String>,
}

impl RecordSpec {
    /// An INSERT.
    pub fn insert(keys: Value, new_image: Value) -> Self {
        Self {
            event_name: EventName::Insert,
            keys,
            new_image: Some(new_image),
            ..Self::default()
        }
    }
    /// A MODIFY.
    pub fn modify(keys: Value, old_image: Value, new_image: Value) -> Self {
        Self {
            event_name: EventName::Modify,
            keys,
            new_image: Some(new_image),
            old_image: Some(old_image),
            ..Self::default()
        }
    }
    /// A REMOVE.
    pub fn remove(keys: Value, old_image: Value) -> Self {
        Self {
            event_name: EventName::Remove,
            keys,
            old_image: Some(old_image),
            ..Self::default()
        }
    }
    /// A REMOVE made by TTL (userIdentity Service / dynamodb.amazonaws.com).
    pub fn ttl_remove(keys: Value, old_image: Value) -> Self {
        Self {
            user_identity: Some(("dynamodb.amazonaws.com".into(), "Service".into())),
            ..Self::remove(keys, old_image)
        }
    }
}

/// A generated table for benchmarks: records are synthesized from their position (no memory
/// per record). Record `n` of shard `s` is change `g = n * shards + s` to key
/// `k{g % keys}` (attribute `pk`), version `g / keys` (attribute `v`): INSERT for version
/// 0, MODIFY after; a `pad` string brings the image to about `item_bytes`. With `keys` a
/// multiple of `shards`, each key lives on one shard.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Shards, all without parent.
    pub shards: usize,
    /// Records in each shard.
    pub records_per_shard: u64,
    /// Approximate JSON size of one image.
    pub item_bytes: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Close the shards (their end is known: see [`StreamsDouble::all_shards_drained`]);
    /// otherwise they stay open and idle after their records.
    pub close: bool,
    /// View type (which images records carry).
    pub view_type: ViewType,
}

impl Default for Generated {
    fn default() -> Self {
        Self {
            shards: 4,
            records_per_shard: 100_000,
            item_bytes: 1000,
            keys: 10_000,
            close: true,
            view_type: ViewType::NewAndOldImages,
        }
    }
}

/// What a fault does to a matching call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// 400 LimitExceededException (DescribeTable: ThrottlingException; Scan:
    /// ProvisionedThroughputExceededException; STS: Throttling).
    Throttle,
    /// 500 InternalServerError (STS: InternalFailure).
    Http500,
    /// 503 ServiceUnavailable.
    Unavailable,
    /// 400 ExpiredIteratorException (STS: ExpiredTokenException).
    Expired,
    /// 400 TrimmedDataAccessException.
    Trimmed,
    /// 400 ResourceNotFoundException.
    NotFound,
    /// Any error answer.
    Error {
        /// HTTP status.
        status: u16,
        /// Error code (`__type` after `#`, or the XML `Code`).
        code: String,
        /// Message.
        message: String,
    },
    /// Wait, then answer normally (the call counts as in flight on its shard meanwhile).
    Slow(Duration),
    /// 200 with this body.
    Malformed(String),
    /// The real answer's status and `Content-Length`, but only half its body, then the
    /// connection is closed. Leaves no trace (a shard is not marked drained, nothing
    /// counts as served, no session is issued).
    Truncated,
    /// The connection is closed without an answer.
    Drop,
}

impl FaultKind {
    /// A short name, as recorded in [`Call::fault`].
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Throttle => "Throttle",
            FaultKind::Http500 => "Http500",
            FaultKind::Unavailable => "Unavailable",
            FaultKind::Expired => "Expired",
            FaultKind::Trimmed => "Trimmed",
            FaultKind::NotFound => "NotFound",
            FaultKind::Error { .. } => "Error",
            FaultKind::Slow(_) => "Slow",
            FaultKind::Malformed(_) => "Malformed",
            FaultKind::Truncated => "Truncated",
            FaultKind::Drop => "Drop",
        }
    }
}

/// A scripted fault. Faults are checked in the order added; the first that matches the call
/// and fires (by `probability`) answers it and spends one of its `remaining` uses.
#[derive(Debug, Clone)]
pub struct Fault {
    /// The operation (`GetRecords`, `DescribeTable`, `AssumeRole`, …); `None`: every one.
    pub op: Option<String>,
    /// Only calls on this shard (GetShardIterator, GetRecords, DescribeStream's
    /// ShardFilter); `None`: any.
    pub shard: Option<String>,
    /// Only Scan calls on this segment of a parallel scan; `None`: any.
    pub segment: Option<i64>,
    /// What happens.
    pub kind: FaultKind,
    /// Chance that a matching call is hit, 0..=1.
    pub probability: f64,
    /// Uses left; `None`: until cleared.
    pub remaining: Option<u32>,
    /// Active from (default: now).
    pub from: Option<Instant>,
    /// Active until (default: until cleared).
    pub until: Option<Instant>,
}

impl Fault {
    /// Every call, always, until cleared.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            op: None,
            shard: None,
            segment: None,
            kind,
            probability: 1.0,
            remaining: None,
            from: None,
            until: None,
        }
    }
    /// Only this operation.
    pub fn op(mut self, op: &str) -> Self {
        self.op = Some(op.into());
        self
    }
    /// Only calls on this shard.
    pub fn shard(mut self, shard_id: &str) -> Self {
        self.shard = Some(shard_id.into());
        self
    }
    /// Only Scan calls on this segment (of a parallel scan).
    pub fn segment(mut self, segment: i64) -> Self {
        self.segment = Some(segment);
        self
    }
    /// Hit a matching call with this chance.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }
    /// At most `n` hits.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
    /// Active from now for `d`.
    pub fn for_duration(self, d: Duration) -> Self {
        self.window(Duration::ZERO, d)
    }
    /// Active from `start_in` from now, for `length`.
    pub fn window(mut self, start_in: Duration, length: Duration) -> Self {
        let from = Instant::now() + start_in;
        self.from = Some(from);
        self.until = Some(from + length);
        self
    }
}

/// Identifies a fault for [`StreamsDouble::clear_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// An AssumeRole request and what it was given.
#[derive(Debug, Clone)]
pub struct AssumeRoleCall {
    /// RoleArn asked for.
    pub role_arn: String,
    /// RoleSessionName asked for.
    pub role_session_name: String,
    /// ExternalId asked for.
    pub external_id: Option<String>,
    /// DurationSeconds asked for.
    pub duration_seconds: Option<u32>,
    /// Access key id the request was signed with (shows role chaining).
    pub signed_with: Option<String>,
    /// When it arrived.
    pub at: Instant,
    /// The session's access key id, when one was issued.
    pub issued_access_key_id: Option<String>,
    /// The session's expiration, when one was issued.
    pub expiration: Option<chrono::DateTime<chrono::Utc>>,
    /// HTTP status (0: connection dropped).
    pub status: u16,
    /// Error code, if it failed.
    pub error_code: Option<String>,
}

/// One request as the double saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Operation (`GetRecords`, `AssumeRole`, …).
    pub op: String,
    /// TableName (DescribeTable, ListStreams, Scan).
    pub table: Option<String>,
    /// StreamArn (DescribeStream, GetShardIterator).
    pub stream_arn: Option<String>,
    /// ShardId (GetShardIterator), the iterator's shard (GetRecords), or
    /// ShardFilter.ShardId (DescribeStream).
    pub shard_id: Option<String>,
    /// ShardIteratorType (GetShardIterator).
    pub iterator_type: Option<String>,
    /// SequenceNumber (GetShardIterator).
    pub sequence_number: Option<String>,
    /// GetRecords: the sequence number the iterator reads from (inclusive).
    pub position: Option<String>,
    /// Limit asked for (GetRecords, DescribeStream, ListStreams, Scan).
    pub limit: Option<i64>,
    /// ExclusiveStartShardId (DescribeStream).
    pub exclusive_start_shard_id: Option<String>,
    /// GetRecords: records returned.
    pub records: usize,
    /// GetRecords: first record's sequence number.
    pub first_sequence_number: Option<String>,
    /// GetRecords: last record's sequence number.
    pub last_sequence_number: Option<String>,
    /// GetRecords: answered without NextShardIterator (closed shard read to its end).
    pub shard_end: bool,
    /// Scan: Segment asked for.
    pub segment: Option<i64>,
    /// Scan: TotalSegments asked for.
    pub total_segments: Option<i64>,
    /// Scan: ExclusiveStartKey given (attribute-value JSON).
    pub exclusive_start_key: Option<Value>,
    /// Scan: ConsistentRead asked for.
    pub consistent_read: Option<bool>,
    /// Scan: items returned.
    pub items: usize,
    /// Scan: read capacity the page consumed (whether or not ReturnConsumedCapacity asked
    /// for it).
    pub capacity_units: Option<f64>,
    /// Scan: LastEvaluatedKey answered.
    pub last_evaluated_key: Option<Value>,
    /// When it arrived.
    pub at: Instant,
    /// How long it took to answer.
    pub elapsed: Duration,
    /// GetShardIterator/GetRecords: calls on this shard in flight when it arrived, itself
    /// included.
    pub concurrent_on_shard: usize,
    /// HTTP status (0: connection dropped).
    pub status: u16,
    /// Error code, if it failed.
    pub error_code: Option<String>,
    /// The fault that hit it ([`FaultKind::name`]).
    pub fault: Option<String>,
    /// Access key id of the signature.
    pub access_key_id: Option<String>,
    /// AssumeRole details.
    pub assume_role: Option<AssumeRoleCall>,
}

impl Call {
    fn new(op: &str, at: Instant) -> Self {
        Self {
            op: op.to_owned(),
            table: None,
            stream_arn: None,
            shard_id: None,
            iterator_type: None,
            sequence_number: None,
            position: None,
            limit: None,
            exclusive_start_shard_id: None,
            records: 0,
            first_sequence_number: None,
            last_sequence_number: None,
            shard_end: false,
            segment: None,
            total_segments: None,
            exclusive_start_key: None,
            consistent_read: None,
            items: 0,
            capacity_units: None,
            last_evaluated_key: None,
            at,
            elapsed: Duration::ZERO,
            concurrent_on_shard: 0,
            status: 0,
            error_code: None,
            fault: None,
            access_key_id: None,
            assume_role: None,
        }
    }
}

/// A shard as the double holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard id.
    pub shard_id: String,
    /// Parent shard id.
    pub parent_shard_id: Option<String>,
    /// StartingSequenceNumber.
    pub starting_sequence_number: String,
    /// EndingSequenceNumber, once closed.
    pub ending_sequence_number: Option<String>,
    /// Highest sequence number so far (the starting one while empty).
    pub last_sequence_number: String,
    /// Records held (generated and pushed, trimmed ones excluded for pushed).
    pub records: usize,
    /// Closed.
    pub closed: bool,
    /// Dropped from listings by [`StreamsDouble::trim_shard_entirely`].
    pub trimmed_entirely: bool,
    /// Closed and read to its end by a GetRecords.
    pub drained: bool,
}

#[derive(Debug)]
struct ServerHandle {
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The running double. Clones share it; the server stops when the last clone is dropped.
/// Scripting methods panic on unknown tables/shards (a broken test, not a scenario).
#[derive(Debug, Clone)]
pub struct StreamsDouble {
    shared: Arc<model::Shared>,
    server: Arc<ServerHandle>,
    addr: std::net::SocketAddr,
}

impl StreamsDouble {
    /// Starts with default options on 127.0.0.1 and a free port.
    pub async fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts with `options` (needs no runtime: the server has its own thread).
    pub fn start_with(options: Options) -> Self {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("streams double: bind 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("streams double: nonblocking listener");
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(model::Shared {
            state: Mutex::new(model::State::new(&options)),
            options: options.clone(),
            records_served: AtomicU64::new(0),
            items_served: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server_shared = shared.clone();
        let threads = options.threads.max(1);
        let thread = std::thread::Builder::new()
            .name("streams-double".into())
            .spawn(move || {
                let runtime = if threads == 1 {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(threads)
                        .enable_all()
                        .build()
                }
                .expect("streams double: runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("streams double: listener");
                    server::serve(listener, server_shared, rx).await;
                });
            })
            .expect("streams double: thread");
        Self {
            shared,
            server: Arc::new(ServerHandle {
                shutdown: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            }),
            addr,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, model::State> {
        self.shared.lock()
    }

    /// `http://127.0.0.1:PORT`, for `aws.endpoint_url` (and the STS endpoint).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The region of ARNs and records.
    pub fn region(&self) -> &str {
        &self.shared.options.region
    }

    // ---- tables and streams ----------------------------------------------------------

    /// Creates a table with an enabled stream and one open shard; returns the stream ARN.
    pub fn add_table(&self, name: &str, keys: KeySchema, view_type: ViewType) -> String {
        self.state().add_table(name, keys, view_type, false)
    }

    /// Creates a generated table (see [`Generated`]); returns the stream ARN.
    pub fn add_generated_table(&self, name: &str, spec: Generated) -> String {
        self.state().add_generated_table(name, &spec)
    }

    /// The table's latest stream ARN.
    pub fn stream_arn(&self, table: &str) -> Option<String> {
        self.state().stream_arn(table)
    }

    /// The stream's shards in listing order, trimmed-away ones included.
    pub fn shards(&self, stream_arn: &str) -> Vec<ShardInfo> {
        self.state().shard_infos(stream_arn)
    }

    /// Ids of the open shards of the table's latest stream.
    pub fn open_shards(&self, table: &str) -> Vec<String> {
        let Some(arn) = self.stream_arn(table) else {
            return Vec::new();
        };
        self.shards(&arn)
            .into_iter()
            .filter(|s| !s.closed)
            .map(|s| s.shard_id)
            .collect()
    }

    /// Adds an open shard to a stream.
    pub fn add_shard(&self, stream_arn: &str, parent: Option<&str>) -> String {
        self.state().add_shard(stream_arn, parent, None)
    }

    /// Closes a shard; returns its EndingSequenceNumber (its last record's, or its starting
    /// one when empty).
    pub fn close_shard(&self, shard_id: &str) -> String {
        self.state().close_shard(shard_id)
    }

    /// Closes the shard and creates `children` open shards with it as parent.
    pub fn split(&self, shard_id: &str, children: usize) -> Vec<String> {
        self.state().split(shard_id, children)
    }

    /// Trims records up to and including `up_to_seq`: reading there now gives
    /// TrimmedDataAccessException; TRIM_HORIZON starts after it.
    pub fn trim(&self, shard_id: &str, up_to_seq: &str) {
        self.state().trim(shard_id, up_to_seq)
    }

    /// Drops a shard from listings (its children keep their ParentShardId).
    /// GetShardIterator on it: ResourceNotFoundException; GetRecords with an iterator
    /// issued before: TrimmedDataAccessException.
    pub fn trim_shard_entirely(&self, shard_id: &str) {
        self.state().trim_entirely(shard_id)
    }

    /// Deletes the table: DescribeTable gives ResourceNotFoundException; its streams
    /// become DISABLED with every shard closed (still readable to their end).
    pub fn delete_table(&self, table: &str) {
        self.state().delete_table(table)
    }

    /// Disables the table's stream: DescribeTable has no StreamSpecification (but keeps
    /// LatestStreamArn), the stream is DISABLED, its shards closed. Writes make no records.
    pub fn disable_stream(&self, table: &str) {
        self.state().disable_stream(table)
    }

    /// Enables a new stream (new ARN and label, one open shard); the previous stream, if
    /// still enabled, is disabled and its shards closed. Returns the new ARN.
    pub fn enable_new_stream(&self, table: &str) -> String {
        self.state().new_stream(table, true)
    }

    /// Sets DescribeStream's StreamStatus (ENABLING, ENABLED, DISABLING, DISABLED).
    pub fn set_stream_status(&self, stream_arn: &str, status: &str) {
        self.state().set_stream_status(stream_arn, status)
    }

    // ---- writes ----------------------------------------------------------------------

    /// Puts an item (attribute-value JSON): INSERT, or MODIFY with the previous item as old
    /// image. Images follow the view type. Returns the record's sequence number (`None` when
    /// the stream is disabled).
    pub fn put(&self, table: &str, item: Value) -> Option<String> {
        self.state()
            .write(table, &item.clone(), move |_| Some(item))
    }

    /// Sets attributes (attribute-value JSON) of the item with these keys, creating it if
    /// absent: MODIFY or INSERT.
    pub fn update(&self, table: &str, keys: Value, set: Value) -> Option<String> {
        self.state().write(table, &keys.clone(), move |old| {
            let mut item = old.cloned().unwrap_or(keys);
            if let (Some(item), Some(set)) = (item.as_object_mut(), set.as_object()) {
                for (k, v) in set {
                    item.insert(k.clone(), v.clone());
                }
            }
            Some(item)
        })
    }

    /// Deletes the item: REMOVE with the old image (`None`, and no record, when there was
    /// no such item or the stream is disabled).
    pub fn delete(&self, table: &str, keys: Value) -> Option<String> {
        self.state().write(table, &keys, |_| None)
    }

    /// Writes items (attribute-value JSON, as [`Self::put`] takes) to the table's store
    /// only, without stream records: the table's data from before the stream. Replaces
    /// items with the same key.
    pub fn insert_items(&self, table: &str, items: Vec<Value>) {
        self.state().insert_items(table, items)
    }

    /// Adds `count` generated items (no stream records) for benchmarks: item `n` (from 1,
    /// after earlier batches) is `{"pk":{"S":"item-000001"},"n":{"N":"1"},"pad":{"S":"xx…"}}`
    /// (`pk`: the table's partition key, which must be its only key and a string), its
    /// DynamoDB size about `item_bytes`. Each is a small index entry, rendered from a
    /// template only when a Scan serves it. Put, update and delete apply to them as to any
    /// item.
    pub fn add_generated_items(&self, table: &str, count: usize, item_bytes: usize) {
        self.state().add_generated_items(table, count, item_bytes)
    }

    /// The table's current items (attribute-value JSON), in scan order.
    pub fn items(&self, table: &str) -> Vec<Value> {
        self.state().items(table)
    }

    /// The parallel-scan segment (of `total_segments`) that holds the item with these keys.
    pub fn scan_segment(&self, table: &str, keys: &Value, total_segments: u32) -> u32 {
        self.state().scan_segment(table, keys, total_segments)
    }

    /// Every Scan page of the table reports (and records) exactly `units` of consumed read
    /// capacity; `None`: DynamoDB's rule (see the module docs).
    pub fn set_scan_units_per_page(&self, table: &str, units: Option<f64>) {
        self.state().set_scan_units_per_page(table, units)
    }

    /// DescribeTable's billing: `None` on demand (PAY_PER_REQUEST, throughput 0/0), `Some(n)`
    /// PROVISIONED with `n` read (and write) capacity units. Scans are not throttled by it:
    /// script that with a [`FaultKind::Throttle`] on `Scan`.
    pub fn set_provisioned_read_capacity(&self, table: &str, units: Option<u64>) {
        self.state().set_provisioned_read_capacity(table, units)
    }

    /// Appends a record to an open shard; returns its sequence number.
    pub fn push_record(&self, shard_id: &str, record: RecordSpec) -> String {
        self.state().push_record(shard_id, record)
    }

    /// Appends a record given as raw JSON (to test odd shapes); the sequence number is set
    /// at `dynamodb.SequenceNumber` unless present. Returns the sequence number the double
    /// uses for its position.
    pub fn push_raw_record(&self, shard_id: &str, record: Value) -> String {
        self.state().push_raw(shard_id, record)
    }

    // ---- iterators -------------------------------------------------------------------

    /// Every iterator issued so far now gets ExpiredIteratorException.
    pub fn expire_iterators(&self) {
        self.state().expire_iterators(None)
    }

    /// Every iterator of this shard issued so far now gets ExpiredIteratorException.
    pub fn expire_shard_iterators(&self, shard_id: &str) {
        self.state().expire_iterators(Some(shard_id))
    }

    /// Iterators older than `ttl` expire (`None`: never).
    pub fn set_iterator_ttl(&self, ttl: Option<Duration>) {
        self.state().iterator_ttl = ttl;
    }

    // ---- clock -----------------------------------------------------------------------

    /// Shifts the double's clock by `offset` (negative: into the past) from the wall clock:
    /// records written from now on without an explicit time (`put`/`update`/`delete`,
    /// [`RecordSpec`] without `approximate_creation_epoch_s`) get ApproximateCreationDateTime
    /// from it, and tables created from now on their CreationDateTime (generated shards'
    /// records carry their table's). Whole seconds, as records carry them.
    pub fn set_clock_offset(&self, offset: chrono::Duration) {
        self.state().clock_offset = offset;
    }

    /// The double's clock: the wall clock plus [`Self::set_clock_offset`].
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.state().now()
    }

    // ---- faults ----------------------------------------------------------------------

    /// Adds a fault.
    pub fn fault(&self, fault: Fault) -> FaultId {
        let mut state = self.state();
        state.next_fault += 1;
        let id = FaultId(state.next_fault);
        state.faults.push(model::ActiveFault { id, fault });
        id
    }

    /// Removes one fault.
    pub fn clear_fault(&self, id: FaultId) {
        self.state().faults.retain(|f| f.id != id);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    // ---- STS -------------------------------------------------------------------------

    /// Grant sessions of this lifetime whatever DurationSeconds asks (`None`: as asked,
    /// default 3600 s).
    pub fn set_sts_session_lifetime(&self, lifetime: Option<Duration>) {
        self.state().sts.session_lifetime = lifetime;
    }

    /// Whether requests signed with an expired session of this double are refused.
    pub fn set_reject_expired_sessions(&self, reject: bool) {
        self.state().sts.reject_expired_sessions = reject;
    }

    /// Every AssumeRole request (kept even when `record_calls` is off).
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.state().sts.calls.clone()
    }

    // ---- observations ----------------------------------------------------------------

    /// Every request so far, in the order answered.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The requests for one operation.
    pub fn calls_to(&self, op: &str) -> Vec<Call> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    /// Forgets the recorded calls (not the AssumeRole calls).
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// The most GetShardIterator/GetRecords calls in flight on one shard at once.
    pub fn max_concurrent_per_shard(&self) -> usize {
        self.state().max_inflight
    }

    /// Records returned by GetRecords so far, repeats included.
    pub fn records_served(&self) -> u64 {
        self.shared.records_served.load(Ordering::Relaxed)
    }

    /// Items returned by Scan so far, repeats included.
    pub fn items_served(&self) -> u64 {
        self.shared.items_served.load(Ordering::Relaxed)
    }

    /// True when every listed shard of every stream is closed and a GetRecords read it to
    /// its end (vacuously true with no shards).
    pub fn all_shards_drained(&self) -> bool {
        self.state().all_drained(None)
    }

    /// Polls `done` every 10 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Like [`Self::all_shards_drained`], for the streams of one table.
    pub fn table_drained(&self, table: &str) -> bool {
        self.state().all_drained(Some(table))
    }
}
