//! `dynamodb-cdc integration policy` and `trust-policy` against the shared moto: the
//! principal found with GetCallerIdentity (a user, and an assumed-role session turned into
//! its role), generated external IDs, an external ID read from Secrets Manager.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

fn integration(
    dir: &Path,
    config: &Value,
    args: &[&str],
    credentials: (&str, &str, Option<&str>),
) -> (i32, Value, String) {
    run_integration(dir, config, args, credentials)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_policy_names_the_caller_and_generates_or_reads_the_external_id() {
    if !stack_available() {
        return skip("needs the local stack");
    }
    let dir = tempfile::tempdir().unwrap();
    let role_arn = create_reader_role(&aws_endpoint(), &unique("cdc-trust")).await;
    let mut cfg = config(
        &[("orders_trust", "t")],
        Some(&role_arn),
        &dir.path().join("cp"),
    );
    cfg["aws"]["assume_role"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");

    // A user principal; no external ID in the config: a new UUID each time, in the policy.
    let mut generated = Vec::new();
    for _ in 0..2 {
        let (code, out, err) =
            integration(dir.path(), &cfg, &["trust-policy"], ("test", "test", None));
        assert_eq!(code, 0, "{err}");
        let policy = &out["trust_policies"][0];
        assert_eq!(policy["role_arn"], json!(role_arn));
        let statement = &policy["policy"]["Statement"][0];
        assert_eq!(statement["Action"], "sts:AssumeRole");
        let principal = statement["Principal"]["AWS"].as_str().unwrap();
        assert!(
            principal.starts_with(&format!("arn:aws:iam::{ACCOUNT}:user/")),
            "{principal}"
        );
        let id = out["generated_external_id"].as_str().unwrap().to_owned();
        assert!(is_uuid(&id), "{id}");
        assert_eq!(
            statement["Condition"]["StringEquals"]["sts:ExternalId"],
            json!(id)
        );
        assert!(out["notes"][0].as_str().unwrap().contains(&id));
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1]);

    // An assumed-role caller: the trust policy names the role, not the session.
    let sts = aws_sdk_sts::Client::new(&sdk_config(&aws_endpoint(), "test", "test", None).await);
    let admin_role = create_reader_role(&aws_endpoint(), &unique("ops-admin")).await;
    let session = sts
        .assume_role()
        .role_arn(&admin_role)
        .role_session_name("alice")
        .send()
        .await
        .expect("assume the admin role");
    let c = session.credentials().unwrap();
    let (code, out, err) = integration(
        dir.path(),
        &cfg,
        &["trust-policy"],
        (
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token()),
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out["trust_policies"][0]["policy"]["Statement"][0]["Principal"]["AWS"],
        json!(admin_role)
    );

    // The external ID in Secrets Manager (read with the base credentials) and --principal.
    let sm = aws_sdk_secretsmanager::Client::new(
        &sdk_config(&aws_endpoint(), "test", "test", None).await,
    );
    let secret = unique("cdc/external-id");
    sm.create_secret()
        .name(&secret)
        .secret_string("ext-in-a-secret")
        .send()
        .await
        .expect("create secret");
    cfg["aws"]["assume_role"]["external_id"] = json!(format!("${{secretsmanager:{secret}}}"));
    let (code, out, err) = integration(
        dir.path(),
        &cfg,
        &[
            "trust-policy",
            "--principal",
            "arn:aws:sts::111122223333:assumed-role/host-role/i-0abc",
        ],
        ("test", "test", None),
    );
    assert_eq!(code, 0, "{err}");
    let statement = &out["trust_policies"][0]["policy"]["Statement"][0];
    assert_eq!(
        statement["Principal"]["AWS"],
        "arn:aws:iam::111122223333:role/host-role"
    );
    assert_eq!(
        statement["Condition"]["StringEquals"]["sts:ExternalId"],
        "ext-in-a-secret"
    );
    assert_eq!(out["generated_external_id"], Value::Null);

    // The placeholder.
    let (code, out, err) = integration(
        dir.path(),
        &cfg,
        &["trust-policy", "--placeholder"],
        ("test", "test", None),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["Statement"][0]["Effect"], "Deny");
}

#[test]
fn policy_needs_no_aws_and_a_bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &[("orders", "t")],
        Some("arn:aws:iam::123456789012:role/cdc-reader"),
        &dir.path().join("cp"),
    );
    // Credentials that would fail any AWS call, and an endpoint nobody listens on.
    let mut offline = cfg.clone();
    offline["aws"]["endpoint_url"] = json!("http://127.0.0.1:9");
    let (code, out, err) = integration(dir.path(), &offline, &["policy"], ("x", "y", None));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out["policies"][0]["policy"]["Statement"][0]["Resource"][0],
        "arn:aws:dynamodb:us-east-1:123456789012:table/orders"
    );
    let mut bad = cfg;
    bad["kafka"]["nope"] = json!(1);
    let (code, _, err) = integration(dir.path(), &bad, &["policy"], ("x", "y", None));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope"), "{err}");
}
