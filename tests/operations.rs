//! Operations against the real stack: the metrics count what was delivered, a reload adds
//! and removes tables while changes flow, `status` reads the checkpoints; and, with the
//! Streams double, a stalled shard turns `/healthz` to 503 naming it, its lag grows, and
//! systemd's watchdog pings stop (a Unix datagram socket plays systemd's notify socket).

mod common;

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::StreamViewType;
use common::scram::free_port;
use common::streams_double::{Fault, FaultKind, KeySchema, StreamsDouble, ViewType};
use common::*;
use dynamodb_cdc::telemetry::server::get;
use serde_json::{json, Value};

/// The value of the series `series` (name and labels exactly as exposed) in `/metrics`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics(base: &str) -> String {
    let (status, text) = get(&format!("{base}/metrics")).await.expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// Waits until `series` has the value `want` (the daemon counts after Kafka acknowledged).
async fn wait_metric(base: &str, series: &str, want: f64, daemon: &Daemon) {
    let start = Instant::now();
    loop {
        // The server may not listen yet.
        let text = match get(&format!("{base}/metrics")).await {
            Ok((200, text)) => text,
            other => format!("{other:?}"),
        };
        if metric(&text, series) == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{series} is {:?}, not {want}:\n{text}\n{}",
            metric(&text, series),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_status(url: &str, want: u16, within: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok((status, body)) = get(url).await {
            if status == want {
                return body;
            }
            assert!(start.elapsed() < within, "{url}: {status} {body}");
        }
        assert!(start.elapsed() < within, "{url}: no answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Change events of a topic whose `pk` is `key`-prefixed (all of them here).
async fn events(topic: &str, at_least: usize, within: Duration) -> Vec<Consumed> {
    consume(topic, at_least, within)
        .await
        .into_iter()
        .filter(|r| r.value.is_some())
        .collect()
}

/// N changes written -> `changes_total` = N; the other metrics have their series; a reload
/// removes one table and adds another while a third keeps receiving changes, with no loss
/// and no restart; a broken file keeps the running config; `status` reports each shard and
/// the live lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_deliveries_and_a_reload_adds_and_removes_tables_live() {
    if !stack_available() {
        return;
    }
    let db = dynamodb().await;
    let (a, b, c) = (unique("ops-a"), unique("ops-b"), unique("ops-c"));
    for t in [&a, &b, &c] {
        create_table(&db, t, "pk", None, StreamViewType::NewAndOldImages).await;
    }
    let (ta, tb, tc) = (format!("t.{a}"), format!("t.{b}"), format!("t.{c}"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cfg = config(&[(&a, &ta), (&b, &tb)], None, &dir.path().join("cp"));
    cfg["metrics"] = json!({"listen": format!("127.0.0.1:{port}")});
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let pid = daemon.pid();
    wait_status(&format!("{base}/readyz"), 200, Duration::from_secs(60)).await;

    for i in 0..10 {
        put(
            &db,
            &b,
            vec![("pk", s(&format!("b{i}"))), ("n", n(&i.to_string()))],
        )
        .await;
    }
    assert_eq!(events(&tb, 10, Duration::from_secs(30)).await.len(), 10);
    wait_metric(
        &base,
        &format!("dynamodb_cdc_changes_total{{table=\"{b}\"}}"),
        10.0,
        &daemon,
    )
    .await;

    // Changes keep flowing to `a` through both reloads.
    let (workload, writers) = Workload::start(&db, &a, 6, 2, 60, 2000, Duration::from_millis(20));
    let mut tail = Tail::new(&kafka_bootstrap(), &ta);
    assert!(wait_for(Duration::from_secs(30), || workload.changes().len() >= 10).await);
    wait_delivered(
        &mut tail,
        &workload,
        10,
        &mut daemon,
        Duration::from_secs(60),
    )
    .await;

    // A broken file: logged, the running config kept.
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{ not json").unwrap();
    daemon.signal("HUP");
    wait_for_log(
        &daemon,
        "config reload failed; the running config is kept",
        Duration::from_secs(20),
    )
    .await;

    // Remove b, add c, and change a key that needs a restart.
    let mut next = config(&[(&a, &ta), (&c, &tc)], None, &dir.path().join("cp"));
    next["metrics"] = cfg["metrics"].clone();
    next["shutdown_timeout_ms"] = json!(15000);
    std::fs::write(&path, serde_json::to_vec_pretty(&next).unwrap()).unwrap();
    daemon.signal("HUP");
    let stopped = wait_for_log(
        &daemon,
        "table stopped; its checkpoints are kept",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        stopped[0]["table"].as_str(),
        Some(b.as_str()),
        "{stopped:?}"
    );
    let restart = wait_for_log(
        &daemon,
        "config reload: these keys changed and need a restart (systemctl restart dynamodb-cdc); their running values are kept",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        restart[0].to_string().contains("shutdown_timeout_ms"),
        "{restart:?}"
    );
    for i in 0..5 {
        put(
            &db,
            &c,
            vec![("pk", s(&format!("c{i}"))), ("n", n(&i.to_string()))],
        )
        .await;
        put(
            &db,
            &b,
            vec![("pk", s(&format!("late{i}"))), ("n", n(&i.to_string()))],
        )
        .await;
    }
    assert_eq!(
        events(&tc, 5, Duration::from_secs(30)).await.len(),
        5,
        "{}",
        daemon.log_text()
    );
    wait_metric(
        &base,
        &format!("dynamodb_cdc_changes_total{{table=\"{c}\"}}"),
        5.0,
        &daemon,
    )
    .await;

    workload.stop();
    for w in writers {
        w.await.unwrap();
    }
    let total = workload.changes().len();
    wait_delivered(
        &mut tail,
        &workload,
        total,
        &mut daemon,
        Duration::from_secs(60),
    )
    .await;
    wait_metric(
        &base,
        &format!("dynamodb_cdc_changes_total{{table=\"{a}\"}}"),
        total as f64,
        &daemon,
    )
    .await;
    // The removed table got nothing after its removal.
    let b_events = events(&tb, 15, Duration::from_secs(3)).await;
    let keys: HashSet<_> = b_events.iter().filter_map(|r| r.key.clone()).collect();
    assert!(keys.iter().all(|k| !k.contains("late")), "{keys:?}");
    assert_eq!(daemon.try_status(), None, "the daemon restarted or exited");
    assert_eq!(daemon.pid(), pid);
    assert_eq!(daemon.log_events("starting dynamodb-cdc").len(), 1);

    let text = metrics(&base).await;
    for (series, at_least) in [
        (
            format!("dynamodb_cdc_shards{{table=\"{a}\",state=\"reading\"}}"),
            1.0,
        ),
        (
            "dynamodb_cdc_aws_requests_total{operation=\"GetRecords\",outcome=\"ok\"}".into(),
            1.0,
        ),
        (
            "dynamodb_cdc_aws_requests_total{operation=\"DescribeTable\",outcome=\"ok\"}".into(),
            3.0,
        ),
        (
            "dynamodb_cdc_produce_requests_total{outcome=\"ok\"}".into(),
            1.0,
        ),
        ("dynamodb_cdc_produce_duration_seconds_count".into(), 1.0),
        ("dynamodb_cdc_healthy".into(), 1.0),
        ("dynamodb_cdc_ready".into(), 1.0),
        (
            format!("dynamodb_cdc_checkpoint_age_seconds{{table=\"{a}\"}}"),
            0.0,
        ),
        (
            format!("dynamodb_cdc_last_change_age_seconds{{table=\"{a}\"}}"),
            0.0,
        ),
        (format!("dynamodb_cdc_lag_seconds{{table=\"{a}\"}}"), 0.0),
        ("dynamodb_cdc_buffered_bytes".into(), 0.0),
    ] {
        let v = metric(&text, &series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
        assert!(v >= at_least, "{series} = {v} < {at_least}");
    }
    assert_eq!(
        metric(
            &text,
            &format!("dynamodb_cdc_dead_letters_total{{table=\"{a}\"}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!("dynamodb_cdc_data_loss_total{{table=\"{a}\"}}")
        ),
        Some(0.0)
    );
    assert!(
        !text.contains(&format!("dynamodb_cdc_lag_seconds{{table=\"{b}\"}}")),
        "a removed table's lag:\n{text}"
    );
    assert!(!text.contains("shardId-"), "a shard id in a label:\n{text}");
    let health = wait_status(&format!("{base}/healthz"), 200, Duration::from_secs(5)).await;
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "ok"
    );

    // `status`: every table's shard, beside the running daemon, with the live lag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
        .args(["status", "--config"])
        .arg(&path)
        .args(["--metrics-url", &format!("{base}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("table {a}: stream arn:aws:dynamodb:")),
        "{text}"
    );
    assert!(
        text.contains("  live lag: ") && text.contains("  shard shardId-"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
        .args(["status", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = v["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2, "{v:#}");
    let shard = &tables[0]["shards"][0];
    assert!(
        shard["sequence_number"].is_string() && shard["ended"] == false,
        "{v:#}"
    );

    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
}

/// What the daemon sent to the notify socket, one datagram each.
fn notify_socket(path: &std::path::Path) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let socket = UnixDatagram::bind(path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        // Ends with the test process.
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        }
    });
    got
}

fn pings_after(got: &Mutex<Vec<(Instant, String)>>, after: Instant) -> usize {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(at, m)| *at > after && m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

/// systemd: READY=1 once the table started, STATUS lines, WATCHDOG=1 while healthy. A shard
/// whose GetRecords never completes: `/healthz` 503 naming it, the pings stop, its lag
/// grows; once it answers again, health and pings come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shard_fails_health_grows_lag_and_stops_the_watchdog() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("stall");
    double.add_table(&table, KeySchema::hash("pk"), ViewType::NewAndOldImages);
    for i in 0..5 {
        double.put(
            &table,
            json!({"pk": {"S": format!("k{i}")}, "n": {"N": i.to_string()}}),
        );
    }
    let shard = double.open_shards(&table).remove(0);
    let topic = format!("t.{table}");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    cfg["aws"]["endpoint_url"] = json!(double.endpoint());
    cfg["aws"]["request_timeout_ms"] = json!(1000);
    cfg["reader"]["idle_poll_interval_ms"] = json!(50);
    cfg["health"] = json!({"max_stall_seconds": 4});
    cfg["metrics"] = json!({"listen": format!("127.0.0.1:{port}")});
    let sock = dir.path().join("notify.sock");
    let got = notify_socket(&sock);
    let mut daemon = Daemon::start(
        dir.path(),
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    assert_eq!(
        events(&topic, 5, Duration::from_secs(30)).await.len(),
        5,
        "{}",
        daemon.log_text()
    );
    wait_metric(
        &base,
        &format!("dynamodb_cdc_changes_total{{table=\"{table}\"}}"),
        5.0,
        &daemon,
    )
    .await;
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || pings_after(&got, started) >= 2).await,
        "no watchdog pings: {:?}\n{}",
        got.lock().unwrap(),
        daemon.log_text()
    );
    let sent = |prefix: &str| {
        got.lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.starts_with(prefix))
    };
    assert!(sent("READY=1"), "no READY=1: {:?}", got.lock().unwrap());
    assert!(
        wait_for(Duration::from_secs(10), || sent(
            "STATUS=tables 1/1 started, 1 shard(s) reading"
        ))
        .await,
        "no STATUS: {:?}",
        got.lock().unwrap()
    );

    // The shard's GetRecords never completes (each attempt times out after 1 s).
    let stall =
        double.fault(Fault::new(FaultKind::Slow(Duration::from_secs(600))).op("GetRecords"));
    let body = wait_status(&format!("{base}/healthz"), 503, Duration::from_secs(20)).await;
    let unhealthy_at = Instant::now();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "stalled", "{v}");
    let stalled = &v["stalled"][0];
    assert_eq!(stalled["check"], "get_records", "{v}");
    assert_eq!(stalled["shard_id"], shard.as_str(), "{v}");
    assert_eq!(stalled["table"], table.as_str(), "{v}");
    let lag = |text: &str| {
        metric(
            text,
            &format!("dynamodb_cdc_lag_seconds{{table=\"{table}\"}}"),
        )
        .unwrap()
    };
    let first = lag(&metrics(&base).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = metrics(&base).await;
    let second = lag(&text);
    assert!(
        first > 0.0 && second >= first + 1.5,
        "lag {first} then {second}"
    );
    assert_eq!(metric(&text, "dynamodb_cdc_healthy"), Some(0.0));
    assert!(
        metric(
            &text,
            "dynamodb_cdc_aws_requests_total{operation=\"GetRecords\",outcome=\"server_error\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // A ping sent just before the 503 may arrive just after it.
    assert_eq!(
        pings_after(&got, unhealthy_at + Duration::from_millis(600)),
        0,
        "watchdog pings while stalled:\n{}",
        daemon.log_text()
    );
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.starts_with("STATUS=STALLED: ")),
        "no STALLED status"
    );

    // The shard answers again: healthy, pinging, lag back to 0.
    double.clear_fault(stall);
    wait_status(&format!("{base}/healthz"), 200, Duration::from_secs(20)).await;
    let healthy_at = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || pings_after(&got, healthy_at)
            >= 1)
        .await,
        "no pings after recovery"
    );
    assert!(lag(&metrics(&base).await) < 1.0);
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    assert!(got
        .lock()
        .unwrap()
        .iter()
        .any(|(_, m)| m.lines().any(|l| l == "STOPPING=1")));
}

/// Every other metric against a known script on the Streams double: a trimmed range (one
/// DATA_LOSS marker), two throttled GetRecords, an expired iterator, a poison record
/// dead-lettered, a child shard waiting for its open parent and then read once the parent
/// ended, and the role session's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_metric_follows_a_known_script_on_the_streams_double() {
    if !stack_available() {
        return;
    }
    let double = StreamsDouble::start().await;
    let table = unique("metrics");
    let arn = double.add_table(&table, KeySchema::hash("pk"), ViewType::NewAndOldImages);
    let root = double.open_shards(&table).remove(0);
    for i in 0..3 {
        double.put(
            &table,
            json!({"pk": {"S": format!("k{i}")}, "n": {"N": i.to_string()}}),
        );
    }
    // Not a number in an N attribute: a poison record.
    double.push_record(
        &root,
        common::streams_double::RecordSpec::insert(
            json!({"pk": {"S": "bad"}}),
            json!({"pk": {"S": "bad"}, "n": {"N": "1,5"}}),
        ),
    );
    // A child of the open root: it waits until the root ended.
    let child = double.add_shard(&arn, Some(&root));
    for fault in [
        FaultKind::Trimmed,
        FaultKind::Throttle,
        FaultKind::Throttle,
        FaultKind::Expired,
    ] {
        double.fault(Fault::new(fault).op("GetRecords").shard(&root).times(1));
    }
    let topic = format!("t.{table}");
    let dlq = format!("dlq.{table}");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    cfg["aws"]["endpoint_url"] = json!(double.endpoint());
    cfg["aws"]["assume_role"] = json!({
        "role_arn": "arn:aws:iam::123456789012:role/cdc",
        "external_id": "ext-metrics",
        "duration_seconds": 900
    });
    cfg["on_trimmed_data"] = json!("skip_to_trim_horizon");
    cfg["on_poison_record"] = json!("dead_letter");
    cfg["kafka"]["dead_letter_topic"] = json!(dlq);
    cfg["metrics"] = json!({"listen": format!("127.0.0.1:{port}")});
    let started = std::time::SystemTime::now();
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let t = |name: &str| format!("{name}{{table=\"{table}\"}}");
    wait_metric(&base, &t("dynamodb_cdc_changes_total"), 3.0, &daemon).await;
    wait_metric(&base, &t("dynamodb_cdc_dead_letters_total"), 1.0, &daemon).await;
    let text = metrics(&base).await;
    let shards = |text: &str, state: &str| {
        metric(
            text,
            &format!("dynamodb_cdc_shards{{table=\"{table}\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(
        (
            shards(&text, "reading"),
            shards(&text, "waiting_for_parent"),
            shards(&text, "finished")
        ),
        (Some(1.0), Some(1.0), Some(0.0)),
        "{text}"
    );
    let aws = |text: &str, op: &str, outcome: &str| {
        metric(
            text,
            &format!("dynamodb_cdc_aws_requests_total{{operation=\"{op}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(aws(&text, "GetRecords", "throttled"), Some(2.0), "{text}");
    assert_eq!(
        aws(&text, "GetRecords", "expired_iterator"),
        Some(1.0),
        "{text}"
    );
    // TrimmedDataAccessException: a client error, then one DATA_LOSS marker.
    assert_eq!(
        aws(&text, "GetRecords", "client_error"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &t("dynamodb_cdc_data_loss_total")),
        Some(1.0),
        "{text}"
    );
    assert!(
        aws(&text, "AssumeRole", "ok").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        aws(&text, "DescribeStream", "ok").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let expiry =
        metric(&text, "dynamodb_cdc_credentials_expiry_timestamp_seconds").expect("expiry");
    let at_start = started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (at_start + 880.0..at_start + 930.0).contains(&expiry),
        "a 900 s session: expires at {expiry}, started at {at_start}"
    );
    let max_buffered = 32.0 * 1024.0 * 1024.0;
    let buffered = metric(&text, "dynamodb_cdc_buffered_bytes").unwrap();
    assert!((0.0..=max_buffered).contains(&buffered), "{buffered}");

    // Quiet: the ages grow.
    let change_age = metric(&text, &t("dynamodb_cdc_last_change_age_seconds")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = metrics(&base).await;
    let later = metric(&text, &t("dynamodb_cdc_last_change_age_seconds")).unwrap();
    assert!(later >= change_age + 1.4, "{change_age} then {later}");
    assert!(metric(&text, &t("dynamodb_cdc_checkpoint_age_seconds")).unwrap() >= 1.4);
    assert_eq!(
        metric(&text, &t("dynamodb_cdc_snapshot_rows_total")),
        Some(0.0)
    );

    // The root ends: the child is read, the root counts as finished.
    double.close_shard(&root);
    for i in 0..2 {
        double.put(
            &table,
            json!({"pk": {"S": format!("c{i}")}, "n": {"N": i.to_string()}}),
        );
    }
    wait_metric(&base, &t("dynamodb_cdc_changes_total"), 5.0, &daemon).await;
    let start = Instant::now();
    loop {
        let text = metrics(&base).await;
        let now = (
            shards(&text, "reading"),
            shards(&text, "waiting_for_parent"),
            shards(&text, "finished"),
        );
        if now == (Some(1.0), Some(0.0), Some(1.0)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "shards {now:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(double.open_shards(&table).contains(&child));
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
}
