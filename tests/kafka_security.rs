//! Kafka over TLS and SASL against real brokers: tansu brokers of each test's own (sqlite
//! storage, which tansu needs to check SCRAM), behind the tests' TLS terminator when a test
//! needs TLS (tansu 0.6 serves plain TCP only).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::scram::{Mechanism, ScramBroker};
use common::tls::{client_config, TestPki};
use common::*;
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::SaslConfig;
use rskafka::record::Record;

/// How long a client may try before a refusal counts as one.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(30);

// Fixtures: the test PKI, the TLS terminator and the SCRAM broker do what the daemon's
// tests rely on.

/// Connects to `bootstrap` (over TLS with `tls`, logged in with `sasl`), checks that
/// `topic` is listed, produces a record to its partition 0 and reads it back.
async fn round_trip(
    bootstrap: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<SaslConfig>,
    topic: &str,
) {
    let client = kafka_client(bootstrap, tls, sasl, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("connect to {bootstrap}: {e}"));
    let topics = within(TIMEOUT, "list topics", client.list_topics())
        .await
        .expect("list topics");
    assert!(
        topics.iter().any(|t| t.name == topic),
        "{topic} not among {:?}",
        topics.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    let partition = within(
        TIMEOUT,
        "partition client",
        client.partition_client(topic, 0, UnknownTopicHandling::Error),
    )
    .await
    .expect("partition client");
    let value = format!("value {:08x}", rand::random::<u32>());
    let record = Record {
        key: Some(b"key".to_vec()),
        value: Some(value.clone().into_bytes()),
        headers: Default::default(),
        timestamp: rskafka::chrono::Utc::now(),
    };
    let offsets = within(
        TIMEOUT,
        "produce",
        partition.produce(vec![record], Default::default()),
    )
    .await
    .expect("produce");
    let (records, _) = within(
        TIMEOUT,
        "fetch",
        partition.fetch_records(offsets[0], 1..1_000_000, 100),
    )
    .await
    .expect("fetch");
    let read = records
        .iter()
        .find(|r| r.offset == offsets[0])
        .unwrap_or_else(|| panic!("offset {} not fetched: {records:?}", offsets[0]));
    assert_eq!(read.record.value.as_deref(), Some(value.as_bytes()));
}

/// The error a client connecting to `bootstrap` gets (panics if it connects).
async fn refusal(
    bootstrap: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<SaslConfig>,
) -> String {
    match kafka_client(bootstrap, tls, sasl, REFUSAL_DEADLINE).await {
        Ok(client) => {
            // Connected: any request must still fail (e.g. tansu refusing a request
            // of a client that did not log in).
            match within(TIMEOUT, "list topics", client.list_topics()).await {
                Ok(topics) => panic!("{bootstrap} accepted the client; topics: {topics:?}"),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e,
    }
}

fn assert_mentions(error: &str, words: &[&str]) {
    assert!(
        words.iter().any(|w| error.contains(w)),
        "expected one of {words:?} in: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_scram_sha256_and_sha512_users_list_produce_and_consume() {
    let topic = unique("scram");
    let Some(broker) = ScramBroker::start(
        &[
            ("alice", "alice-secret", Mechanism::ScramSha256),
            ("bob", "bob-secret", Mechanism::ScramSha512),
        ],
        None,
        &[(&topic, 1)],
    )
    .await
    else {
        return;
    };
    for (user, password, mechanism) in [
        ("alice", "alice-secret", Mechanism::ScramSha256),
        ("bob", "bob-secret", Mechanism::ScramSha512),
    ] {
        round_trip(
            &broker.bootstrap(),
            None,
            Some(mechanism.sasl_config(user, password)),
            &topic,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_scram_refuses_a_wrong_password_an_unknown_user_and_the_wrong_mechanism() {
    let topic = unique("scram");
    let Some(broker) = ScramBroker::start(
        &[("alice", "alice-secret", Mechanism::ScramSha256)],
        None,
        &[(&topic, 1)],
    )
    .await
    else {
        return;
    };
    let bootstrap = broker.bootstrap();
    for sasl in [
        Mechanism::ScramSha256.sasl_config("alice", "wrong"),
        Mechanism::ScramSha256.sasl_config("mallory", "alice-secret"),
        Mechanism::ScramSha512.sasl_config("alice", "alice-secret"),
    ] {
        let error = refusal(&bootstrap, None, Some(sasl)).await;
        assert_mentions(&error, &["Sasl", "SASL", "sasl"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_tls_terminator_works_with_the_ca_and_fails_with_another() {
    let pki = TestPki::new();
    let topic = unique("tls");
    let Some(broker) = ScramBroker::start(&[], Some(&pki), &[(&topic, 1)]).await else {
        return;
    };
    let bootstrap = broker.bootstrap();
    assert_ne!(bootstrap, broker.plain_addr());
    round_trip(
        &bootstrap,
        Some(client_config(&[&pki.ca_file()], None)),
        None,
        &topic,
    )
    .await;
    // By name too: the certificate is for localhost as well as 127.0.0.1.
    let port = broker.tls().unwrap().port();
    round_trip(
        &format!("localhost:{port}"),
        Some(client_config(&[&pki.ca_file()], None)),
        None,
        &topic,
    )
    .await;

    let error = refusal(
        &bootstrap,
        Some(client_config(&[&pki.other_ca_file()], None)),
        None,
    )
    .await;
    assert_mentions(&error, &["UnknownIssuer", "invalid peer certificate"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca() {
    let pki = TestPki::new();
    let topic = unique("mtls");
    let Some(broker) = ScramBroker::start_with(&[], Some((&pki, true)), &[(&topic, 1)]).await
    else {
        return;
    };
    let bootstrap = broker.bootstrap();
    let terminator = broker.tls().unwrap();

    refusal(
        &bootstrap,
        Some(client_config(&[&pki.ca_file()], None)),
        None,
    )
    .await;
    assert!(
        terminator
            .failures()
            .iter()
            .any(|f| f.contains("TLS handshake") && f.contains("certificate")),
        "no refused handshake: {:?}",
        terminator.failures()
    );

    let before = terminator.failures().len();
    refusal(
        &bootstrap,
        Some(client_config(
            &[&pki.ca_file()],
            Some((&pki.other_client_cert_file(), &pki.other_client_key_file())),
        )),
        None,
    )
    .await;
    assert!(
        terminator.failures()[before..]
            .iter()
            .any(|f| f.contains("TLS handshake")),
        "a certificate of another CA was not refused: {:?}",
        terminator.failures()
    );

    round_trip(
        &bootstrap,
        Some(client_config(
            &[&pki.ca_file()],
            Some((&pki.client_cert_file(), &pki.client_key_file())),
        )),
        None,
        &topic,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_scram_over_tls() {
    let pki = TestPki::new();
    let topic = unique("scram_tls");
    let Some(broker) = ScramBroker::start(
        &[("carol", "carol-secret", Mechanism::ScramSha512)],
        Some(&pki),
        &[(&topic, 2)],
    )
    .await
    else {
        return;
    };
    let tls = client_config(&[&pki.ca_file()], None);
    round_trip(
        &broker.bootstrap(),
        Some(tls.clone()),
        Some(Mechanism::ScramSha512.sasl_config("carol", "carol-secret")),
        &topic,
    )
    .await;
    let error = refusal(
        &broker.bootstrap(),
        Some(tls),
        Some(Mechanism::ScramSha512.sasl_config("carol", "wrong")),
    )
    .await;
    assert_mentions(&error, &["Sasl", "SASL", "sasl"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_set_password_makes_the_old_password_fail_and_the_new_one_work() {
    let topic = unique("rotate");
    let Some(mut broker) = ScramBroker::start(
        &[("dave", "old-secret", Mechanism::ScramSha256)],
        None,
        &[(&topic, 1)],
    )
    .await
    else {
        return;
    };
    let bootstrap = broker.bootstrap();
    let old = || Some(Mechanism::ScramSha256.sasl_config("dave", "old-secret"));
    round_trip(&bootstrap, None, old(), &topic).await;

    broker
        .set_password("dave", "new-secret", Mechanism::ScramSha256)
        .await;
    assert_eq!(
        broker.bootstrap(),
        bootstrap,
        "same address after the change"
    );

    let error = refusal(&bootstrap, None, old()).await;
    assert_mentions(&error, &["Sasl", "SASL", "sasl"]);
    round_trip(
        &bootstrap,
        None,
        Some(Mechanism::ScramSha256.sasl_config("dave", "new-secret")),
        &topic,
    )
    .await;
}

// The daemon against secure brokers.

/// Runs `dynamodb-cdc check` on `config`; (exit code, output).
fn run_check(dir: &std::path::Path, config: &serde_json::Value) -> (i32, String) {
    run_check_as(dir, config, "test", "test")
}

/// A table with a stream and a config for it pointed at `bootstrap`, its topic existing.
async fn table_and_config(
    dir: &std::path::Path,
    prefix: &str,
    bootstrap: &str,
) -> (String, String, serde_json::Value) {
    let table = unique(prefix);
    let topic = format!("{table}-events");
    create_table(
        &dynamodb().await,
        &table,
        "pk",
        None,
        aws_sdk_dynamodb::types::StreamViewType::NewAndOldImages,
    )
    .await;
    let mut config = config(&[(&table, &topic)], None, &dir.join("checkpoints"));
    config["kafka"]["bootstrap_servers"] = serde_json::json!([bootstrap]);
    config["kafka"]
        .as_object_mut()
        .unwrap()
        .remove("create_topics");
    (table, topic, config)
}

async fn put_items(table: &str, range: std::ops::Range<usize>) {
    let db = dynamodb().await;
    for i in range {
        put(
            &db,
            table,
            vec![("pk", s(&format!("k{i}"))), ("n", n(&i.to_string()))],
        )
        .await;
    }
}

/// Reads `tail` until it holds `count` records or `within` passed.
async fn read_until(tail: &mut Tail, count: usize, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while tail.records.len() < count && std::time::Instant::now() < deadline {
        tail.poll().await;
        if tail.records.len() < count {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn keys(tail: &Tail) -> std::collections::BTreeSet<String> {
    tail.records
        .iter()
        .map(|r| r.value.as_ref().expect("a change event")["keys"]["pk"].to_string())
        .collect()
}

/// SCRAM-SHA-256 over TLS: `check` reports the handshake (certificate subject and expiry)
/// and the login on their own lines, and `run` delivers every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_delivers_over_tls_with_scram_and_check_reports_both() {
    if !stack_available() {
        return skip("needs the local stack");
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let topic_name = unique("tls-scram-events");
    let Some(broker) = ScramBroker::start(
        &[("cdc", "cdc-password", Mechanism::ScramSha256)],
        Some(&pki),
        &[(&topic_name, 2)],
    )
    .await
    else {
        return;
    };
    let (table, _, mut config) =
        table_and_config(dir.path(), "tls_scram", &broker.bootstrap()).await;
    config["tables"][0]["topic"] = serde_json::json!(topic_name);
    config["kafka"]["tls"] = serde_json::json!({"ca_file": pki.ca_file()});
    config["kafka"]["sasl"] = serde_json::json!({
        "mechanism": "SCRAM-SHA-256", "username": "cdc", "password": "cdc-password"
    });

    let (code, out) = run_check(dir.path(), &config);
    assert_eq!(code, 0, "{out}");
    let tls_line = out
        .lines()
        .find(|l| l.starts_with("OK   kafka TLS "))
        .unwrap_or_else(|| panic!("no TLS line: {out}"));
    assert!(tls_line.contains(common::tls::SERVER_CN), "{tls_line}");
    assert!(tls_line.contains("2099-12-31"), "{tls_line}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("OK   kafka SASL SCRAM-SHA-256 as cdc: login accepted")),
        "{out}"
    );
    assert!(!out.contains("cdc-password"), "{out}");

    let mut daemon = Daemon::start(dir.path(), &config, &[]);
    put_items(&table, 0..20).await;
    let mut tail = Tail::new(&broker.bootstrap(), &topic_name)
        .tls(client_config(&[&pki.ca_file()], None))
        .sasl(Mechanism::ScramSha256.sasl_config("cdc", "cdc-password"));
    read_until(&mut tail, 20, Duration::from_secs(60)).await;
    assert_eq!(keys(&tail).len(), 20, "{}", daemon.log_text());
    assert!(daemon.stop(Duration::from_secs(30)).success());
    assert!(!daemon.log_text().contains("cdc-password"));
}

/// Mutual TLS: with the client certificate the daemon is let in; without one, or when the
/// broker's certificate does not carry `server_name`, `check` fails naming `kafka.tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate_and_a_wrong_server_name_is_refused() {
    if !stack_available() {
        return skip("needs the local stack");
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let topic_name = unique("mtls-events");
    let Some(broker) = ScramBroker::start_with(&[], Some((&pki, true)), &[(&topic_name, 1)]).await
    else {
        return;
    };
    let (table, _, mut config) = table_and_config(dir.path(), "mtls", &broker.bootstrap()).await;
    config["tables"][0]["topic"] = serde_json::json!(topic_name);
    config["kafka"]["tls"] = serde_json::json!({
        "ca_file": pki.ca_file(),
        "cert_file": pki.client_cert_file(),
        "key_file": pki.client_key_file(),
    });
    let (code, out) = run_check(dir.path(), &config);
    assert_eq!(code, 0, "{out}");

    // No client certificate: the broker (terminator) refuses the handshake.
    let mut without = config.clone();
    without["kafka"]["tls"] = serde_json::json!({"ca_file": pki.ca_file()});
    let (code, out) = run_check(dir.path(), &without);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("kafka.tls")),
        "{out}"
    );

    // A name the certificate does not carry.
    let mut wrong_name = config.clone();
    wrong_name["kafka"]["tls"]["server_name"] = serde_json::json!("broker.wrong.example");
    let (code, out) = run_check(dir.path(), &wrong_name);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL kafka.tls"))
        .unwrap_or_else(|| panic!("no kafka.tls failure: {out}"));
    assert!(
        line.contains("NotValidForName") || line.contains("not valid for name"),
        "{line}"
    );

    // And the daemon delivers over mutual TLS.
    let mut daemon = Daemon::start(dir.path(), &config, &[]);
    put_items(&table, 0..5).await;
    let mut tail = Tail::new(&broker.bootstrap(), &topic_name).tls(client_config(
        &[&pki.ca_file()],
        Some((&pki.client_cert_file(), &pki.client_key_file())),
    ));
    read_until(&mut tail, 5, Duration::from_secs(60)).await;
    assert_eq!(keys(&tail).len(), 5, "{}", daemon.log_text());
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// A Secrets Manager client of the shared moto.
async fn secrets_manager() -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(&sdk_config(&aws_endpoint(), "test", "test", None).await)
}

/// Writes `password` into the JSON secret `name` (creating it the first time).
async fn put_kafka_secret(client: &aws_sdk_secretsmanager::Client, name: &str, password: &str) {
    let value = serde_json::json!({"username": "cdc", "password": password}).to_string();
    if client
        .put_secret_value()
        .secret_id(name)
        .secret_string(&value)
        .send()
        .await
        .is_err()
    {
        client
            .create_secret()
            .name(name)
            .secret_string(&value)
            .send()
            .await
            .expect("create secret");
    }
}

/// A wrong password, read from Secrets Manager: `check` prints FAIL naming `kafka.sasl`;
/// `run` logs an ERROR naming `kafka.sasl` and the mechanism, keeps retrying, checkpoints
/// nothing, and delivers every change once the secret and the broker's password are
/// changed together, without a restart. Then a rotation while running: the broker and the
/// secret move to a new password the daemon has never seen, and it picks it up by reading
/// the secret again. No password reaches the log, the checkpoints or `check`'s output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_retried_and_everything_arrives_once_the_password_matches() {
    if !stack_available() {
        return skip("needs the local stack");
    }
    let dir = tempfile::tempdir().unwrap();
    let topic_name = unique("rotate-events");
    let Some(mut broker) = ScramBroker::start(
        &[("cdc", "old-password", Mechanism::ScramSha512)],
        None,
        &[(&topic_name, 2)],
    )
    .await
    else {
        return;
    };
    let sm = secrets_manager().await;
    let secret = unique("kafka/cdc");
    put_kafka_secret(&sm, &secret, "wrong-password").await;
    let (table, _, mut config) = table_and_config(dir.path(), "rotate", &broker.bootstrap()).await;
    config["tables"][0]["topic"] = serde_json::json!(topic_name);
    config["kafka"]["sasl"] = serde_json::json!({
        "mechanism": "SCRAM-SHA-512",
        "username": format!("${{secretsmanager:{secret}#username}}"),
        "password": format!("${{secretsmanager:{secret}#password}}"),
    });
    config["kafka"]["produce_timeout_ms"] = serde_json::json!(5000);
    let passwords = [
        "old-password",
        "wrong-password",
        "new-password",
        "rotated-password",
    ];
    let leaked = |text: &str| passwords.iter().find(|p| text.contains(*p)).copied();

    let (code, out) = run_check(dir.path(), &config);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l == "OK   secrets: 2 reference(s) resolved (2 from Secrets Manager)"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL kafka.sasl: SCRAM-SHA-512 login refused")),
        "{out}"
    );
    assert_eq!(leaked(&out), None, "{out}");

    let mut daemon = Daemon::start(dir.path(), &config, &[]);
    let refused = wait_for_log(&daemon, "cannot log in to Kafka; retrying", TIMEOUT).await;
    let error = refused[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("kafka.sasl") && error.contains("SCRAM-SHA-512"),
        "{error}"
    );
    assert_eq!(refused[0]["level"], "ERROR");
    put_items(&table, 0..10).await;
    // Nothing is checkpointed while nothing can be delivered.
    assert!(
        read_checkpoints(&dir.path().join("checkpoints"), &table)
            .values()
            .all(Option::is_none),
        "checkpoints before any delivery"
    );

    // The operator fixes both sides: the secret and the broker's user.
    put_kafka_secret(&sm, &secret, "new-password").await;
    broker
        .set_password("cdc", "new-password", Mechanism::ScramSha512)
        .await;
    put_items(&table, 10..20).await;
    let mut tail = Tail::new(&broker.bootstrap(), &topic_name)
        .sasl(Mechanism::ScramSha512.sasl_config("cdc", "new-password"));
    read_until(&mut tail, 20, Duration::from_secs(90)).await;
    assert_eq!(keys(&tail).len(), 20, "{}", daemon.log_text());

    // Rotation while running: the broker's password changes under the daemon (its
    // connections drop, logging in again is refused: the produce path renews the
    // session), and the secret follows.
    broker
        .set_password("cdc", "rotated-password", Mechanism::ScramSha512)
        .await;
    put_items(&table, 20..30).await;
    wait_for_log(
        &daemon,
        "kafka.sasl: the brokers refused the login; reading the credentials again and reconnecting",
        TIMEOUT,
    )
    .await;
    put_kafka_secret(&sm, &secret, "rotated-password").await;
    put_items(&table, 30..40).await;
    let mut tail = Tail::new(&broker.bootstrap(), &topic_name)
        .sasl(Mechanism::ScramSha512.sasl_config("cdc", "rotated-password"));
    read_until(&mut tail, 40, Duration::from_secs(90)).await;
    assert_eq!(keys(&tail).len(), 40, "{}", daemon.log_text());
    assert!(daemon.try_status().is_none(), "the daemon kept running");
    assert!(daemon.stop(Duration::from_secs(30)).success());
    let log = daemon.log_text();
    assert_eq!(leaked(&log), None, "a password in the log");
    let written = files_under(&dir.path().join("checkpoints"));
    assert!(!written.is_empty(), "no checkpoint file was written");
    for entry in written {
        let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
        assert_eq!(leaked(&text), None, "a password in {}", entry.display());
    }
}
