//! Health tied to progress: `/healthz` answers 200 only while data moves, not merely while
//! the process runs.
//!
//! Within `health.max_stall_seconds`:
//! - every shard being read completed a GetRecords call (an idle shard still polls: its
//!   pause never exceeds 32 × `reader.idle_poll_interval_ms`);
//! - every page Kafka acknowledged was checkpointed;
//! - Kafka accepted a produce or a metadata request (the daemon asks for metadata when it
//!   has nothing to produce);
//!
//! and the assumed-role session has not expired.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// One shard's progress, as health sees it.
#[derive(Debug, Clone)]
pub struct ShardObserved {
    /// Its table.
    pub table: String,
    /// The shard.
    pub shard_id: String,
    /// Its last completed GetRecords (or when its reader started).
    pub last_poll: Instant,
    /// The oldest acknowledgement not yet checkpointed.
    pub unsaved_since: Option<Instant>,
}

/// Everything health is judged on.
#[derive(Debug, Clone)]
pub struct Observed {
    /// `health.max_stall_seconds`.
    pub max_stall: Duration,
    /// When the pipeline started (Kafka gets this long to answer a first time).
    pub started_at: Instant,
    /// Every shard being read.
    pub shards: Vec<ShardObserved>,
    /// When Kafka last answered a produce or metadata request.
    pub kafka_ok: Option<Instant>,
    /// When the assumed-role session expires (`None` without a role).
    pub credentials_expiry: Option<SystemTime>,
}

/// One thing that does not progress.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stall {
    /// `get_records`, `checkpoint`, `kafka` or `credentials`.
    pub check: &'static str,
    /// The table, for shard checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The shard, for shard checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_id: Option<String>,
    /// How long it has not progressed.
    pub seconds: u64,
    /// What an operator reads.
    pub message: String,
}

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// 200 when true, else 503.
    pub healthy: bool,
    /// `health.max_stall_seconds`.
    pub max_stall_seconds: u64,
    /// Shards being read.
    pub shards: usize,
    /// What is stalled (empty when healthy).
    pub stalled: Vec<Stall>,
}

impl Health {
    /// The JSON body of `/healthz`.
    pub fn body(&self) -> String {
        let mut v = serde_json::to_value(self).expect("serializable");
        v["status"] = if self.healthy { "ok" } else { "stalled" }.into();
        v.to_string()
    }
}

/// Judges `o` at `now` (monotonic) and `wall` (for the session's expiry).
pub fn judge(o: &Observed, now: Instant, wall: SystemTime) -> Health {
    let max = o.max_stall;
    let mut stalled = Vec::new();
    for s in &o.shards {
        let shard_stall = |check, since: Duration, what: &str| Stall {
            check,
            table: Some(s.table.clone()),
            shard_id: Some(s.shard_id.clone()),
            seconds: since.as_secs(),
            message: format!(
                "shard {} of table {}: {what} for {} s",
                s.shard_id,
                s.table,
                since.as_secs()
            ),
        };
        let since = now.saturating_duration_since(s.last_poll);
        if since > max {
            stalled.push(shard_stall(
                "get_records",
                since,
                "no GetRecords call completed",
            ));
        }
        let unsaved = s.unsaved_since.map(|at| now.saturating_duration_since(at));
        if let Some(since) = unsaved.filter(|since| *since > max) {
            stalled.push(shard_stall(
                "checkpoint",
                since,
                "acknowledged records not checkpointed (checkpoint.dir writable? disk full?)",
            ));
        }
    }
    let kafka_since = now.saturating_duration_since(o.kafka_ok.unwrap_or(o.started_at));
    if kafka_since > max {
        stalled.push(Stall {
            check: "kafka",
            table: None,
            shard_id: None,
            seconds: kafka_since.as_secs(),
            message: format!(
                "Kafka accepted no produce or metadata request for {} s",
                kafka_since.as_secs()
            ),
        });
    }
    if let Some(expiry) = o.credentials_expiry {
        if let Ok(ago) = wall.duration_since(expiry) {
            stalled.push(Stall {
                check: "credentials",
                table: None,
                shard_id: None,
                seconds: ago.as_secs(),
                message: format!(
                    "the assumed-role session expired {} s ago and was not refreshed",
                    ago.as_secs()
                ),
            });
        }
    }
    Health {
        healthy: stalled.is_empty(),
        max_stall_seconds: max.as_secs(),
        shards: o.shards.len(),
        stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(now: Instant) -> Observed {
        Observed {
            max_stall: Duration::from_secs(120),
            started_at: now,
            shards: vec![ShardObserved {
                table: "orders".into(),
                shard_id: "shardId-1".into(),
                last_poll: now,
                unsaved_since: None,
            }],
            kafka_ok: Some(now),
            credentials_expiry: Some(SystemTime::now() + Duration::from_secs(3600)),
        }
    }

    #[test]
    fn healthy_while_everything_progresses() {
        let now = Instant::now();
        let h = judge(
            &observed(now),
            now + Duration::from_secs(119),
            SystemTime::now(),
        );
        assert!(h.healthy, "{h:?}");
        assert!(h.body().contains(r#""status":"ok""#), "{}", h.body());
    }

    /// Each check names what stalled: the shard (table and id), the checkpoint, Kafka, the
    /// credentials.
    #[test]
    fn each_stall_is_named() {
        let now = Instant::now();
        let later = now + Duration::from_secs(121);
        let h = judge(&observed(now), later, SystemTime::now());
        assert!(!h.healthy);
        let checks: Vec<_> = h.stalled.iter().map(|s| s.check).collect();
        assert_eq!(checks, ["get_records", "kafka"], "{h:?}");
        assert_eq!(h.stalled[0].shard_id.as_deref(), Some("shardId-1"));
        assert_eq!(h.stalled[0].table.as_deref(), Some("orders"));
        let body = h.body();
        assert!(
            body.contains(r#""status":"stalled""#) && body.contains("shardId-1"),
            "{body}"
        );

        let mut o = observed(now);
        o.shards[0].last_poll = later;
        o.kafka_ok = Some(later);
        o.shards[0].unsaved_since = Some(now);
        o.credentials_expiry = Some(SystemTime::now() - Duration::from_secs(5));
        let h = judge(&o, later, SystemTime::now());
        let checks: Vec<_> = h.stalled.iter().map(|s| s.check).collect();
        assert_eq!(checks, ["checkpoint", "credentials"], "{h:?}");
    }

    /// Kafka gets `max_stall` after the start to answer a first time.
    #[test]
    fn kafka_gets_time_to_answer_after_the_start() {
        let now = Instant::now();
        let mut o = observed(now);
        o.kafka_ok = None;
        o.shards.clear();
        assert!(judge(&o, now + Duration::from_secs(60), SystemTime::now()).healthy);
        assert!(!judge(&o, now + Duration::from_secs(121), SystemTime::now()).healthy);
    }
}
