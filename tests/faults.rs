//! What real DynamoDB Streams does and moto cannot show: shard rollovers, more than 100
//! shards, expired iterators, throttling storms, trimmed data, poison records, streams
//! replaced and tables deleted, STS outages. The daemon talks to the Streams test double
//! (tests/common/streams_double.rs) through the real AWS SDK, and to the real Kafka broker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::streams_double::{Fault, FaultKind, KeySchema, RecordSpec, StreamsDouble, ViewType};
use common::*;
use serde_json::{json, Value};

/// Change events (no tombstones, no markers) of a topic, grouped by key in offset order,
/// as (key -> list of `n`).
fn values_by_key(records: &[Consumed]) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in records {
        let Some(v) = &r.value else { continue };
        if let Some(n) = v["new_image"]["n"].as_i64() {
            out.entry(r.key.clone().unwrap()).or_default().push(n);
        }
    }
    out
}

fn put_n(double: &StreamsDouble, table: &str, key: &str, n: i64) -> String {
    double
        .put(table, json!({"pk": {"S": key}, "n": {"N": n.to_string()}}))
        .expect("stream enabled")
}

/// Keys' changes span parent and child shards over two generations of splits, and the
/// stream has more than 100 shards (three DescribeStream pages): every key's events arrive
/// in order, every shard is read, no child before its parent ended, at most one reader a
/// shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollover_keeps_per_key_order_across_parent_and_child_shards() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("rollover");
    let arn = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewAndOldImages);
    // 230 closed, empty shards in chains of 10 (parents listed before and after children):
    // pagination matters, and lineage over 23 chains.
    for _ in 0..23 {
        let mut parent: Option<String> = None;
        for _ in 0..10 {
            let id = double.add_shard(&arn, parent.as_deref());
            double.close_shard(&id);
            parent = Some(id);
        }
    }
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let mut n = 0;
    let mut write_round = |double: &StreamsDouble| {
        for k in &keys {
            put_n(double, &table, k, n);
            n += 1;
        }
    };
    write_round(&double);
    write_round(&double);
    let root = double.open_shards(&table);
    assert_eq!(root.len(), 1);

    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &double_config(&double, &[(&table, &topic)], dir.path()),
        &[],
    );
    // Split while the daemon reads: generation 1 (two children) once it read records of
    // the root, then generation 2 once it read records of generation 1.
    let read_records_of = |d: &StreamsDouble, shards: &[String]| {
        d.calls_to("GetRecords")
            .iter()
            .any(|c| c.records > 0 && c.shard_id.as_ref().is_some_and(|s| shards.contains(s)))
    };
    let reading = double
        .wait_until(Duration::from_secs(30), |d| read_records_of(d, &root))
        .await;
    assert!(
        reading,
        "the root shard was not read:\n{}",
        daemon.log_text()
    );
    let generation_1 = double.split(&root[0], 2);
    write_round(&double);
    write_round(&double);
    let reading = double
        .wait_until(Duration::from_secs(30), |d| {
            read_records_of(d, &generation_1)
        })
        .await;
    assert!(reading, "no child shard was read:\n{}", daemon.log_text());
    for shard in double.open_shards(&table) {
        double.split(&shard, 2);
    }
    write_round(&double);
    write_round(&double);
    let total = keys.len() * 6;

    let got = consume(&topic, total, Duration::from_secs(60)).await;
    assert_eq!(got.len(), total, "{}", daemon.log_text());
    for (key, values) in values_by_key(&got) {
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "order of {key}");
        assert_eq!(values.len(), 6, "{key}");
    }

    // Every shard's reader started, and DescribeStream was paginated (100 a page).
    let all: Vec<_> = double.shards(&arn);
    assert!(all.len() > 230);
    let ok = double
        .wait_until(Duration::from_secs(30), |d| {
            let iterated: HashSet<String> = d
                .calls_to("GetShardIterator")
                .into_iter()
                .filter_map(|c| c.shard_id)
                .collect();
            all.iter().all(|s| iterated.contains(&s.shard_id))
        })
        .await;
    assert!(ok, "not every shard was read:\n{}", daemon.log_text());
    let pages = double.calls_to("DescribeStream");
    assert!(
        pages.iter().any(|c| c.exclusive_start_shard_id.is_some()),
        "no second page asked for"
    );
    assert!(pages.iter().all(|c| c.limit == Some(100)));

    // No call on a child before its parent's end was read.
    let calls = double.calls();
    let parent_of: HashMap<String, String> = all
        .iter()
        .filter_map(|s| s.parent_shard_id.clone().map(|p| (s.shard_id.clone(), p)))
        .collect();
    let end_at: HashMap<String, Instant> = calls
        .iter()
        .filter(|c| c.op == "GetRecords" && c.shard_end)
        .map(|c| (c.shard_id.clone().unwrap(), c.at))
        .collect();
    for c in calls
        .iter()
        .filter(|c| c.op == "GetShardIterator" || c.op == "GetRecords")
    {
        let shard = c.shard_id.as_ref().unwrap();
        if let Some(parent) = parent_of.get(shard) {
            let parent_end = end_at
                .get(parent)
                .unwrap_or_else(|| panic!("{parent} never ended"));
            assert!(
                *parent_end <= c.at,
                "{} on {shard} before its parent {parent} ended",
                c.op
            );
        }
    }
    assert_eq!(
        double.max_concurrent_per_shard(),
        1,
        "two GetShardIterator/GetRecords calls on one shard at once"
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// Expired iterators, mid-stream: a fresh iterator after the last record read; no gap, no
/// duplicate, no stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_iterator_resumes_after_the_last_record() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("expired");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    for i in 0..2500 {
        put_n(&double, &table, &format!("k{}", i % 50), i);
    }
    // Every third GetRecords call fails with an expired iterator, 6 times.
    double.fault(
        Fault::new(FaultKind::Expired)
            .op("GetRecords")
            .probability(0.34)
            .times(6),
    );
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &double_config(&double, &[(&table, &topic)], dir.path()),
        &[],
    );
    let got = consume(&topic, 2500, Duration::from_secs(60)).await;
    // All 6 scripted expiries happen (on pages or idle polls), and the reader is polling
    // with a good iterator again, before every iterator in hand is expired.
    let settled = |d: &StreamsDouble| {
        let calls = d.calls_to("GetRecords");
        let expired = calls
            .iter()
            .filter(|c| c.error_code.as_deref() == Some("ExpiredIteratorException"))
            .count();
        expired >= 6 && calls.last().is_some_and(|c| c.status == 200)
    };
    assert!(double.wait_until(Duration::from_secs(30), settled).await);
    // Then expire everything while idle, and write more.
    double.expire_iterators();
    for i in 2500..2600 {
        put_n(&double, &table, &format!("k{}", i % 50), i);
    }
    let got_all = consume(&topic, 2600, Duration::from_secs(60)).await;
    // Before the idle expiry: the first 2500 changes, each once (the expiries mid-stream
    // caused no gap and no duplicate).
    assert_eq!(got.len(), 2500, "{}", daemon.log_text());
    assert_eq!(
        got_all.len(),
        2600,
        "gap or duplicate: {}\n{}",
        got_all.len(),
        daemon.log_text()
    );
    let all: HashSet<i64> = values_by_key(&got_all).into_values().flatten().collect();
    assert_eq!(all.len(), 2600);

    // Each expiry was followed by GetShardIterator AFTER the last record served before it.
    let calls = double.calls();
    let mut expiries = 0;
    for (i, c) in calls.iter().enumerate() {
        if c.op != "GetRecords" || c.error_code.as_deref() != Some("ExpiredIteratorException") {
            continue;
        }
        expiries += 1;
        let last_served = calls[..i]
            .iter()
            .rev()
            .find(|p| p.op == "GetRecords" && p.last_sequence_number.is_some())
            .and_then(|p| p.last_sequence_number.clone());
        let next = calls[i + 1..]
            .iter()
            .find(|n| n.op == "GetShardIterator")
            .expect("a new iterator");
        match last_served {
            Some(seq) => {
                assert_eq!(next.iterator_type.as_deref(), Some("AFTER_SEQUENCE_NUMBER"));
                assert_eq!(next.sequence_number.as_deref(), Some(seq.as_str()));
            }
            None => assert_eq!(next.iterator_type.as_deref(), Some("TRIM_HORIZON")),
        }
        assert_eq!(next.shard_id.as_deref(), Some(shard.as_str()));
    }
    assert!(expiries >= 7, "only {expiries} expiries seen");
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// 30% of calls throttled and 10% failing with 5xx for 20 s while changes flow: nothing
/// lost, order kept, and the call rate stays bounded (backoff, no busy loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_storm_loses_nothing_and_backs_off() {
    storm("lean").await;
}

/// The same through `reader.get_records_client: sdk` (the AWS SDK's full request path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_storm_loses_nothing_and_backs_off_through_the_sdk_client() {
    storm("sdk").await;
}

async fn storm(get_records_client: &str) {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("storm");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["reader"]["get_records_client"] = json!(get_records_client);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let storm = Duration::from_secs(20);
    let started = Instant::now();
    double.fault(
        Fault::new(FaultKind::Throttle)
            .probability(0.3)
            .for_duration(storm),
    );
    double.fault(
        Fault::new(FaultKind::Http500)
            .probability(0.1)
            .for_duration(storm),
    );
    let mut n = 0;
    while started.elapsed() < storm {
        for _ in 0..10 {
            put_n(&double, &table, &format!("k{}", n % 7), n);
            n += 1;
        }
        // Paces the writes through the storm (10 every 100 ms); nothing waits on it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = consume(&topic, n as usize, Duration::from_secs(90)).await;
    assert_eq!(got.len(), n as usize, "{}", daemon.log_text());
    for (key, values) in values_by_key(&got) {
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "order of {key}");
    }
    let calls: Vec<_> = double
        .calls()
        .into_iter()
        .filter(|c| c.at >= started && c.at <= started + storm)
        .collect();
    let failed = calls.iter().filter(|c| c.fault.is_some()).count();
    let rate = calls.len() as f64 / storm.as_secs_f64();
    eprintln!(
        "storm: {} calls ({failed} failed) in {storm:?}: {rate:.1}/s; {n} changes delivered",
        calls.len()
    );
    assert!(failed > 10, "the storm did not hit: {failed}");
    // One shard, records arriving every 100 ms: a poll after each page plus backoff on
    // failures stays far below a busy loop (a busy loop makes thousands of calls a second).
    assert!(rate < 40.0, "{rate:.1} calls/s while throttled");
    let warnings = daemon.log_events("AWS call failed; retrying");
    assert!(!warnings.is_empty());
    assert!(warnings.iter().any(|w| w["kind"] == "Throttled"));
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// The daemon fell behind the 24 h retention: with `fail` it stops with an error naming the
/// shard; with `skip_to_trim_horizon` it emits one ERROR line and a DATA_LOSS marker on every
/// partition naming the lost range, and continues from the oldest record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_data_fails_loudly_or_skips_with_a_marker() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("trimmed");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    for i in 0..10 {
        put_n(&double, &table, "k", i);
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    assert_eq!(consume(&topic, 10, Duration::from_secs(30)).await.len(), 10);
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let checkpoint = dir
        .path()
        .join("cp")
        .join(&table)
        .join("shards")
        .join(format!("{shard}.json"));
    let cp: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let last = cp["sequence_number"].as_str().unwrap().to_owned();

    // While it is down, 20 more changes are written and the first 15 of them trimmed.
    let seqs: Vec<String> = (10..30).map(|i| put_n(&double, &table, "k", i)).collect();
    double.trim(&shard, &seqs[14]);

    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains(&shard) && log.contains("on_trimmed_data"),
        "{log}"
    );
    assert!(log.contains(&last), "the error names the checkpoint: {log}");
    // Nothing was skipped and the checkpoint did not move.
    let again: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    assert_eq!(again["sequence_number"], cp["sequence_number"]);
    assert_eq!(consume(&topic, 10, Duration::from_secs(2)).await.len(), 10);

    cfg["on_trimmed_data"] = json!("skip_to_trim_horizon");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // 10 + 3 markers (one a partition) + the 5 changes still held.
    let got = consume(&topic, 18, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 18, "{}", daemon.log_text());
    let markers: Vec<&Consumed> = got
        .iter()
        .filter(|r| {
            r.value
                .as_ref()
                .is_some_and(|v| v["event_name"] == "DATA_LOSS")
        })
        .collect();
    assert_eq!(markers.len(), 3);
    let partitions: HashSet<i32> = markers.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 3, "a marker on every partition");
    let m = markers[0].value.as_ref().unwrap();
    assert_eq!(m["shard_id"], json!(shard));
    assert_eq!(m["lost_after_sequence_number"], json!(last));
    assert_eq!(m["first_available_sequence_number"], json!(seqs[15]));
    let values: Vec<i64> = values_by_key(&got).into_values().flatten().collect();
    assert_eq!(values, (0..10).chain(25..30).collect::<Vec<_>>());
    let errors: Vec<Value> = daemon
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0]["message"].as_str().unwrap().contains("DATA LOSS"));
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// An item that cannot be converted, one whose event is over `kafka.max_message_bytes` and
/// one with an unknown event name: with `fail` the shard stops at the record before, loudly;
/// with `dead_letter` all go to the dead-letter topic and the shard continues. Their values
/// (a marker in keys, images and the event name) reach neither the log nor an error text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_fail_or_go_to_the_dead_letter_topic() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("poison");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    // Users' data: must not reach a log line or an error message.
    const MARKER: &str = "s3cr3t-M4RK3R";
    put_n(&double, &table, "a", 1);
    // Not a number in an N attribute.
    let bad_n = format!("1,5{MARKER}");
    let bad = double.push_record(
        &shard,
        RecordSpec::insert(
            json!({"pk": {"S": format!("b{MARKER}")}}),
            json!({"pk": {"S": format!("b{MARKER}")}, "n": {"N": bad_n},
                   "m": {"M": {"l": {"L": [{"S": MARKER}]}}}}),
        ),
    );
    // 20 KB, over a 10 KB limit.
    let big = double
        .put(
            &table,
            json!({"pk": {"S": "c"}, "blob": {"S": format!("{MARKER}{}", "x".repeat(20_000))}}),
        )
        .unwrap();
    let odd = double.push_raw_record(
        &shard,
        json!({"eventID": "x1", "eventName": MARKER, "eventSource": "aws:dynamodb",
               "dynamodb": {"Keys": {"pk": {"S": MARKER}}, "NewImage": {"pk": {"S": MARKER}},
                            "StreamViewType": "NEW_IMAGE"}}),
    );
    put_n(&double, &table, "d", 2);

    let topic = format!("t.{table}");
    let dlq = format!("dlq.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["kafka"]["max_message_bytes"] = json!(10_000);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    let log = daemon.log_text();
    assert!(
        log.contains("poison record") && log.contains(&bad) && log.contains("on_poison_record"),
        "{log}"
    );
    // The whole log, the final error ("dynamodb-cdc stopped") included.
    assert_eq!(daemon.log_events("dynamodb-cdc stopped").len(), 1, "{log}");
    assert!(!log.contains(MARKER), "{log}");
    let got = consume(&topic, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "only the record before the poison one");

    cfg["on_poison_record"] = json!("dead_letter");
    cfg["kafka"]["dead_letter_topic"] = json!(dlq);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 2, Duration::from_secs(30)).await;
    let letters = consume(&dlq, 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{}", daemon.log_text());
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(letters.len(), 3, "{}", daemon.log_text());
    let by_seq: HashMap<String, &Value> = letters
        .iter()
        .map(|l| {
            let v = l.value.as_ref().unwrap();
            (v["sequence_number"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let b = by_seq[&bad];
    assert!(b["error"].as_str().unwrap().contains("not a number"), "{b}");
    // The dead letter keeps the raw record, not its values in the error.
    assert!(!b["error"].as_str().unwrap().contains(MARKER), "{b}");
    assert_eq!(
        b["record"]["dynamodb"]["NewImage"]["n"],
        json!({"N": bad_n})
    );
    assert_eq!(b["shard_id"], json!(shard));
    let c = by_seq[&big];
    assert!(
        c["error"].as_str().unwrap().contains("max_message_bytes"),
        "{c}"
    );
    assert!(!c["error"].as_str().unwrap().contains(MARKER), "{c}");
    assert_eq!(c["record_truncated"], json!(true));
    assert_eq!(c["keys"], json!({"pk": {"S": "c"}}));
    let o = by_seq[&odd];
    let error = o["error"].as_str().unwrap();
    assert!(
        error.contains("unknown event name") && !error.contains(MARKER),
        "{o}"
    );
    assert_eq!(o["record"]["eventName"], json!(MARKER));
    assert_eq!(
        daemon
            .log_events("poison record sent to the dead-letter topic")
            .len(),
        3
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let log = daemon.log_text();
    assert!(!log.contains(MARKER), "{log}");
}

/// Stream disabled and re-enabled under a new ARN: the old stream is read to its end, the
/// new one from TRIM_HORIZON. Then the table is deleted: what the stream still holds is
/// delivered, and the daemon stops with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_stream_is_followed_and_a_deleted_table_stops_loudly() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("replaced");
    let old_arn = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    for i in 0..5 {
        put_n(&double, &table, "k", i);
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &double_config(&double, &[(&table, &topic)], dir.path()),
        &[],
    );
    assert_eq!(consume(&topic, 5, Duration::from_secs(30)).await.len(), 5);

    for i in 5..8 {
        put_n(&double, &table, "k", i);
    }
    double.disable_stream(&table);
    put_n_if_enabled(&double, &table);
    let new_arn = double.enable_new_stream(&table);
    assert_ne!(old_arn, new_arn);
    for i in 8..12 {
        put_n(&double, &table, "k", i);
    }
    let got = consume(&topic, 12, Duration::from_secs(30)).await;
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    assert!(!daemon
        .log_events("old stream read to its end; switching to the table's new stream")
        .is_empty());
    let new_iter = double
        .calls_to("GetShardIterator")
        .into_iter()
        .find(|c| c.stream_arn.as_deref() == Some(new_arn.as_str()))
        .unwrap();
    assert_eq!(new_iter.iterator_type.as_deref(), Some("TRIM_HORIZON"));

    for i in 12..14 {
        put_n(&double, &table, "k", i);
    }
    double.delete_table(&table);
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    let got = consume(&topic, 14, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 14, "what the stream held was delivered");
    assert!(
        daemon.log_text().contains("the table was deleted"),
        "{}",
        daemon.log_text()
    );
}

/// A write while the stream is disabled makes no record.
fn put_n_if_enabled(double: &StreamsDouble, table: &str) {
    assert!(double
        .put(table, json!({"pk": {"S": "k"}, "n": {"N": "-1"}}))
        .is_none());
}

/// STS down for longer than the refresh margin but less than the session's life: reading
/// goes on. STS down past expiry: reads stop with an ERROR line and resume by themselves
/// when STS returns. The role session is the only identity the Streams calls use, and the
/// session keys never reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_outages_within_and_past_the_session_life() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    double.set_sts_session_lifetime(Some(Duration::from_secs(30)));
    let table = unique("sts");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["aws"]["assume_role"] = json!({
        "role_arn": "arn:aws:iam::123456789012:role/cdc",
        "external_id": "ext-secret-42",
        "duration_seconds": 900,
        "refresh_before_expiry_seconds": 10
    });
    let t0 = Instant::now();
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let mut n = 0;
    let mut write = |double: &StreamsDouble| {
        put_n(double, &table, "k", n);
        n += 1;
        n as usize
    };
    write(&double);
    assert_eq!(
        consume(&topic, 1, Duration::from_secs(30)).await.len(),
        1,
        "{}",
        daemon.log_text()
    );
    let first = double.assume_role_calls();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].external_id.as_deref(), Some("ext-secret-42"));
    let session_start = first[0].at;

    // Outage 1: from 18 s to 28 s into a 30 s session whose refresh is due at 20 s.
    let outage = Fault::new(FaultKind::Unavailable).op("AssumeRole");
    // The outages are placed in the session's life: these sleeps are the schedule under
    // test, not waits for something to happen.
    let wait_until = |at: Duration| tokio::time::sleep_until((session_start + at).into());
    wait_until(Duration::from_secs(18)).await;
    let id = double.fault(outage.clone());
    wait_until(Duration::from_secs(24)).await;
    let during = write(&double);
    let got = consume(&topic, during, Duration::from_secs(3)).await;
    assert_eq!(
        got.len(),
        during,
        "a change during the outage arrived during the outage"
    );
    wait_until(Duration::from_secs(28)).await;
    double.clear_fault(id);
    let ok = double
        .wait_until(Duration::from_secs(5), |d| {
            d.assume_role_calls()
                .iter()
                .any(|c| c.status == 200 && c.at > session_start + Duration::from_secs(28))
        })
        .await;
    assert!(ok, "no refresh after STS returned:\n{}", daemon.log_text());
    assert!(daemon
        .log_events("role session expired and refresh failed; AWS calls fail until STS answers")
        .is_empty());

    // Outage 2: 25 s, past the new session's expiry.
    let renewed = double
        .assume_role_calls()
        .into_iter()
        .rfind(|c| c.status == 200)
        .unwrap();
    let id = double.fault(outage);
    let expired_at = renewed.at + Duration::from_secs(30);
    // Past the expiry (the subject: the session must have run out).
    tokio::time::sleep_until((expired_at + Duration::from_secs(2)).into()).await;
    let failed_reads = |daemon: &Daemon| {
        daemon
            .log_events("AWS call failed; retrying")
            .iter()
            .filter(|e| e["call"] == "GetRecords")
            .count()
    };
    let failed_before = failed_reads(&daemon);
    let blocked = write(&double);
    // The daemon tried to read after the write, and was refused.
    let tried = wait_for(Duration::from_secs(30), || {
        failed_reads(&daemon) > failed_before
    })
    .await;
    assert!(
        tried,
        "no failed GetRecords after the session expired:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        consume(&topic, blocked, Duration::from_secs(1)).await.len(),
        blocked - 1,
        "read without a valid session"
    );
    let back = Instant::now();
    double.clear_fault(id);
    let got = consume(&topic, blocked, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        blocked,
        "reads did not resume:\n{}",
        daemon.log_text()
    );
    eprintln!(
        "STS returned; reads resumed within {:?} (test ran {:?})",
        back.elapsed(),
        t0.elapsed()
    );
    assert!(!daemon
        .log_events("role session expired and refresh failed; AWS calls fail until STS answers")
        .is_empty());

    // Every Streams call was signed by a session the double issued, never the base key.
    let issued: HashSet<String> = double
        .assume_role_calls()
        .into_iter()
        .filter_map(|c| c.issued_access_key_id)
        .collect();
    for c in double.calls().iter().filter(|c| c.op != "AssumeRole") {
        let key = c.access_key_id.as_deref().unwrap_or("");
        assert!(issued.contains(key), "{} signed with {key}", c.op);
    }
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let log = daemon.log_text();
    assert!(
        !log.contains("ext-secret-42"),
        "the external id reached the log"
    );
    // Nor any file the daemon wrote.
    let mut written = String::new();
    let mut dirs = vec![dir.path().join("cp")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                written.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    assert!(
        written.contains("sequence_number"),
        "checkpoints were read: {written}"
    );
    for key in &issued {
        assert!(
            !log.contains(key.as_str()),
            "a session key id reached the log"
        );
        assert!(
            !written.contains(key.as_str()),
            "a session key id reached a file"
        );
    }
    assert!(!written.contains("ext-secret-42"));
}

/// Hostile or broken answers from the endpoint (malformed JSON, truncated bodies, dropped
/// connections) and records the converter cannot handle (unknown event name, no keys): clear
/// errors, retries or dead letters, never a panic, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_and_broken_records_never_panic() {
    hostile_answers("lean").await;
}

/// The same through `reader.get_records_client: sdk` (the AWS SDK's full request path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_and_broken_records_never_panic_through_the_sdk_client() {
    hostile_answers("sdk").await;
}

async fn hostile_answers(get_records_client: &str) {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("hostile");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    put_n(&double, &table, "a", 1);
    let unknown = double.push_raw_record(
        &shard,
        json!({"eventID": "x1", "eventName": "UPSERT", "eventSource": "aws:dynamodb",
               "dynamodb": {"Keys": {"pk": {"S": "z"}}, "StreamViewType": "NEW_IMAGE"}}),
    );
    let keyless = double.push_raw_record(
        &shard,
        json!({"eventID": "x2", "eventName": "INSERT", "eventSource": "aws:dynamodb",
               "dynamodb": {"NewImage": {"pk": {"S": "y"}}, "StreamViewType": "NEW_IMAGE"}}),
    );
    put_n(&double, &table, "b", 2);
    for body in [
        "not json at all",
        r#"{"Records": [{"dynamodb": 5}], "NextShardIterator": 7}"#,
        r#"{"Records": "#,
    ] {
        double.fault(
            Fault::new(FaultKind::Malformed(body.into()))
                .op("GetRecords")
                .times(1),
        );
    }
    double.fault(Fault::new(FaultKind::Truncated).op("GetRecords").times(2));
    double.fault(Fault::new(FaultKind::Drop).op("GetShardIterator").times(1));
    double.fault(
        Fault::new(FaultKind::Malformed("{".into()))
            .op("DescribeStream")
            .times(1),
    );

    let topic = format!("t.{table}");
    let dlq = format!("dlq.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["on_poison_record"] = json!("dead_letter");
    cfg["kafka"]["dead_letter_topic"] = json!(dlq);
    cfg["reader"]["get_records_client"] = json!(get_records_client);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 2, Duration::from_secs(60)).await;
    let letters = consume(&dlq, 3, Duration::from_secs(30)).await;
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        vec![1, 2],
        "{}",
        daemon.log_text()
    );
    let errors: HashMap<String, String> = letters
        .iter()
        .map(|l| {
            let v = l.value.as_ref().unwrap();
            (
                v["sequence_number"].as_str().unwrap().to_owned(),
                v["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The event name is the record's text: the dead letter's raw record keeps it, the
    // error does not.
    assert!(
        errors[&unknown].contains("unknown event name") && !errors[&unknown].contains("UPSERT"),
        "{errors:?}"
    );
    assert!(errors[&keyless].contains("no keys"), "{errors:?}");
    // Every fault was met and retried with a logged reason.
    let faults = double.calls().iter().filter(|c| c.fault.is_some()).count();
    assert_eq!(faults, 7);
    assert!(
        daemon.log_events("AWS call failed; retrying").len() >= 7,
        "{}",
        daemon.log_text()
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
    assert!(!daemon.log_text().contains("panicked"));
}

/// `start_position: latest`, and the shard's iterator expires before it read any record:
/// the changes made in between are still delivered (TRIM_HORIZON, skipping what was created
/// before the pipeline started), and nothing older is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_then_an_expired_iterator_before_the_first_record_loses_nothing() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("latest_expired");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    // The backlog of a brand-new pipeline, created a minute before it started.
    let minute_ago = chrono::Utc::now().timestamp() - 60;
    for n in 0..5 {
        let mut spec = RecordSpec::insert(
            json!({"pk": {"S": format!("old{n}")}}),
            json!({"pk": {"S": format!("old{n}")}, "n": {"N": n.to_string()}}),
        );
        spec.approximate_creation_epoch_s = Some(minute_ago as f64);
        double.push_record(&shard, spec);
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["start_position"] = json!("latest");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // The reader holds a LATEST iterator and polls with it.
    assert!(
        double
            .wait_until(Duration::from_secs(30), |d| d
                .calls_to("GetRecords")
                .iter()
                .any(|c| c.status == 200))
            .await,
        "{}",
        daemon.log_text()
    );
    // Every iterator it has or gets expires, while changes are written.
    let expiry = double.fault(Fault::new(FaultKind::Expired).op("GetRecords"));
    assert!(
        double
            .wait_until(Duration::from_secs(30), |d| {
                d.calls_to("GetRecords")
                    .iter()
                    .any(|c| c.error_code.as_deref() == Some("ExpiredIteratorException"))
            })
            .await
    );
    for n in 100..120 {
        put_n(&double, &table, &format!("new{n}"), n);
    }
    double.clear_fault(expiry);
    let got = consume(&topic, 20, Duration::from_secs(60)).await;
    let mut values: Vec<i64> = values_by_key(&got).into_values().flatten().collect();
    values.sort();
    assert_eq!(
        values,
        (100..120).collect::<Vec<_>>(),
        "the changes written while the iterator was expired, and none of the backlog:\n{}",
        daemon.log_text()
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// An iterator that keeps expiring: the reader backs off between new iterators instead of
/// hammering GetShardIterator, and reads on once the stream answers again. SIGHUP on the
/// way reloads the unchanged file: nothing added, removed or restarted (it used to kill the
/// process without a drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_expiries_back_off_and_sighup_reloads_nothing() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("expiry_storm");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &double_config(&double, &[(&table, &topic)], dir.path()),
        &[],
    );
    assert!(
        double
            .wait_until(Duration::from_secs(30), |d| d
                .calls_to("GetRecords")
                .iter()
                .any(|c| c.status == 200))
            .await
    );
    daemon.signal("HUP");
    let reloaded = wait_for_log(&daemon, "config reloaded", Duration::from_secs(10)).await;
    assert_eq!(
        (&reloaded[0]["added"], &reloaded[0]["removed"]),
        (&json!(0), &json!(0)),
        "{reloaded:?}"
    );
    assert!(daemon
        .log_events("config reload: these keys changed and need a restart (systemctl restart dynamodb-cdc); their running values are kept")
        .is_empty());
    let storm = Duration::from_secs(4);
    let before = double.calls_to("GetShardIterator").len();
    let expiry = double.fault(Fault::new(FaultKind::Expired).op("GetRecords"));
    let started = Instant::now();
    // The storm's length is the subject of the test, not a synchronisation.
    tokio::time::sleep(storm).await;
    double.clear_fault(expiry);
    let during = double.calls_to("GetShardIterator").len() - before;
    let elapsed = started.elapsed();
    // Backoff from 100 ms doubling: about 6 new iterators in 4 s; without it, hundreds.
    assert!(
        (2..=15).contains(&during),
        "{during} GetShardIterator calls in {elapsed:?} of expiries:\n{}",
        daemon.log_text()
    );
    for n in 0..10 {
        put_n(&double, &table, &format!("k{n}"), n);
    }
    let got = consume(&topic, 10, Duration::from_secs(60)).await;
    assert_eq!(values_by_key(&got).len(), 10);
    assert!(
        daemon.try_status().is_none(),
        "SIGHUP must not stop the daemon"
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// 200 quiet shards all get a burst at once: the memory budget holds (before, a shard
/// whose last page was empty reserved nothing and read a whole page anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_many_quiet_shards_stays_within_the_memory_budget() {
    if !stack_available() {
        return;
    }
    const SHARDS: usize = 200;
    const PER_SHARD: usize = 300;
    const BUDGET_MIB: u64 = 8;
    // What the budget does not count, measured: allocator caches and the HTTP client's
    // per-connection buffers (about 26 MiB over idle with 200 shards, whatever the budget:
    // 2, 8 or 64 MiB); before the fix the same burst took 84 MiB over idle.
    const FIXED_OVERHEAD_MIB: u64 = 32;
    let double = StreamsDouble::start().await;
    let table = unique("burst");
    let arn = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewAndOldImages);
    let mut shards = double.open_shards(&table);
    while shards.len() < SHARDS {
        shards.push(double.add_shard(&arn, None));
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["kafka"]["max_buffered_bytes"] = json!(BUDGET_MIB << 20);
    cfg["kafka"]["create_topics"]["partitions"] = json!(1);
    // Small produce requests: Kafka drains slower than the shards read, so pages pile up
    // wherever the budget lets them.
    cfg["kafka"]["batch_max_records"] = json!(25);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // Every shard polled at least twice (an empty page, then quiet).
    assert!(
        double
            .wait_until(Duration::from_secs(60), |d| {
                let mut polls: HashMap<String, usize> = HashMap::new();
                for c in d.calls_to("GetRecords") {
                    *polls.entry(c.shard_id.unwrap_or_default()).or_default() += 1;
                }
                polls.len() >= SHARDS && polls.values().all(|n| *n >= 2)
            })
            .await,
        "{}",
        daemon.log_text()
    );
    let idle_kib = daemon.status_kib("VmRSS");
    // ~1.6 KB items, both images: ~200 MB of converted changes if every shard read its
    // burst at once.
    let filler = "x".repeat(800);
    for (i, shard) in shards.iter().enumerate() {
        for j in 0..PER_SHARD {
            let key = format!("s{i}-k{j}");
            double.push_record(
                shard,
                RecordSpec::modify(
                    json!({"pk": {"S": key}}),
                    json!({"pk": {"S": key}, "f": {"S": filler}, "n": {"N": "0"}}),
                    json!({"pk": {"S": key}, "f": {"S": filler}, "n": {"N": j.to_string()}}),
                ),
            );
        }
    }
    let total = SHARDS * PER_SHARD;
    let got = consume(&topic, total, Duration::from_secs(240)).await;
    assert_eq!(got.len(), total, "{}", daemon.log_text());
    let peak_kib = daemon.status_kib("VmHWM");
    let over_idle_mib = peak_kib.saturating_sub(idle_kib) / 1024;
    report(&format!(
        "burst on {SHARDS} shards: idle RSS {} MiB, peak {} MiB ({over_idle_mib} MiB over idle; budget {BUDGET_MIB} MiB)",
        idle_kib / 1024,
        peak_kib / 1024
    ));
    assert!(
        over_idle_mib <= BUDGET_MIB + FIXED_OVERHEAD_MIB,
        "peak RSS {over_idle_mib} MiB over idle with a {BUDGET_MIB} MiB budget"
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// The saved state of a table (`<checkpoint dir>/<table>/table.json`).
fn table_state(dir: &std::path::Path, table: &str) -> Value {
    let path = dir.join("cp").join(table).join("table.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A stream replaced while the daemon is down, and a daemon stopped while it drains a
/// replaced stream: after the restart the old stream's tail is read to its end first, so
/// every record of it is in Kafka, before the new stream's records of the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_old_streams_tail_before_the_new_stream() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("redrain");
    let first = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = double_config(&double, &[(&table, &topic)], dir.path());
    for i in 0..5 {
        put_n(&double, &table, "k", i);
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    assert_eq!(consume(&topic, 5, Duration::from_secs(30)).await.len(), 5);
    assert!(daemon.stop(Duration::from_secs(30)).success());

    // Replaced while the daemon is down.
    for i in 5..8 {
        put_n(&double, &table, "k", i);
    }
    let second = double.enable_new_stream(&table);
    for i in 8..12 {
        put_n(&double, &table, "k", i);
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 12, Duration::from_secs(30)).await;
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>(),
        "{}",
        daemon.log_text()
    );
    wait_for_log(
        &daemon,
        "old stream read to its end; switching to the table's new stream",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(table_state(dir.path(), &table)["stream_arn"], json!(second));
    assert_ne!(first, second);

    // Stopped mid-drain: the second stream's shard answers nothing while it is replaced.
    let shard = double.open_shards(&table)[0].clone();
    let stuck = double.fault(
        Fault::new(FaultKind::Unavailable)
            .op("GetRecords")
            .shard(&shard),
    );
    for i in 12..15 {
        put_n(&double, &table, "k", i);
    }
    let third = double.enable_new_stream(&table);
    for i in 15..18 {
        put_n(&double, &table, "k", i);
    }
    // The daemon saw the third stream and saved that the second one is being drained.
    let deadline = Instant::now() + Duration::from_secs(30);
    while table_state(dir.path(), &table)["next_stream_arn"] != json!(third) {
        assert!(
            Instant::now() < deadline,
            "the drain was not persisted: {}\n{}",
            table_state(dir.path(), &table),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(table_state(dir.path(), &table)["stream_arn"], json!(second));
    assert!(daemon.stop(Duration::from_secs(30)).success());
    assert_eq!(
        consume(&topic, 13, Duration::from_secs(2)).await.len(),
        12,
        "the tail was not read before the stop"
    );

    double.clear_fault(stuck);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 18, Duration::from_secs(30)).await;
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        (0..18).collect::<Vec<_>>(),
        "{}",
        daemon.log_text()
    );
    let third_iter = double
        .calls_to("GetShardIterator")
        .into_iter()
        .find(|c| c.stream_arn.as_deref() == Some(third.as_str()))
        .expect("the third stream is read");
    assert_eq!(third_iter.iterator_type.as_deref(), Some("TRIM_HORIZON"));
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let state = table_state(dir.path(), &table);
    assert_eq!(state["stream_arn"], json!(third));
    assert!(state.get("next_stream_arn").is_none(), "{state}");
}

/// The old stream is gone before the restart could drain it: with `fail` the table stops
/// with an error naming the old stream; with `skip_to_trim_horizon` one ERROR line and a
/// DATA_LOSS marker on every partition, then the new stream is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_stream_lost_while_down_fails_or_leaves_a_data_loss_marker() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("lostold");
    let old = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let old_shard = double.open_shards(&table)[0].clone();
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    for i in 0..5 {
        put_n(&double, &table, "k", i);
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    assert_eq!(consume(&topic, 5, Duration::from_secs(30)).await.len(), 5);
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let checkpoint = dir
        .path()
        .join("cp")
        .join(&table)
        .join("shards")
        .join(format!("{old_shard}.json"));
    let cp: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let last = cp["sequence_number"].as_str().unwrap().to_owned();

    for i in 5..8 {
        put_n(&double, &table, "k", i);
    }
    let new = double.enable_new_stream(&table);
    for i in 8..12 {
        put_n(&double, &table, "k", i);
    }

    // The old stream does not exist any more (DescribeStream: ResourceNotFound).
    double.fault(
        Fault::new(FaultKind::NotFound)
            .op("DescribeStream")
            .times(1),
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("the old stream {old} can no longer be read"))
            && log.contains("on_trimmed_data"),
        "{log}"
    );
    assert_eq!(consume(&topic, 6, Duration::from_secs(2)).await.len(), 5);
    assert_eq!(table_state(dir.path(), &table)["stream_arn"], json!(old));
    assert!(double
        .calls_to("GetShardIterator")
        .iter()
        .all(|c| c.stream_arn.as_deref() != Some(new.as_str())));

    // Its shard trimmed away: skip, with a marker.
    double.trim_shard_entirely(&old_shard);
    cfg["on_trimmed_data"] = json!("skip_to_trim_horizon");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // 5 + 3 markers (one a partition) + the new stream's 4.
    let got = consume(&topic, 12, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 12, "{}", daemon.log_text());
    let markers: Vec<&Consumed> = got
        .iter()
        .filter(|r| {
            r.value
                .as_ref()
                .is_some_and(|v| v["event_name"] == "DATA_LOSS")
        })
        .collect();
    assert_eq!(markers.len(), 3);
    let partitions: HashSet<i32> = markers.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 3, "a marker on every partition");
    let m = markers[0].value.as_ref().unwrap();
    assert_eq!(m["stream_arn"], json!(old));
    assert_eq!(m["shard_id"], json!(old_shard));
    assert_eq!(m["lost_after_sequence_number"], json!(last));
    assert_eq!(
        values_by_key(&got)
            .into_values()
            .flatten()
            .collect::<Vec<_>>(),
        (0..5).chain(8..12).collect::<Vec<_>>()
    );
    let errors: Vec<Value> = daemon
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0]["message"].as_str().unwrap().contains("DATA LOSS"));
    assert!(daemon.stop(Duration::from_secs(30)).success());
    assert_eq!(table_state(dir.path(), &table)["stream_arn"], json!(new));
}

/// 40 shards end together (each rolls over to one child): one listing (its pages) and one
/// DescribeTable serve every end before the children start, not one listing an end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_ending_together_cost_one_listing() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("coalesce");
    let arn = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    for _ in 1..40 {
        double.add_shard(&arn, None);
    }
    let parents = double.open_shards(&table);
    assert_eq!(parents.len(), 40);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    // No timed rescan in the window: only shard ends ask for listings.
    cfg["reader"]["rescan_interval_ms"] = json!(600_000);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let started = |d: &StreamsDouble, shards: &[String]| {
        let iterated: HashSet<String> = d
            .calls_to("GetShardIterator")
            .into_iter()
            .filter_map(|c| c.shard_id)
            .collect();
        shards.iter().all(|s| iterated.contains(s))
    };
    assert!(
        double
            .wait_until(Duration::from_secs(30), |d| started(d, &parents))
            .await,
        "{}",
        daemon.log_text()
    );

    // Every shard rolls over while no reader can see it; then they all see their end.
    let hold = double.fault(Fault::new(FaultKind::Unavailable).op("GetRecords"));
    let children: Vec<String> = parents.iter().flat_map(|p| double.split(p, 1)).collect();
    double.clear_fault(hold);
    assert!(
        double
            .wait_until(Duration::from_secs(60), |d| started(d, &children))
            .await,
        "{}",
        daemon.log_text()
    );

    let calls = double.calls();
    let parent_set: HashSet<&String> = parents.iter().collect();
    let first_end = calls
        .iter()
        .position(|c| {
            c.op == "GetRecords"
                && c.shard_end
                && c.shard_id.as_ref().is_some_and(|s| parent_set.contains(s))
        })
        .expect("a parent ended");
    let ends = calls
        .iter()
        .filter(|c| c.op == "GetRecords" && c.shard_end)
        .count();
    assert_eq!(ends, 40);
    // The last child's first GetShardIterator.
    let last_child_start = children
        .iter()
        .map(|child| {
            calls
                .iter()
                .position(|c| c.op == "GetShardIterator" && c.shard_id.as_ref() == Some(child))
                .unwrap()
        })
        .max()
        .unwrap();
    let window = &calls[first_end..=last_child_start];
    let listings = window
        .iter()
        .filter(|c| c.op == "DescribeStream" && c.exclusive_start_shard_id.is_none())
        .count();
    let describe_tables = window.iter().filter(|c| c.op == "DescribeTable").count();
    eprintln!("40 shard ends: {listings} listings, {describe_tables} DescribeTable calls");
    assert_eq!(listings, 1, "one listing for every end");
    assert_eq!(describe_tables, 1);
    assert!(daemon.stop(Duration::from_secs(30)).success());
}
