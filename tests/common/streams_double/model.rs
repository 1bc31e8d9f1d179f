//! The double's state: tables, streams, shards, records, sequence numbers and iterators, and
//! the operations on them. Everything here runs under one mutex and never awaits; records
//! of generated shards are rendered outside the lock (see `render.rs`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::items::{self, ItemStore, ScanPage, SCAN_PAGE_ITEMS};
use super::render::Template;
use super::{
    AssumeRoleCall, Call, EventName, Fault, FaultId, Generated, KeySchema, Options, RecordSpec,
    ShardInfo, ViewType,
};

/// The first sequence number handed out: 21 digits, more than a u64 holds, so a reader that
/// parses sequence numbers as u64 fails here as it would against AWS.
pub(super) const FIRST_SEQUENCE_NUMBER: u128 = 100_000_000_000_000_000_000;

/// What the server and the scripting handle share.
#[derive(Debug)]
pub(super) struct Shared {
    pub state: Mutex<State>,
    pub options: Options,
    /// Records returned by GetRecords, repeats included.
    pub records_served: AtomicU64,
    /// Items returned by Scan, repeats included.
    pub items_served: AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An AWS error answer.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(400, "ResourceNotFoundException", message)
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(400, "ValidationException", message)
    }
    pub fn trimmed(message: impl Into<String>) -> Self {
        Self::new(400, "TrimmedDataAccessException", message)
    }
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(400, "ExpiredIteratorException", message)
    }
}

#[derive(Debug)]
struct Table {
    key_schema: KeySchema,
    view_type: ViewType,
    /// The latest stream (kept after the stream is disabled, as DynamoDB does).
    stream_arn: Option<String>,
    stream_enabled: bool,
    /// Current items (for INSERT/MODIFY, old images and Scan).
    items: ItemStore,
    created_epoch_s: i64,
    generated: bool,
    /// Provisioned read capacity (`None`: on demand).
    read_capacity: Option<u64>,
    /// Every Scan page consumes this (`None`: by the items' sizes).
    scan_units_per_page: Option<f64>,
}

#[derive(Debug)]
struct Stream {
    arn: String,
    label: String,
    table: String,
    view_type: ViewType,
    key_schema: KeySchema,
    status: String,
    /// Shard ids in creation order (which is also their sort order).
    shards: Vec<String>,
}

/// The synthesized prefix of a generated shard: record `i` (0-based) has sequence number
/// `start_seq + 1 + i`.
#[derive(Debug, Clone)]
pub(super) struct GeneratedPart {
    pub template: Arc<Template>,
    pub shard_index: u64,
    pub count: u64,
}

#[derive(Debug)]
struct StoredRecord {
    seq: u128,
    json: Arc<str>,
}

#[derive(Debug)]
struct Shard {
    id: String,
    stream_arn: String,
    parent: Option<String>,
    start_seq: u128,
    /// The highest sequence number of the shard so far (`start_seq` while empty).
    last_seq: u128,
    closed: bool,
    /// Positions below this are trimmed.
    trim_before: u128,
    /// Trimmed entirely: no longer listed.
    gone: bool,
    generated: Option<GeneratedPart>,
    /// Records pushed by the script, after the generated part.
    records: Vec<StoredRecord>,
    /// A GetRecords read this closed shard to its end.
    drained: bool,
    /// Iterators of this shard issued in an earlier generation are expired.
    valid_from_generation: u64,
}

/// One page of GetRecords, rendered outside the lock.
#[derive(Debug)]
pub(super) struct Page {
    /// Generated records `from..to` of this part, with the sequence number of record 0.
    pub generated: Option<(GeneratedPart, u128, u64, u64)>,
    pub stored: Vec<Arc<str>>,
    pub count: usize,
    pub first_seq: Option<u128>,
    pub last_seq: Option<u128>,
    pub next_iterator: Option<String>,
}

/// A decoded shard iterator.
#[derive(Debug, Clone)]
pub(super) struct Iterator {
    pub generation: u64,
    pub issued_ms: u64,
    pub position: u128,
    pub shard_id: String,
}

impl Iterator {
    pub fn encode(&self) -> String {
        let raw = format!(
            "{}:{}:{}:{}",
            self.generation, self.issued_ms, self.position, self.shard_id
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let mut parts = raw.splitn(4, ':');
        Some(Self {
            generation: parts.next()?.parse().ok()?,
            issued_ms: parts.next()?.parse().ok()?,
            position: parts.next()?.parse().ok()?,
            shard_id: parts.next()?.to_owned(),
        })
    }
}

/// STS sessions the double handed out.
#[derive(Debug, Default)]
pub(super) struct StsState {
    pub session_lifetime: Option<Duration>,
    pub reject_expired_sessions: bool,
    /// Expiry (unix milliseconds) of every access key id issued.
    pub sessions: HashMap<String, i64>,
    pub calls: Vec<AssumeRoleCall>,
    pub issued: u64,
}

/// A fault and what is left of it.
#[derive(Debug)]
pub(super) struct ActiveFault {
    pub id: FaultId,
    pub fault: Fault,
}

#[derive(Debug)]
pub(super) struct State {
    region: String,
    account: String,
    started: Instant,
    next_seq: u128,
    next_shard: u64,
    next_stream: u64,
    tables: HashMap<String, Table>,
    /// Stream ARNs in creation order.
    stream_order: Vec<String>,
    streams: HashMap<String, Stream>,
    shards: HashMap<String, Shard>,
    generation: u64,
    valid_from_generation: u64,
    pub iterator_ttl: Option<Duration>,
    pub faults: Vec<ActiveFault>,
    pub next_fault: u64,
    pub calls: Vec<Call>,
    pub record_calls: bool,
    pub inflight: HashMap<String, usize>,
    pub max_inflight: usize,
    pub sts: StsState,
    /// Added to the wall clock for records' default ApproximateCreationDateTime and tables'
    /// CreationDateTime.
    pub clock_offset: chrono::Duration,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn seq_text(seq: u128) -> String {
    seq.to_string()
}

fn parse_seq(text: &str) -> Result<u128, ApiError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 38 {
        return Err(ApiError::validation(format!(
            "Invalid SequenceNumber {text:?}: must be a decimal string"
        )));
    }
    text.parse()
        .map_err(|_| ApiError::validation(format!("Invalid SequenceNumber {text:?}")))
}

impl State {
    pub fn new(options: &Options) -> Self {
        Self {
            region: options.region.clone(),
            account: options.account.clone(),
            started: Instant::now(),
            next_seq: FIRST_SEQUENCE_NUMBER,
            next_shard: 0,
            next_stream: 0,
            tables: HashMap::new(),
            stream_order: Vec::new(),
            streams: HashMap::new(),
            shards: HashMap::new(),
            generation: 1,
            valid_from_generation: 1,
            iterator_ttl: options.iterator_ttl,
            faults: Vec::new(),
            next_fault: 0,
            calls: Vec::new(),
            record_calls: options.record_calls,
            inflight: HashMap::new(),
            max_inflight: 0,
            sts: StsState {
                reject_expired_sessions: options.reject_expired_sessions,
                ..StsState::default()
            },
            clock_offset: chrono::Duration::zero(),
        }
    }

    /// The double's clock: the wall clock plus the scripted offset.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + self.clock_offset
    }

    fn now_epoch_s(&self) -> i64 {
        self.now().timestamp()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn take_seq(&mut self, count: u128) -> u128 {
        let seq = self.next_seq;
        self.next_seq += count;
        seq
    }

    // ---- scripting -------------------------------------------------------------------

    pub fn add_table(
        &mut self,
        name: &str,
        key_schema: KeySchema,
        view_type: ViewType,
        generated: bool,
    ) -> String {
        assert!(
            !self.tables.contains_key(name),
            "streams double: table {name} already exists"
        );
        let created_epoch_s = self.now_epoch_s();
        self.tables.insert(
            name.to_owned(),
            Table {
                key_schema,
                view_type,
                stream_arn: None,
                stream_enabled: false,
                items: ItemStore::default(),
                created_epoch_s,
                generated,
                read_capacity: None,
                scan_units_per_page: None,
            },
        );
        self.new_stream(name, !generated)
    }

    /// Starts a new stream on `table` (with one open shard unless `with_shard` is false);
    /// the previous stream is disabled and its shards closed.
    pub fn new_stream(&mut self, table: &str, with_shard: bool) -> String {
        let previous = {
            let t = self.table(table);
            t.stream_arn.clone().filter(|_| t.stream_enabled)
        };
        if let Some(prev) = previous {
            self.disable(&prev);
        }
        self.next_stream += 1;
        let label = (chrono::Utc::now() + chrono::Duration::milliseconds(self.next_stream as i64))
            .format("%Y-%m-%dT%H:%M:%S%.3f")
            .to_string();
        let arn = format!(
            "arn:aws:dynamodb:{}:{}:table/{table}/stream/{label}",
            self.region, self.account
        );
        let t = self.tables.get_mut(table).expect("table exists");
        t.stream_arn = Some(arn.clone());
        t.stream_enabled = true;
        let stream = Stream {
            arn: arn.clone(),
            label,
            table: table.to_owned(),
            view_type: t.view_type,
            key_schema: t.key_schema.clone(),
            status: "ENABLED".into(),
            shards: Vec::new(),
        };
        self.streams.insert(arn.clone(), stream);
        self.stream_order.push(arn.clone());
        if with_shard {
            self.add_shard(&arn, None, None);
        }
        arn
    }

    fn table(&self, name: &str) -> &Table {
        self.tables
            .get(name)
            .unwrap_or_else(|| panic!("streams double: no table {name}"))
    }

    fn table_mut(&mut self, name: &str) -> &mut Table {
        self.tables
            .get_mut(name)
            .unwrap_or_else(|| panic!("streams double: no table {name}"))
    }

    fn shard_mut(&mut self, id: &str) -> &mut Shard {
        self.shards
            .get_mut(id)
            .unwrap_or_else(|| panic!("streams double: no shard {id}"))
    }

    /// Adds an open shard (or a generated one) to a stream.
    pub fn add_shard(
        &mut self,
        stream_arn: &str,
        parent: Option<&str>,
        generated: Option<(Arc<Template>, u64, u64)>,
    ) -> String {
        assert!(
            self.streams.contains_key(stream_arn),
            "streams double: no stream {stream_arn}"
        );
        self.next_shard += 1;
        let n = self.next_shard;
        let id = format!(
            "shardId-{:020}-{:08x}",
            1_700_000_000_000 + n,
            fnv1a(&n.to_le_bytes()) as u32
        );
        let count = generated.as_ref().map_or(0, |g| g.2);
        let start_seq = self.take_seq(1 + u128::from(count));
        let shard = Shard {
            id: id.clone(),
            stream_arn: stream_arn.to_owned(),
            parent: parent.map(str::to_owned),
            start_seq,
            last_seq: start_seq + u128::from(count),
            closed: false,
            trim_before: start_seq,
            gone: false,
            generated: generated.map(|(template, shard_index, count)| GeneratedPart {
                template,
                shard_index,
                count,
            }),
            records: Vec::new(),
            drained: false,
            valid_from_generation: 0,
        };
        self.shards.insert(id.clone(), shard);
        self.streams
            .get_mut(stream_arn)
            .expect("checked")
            .shards
            .push(id.clone());
        id
    }

    pub fn add_generated_table(&mut self, name: &str, spec: &Generated) -> String {
        let arn = self.add_table(name, KeySchema::hash("pk"), spec.view_type, true);
        let created = self.table(name).created_epoch_s;
        let template = Arc::new(Template::new(spec, &self.region, created));
        for index in 0..spec.shards {
            let id = self.add_shard(
                &arn,
                None,
                Some((template.clone(), index as u64, spec.records_per_shard)),
            );
            if spec.close {
                self.close_shard(&id);
            }
        }
        arn
    }

    pub fn close_shard(&mut self, id: &str) -> String {
        let shard = self.shard_mut(id);
        shard.closed = true;
        seq_text(shard.last_seq)
    }

    pub fn split(&mut self, id: &str, children: usize) -> Vec<String> {
        self.close_shard(id);
        let stream = self.shard_mut(id).stream_arn.clone();
        (0..children)
            .map(|_| self.add_shard(&stream, Some(id), None))
            .collect()
    }

    pub fn trim(&mut self, id: &str, up_to: &str) {
        let up_to = parse_seq(up_to).expect("trim: a decimal sequence number");
        let shard = self.shard_mut(id);
        shard.trim_before = shard.trim_before.max(up_to + 1);
        let keep_from = shard.records.partition_point(|r| r.seq <= up_to);
        shard.records.drain(..keep_from);
    }

    pub fn trim_entirely(&mut self, id: &str) {
        let shard = self.shard_mut(id);
        shard.gone = true;
        shard.records.clear();
        shard.trim_before = shard.last_seq + 1;
    }

    fn disable(&mut self, stream_arn: &str) {
        let Some(stream) = self.streams.get_mut(stream_arn) else {
            return;
        };
        stream.status = "DISABLED".into();
        for id in stream.shards.clone() {
            self.shard_mut(&id).closed = true;
        }
    }

    pub fn disable_stream(&mut self, table: &str) {
        let arn = self.table(table).stream_arn.clone();
        if let Some(arn) = arn {
            self.disable(&arn);
        }
        self.tables.get_mut(table).expect("checked").stream_enabled = false;
    }

    pub fn delete_table(&mut self, table: &str) {
        self.disable_stream(table);
        self.tables.remove(table);
    }

    pub fn set_stream_status(&mut self, stream_arn: &str, status: &str) {
        self.streams
            .get_mut(stream_arn)
            .unwrap_or_else(|| panic!("streams double: no stream {stream_arn}"))
            .status = status.to_owned();
    }

    pub fn expire_iterators(&mut self, shard: Option<&str>) {
        self.generation += 1;
        match shard {
            None => self.valid_from_generation = self.generation,
            Some(id) => {
                let generation = self.generation;
                self.shard_mut(id).valid_from_generation = generation;
            }
        }
    }

    pub fn stream_arn(&self, table: &str) -> Option<String> {
        self.tables.get(table).and_then(|t| t.stream_arn.clone())
    }

    pub fn shard_infos(&self, stream_arn: &str) -> Vec<ShardInfo> {
        let Some(stream) = self.streams.get(stream_arn) else {
            return Vec::new();
        };
        stream
            .shards
            .iter()
            .map(|id| {
                let s = &self.shards[id];
                ShardInfo {
                    shard_id: s.id.clone(),
                    parent_shard_id: s.parent.clone(),
                    starting_sequence_number: seq_text(s.start_seq),
                    ending_sequence_number: s.closed.then(|| seq_text(s.last_seq)),
                    last_sequence_number: seq_text(s.last_seq),
                    records: s.generated.as_ref().map_or(0, |g| g.count as usize) + s.records.len(),
                    closed: s.closed,
                    trimmed_entirely: s.gone,
                    drained: s.drained,
                }
            })
            .collect()
    }

    /// True when every listed shard of every stream is closed and was read to its end.
    pub fn all_drained(&self, table: Option<&str>) -> bool {
        self.streams
            .values()
            .filter(|s| table.is_none_or(|t| s.table == t))
            .flat_map(|s| s.shards.iter())
            .map(|id| &self.shards[id])
            .filter(|s| !s.gone)
            .all(|s| s.closed && s.drained)
    }

    /// The scan key and key map of a scripted item or key (panics when a key attribute is
    /// missing).
    fn key_of(schema: &KeySchema, item: &Value) -> (items::ScanKey, Value) {
        let obj = item
            .as_object()
            .expect("streams double: items and keys are JSON objects of attribute values");
        items::key_of(schema, obj, false)
            .unwrap_or_else(|| panic!("streams double: {item} lacks the key attributes {schema:?}"))
    }

    /// Writes items to the table without stream records.
    pub fn insert_items(&mut self, table: &str, items: Vec<Value>) {
        let t = self.table_mut(table);
        for item in items {
            let (key, _) = Self::key_of(&t.key_schema, &item);
            t.items.put(key, item);
        }
    }

    pub fn add_generated_items(&mut self, table: &str, count: usize, item_bytes: usize) {
        let t = self.table_mut(table);
        let schema = &t.key_schema;
        assert!(
            schema.hash.attr_type == "S" && schema.range.is_none(),
            "streams double: generated items need a table with only a string partition key"
        );
        let name = schema.hash.name.clone();
        t.items.generate(&name, count, item_bytes);
    }

    pub fn set_provisioned_read_capacity(&mut self, table: &str, units: Option<u64>) {
        self.table_mut(table).read_capacity = units;
    }

    pub fn set_scan_units_per_page(&mut self, table: &str, units: Option<f64>) {
        self.table_mut(table).scan_units_per_page = units;
    }

    pub fn items(&self, table: &str) -> Vec<Value> {
        self.table(table).items.values()
    }

    pub fn scan_segment(&self, table: &str, keys: &Value, total_segments: u32) -> u32 {
        assert!(total_segments >= 1, "streams double: TotalSegments >= 1");
        let (key, _) = Self::key_of(&self.table(table).key_schema, keys);
        items::segment_of_key(&key, total_segments)
    }

    /// A table write: updates the item and, when the stream is on, appends a record to the
    /// open shard the key hashes to. `change` gets the old item and returns the new one
    /// (None: delete).
    pub fn write(
        &mut self,
        table: &str,
        keys_or_item: &Value,
        change: impl FnOnce(Option<&Value>) -> Option<Value>,
    ) -> Option<String> {
        let t = self.table_mut(table);
        let (key, keys) = Self::key_of(&t.key_schema, keys_or_item);
        let key_text = key.1.clone();
        let view = t.view_type;
        let old = t.items.get(&key);
        let new = change(old.as_ref());
        match &new {
            Some(item) => t.items.put(key, item.clone()),
            None => t.items.remove(&key),
        }
        let event = match (&old, &new) {
            (None, None) => return None,
            (None, Some(_)) => EventName::Insert,
            (Some(_), Some(_)) => EventName::Modify,
            (Some(_), None) => EventName::Remove,
        };
        if !t.stream_enabled {
            return None;
        }
        let arn = t.stream_arn.clone().expect("enabled stream has an arn");
        let open: Vec<&String> = self.streams[&arn]
            .shards
            .iter()
            .filter(|id| {
                let s = &self.shards[*id];
                !s.closed && s.generated.is_none()
            })
            .collect();
        assert!(
            !open.is_empty(),
            "streams double: table {table} has no open shard to write to"
        );
        let shard = open[(fnv1a(key_text.as_bytes()) % open.len() as u64) as usize].clone();
        let (new_image, old_image) = match view {
            ViewType::KeysOnly => (None, None),
            ViewType::NewImage => (new, None),
            ViewType::OldImage => (None, old),
            ViewType::NewAndOldImages => (new, old),
        };
        let spec = RecordSpec {
            event_name: event,
            keys,
            new_image,
            old_image,
            ..RecordSpec::default()
        };
        Some(self.push_record(&shard, spec))
    }

    pub fn push_record(&mut self, shard_id: &str, spec: RecordSpec) -> String {
        let view = {
            let shard = self.shard_mut(shard_id);
            assert!(
                !shard.closed,
                "streams double: shard {shard_id} is closed; records cannot be added"
            );
            let arn = shard.stream_arn.clone();
            self.streams[&arn].view_type
        };
        let seq = self.take_seq(1);
        let seq_s = seq_text(seq);
        let mut dynamodb = Map::new();
        let ts = spec
            .approximate_creation_epoch_s
            .map(|s| json!(s))
            .unwrap_or_else(|| json!(self.now_epoch_s()));
        dynamodb.insert("ApproximateCreationDateTime".into(), ts);
        dynamodb.insert("Keys".into(), spec.keys.clone());
        let mut size = spec.keys.to_string().len();
        if let Some(new) = &spec.new_image {
            size += new.to_string().len();
            dynamodb.insert("NewImage".into(), new.clone());
        }
        if let Some(old) = &spec.old_image {
            size += old.to_string().len();
            dynamodb.insert("OldImage".into(), old.clone());
        }
        dynamodb.insert("SequenceNumber".into(), Value::String(seq_s.clone()));
        dynamodb.insert("SizeBytes".into(), json!(size));
        dynamodb.insert("StreamViewType".into(), json!(view.as_str()));
        let mut record = json!({
            "eventID": spec.event_id.clone().unwrap_or_else(|| format!("{:032x}", fnv1a(seq_s.as_bytes()) as u128 ^ seq)),
            "eventName": spec.event_name.as_str(),
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": self.region,
            "dynamodb": dynamodb,
        });
        if let Some((principal, kind)) = &spec.user_identity {
            record["userIdentity"] = json!({"PrincipalId": principal, "Type": kind});
        }
        self.append(shard_id, seq, record.to_string())
    }

    /// Appends a record given as raw JSON; the sequence number is put into
    /// `dynamodb.SequenceNumber` unless that is already set (or `dynamodb` is absent).
    pub fn push_raw(&mut self, shard_id: &str, mut record: Value) -> String {
        let seq = self.take_seq(1);
        if let Some(d) = record.get_mut("dynamodb").and_then(Value::as_object_mut) {
            d.entry("SequenceNumber")
                .or_insert_with(|| Value::String(seq_text(seq)));
        }
        assert!(
            !self.shard_mut(shard_id).closed,
            "streams double: shard {shard_id} is closed"
        );
        self.append(shard_id, seq, record.to_string())
    }

    fn append(&mut self, shard_id: &str, seq: u128, json: String) -> String {
        let shard = self.shard_mut(shard_id);
        shard.records.push(StoredRecord {
            seq,
            json: json.into(),
        });
        shard.last_seq = seq;
        seq_text(seq)
    }

    // ---- API operations -------------------------------------------------------------

    pub fn describe_table(&self, body: &Value) -> Result<Value, ApiError> {
        let name = str_field(body, "TableName")?;
        let t = self.tables.get(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "Requested resource not found: Table: {name} not found"
            ))
        })?;
        let mut defs = vec![
            json!({"AttributeName": t.key_schema.hash.name, "AttributeType": t.key_schema.hash.attr_type}),
        ];
        if let Some(r) = &t.key_schema.range {
            defs.push(json!({"AttributeName": r.name, "AttributeType": r.attr_type}));
        }
        let mut table = json!({
            "TableName": name,
            "TableStatus": "ACTIVE",
            "TableArn": format!("arn:aws:dynamodb:{}:{}:table/{name}", self.region, self.account),
            "TableId": format!("{:032x}", fnv1a(name.as_bytes())),
            "CreationDateTime": t.created_epoch_s,
            "ItemCount": t.items.len(),
            "TableSizeBytes": t.items.bytes(),
            "KeySchema": key_schema_json(&t.key_schema),
            "AttributeDefinitions": defs,
        });
        match t.read_capacity {
            None => {
                table["BillingModeSummary"] = json!({
                    "BillingMode": "PAY_PER_REQUEST",
                    "LastUpdateToPayPerRequestDateTime": t.created_epoch_s,
                });
                table["ProvisionedThroughput"] = json!({
                    "NumberOfDecreasesToday": 0,
                    "ReadCapacityUnits": 0,
                    "WriteCapacityUnits": 0,
                });
            }
            Some(units) => {
                table["BillingModeSummary"] = json!({"BillingMode": "PROVISIONED"});
                table["ProvisionedThroughput"] = json!({
                    "NumberOfDecreasesToday": 0,
                    "ReadCapacityUnits": units,
                    "WriteCapacityUnits": units,
                });
            }
        }
        if t.stream_enabled {
            table["StreamSpecification"] =
                json!({"StreamEnabled": true, "StreamViewType": t.view_type.as_str()});
        }
        if let Some(arn) = &t.stream_arn {
            table["LatestStreamArn"] = json!(arn);
            table["LatestStreamLabel"] = json!(self.streams[arn].label);
        }
        Ok(json!({ "Table": table }))
    }

    /// DynamoDB `Scan`: one page of the table, or of one segment of a parallel scan.
    pub fn scan(&self, body: &Value) -> Result<ScanPage, ApiError> {
        let name = str_field(body, "TableName")?;
        for field in [
            "IndexName",
            "FilterExpression",
            "ProjectionExpression",
            "ScanFilter",
            "AttributesToGet",
            "ConditionalOperator",
            "ExpressionAttributeNames",
            "ExpressionAttributeValues",
        ] {
            if body.get(field).is_some_and(|v| !v.is_null()) {
                return Err(ApiError::validation(format!(
                    "the streams double does not implement Scan's {field}"
                )));
            }
        }
        match opt_str(body, "Select") {
            None | Some("ALL_ATTRIBUTES") => {}
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "the streams double does not implement Select {other}"
                )))
            }
        }
        let (segment, total) = scan_segment(body)?;
        let limit = match body.get("Limit") {
            None | Some(Value::Null) => SCAN_PAGE_ITEMS,
            Some(v) => match v.as_i64() {
                Some(n) if n >= 1 => usize::try_from(n).map_or(SCAN_PAGE_ITEMS, |n| n.min(SCAN_PAGE_ITEMS)),
                _ => {
                    return Err(ApiError::validation(format!(
                        "1 validation error detected: Value '{v}' at 'limit' failed to satisfy constraint: Member must have value greater than or equal to 1"
                    )))
                }
            },
        };
        let consistent = match body.get("ConsistentRead") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                ApiError::validation(format!("ConsistentRead must be a boolean, not {v}"))
            })?,
        };
        let report = match opt_str(body, "ReturnConsumedCapacity") {
            None | Some("NONE") => None,
            Some(r @ ("TOTAL" | "INDEXES")) => Some(r),
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "1 validation error detected: Value '{other}' at 'returnConsumedCapacity' failed to satisfy constraint: Member must satisfy enum value set: [INDEXES, TOTAL, NONE]"
                )))
            }
        };
        let t = self.tables.get(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "Requested resource not found: Table: {name} not found"
            ))
        })?;
        let start = match body.get("ExclusiveStartKey") {
            None | Some(Value::Null) => None,
            Some(esk) => {
                let invalid = || {
                    ApiError::validation(
                        "The provided starting key is invalid: The provided key element does not match the schema",
                    )
                };
                let obj = esk.as_object().ok_or_else(invalid)?;
                let (key, keys) = items::key_of(&t.key_schema, obj, true).ok_or_else(invalid)?;
                if keys.as_object().map(Map::len) != Some(obj.len()) {
                    return Err(invalid());
                }
                if items::segment_of_key(&key, total) != segment {
                    return Err(ApiError::validation(format!(
                        "The provided Exclusive start key does not map to the provided segment: Segment: {segment}, TotalSegments: {total}"
                    )));
                }
                Some(key)
            }
        };
        let mut page = t
            .items
            .page(&t.key_schema, segment, total, start.as_ref(), limit);
        page.units = t
            .scan_units_per_page
            .unwrap_or_else(|| items::read_units(page.bytes, consistent));
        page.consumed = report.map(|r| {
            let mut c = json!({"TableName": name, "CapacityUnits": page.units});
            if r == "INDEXES" {
                c["Table"] = json!({"CapacityUnits": page.units});
            }
            c
        });
        Ok(page)
    }

    pub fn list_streams(&self, body: &Value) -> Result<Value, ApiError> {
        let table = opt_str(body, "TableName");
        let limit = limit(body, 100, 100)?;
        let start = opt_str(body, "ExclusiveStartStreamArn");
        let mut matching = self
            .stream_order
            .iter()
            .map(|arn| &self.streams[arn])
            .filter(|s| table.is_none_or(|t| s.table == t));
        if let Some(start) = start {
            matching
                .by_ref()
                .take_while(|s| s.arn != start)
                .for_each(drop);
        }
        let mut page: Vec<&Stream> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        let streams: Vec<Value> = page
            .drain(..)
            .map(|s| json!({"StreamArn": s.arn, "TableName": s.table, "StreamLabel": s.label}))
            .collect();
        let mut out = json!({ "Streams": streams });
        if more {
            out["LastEvaluatedStreamArn"] = streams_last(&out);
        }
        Ok(out)
    }

    pub fn describe_stream(&self, body: &Value) -> Result<Value, ApiError> {
        let arn = str_field(body, "StreamArn")?;
        let limit = limit(body, 100, 100)?;
        let stream = self.streams.get(arn).ok_or_else(|| {
            ApiError::not_found(format!(
                "Requested resource not found: Stream: {arn} not found"
            ))
        })?;
        let start = opt_str(body, "ExclusiveStartShardId");
        let child_of = match body.get("ShardFilter") {
            None | Some(Value::Null) => None,
            Some(f) => {
                if f.get("Type").and_then(Value::as_str) != Some("CHILD_SHARDS") {
                    return Err(ApiError::validation(
                        "ShardFilter.Type must be CHILD_SHARDS",
                    ));
                }
                Some(str_field(f, "ShardId")?)
            }
        };
        let mut listed = stream
            .shards
            .iter()
            .map(|id| &self.shards[id])
            .filter(|s| !s.gone)
            .filter(|s| child_of.is_none_or(|p| s.parent.as_deref() == Some(p)))
            // Shard ids sort in creation order, so an id that is no longer listed still
            // marks a place.
            .filter(|s| start.is_none_or(|start| s.id.as_str() > start));
        let page: Vec<&Shard> = listed.by_ref().take(limit).collect();
        let more = listed.next().is_some();
        let shards: Vec<Value> = page
            .iter()
            .map(|s| {
                let mut range = json!({"StartingSequenceNumber": seq_text(s.start_seq)});
                if s.closed {
                    range["EndingSequenceNumber"] = json!(seq_text(s.last_seq));
                }
                let mut shard = json!({"ShardId": s.id, "SequenceNumberRange": range});
                if let Some(p) = &s.parent {
                    shard["ParentShardId"] = json!(p);
                }
                shard
            })
            .collect();
        let mut desc = json!({
            "StreamArn": stream.arn,
            "StreamLabel": stream.label,
            "StreamStatus": stream.status,
            "StreamViewType": stream.view_type.as_str(),
            "TableName": stream.table,
            "KeySchema": key_schema_json(&stream.key_schema),
            "CreationRequestDateTime": self.tables.get(&stream.table).map_or(0, |t| t.created_epoch_s),
            "Shards": shards,
        });
        if more {
            desc["LastEvaluatedShardId"] = json!(page.last().expect("a full page").id);
        }
        Ok(json!({ "StreamDescription": desc }))
    }

    fn listed_shard(&self, stream_arn: &str, shard_id: &str) -> Result<&Shard, ApiError> {
        if !self.streams.contains_key(stream_arn) {
            return Err(ApiError::not_found(format!(
                "Requested resource not found: Stream: {stream_arn} not found"
            )));
        }
        match self.shards.get(shard_id) {
            Some(s) if s.stream_arn == stream_arn && !s.gone => Ok(s),
            _ => Err(ApiError::not_found(format!(
                "Requested resource not found: Shard does not exist: {shard_id}"
            ))),
        }
    }

    pub fn get_shard_iterator(&self, body: &Value) -> Result<Value, ApiError> {
        let arn = str_field(body, "StreamArn")?;
        let shard_id = str_field(body, "ShardId")?;
        let kind = str_field(body, "ShardIteratorType")?;
        let shard = self.listed_shard(arn, shard_id)?;
        let seq = opt_str(body, "SequenceNumber").map(parse_seq).transpose()?;
        let needs_seq = || {
            seq.ok_or_else(|| {
                ApiError::validation(format!("SequenceNumber is required for {kind}"))
            })
        };
        let position = match kind {
            "TRIM_HORIZON" => shard.trim_before,
            "LATEST" => shard.last_seq + 1,
            "AT_SEQUENCE_NUMBER" => needs_seq()?,
            "AFTER_SEQUENCE_NUMBER" => needs_seq()? + 1,
            other => {
                return Err(ApiError::validation(format!(
                    "Invalid ShardIteratorType {other:?}"
                )))
            }
        };
        if let Some(seq) = seq.filter(|_| kind.ends_with("SEQUENCE_NUMBER")) {
            if position < shard.trim_before {
                return Err(ApiError::trimmed(format!(
                    "Attempted to access a sequence number ({seq}) that is beyond the trim horizon of shard {shard_id}"
                )));
            }
            if seq > shard.last_seq {
                return Err(ApiError::validation(format!(
                    "Invalid SequenceNumber {seq} for shard {shard_id}: beyond its last record"
                )));
            }
        }
        Ok(json!({ "ShardIterator": self.iterator(shard, position).encode() }))
    }

    fn iterator(&self, shard: &Shard, position: u128) -> Iterator {
        Iterator {
            generation: self.generation,
            issued_ms: self.now_ms(),
            position,
            shard_id: shard.id.clone(),
        }
    }

    pub fn get_records(
        &mut self,
        iterator: &Iterator,
        limit: usize,
        dry_run: bool,
    ) -> Result<Page, ApiError> {
        let expired = self.iterator_ttl.is_some_and(|ttl| {
            self.now_ms().saturating_sub(iterator.issued_ms) > ttl.as_millis() as u64
        });
        let shard = self.shards.get(&iterator.shard_id).ok_or_else(|| {
            ApiError::not_found(format!(
                "Requested resource not found: Shard does not exist: {}",
                iterator.shard_id
            ))
        })?;
        if expired
            || iterator.generation < self.valid_from_generation
            || iterator.generation < shard.valid_from_generation
        {
            return Err(ApiError::expired(
                "Iterator expired. The iterator was created at a time that is too old",
            ));
        }
        if shard.gone || iterator.position < shard.trim_before {
            return Err(ApiError::trimmed(format!(
                "The operation attempted to read past the oldest stream record in shard {}",
                shard.id
            )));
        }
        let mut pos = iterator.position;
        let mut page = Page {
            generated: None,
            stored: Vec::new(),
            count: 0,
            first_seq: None,
            last_seq: None,
            next_iterator: None,
        };
        let mut more = false;
        if let Some(g) = &shard.generated {
            let base = shard.start_seq + 1;
            let from = pos.saturating_sub(base) as u64;
            if from < g.count {
                let to = g.count.min(from + limit as u64);
                page.generated = Some((g.clone(), base, from, to));
                page.count = (to - from) as usize;
                page.first_seq = Some(base + u128::from(from));
                page.last_seq = Some(base + u128::from(to) - 1);
                pos = base + u128::from(to);
                more = to < g.count;
            }
        }
        let start = shard.records.partition_point(|r| r.seq < pos);
        let take = (limit - page.count).min(shard.records.len() - start);
        for r in &shard.records[start..start + take] {
            page.stored.push(r.json.clone());
            page.first_seq.get_or_insert(r.seq);
            page.last_seq = Some(r.seq);
            pos = r.seq + 1;
        }
        page.count += take;
        more |= start + take < shard.records.len();
        if shard.closed && !more {
            if !dry_run {
                let id = shard.id.clone();
                self.shard_mut(&id).drained = true;
            }
        } else {
            page.next_iterator = Some(self.iterator(shard, pos).encode());
        }
        Ok(page)
    }
}

fn key_schema_json(k: &KeySchema) -> Value {
    let mut out = vec![json!({"AttributeName": k.hash.name, "KeyType": "HASH"})];
    if let Some(r) = &k.range {
        out.push(json!({"AttributeName": r.name, "KeyType": "RANGE"}));
    }
    Value::Array(out)
}

fn streams_last(out: &Value) -> Value {
    out["Streams"]
        .as_array()
        .and_then(|a| a.last())
        .map_or(Value::Null, |s| s["StreamArn"].clone())
}

pub(super) fn str_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation(format!("1 validation error detected: Value null at '{name}' failed to satisfy constraint: Member must not be null")))
}

/// Scan's `Segment` and `TotalSegments` (`(0, 1)` when neither is given).
fn scan_segment(body: &Value) -> Result<(u32, u32), ApiError> {
    let int = |name: &str, field: &str, min: i64, max: i64| -> Result<Option<i64>, ApiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                Some(n) if n < min => Err(ApiError::validation(format!(
                    "1 validation error detected: Value '{n}' at '{field}' failed to satisfy constraint: Member must have value greater than or equal to {min}"
                ))),
                _ => Err(ApiError::validation(format!(
                    "1 validation error detected: Value '{v}' at '{field}' failed to satisfy constraint: Member must have value less than or equal to {max}"
                ))),
            },
        }
    };
    let segment = int("Segment", "segment", 0, 999_999)?;
    let total = int("TotalSegments", "totalSegments", 1, 1_000_000)?;
    match (segment, total) {
        (None, None) => Ok((0, 1)),
        (Some(_), None) => Err(ApiError::validation(
            "The TotalSegments parameter is required but was not present in the request when Segment parameter is present",
        )),
        (None, Some(_)) => Err(ApiError::validation(
            "The Segment parameter is required but was not present in the request when parameter TotalSegments is present",
        )),
        (Some(s), Some(t)) if s >= t => Err(ApiError::validation(format!(
            "The Segment parameter is zero-based and must be less than parameter TotalSegments: Segment: {s} is not less than TotalSegments: {t}"
        ))),
        (Some(s), Some(t)) => Ok((s as u32, t as u32)),
    }
}

pub(super) fn opt_str<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name).and_then(Value::as_str)
}

/// `Limit`, defaulting to `default`, 1..=`max`.
pub(super) fn limit(body: &Value, default: usize, max: usize) -> Result<usize, ApiError> {
    match body.get("Limit") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
            _ => Err(ApiError::validation(format!(
                "1 validation error detected: Value '{v}' at 'limit' failed to satisfy constraint: Member must have value between 1 and {max}"
            ))),
        },
    }
}
