//! Checkpoints: the position of every shard, moved only to what Kafka acknowledged.
//!
//! [`CheckpointStore`] is the seam; [`FileStore`] keeps one small JSON file per shard under
//! `checkpoint.dir`, written atomically (write, fsync, rename, fsync the directory) and
//! readable only by the daemon's user.

mod file;

pub use file::FileStore;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Where a shard stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardCheckpoint {
    /// The stream the shard belongs to.
    pub stream_arn: String,
    /// The shard.
    pub shard_id: String,
    /// Every record up to and including this sequence number was acknowledged by Kafka.
    /// `None` for a shard that ended without holding any record.
    pub sequence_number: Option<String>,
    /// The shard is closed and was read to its end: its children may be read.
    pub ended: bool,
    /// When this checkpoint was written, in milliseconds since the epoch.
    pub updated_at_ms: i64,
    /// Without `sequence_number`: the shard is read from TRIM_HORIZON skipping records
    /// created before this (ms since the epoch). Written when a re-snapshot replaced the
    /// shard's trimmed records (`on_trimmed_data: resnapshot`). Absent from the file
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_since_ms: Option<i64>,
}

/// What the pipeline remembers about a table across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableState {
    /// The stream being read when this state was first written.
    pub stream_arn: String,
    /// Shards listed when the pipeline first started on that stream: only these may start
    /// at `start_position: latest`; every later shard starts at TRIM_HORIZON.
    pub initial_shards: Vec<String>,
    /// When the pipeline first started on this stream, in milliseconds since the epoch.
    pub created_at_ms: i64,
    /// Set once the table has a newer stream: `stream_arn` is being drained (read to its
    /// end) and this stream is read next. A restart finishes the drain before anything else;
    /// the drain ends when the state of the next stream is saved. Absent from the file
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_stream_arn: Option<String>,
    /// The pipeline began with a snapshot that started then (ms since the epoch,
    /// `sync_mode: snapshot_cdc`): once it is done, the shards in `initial_shards` are read
    /// from TRIM_HORIZON skipping records created more than a second before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_started_at_ms: Option<i64>,
}

/// Where a table's snapshot (initial load) stands: one file per table and kind, written
/// after Kafka acknowledged every row before each segment's position.
///
/// `last_evaluated_key` holds the primary key of the last item a segment delivered (the
/// only way to resume a Scan): key values, never other attributes, in an owner-only file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCheckpoint {
    /// When the snapshot started (milliseconds since the epoch): the stream is read from
    /// a margin before it once the scan is done.
    pub started_at_ms: i64,
    /// TotalSegments of the Scan (kept while the snapshot runs, whatever the config says).
    pub total_segments: u32,
    /// Each segment's position, by segment number.
    pub segments: Vec<SegmentCheckpoint>,
    /// Set once every segment was read to its end and acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<i64>,
}

/// One Scan segment's position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentCheckpoint {
    /// Scan's LastEvaluatedKey after the last acknowledged page (DynamoDB JSON); `None`
    /// before the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluated_key: Option<serde_json::Value>,
    /// The segment was read to its end.
    pub done: bool,
    /// Rows acknowledged.
    pub rows: u64,
    /// Bytes of the rows acknowledged (Kafka values).
    pub bytes: u64,
}

impl SnapshotCheckpoint {
    /// A snapshot starting now over `total_segments` segments.
    pub fn start(started_at_ms: i64, total_segments: u32) -> Self {
        Self {
            started_at_ms,
            total_segments,
            segments: vec![SegmentCheckpoint::default(); total_segments as usize],
            completed_at_ms: None,
        }
    }

    /// Rows acknowledged so far.
    pub fn rows(&self) -> u64 {
        self.segments.iter().map(|s| s.rows).sum()
    }

    /// Segments read to their end.
    pub fn segments_done(&self) -> usize {
        self.segments.iter().filter(|s| s.done).count()
    }
}

/// Which snapshot of a table a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// The pipeline's own (`sync_mode`, `on_trimmed_data: resnapshot`).
    Pipeline,
    /// `dynamodb-cdc snapshot --table`: beside the pipeline's, never touching it.
    Manual,
}

impl SnapshotKind {
    /// The name in file names and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Pipeline => "snapshot",
            SnapshotKind::Manual => "snapshot-manual",
        }
    }
}

/// Where positions are kept.
pub trait CheckpointStore: Send + Sync + std::fmt::Debug + 'static {
    /// The table's pipeline state, if it was ever written.
    fn load_table(&self, table: &str) -> Result<Option<TableState>, Error>;
    /// Saves the table's pipeline state.
    fn save_table(&self, table: &str, state: &TableState) -> Result<(), Error>;
    /// Every shard checkpoint of the table.
    fn load_shards(&self, table: &str) -> Result<Vec<ShardCheckpoint>, Error>;
    /// Saves one shard's checkpoint (atomically: a crash leaves the old or the new one).
    fn save_shard(&self, table: &str, checkpoint: &ShardCheckpoint) -> Result<(), Error>;
    /// Forgets a shard (it ended and the stream no longer lists it).
    fn remove_shard(&self, table: &str, shard_id: &str) -> Result<(), Error>;
    /// The table's snapshot of `kind`, if one was started.
    fn load_snapshot(
        &self,
        table: &str,
        kind: SnapshotKind,
    ) -> Result<Option<SnapshotCheckpoint>, Error>;
    /// Saves the table's snapshot position (atomically).
    fn save_snapshot(
        &self,
        table: &str,
        kind: SnapshotKind,
        checkpoint: &SnapshotCheckpoint,
    ) -> Result<(), Error>;
}
