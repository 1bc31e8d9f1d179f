//! Configuration: the JSON document given with `--config`.
//!
//! Every struct rejects unknown keys, every default lives in [`defaults`], and
//! [`Config::validate`] holds the cross-field checks. Errors name the key path
//! and what to write instead; `main` exits with status 2 on any of them before
//! touching the network.
//!
//! A few keys can be set from the environment ([`ENV_OVERRIDES`], e.g. from systemd's
//! `EnvironmentFile`): [`Config::load`] applies them over the document before
//! deserializing and validating it.

use std::ffi::OsString;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::ConfigError;

/// Every default value, in one place.
pub mod defaults {
    /// How long resolving the config's `${...}` references may take at start, in
    /// milliseconds (STS and Secrets Manager calls, with their retries).
    pub const SECRETS_RESOLVE_TIMEOUT_MS: u64 = 60_000;
    /// `aws.assume_role.session_name`.
    pub const SESSION_NAME: &str = "dynamodb-cdc";
    /// `aws.assume_role.first_hop.session_name`.
    pub const FIRST_HOP_SESSION_NAME: &str = "dynamodb-cdc-first-hop";
    /// `aws.assume_role.duration_seconds`.
    pub const DURATION_SECONDS: u32 = 3600;
    /// `aws.assume_role.refresh_before_expiry_seconds`.
    pub const REFRESH_BEFORE_EXPIRY_SECONDS: u32 = 300;
    /// `aws.request_timeout_ms`.
    pub const AWS_REQUEST_TIMEOUT_MS: u64 = 20_000;
    /// `kafka.topic_prefix`.
    pub const TOPIC_PREFIX: &str = "dynamodb.";
    /// `kafka.topic_template`.
    pub const TOPIC_TEMPLATE: &str = "{prefix}{table}";
    /// `tables.interval_seconds` of a rule: how often discovery lists the tables again.
    pub const DISCOVERY_INTERVAL_SECONDS: u64 = 300;
    /// `kafka.tombstones`.
    pub const TOMBSTONES: bool = true;
    /// `kafka.produce_timeout_ms`.
    pub const PRODUCE_TIMEOUT_MS: u64 = 30_000;
    /// `kafka.batch_max_records`.
    pub const BATCH_MAX_RECORDS: usize = 1000;
    /// `kafka.batch_max_bytes`.
    pub const BATCH_MAX_BYTES: usize = 900 * 1024;
    /// `kafka.max_message_bytes` (Kafka's default `message.max.bytes` is 1048588).
    pub const MAX_MESSAGE_BYTES: usize = 1_000_000;
    /// `kafka.max_buffered_bytes`: everything pages keep alive between GetRecords and
    /// Kafka's acknowledgement (response bodies, records, the producer's retry copies):
    /// about six full pages of small items in flight, the ten of the earlier, looser
    /// accounting (bench/).
    pub const MAX_BUFFERED_BYTES: usize = 32 * 1024 * 1024;
    /// `kafka.dead_letter_topic` is this after `kafka.topic_prefix`.
    pub const DEAD_LETTER_SUFFIX: &str = "dead_letter";
    /// `kafka.create_topics.partitions`.
    pub const PARTITIONS: u32 = 3;
    /// `kafka.create_topics.replication_factor`.
    pub const REPLICATION_FACTOR: u16 = 1;
    /// `snapshot.segments`: parallel Scan segments of one table.
    pub const SNAPSHOT_SEGMENTS: u32 = 4;
    /// Most `snapshot.segments` DynamoDB allows (TotalSegments).
    pub const SNAPSHOT_MAX_SEGMENTS: u32 = 1000;
    /// `snapshot.page_items`: Limit of one Scan call (a page also stops at 1 MB).
    pub const SNAPSHOT_PAGE_ITEMS: u32 = 1000;
    /// `snapshot.consistent_read`.
    pub const SNAPSHOT_CONSISTENT_READ: bool = false;
    /// The share of a provisioned table's read capacity a snapshot uses when
    /// `snapshot.max_read_units_per_second` is not set (Glue's and Confluent's default).
    pub const SNAPSHOT_PROVISIONED_SHARE: f64 = 0.5;
    /// `snapshot.scan_phase_seconds`: a `snapshot_cdc` scan pauses after this long for the
    /// stream to catch up.
    pub const SNAPSHOT_SCAN_PHASE_SECONDS: u64 = 3600;
    /// How often a running snapshot logs its progress, in milliseconds.
    pub const SNAPSHOT_PROGRESS_INTERVAL_MS: u64 = 5000;
    /// `reader.idle_poll_interval_ms`.
    pub const IDLE_POLL_INTERVAL_MS: u64 = 250;
    /// `reader.max_calls_per_second_per_shard`: DynamoDB Streams allows 5 GetRecords a
    /// second per shard.
    pub const MAX_CALLS_PER_SECOND_PER_SHARD: f64 = 5.0;
    /// Highest `reader.max_calls_per_second_per_shard` accepted (emulators, benchmarks).
    pub const MAX_CALLS_PER_SECOND_PER_SHARD_LIMIT: f64 = 1000.0;
    /// `reader.rescan_interval_ms`.
    pub const RESCAN_INTERVAL_MS: u64 = 30_000;
    /// `reader.max_inflight_pages`.
    pub const MAX_INFLIGHT_PAGES: usize = 4;
    /// `checkpoint.interval_ms`.
    pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
    /// `shutdown_timeout_ms`.
    pub const SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
    /// `health.max_stall_seconds`.
    pub const HEALTH_MAX_STALL_SECONDS: u64 = 120;
    /// Longest pause of an idle shard, as a multiple of `reader.idle_poll_interval_ms`
    /// (`shard_reader/pacing.rs`).
    pub const IDLE_PAUSE_CAP_FACTOR: u64 = 32;
    /// STS accepts session durations in this range (seconds).
    pub const MIN_DURATION_SECONDS: u32 = 900;
    /// Upper bound STS accepts for a role session.
    pub const MAX_DURATION_SECONDS: u32 = 43_200;
    /// Upper bound STS accepts for a chained role session.
    pub const MAX_CHAINED_DURATION_SECONDS: u32 = 3600;
}

/// Environment variables that override a key of the document (the variable wins over the
/// file, and the file may leave the key out): `(variable, key)`. An empty or invalid value
/// is a configuration error naming the variable.
///
/// - `DYNAMODB_CDC_AWS_REGION`: `aws.region`, e.g. `eu-west-1`.
/// - `DYNAMODB_CDC_AWS_ENDPOINT_URL`: `aws.endpoint_url`, an `http://` or `https://` URL.
/// - `DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS`: `kafka.bootstrap_servers`, comma-separated
///   `host:port` entries, e.g. `b1:9092,b2:9092`.
/// - `DYNAMODB_CDC_CHECKPOINT_DIR`: `checkpoint.dir`.
pub const ENV_OVERRIDES: [(&str, &str); 4] = [
    ("DYNAMODB_CDC_AWS_REGION", "aws.region"),
    ("DYNAMODB_CDC_AWS_ENDPOINT_URL", "aws.endpoint_url"),
    (
        "DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS",
        "kafka.bootstrap_servers",
    ),
    ("DYNAMODB_CDC_CHECKPOINT_DIR", "checkpoint.dir"),
];

/// The whole configuration document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach AWS and which identity to use.
    pub aws: AwsConfig,
    /// The tables to capture, each to its own topic: a list of `{"name": ...}` entries, a
    /// rule (`{"include": [...], "exclude": [...], "tags": {...}, "interval_seconds": N,
    /// "overrides": [...]}`), or a list mixing both. Read into [`Config::tables`] and
    /// [`Config::table_rules`].
    #[serde(rename = "tables")]
    table_spec: TableSpec,
    /// The tables listed by name, then (while the daemon runs) those its rules found.
    #[serde(skip)]
    pub tables: Vec<TableConfig>,
    /// The rules of `tables` (table discovery, [`crate::table_discovery`]).
    #[serde(skip)]
    pub table_rules: Vec<TableRule>,
    /// Where a brand-new pipeline starts reading shards that existed when it first started.
    #[serde(default)]
    pub start_position: StartPosition,
    /// What a brand-new pipeline captures of each table: `cdc` (changes only), `snapshot_cdc`
    /// (the items the table holds, then its changes), `snapshot` (the items once, then the
    /// process exits 0). `tables[].sync_mode` overrides it.
    #[serde(default)]
    pub sync_mode: SyncMode,
    /// How snapshots (initial loads) scan a table.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// The Kafka cluster and how records are produced.
    pub kafka: KafkaConfig,
    /// Where shard positions are kept.
    pub checkpoint: CheckpointConfig,
    /// Shard reading and discovery tuning.
    #[serde(default)]
    pub reader: ReaderConfig,
    /// Logging output.
    #[serde(default)]
    pub log: LogConfig,
    /// On SIGTERM/SIGINT: how long in-flight records may take to be acknowledged and
    /// checkpointed before the daemon exits anyway.
    #[serde(default = "shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// What to do when the stream no longer holds the records after a shard's checkpoint
    /// (the daemon fell more than 24 hours behind).
    #[serde(default)]
    pub on_trimmed_data: OnTrimmedData,
    /// What to do with a record that cannot be converted or is larger than
    /// `kafka.max_message_bytes`.
    #[serde(default)]
    pub on_poison_record: OnPoisonRecord,
    /// The HTTP endpoint for Prometheus and health checks; absent = no server.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// When `/healthz` (and systemd's watchdog) call the daemon stalled.
    #[serde(default)]
    pub health: HealthConfig,
    /// Not in the document: where `kafka.sasl.username` and `password` come from when they
    /// hold `${...}` references ([`crate::secrets::load_config`]), to read them again
    /// after Kafka refused a login.
    #[serde(skip)]
    pub sasl_templates: Option<crate::secrets::SaslTemplates>,
    /// Not in the document: how many references were resolved.
    #[serde(skip)]
    pub references: crate::secrets::ReferenceCounts,
}

/// `reader.get_records_client`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GetRecordsClient {
    /// Signed and sent on the SDK's own connections without its per-call machinery
    /// (`shard_reader/lean.rs`): about half the CPU a call.
    #[default]
    Lean,
    /// Every GetRecords through the AWS SDK's full request path.
    Sdk,
}

/// `on_trimmed_data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTrimmedData {
    /// Stop the table with an error naming the shard and the checkpoint; exit non-zero.
    #[default]
    Fail,
    /// Log an ERROR, put a `DATA_LOSS` marker record on every partition of the table's topic
    /// naming the shard and the lost range, and continue from TRIM_HORIZON.
    SkipToTrimHorizon,
    /// Like `skip_to_trim_horizon` (ERROR, `DATA_LOSS` marker), then load the table again
    /// (a snapshot, SNAPSHOT rows of every item) before streaming on from TRIM_HORIZON, so
    /// that what the lost changes did is in the topic again.
    Resnapshot,
}

/// `sync_mode` (and `tables[].sync_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// The stream only: changes made from `start_position` on.
    #[default]
    Cdc,
    /// Scan the table's items into the topic (SNAPSHOT rows), then stream the changes made
    /// since the scan started (1 s margin: a change made during the scan may appear twice,
    /// never zero times).
    SnapshotCdc,
    /// Scan the table's items once; the process exits 0 once every table is loaded.
    Snapshot,
}

impl SyncMode {
    /// The name as the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Cdc => "cdc",
            SyncMode::SnapshotCdc => "snapshot_cdc",
            SyncMode::Snapshot => "snapshot",
        }
    }
}

/// `snapshot`: how a table is scanned.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Parallel Scan segments per table (TotalSegments), 1 to 1000. Each segment is read
    /// by its own task and resumes from its own checkpoint.
    #[serde(default = "snapshot_segments")]
    pub segments: u32,
    /// Items asked for per Scan call (Limit), 1 to 1000; DynamoDB also ends a page at 1 MB.
    #[serde(default = "snapshot_page_items")]
    pub page_items: u32,
    /// Strongly consistent Scan (twice the read units); eventually consistent by default.
    #[serde(default = "snapshot_consistent_read")]
    pub consistent_read: bool,
    /// Read capacity units per second a table's snapshot may use, shared by its segments and
    /// measured from the ConsumedCapacity each Scan returns. Absent: no limit for on-demand
    /// tables, half of the read capacity of a provisioned table.
    #[serde(default)]
    pub max_read_units_per_second: Option<f64>,
    /// A `snapshot_cdc` scan pauses after this many seconds (its pages in flight finish),
    /// the stream catches up, then the scan goes on: the scan and the stream never run at
    /// once, and the hand-off position never ages out of the stream's 24 h retention
    /// however long the table takes to load.
    #[serde(default = "snapshot_scan_phase_seconds")]
    pub scan_phase_seconds: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            segments: defaults::SNAPSHOT_SEGMENTS,
            page_items: defaults::SNAPSHOT_PAGE_ITEMS,
            consistent_read: defaults::SNAPSHOT_CONSISTENT_READ,
            max_read_units_per_second: None,
            scan_phase_seconds: defaults::SNAPSHOT_SCAN_PHASE_SECONDS,
        }
    }
}

/// `on_poison_record`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoisonRecord {
    /// Stop the table with an error naming the shard and sequence number; exit non-zero.
    #[default]
    Fail,
    /// Write the raw record and the error to `kafka.dead_letter_topic`, then continue.
    DeadLetter,
}

/// `aws`: region, endpoint and identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region of the tables, e.g. `eu-west-1` (`DYNAMODB_CDC_AWS_REGION` overrides it).
    pub region: String,
    /// Endpoint override for every AWS service (LocalStack, moto): `http://127.0.0.1:4566`
    /// (`DYNAMODB_CDC_AWS_ENDPOINT_URL` overrides it). The SDK's `AWS_ENDPOINT_URL` from the
    /// environment applies when both are absent.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Assume this role for every DynamoDB call. Without it the default credential chain
    /// (environment, profile, instance role) is used directly.
    #[serde(default)]
    pub assume_role: Option<AssumeRoleConfig>,
    /// Timeout for one AWS request attempt, in milliseconds.
    #[serde(default = "aws_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// `aws.assume_role`: the role the daemon works under.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssumeRoleConfig {
    /// ARN of the role to assume, e.g. `arn:aws:iam::123456789012:role/cdc-reader`.
    pub role_arn: String,
    /// External ID the role's trust policy requires (a shared secret; never logged).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Role session name, visible in CloudTrail.
    #[serde(default = "session_name")]
    pub session_name: String,
    /// Requested session lifetime in seconds (900 to 43200; at most 3600 when chained).
    #[serde(default = "duration_seconds")]
    pub duration_seconds: u32,
    /// Refresh the session this many seconds before it expires.
    #[serde(default = "refresh_before_expiry_seconds")]
    pub refresh_before_expiry_seconds: u32,
    /// STS endpoint override; `aws.endpoint_url` applies when absent.
    #[serde(default)]
    pub sts_endpoint_url: Option<String>,
    /// Optional first role in a chain: the base credentials assume this role, which then
    /// assumes `role_arn`.
    #[serde(default)]
    pub first_hop: Option<FirstHopConfig>,
}

impl std::fmt::Debug for AssumeRoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssumeRoleConfig")
            .field("role_arn", &self.role_arn)
            .field(
                "external_id",
                &self.external_id.as_ref().map(|_| "** redacted **"),
            )
            .field("session_name", &self.session_name)
            .field("duration_seconds", &self.duration_seconds)
            .field(
                "refresh_before_expiry_seconds",
                &self.refresh_before_expiry_seconds,
            )
            .field("sts_endpoint_url", &self.sts_endpoint_url)
            .field("first_hop", &self.first_hop)
            .finish()
    }
}

/// `aws.assume_role.first_hop`: the intermediate role of a chain.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstHopConfig {
    /// ARN of the intermediate role.
    pub role_arn: String,
    /// External ID the intermediate role requires, if any (never logged).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Role session name of the intermediate session.
    #[serde(default = "first_hop_session_name")]
    pub session_name: String,
}

impl std::fmt::Debug for FirstHopConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstHopConfig")
            .field("role_arn", &self.role_arn)
            .field(
                "external_id",
                &self.external_id.as_ref().map(|_| "** redacted **"),
            )
            .field("session_name", &self.session_name)
            .finish()
    }
}

/// One entry of `tables`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// DynamoDB table name; its stream must be enabled.
    pub name: String,
    /// Topic override; default is `kafka.topic_template` for the table.
    #[serde(default)]
    pub topic: Option<String>,
    /// This table's `sync_mode` (default: the top-level one).
    #[serde(default)]
    pub sync_mode: Option<SyncMode>,
    /// This table's `start_position` (default: the top-level one).
    #[serde(default)]
    pub start_position: Option<StartPosition>,
    /// Found by a rule of `tables` rather than listed by name: when it is deleted, stops
    /// matching or fails, only this table stops.
    #[serde(skip)]
    pub discovered: bool,
}

/// A rule of `tables`: which tables of the account to capture, found by ListTables (every
/// page) and ListTagsOfResource, again every `interval_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// Patterns of the tables to capture: a whole-name glob (`*` any run, `?` one
    /// character: `"app-*"`, `"orders"`) or `"re:..."`, a regular expression (unanchored
    /// unless written with `^`/`$`).
    pub include: Vec<String>,
    /// Patterns of tables not to capture, even when an include matches (exclude wins).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Tags a table must carry, each with one of the listed values (an empty list: any
    /// value). Empty: tags are not read.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, Vec<String>>,
    /// How often the account's tables are listed again, in seconds.
    #[serde(default = "discovery_interval_seconds")]
    pub interval_seconds: u64,
    /// Per-table settings by pattern; the first whose `match` matches the table applies.
    #[serde(default)]
    pub overrides: Vec<TableOverride>,
    /// Where the rule is written (`tables`, `tables[2]`), for errors.
    #[serde(skip)]
    pub key: String,
}

impl TableRule {
    /// The compiled rule (validated by [`Config::validate`]).
    pub fn selection(&self) -> crate::selection::Selection {
        crate::selection::Selection::new(&self.include, &self.exclude, self.tags.clone())
            .expect("validated")
    }

    /// The first override matching `table`.
    pub fn override_for(&self, table: &str) -> Option<&TableOverride> {
        self.overrides.iter().find(|o| {
            crate::selection::Pattern::parse(&o.matches)
                .expect("validated")
                .matches(table)
        })
    }
}

/// One of a rule's `overrides`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableOverride {
    /// The tables it applies to: a glob or `re:` pattern, like `include`.
    #[serde(rename = "match")]
    pub matches: String,
    /// Their topic: a template with the placeholders of `kafka.topic_template`
    /// (`"app.{table}"`); default `kafka.topic_template`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Their `sync_mode` (default: the top-level one).
    #[serde(default)]
    pub sync_mode: Option<SyncMode>,
    /// Their `start_position` (default: the top-level one).
    #[serde(default)]
    pub start_position: Option<StartPosition>,
}

/// `tables` as written: entries by name and rules, in order.
#[derive(Debug, Clone, Default)]
struct TableSpec {
    named: Vec<TableConfig>,
    rules: Vec<TableRule>,
}

/// The prefix of the message of an error inside `tables` that carries its own key path
/// ([`parse_error`] moves it into the key).
const TABLES_KEY: &str = "tables";

impl<'de> Deserialize<'de> for TableSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        fn entry<T: serde::de::DeserializeOwned>(key: &str, value: Value) -> Result<T, String> {
            serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let key = if path.is_empty() || path == "." {
                    key.to_owned()
                } else {
                    format!("{key}.{path}")
                };
                format!("{key}: {}", e.into_inner())
            })
        }
        let mut spec = TableSpec::default();
        let mut add = |key: String, value: Value| -> Result<(), String> {
            let has = |k: &str| value.as_object().is_some_and(|o| o.contains_key(k));
            if has("name") {
                spec.named.push(entry(&key, value)?);
            } else if has("include") || has("exclude") || has("tags") {
                let mut rule: TableRule = entry(&key, value)?;
                rule.key = key;
                spec.rules.push(rule);
            } else {
                return Err(format!(
                    "{key}: write a table as {{\"name\": \"orders\"}} or a rule as {{\"include\": [\"app-*\"]}}"
                ));
            }
            Ok(())
        };
        match Value::deserialize(deserializer)? {
            Value::Array(list) => {
                for (i, value) in list.into_iter().enumerate() {
                    add(format!("{TABLES_KEY}[{i}]"), value).map_err(D::Error::custom)?;
                }
            }
            value @ Value::Object(_) => add(TABLES_KEY.to_owned(), value).map_err(D::Error::custom)?,
            _ => {
                return Err(D::Error::custom(format!(
                    "{TABLES_KEY}: write a list of tables ([{{\"name\": \"orders\"}}]), a rule ({{\"include\": [\"app-*\"]}}) or a list mixing both"
                )))
            }
        }
        Ok(spec)
    }
}

/// `start_position`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The oldest record the stream still holds (up to 24 h back).
    #[default]
    TrimHorizon,
    /// Only changes made after the pipeline first started.
    Latest,
    /// `{ "at_timestamp": "2026-11-30T12:00:00Z" }` (RFC 3339): changes made at or after
    /// this time. DynamoDB Streams has no such iterator: the shards are read from
    /// TRIM_HORIZON and records created before the time are skipped (records carry whole
    /// seconds, so one of the same second is kept). A time older than the stream's 24 h
    /// retention is a WARN: everything the stream still holds is delivered.
    AtTimestamp(chrono::DateTime<chrono::Utc>),
}

/// `kafka`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers as `host:port` (`DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS`,
    /// comma-separated, overrides them).
    pub bootstrap_servers: Vec<String>,
    /// Topic name prefix, the `{prefix}` of `kafka.topic_template`.
    #[serde(default = "topic_prefix")]
    pub topic_prefix: String,
    /// A table's topic unless it sets `topic`: `{prefix}` (`kafka.topic_prefix`),
    /// `{table}`, `{region}` (`aws.region`), `{account}` (the account of
    /// `aws.assume_role.role_arn`). Characters Kafka forbids become `_`; a name over 249
    /// characters is cut and ends in a hash ([`crate::topic_name`]).
    #[serde(default = "topic_template")]
    pub topic_template: String,
    /// Create missing topics with these settings; without it a missing topic is an error.
    #[serde(default)]
    pub create_topics: Option<CreateTopicsConfig>,
    /// After a REMOVE event, also produce a record with the same key and a null value.
    #[serde(default = "tombstones")]
    pub tombstones: bool,
    /// Batch compression.
    #[serde(default)]
    pub compression: Compression,
    /// How long one produce request may take before it is retried, in milliseconds.
    #[serde(default = "produce_timeout_ms")]
    pub produce_timeout_ms: u64,
    /// Most records in one produce request to a partition.
    #[serde(default = "batch_max_records")]
    pub batch_max_records: NonZeroUsize,
    /// Most bytes (keys, values, headers) in one produce request to a partition; keep it
    /// under the broker's `message.max.bytes`.
    #[serde(default = "batch_max_bytes")]
    pub batch_max_bytes: NonZeroUsize,
    /// Largest record (key, value and headers) the daemon produces; a bigger change event is
    /// a poison record (see `on_poison_record`). Keep it under the topic's `max.message.bytes`.
    #[serde(default = "max_message_bytes")]
    pub max_message_bytes: NonZeroUsize,
    /// Most memory (in bytes) that pages of all shards may keep alive (response bodies,
    /// converted records, retry copies) while they wait for Kafka; a shard reserves its
    /// next page's share before reading it and waits while the budget is spent. Bounds the
    /// daemon's memory whatever the number of shards with a backlog.
    #[serde(default = "max_buffered_bytes")]
    pub max_buffered_bytes: NonZeroUsize,
    /// Topic for poison records when `on_poison_record` is `dead_letter`; default
    /// `kafka.topic_prefix` + `dead_letter`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// TLS to the brokers; absent = plaintext. `{}` = TLS with the system's root
    /// certificates.
    #[serde(default)]
    pub tls: Option<KafkaTlsConfig>,
    /// SASL authentication; absent = none.
    #[serde(default)]
    pub sasl: Option<KafkaSaslConfig>,
}

/// `kafka.tls`. The broker's certificate is always verified (there is no option to skip it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTlsConfig {
    /// PEM file of CA certificates trusted in addition to the system's root certificates
    /// (a private CA, or the one of a self-managed cluster).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain) for mutual TLS; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1); needs
    /// `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the brokers' certificates must carry; default: the host connected to (as
    /// given in `bootstrap_servers` or advertised by the cluster).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `kafka.sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// SASL/PLAIN (Confluent Cloud API keys); use it over TLS only.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// Amazon MSK IAM: an OAUTHBEARER token presigned with the role's credentials.
    #[serde(rename = "AWS_MSK_IAM")]
    AwsMskIam,
}

impl SaslMechanism {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::AwsMskIam => "AWS_MSK_IAM",
        }
    }
}

impl std::fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `kafka.sasl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `AWS_MSK_IAM`.
    pub mechanism: SaslMechanism,
    /// User name (API key) for PLAIN and SCRAM.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (API secret) for PLAIN and SCRAM; usually a `${secretsmanager:...}`
    /// reference. Never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// AWS_MSK_IAM: the cluster's region; default `aws.region`.
    #[serde(default)]
    pub region: Option<String>,
    /// AWS_MSK_IAM: sign with this role instead of `aws.assume_role` (assumed with the base
    /// credentials and refreshed the same way).
    #[serde(default)]
    pub role_arn: Option<String>,
    /// AWS_MSK_IAM: the external ID `role_arn`'s trust policy requires, if any (never
    /// logged).
    #[serde(default)]
    pub external_id: Option<Secret>,
}

/// A string that must never be printed: `Debug` and `Display` show `** redacted **`; the
/// value is read with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("** redacted **")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("** redacted **")
    }
}

/// `kafka.create_topics`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopicsConfig {
    /// Partition count of a created topic.
    #[serde(default = "partitions")]
    pub partitions: NonZeroU32,
    /// Replication factor of a created topic.
    #[serde(default = "replication_factor")]
    pub replication_factor: NonZeroU16,
}

/// `kafka.compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// LZ4.
    Lz4,
    /// Snappy.
    Snappy,
    /// Zstandard.
    Zstd,
}

/// `checkpoint`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory of checkpoint files, created (owner-only) if missing. One directory per
    /// pipeline: two daemons must never share one (`DYNAMODB_CDC_CHECKPOINT_DIR` overrides
    /// it).
    pub dir: PathBuf,
    /// Shortest time between two checkpoint writes of one shard while records flow, in
    /// milliseconds. A shard's position is also written when it ends and on shutdown, so a
    /// crash re-sends at most this much (plus what was in flight).
    #[serde(default = "checkpoint_interval_ms")]
    pub interval_ms: u64,
}

/// `metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port of the HTTP server for `/metrics` (Prometheus text format),
    /// `/healthz` and `/readyz`, e.g. `"127.0.0.1:9464"`. Absent: no server. It has no
    /// authentication: bind it to localhost or a private interface.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `/healthz` answers 503 (and systemd's watchdog pings stop) when, for longer than
    /// this, a shard being read completed no GetRecords call, an acknowledged page was not
    /// checkpointed, or Kafka accepted no produce or metadata request; also when the
    /// assumed-role session expired.
    #[serde(default = "health_max_stall_seconds")]
    pub max_stall_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            max_stall_seconds: defaults::HEALTH_MAX_STALL_SECONDS,
        }
    }
}

/// `reader`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    /// GetRecords calls a shard may start per second (DynamoDB Streams allows 5 per shard,
    /// shared by every reader of the stream). While a shard flows the next call starts
    /// 1/this after the previous one started (200 ms), after a full page (a backlog) at
    /// once, but never more than this many (whole, at most 5) within a second's worth of
    /// calls (`shard_reader/pacing.rs`). A second reader on the same stream (another
    /// consumer, a Lambda trigger, global tables version 2017 replication): halve it (2.5).
    /// 0 < value <= 1000; above 5 only for emulators and benchmarks.
    #[serde(default = "max_calls_per_second_per_shard")]
    pub max_calls_per_second_per_shard: f64,
    /// How GetRecords is sent: `lean` (default) signs it (SigV4) and sends it on the SDK's
    /// own connection pool, endpoint, credentials and clock-skew handling, without the
    /// SDK's per-call orchestration (about half the CPU of a call: what idle shards pay);
    /// `sdk` sends every call through the AWS SDK's full request path. Errors, retries and
    /// the records delivered are the same either way; `sdk` is the fallback should an
    /// endpoint need something the lean path does not do (then it is also chosen by itself).
    #[serde(default)]
    pub get_records_client: GetRecordsClient,
    /// Pause before the next GetRecords after an empty page, in milliseconds (a page with
    /// records resets it). After further empty pages the pause doubles from there, up to
    /// 1/30 of the time since the shard's last records and at most 32 × this (8 s at the
    /// default, after 4 minutes of silence), with ±10% jitter on pauses longer than this
    /// (`shard_reader/pacing.rs`).
    #[serde(default = "idle_poll_interval_ms")]
    pub idle_poll_interval_ms: u64,
    /// How often each stream is listed again to find new shards, in milliseconds (a shard
    /// that ends also triggers a listing).
    #[serde(default = "rescan_interval_ms")]
    pub rescan_interval_ms: u64,
    /// GetRecords pages of one shard that may wait for Kafka acknowledgement at once. A
    /// page's size follows its records: the first GetRecords asks for 250 records, later ones
    /// for as many as make about 2 MB of converted records at the last page's record size
    /// (1 to 1000). Memory of all shards together is bounded by `kafka.max_buffered_bytes`.
    #[serde(default = "max_inflight_pages")]
    pub max_inflight_pages: NonZeroUsize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            max_calls_per_second_per_shard: defaults::MAX_CALLS_PER_SECOND_PER_SHARD,
            get_records_client: GetRecordsClient::default(),
            idle_poll_interval_ms: defaults::IDLE_POLL_INTERVAL_MS,
            rescan_interval_ms: defaults::RESCAN_INTERVAL_MS,
            max_inflight_pages: max_inflight_pages(),
        }
    }
}

/// `log`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for a terminal, `json` for journald and log shippers. The level comes from
    /// `RUST_LOG` (default `info`).
    #[serde(default)]
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

fn session_name() -> String {
    defaults::SESSION_NAME.to_owned()
}
fn first_hop_session_name() -> String {
    defaults::FIRST_HOP_SESSION_NAME.to_owned()
}
fn duration_seconds() -> u32 {
    defaults::DURATION_SECONDS
}
fn refresh_before_expiry_seconds() -> u32 {
    defaults::REFRESH_BEFORE_EXPIRY_SECONDS
}
fn aws_request_timeout_ms() -> u64 {
    defaults::AWS_REQUEST_TIMEOUT_MS
}
fn topic_prefix() -> String {
    defaults::TOPIC_PREFIX.to_owned()
}
fn topic_template() -> String {
    defaults::TOPIC_TEMPLATE.to_owned()
}
fn discovery_interval_seconds() -> u64 {
    defaults::DISCOVERY_INTERVAL_SECONDS
}
fn tombstones() -> bool {
    defaults::TOMBSTONES
}
fn produce_timeout_ms() -> u64 {
    defaults::PRODUCE_TIMEOUT_MS
}
fn batch_max_records() -> NonZeroUsize {
    NonZeroUsize::new(defaults::BATCH_MAX_RECORDS).expect("non-zero default")
}
fn batch_max_bytes() -> NonZeroUsize {
    NonZeroUsize::new(defaults::BATCH_MAX_BYTES).expect("non-zero default")
}
fn max_message_bytes() -> NonZeroUsize {
    NonZeroUsize::new(defaults::MAX_MESSAGE_BYTES).expect("non-zero default")
}
fn max_buffered_bytes() -> NonZeroUsize {
    NonZeroUsize::new(defaults::MAX_BUFFERED_BYTES).expect("non-zero default")
}
fn partitions() -> NonZeroU32 {
    NonZeroU32::new(defaults::PARTITIONS).expect("non-zero default")
}
fn replication_factor() -> NonZeroU16 {
    NonZeroU16::new(defaults::REPLICATION_FACTOR).expect("non-zero default")
}
fn max_calls_per_second_per_shard() -> f64 {
    defaults::MAX_CALLS_PER_SECOND_PER_SHARD
}
fn idle_poll_interval_ms() -> u64 {
    defaults::IDLE_POLL_INTERVAL_MS
}
fn rescan_interval_ms() -> u64 {
    defaults::RESCAN_INTERVAL_MS
}
fn max_inflight_pages() -> NonZeroUsize {
    NonZeroUsize::new(defaults::MAX_INFLIGHT_PAGES).expect("non-zero default")
}
fn snapshot_segments() -> u32 {
    defaults::SNAPSHOT_SEGMENTS
}
fn snapshot_page_items() -> u32 {
    defaults::SNAPSHOT_PAGE_ITEMS
}
fn snapshot_scan_phase_seconds() -> u64 {
    defaults::SNAPSHOT_SCAN_PHASE_SECONDS
}
fn snapshot_consistent_read() -> bool {
    defaults::SNAPSHOT_CONSISTENT_READ
}
fn checkpoint_interval_ms() -> u64 {
    defaults::CHECKPOINT_INTERVAL_MS
}
fn shutdown_timeout_ms() -> u64 {
    defaults::SHUTDOWN_TIMEOUT_MS
}
fn health_max_stall_seconds() -> u64 {
    defaults::HEALTH_MAX_STALL_SECONDS
}

/// The [`ENV_OVERRIDES`] that `env` sets, as (key path, value).
fn env_overrides(
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<(&'static str, Value)>, ConfigError> {
    let mut overrides = Vec::new();
    for (variable, key) in ENV_OVERRIDES {
        if let Some(raw) = env(variable) {
            overrides.push((key, env_value(variable, key, raw)?));
        }
    }
    Ok(overrides)
}

impl Config {
    /// Reads a config file, applies the process environment's [`ENV_OVERRIDES`], then
    /// parses and validates it. `${...}` references stay as written: the daemon loads its
    /// config with [`crate::secrets::load_config`], which resolves them.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(&text, |variable| std::env::var_os(variable))
    }

    /// Parses and validates a config document (no environment overrides).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, |_| None)
    }

    /// Parses a config document, applies [`ENV_OVERRIDES`] as `env` gives them (`None`:
    /// not set), and validates the result. Without overrides the document is read straight
    /// from the text (errors say the line and column, a repeated key is rejected); with
    /// them, from the document with the overrides set in it.
    pub fn parse_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let overrides = env_overrides(env)?;
        if overrides.is_empty() {
            let config: Config =
                serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                    .map_err(parse_error)?;
            let config = config.split_tables();
            config.validate()?;
            return Ok(config);
        }
        Self::from_document(Self::with_overrides(text, overrides)?)
    }

    /// The config document as JSON, with [`ENV_OVERRIDES`] as `env` gives them set in it
    /// (before `${...}` references are resolved, [`crate::secrets`]).
    pub fn document_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Value, ConfigError> {
        Self::with_overrides(text, env_overrides(env)?)
    }

    fn with_overrides(text: &str, overrides: Vec<(&str, Value)>) -> Result<Value, ConfigError> {
        let mut document: Value = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: "(document)".to_owned(),
            message: e.to_string(),
        })?;
        for (key, value) in overrides {
            set_key(&mut document, key, value);
        }
        Ok(document)
    }

    /// Deserializes and validates a config document.
    pub fn from_document(document: Value) -> Result<Self, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(document).map_err(parse_error)?;
        let config = config.split_tables();
        config.validate()?;
        Ok(config)
    }

    /// `tables` as written, into [`Config::tables`] and [`Config::table_rules`].
    fn split_tables(mut self) -> Self {
        let spec = std::mem::take(&mut self.table_spec);
        self.tables = spec.named;
        self.table_rules = spec.rules;
        self
    }

    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message,
            })
        };
        if self.aws.region.trim().is_empty() {
            return invalid(
                "aws.region",
                "must name a region, e.g. \"us-east-1\"".into(),
            );
        }
        for (key, url) in [
            ("aws.endpoint_url", self.aws.endpoint_url.as_deref()),
            (
                "aws.assume_role.sts_endpoint_url",
                self.aws
                    .assume_role
                    .as_ref()
                    .and_then(|r| r.sts_endpoint_url.as_deref()),
            ),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid(
                        key,
                        format!("{url:?} is not a URL; write e.g. \"http://127.0.0.1:4566\""),
                    );
                }
            }
        }
        if self.aws.request_timeout_ms == 0 {
            return invalid("aws.request_timeout_ms", "must be at least 1".into());
        }
        if let Some(role) = &self.aws.assume_role {
            if !role.role_arn.starts_with("arn:") {
                return invalid(
                    "aws.assume_role.role_arn",
                    format!(
                        "{:?} is not a role ARN; write e.g. \"arn:aws:iam::123456789012:role/cdc\"",
                        role.role_arn
                    ),
                );
            }
            if role.session_name.is_empty() || role.session_name.len() > 64 {
                return invalid(
                    "aws.assume_role.session_name",
                    "must be 1 to 64 characters".into(),
                );
            }
            let max = if role.first_hop.is_some() {
                defaults::MAX_CHAINED_DURATION_SECONDS
            } else {
                defaults::MAX_DURATION_SECONDS
            };
            if role.duration_seconds < defaults::MIN_DURATION_SECONDS || role.duration_seconds > max
            {
                let why = if role.first_hop.is_some() {
                    " (STS caps a chained role session at one hour)"
                } else {
                    ""
                };
                return invalid(
                    "aws.assume_role.duration_seconds",
                    format!(
                        "{} is out of range: write a value from {} to {max}{why}",
                        role.duration_seconds,
                        defaults::MIN_DURATION_SECONDS
                    ),
                );
            }
            if role.refresh_before_expiry_seconds >= role.duration_seconds {
                return invalid(
                    "aws.assume_role.refresh_before_expiry_seconds",
                    format!(
                        "{} must be less than aws.assume_role.duration_seconds ({})",
                        role.refresh_before_expiry_seconds, role.duration_seconds
                    ),
                );
            }
            if let Some(hop) = &role.first_hop {
                if !hop.role_arn.starts_with("arn:") {
                    return invalid(
                        "aws.assume_role.first_hop.role_arn",
                        format!("{:?} is not a role ARN", hop.role_arn),
                    );
                }
            }
        }
        if self.tables.is_empty() && self.table_rules.is_empty() {
            return invalid(
                "tables",
                "list at least one table ([{\"name\": \"orders\"}]) or a rule ({\"include\": [\"app-*\"]})".into(),
            );
        }
        if let Err(e) = self.topic_name_for("example", &self.kafka.topic_template) {
            return invalid("kafka.topic_template", e);
        }
        for rule in &self.table_rules {
            if let Err(e) =
                crate::selection::Selection::new(&rule.include, &rule.exclude, rule.tags.clone())
            {
                let (sub, message) = e.split_once(": ").unwrap_or(("include", &e));
                return invalid(&format!("{}.{sub}", rule.key), message.to_owned());
            }
            if rule.interval_seconds == 0 {
                return invalid(
                    &format!("{}.interval_seconds", rule.key),
                    "must be at least 1 (seconds between two listings of the tables)".into(),
                );
            }
            for (i, o) in rule.overrides.iter().enumerate() {
                let key = format!("{}.overrides[{i}]", rule.key);
                if let Err(e) = crate::selection::Pattern::parse(&o.matches) {
                    return invalid(&format!("{key}.match"), e);
                }
                if let Some(topic) = &o.topic {
                    if let Err(e) = self.topic_name_for("example", topic) {
                        return invalid(&format!("{key}.topic"), e);
                    }
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut topics = std::collections::HashSet::new();
        for (i, table) in self.tables.iter().enumerate() {
            let key = format!("tables[{i}].name");
            if !valid_table_name(&table.name) {
                return invalid(
                    &key,
                    format!(
                        "{:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ . -)",
                        table.name
                    ),
                );
            }
            if !names.insert(table.name.as_str()) {
                return invalid(&key, format!("{:?} is listed twice", table.name));
            }
            let topic = self.topic_for(table);
            if !valid_topic_name(&topic) {
                return invalid(
                    &format!("tables[{i}].topic"),
                    format!("{topic:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"),
                );
            }
            if !topics.insert(topic.clone()) {
                return invalid(
                    &format!("tables[{i}].topic"),
                    format!("topic {topic:?} is used by two tables; give each its own"),
                );
            }
        }
        let named: Vec<(String, String)> = self
            .tables
            .iter()
            .map(|t| (t.name.clone(), self.topic_for(t)))
            .collect();
        if let Some((first, second, topic)) = crate::topic_name::collisions(&named).first() {
            return invalid(
                "tables",
                format!(
                    "tables {first} and {second} map to topics that collide ({topic:?}; Kafka treats . and _ alike): give one its own topic"
                ),
            );
        }
        let snapshot = &self.snapshot;
        if !(1..=defaults::SNAPSHOT_MAX_SEGMENTS).contains(&snapshot.segments) {
            return invalid(
                "snapshot.segments",
                format!(
                    "{} is out of range: write 1 to {} (DynamoDB's TotalSegments)",
                    snapshot.segments,
                    defaults::SNAPSHOT_MAX_SEGMENTS
                ),
            );
        }
        if !(1..=1000).contains(&snapshot.page_items) {
            return invalid(
                "snapshot.page_items",
                format!(
                    "{} is out of range: write 1 to 1000 (a page also ends at 1 MB)",
                    snapshot.page_items
                ),
            );
        }
        if snapshot.scan_phase_seconds == 0 || snapshot.scan_phase_seconds > 20 * 3600 {
            return invalid(
                "snapshot.scan_phase_seconds",
                format!(
                    "{} is out of range: write 1 to 72000 (20 h, within the stream's 24 h retention)",
                    snapshot.scan_phase_seconds
                ),
            );
        }
        if let Some(units) = snapshot.max_read_units_per_second {
            if !(units.is_finite() && units > 0.0) {
                return invalid(
                    "snapshot.max_read_units_per_second",
                    format!("{units} is not a positive number of read units per second; leave it out for the default"),
                );
            }
        }
        if self.on_poison_record == OnPoisonRecord::DeadLetter {
            let dlq = self.dead_letter_topic();
            if !valid_topic_name(&dlq) {
                return invalid(
                    "kafka.dead_letter_topic",
                    format!("{dlq:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"),
                );
            }
            if topics.contains(&dlq) {
                return invalid(
                    "kafka.dead_letter_topic",
                    format!("{dlq:?} is also a table's topic; give dead letters their own topic"),
                );
            }
        }
        if self.kafka.bootstrap_servers.is_empty() {
            return invalid(
                "kafka.bootstrap_servers",
                "list at least one broker: [\"127.0.0.1:9092\"]".into(),
            );
        }
        for (i, server) in self.kafka.bootstrap_servers.iter().enumerate() {
            if !valid_host_port(server) {
                return invalid(
                    &format!("kafka.bootstrap_servers[{i}]"),
                    format!("{server:?} is not host:port, e.g. \"127.0.0.1:9092\""),
                );
            }
        }
        self.validate_kafka_security()?;
        if self.kafka.produce_timeout_ms == 0 {
            return invalid("kafka.produce_timeout_ms", "must be at least 1".into());
        }
        let calls = self.reader.max_calls_per_second_per_shard;
        if !(calls > 0.0 && calls <= defaults::MAX_CALLS_PER_SECOND_PER_SHARD_LIMIT) {
            return invalid(
                "reader.max_calls_per_second_per_shard",
                format!(
                    "must be above 0 and at most {}; DynamoDB Streams allows 5 (2.5 when a \
                     second reader shares the stream)",
                    defaults::MAX_CALLS_PER_SECOND_PER_SHARD_LIMIT
                ),
            );
        }
        if self.reader.idle_poll_interval_ms == 0 {
            return invalid(
                "reader.idle_poll_interval_ms",
                "must be at least 1 (polling without a pause would burn a core)".into(),
            );
        }
        if self.reader.rescan_interval_ms < 1000 {
            return invalid(
                "reader.rescan_interval_ms",
                "must be at least 1000 (DescribeStream is limited to 10 calls a second)".into(),
            );
        }
        if self.checkpoint.dir.as_os_str().is_empty() {
            return invalid(
                "checkpoint.dir",
                "must name a directory, e.g. \"/var/lib/dynamodb-cdc\"".into(),
            );
        }
        // A healthy shard may legitimately be silent for its longest idle pause plus one
        // GetRecords, and a page may wait a checkpoint interval.
        let busy_ms = self.poll_overdue_ms().max(self.checkpoint.interval_ms);
        if self.health.max_stall_seconds.saturating_mul(1000) <= busy_ms {
            return invalid(
                "health.max_stall_seconds",
                format!(
                    "{} is too short: a healthy shard may go {} ms between GetRecords answers \
                     ({} x reader.idle_poll_interval_ms + aws.request_timeout_ms) or between \
                     checkpoints; write more than {}",
                    self.health.max_stall_seconds,
                    busy_ms,
                    defaults::IDLE_PAUSE_CAP_FACTOR,
                    busy_ms / 1000
                ),
            );
        }
        Ok(())
    }

    /// How long a healthy shard may go without a completed GetRecords: its longest idle
    /// pause plus one request timeout. Past that, its silence counts as lag.
    pub fn poll_overdue_ms(&self) -> u64 {
        self.reader
            .idle_poll_interval_ms
            .saturating_mul(defaults::IDLE_PAUSE_CAP_FACTOR)
            .saturating_add(self.aws.request_timeout_ms)
    }

    /// `kafka.tls` and `kafka.sasl`.
    fn validate_kafka_security(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                message,
            })
        };
        if let Some(tls) = &self.kafka.tls {
            match (&tls.cert_file, &tls.key_file) {
                (Some(_), None) => {
                    return invalid(
                        "kafka.tls.key_file",
                        "missing: mutual TLS needs the private key of kafka.tls.cert_file".into(),
                    )
                }
                (None, Some(_)) => {
                    return invalid(
                        "kafka.tls.cert_file",
                        "missing: mutual TLS needs the certificate of kafka.tls.key_file".into(),
                    )
                }
                _ => {}
            }
            for (key, file) in [
                ("kafka.tls.ca_file", &tls.ca_file),
                ("kafka.tls.cert_file", &tls.cert_file),
                ("kafka.tls.key_file", &tls.key_file),
            ] {
                if file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                    return invalid(key, "must name a PEM file, or be left out".into());
                }
            }
            if let Some(name) = &tls.server_name {
                if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return invalid(
                        "kafka.tls.server_name",
                        format!("{name:?} is not a DNS name or IP address"),
                    );
                }
            }
        }
        let Some(sasl) = &self.kafka.sasl else {
            return Ok(());
        };
        let mechanism = sasl.mechanism;
        match mechanism {
            SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
                if sasl.username.as_deref().is_none_or(str::is_empty) {
                    return invalid(
                        "kafka.sasl.username",
                        format!("{mechanism} needs a user name (the API key)"),
                    );
                }
                if sasl.password.as_ref().is_none_or(|p| p.expose().is_empty()) {
                    return invalid(
                        "kafka.sasl.password",
                        format!(
                            "{mechanism} needs a password, e.g. \"${{secretsmanager:prod/kafka#password}}\""
                        ),
                    );
                }
                for (key, set) in [
                    ("kafka.sasl.region", sasl.region.is_some()),
                    ("kafka.sasl.role_arn", sasl.role_arn.is_some()),
                    ("kafka.sasl.external_id", sasl.external_id.is_some()),
                ] {
                    if set {
                        return invalid(
                            key,
                            format!("applies to AWS_MSK_IAM only, not {mechanism}"),
                        );
                    }
                }
            }
            SaslMechanism::AwsMskIam => {
                for (key, set) in [
                    ("kafka.sasl.username", sasl.username.is_some()),
                    ("kafka.sasl.password", sasl.password.is_some()),
                ] {
                    if set {
                        return invalid(
                            key,
                            "AWS_MSK_IAM signs with the role's credentials; remove it".into(),
                        );
                    }
                }
                if sasl.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
                    return invalid(
                        "kafka.sasl.region",
                        "must name a region, or be left out for aws.region".into(),
                    );
                }
                if let Some(arn) = &sasl.role_arn {
                    if !arn.starts_with("arn:") {
                        return invalid(
                            "kafka.sasl.role_arn",
                            format!("{arn:?} is not a role ARN; write e.g. \"arn:aws:iam::123456789012:role/msk-writer\""),
                        );
                    }
                } else if sasl.external_id.is_some() {
                    return invalid(
                        "kafka.sasl.external_id",
                        "applies to kafka.sasl.role_arn, which is not set".into(),
                    );
                }
                if self.kafka.tls.is_none() {
                    return invalid(
                        "kafka.tls",
                        "AWS_MSK_IAM needs TLS (MSK's IAM listener, port 9098): add \"tls\": {}"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.kafka.dead_letter_topic.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                self.kafka.topic_prefix,
                defaults::DEAD_LETTER_SUFFIX
            )
        })
    }

    /// The table's sync mode: its own `sync_mode`, else the top-level one.
    pub fn sync_mode_for(&self, table: &str) -> SyncMode {
        self.tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.sync_mode)
            .unwrap_or(self.sync_mode)
    }

    /// The table may be scanned by the pipeline (a snapshot sync mode, or
    /// `on_trimmed_data: resnapshot`): its role needs `dynamodb:Scan`.
    pub fn scans(&self, table: &str) -> bool {
        self.sync_mode_for(table) != SyncMode::Cdc
            || self.on_trimmed_data == OnTrimmedData::Resnapshot
    }

    /// Every table only loads its items (`sync_mode: snapshot`): the process exits once
    /// they are loaded.
    pub fn loads_only(&self) -> bool {
        // A rule's tables too, those it finds later included (none found yet is not "all
        // loaded").
        let rules_load_only = self.table_rules.is_empty()
            || (self.sync_mode == SyncMode::Snapshot
                && self.table_rules.iter().all(|r| {
                    r.overrides
                        .iter()
                        .all(|o| o.sync_mode.is_none_or(|m| m == SyncMode::Snapshot))
                }));
        rules_load_only
            && self
                .tables
                .iter()
                .all(|t| self.sync_mode_for(&t.name) == SyncMode::Snapshot)
    }

    /// The Kafka topic a table's changes go to: its `topic`, else `kafka.topic_template`'s.
    pub fn topic_for(&self, table: &TableConfig) -> String {
        table.topic.clone().unwrap_or_else(|| {
            self.topic_name_for(&table.name, &self.kafka.topic_template)
                .expect("validated template")
        })
    }

    /// The topic `template` names for `table` ([`crate::topic_name`]).
    pub fn topic_name_for(&self, table: &str, template: &str) -> Result<String, String> {
        let account = self.account();
        if template.contains("{account}") && account.is_none() {
            return Err(format!(
                "{template:?} uses {{account}}, which is read from aws.assume_role.role_arn: set that role, or drop {{account}}"
            ));
        }
        crate::topic_name::topic_name(
            template,
            crate::topic_name::Names {
                prefix: &self.kafka.topic_prefix,
                table,
                region: &self.aws.region,
                account: account.unwrap_or_default(),
            },
        )
    }

    /// The tables' account: the one of `aws.assume_role.role_arn`.
    pub fn account(&self) -> Option<&str> {
        let role = self.aws.assume_role.as_ref()?;
        role.role_arn.split(':').nth(4).filter(|a| !a.is_empty())
    }

    /// The table's start position: its own `start_position`, else the top-level one.
    pub fn start_position_for(&self, table: &str) -> StartPosition {
        self.tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.start_position)
            .unwrap_or(self.start_position)
    }

    /// The shortest `interval_seconds` of the rules (`None`: no rules).
    pub fn discovery_interval(&self) -> Option<std::time::Duration> {
        self.table_rules
            .iter()
            .map(|r| r.interval_seconds)
            .min()
            .map(std::time::Duration::from_secs)
    }
}

fn parse_error(e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = e.path().to_string();
    let message = e.inner().to_string();
    // An error inside `tables` names its own key (TableSpec's entries).
    if path == TABLES_KEY && message.starts_with(TABLES_KEY) {
        if let Some((key, message)) = message.split_once(": ") {
            return ConfigError::Parse {
                path: key.to_owned(),
                message: message.to_owned(),
            };
        }
    }
    ConfigError::Parse {
        path: if path.is_empty() || path == "." {
            "(document)".to_owned()
        } else {
            path
        },
        message: e.into_inner().to_string(),
    }
}

/// The JSON value an override variable sets its key to; errors name the variable.
fn env_value(variable: &str, key: &str, raw: OsString) -> Result<Value, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: format!("{key} (from environment variable {variable})"),
        message,
    };
    let text = raw
        .into_string()
        .map_err(|_| invalid("is not valid UTF-8".into()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(
            "is set but empty: give it a value or unset it".into(),
        ));
    }
    match key {
        "aws.region" => {
            if !text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(invalid(format!(
                    "{text:?} is not a region name; write e.g. \"eu-west-1\""
                )));
            }
            Ok(text.into())
        }
        "aws.endpoint_url" => {
            let rest = text
                .strip_prefix("http://")
                .or_else(|| text.strip_prefix("https://"));
            if rest.is_none_or(str::is_empty) {
                return Err(invalid(format!(
                    "{text:?} is not a URL; write e.g. \"http://127.0.0.1:4566\""
                )));
            }
            Ok(text.into())
        }
        "kafka.bootstrap_servers" => {
            let servers: Vec<&str> = text.split(',').map(str::trim).collect();
            if let Some((i, server)) = servers
                .iter()
                .enumerate()
                .find(|(_, s)| !valid_host_port(s))
            {
                return Err(invalid(format!(
                    "entry {} ({server:?}) is not host:port; write e.g. \
                     \"b1:9092,b2:9092\"",
                    i + 1
                )));
            }
            Ok(servers.into())
        }
        _ => Ok(text.into()),
    }
}

/// Sets `key` (dotted path) in `document`, creating the objects on the way; leaves the
/// document as it is where something on the way is not an object, for deserialization to
/// report.
fn set_key(document: &mut Value, key: &str, value: Value) {
    let mut at = document;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Object(map) = at else { return };
        if parts.peek().is_none() {
            map.insert(part.to_owned(), value);
            return;
        }
        at = map
            .entry(part)
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
}

fn valid_host_port(server: &str) -> bool {
    server
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
        "aws": {"region": "us-east-1"},
        "tables": [{"name": "orders"}],
        "kafka": {"bootstrap_servers": ["127.0.0.1:9092"]},
        "checkpoint": {"dir": "/tmp/cdc"}
    }"#;

    fn with(patch: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        patch(&mut v);
        v.to_string()
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    /// `tables` as a rule, or a list mixing names and rules; errors name the entry's key.
    #[test]
    fn tables_take_rules_and_names() {
        let c = Config::parse(&with(|v| {
            v["tables"] = serde_json::json!({"include": ["app-*"], "tags": {"env": ["prod"]}});
        }))
        .unwrap();
        assert!(c.tables.is_empty());
        assert_eq!(c.table_rules.len(), 1);
        assert_eq!(c.table_rules[0].interval_seconds, 300);
        assert_eq!(c.table_rules[0].key, "tables");
        assert_eq!(
            c.discovery_interval(),
            Some(std::time::Duration::from_secs(300))
        );
        let c = Config::parse(&with(|v| {
            v["tables"] = serde_json::json!([
                {"name": "orders", "start_position": "latest"},
                {"include": ["re:^svc_(a|b)$"], "exclude": ["*-tmp"], "interval_seconds": 30,
                 "overrides": [{"match": "svc_a", "topic": "svc.{table}", "sync_mode": "snapshot_cdc",
                                "start_position": "latest"}]},
            ]);
        }))
        .unwrap();
        assert_eq!(c.tables.len(), 1);
        assert_eq!(c.start_position_for("orders"), StartPosition::Latest);
        assert_eq!(c.start_position_for("other"), StartPosition::TrimHorizon);
        let rule = &c.table_rules[0];
        assert_eq!(rule.key, "tables[1]");
        assert!(rule.selection().selects_name("svc_a") && !rule.selection().selects_name("svc_c"));
        let o = rule.override_for("svc_a").unwrap();
        assert_eq!(o.sync_mode, Some(SyncMode::SnapshotCdc));
        assert!(rule.override_for("svc_b").is_none());
        assert_eq!(
            c.discovery_interval(),
            Some(std::time::Duration::from_secs(30))
        );
        // A rule that may find cdc tables never "only loads", even before it found any.
        assert!(!c.loads_only());
        let rule_only = |top: &str, over: &str| {
            Config::parse(&with(|v| {
                v["sync_mode"] = top.into();
                v["tables"] = serde_json::json!({"include": ["*"],
                    "overrides": [{"match": "a*", "sync_mode": over}]});
            }))
            .unwrap()
            .loads_only()
        };
        assert!(rule_only("snapshot", "snapshot"));
        assert!(!rule_only("snapshot", "cdc"));
        assert!(!rule_only("cdc", "snapshot"));

        for (patch, key, says) in [
            (
                serde_json::json!([{"name": "orders"}, {"include": ["re:("]}]),
                "tables[1].include[0]",
                "regular expression",
            ),
            (
                serde_json::json!({"include": []}),
                "tables.include",
                "at least one pattern",
            ),
            (
                serde_json::json!({"include": ["a"], "exclude": [""]}),
                "tables.exclude[0]",
                "empty pattern",
            ),
            (
                serde_json::json!({"incude": ["a"], "tags": {}}),
                "tables",
                "incude",
            ),
            (
                serde_json::json!([{"name": "orders", "topc": "x"}]),
                "tables[0]",
                "topc",
            ),
            (
                serde_json::json!([{"nam": "orders"}]),
                "tables[0]",
                "write a table as",
            ),
            (
                serde_json::json!("orders"),
                "tables",
                "write a list of tables",
            ),
            (
                serde_json::json!({"include": ["a"], "interval_seconds": 0}),
                "tables.interval_seconds",
                "at least 1",
            ),
            (
                serde_json::json!({"include": ["a"], "overrides": [{"match": "re:["}]}),
                "tables.overrides[0].match",
                "regular expression",
            ),
            (
                serde_json::json!({"include": ["a"], "overrides": [{"match": "a", "topic": "{tabel}"}]}),
                "tables.overrides[0].topic",
                "{tabel}",
            ),
            (
                serde_json::json!({"include": ["a"], "overrides": [{"match": "a", "color": 1}]}),
                "tables.overrides[0]",
                "color",
            ),
            (serde_json::json!([]), "tables", "at least one table"),
        ] {
            let e = err(&with(|v| v["tables"] = patch.clone()));
            assert!(
                e.starts_with(&format!("config key {key}:"))
                    || e.starts_with(&format!("config key {key}.")),
                "{patch}: {e}"
            );
            assert!(e.contains(says), "{patch}: {e}");
        }
    }

    /// `kafka.topic_template`: the default keeps `topic_prefix` + table, placeholders, the
    /// account from the role, and named tables whose topics collide are refused.
    #[test]
    fn topic_template_names_topics() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.kafka.topic_template, "{prefix}{table}");
        assert_eq!(c.topic_for(&c.tables[0]), "dynamodb.orders");
        let c = Config::parse(&with(|v| {
            v["kafka"]["topic_template"] = "cdc.{region}.{account}.{table}".into();
            v["aws"]["assume_role"] =
                serde_json::json!({"role_arn": "arn:aws:iam::123456789012:role/r"});
        }))
        .unwrap();
        assert_eq!(
            c.topic_for(&c.tables[0]),
            format!("cdc.{}.123456789012.orders", c.aws.region)
        );
        let e = err(&with(|v| {
            v["kafka"]["topic_template"] = "{account}.{table}".into()
        }));
        assert!(
            e.contains("kafka.topic_template") && e.contains("aws.assume_role.role_arn"),
            "{e}"
        );
        let e = err(&with(|v| v["kafka"]["topic_template"] = "{tbl}".into()));
        assert!(
            e.contains("kafka.topic_template") && e.contains("{tbl}"),
            "{e}"
        );
        let e = err(&with(|v| {
            v["tables"] = serde_json::json!([{"name": "a.b_c"}, {"name": "a_b.c"}]);
        }));
        assert!(
            e.contains("config key tables:") && e.contains("collide"),
            "{e}"
        );
    }

    /// `metrics` and `health`: defaults, a valid address, and a stall limit shorter than a
    /// quiet shard's longest silence rejected with the fix.
    #[test]
    fn metrics_and_health_settings() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.metrics.listen, None);
        assert_eq!(c.health.max_stall_seconds, 120);
        let c = Config::parse(&with(|v| {
            v["metrics"] = serde_json::json!({"listen": "127.0.0.1:9464"});
        }))
        .unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let e = err(&with(|v| {
            v["metrics"] = serde_json::json!({"listen": "localhost"});
        }));
        assert!(e.contains("metrics.listen"), "{e}");
        let e = err(&with(|v| {
            v["health"] = serde_json::json!({"max_stall_seconds": 20});
        }));
        assert!(
            e.contains("health.max_stall_seconds") && e.contains("write more than 28"),
            "{e}"
        );
        let e = err(&with(|v| {
            v["health"] = serde_json::json!({"max_stall": 200});
        }));
        assert!(e.contains("max_stall"), "{e}");
    }

    #[test]
    fn kafka_security_settings_parse_and_the_password_never_prints() {
        let c = Config::parse(&with(|v| {
            v["kafka"]["tls"] = serde_json::json!({"ca_file": "/etc/ca.pem", "server_name": "b.internal"});
            v["kafka"]["sasl"] = serde_json::json!({"mechanism": "SCRAM-SHA-512", "username": "cdc", "password": "hunter2-secret"});
        }))
        .unwrap();
        let sasl = c.kafka.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(sasl.password.as_ref().unwrap().expose(), "hunter2-secret");
        assert_eq!(
            c.kafka.tls.as_ref().unwrap().server_name.as_deref(),
            Some("b.internal")
        );
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("ScramSha512"), "{debug}");

        let msk = Config::parse(&with(|v| {
            v["kafka"]["tls"] = serde_json::json!({});
            v["kafka"]["sasl"] =
                serde_json::json!({"mechanism": "AWS_MSK_IAM", "region": "eu-west-1"});
        }))
        .unwrap();
        assert_eq!(msk.kafka.sasl.unwrap().mechanism, SaslMechanism::AwsMskIam);
    }

    #[test]
    fn kafka_security_mistakes_name_the_key_and_the_fix() {
        let cases: [(serde_json::Value, serde_json::Value, &str); 7] = [
            (
                serde_json::Value::Null,
                serde_json::json!({"mechanism": "PLAIN", "password": "p"}),
                "config key kafka.sasl.username:",
            ),
            (
                serde_json::Value::Null,
                serde_json::json!({"mechanism": "SCRAM-SHA-256", "username": "u"}),
                "config key kafka.sasl.password:",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"mechanism": "PLAIN", "username": "u", "password": "p", "region": "x"}),
                "config key kafka.sasl.region: applies to AWS_MSK_IAM only",
            ),
            (
                serde_json::Value::Null,
                serde_json::json!({"mechanism": "AWS_MSK_IAM"}),
                "config key kafka.tls: AWS_MSK_IAM needs TLS",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"mechanism": "AWS_MSK_IAM", "password": "p"}),
                "config key kafka.sasl.password: AWS_MSK_IAM signs",
            ),
            (
                serde_json::json!({"cert_file": "/c.pem"}),
                serde_json::Value::Null,
                "config key kafka.tls.key_file: missing",
            ),
            (
                serde_json::json!({"server_name": "not a name!"}),
                serde_json::Value::Null,
                "config key kafka.tls.server_name:",
            ),
        ];
        for (tls, sasl, expected) in cases {
            let text = with(|v| {
                if !tls.is_null() {
                    v["kafka"]["tls"] = tls.clone();
                }
                if !sasl.is_null() {
                    v["kafka"]["sasl"] = sasl.clone();
                }
            });
            let e = err(&text);
            assert!(e.starts_with(expected), "{e}");
        }
        let e = err(&with(|v| {
            v["kafka"]["sasl"] = serde_json::json!({"mechanism": "GSSAPI", "username": "u"});
        }));
        assert!(e.contains("kafka.sasl.mechanism"), "{e}");
        let e = err(&with(|v| {
            v["kafka"]["tls"] = serde_json::json!({"insecure_skip_verify": true});
        }));
        assert!(e.contains("insecure_skip_verify"), "{e}");
    }

    #[test]
    fn minimal_document_gets_every_default() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.start_position, StartPosition::TrimHorizon);
        assert_eq!(c.kafka.topic_prefix, "dynamodb.");
        assert!(c.kafka.tombstones);
        assert_eq!(c.kafka.compression, Compression::None);
        assert!(c.kafka.create_topics.is_none());
        assert_eq!(c.reader.idle_poll_interval_ms, 250);
        assert_eq!(c.reader.rescan_interval_ms, 30_000);
        assert_eq!(c.reader.max_inflight_pages.get(), 4);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.shutdown_timeout_ms, 30_000);
        assert_eq!(c.checkpoint.interval_ms, 1000);
        assert_eq!(c.on_trimmed_data, OnTrimmedData::Fail);
        assert_eq!(c.on_poison_record, OnPoisonRecord::Fail);
        assert_eq!(c.kafka.max_message_bytes.get(), 1_000_000);
        assert_eq!(c.kafka.max_buffered_bytes.get(), 32 * 1024 * 1024);
        assert_eq!(c.dead_letter_topic(), "dynamodb.dead_letter");
        assert!(c.aws.assume_role.is_none());
        assert_eq!(c.topic_for(&c.tables[0]), "dynamodb.orders");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config.example.json");
        let c = Config::parse(text).unwrap();
        let role = c.aws.assume_role.unwrap();
        assert_eq!(role.session_name, "dynamodb-cdc");
        assert_eq!(role.duration_seconds, 3600);
        assert_eq!(role.refresh_before_expiry_seconds, 300);
    }

    #[test]
    fn assume_role_defaults_and_overrides() {
        let c = Config::parse(&with(|v| {
            v["aws"]["assume_role"] = serde_json::json!({
                "role_arn": "arn:aws:iam::123456789012:role/r",
                "external_id": "s3cret"
            });
            v["tables"][0]["topic"] = "custom".into();
            v["kafka"]["create_topics"] = serde_json::json!({});
            v["kafka"]["compression"] = "zstd".into();
            v["start_position"] = "latest".into();
            v["log"] = serde_json::json!({"format": "json"});
        }))
        .unwrap();
        let role = c.aws.assume_role.as_ref().unwrap();
        assert_eq!(role.session_name, "dynamodb-cdc");
        assert_eq!(role.duration_seconds, 3600);
        assert_eq!(role.refresh_before_expiry_seconds, 300);
        assert!(!format!("{role:?}").contains("s3cret"));
        assert_eq!(c.topic_for(&c.tables[0]), "custom");
        let ct = c.kafka.create_topics.unwrap();
        assert_eq!((ct.partitions.get(), ct.replication_factor.get()), (3, 1));
        assert_eq!(c.kafka.compression, Compression::Zstd);
        assert_eq!(c.start_position, StartPosition::Latest);
        assert_eq!(c.log.format, LogFormat::Json);
        let c = Config::parse(&with(|v| {
            v["start_position"] = serde_json::json!({"at_timestamp": "2026-11-30T13:00:00+01:00"})
        }))
        .unwrap();
        let StartPosition::AtTimestamp(at) = c.start_position else {
            panic!("{:?}", c.start_position)
        };
        assert_eq!(at.to_rfc3339(), "2026-11-30T12:00:00+00:00");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let e = err(&with(|v| v["kafka"]["bootstrap"] = "x".into()));
        assert!(
            e.contains("kafka") && e.contains("unknown field `bootstrap`"),
            "{e}"
        );
        let e = err(&with(|v| v["extra"] = 1.into()));
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = err(&with(|v| v["tables"][0]["nme"] = "x".into()));
        assert!(e.contains("tables[0]") && e.contains("nme"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_name_the_key() {
        let e = err(&with(|v| v["start_position"] = "earliest".into()));
        assert!(
            e.contains("start_position") && e.contains("trim_horizon"),
            "{e}"
        );
        let e = err(&with(|v| {
            v["start_position"] = serde_json::json!({"at_timestamp": "yesterday"})
        }));
        assert!(e.contains("start_position"), "{e}");
        let e = err(&with(|v| v["kafka"]["compression"] = "brotli".into()));
        assert!(e.contains("kafka.compression"), "{e}");
        let e = err(&with(|v| v["kafka"]["batch_max_records"] = 0.into()));
        assert!(e.contains("kafka.batch_max_records"), "{e}");
        let e = err(&with(|v| v["kafka"]["max_buffered_bytes"] = 0.into()));
        assert!(e.contains("kafka.max_buffered_bytes"), "{e}");
        let e = err(&with(|v| {
            v["reader"] = serde_json::json!({"idle_poll_interval_ms": "fast"})
        }));
        assert!(e.contains("reader.idle_poll_interval_ms"), "{e}");
        let e = err(&with(|v| v["log"] = serde_json::json!({"format": "xml"})));
        assert!(e.contains("log.format"), "{e}");
        assert!(err("{").contains("config"));
        let e = err(&with(|v| {
            v.as_object_mut().unwrap().remove("checkpoint");
        }));
        assert!(e.contains("missing field `checkpoint`"), "{e}");
    }

    #[test]
    fn cross_field_rejections() {
        type Patch = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Patch, &str)> = vec![
            (Box::new(|v| v["aws"]["region"] = "".into()), "aws.region"),
            (
                Box::new(|v| v["aws"]["endpoint_url"] = "localhost:4566".into()),
                "aws.endpoint_url",
            ),
            (Box::new(|v| v["tables"] = serde_json::json!([])), "tables"),
            (
                Box::new(|v| v["tables"][0]["name"] = "a b".into()),
                "tables[0].name",
            ),
            (
                Box::new(|v| v["tables"] = serde_json::json!([{"name": "abc"}, {"name": "abc"}])),
                "tables[1].name",
            ),
            (
                Box::new(
                    |v| v["tables"] = serde_json::json!([{"name": "abc", "topic": "t"}, {"name": "abd", "topic": "t"}]),
                ),
                "tables[1].topic",
            ),
            (
                Box::new(|v| v["tables"][0]["topic"] = "a/b".into()),
                "tables[0].topic",
            ),
            (
                Box::new(|v| v["kafka"]["bootstrap_servers"] = serde_json::json!([])),
                "kafka.bootstrap_servers",
            ),
            (
                Box::new(|v| v["kafka"]["bootstrap_servers"] = serde_json::json!(["nohost"])),
                "kafka.bootstrap_servers[0]",
            ),
            (
                Box::new(|v| v["kafka"]["produce_timeout_ms"] = 0.into()),
                "kafka.produce_timeout_ms",
            ),
            (
                Box::new(|v| v["reader"] = serde_json::json!({"idle_poll_interval_ms": 0})),
                "reader.idle_poll_interval_ms",
            ),
            (
                Box::new(|v| {
                    v["reader"] = serde_json::json!({"max_calls_per_second_per_shard": 0})
                }),
                "reader.max_calls_per_second_per_shard",
            ),
            (
                Box::new(|v| {
                    v["reader"] = serde_json::json!({"max_calls_per_second_per_shard": 5000})
                }),
                "reader.max_calls_per_second_per_shard",
            ),
            (
                Box::new(|v| v["reader"] = serde_json::json!({"rescan_interval_ms": 10})),
                "reader.rescan_interval_ms",
            ),
            (
                Box::new(|v| v["checkpoint"]["dir"] = "".into()),
                "checkpoint.dir",
            ),
            (
                Box::new(|v| v["aws"]["assume_role"] = serde_json::json!({"role_arn": "cdc"})),
                "aws.assume_role.role_arn",
            ),
            (
                Box::new(
                    |v| v["aws"]["assume_role"] = serde_json::json!({"role_arn": "arn:aws:iam::1:role/r", "duration_seconds": 60}),
                ),
                "aws.assume_role.duration_seconds",
            ),
            (
                Box::new(|v| {
                    v["aws"]["assume_role"] = serde_json::json!({
                        "role_arn": "arn:aws:iam::1:role/r",
                        "duration_seconds": 1000,
                        "refresh_before_expiry_seconds": 1000
                    })
                }),
                "aws.assume_role.refresh_before_expiry_seconds",
            ),
            (
                Box::new(|v| {
                    v["aws"]["assume_role"] = serde_json::json!({
                        "role_arn": "arn:aws:iam::1:role/r",
                        "sts_endpoint_url": "sts"
                    })
                }),
                "aws.assume_role.sts_endpoint_url",
            ),
        ];
        for (patch, key) in cases {
            let e = err(&with(patch));
            assert!(e.contains(key), "expected {key} in {e}");
        }
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: std::collections::HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_fill_missing_keys() {
        let env = env_of(&[
            ("DYNAMODB_CDC_AWS_REGION", "eu-west-1"),
            ("DYNAMODB_CDC_AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
            ("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", " b1:9092, b2:9093 "),
            ("DYNAMODB_CDC_CHECKPOINT_DIR", "/var/lib/dynamodb-cdc"),
            // Not an override: ignored.
            ("AWS_REGION", "us-west-2"),
            ("KAFKA_BOOTSTRAP", "x:1"),
        ]);
        let c = Config::parse_with_env(MINIMAL, &env).unwrap();
        assert_eq!(c.aws.region, "eu-west-1");
        assert_eq!(c.aws.endpoint_url.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.kafka.bootstrap_servers, ["b1:9092", "b2:9093"]);
        assert_eq!(c.checkpoint.dir, Path::new("/var/lib/dynamodb-cdc"));
        // The file may leave an overridden key out.
        let without = with(|v| {
            v["aws"].as_object_mut().unwrap().remove("region");
            v.as_object_mut().unwrap().remove("checkpoint");
            v["kafka"]
                .as_object_mut()
                .unwrap()
                .remove("bootstrap_servers");
        });
        let c = Config::parse_with_env(&without, &env).unwrap();
        assert_eq!(c.aws.region, "eu-west-1");
        assert_eq!(c.kafka.bootstrap_servers, ["b1:9092", "b2:9093"]);
        assert_eq!(c.checkpoint.interval_ms, 1000);
        // Without the variables: the file, and a missing key is still an error.
        let c = Config::parse_with_env(MINIMAL, env_of(&[])).unwrap();
        assert_eq!(c.aws.region, "us-east-1");
        assert!(Config::parse(&without).is_err());
    }

    #[test]
    fn empty_or_invalid_environment_overrides_name_the_variable() {
        for (variable, value) in [
            ("DYNAMODB_CDC_AWS_REGION", ""),
            ("DYNAMODB_CDC_AWS_REGION", "  "),
            ("DYNAMODB_CDC_AWS_REGION", "eu west 1"),
            ("DYNAMODB_CDC_AWS_ENDPOINT_URL", ""),
            ("DYNAMODB_CDC_AWS_ENDPOINT_URL", "localhost:4566"),
            ("DYNAMODB_CDC_AWS_ENDPOINT_URL", "http://"),
            ("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", ""),
            ("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", "b1:9092,"),
            ("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", "b1:9092,nohost"),
            ("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", "b1:99999"),
            ("DYNAMODB_CDC_CHECKPOINT_DIR", ""),
        ] {
            let e = Config::parse_with_env(MINIMAL, env_of(&[(variable, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(variable), "{variable}={value:?}: {e}");
        }
        let e = Config::parse_with_env(
            MINIMAL,
            env_of(&[("DYNAMODB_CDC_KAFKA_BOOTSTRAP_SERVERS", "b1:9092,nohost")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kafka.bootstrap_servers") && e.contains("entry 2"),
            "{e}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let e = Config::parse_with_env(MINIMAL, |k| {
                (k == "DYNAMODB_CDC_CHECKPOINT_DIR").then(|| OsString::from_vec(vec![0xff]))
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("DYNAMODB_CDC_CHECKPOINT_DIR") && e.contains("UTF-8"),
                "{e}"
            );
        }
        // A document whose section is not an object still gets the type error.
        let e = Config::parse_with_env(
            &with(|v| v["aws"] = 5.into()),
            env_of(&[("DYNAMODB_CDC_AWS_REGION", "eu-west-1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("aws"), "{e}");
    }

    #[test]
    fn the_unit_file_and_readme_document_exactly_the_overrides() {
        let unit = include_str!("../systemd/dynamodb-cdc.service");
        let readme = include_str!("../README.md");
        for (variable, key) in ENV_OVERRIDES {
            assert!(unit.contains(&format!("{variable}=")), "{variable}");
            assert!(
                readme.contains(&format!("| `{variable}` | `{key}` |")),
                "{variable}"
            );
        }
        let named = |text: &str| {
            text.match_indices("DYNAMODB_CDC_")
                .map(|(i, _)| {
                    text[i..]
                        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect::<std::collections::BTreeSet<_>>()
        };
        let known: std::collections::BTreeSet<String> =
            ENV_OVERRIDES.iter().map(|(v, _)| v.to_string()).collect();
        assert_eq!(named(unit), known);
        // Variables the daemon does not read are not offered as overrides.
        assert!(!unit.contains("KAFKA_BOOTSTRAP,") && !unit.contains("overrides (AWS_REGION"));
    }

    #[test]
    fn chained_role_duration_over_an_hour_is_rejected() {
        let e = err(&with(|v| {
            v["aws"]["assume_role"] = serde_json::json!({
                "role_arn": "arn:aws:iam::1:role/target",
                "duration_seconds": 7200,
                "first_hop": {"role_arn": "arn:aws:iam::1:role/hop"}
            })
        }));
        assert!(
            e.contains("aws.assume_role.duration_seconds") && e.contains("chained"),
            "{e}"
        );
        // The same duration without a chain is fine.
        Config::parse(&with(|v| {
            v["aws"]["assume_role"] = serde_json::json!({
                "role_arn": "arn:aws:iam::1:role/target",
                "duration_seconds": 7200
            })
        }))
        .unwrap();
    }

    #[test]
    fn sync_mode_and_snapshot_settings() {
        let mut doc: Value = serde_json::from_str(MINIMAL).unwrap();
        doc["sync_mode"] = "snapshot_cdc".into();
        doc["tables"] =
            serde_json::json!([{"name": "orders"}, {"name": "users", "sync_mode": "cdc"}]);
        doc["snapshot"] = serde_json::json!({"segments": 16, "max_read_units_per_second": 250});
        let c = Config::parse(&doc.to_string()).unwrap();
        assert_eq!(c.sync_mode_for("orders"), SyncMode::SnapshotCdc);
        assert_eq!(c.sync_mode_for("users"), SyncMode::Cdc);
        assert!(!c.loads_only());
        assert_eq!(c.snapshot.segments, 16);
        assert_eq!(c.snapshot.page_items, defaults::SNAPSHOT_PAGE_ITEMS);
        assert!(!c.snapshot.consistent_read);
        assert_eq!(c.snapshot.max_read_units_per_second, Some(250.0));
        doc["sync_mode"] = "snapshot".into();
        doc["tables"] = serde_json::json!([{"name": "orders"}]);
        assert!(Config::parse(&doc.to_string()).unwrap().loads_only());
        let d = Config::parse(MINIMAL).unwrap();
        assert_eq!(d.sync_mode_for("orders"), SyncMode::Cdc);
        assert_eq!(d.snapshot, SnapshotConfig::default());
        for (key, value, needle) in [
            ("segments", serde_json::json!(0), "snapshot.segments"),
            ("segments", serde_json::json!(1001), "snapshot.segments"),
            ("page_items", serde_json::json!(0), "snapshot.page_items"),
            (
                "max_read_units_per_second",
                serde_json::json!(-1),
                "snapshot.max_read_units_per_second",
            ),
            ("segment", serde_json::json!(4), "segment"),
        ] {
            let mut bad = doc.clone();
            bad["snapshot"] = serde_json::json!({ key: value });
            let e = Config::parse(&bad.to_string()).unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
        }
        let mut bad = doc.clone();
        bad["sync_mode"] = "full".into();
        let e = Config::parse(&bad.to_string()).unwrap_err().to_string();
        assert!(e.contains("sync_mode") && e.contains("snapshot_cdc"), "{e}");
    }
}
