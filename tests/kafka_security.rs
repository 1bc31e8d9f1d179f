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
