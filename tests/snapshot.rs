//! Snapshots (initial load) end to end: moto (DynamoDB Scan + Streams) -> dynamodb-cdc ->
//! Kafka (tansu).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, StreamViewType, WriteRequest};
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

/// Item `i` of the seeded table: every attribute type, exact numbers.
fn item(i: usize) -> HashMap<String, AttributeValue> {
    let b64 = |b: &[u8]| Blob::new(b.to_vec());
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(format!("item-{i:05}"))),
        ("s".to_owned(), AttributeValue::S(format!("text {i} é ✓"))),
        (
            "n".to_owned(),
            AttributeValue::N(format!("1234567890123456789012345678.{i:04}")),
        ),
        ("neg".to_owned(), AttributeValue::N(format!("-{i}"))),
        (
            "b".to_owned(),
            AttributeValue::B(b64(&[0, 255, (i % 256) as u8])),
        ),
        ("flag".to_owned(), AttributeValue::Bool(i.is_multiple_of(2))),
        ("nothing".to_owned(), AttributeValue::Null(true)),
        (
            "m".to_owned(),
            AttributeValue::M(HashMap::from([
                ("depth".to_owned(), AttributeValue::N("1".into())),
                (
                    "inner".to_owned(),
                    AttributeValue::M(HashMap::from([(
                        "x".to_owned(),
                        AttributeValue::S(format!("{i}")),
                    )])),
                ),
            ])),
        ),
        (
            "l".to_owned(),
            AttributeValue::L(vec![
                AttributeValue::S("a".into()),
                AttributeValue::N("0.000000000000000000000000000000000001".into()),
                AttributeValue::Bool(false),
            ]),
        ),
        (
            "ss".to_owned(),
            AttributeValue::Ss(vec!["x".into(), format!("y{i}")]),
        ),
        (
            "ns".to_owned(),
            AttributeValue::Ns(vec![
                "1".into(),
                "99999999999999999999999999999999999999".into(),
            ]),
        ),
        (
            "bs".to_owned(),
            AttributeValue::Bs(vec![b64(&[1]), b64(&[2, 3])]),
        ),
    ])
}

/// What the daemon must write for [`item`] `i` (sets sorted, as they are compared sorted).
fn expected_image(i: usize) -> Value {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let number = |t: &str| Value::Number(serde_json::from_str(t).unwrap());
    json!({
        "pk": format!("item-{i:05}"),
        "s": format!("text {i} é ✓"),
        "n": number(&format!("1234567890123456789012345678.{i:04}")),
        "neg": number(&format!("-{i}")),
        "b": b64(&[0, 255, (i % 256) as u8]),
        "flag": i.is_multiple_of(2),
        "nothing": null,
        "m": {"depth": number("1"), "inner": {"x": format!("{i}")}},
        "l": ["a", number("0.000000000000000000000000000000000001"), false],
        "ss": ["x", format!("y{i}")],
        "ns": [number("1"), number("99999999999999999999999999999999999999")],
        "bs": [b64(&[1]), b64(&[2, 3])],
    })
}

/// Sorts the set attributes, whose order DynamoDB does not keep.
fn normalized(mut image: Value) -> Value {
    for set in ["ss", "ns", "bs"] {
        if let Some(Value::Array(a)) = image.get_mut(set) {
            a.sort_by_key(|v| v.to_string());
        }
    }
    image
}

async fn seed(db: &aws_sdk_dynamodb::Client, table: &str, count: usize) {
    let mut requests = Vec::new();
    for i in 0..count {
        requests.push(
            WriteRequest::builder()
                .put_request(
                    PutRequest::builder()
                        .set_item(Some(item(i)))
                        .build()
                        .unwrap(),
                )
                .build(),
        );
        if requests.len() == 25 || i + 1 == count {
            let mut pending = HashMap::from([(table.to_owned(), std::mem::take(&mut requests))]);
            while !pending.is_empty() {
                let out = db
                    .batch_write_item()
                    .set_request_items(Some(pending))
                    .send()
                    .await
                    .expect("batch write");
                pending = out.unprocessed_items.unwrap_or_default();
                pending.retain(|_, v| !v.is_empty());
            }
        }
    }
}

fn events(records: &[Consumed]) -> Vec<&Value> {
    records.iter().filter_map(|r| r.value.as_ref()).collect()
}

fn pk(event: &Value) -> String {
    event["keys"]["pk"].as_str().unwrap().to_owned()
}

fn snapshot_config(table: &str, topic: &str, dir: &std::path::Path, mode: &str) -> Value {
    let mut cfg = config(&[(table, topic)], None, &dir.join("cp"));
    cfg["sync_mode"] = json!(mode);
    cfg["snapshot"] = json!({"segments": 4, "page_items": 100});
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_cdc_delivers_every_item_then_the_changes_without_a_gap() {
    if !stack_available() {
        return;
    }
    const ITEMS: usize = 5000;
    let db = dynamodb().await;
    let table = unique("snap");
    create_table(&db, &table, "pk", None, StreamViewType::NewAndOldImages).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let seeded = Instant::now();
    seed(&db, &table, ITEMS).await;
    report(&format!(
        "snapshot test: seeded {ITEMS} items in {:.1} s",
        seeded.elapsed().as_secs_f64()
    ));
    // The seed's INSERT records are in the stream; they are older than the scan's start by
    // more than the 1 s hand-off margin (and its second rounding), so none may come out.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut cfg = snapshot_config(&table, &topic, dir.path(), "snapshot_cdc");
    // A scan slow enough to write during it (moto reports 1 unit a page: ~2.5 s), in scan
    // phases of 1 s with the stream catching up between them.
    cfg["snapshot"]["max_read_units_per_second"] = json!(20);
    cfg["snapshot"]["scan_phase_seconds"] = json!(1);
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    wait_for_log(&daemon, "snapshot started", Duration::from_secs(60)).await;

    // During the scan: modify 20 seeded items, insert 10 new ones.
    let mut during: Vec<(String, Value)> = Vec::new();
    for i in 0..20 {
        let key = format!("item-{i:05}");
        put(
            &db,
            &table,
            vec![("pk", s(&key)), ("state", s("changed-during"))],
        )
        .await;
        during.push((
            key,
            json!({"pk": format!("item-{i:05}"), "state": "changed-during"}),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in 0..10 {
        let key = format!("new-during-{k}");
        put(&db, &table, vec![("pk", s(&key)), ("state", s("new"))]).await;
        during.push((key.clone(), json!({"pk": key, "state": "new"})));
    }
    let complete = wait_for_log(&daemon, "snapshot complete", Duration::from_secs(120)).await;
    let phases = daemon
        .log_events("snapshot paused: the stream catches up before the scan goes on")
        .len();
    assert!(phases >= 1, "{}", daemon.log_text());
    assert!(
        !daemon.log_events("snapshot progress").is_empty(),
        "a progress line every 5 s"
    );
    // After the scan: modify, delete, insert.
    let mut after: Vec<(String, Option<Value>)> = Vec::new();
    for i in 20..30 {
        let key = format!("item-{i:05}");
        put(
            &db,
            &table,
            vec![("pk", s(&key)), ("state", s("changed-after"))],
        )
        .await;
        after.push((
            key.clone(),
            Some(json!({"pk": key, "state": "changed-after"})),
        ));
    }
    delete(&db, &table, vec![("pk", s("item-00030"))]).await;
    after.push(("item-00030".into(), None));
    for k in 0..5 {
        let key = format!("new-after-{k}");
        put(&db, &table, vec![("pk", s(&key)), ("state", s("new"))]).await;
        after.push((key.clone(), Some(json!({"pk": key, "state": "new"}))));
    }
    let want = ITEMS + during.len() + after.len();
    let got = consume(&topic, want, Duration::from_secs(120)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let all = consume(&topic, got.len(), Duration::from_secs(2)).await;

    // Every seeded item, once, as a SNAPSHOT row with its exact values (or the value a write
    // during the scan gave it), in the partition of its changes.
    let mut snapshot_rows: BTreeMap<String, (&Consumed, &Value)> = BTreeMap::new();
    let mut changes: BTreeMap<String, Vec<(&Consumed, &Value)>> = BTreeMap::new();
    for r in &all {
        let Some(v) = r.value.as_ref() else { continue };
        if v["event_name"] == "SNAPSHOT" {
            assert_eq!(r.headers["dynamodb.event_name"], "SNAPSHOT");
            assert_eq!(v["sequence_number"], Value::Null);
            assert_eq!(v["old_image"], Value::Null);
            assert_eq!(v["snapshot"]["total_segments"], 4);
            assert!(v["snapshot"]["segment"].as_u64().unwrap() < 4);
            assert!(
                snapshot_rows.insert(pk(v), (r, v)).is_none(),
                "two SNAPSHOT rows for {}",
                pk(v)
            );
        } else {
            changes.entry(pk(v)).or_default().push((r, v));
        }
    }
    let during_keys: HashMap<&str, &Value> = during.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for i in 0..ITEMS {
        let key = format!("item-{i:05}");
        let (_, row) = snapshot_rows
            .get(&key)
            .unwrap_or_else(|| panic!("no SNAPSHOT row for {key}"));
        let image = normalized(row["new_image"].clone());
        let original = normalized(expected_image(i));
        match during_keys.get(key.as_str()) {
            Some(changed) if image == **changed => {}
            _ => assert_eq!(image, original, "{key}"),
        }
        assert_eq!(row["keys"], json!({"pk": key}));
    }
    // No change made before the scan started comes out: no INSERT of a seeded item.
    for (key, evs) in &changes {
        if key.starts_with("item-") {
            for (_, e) in evs {
                assert_ne!(
                    e["event_name"],
                    "INSERT",
                    "{key}: a seed INSERT after the snapshot: {e}\n{}",
                    daemon
                        .log_text()
                        .lines()
                        .filter(|l| l.contains("shard") || l.contains("snapshot"))
                        .filter(|l| !l.contains("page handed"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
    // Every change made during and after the scan arrives, after the item's SNAPSHOT row, in
    // the same partition; the last event of each key is the table's final state.
    let mut duplicates = 0;
    for (key, image) in &during {
        let evs = changes
            .get(key)
            .unwrap_or_else(|| panic!("change to {key} during the scan lost"));
        assert!(evs.iter().any(|(_, e)| e["new_image"] == *image), "{key}");
        if let Some((row_rec, row)) = snapshot_rows.get(key) {
            if row["new_image"] == *image {
                duplicates += 1;
            }
            for (rec, _) in evs {
                assert_eq!(rec.partition, row_rec.partition, "{key}");
                assert!(
                    rec.offset > row_rec.offset,
                    "{key}: change before its SNAPSHOT row"
                );
            }
        }
    }
    for (key, image) in &after {
        let evs = changes
            .get(key)
            .unwrap_or_else(|| panic!("change to {key} lost"));
        let (_, last) = evs.last().unwrap();
        match image {
            Some(image) => assert_eq!(last["new_image"], *image, "{key}"),
            None => assert_eq!(last["event_name"], "REMOVE", "{key}"),
        }
    }
    // The documented bound: a change appears twice only when it was made between a second
    // before the scan started and its end.
    assert!(duplicates <= during.len(), "{duplicates}");
    let extra = events(&all).len() - ITEMS - during.len() - after.len();
    report(&format!(
        "snapshot_cdc: {ITEMS} items + {} changes during + {} after the scan; {duplicates} of the \
         changes during the scan also in a SNAPSHOT row; {extra} extra events; scan {} s in {} phases",
        during.len(),
        after.len(),
        complete[0]["seconds"].as_str().unwrap_or("?"),
        phases + 1
    ));
    // Beyond one event per item and per change: only the SNAPSHOT rows of items inserted
    // during the scan (the scan saw them, and so does the stream).
    assert_eq!(
        extra,
        snapshot_rows.len() - ITEMS,
        "events beyond one per item and change"
    );
    let cp: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("cp").join(&table).join("snapshot.json")).unwrap(),
    )
    .unwrap();
    assert!(cp["completed_at_ms"].is_i64(), "{cp}");
    assert_eq!(cp["segments"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_mode_sends_no_snapshot_row_and_snapshot_mode_exits_zero() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    // cdc (the default): items written before start come from the stream, as INSERTs.
    let table = unique("cdc_only");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    seed(&db, &table, 30).await;
    let mut daemon = Daemon::start(
        dir.path(),
        &config(&[(&table, &topic)], None, &dir.path().join("cp")),
        &[],
    );
    let got = consume(&topic, 30, Duration::from_secs(60)).await;
    put(&db, &table, vec![("pk", s("later"))]).await;
    let got = consume(&topic, got.len() + 1, Duration::from_secs(30)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    assert_eq!(events(&got).len(), 31, "{}", daemon.log_text());
    assert!(events(&got).iter().all(|e| e["event_name"] == "INSERT"));
    assert!(daemon.log_events("snapshot started").is_empty());

    // snapshot: loads once and exits 0 by itself; no stream record is produced.
    let table = unique("load_once");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    seed(&db, &table, 450).await;
    let mut daemon = Daemon::start(
        dir.path(),
        &snapshot_config(&table, &topic, dir.path(), "snapshot"),
        &[],
    );
    let status = daemon.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    let got = consume(&topic, 450, Duration::from_secs(30)).await;
    let evs = events(&got);
    assert_eq!(evs.len(), 450);
    assert!(evs.iter().all(|e| e["event_name"] == "SNAPSHOT"));
    let keys: HashSet<String> = evs.iter().map(|e| pk(e)).collect();
    assert_eq!(keys.len(), 450);
    for e in &evs {
        let i: usize = pk(e)[5..].parse().unwrap();
        assert_eq!(
            normalized(e["new_image"].clone()),
            normalized(expected_image(i))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_snapshot_resumes_each_segment() {
    if !stack_available() {
        return;
    }
    const ITEMS: usize = 3000;
    const PAGE: usize = 50;
    let db = dynamodb().await;
    let table = unique("snap_kill");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    seed(&db, &table, ITEMS).await;
    let mut cfg = snapshot_config(&table, &topic, dir.path(), "snapshot_cdc");
    cfg["snapshot"]["page_items"] = json!(PAGE);
    // 10 pages a second (moto reports 1 unit a page): 60 pages take about 6 s.
    cfg["snapshot"]["max_read_units_per_second"] = json!(10);
    let cp_file = dir.path().join("cp").join(&table).join("snapshot.json");
    let rows_saved = || -> u64 {
        std::fs::read(&cp_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map_or(0, |v| {
                v["segments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["rows"].as_u64().unwrap())
                    .sum()
            })
    };
    let mut kills = 0;
    let mut resumed_from = Vec::new();
    for round in 0..3 {
        let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
        if round > 0 {
            let ev = wait_for_log(
                &daemon,
                "resuming the snapshot where each segment stopped",
                Duration::from_secs(30),
            )
            .await;
            resumed_from.push(ev[0]["rows"].as_u64().unwrap());
        }
        // Let it save some progress, then kill it mid-scan.
        let before = rows_saved();
        let start = Instant::now();
        while rows_saved() < before + 400 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}",
                daemon.log_text()
            );
            assert!(daemon.try_status().is_none(), "{}", daemon.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            daemon.log_events("snapshot complete").is_empty(),
            "the snapshot ended before the kill; slow it down"
        );
        daemon.kill();
        kills += 1;
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    wait_for_log(&daemon, "snapshot complete", Duration::from_secs(120)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let all = read_settled(
        &kafka_bootstrap(),
        &topic,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let rows: Vec<&Value> = events(&all)
        .into_iter()
        .filter(|e| e["event_name"] == "SNAPSHOT")
        .collect();
    let keys: HashSet<String> = rows.iter().map(|e| pk(e)).collect();
    for i in 0..ITEMS {
        assert!(keys.contains(&format!("item-{i:05}")), "item {i} missing");
    }
    // Each restart continued where the segments stopped, never from the start of the table.
    assert!(
        resumed_from.windows(2).all(|w| w[1] > w[0]),
        "{resumed_from:?}"
    );
    assert!(resumed_from[0] > 0);
    // Delivered again at most what was in flight at each kill: per segment, the pages
    // waiting for acks (reader.max_inflight_pages = 4) and the one being read, plus the
    // pages acknowledged within one checkpoint interval (200 ms at 10 pages/s: 2 pages).
    let in_flight_bound = kills * (4 * (4 + 1) + 2) * PAGE;
    let extra = rows.len() - ITEMS;
    report(&format!(
        "snapshot SIGKILL x{kills}: {} rows for {ITEMS} items ({extra} delivered again, bound \
         {in_flight_bound}); resumed at {resumed_from:?} rows",
        rows.len()
    ));
    assert!(extra <= in_flight_bound, "{extra} > {in_flight_bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_command_loads_one_table_beside_the_running_daemon() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("manual");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    seed(&db, &table, 120).await;
    let cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // The daemon streams the 120 INSERTs and holds the checkpoint directory's lock.
    assert_eq!(
        consume(&topic, 120, Duration::from_secs(60)).await.len(),
        120
    );
    let path = dir.path().join("config.json");
    let run = |table: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
            .args(["snapshot", "--config"])
            .arg(&path)
            .args(["--table", table])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap()
    };
    let out = run(&table);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let got = consume(&topic, 240, Duration::from_secs(30)).await;
    let rows: HashSet<String> = events(&got)
        .iter()
        .filter(|e| e["event_name"] == "SNAPSHOT")
        .map(|e| pk(e))
        .collect();
    assert_eq!(rows.len(), 120);
    // Its positions are its own; the pipeline has no snapshot and reads on.
    let manual = dir
        .path()
        .join("cp/.manual-snapshots")
        .join(&table)
        .join("snapshot-manual.json");
    let cp: Value = serde_json::from_slice(&std::fs::read(&manual).unwrap()).unwrap();
    assert!(cp["completed_at_ms"].is_i64(), "{cp}");
    assert!(!dir
        .path()
        .join("cp")
        .join(&table)
        .join("snapshot.json")
        .exists());
    put(&db, &table, vec![("pk", s("after"))]).await;
    assert_eq!(
        consume(&topic, 241, Duration::from_secs(30)).await.len(),
        241
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
    // A table the config does not list: a config error.
    let out = run("not-in-the-config");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--table"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_mode_needs_no_stream_and_check_says_so() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("no_stream");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    // Seeded first: moto answers 500 to writes on a table whose stream was disabled.
    seed(&db, &table, 40).await;
    db.update_table()
        .table_name(&table)
        .stream_specification(
            aws_sdk_dynamodb::types::StreamSpecification::builder()
                .stream_enabled(false)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("disable the stream");
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = snapshot_config(&table, &topic, dir.path(), "snapshot");
    let path = write(dir.path(), "check.json", &cfg.to_string());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
        .args(["check", "--config"])
        .arg(&path)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "OK   table {table}: no stream (sync_mode snapshot needs none)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("OK   table {table}: dynamodb:Scan (snapshot)")),
        "{text}"
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    assert!(daemon.wait_exit(Duration::from_secs(60)).await.success());
    assert_eq!(
        events(&consume(&topic, 40, Duration::from_secs(30)).await).len(),
        40
    );
}
