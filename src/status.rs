//! `dynamodb-cdc status`: where every table and shard stands, from the checkpoint files
//! alone (no AWS or Kafka call; safe beside the running daemon), and with `--metrics-url`
//! the live lag from the daemon's `/metrics`.

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::{CheckpointStore, FileStore, SnapshotKind};
use crate::error::Error;

/// One shard's checkpoint.
#[derive(Debug, Serialize)]
pub struct ShardStatus {
    /// The shard.
    pub shard_id: String,
    /// Every record up to this one was acknowledged by Kafka (`None`: none yet).
    pub sequence_number: Option<String>,
    /// When the checkpoint was written (ms since the epoch).
    pub updated_at_ms: i64,
    /// Seconds since then.
    pub age_seconds: i64,
    /// The shard was read to its end.
    pub ended: bool,
}

/// Where a table's snapshot stands (`snapshot.json`).
#[derive(Debug, Serialize)]
pub struct SnapshotStatus {
    /// When it started (ms since the epoch).
    pub started_at_ms: i64,
    /// When every segment was done (`None`: still loading, or stopped part of the way).
    pub completed_at_ms: Option<i64>,
    /// Rows acknowledged by Kafka and saved.
    pub rows: u64,
    /// Segments read to their end.
    pub segments_done: usize,
    /// TotalSegments.
    pub total_segments: u32,
}

/// One table.
#[derive(Debug, Serialize)]
pub struct TableStatus {
    /// The table.
    pub table: String,
    /// The stream being read (`None`: the pipeline never started on this table).
    pub stream_arn: Option<String>,
    /// When the pipeline first started on that stream (ms since the epoch).
    pub pipeline_started_ms: Option<i64>,
    /// The stream read after this one, while this one is drained.
    pub next_stream_arn: Option<String>,
    /// Its shards, by id.
    pub shards: Vec<ShardStatus>,
    /// The table's pipeline snapshot (`None`: none was started).
    pub snapshot: Option<SnapshotStatus>,
    /// `dynamodb_cdc_lag_seconds` from `--metrics-url`.
    pub lag_seconds: Option<f64>,
}

/// Reads the checkpoints of `tables` under `dir`.
pub fn read(dir: &Path, tables: &[String], now_ms: i64) -> Result<Vec<TableStatus>, Error> {
    let store = FileStore::read_only(dir)?;
    let mut out = Vec::new();
    for table in tables {
        let state = store.load_table(table)?;
        let snapshot = store
            .load_snapshot(table, SnapshotKind::Pipeline)?
            .map(|c| SnapshotStatus {
                started_at_ms: c.started_at_ms,
                completed_at_ms: c.completed_at_ms,
                rows: c.rows(),
                segments_done: c.segments_done(),
                total_segments: c.total_segments,
            });
        let mut shards: Vec<ShardStatus> = store
            .load_shards(table)?
            .into_iter()
            .map(|c| ShardStatus {
                age_seconds: (now_ms - c.updated_at_ms).max(0) / 1000,
                shard_id: c.shard_id,
                sequence_number: c.sequence_number,
                updated_at_ms: c.updated_at_ms,
                ended: c.ended,
            })
            .collect();
        shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        out.push(TableStatus {
            table: table.clone(),
            stream_arn: state.as_ref().map(|s| s.stream_arn.clone()),
            pipeline_started_ms: state.as_ref().map(|s| s.created_at_ms),
            next_stream_arn: state.and_then(|s| s.next_stream_arn),
            shards,
            snapshot,
            lag_seconds: None,
        });
    }
    Ok(out)
}

/// `dynamodb_cdc_lag_seconds` per table from a `/metrics` text.
pub fn lag_from_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("dynamodb_cdc_lag_seconds{table=\""))
        .filter_map(|rest| {
            let (table, value) = rest.split_once("\"} ")?;
            Some((table.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn ago(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// The text report.
pub fn to_text(tables: &[TableStatus]) -> String {
    let mut out = String::new();
    for t in tables {
        let Some(stream) = &t.stream_arn else {
            out.push_str(&format!(
                "table {}: no checkpoint yet (the pipeline has not started on it)\n",
                t.table
            ));
            continue;
        };
        let ended = t.shards.iter().filter(|s| s.ended).count();
        out.push_str(&format!(
            "table {}: stream {stream}, {} shard(s) checkpointed ({ended} ended, {} open)\n",
            t.table,
            t.shards.len(),
            t.shards.len() - ended
        ));
        if let Some(next) = &t.next_stream_arn {
            out.push_str(&format!("  draining; next stream {next}\n"));
        }
        if let Some(lag) = t.lag_seconds {
            out.push_str(&format!("  live lag: {lag:.1} s\n"));
        }
        match &t.snapshot {
            Some(s) if s.completed_at_ms.is_some() => out.push_str(&format!(
                "  snapshot: complete, {} rows ({} segments)\n",
                s.rows, s.total_segments
            )),
            Some(s) => out.push_str(&format!(
                "  snapshot: loading (or stopped part of the way), {} rows, {}/{} segments done\n",
                s.rows, s.segments_done, s.total_segments
            )),
            None => out.push_str("  snapshot: none\n"),
        }
        for s in &t.shards {
            let state = if s.ended { "ended" } else { "open" };
            out.push_str(&format!(
                "  shard {}: {state}, after {}, checkpointed {}\n",
                s.shard_id,
                s.sequence_number.as_deref().unwrap_or("(no record)"),
                ago(s.age_seconds)
            ));
        }
    }
    out
}

/// The whole command: reads the checkpoints, adds the live lag when `metrics_url` is
/// given (an unreachable daemon is a line, not a failure), and renders.
pub async fn status(
    checkpoint_dir: &Path,
    tables: &[String],
    metrics_url: Option<&str>,
    json: bool,
) -> Result<String, Error> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut report = read(checkpoint_dir, tables, now_ms)?;
    let mut note = None;
    if let Some(url) = metrics_url {
        match crate::telemetry::server::get(url).await {
            Ok((200, text)) => {
                let lags = lag_from_metrics(&text);
                for t in &mut report {
                    t.lag_seconds = lags.iter().find(|(n, _)| *n == t.table).map(|(_, l)| *l);
                }
            }
            Ok((status, _)) => note = Some(format!("{url}: HTTP {status}")),
            Err(e) => note = Some(format!("{e} (is the daemon running with metrics.listen?)")),
        }
    }
    if json {
        let mut v = serde_json::json!({ "tables": report });
        if let Some(n) = &note {
            v["metrics_error"] = n.clone().into();
        }
        return Ok(format!("{v:#}\n"));
    }
    let mut text = to_text(&report);
    if let Some(n) = note {
        text.push_str(&format!("live lag unavailable: {n}\n"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{ShardCheckpoint, TableState};

    #[test]
    fn reads_checkpoints_beside_a_running_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store
            .save_table(
                "orders",
                &TableState {
                    stream_arn: "arn:stream".into(),
                    initial_shards: vec![],
                    created_at_ms: 1_000,
                    next_stream_arn: None,
                    snapshot_started_at_ms: None,
                },
            )
            .unwrap();
        for (id, seq, ended) in [
            ("shardId-2", None, true),
            ("shardId-1", Some("0042"), false),
        ] {
            store
                .save_shard(
                    "orders",
                    &ShardCheckpoint {
                        stream_arn: "arn:stream".into(),
                        shard_id: id.into(),
                        sequence_number: seq.map(str::to_owned),
                        ended,
                        updated_at_ms: 10_000,
                        created_since_ms: None,
                    },
                )
                .unwrap();
        }
        let mut snap = crate::checkpoint::SnapshotCheckpoint::start(500, 4);
        snap.segments[1].done = true;
        snap.segments[1].rows = 70;
        snap.segments[2].rows = 5;
        store
            .save_snapshot("orders", SnapshotKind::Pipeline, &snap)
            .unwrap();
        // The daemon holds the lock: status still reads.
        let report = read(dir.path(), &["orders".into(), "other".into()], 70_000).unwrap();
        let text = to_text(&report);
        assert!(
            text.contains(
                "table orders: stream arn:stream, 2 shard(s) checkpointed (1 ended, 1 open)"
            ),
            "{text}"
        );
        assert!(
            text.contains("shard shardId-1: open, after 0042, checkpointed 60 s ago"),
            "{text}"
        );
        assert!(text.contains("shard shardId-2: ended"), "{text}");
        assert!(
            text.contains(
                "snapshot: loading (or stopped part of the way), 75 rows, 1/4 segments done"
            ),
            "{text}"
        );
        assert!(text.contains("table other: no checkpoint yet"), "{text}");
        drop(store);
    }

    #[test]
    fn lag_is_read_from_the_metrics_text() {
        let text = "# TYPE dynamodb_cdc_lag_seconds gauge\ndynamodb_cdc_lag_seconds{table=\"a\"} 1.5\ndynamodb_cdc_lag_seconds{table=\"b\"} 0.0\n";
        assert_eq!(
            lag_from_metrics(text),
            [("a".to_owned(), 1.5), ("b".to_owned(), 0.0)]
        );
    }
}
