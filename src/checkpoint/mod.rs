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
}
