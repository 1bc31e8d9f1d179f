//! Snapshots where moto cannot show it: the read budget against scripted ConsumedCapacity and
//! throttling, `on_trimmed_data: resnapshot`, and start positions against scripted creation
//! times. The daemon talks to the Streams double (tests/common/streams_double.rs) through
//! the real AWS SDK, and to the real Kafka broker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::streams_double::{Fault, FaultKind, KeySchema, RecordSpec, StreamsDouble, ViewType};
use common::*;
use serde_json::{json, Value};

fn values(records: &[Consumed]) -> Vec<&Value> {
    records.iter().filter_map(|r| r.value.as_ref()).collect()
}

/// The double reports 128 read units a page; with a budget of 256 units/s, the scan's pages
/// are spaced by what they consumed: over the calls the double recorded, no interval saw
/// more than the rate times its length plus one page per segment. Throttled Scans
/// (ProvisionedThroughputExceeded) are backed off and retried, never fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_budget_paces_the_scan_and_throttling_is_not_fatal() {
    if !stack_available() {
        return;
    }
    const UNITS: f64 = 128.0;
    const RATE: f64 = 256.0;
    const SEGMENTS: usize = 4;
    let double = StreamsDouble::start().await;
    let table = unique("budget");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    // 20 pages of 100 items over 4 segments (about 5 each, some a page more or less).
    double.add_generated_items(&table, 2000, 200);
    double.set_scan_units_per_page(&table, Some(UNITS));
    double.fault(
        Fault::new(FaultKind::Throttle)
            .op("Scan")
            .probability(0.2)
            .times(6),
    );
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["sync_mode"] = json!("snapshot");
    cfg["snapshot"] =
        json!({"segments": SEGMENTS, "page_items": 100, "max_read_units_per_second": RATE});
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(90)).await;
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());

    let calls = double.calls_to("Scan");
    let throttled = calls.iter().filter(|c| c.status == 400).count();
    let mut ok: Vec<_> = calls.iter().filter(|c| c.status == 200).collect();
    ok.sort_by_key(|c| c.at);
    assert!(ok.len() >= 20, "{} pages", ok.len());
    let t0 = ok[0].at;
    let mut consumed = 0.0;
    for (k, c) in ok.iter().enumerate() {
        // Units of the pages before this one, beyond one page per segment, must have been
        // paid for by the time it started.
        let owed = (consumed - UNITS * (SEGMENTS as f64 - 1.0)).max(0.0);
        let at = c.at.duration_since(t0).as_secs_f64();
        assert!(
            at + 0.02 >= owed / RATE,
            "page {k} started at {at:.3} s, before {owed} units were paid for ({:.3} s)",
            owed / RATE
        );
        consumed += c.capacity_units.unwrap_or(0.0);
    }
    let span = ok.last().unwrap().at.duration_since(t0).as_secs_f64();
    let implied = (UNITS * (ok.len() - SEGMENTS) as f64) / RATE;
    report(&format!(
        "read budget: {} pages of {UNITS} units at {RATE}/s over {span:.2} s (the budget implies \
         >= {implied:.2} s); {throttled} throttled Scans retried",
        ok.len()
    ));
    assert!(span + 0.02 >= implied, "{span} < {implied}");
    // Every item once (a throttled Scan read nothing).
    let got = consume(&topic, 2000, Duration::from_secs(30)).await;
    let keys: HashSet<String> = values(&got)
        .iter()
        .map(|v| v["keys"]["pk"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 2000);
    assert_eq!(values(&got).len(), 2000);
}

/// `on_trimmed_data: resnapshot`: the checkpoint's records were trimmed while the daemon was
/// down. On restart: the DATA_LOSS marker on every partition, then a SNAPSHOT row of every
/// item, then the changes made after the load started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_after_trimmed_data_delivers_marker_items_then_the_stream() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("resnap");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    let put = |key: &str, n: i64| {
        double
            .put(&table, json!({"pk": {"S": key}, "n": {"N": n.to_string()}}))
            .expect("stream enabled")
    };
    for i in 0..10 {
        put(&format!("k{i}"), i);
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["on_trimmed_data"] = json!("resnapshot");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    assert_eq!(consume(&topic, 10, Duration::from_secs(30)).await.len(), 10);
    assert!(daemon.stop(Duration::from_secs(30)).success());

    // While it is down: 20 changes to 20 keys (10 of them new), the first 15 trimmed.
    let seqs: Vec<String> = (10..30).map(|i| put(&format!("k{}", i - 5), i)).collect();
    double.trim(&shard, &seqs[14]);
    // The 5 changes the stream still holds predate the reload by more than its margin.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let table_items: BTreeMap<String, i64> = double
        .items(&table)
        .iter()
        .map(|i| {
            (
                i["pk"]["S"].as_str().unwrap().to_owned(),
                i["n"]["N"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(table_items.len(), 25);

    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    wait_for_log(&daemon, "snapshot complete", Duration::from_secs(60)).await;
    put("k0", 100);
    put("new", 101);
    let want = 10 + 3 + table_items.len() + 2;
    let got = consume(&topic, want, Duration::from_secs(60)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let all = consume(&topic, got.len(), Duration::from_secs(2)).await;
    assert_eq!(values(&all).len(), want, "{}", daemon.log_text());

    let mut per_partition: HashMap<i32, Vec<&Value>> = HashMap::new();
    for r in &all {
        if let Some(v) = &r.value {
            per_partition.entry(r.partition).or_default().push(v);
        }
    }
    let mut rows: BTreeMap<String, i64> = BTreeMap::new();
    let mut markers = 0;
    for (partition, events) in &per_partition {
        // In each partition: the first run's changes, the marker, the SNAPSHOT rows, then
        // the changes made after the reload started.
        let kinds: Vec<&str> = events
            .iter()
            .map(|v| v["event_name"].as_str().unwrap())
            .collect();
        let marker = kinds
            .iter()
            .position(|k| *k == "DATA_LOSS")
            .unwrap_or_else(|| panic!("partition {partition}: no marker: {kinds:?}"));
        markers += 1;
        assert!(kinds[..marker].iter().all(|k| *k == "INSERT"), "{kinds:?}");
        let first_later_change = kinds[marker + 1..]
            .iter()
            .position(|k| *k != "SNAPSHOT")
            .map_or(kinds.len(), |p| p + marker + 1);
        assert!(
            kinds[first_later_change..]
                .iter()
                .all(|k| *k == "INSERT" || *k == "MODIFY"),
            "partition {partition}: {kinds:?}"
        );
        for v in &events[marker + 1..first_later_change] {
            rows.insert(
                v["keys"]["pk"].as_str().unwrap().to_owned(),
                v["new_image"]["n"].as_i64().unwrap(),
            );
        }
        for v in &events[first_later_change..] {
            let n = v["new_image"]["n"].as_i64().unwrap();
            assert!(
                n >= 100,
                "a change the reload already covered came out: {v}"
            );
        }
    }
    assert_eq!(markers, 3, "a marker on every partition");
    assert_eq!(
        rows, table_items,
        "every item again, with its value at the reload"
    );
    let m = values(&all)
        .into_iter()
        .find(|v| v["event_name"] == "DATA_LOSS")
        .unwrap()
        .clone();
    assert_eq!(m["shard_id"], json!(shard));
    // The reload is checkpointed: the trimmed shard reads on from the reload's start.
    let cp: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("cp").join(&table).join("snapshot.json")).unwrap(),
    )
    .unwrap();
    assert!(cp["completed_at_ms"].is_i64(), "{cp}");
}

/// `at_timestamp` against scripted creation times: records created before the time are
/// skipped, also after a restart that resumes from a checkpoint taken while still skipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_skips_by_the_records_creation_time_across_a_restart() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("at_ts_double");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let shard = double.open_shards(&table)[0].clone();
    let now = chrono::Utc::now().timestamp();
    let at = now - 3600;
    // 3000 records from two hours to one hour ago, then 5 from the time on.
    for i in 0..3000 {
        let mut r = RecordSpec::insert(
            json!({"pk": {"S": format!("old{i}")}}),
            json!({"pk": {"S": format!("old{i}")}}),
        );
        r.approximate_creation_epoch_s = Some((now - 7200 + i) as f64);
        double.push_record(&shard, r);
    }
    for i in 0..5 {
        let mut r = RecordSpec::insert(
            json!({"pk": {"S": format!("new{i}")}}),
            json!({"pk": {"S": format!("new{i}")}}),
        );
        r.approximate_creation_epoch_s = Some((at + i) as f64);
        double.push_record(&shard, r);
    }
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["start_position"] = json!({
        "at_timestamp": chrono::DateTime::from_timestamp(at, 0).unwrap().to_rfc3339()
    });
    // Small pages: the first run stops after a checkpoint inside the skipped records.
    double.fault(
        Fault::new(FaultKind::Slow(Duration::from_millis(300)))
            .op("GetRecords")
            .probability(1.0),
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let cp_file = dir
        .path()
        .join("cp")
        .join(&table)
        .join("shards")
        .join(format!("{shard}.json"));
    let start = Instant::now();
    while !cp_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let cp: Value = serde_json::from_slice(&std::fs::read(&cp_file).unwrap()).unwrap();
    let first_run = consume(&topic, 0, Duration::from_secs(1)).await;
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 5, Duration::from_secs(60)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let mut keys: Vec<String> = values(&got)
        .iter()
        .map(|v| v["keys"]["pk"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    report(&format!(
        "at_timestamp: first run stopped at {} with {} records out; after the restart {:?}",
        cp["sequence_number"],
        first_run.len(),
        keys
    ));
    assert_eq!(keys, (0..5).map(|i| format!("new{i}")).collect::<Vec<_>>());
}

/// Two tables of 4 KB items scanned at once by 32 segments each (1 MB pages: 64 MB and more
/// if every segment held a page) stay within `kafka.max_buffered_bytes` plus the fixed
/// overhead the budget does not count (allocator caches, HTTP connection buffers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_many_segments_and_tables_stay_within_the_memory_budget() {
    if !stack_available() {
        return;
    }
    const BUDGET_MIB: u64 = 8;
    // As in faults.rs: measured ~26 MiB over idle with 200 connections, whatever the budget.
    const FIXED_OVERHEAD_MIB: u64 = 32;
    const ITEMS: usize = 8000;
    let double = StreamsDouble::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tables: Vec<String> = (0..2).map(|i| unique(&format!("mem{i}"))).collect();
    for t in &tables {
        double.add_table(t, KeySchema::hash("pk"), ViewType::NewImage);
        double.add_generated_items(t, ITEMS, 4096);
    }
    // The first Scans wait, so that the daemon's RSS before any page is its idle one.
    double.fault(
        Fault::new(FaultKind::Slow(Duration::from_secs(3)))
            .op("Scan")
            .times(4),
    );
    let mut cfg = config(
        &tables
            .iter()
            .map(|t| (t.as_str(), t.as_str()))
            .collect::<Vec<_>>(),
        None,
        &dir.path().join("cp"),
    );
    cfg["aws"]["endpoint_url"] = json!(double.endpoint());
    cfg["sync_mode"] = json!("snapshot_cdc");
    cfg["snapshot"] = json!({"segments": 32});
    cfg["kafka"]["max_buffered_bytes"] = json!(BUDGET_MIB << 20);
    cfg["kafka"]["create_topics"]["partitions"] = json!(1);
    // Small produce requests: Kafka drains slower than the scan reads.
    cfg["kafka"]["batch_max_records"] = json!(25);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // Both scans started, their first Scans held by the double: nothing read yet.
    let start = Instant::now();
    while daemon.log_events("snapshot started").len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_kib = daemon.status_kib("VmRSS");
    let start = Instant::now();
    while daemon.log_events("snapshot complete").len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{}",
            daemon.log_text()
        );
        assert!(daemon.try_status().is_none(), "{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak_kib = daemon.status_kib("VmHWM");
    assert!(daemon.stop(Duration::from_secs(30)).success());
    for t in &tables {
        let got = consume(t, ITEMS, Duration::from_secs(60)).await;
        assert_eq!(values(&got).len(), ITEMS, "{t}");
    }
    let over_idle_mib = peak_kib.saturating_sub(idle_kib) / 1024;
    report(&format!(
        "snapshot of 2 x {ITEMS} items of 4 KB, 64 segments: idle RSS {} MiB, peak {} MiB \
         ({over_idle_mib} MiB over idle; budget {BUDGET_MIB} MiB)",
        idle_kib / 1024,
        peak_kib / 1024
    ));
    assert!(
        over_idle_mib <= BUDGET_MIB + FIXED_OVERHEAD_MIB,
        "peak RSS {over_idle_mib} MiB over idle with a {BUDGET_MIB} MiB budget"
    );
}

/// Scan phases against the double's clock: changes written while a slow snapshot_cdc scan
/// runs in 1 s phases. No SNAPSHOT row comes out after a change to its item that was made
/// (by the double's clock) later than the row was read; every change arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_phases_never_put_a_row_after_a_later_change() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("phases");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let items: Vec<Value> = (0..600)
        .map(|i| json!({"pk": {"S": format!("k{i:03}")}, "n": {"N": "0"}}))
        .collect();
    double.insert_items(&table, items);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["sync_mode"] = json!("snapshot_cdc");
    // 600 items in pages of 20 over 2 segments at 5 pages a second: ~6 s in 1 s phases.
    cfg["snapshot"] = json!({"segments": 2, "page_items": 20, "max_read_units_per_second": 5, "scan_phase_seconds": 1});
    double.set_scan_units_per_page(&table, Some(1.0));
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    wait_for_log(&daemon, "snapshot started", Duration::from_secs(30)).await;
    // While it scans: each key changed once, in key order, every 10 ms.
    let mut written = 0;
    while daemon.log_events("snapshot complete").is_empty() && written < 600 {
        double.put(
            &table,
            json!({"pk": {"S": format!("k{written:03}")}, "n": {"N": "1"}}),
        );
        written += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_log(&daemon, "snapshot complete", Duration::from_secs(60)).await;
    let phases = daemon
        .log_events("snapshot paused: the stream catches up before the scan goes on")
        .len();
    let got = consume(&topic, 600 + written, Duration::from_secs(60)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let mut by_key: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for v in values(&got) {
        by_key
            .entry(v["keys"]["pk"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    let mut before_row = 0;
    for (key, evs) in &by_key {
        let rows: Vec<usize> = (0..evs.len())
            .filter(|&i| evs[i]["event_name"] == "SNAPSHOT")
            .collect();
        assert_eq!(rows.len(), 1, "{key}: {evs:?}");
        let row = evs[rows[0]];
        let read_ms = row["approximate_creation_time_ms"].as_i64().unwrap();
        for e in &evs[..rows[0]] {
            before_row += 1;
            let made_ms = e["approximate_creation_time_ms"].as_i64().unwrap();
            assert!(
                made_ms <= read_ms,
                "{key}: row read at {read_ms} after a change at {made_ms}"
            );
            // The row read after the change holds it.
            assert_eq!(row["new_image"]["n"], 1, "{key}");
        }
    }
    assert_eq!(by_key.len(), 600);
    let changes = values(&got).len() - 600;
    assert_eq!(changes, written, "every change arrives once");
    report(&format!(
        "scan phases: {written} changes during a scan of 600 items in {} phases; {before_row} \
         changes came out before their item's row (all made before it was read)",
        phases + 1
    ));
    assert!(phases >= 2, "{}", daemon.log_text());
}

/// An item a snapshot cannot produce (here: larger than `kafka.max_message_bytes`): `fail`
/// stops the load naming the segment and the setting (never the item's values);
/// `dead_letter` sends it to the dead-letter topic (key attributes, the reason) and loads
/// the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_item_too_large_fails_or_goes_to_the_dead_letter_topic() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("poison_snap");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewImage);
    let mut items: Vec<Value> = (0..50)
        .map(|i| json!({"pk": {"S": format!("k{i:02}")}, "n": {"N": "1"}}))
        .collect();
    let secret = "SECRET-VALUE-".repeat(400);
    items.push(json!({"pk": {"S": "big"}, "pad": {"S": secret}}));
    double.insert_items(&table, items);
    let topic = format!("t.{table}");
    let dlq = format!("t.{table}.dlq");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = double_config(&double, &[(&table, &topic)], dir.path());
    cfg["sync_mode"] = json!("snapshot");
    cfg["snapshot"] = json!({"segments": 1});
    cfg["kafka"]["max_message_bytes"] = json!(3000);
    cfg["kafka"]["dead_letter_topic"] = json!(dlq);

    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains("snapshot segment 0") && log.contains("kafka.max_message_bytes"),
        "{log}"
    );
    assert!(
        !log.contains("SECRET-VALUE"),
        "an item value reached the log"
    );

    cfg["on_poison_record"] = json!("dead_letter");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", daemon.log_text());
    assert!(!daemon.log_text().contains("SECRET-VALUE"));
    let rows = consume(&topic, 50, Duration::from_secs(30)).await;
    let keys: HashSet<String> = values(&rows)
        .iter()
        .filter(|v| v["event_name"] == "SNAPSHOT")
        .map(|v| v["keys"]["pk"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 50);
    assert!(!keys.contains("big"));
    let letters = consume(&dlq, 1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1);
    let letter = letters[0].value.as_ref().unwrap();
    assert_eq!(letter["keys"], json!({"pk": {"S": "big"}}));
    assert_eq!(letter["table"], json!(table));
    assert_eq!(letter["record_truncated"], json!(true));
    assert!(letter["error"]
        .as_str()
        .unwrap()
        .contains("kafka.max_message_bytes"));
    assert_eq!(letters[0].headers["dynamodb.event_name"], "DEAD_LETTER");
}
