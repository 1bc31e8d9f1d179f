//! Crash safety (moto -> dynamodb-cdc -> Kafka): the daemon is killed with SIGKILL at random
//! moments while thousands of changes flow, and restarted on the same checkpoint directory.
//! At the end every change written is in Kafka at least once, each key's changes first
//! arrived in the order they were written, and each crash caused no more duplicates than
//! the daemon could have had in flight.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::StreamViewType;
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Items the writers change.
const KEYS: usize = 50;
/// Writers. One: moto numbers stream records racily (`len(items) + start`), so concurrent
/// writes to one table can get the same sequence number, which DynamoDB never does.
const WRITERS: usize = 1;
/// The writers go on until the crashes are over and at least this many changes were made.
const MIN_CHANGES: usize = 3000;
const MAX_CHANGES: usize = 20_000;
/// Crashes injected.
const CRASHES: usize = 6;
/// This crash comes while the previous restart is catching up (within 150 ms of it handing
/// its first page to Kafka); the others come 0.2 to 2.5 s after the backlog was delivered.
const CATCH_UP_CRASH: usize = 4;
/// `reader.max_inflight_pages`.
const MAX_INFLIGHT_PAGES: usize = 4;
/// `checkpoint.interval_ms`.
const CHECKPOINT_INTERVAL_MS: u64 = 200;
/// `reader.idle_poll_interval_ms`.
const IDLE_POLL_MS: u64 = 100;
/// A flowing shard's call period: 1 s / `reader.max_calls_per_second_per_shard` (default 5).
const CALL_PERIOD_MS: u64 = 200;
/// Slack in the duplicate bound's window: a GetRecords round trip, a page's acknowledgement,
/// the checkpoint file's write, the kill itself.
const SLACK_MS: u64 = 1000;
/// Longest a restarted daemon may take to deliver the backlog.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What one crash did.
#[derive(Debug)]
struct Crash {
    /// Killed while the previous restart was catching up.
    during_catch_up: bool,
    /// Changes written when the daemon was killed.
    written: usize,
    /// The shard checkpoints the daemon left behind.
    checkpoints: BTreeMap<String, Option<String>>,
    /// Changes already in Kafka but after their shard's checkpoint: sent again on restart.
    resent: usize,
    /// The most `resent` may be (see `duplicate_bound`).
    bound: usize,
    /// What `bound` is made of.
    bound_terms: String,
    /// How long before the kill the oldest re-sent change was written (checkpoint lag).
    lag: Option<Duration>,
    /// Changes written before the restart (the backlog the restart must deliver).
    backlog: usize,
    /// From the restart until the backlog was in Kafka (`None`: killed again before).
    recovery: Option<Duration>,
}

/// The most changes a SIGKILL can leave in Kafka beyond the checkpoint, per the README
/// ("at most checkpoint.interval_ms of records plus what was in flight"), for a kill that
/// comes after the daemon caught up (every crash but `CATCH_UP_CRASH`). A change after its
/// shard's checkpoint was read by the killed daemon and is in one of these pages:
/// - a page still waiting for acknowledgement. Per shard (src/shard_reader.rs) those are
///   the `reader.max_inflight_pages` pages in the channel to the checkpointer, the page the
///   checkpointer awaits, and the page the reader is handing over: `max_inflight_pages + 2`
///   pages. A page is logged ("page handed to Kafka", with its record count) once handed
///   over, so these are at most the shard's last `max_inflight_pages + 2` logged pages,
///   unless the reader was killed while handing a page over: then it is the last
///   `max_inflight_pages + 1` logged ones and an unlogged page that was read just before
///   the kill (counted in the window below). Records per page are the ones the daemon
///   logged: up to 1000 while it catches up, what one poll period brought once caught up.
///   `in_flight` sums the records of the last `max_inflight_pages + 2` logged pages.
/// - a page acknowledged since the shard's last checkpoint write. While a shard has
///   unsaved acknowledgements it writes its checkpoint `checkpoint.interval_ms` after the
///   previous write, late only by the acknowledgement it is awaiting then; caught up, a
///   change is read within a call period (flowing) or `idle_poll_interval_ms` (after an
///   empty page), plus a round trip, of its write. So such a page holds changes written in
///   the last `checkpoint.interval_ms + max(call period, idle_poll_interval_ms) +
///   SLACK_MS`: `in_window` counts what was written then.
///
/// The bound is `in_flight + in_window`: the caught-up pages are a few dozen records, the
/// window a second of writes, far below the writes between two crashes (thousands).
/// A kill during catch-up gets its own bound (see the test).
fn duplicate_bound(in_flight: usize, in_window: usize) -> usize {
    in_flight + in_window
}

/// Records of the last `max_inflight_pages + 2` pages each shard's `daemon` handed to Kafka
/// (see [`duplicate_bound`]).
fn in_flight_records(daemon: &Daemon) -> usize {
    let mut pages: HashMap<String, Vec<usize>> = HashMap::new();
    for page in daemon.log_events("page handed to Kafka") {
        let shard = page["shard_id"].as_str().unwrap_or_default().to_owned();
        let records = page["records"].as_u64().expect("page record count") as usize;
        pages.entry(shard).or_default().push(records);
    }
    pages
        .values()
        .map(|p| p.iter().rev().take(MAX_INFLIGHT_PAGES + 2).sum::<usize>())
        .sum()
}

/// True when the event lies after its shard's checkpoint (or its shard has none).
fn after_checkpoint(event: &Value, checkpoints: &BTreeMap<String, Option<String>>) -> bool {
    let seq = event["sequence_number"].as_str().unwrap();
    match checkpoints.get(event["shard_id"].as_str().unwrap()) {
        Some(Some(cp)) => seq_cmp(seq, cp).is_gt(),
        _ => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_change() {
    if !stack_available() {
        return;
    }
    let test_start = Instant::now();
    let db = dynamodb().await;
    let table = unique("crash");
    create_table(&db, &table, "pk", None, StreamViewType::NewAndOldImages).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let cp_dir = dir.path().join("cp");
    let mut cfg = config(&[(&table, &topic)], None, &cp_dir);
    cfg["checkpoint"]["interval_ms"] = json!(CHECKPOINT_INTERVAL_MS);
    cfg["reader"]["idle_poll_interval_ms"] = json!(IDLE_POLL_MS);
    cfg["reader"]["max_inflight_pages"] = json!(MAX_INFLIGHT_PAGES);
    let window =
        Duration::from_millis(CHECKPOINT_INTERVAL_MS + IDLE_POLL_MS.max(CALL_PERIOD_MS) + SLACK_MS);

    let (workload, writers) = Workload::start(
        &db,
        &table,
        KEYS,
        WRITERS,
        MIN_CHANGES,
        MAX_CHANGES,
        Duration::ZERO,
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let mut tail = Tail::new(&kafka_bootstrap(), &topic);
    // Let the pipeline get going before the first crash.
    let started = wait_for(RECOVERY_TIMEOUT, || {
        workload.written() >= 200 || workload.failure().is_some()
    })
    .await;
    assert!(
        started,
        "200 changes not written within {RECOVERY_TIMEOUT:?}"
    );
    let first = wait_delivered(&mut tail, &workload, 200, &mut daemon, RECOVERY_TIMEOUT).await;
    eprintln!("first 200 changes delivered {first:?} after start");

    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut crashes: Vec<Crash> = Vec::new();
    let mut previous_kill: Option<Instant> = None;
    // The kill moments are random on purpose: the sleeps before a kill and while the
    // daemon is down are the test's subject, not a wait for something to happen.
    for n in 1..=CRASHES {
        let during_catch_up = n == CATCH_UP_CRASH;
        if during_catch_up {
            // The previous restart has handed its first page of backlog to Kafka and has
            // not written a checkpoint yet (it waits checkpoint.interval_ms first).
            wait_for_log(&daemon, "page handed to Kafka", RECOVERY_TIMEOUT).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
        }
        daemon.kill();
        let killed = Instant::now();
        let changes = workload.changes();
        let checkpoints = read_checkpoints(&cp_dir, &table);
        let in_flight = in_flight_records(&daemon);
        // A produce request already on the wire is still appended: read until the topic
        // is quiet.
        let in_kafka = within(
            RECOVERY_TIMEOUT,
            "reading Kafka",
            read_settled(
                &kafka_bootstrap(),
                &topic,
                Duration::from_millis(300),
                RECOVERY_TIMEOUT,
            ),
        )
        .await;
        let deletes = deletes_of(&changes);
        let at: HashMap<u64, Instant> = changes.iter().map(|c| (c.id, c.at)).collect();
        let mut resent_seqs = HashSet::new();
        let mut lag: Option<Duration> = None;
        for v in in_kafka.iter().filter_map(|r| r.value.as_ref()) {
            if after_checkpoint(v, &checkpoints) {
                resent_seqs.insert(v["sequence_number"].as_str().unwrap().to_owned());
                let written = change_id(v, &deletes).and_then(|id| at.get(&id));
                if let Some(written) = written {
                    let age = killed.saturating_duration_since(*written);
                    lag = Some(lag.map_or(age, |l| l.max(age)));
                }
            }
        }
        let written_since = |since: Instant| changes.iter().filter(|c| c.at > since).count();
        let in_window = written_since(killed.checked_sub(window).unwrap_or(killed));
        let (bound, bound_terms) = if during_catch_up {
            // The killed daemon may have acknowledged its whole backlog without writing a
            // checkpoint yet. Its checkpoint is no older than the previous crash's, so
            // what lies after it is what lay after that one when the previous daemon was
            // killed (at most that crash's bound: the same pages and window, delivered or
            // not) plus everything written since.
            let previous = crashes
                .last()
                .expect("a crash before the catch-up one")
                .bound;
            let since = written_since(previous_kill.unwrap());
            (
                previous + since,
                format!(
                    "{previous} (the previous crash's bound) + {since} written since that kill"
                ),
            )
        } else {
            (
                duplicate_bound(in_flight, in_window),
                format!(
                    "{in_flight} in the last pages + {in_window} written in the last {window:?}"
                ),
            )
        };
        previous_kill = Some(killed);

        // Down for a random while; the writers go on.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        daemon = Daemon::start(dir.path(), &cfg, &[]);
        let backlog = workload.written();
        // The restart resumes right after the checkpoint it found.
        let starts = wait_for_log(&daemon, "starting shard reader", RECOVERY_TIMEOUT).await;
        for (shard, cp) in &checkpoints {
            let start = starts
                .iter()
                .find(|e| e["shard_id"] == shard.as_str())
                .map(|e| e["start"].as_str().unwrap_or_default().to_owned());
            if let Some(cp) = cp {
                assert_eq!(
                    start,
                    Some(format!("After({cp:?})")),
                    "crash {n}: shard {shard} did not resume at its checkpoint"
                );
            }
        }
        let recovery = if n + 1 == CATCH_UP_CRASH {
            None
        } else {
            Some(wait_delivered(&mut tail, &workload, backlog, &mut daemon, RECOVERY_TIMEOUT).await)
        };
        let crash = Crash {
            during_catch_up,
            written: changes.len(),
            checkpoints,
            resent: resent_seqs.len(),
            bound,
            bound_terms,
            lag,
            backlog,
            recovery,
        };
        eprintln!(
            "crash {n}{}: killed after {} changes written; checkpoints {:?}; {} changes \
             already in Kafka after the checkpoint (sent again; bound {} = {}; the oldest \
             written {:?} before the kill); the restart delivered the backlog of {} changes in {}",
            if during_catch_up {
                " (during catch-up)"
            } else {
                ""
            },
            crash.written,
            crash.checkpoints,
            crash.resent,
            crash.bound,
            crash.bound_terms,
            crash.lag,
            crash.backlog,
            crash
                .recovery
                .map_or("- (killed while catching up)".into(), |r| format!("{r:?}"))
        );
        crashes.push(crash);
    }

    // A little more traffic after the last restart, then the rest of the changes (the
    // sleep paces the workload; nothing waits on it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    workload.stop();
    for w in writers {
        w.await.expect("writer");
    }
    if let Some(failure) = workload.failure() {
        panic!("{failure}");
    }
    let total = workload.written();
    wait_delivered(&mut tail, &workload, total, &mut daemon, RECOVERY_TIMEOUT).await;
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());

    // The final verdict comes from a full read of the topic, not from the tail.
    let records = within(
        RECOVERY_TIMEOUT,
        "reading Kafka",
        consume_from(
            &kafka_bootstrap(),
            &topic,
            tail.records.len(),
            Duration::from_secs(10),
        ),
    )
    .await;
    let changes = workload.changes();
    let d = check_delivery(&records, &changes);
    let predicted: usize = crashes.iter().map(|c| c.resent).sum();
    let recoveries: Vec<String> = crashes
        .iter()
        .map(|c| {
            c.recovery
                .map_or("killed-again".into(), |r| format!("{}ms", r.as_millis()))
        })
        .collect();
    let per_crash: Vec<String> = crashes
        .iter()
        .map(|c| {
            format!(
                "{}/{}{}",
                c.resent,
                c.bound,
                if c.during_catch_up { "(catch-up)" } else { "" }
            )
        })
        .collect();
    report(&format!(
        "crash report: crashes={} written={} delivered={} (unique) events={} tombstones={} \
         duplicates={} (per crash, re-sent/bound: {}) lost={} recovery after restart=[{}] \
         runtime={:?}",
        crashes.len(),
        d.written,
        d.delivered,
        d.events,
        d.tombstones,
        d.duplicates,
        per_crash.join(" "),
        d.lost.len(),
        recoveries.join(" "),
        test_start.elapsed()
    ));

    assert_eq!(crashes.len(), CRASHES);
    assert!(
        d.written >= MIN_CHANGES,
        "only {} changes written",
        d.written
    );
    d.assert_complete();
    for (n, c) in crashes.iter().enumerate() {
        assert!(
            c.resent <= c.bound,
            "crash {}: {} changes after the checkpoint were already in Kafka, over the bound {}",
            n + 1,
            c.resent,
            c.bound
        );
    }
    // Every duplicate is explained by a crash: a restart re-sends only what lay after the
    // checkpoint (what the killed daemon had in flight or not yet checkpointed).
    assert!(
        d.duplicates <= predicted,
        "{} duplicates, but the crashes left only {predicted} delivered changes after their \
         checkpoints",
        d.duplicates
    );
}
