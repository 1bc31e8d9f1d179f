//! The daemon reads only through the assumed role, and refreshes the role session before it
//! expires while reading continues.
//!
//! This test starts its own moto server with IAM enforcement (`INITIAL_NO_AUTH_ACTION_COUNT`):
//! the first calls (unauthenticated) create the users, keys, role and policies; every call
//! after them must be signed by a known key and allowed by its policies.
//!
//! `secret_references_resolve_with_the_base_user_then_the_role` starts one of its own too.
//! `kafka_sasl_role_arn_signs_with_its_own_role_session` uses the shared moto instead.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::StreamViewType;
use common::*;
use serde_json::json;

/// Calls made before enforcement starts: 2 users x (user, key, policy) + 2 x (role, role
/// policy).
const SETUP_CALLS: usize = 10;
/// The same for the secrets test: user, key, policy, secret in the base account; role, role
/// policy, secret in the role's account.
const SECRETS_SETUP_CALLS: usize = 7;
/// The account the secrets test's role lives in: a secret of that account is out of the
/// base user's reach (moto resolves a secret name within the caller's account).
const ROLE_ACCOUNT: &str = "222222222222";

fn moto_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DYNAMODB_CDC_MOTO_SERVER") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    let bin = cache.join("dynamodb-cdc/venv/bin/moto_server");
    if bin.exists() {
        bin
    } else {
        "moto_server".into()
    }
}

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto_with_auth(log: &std::path::Path, setup_calls: usize) -> Option<Moto> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = match Command::new(moto_server_bin())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", setup_calls.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            skip(&format!(
                "cannot start {} ({e}; set DYNAMODB_CDC_MOTO_SERVER); run ./localstack/test.sh",
                moto_server_bin().display()
            ));
            return None;
        }
    };
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

/// Creates a user with one inline policy; returns (access key id, secret).
async fn user(
    iam: &aws_sdk_iam::Client,
    name: &str,
    policy: serde_json::Value,
) -> (String, String) {
    iam.create_user()
        .user_name(name)
        .send()
        .await
        .expect("create user");
    let key = iam
        .create_access_key()
        .user_name(name)
        .send()
        .await
        .expect("create key");
    let key = key.access_key().unwrap();
    iam.put_user_policy()
        .user_name(name)
        .policy_name("p")
        .policy_document(policy.to_string())
        .send()
        .await
        .expect("put user policy");
    (
        key.access_key_id().to_owned(),
        key.secret_access_key().to_owned(),
    )
}

/// What `dynamodb-cdc integration policy` prints for `config`, by identity (`role`, `base
/// identity`, ...), each statement's Resource widened to `*`: moto checks DynamoDB and
/// Secrets Manager calls against `*`, so a statement scoped to an ARN would allow nothing
/// there (the scoping itself is checked by the golden-file unit tests).
/// Creates `name` with the trust policy `trust` and the inline policy `policy`; its ARN.
async fn create_role(
    iam: &aws_sdk_iam::Client,
    name: &str,
    trust: &serde_json::Value,
    policy: &serde_json::Value,
) -> String {
    let arn = iam
        .create_role()
        .role_name(name)
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("create role {name}: {e:?}"))
        .role()
        .unwrap()
        .arn()
        .to_owned();
    iam.put_role_policy()
        .role_name(name)
        .policy_name("dynamodb-cdc")
        .policy_document(policy.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("put the policy of {name}: {e:?}"));
    arn
}

fn generated_policies(
    dir: &std::path::Path,
    config: &serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    let path = dir.join("policy-config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dynamodb-cdc"))
        .args(["integration", "policy", "--format", "json", "--config"])
        .arg(&path)
        .output()
        .expect("run integration policy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    printed["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut policy = p["policy"].clone();
            for statement in policy["Statement"].as_array_mut().unwrap() {
                statement["Resource"] = json!("*");
            }
            (p["for"].as_str().unwrap().to_owned(), policy)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_only_through_the_role_and_refreshes_it_before_expiry() {
    if !stack_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = start_moto_with_auth(&dir.path().join("moto.log"), SETUP_CALLS) else {
        return;
    };
    let ep = moto.endpoint.clone();

    // The unauthenticated setup calls.
    let iam = aws_sdk_iam::Client::new(&sdk_config(&ep, "test", "test", None).await);
    let role_name = unique("cdc-reader");
    let table = unique("authz");
    let topic = format!("t.{table}");
    let mut cfg = config(&[(&table, &topic)], None, &dir.path().join("cp"));
    cfg["aws"]["endpoint_url"] = json!(ep);
    // The shortest session STS grants (15 min), refreshed 10 s after each assume.
    cfg["aws"]["assume_role"] = json!({
        "role_arn": format!("arn:aws:iam::{ACCOUNT}:role/{role_name}"),
        "external_id": "ext-123",
        "duration_seconds": 900,
        "refresh_before_expiry_seconds": 890
    });
    // A snapshot first (of the empty table): the role's policy grants Scan too.
    cfg["sync_mode"] = json!("snapshot_cdc");
    // The base user and the role get exactly what `integration policy` prints for this
    // config, and nothing else: the pipeline running proves it is enough.
    let policies = generated_policies(dir.path(), &cfg);
    let (base_key, base_secret) = user(&iam, "cdc-base", policies["base identity"].clone()).await;
    let (admin_key, admin_secret) = user(
        &iam,
        "cdc-admin",
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
    )
    .await;
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/cdc-base")}, "Action": "sts:AssumeRole"}]});
    let role_arn = create_role(&iam, &role_name, &trust, &policies["role"]).await;
    assert_eq!(cfg["aws"]["assume_role"]["role_arn"], json!(role_arn));
    // The same role without one action, for `check` to find.
    let mut short = policies["role"].clone();
    for statement in short["Statement"].as_array_mut().unwrap() {
        statement["Action"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a != "dynamodb:GetRecords");
    }
    let short_role = format!("{role_name}-short");
    let short_arn = create_role(&iam, &short_role, &trust, &short).await;

    // From here on, IAM is enforced.
    let admin =
        aws_sdk_dynamodb::Client::new(&sdk_config(&ep, &admin_key, &admin_secret, None).await);
    create_table(&admin, &table, "pk", None, StreamViewType::NewAndOldImages).await;

    // Negative control: the base identity alone may not read the table.
    let base = aws_sdk_dynamodb::Client::new(&sdk_config(&ep, &base_key, &base_secret, None).await);
    let denied = base.describe_table().table_name(&table).send().await;
    let err = format!(
        "{:?}",
        denied.expect_err("the base user must not read DynamoDB directly")
    );
    assert!(err.contains("AccessDenied"), "{err}");
    // And an unknown signature is refused.
    let forged =
        aws_sdk_dynamodb::Client::new(&sdk_config(&ep, &base_key, "wrong-secret", None).await);
    assert!(forged
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .is_err());

    // `check` probes every read the pipeline makes, through the role.
    let (code, out) = run_check_as(dir.path(), &cfg, &base_key, &base_secret);
    assert_eq!(code, 0, "{out}");
    for action in ["GetShardIterator", "GetRecords"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("OK   dynamodb:{action} on arn:aws:dynamodb:"))),
            "{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l == format!("OK   table {table}: dynamodb:Scan (snapshot)")),
        "{out}"
    );
    // This role's trust policy has no sts:ExternalId condition.
    assert!(
        out.lines().any(|l| l.starts_with(&format!(
            "WARN assume role {role_arn} without the external ID succeeded"
        ))),
        "{out}"
    );
    // One action missing: `check` names it, and only it.
    let mut short_cfg = cfg.clone();
    short_cfg["aws"]["assume_role"]["role_arn"] = json!(short_arn);
    let (code, out) = run_check_as(dir.path(), &short_cfg, &base_key, &base_secret);
    assert_eq!(code, 1, "{out}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].starts_with("FAIL dynamodb:GetRecords on arn:aws:dynamodb:")
            && fails[0].contains("AccessDenied"),
        "{out}"
    );

    let mut daemon = Daemon::start(
        dir.path(),
        &cfg,
        &[
            ("AWS_ACCESS_KEY_ID", &base_key),
            ("AWS_SECRET_ACCESS_KEY", &base_secret),
        ],
    );

    // The table is empty: its snapshot ends at once, and every write below is a change.
    wait_for_log(&daemon, "snapshot complete", Duration::from_secs(60)).await;
    // Keep writing across at least two refreshes; every change must arrive.
    let writes = 50;
    for i in 0..writes {
        put(
            &admin,
            &table,
            vec![("pk", s(&format!("k{}", i % 5))), ("i", n(&i.to_string()))],
        )
        .await;
        // Paces the writes across the refreshes; nothing waits on it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got = consume(&topic, writes, Duration::from_secs(60)).await;
    assert_eq!(got.len(), writes, "{}", daemon.log_text());
    // Written every 500 ms over 25 s, read through the role all along: the last change
    // arrived after two refreshes, so reading continued across them.
    let refreshes = daemon.log_events("refreshed role session");
    let assumed = daemon.log_events("assumed role");
    assert_eq!(assumed.len(), 1, "{}", daemon.log_text());
    assert_eq!(daemon.log_events("snapshot complete").len(), 1);
    assert!(
        refreshes.len() >= 2,
        "expected at least 2 refreshes:\n{}",
        daemon.log_text()
    );
    for e in refreshes.iter().chain(&assumed) {
        assert_eq!(e["role_arn"], json!(role_arn));
        assert!(e["expires_at"].is_string(), "{e}");
    }
    let status = daemon.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());

    // No error-level line, and no secret in the log.
    let log = daemon.log_text();
    assert!(!log.contains("AccessDenied"), "{log}");
    assert!(
        !log.contains(&base_secret),
        "the base secret key reached the log"
    );
    assert!(!log.contains("ext-123"), "the external id reached the log");
}

/// `${secretsmanager:...}` under IAM enforcement: the external ID comes from a secret the
/// base user may read (resolved before the role is assumed), the SASL user and password
/// from a secret only the role can reach (another account's); a missing secret or JSON key
/// exits 2 naming the key path, the secret and the code; no value reaches the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_references_resolve_with_the_base_user_then_the_role() {
    if !stack_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = start_moto_with_auth(&dir.path().join("moto.log"), SECRETS_SETUP_CALLS) else {
        return;
    };
    let ep = moto.endpoint.clone();
    let external_id = "ext-from-a-secret-1234";
    let password = "pw-only-the-role-reads";

    // Setup (unauthenticated): the base account.
    let setup = sdk_config(&ep, "test", "test", None).await;
    let iam = aws_sdk_iam::Client::new(&setup);
    let (base_key, base_secret) = user(
        &iam,
        "cdc-base",
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": ["sts:AssumeRole", "secretsmanager:GetSecretValue"], "Resource": "*"}]}),
    )
    .await;
    let sm = aws_sdk_secretsmanager::Client::new(&setup);
    sm.create_secret()
        .name("cdc/external-id")
        .secret_string(external_id)
        .send()
        .await
        .expect("create the external id secret");
    // The role's account (moto: the x-moto-account-id header picks it).
    let in_role_account = |req: &mut aws_smithy_runtime_api::http::Request| {
        req.headers_mut().insert("x-moto-account-id", ROLE_ACCOUNT);
    };
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/cdc-base")},
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}}}]});
    let role_arn = iam
        .create_role()
        .role_name("cdc-reader")
        .assume_role_policy_document(trust.to_string())
        .customize()
        .mutate_request(in_role_account)
        .send()
        .await
        .expect("create role")
        .role()
        .unwrap()
        .arn()
        .to_owned();
    assert!(role_arn.contains(ROLE_ACCOUNT), "{role_arn}");
    let mut policy = reader_policy();
    policy["Statement"][0]["Action"]
        .as_array_mut()
        .unwrap()
        .push(json!("secretsmanager:GetSecretValue"));
    iam.put_role_policy()
        .role_name("cdc-reader")
        .policy_name("read")
        .policy_document(policy.to_string())
        .customize()
        .mutate_request(in_role_account)
        .send()
        .await
        .expect("put role policy");
    sm.create_secret()
        .name("kafka/cdc")
        .secret_string(json!({"username": "cdc", "password": password}).to_string())
        .customize()
        .mutate_request(in_role_account)
        .send()
        .await
        .expect("create the kafka secret");

    // From here on, IAM is enforced. The base user reads the external ID's secret, and
    // cannot read the Kafka secret.
    let base =
        aws_sdk_secretsmanager::Client::new(&sdk_config(&ep, &base_key, &base_secret, None).await);
    let got = base
        .get_secret_value()
        .secret_id("cdc/external-id")
        .send()
        .await
        .expect("the base user reads the external id");
    assert_eq!(got.secret_string(), Some(external_id));
    let err = base
        .get_secret_value()
        .secret_id("kafka/cdc")
        .send()
        .await
        .expect_err("the base user must not read the Kafka secret");
    assert!(
        format!("{err:?}").contains("ResourceNotFoundException"),
        "{err:?}"
    );

    let table = unique("secrets");
    let mut cfg = config(
        &[(&table, &format!("t.{table}"))],
        None,
        &dir.path().join("cp"),
    );
    cfg["aws"]["endpoint_url"] = json!(ep);
    cfg["aws"]["assume_role"] = json!({
        "role_arn": role_arn,
        "external_id": "${secretsmanager:cdc/external-id}",
    });
    cfg["kafka"]["sasl"] = json!({
        "mechanism": "SCRAM-SHA-256",
        "username": "${secretsmanager:kafka/cdc#username}",
        "password": "${secretsmanager:kafka/cdc#password}",
    });
    let leaks = |out: &str| out.contains(password) || out.contains(external_id);

    // Resolved: the role was assumed with the external ID from the secret (moto refuses a
    // wrong one), and the password read under it. The table and the (SASL-less) broker
    // are not this test's business: only the lines before them are checked.
    let (code, out) = run_check_as(dir.path(), &cfg, &base_key, &base_secret);
    assert_ne!(code, 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l == "OK   secrets: 3 reference(s) resolved (3 from Secrets Manager)"),
        "{out}"
    );
    for line in [
        "OK   secretsmanager:GetSecretValue on cdc/external-id (aws.assume_role.external_id)",
        "OK   secretsmanager:GetSecretValue on kafka/cdc (kafka.sasl.password)",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("OK   assume role {role_arn}"))),
        "{out}"
    );
    assert!(!leaks(&out), "{out}");

    // Failures stop the start with exit 2 and say which key, which secret, which code.
    for (key, value, needles) in [
        (
            "password",
            "${secretsmanager:kafka/missing#password}",
            vec!["config key kafka.sasl.password: secret kafka/missing: ResourceNotFoundException"],
        ),
        (
            "password",
            "${secretsmanager:kafka/cdc#passwd}",
            vec![
                "config key kafka.sasl.password: secret kafka/cdc: MissingJsonKey",
                "its keys: password, username",
            ],
        ),
    ] {
        let mut bad = cfg.clone();
        bad["kafka"]["sasl"][key] = json!(value);
        let (code, out) = run_check_as(dir.path(), &bad, &base_key, &base_secret);
        assert_eq!(code, 2, "{value}: {out}");
        for needle in needles {
            assert!(out.contains(needle), "{value}: {out}");
        }
        assert!(!leaks(&out), "{out}");
    }
    // A reference inside aws.assume_role is read with the base credentials, before the
    // role is assumed: its failure names that key. (moto does not check the external ID
    // of a role in another account, so a wrong value would not be refused here.)
    let mut bad = cfg.clone();
    bad["aws"]["assume_role"]["external_id"] = json!("${secretsmanager:cdc/missing}");
    let (code, out) = run_check_as(dir.path(), &bad, &base_key, &base_secret);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "config key aws.assume_role.external_id: secret cdc/missing: ResourceNotFoundException"
        ),
        "{out}"
    );
    assert!(!leaks(&out), "{out}");
    drop(moto);
}

/// `kafka.sasl.role_arn`: the MSK token is signed by that role's own session (assumed with
/// the base credentials), not by the main role's; without it, by the main role's session.
/// Runs against the shared moto (no IAM enforcement needed: the identity is checked with
/// GetCallerIdentity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_role_arn_signs_with_its_own_role_session() {
    use aws_credential_types::provider::ProvideCredentials;
    use base64::Engine;
    use dynamodb_cdc::kafka::msk_iam;

    if !stack_available() {
        return;
    }
    let ep = aws_endpoint();
    let main_role = create_reader_role(&ep, &unique("cdc_main")).await;
    let kafka_role_name = unique("cdc_msk");
    let kafka_role = create_reader_role(&ep, &kafka_role_name).await;
    let dir = tempfile::tempdir().unwrap();
    let mut doc = config(&[("orders", "orders")], Some(&main_role), dir.path());
    doc["kafka"]["tls"] = json!({});
    doc["kafka"]["sasl"] = json!({
        "mechanism": "AWS_MSK_IAM", "role_arn": kafka_role, "external_id": "kafka-external-id"
    });
    let cfg = dynamodb_cdc::config::Config::parse(&doc.to_string()).expect("config");

    let base = sdk_config(&ep, "test", "test", None).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (background, _watch) = dynamodb_cdc::tasks::Background::new();
    let main = dynamodb_cdc::aws::RoleAssumer::new(cfg.aws.assume_role.clone().unwrap(), &base)
        .start(cancel.clone(), &background)
        .await
        .expect("assume the main role");

    let provider =
        msk_iam::credentials_for_kafka_from(&cfg, Some(&main), &base, &cancel, &background)
            .await
            .expect("assume kafka.sasl.role_arn");
    let kafka = provider.provide_credentials().await.unwrap();
    assert_ne!(kafka.access_key_id(), main.current().access_key_id());
    assert!(kafka.session_token().is_some() && kafka.expiry().is_some());

    // Those keys are a session of the Kafka role, named for CloudTrail.
    let sts = aws_sdk_sts::Client::new(
        &sdk_config(
            &ep,
            kafka.access_key_id(),
            kafka.secret_access_key(),
            kafka.session_token(),
        )
        .await,
    );
    let who = sts
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity");
    let arn = who.arn().unwrap_or_default();
    assert!(
        arn.contains(&format!(
            "assumed-role/{kafka_role_name}/{}",
            msk_iam::SESSION_NAME
        )),
        "{arn}"
    );

    // The token the broker gets is signed with that session.
    let token = msk_iam::oauth_callback(provider, msk_iam::region(&cfg))()
        .await
        .expect("token");
    let url = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap(),
    )
    .unwrap();
    assert!(
        url.contains(&format!("X-Amz-Credential={}%2F", kafka.access_key_id())),
        "{url}"
    );

    // Without kafka.sasl.role_arn the main role's session signs.
    doc["kafka"]["sasl"] = json!({"mechanism": "AWS_MSK_IAM"});
    let cfg = dynamodb_cdc::config::Config::parse(&doc.to_string()).expect("config");
    let provider =
        msk_iam::credentials_for_kafka_from(&cfg, Some(&main), &base, &cancel, &background)
            .await
            .unwrap();
    assert_eq!(
        provider
            .provide_credentials()
            .await
            .unwrap()
            .access_key_id(),
        main.current().access_key_id()
    );
    cancel.cancel();
}

fn integration_as(
    dir: &std::path::Path,
    config: &serde_json::Value,
    args: &[&str],
    key: &str,
    secret: &str,
) -> (i32, serde_json::Value, String) {
    run_integration(dir, config, args, (key, secret, None))
}

/// `integration setup`: creates the role with the trust policy and the inline policy
/// `integration trust-policy` and `policy` print; a second run changes nothing; a policy
/// changed by hand is put back; `--dry-run` changes nothing; without an external ID it
/// refuses (exit 2). Runs against the shared moto: under
/// moto's IAM enforcement the Rust SDK's signed IAM writes fail with SignatureDoesNotMatch
/// (moto re-encodes the form body differently), so the admin here is moto's default user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_the_role_once_and_puts_back_what_was_changed() {
    if !stack_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ep = aws_endpoint();
    let (admin_key, admin_secret) = ("test".to_owned(), "test".to_owned());
    let (base_key, base_secret) = ("test".to_owned(), "test".to_owned());
    let name = unique("setup-reader");
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/cdc/{name}");
    let base_arn = format!("arn:aws:iam::{ACCOUNT}:user/cdc-base");
    let mut cfg = config(&[("orders_setup", "t")], None, &dir.path().join("cp"));
    cfg["aws"]["assume_role"] = json!({"role_arn": role_arn, "external_id": "ext-setup-1"});
    let setup = |extra: &[&str]| {
        let mut args = vec!["setup", "--principal", base_arn.as_str()];
        args.extend_from_slice(extra);
        integration_as(dir.path(), &cfg, &args, &admin_key, &admin_secret)
    };
    let actions = |out: &serde_json::Value| out["roles"][0]["actions"].clone();

    let (code, out, err) = setup(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        actions(&out),
        json!([
            "created with its trust policy",
            "inline policy dynamodb-cdc added"
        ])
    );
    let admin_iam =
        aws_sdk_iam::Client::new(&sdk_config(&ep, &admin_key, &admin_secret, None).await);
    assert!(
        admin_iam.get_role().role_name(&name).send().await.is_err(),
        "--dry-run created the role"
    );

    let (code, out, err) = setup(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        actions(&out),
        json!([
            "created with its trust policy",
            "inline policy dynamodb-cdc added"
        ])
    );
    assert_eq!(out["base_identity"]["principal"], json!(base_arn));
    let role = admin_iam
        .get_role()
        .role_name(&name)
        .send()
        .await
        .expect("the role exists");
    assert_eq!(role.role().unwrap().arn(), role_arn);
    assert_eq!(role.role().unwrap().path(), "/cdc/");
    // The role holds what the other commands print.
    let (_, trust, err) = integration_as(
        dir.path(),
        &cfg,
        &["trust-policy", "--principal", &base_arn],
        &admin_key,
        &admin_secret,
    );
    let (_, policy, _) = integration_as(dir.path(), &cfg, &["policy"], &admin_key, &admin_secret);
    let stored =
        |doc: &str| -> serde_json::Value { serde_json::from_str(&percent_decode(doc)).unwrap() };
    assert_eq!(
        stored(role.role().unwrap().assume_role_policy_document().unwrap()),
        trust["trust_policies"][0]["policy"],
        "{err}"
    );
    let inline = admin_iam
        .get_role_policy()
        .role_name(&name)
        .policy_name("dynamodb-cdc")
        .send()
        .await
        .expect("the inline policy");
    assert_eq!(
        stored(inline.policy_document()),
        policy["policies"][0]["policy"]
    );

    // Twice: nothing to do.
    let (code, out, err) = setup(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(actions(&out), json!(["unchanged"]));

    // Changed by hand: put back.
    admin_iam
        .put_role_policy()
        .role_name(&name)
        .policy_name("dynamodb-cdc")
        .policy_document(
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                "Action": "dynamodb:*", "Resource": "*"}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let (code, out, err) = setup(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(actions(&out), json!(["inline policy dynamodb-cdc updated"]));
    let (_, out, _) = setup(&[]);
    assert_eq!(actions(&out), json!(["unchanged"]));

    // The trust policy requires the external ID (moto without IAM enforcement does not
    // check it on AssumeRole, so the document is what is asserted).
    assert_eq!(
        trust["trust_policies"][0]["policy"]["Statement"][0]["Condition"]["StringEquals"]
            ["sts:ExternalId"],
        "ext-setup-1"
    );
    let sts = aws_sdk_sts::Client::new(&sdk_config(&ep, &base_key, &base_secret, None).await);
    sts.assume_role()
        .role_arn(&role_arn)
        .role_session_name("s")
        .external_id("ext-setup-1")
        .send()
        .await
        .expect("assume with the external ID");

    // No external ID in the config: setup refuses (exit 2) and suggests one.
    let mut without = cfg.clone();
    without["aws"]["assume_role"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");
    let (code, _, err) = integration_as(
        dir.path(),
        &without,
        &["setup", "--principal", &base_arn],
        &admin_key,
        &admin_secret,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("aws.assume_role.external_id"), "{err}");
}

/// IAM's URL encoding of policy documents (moto may or may not apply it).
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// A rule of `tables` under IAM enforcement: the role with exactly what `integration
/// policy` prints for it (ListTables, ListTagsOfResource, the reads) passes `check`, which
/// reports what the rule selects and probes that table; without the ListTables statement,
/// `check` fails naming ListTables and AccessDenied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_needs_list_tables_and_the_generated_policy_grants_it() {
    if !stack_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = start_moto_with_auth(&dir.path().join("moto.log"), SETUP_CALLS) else {
        return;
    };
    let ep = moto.endpoint.clone();
    let iam = aws_sdk_iam::Client::new(&sdk_config(&ep, "test", "test", None).await);
    let role_name = unique("cdc-rules");
    let prefix = unique("rules");
    let table = format!("{prefix}-orders");
    let mut cfg = config(&[], None, &dir.path().join("cp"));
    cfg["aws"]["endpoint_url"] = json!(ep);
    cfg["aws"]["assume_role"] = json!({
        "role_arn": format!("arn:aws:iam::{ACCOUNT}:role/{role_name}"),
        "external_id": "ext-123",
    });
    cfg["tables"] = json!({"include": [format!("{prefix}-*")], "tags": {"cdc": []}});
    let policies = generated_policies(dir.path(), &cfg);
    let (base_key, base_secret) = user(&iam, "cdc-base", policies["base identity"].clone()).await;
    let (admin_key, admin_secret) = user(
        &iam,
        "cdc-admin",
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
    )
    .await;
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/cdc-base")}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": "ext-123"}}}]});
    create_role(&iam, &role_name, &trust, &policies["role"]).await;
    let mut short = policies["role"].clone();
    short["Statement"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["Sid"] != "ListTablesForRules");
    assert_ne!(short, policies["role"], "no ListTablesForRules statement");
    let short_role = format!("{role_name}-short");
    let short_arn = create_role(&iam, &short_role, &trust, &short).await;

    // From here on, IAM is enforced.
    let admin =
        aws_sdk_dynamodb::Client::new(&sdk_config(&ep, &admin_key, &admin_secret, None).await);
    let images = Some(StreamViewType::NewAndOldImages);
    create_table_with(&admin, &table, "pk", None, images, &[("cdc", "on")]).await;

    let (code, out) = run_check_as(dir.path(), &cfg, &base_key, &base_secret);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("OK   dynamodb:ListTables: ")
                && l.contains("1 selected by the rules")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("OK   table {table}: stream "))),
        "{out}"
    );
    let mut short_cfg = cfg.clone();
    short_cfg["aws"]["assume_role"]["role_arn"] = json!(short_arn);
    let (code, out) = run_check_as(dir.path(), &short_cfg, &base_key, &base_secret);
    assert_eq!(code, 1, "{out}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].contains("ListTables") && fails[0].contains("AccessDenied"),
        "{out}"
    );
}
