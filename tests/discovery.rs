//! Table discovery against moto and the Kafka broker: rules of `tables` pick up tables
//! created while the daemon runs, stop tables deleted or untagged, report a table without a
//! stream once and capture it once its stream is enabled; `dynamodb-cdc tables` shows a
//! round over more than one ListTables page.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::StreamViewType;
use common::*;
use serde_json::{json, Value};

/// Discovery looks again this often in these tests.
const INTERVAL_SECONDS: u64 = 2;

/// A table of `name` (hash key `pk`), with a NEW_AND_OLD_IMAGES stream or none, tagged.
async fn table(client: &aws_sdk_dynamodb::Client, name: &str, stream: bool, tags: &[(&str, &str)]) {
    let view = stream.then_some(StreamViewType::NewAndOldImages);
    create_table_with(client, name, "pk", None, view, tags).await
}

async fn put_n(client: &aws_sdk_dynamodb::Client, table: &str, from: usize, to: usize) {
    for i in from..to {
        put(
            client,
            table,
            vec![("pk", s(&format!("k{i}"))), ("n", n(&i.to_string()))],
        )
        .await;
    }
}

/// The keys (`pk` values) of the change events (and snapshot rows) in `topic`, at least
/// `count` of them within `within`.
async fn keys_in(topic: &str, count: usize, within: Duration) -> Vec<(String, String)> {
    consume(topic, count, within)
        .await
        .into_iter()
        .filter_map(|r| {
            let v = r.value?;
            let name = v["event_name"].as_str()?.to_owned();
            let pk = v["keys"]["pk"]
                .as_str()
                .or(v["keys"]["pk"]["S"].as_str())?
                .to_owned();
            Some((name, pk))
        })
        .collect()
}

fn rule_config(prefix: &str, dir: &std::path::Path) -> Value {
    let mut cfg = config(&[], None, &dir.join("cp"));
    cfg["tables"] = json!({
        "include": [format!("{prefix}-*")],
        "exclude": [format!("{prefix}-*-tmp")],
        "tags": {"cdc": ["on", "yes"]},
        "interval_seconds": INTERVAL_SECONDS,
        "overrides": [{"match": format!("{prefix}-snap*"), "sync_mode": "snapshot_cdc"}],
    });
    cfg["kafka"]["topic_template"] = json!("t.{table}");
    cfg
}

/// Tables come and go under a running daemon: found within an interval and delivered from
/// their first item (a snapshot_cdc override loads the items first), a table without a
/// stream reported once and captured once it has one, an untagged table stopped (its
/// checkpoints kept), a deleted one stopped cleanly; the daemon never fails meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_come_and_go_under_a_running_daemon() {
    if !stack_available() {
        return;
    }
    let client = dynamodb().await;
    let prefix = unique("disc");
    let (kept, later, snap, bare, untagged, excluded) = (
        format!("{prefix}-kept"),
        format!("{prefix}-later"),
        format!("{prefix}-snap1"),
        format!("{prefix}-bare"),
        format!("{prefix}-untagged"),
        format!("{prefix}-x-tmp"),
    );
    table(&client, &kept, true, &[("cdc", "on")]).await;
    table(&client, &untagged, true, &[("team", "a")]).await;
    table(&client, &excluded, true, &[("cdc", "on")]).await;
    table(&client, &bare, false, &[("cdc", "yes")]).await;
    put_n(&client, &kept, 0, 3).await;
    put_n(&client, &untagged, 0, 1).await;
    put_n(&client, &excluded, 0, 1).await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rule_config(&prefix, dir.path());
    let port = common::scram::free_port();
    cfg["metrics"] = json!({"listen": format!("127.0.0.1:{port}")});
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = keys_in(&format!("t.{kept}"), 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "{got:?}\n{}", daemon.log_text());

    // A table created (with items at once) while the daemon runs: every item arrives.
    table(&client, &later, true, &[("cdc", "on")]).await;
    put_n(&client, &later, 0, 5).await;
    // A snapshot_cdc table: its items as SNAPSHOT rows, then its changes.
    table(&client, &snap, true, &[("cdc", "on")]).await;
    put_n(&client, &snap, 0, 4).await;
    let started = wait_for_log(&daemon, "table added; starting it", Duration::from_secs(30)).await;
    assert!(
        started.iter().all(|e| e["discovered"] == true),
        "{started:?}"
    );
    let got = keys_in(&format!("t.{later}"), 5, Duration::from_secs(30)).await;
    let mut keys: Vec<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["k0", "k1", "k2", "k3", "k4"],
        "{}",
        daemon.log_text()
    );
    let got = keys_in(&format!("t.{snap}"), 4, Duration::from_secs(30)).await;
    assert!(
        got.len() >= 4 && got.iter().filter(|(e, _)| e == "SNAPSHOT").count() == 4,
        "{got:?}\n{}",
        daemon.log_text()
    );
    put_n(&client, &snap, 10, 11).await;
    // The hand-off may repeat a few of the 4 items as INSERTs (changes made within a second
    // of the scan's start): read until the later change is there, not just 5 records.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = keys_in(&format!("t.{snap}"), 5, Duration::from_secs(30)).await;
    while !got.iter().any(|(e, k)| e == "INSERT" && k == "k10") && Instant::now() < deadline {
        got = keys_in(&format!("t.{snap}"), got.len() + 1, Duration::from_secs(2)).await;
    }
    assert!(
        got.iter().any(|(e, k)| e == "INSERT" && k == "k10"),
        "{got:?}\n{}",
        daemon.log_text()
    );

    // The table without a stream: one WARN with the fix over several rounds.
    tokio::time::sleep(Duration::from_secs(INTERVAL_SECONDS * 2 + 1)).await;
    let warned: Vec<Value> = daemon
        .log_events(
            "table matches a rule of tables but is not captured; checked again each interval",
        )
        .into_iter()
        .filter(|e| e["table"] == bare.as_str())
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}\n{}", daemon.log_text());
    assert_eq!(
        warned[0]["fix"],
        format!("aws dynamodb update-table --table-name {bare} --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"),
        "{warned:?}"
    );
    // The metrics say so too.
    let (code, text) =
        dynamodb_cdc::telemetry::server::get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap();
    assert_eq!(code, 200, "{text}");
    let metric = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    };
    assert!(
        metric("dynamodb_cdc_discovery_rounds_total{outcome=\"ok\"}") >= 2.0,
        "{text}"
    );
    assert_eq!(metric("dynamodb_cdc_skipped_tables"), 1.0, "{text}");
    assert_eq!(metric("dynamodb_cdc_discovered_tables"), 3.0, "{text}");
    // ... captured once its stream is enabled.
    client
        .update_table()
        .table_name(&bare)
        .stream_specification(stream_of(StreamViewType::NewAndOldImages))
        .send()
        .await
        .unwrap();
    put_n(&client, &bare, 0, 2).await;
    let got = keys_in(&format!("t.{bare}"), 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{got:?}\n{}", daemon.log_text());

    // Neither the untagged nor the excluded table was captured.
    for t in [&untagged, &excluded] {
        assert!(
            !daemon.log_text().contains(&format!("\"topic\":\"t.{t}\"")),
            "{t} captured:\n{}",
            daemon.log_text()
        );
    }

    // The tag removed: the table stops, keeping its checkpoints.
    client
        .untag_resource()
        .resource_arn(table_arn(&client, &kept).await)
        .tag_keys("cdc")
        .send()
        .await
        .unwrap();
    let stopping = wait_for_log(
        &daemon,
        "table no longer matches the rules of tables; draining its shard readers (checkpoints kept)",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(stopping[0]["table"], kept.as_str(), "{stopping:?}");
    let stopped = wait_for_log(
        &daemon,
        "table stopped; its checkpoints are kept",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        stopped.iter().any(|e| e["table"] == kept.as_str()),
        "{stopped:?}"
    );
    assert!(
        !read_checkpoints(&dir.path().join("cp"), &kept).is_empty(),
        "checkpoints of {kept} gone"
    );
    // Changes to it are no longer delivered.
    put_n(&client, &kept, 100, 101).await;

    // The table deleted: it stops, the daemon goes on.
    client
        .delete_table()
        .table_name(&later)
        .send()
        .await
        .unwrap();
    let gone = wait_for_log(
        &daemon,
        "table no longer listed (deleted); draining its shard readers (checkpoints kept)",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(gone[0]["table"], later.as_str(), "{gone:?}");
    put_n(&client, &bare, 2, 3).await;
    let got = keys_in(&format!("t.{bare}"), 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "{got:?}\n{}", daemon.log_text());
    assert!(
        daemon.try_status().is_none(),
        "daemon exited:\n{}",
        daemon.log_text()
    );
    let got = keys_in(&format!("t.{kept}"), 4, Duration::from_secs(3)).await;
    assert_eq!(
        got.len(),
        3,
        "a change after the tag was removed arrived: {got:?}"
    );

    // A reload whose rule now excludes the stream-less table: it stops at once (a round
    // runs on the reload, not at the next interval).
    let mut cfg = rule_config(&prefix, dir.path());
    cfg["tables"]["exclude"] = json!([format!("{prefix}-*-tmp"), format!("{prefix}-bare")]);
    cfg["tables"]["interval_seconds"] = json!(3600);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    daemon.signal("HUP");
    let excluded_now = || {
        daemon
            .log_events("table no longer matches the rules of tables; draining its shard readers (checkpoints kept)")
            .iter()
            .any(|e| e["table"] == bare.as_str() && e["reason"] == "an exclude pattern matches")
    };
    assert!(
        wait_for(Duration::from_secs(20), excluded_now).await,
        "{}",
        daemon.log_text()
    );

    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(!log.contains("pipeline failed"), "{log}");

    // `status` shows the tables the rule selects that have checkpoints, `snapshot --table`
    // loads one of them by name (tags are not read: its tag is gone).
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
            .args(args)
            .arg("--config")
            .arg(dir.path().join("config.json"))
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let status: Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    let listed: Vec<&str> = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    for t in [&kept, &later, &snap] {
        assert!(listed.contains(&t.as_str()), "{t} not in {status}");
    }
    // The reloaded rule excludes it now.
    assert!(!listed.contains(&bare.as_str()), "{status}");
    cli(&["snapshot", "--table", &kept]);
    let got = keys_in(&format!("t.{kept}"), 7, Duration::from_secs(30)).await;
    let rows = got.iter().filter(|(e, _)| e == "SNAPSHOT").count();
    assert_eq!(rows, 4, "{got:?}");
}

/// `dynamodb-cdc tables` over more than one ListTables page (105 matching tables): every one
/// listed with its topic, sync mode and stream; a named table, an excluded one, one
/// without the tag and one without a stream each with their reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tables_command_shows_what_the_rules_select() {
    if !stack_available() {
        return;
    }
    let client = dynamodb().await;
    let prefix = unique("list");
    const MANY: usize = 105;
    for i in 0..MANY {
        table(&client, &format!("{prefix}-{i:03}"), true, &[("cdc", "on")]).await;
    }
    let named = format!("{prefix}-named");
    table(&client, &named, true, &[]).await;
    table(
        &client,
        &format!("{prefix}-old-tmp"),
        true,
        &[("cdc", "on")],
    )
    .await;
    table(&client, &format!("{prefix}-notag"), true, &[]).await;
    table(
        &client,
        &format!("{prefix}-nostream"),
        false,
        &[("cdc", "on")],
    )
    .await;
    let keys_only = format!("{prefix}-keys");
    let keys = Some(StreamViewType::KeysOnly);
    create_table_with(&client, &keys_only, "pk", None, keys, &[("cdc", "on")]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rule_config(&prefix, dir.path());
    let rule = cfg["tables"].take();
    cfg["tables"] = json!([{"name": named, "topic": "named.topic"}, rule]);
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"));
        cmd.arg("tables").arg("--config").arg(&path);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let rows: HashMap<String, Value> = run(true)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["table"].as_str().unwrap().starts_with(&prefix))
        .map(|v| (v["table"].as_str().unwrap().to_owned(), v))
        .collect();
    assert_eq!(rows.len(), MANY + 5, "{rows:?}");
    for i in 0..MANY {
        let t = format!("{prefix}-{i:03}");
        let row = &rows[&t];
        assert_eq!(row["topic"], format!("t.{t}"), "{row}");
        assert_eq!(row["sync_mode"], "cdc", "{row}");
        assert_eq!(row["stream"], "NEW_AND_OLD_IMAGES", "{row}");
        assert_eq!(row["status"], "captured (a rule selects it)", "{row}");
    }
    assert_eq!(rows[&named]["status"], "captured (listed by name)");
    assert_eq!(rows[&named]["topic"], "named.topic");
    let status = |t: &str| {
        rows[&format!("{prefix}-{t}")]["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(status("old-tmp"), "skipped: an exclude pattern matches");
    assert_eq!(status("notag"), "skipped: no tag cdc");
    assert_eq!(
        status("nostream"),
        "skipped: the table has no stream enabled"
    );
    assert!(rows[&format!("{prefix}-nostream")]["fix"]
        .as_str()
        .unwrap()
        .contains("StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"));
    assert_eq!(
        status("keys"),
        "skipped: its stream is KEYS_ONLY: change events need the item images"
    );
    assert!(rows[&keys_only]["fix"]
        .as_str()
        .unwrap()
        .contains("StreamEnabled=false"));
    // The text form: a header, one line a table, the summary.
    let text = run(false);
    assert!(text.starts_with("TABLE "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{prefix}-104 "))
                && l.contains(&format!("t.{prefix}-104"))),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .unwrap()
            .contains("selected by the rules"),
        "{text}"
    );
    report(&format!(
        "discovery: tables command over {} tables listed",
        text.lines().count() - 2
    ));
}

/// Without `kafka.create_topics`, a found table whose topic is missing fails alone (an ERROR
/// naming it, retried each round); a found table whose topic exists is delivered and the
/// daemon goes on, then stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_fails_that_table_alone() {
    if !stack_available() {
        return;
    }
    let client = dynamodb().await;
    let prefix = unique("notopic");
    let (with, without) = (format!("{prefix}-with"), format!("{prefix}-without"));
    for t in [&with, &without] {
        table(&client, t, true, &[("cdc", "on")]).await;
        put_n(&client, t, 0, 2).await;
    }
    let kafka = kafka_client(&kafka_bootstrap(), None, None, Duration::from_secs(30))
        .await
        .unwrap();
    kafka
        .controller_client()
        .unwrap()
        .create_topic(format!("t.{with}"), 3, 1, 5_000)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rule_config(&prefix, dir.path());
    cfg["kafka"]
        .as_object_mut()
        .unwrap()
        .remove("create_topics");
    let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
    let got = keys_in(&format!("t.{with}"), 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{got:?}\n{}", daemon.log_text());
    let failed = || {
        daemon
            .log_events("table stopped on an error; the other tables go on, and discovery starts it again at its next round")
            .iter()
            .filter(|e| e["table"] == without.as_str())
            .count()
    };
    // Failed at the start, and again at a later round.
    assert!(
        wait_for(Duration::from_secs(30), || failed() >= 2).await,
        "{}",
        daemon.log_text()
    );
    assert!(daemon.try_status().is_none(), "{}", daemon.log_text());
    put_n(&client, &with, 10, 11).await;
    let got = keys_in(&format!("t.{with}"), 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "{got:?}\n{}", daemon.log_text());
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
}
