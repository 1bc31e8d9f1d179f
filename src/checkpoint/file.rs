//! The file backend: `<dir>/<table>/table.json`, `<dir>/<table>/shards/<shard_id>.json` and
//! `<dir>/<table>/snapshot.json` (`snapshot-manual.json` for the `snapshot` command).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{CheckpointStore, ShardCheckpoint, SnapshotCheckpoint, SnapshotKind, TableState};
use crate::error::Error;

/// Checkpoint files under one directory (one directory per pipeline).
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// An exclusive lock on `<dir>/.lock`, held while the store lives: two daemons never
    /// share one checkpoint directory. `None` for a reader ([`FileStore::read_only`]).
    _lock: Option<std::sync::Arc<File>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Checkpoint {
        path: path.to_owned(),
        source,
    }
}

/// Creates `path` and its parents, owner-only.
fn create_dir(path: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// Shard ids and table names are `[A-Za-z0-9_.-]`; anything else is escaped so a name can
/// never leave the directory.
fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') || (c == '.' && !out.is_empty()) {
            out.push(c);
        } else {
            out.push_str(&format!("%{:02X}", c as u32));
        }
    }
    out
}

impl FileStore {
    /// Opens (creating, owner-only) the checkpoint directory.
    /// Fails with [`Error::CheckpointInUse`] when another process holds the directory.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        create_dir(dir)?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::CheckpointInUse {
                    path: dir.to_owned(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        // Probe that we can write here now, not at the first checkpoint.
        let probe = dir.join(".write-test");
        write_atomic(&probe, b"ok")?;
        fs::remove_file(&probe).map_err(io(&probe))?;
        Ok(Self {
            dir: dir.to_owned(),
            _lock: Some(std::sync::Arc::new(lock)),
        })
    }

    /// The checkpoint directory for reading only, beside a running daemon (`status`): no
    /// lock is taken and nothing is created. Each file is read whole, and writers replace
    /// files atomically, so every checkpoint read is one the daemon wrote.
    pub fn read_only(dir: &Path) -> Result<Self, Error> {
        fs::read_dir(dir).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            _lock: None,
        })
    }

    fn table_dir(&self, table: &str) -> PathBuf {
        self.dir.join(file_name(table))
    }

    fn shards_dir(&self, table: &str) -> PathBuf {
        self.table_dir(table).join("shards")
    }

    fn snapshot_path(&self, table: &str, kind: SnapshotKind) -> PathBuf {
        self.table_dir(table)
            .join(format!("{}.json", kind.as_str()))
    }

    fn shard_path(&self, table: &str, shard_id: &str) -> PathBuf {
        self.shards_dir(table)
            .join(format!("{}.json", file_name(shard_id)))
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// write a temporary file, fsync it, rename it over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, Error> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::CorruptCheckpoint {
                    path: path.to_owned(),
                    message: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let bytes = serde_json::to_vec_pretty(value).expect("checkpoint serializes");
    write_atomic(path, &bytes)
}

impl CheckpointStore for FileStore {
    fn load_table(&self, table: &str) -> Result<Option<TableState>, Error> {
        read_json(&self.table_dir(table).join("table.json"))
    }

    fn save_table(&self, table: &str, state: &TableState) -> Result<(), Error> {
        write_json(&self.table_dir(table).join("table.json"), state)
    }

    fn load_shards(&self, table: &str) -> Result<Vec<ShardCheckpoint>, Error> {
        let dir = self.shards_dir(table);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(c) = read_json(&path)? {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    fn save_shard(&self, table: &str, checkpoint: &ShardCheckpoint) -> Result<(), Error> {
        write_json(&self.shard_path(table, &checkpoint.shard_id), checkpoint)
    }

    fn remove_shard(&self, table: &str, shard_id: &str) -> Result<(), Error> {
        let path = self.shard_path(table, shard_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn load_snapshot(
        &self,
        table: &str,
        kind: SnapshotKind,
    ) -> Result<Option<SnapshotCheckpoint>, Error> {
        read_json(&self.snapshot_path(table, kind))
    }

    fn save_snapshot(
        &self,
        table: &str,
        kind: SnapshotKind,
        checkpoint: &SnapshotCheckpoint,
    ) -> Result<(), Error> {
        write_json(&self.snapshot_path(table, kind), checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cp(shard: &str, seq: &str) -> ShardCheckpoint {
        ShardCheckpoint {
            stream_arn: "arn:s".into(),
            shard_id: shard.into(),
            sequence_number: Some(seq.into()),
            ended: false,
            updated_at_ms: 1,
            created_since_ms: None,
        }
    }

    #[test]
    fn round_trip_and_owner_only_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cp");
        let store = FileStore::open(&dir).unwrap();
        assert!(store.load_shards("t1").unwrap().is_empty());
        assert_eq!(store.load_table("t1").unwrap(), None);
        store.save_shard("t1", &cp("shardId-1", "100")).unwrap();
        store.save_shard("t1", &cp("shardId-1", "200")).unwrap();
        store.save_shard("t1", &cp("shardId-2", "5")).unwrap();
        let mut all = store.load_shards("t1").unwrap();
        all.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        assert_eq!(all, vec![cp("shardId-1", "200"), cp("shardId-2", "5")]);
        let state = TableState {
            stream_arn: "arn:s".into(),
            initial_shards: vec!["shardId-1".into()],
            created_at_ms: 7,
            next_stream_arn: None,
            snapshot_started_at_ms: None,
        };
        store.save_table("t1", &state).unwrap();
        assert_eq!(store.load_table("t1").unwrap(), Some(state.clone()));
        // No drain in progress: the file is what it was before the field existed.
        let written = fs::read_to_string(dir.join("t1/table.json")).unwrap();
        assert!(!written.contains("next_stream_arn"), "{written}");
        let draining = TableState {
            next_stream_arn: Some("arn:s2".into()),
            ..state
        };
        store.save_table("t1", &draining).unwrap();
        assert_eq!(store.load_table("t1").unwrap(), Some(draining));
        store.remove_shard("t1", "shardId-2").unwrap();
        store.remove_shard("t1", "shardId-2").unwrap();
        assert_eq!(store.load_shards("t1").unwrap().len(), 1);

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("t1").join("shards")), 0o700);
        assert_eq!(mode(&dir.join("t1/shards/shardId-1.json")), 0o600);
        assert_eq!(mode(&dir.join("t1/table.json")), 0o600);
    }

    #[test]
    fn a_crash_before_rename_leaves_the_old_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        store.save_shard("t", &cp("s", "1")).unwrap();
        // A crash after writing the temporary file but before the rename: the checkpoint
        // still reads as the old one, and the stray file is ignored.
        let path = store.shard_path("t", "s");
        fs::write(path.with_extension("json.tmp"), b"{\"half").unwrap();
        assert_eq!(store.load_shards("t").unwrap(), vec![cp("s", "1")]);
        // The next save replaces both.
        store.save_shard("t", &cp("s", "2")).unwrap();
        assert_eq!(store.load_shards("t").unwrap(), vec![cp("s", "2")]);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        store.save_shard("t", &cp("s", "1")).unwrap();
        fs::write(store.shard_path("t", "s"), b"garbage").unwrap();
        let e = store.load_shards("t").unwrap_err().to_string();
        assert!(
            e.contains("s.json") && e.contains("move the file away"),
            "{e}"
        );
    }

    #[test]
    fn one_store_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let e = FileStore::open(tmp.path()).unwrap_err();
        assert!(matches!(e, Error::CheckpointInUse { .. }), "{e}");
        assert!(e.to_string().contains("another dynamodb-cdc"), "{e}");
        drop(store);
        FileStore::open(tmp.path()).unwrap();
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        assert_eq!(file_name("shardId-00000001_abc"), "shardId-00000001_abc");
        assert_eq!(file_name("../etc"), "%2E.%2Fetc");
        assert_eq!(file_name("a.b"), "a.b");
    }
}
