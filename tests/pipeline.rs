//! End-to-end: moto (DynamoDB + Streams + STS) -> dynamodb-cdc -> Kafka (tansu).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::StreamViewType;
use common::*;
use serde_json::{json, Value};

/// Events (not tombstones) per key, in offset order.
fn by_key(records: &[Consumed]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in records {
        if let Some(v) = &r.value {
            out.entry(r.key.clone().unwrap())
                .or_default()
                .push(v.clone());
        }
    }
    out
}

fn sequence_numbers(records: &[Consumed]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| v["sequence_number"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_land_in_their_own_topics_with_exact_values() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let orders = unique("orders");
    let events = unique("events");
    create_table(
        &db,
        &orders,
        "order_id",
        None,
        StreamViewType::NewAndOldImages,
    )
    .await;
    create_table(&db, &events, "device", Some("ts"), StreamViewType::NewImage).await;
    let role = create_reader_role(&aws_endpoint(), &unique("role")).await;

    // orders: insert, modify, remove of o1; insert of o2 with an exact big number.
    put(&db, &orders, vec![("order_id", s("o1")), ("qty", n("1"))]).await;
    put(&db, &orders, vec![("order_id", s("o1")), ("qty", n("2"))]).await;
    put(
        &db,
        &orders,
        vec![
            ("order_id", s("o2")),
            ("price", n("12345678901234567890.123456789")),
            (
                "tags",
                aws_sdk_dynamodb::types::AttributeValue::Ss(vec!["a".into(), "b".into()]),
            ),
            ("ok", aws_sdk_dynamodb::types::AttributeValue::Bool(true)),
        ],
    )
    .await;
    delete(&db, &orders, vec![("order_id", s("o1"))]).await;
    // events: hash + range keys, NEW_IMAGE view (old_image must be null).
    for i in 0..5 {
        put(
            &db,
            &events,
            vec![
                ("device", s("d1")),
                ("ts", n(&i.to_string())),
                ("v", n(&(i * 10).to_string())),
            ],
        )
        .await;
    }
    put(
        &db,
        &events,
        vec![("device", s("d1")), ("ts", n("0")), ("v", n("-1"))],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let orders_topic = format!("t.{orders}");
    let events_topic = format!("t.{events}");
    let cfg = config(
        &[(&orders, &orders_topic), (&events, &events_topic)],
        Some(&role),
        &dir.path().join("cp"),
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);

    // 4 events + 1 tombstone on orders; 6 events on the other table.
    let got = consume(&orders_topic, 5, Duration::from_secs(60)).await;
    assert_eq!(
        got.len(),
        5,
        "orders topic: {got:#?}\n{}",
        daemon.log_text()
    );
    let keyed = by_key(&got);
    let o1 = &keyed[r#"{"order_id":"o1"}"#];
    let names: Vec<&str> = o1
        .iter()
        .map(|v| v["event_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["INSERT", "MODIFY", "REMOVE"], "per-key order");
    assert_eq!(o1[0]["new_image"], json!({"order_id": "o1", "qty": 1}));
    assert_eq!(o1[0]["old_image"], Value::Null);
    assert_eq!(o1[1]["old_image"], json!({"order_id": "o1", "qty": 1}));
    assert_eq!(o1[1]["new_image"], json!({"order_id": "o1", "qty": 2}));
    assert_eq!(o1[2]["old_image"], json!({"order_id": "o1", "qty": 2}));
    assert_eq!(o1[2]["new_image"], Value::Null);
    assert_eq!(o1[2]["keys"], json!({"order_id": "o1"}));
    assert_eq!(o1[2]["table"], json!(orders));

    // The tombstone follows the REMOVE, same key, same partition, null value.
    let remove_pos = got
        .iter()
        .position(|r| {
            r.value
                .as_ref()
                .is_some_and(|v| v["event_name"] == "REMOVE")
        })
        .unwrap();
    let tomb = &got[remove_pos + 1];
    assert_eq!(tomb.key.as_deref(), Some(r#"{"order_id":"o1"}"#));
    assert!(tomb.value.is_none());
    assert_eq!(tomb.partition, got[remove_pos].partition);

    // Exact digits survive, as raw text.
    let o2 = &keyed[r#"{"order_id":"o2"}"#][0];
    assert_eq!(o2["new_image"]["tags"], json!(["a", "b"]));
    assert_eq!(o2["new_image"]["ok"], json!(true));
    let raw = serde_json::to_string(&o2["new_image"]["price"]).unwrap();
    assert_eq!(raw, "12345678901234567890.123456789");

    // Envelope fields and headers.
    let ev = &got[0];
    let v = ev.value.as_ref().unwrap();
    for field in ["sequence_number", "event_id", "shard_id", "stream_arn"] {
        assert!(v[field].is_string(), "{field} in {v}");
    }
    assert!(v["approximate_creation_time_ms"].is_i64(), "{v}");
    assert_eq!(v["user_identity"], Value::Null);
    assert!(v["stream_arn"].as_str().unwrap().contains(&orders));
    assert_eq!(ev.headers["dynamodb.table"], orders);
    assert_eq!(
        ev.headers["dynamodb.event_name"],
        v["event_name"].as_str().unwrap()
    );
    assert_eq!(
        ev.headers["dynamodb.sequence_number"],
        v["sequence_number"].as_str().unwrap()
    );
    assert_eq!(
        ev.headers["dynamodb.shard_id"],
        v["shard_id"].as_str().unwrap()
    );
    // The record timestamp is the change's approximate creation time (DynamoDB gives seconds).
    assert_eq!(
        ev.timestamp_ms,
        v["approximate_creation_time_ms"].as_i64().unwrap()
    );

    // Every key lives in the partition Kafka's default partitioner picks.
    for r in &got {
        let key = r.key.as_deref().unwrap().as_bytes();
        assert_eq!(r.partition, dynamodb_cdc::kafka::partition_for(key, 3));
    }

    let got = consume(&events_topic, 6, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 6, "events topic: {got:#?}");
    let keyed = by_key(&got);
    assert_eq!(keyed.len(), 5, "{keyed:#?}");
    let d1_0 = &keyed[r#"{"device":"d1","ts":0}"#];
    assert_eq!(d1_0.len(), 2);
    assert_eq!(d1_0[0]["event_name"], "INSERT");
    assert_eq!(d1_0[1]["event_name"], "MODIFY");
    assert_eq!(
        d1_0[1]["new_image"],
        json!({"device": "d1", "ts": 0, "v": -1})
    );
    assert_eq!(
        d1_0[1]["old_image"],
        Value::Null,
        "NEW_IMAGE view has no old image"
    );

    let status = daemon.stop(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(log.contains("stopped cleanly"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_checkpoint_without_loss_or_duplicates() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("resume");
    create_table(&db, &table, "pk", None, StreamViewType::NewAndOldImages).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));

    for i in 0..40 {
        put(
            &db,
            &table,
            vec![("pk", s(&format!("k{}", i % 10))), ("n", n(&i.to_string()))],
        )
        .await;
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let first = consume(&topic, 40, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 40, "{}", daemon.log_text());
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());

    // Changes made while the daemon is down arrive after the restart.
    for i in 40..70 {
        put(
            &db,
            &table,
            vec![("pk", s(&format!("k{}", i % 10))), ("n", n(&i.to_string()))],
        )
        .await;
    }
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let all = consume(&topic, 70, Duration::from_secs(60)).await;
    assert_eq!(all.len(), 70, "{}", daemon.log_text());
    // Count once the daemon stopped (cleanly: everything it read is in Kafka), so a
    // duplicate it would still have sent is counted.
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    let all_again = consume(&topic, 70, Duration::from_secs(5)).await;
    assert_eq!(all_again.len(), 70, "a clean restart re-sent records");

    let seqs = sequence_numbers(&all_again);
    let mut unique_seqs = seqs.clone();
    unique_seqs.sort();
    unique_seqs.dedup();
    assert_eq!(unique_seqs.len(), 70, "duplicates after a clean restart");

    // Per key, the values arrive in write order.
    for (key, events) in by_key(&all_again) {
        let values: Vec<i64> = events
            .iter()
            .map(|e| e["new_image"]["n"].as_i64().unwrap())
            .collect();
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "order of {key}");
        assert_eq!(values.len(), 7, "{key}");
    }
    // The resume used the checkpoint.
    let starts = daemon.log_events("starting shard reader");
    assert!(
        starts
            .iter()
            .any(|e| e["start"].as_str().is_some_and(|s| s.starts_with("After("))),
        "{starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_skips_the_backlog_of_a_new_pipeline_only() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("latest");
    create_table(&db, &table, "pk", None, StreamViewType::KeysOnly).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    cfg["start_position"] = json!("latest");

    put(&db, &table, vec![("pk", s("before"))]).await;
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    // Wait until the reader holds its LATEST iterator, then write.
    wait_for_log(&daemon, "shard iterator obtained", Duration::from_secs(30)).await;
    put(&db, &table, vec![("pk", s("after"))]).await;
    let got = consume(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    // Count again once the daemon stopped (cleanly: everything it read is in Kafka), so
    // the backlog's record would be counted had it been read.
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let got_again = consume(&topic, 1, Duration::from_secs(1)).await;
    assert_eq!(got_again.len(), 1, "{got_again:?}");
    let v = got[0].value.as_ref().unwrap();
    assert_eq!(v["keys"], json!({"pk": "after"}));
    // KEYS_ONLY: no images.
    assert_eq!(v["new_image"], Value::Null);
    assert_eq!(v["old_image"], Value::Null);

    // The pipeline is no longer new: a restart reads from the checkpoint, not LATEST.
    put(&db, &table, vec![("pk", s("while-down"))]).await;
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{}", daemon.log_text());
    assert_eq!(
        got.iter()
            .filter(|c| c.value.as_ref().unwrap()["keys"]["pk"] == "while-down")
            .count(),
        1
    );
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_skips_changes_made_before_it() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("at_ts");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    put(&db, &table, vec![("pk", s("before"))]).await;
    // Records carry whole seconds: the start time is two seconds boundaries later.
    let now = chrono::Utc::now().timestamp_millis();
    let at_ms = (now / 1000 + 2) * 1000;
    tokio::time::sleep(Duration::from_millis((at_ms - now) as u64 + 50)).await;
    put(&db, &table, vec![("pk", s("after"))]).await;
    let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap();
    let mut cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    cfg["start_position"] = json!({ "at_timestamp": at.to_rfc3339() });
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = consume(&topic, 1, Duration::from_secs(30)).await;
    put(&db, &table, vec![("pk", s("later"))]).await;
    let got_more = consume(&topic, 2, Duration::from_secs(30)).await;
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let all = consume(&topic, 2, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got_more.len(), 2, "{}", daemon.log_text());
    let keys: Vec<Value> = all
        .iter()
        .map(|c| c.value.as_ref().unwrap()["keys"]["pk"].clone())
        .collect();
    assert_eq!(keys, vec![json!("after"), json!("later")]);
    // Within the retention: no WARN about it.
    assert!(!daemon.log_text().contains("older than the stream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_dependency() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let table = unique("check");
    create_table(&db, &table, "pk", None, StreamViewType::NewImage).await;
    let role = create_reader_role(&aws_endpoint(), &unique("role")).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = unique("missing");
    let run = |cfg: &Value| {
        let path = write(dir.path(), "check.json", &cfg.to_string());
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
            .args(["check", "--config"])
            .arg(path)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap()
    };

    let cfg = config(
        &[(&table, &format!("t.{table}"))],
        Some(&role),
        &dir.path().join("cp"),
    );
    let out = run(&cfg);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("OK   assume role {role}")), "{text}");
    assert!(
        text.contains(&format!("OK   table {table}: stream arn:aws:dynamodb")),
        "{text}"
    );
    assert!(text.contains("OK   kafka"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");

    let cfg = config(
        &[(&missing, "t.missing")],
        Some(&role),
        &dir.path().join("cp"),
    );
    let out = run(&cfg);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("FAIL table {missing}")), "{text}");

    // A config error: exit 2, the key named, nothing reached.
    let mut cfg = config(&[(&table, "t")], None, &dir.path().join("cp"));
    cfg["kafka"]["compresion"] = json!("gzip");
    let out = run(&cfg);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("compresion"), "{err}");
}
