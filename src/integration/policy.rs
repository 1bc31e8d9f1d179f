//! The IAM policies a config needs, and nothing more: the role's permission policy, the
//! first hop's (role chaining), the base identity's, and (AWS_MSK_IAM with
//! `kafka.sasl.role_arn`) the Kafka role's.

use serde_json::{json, Value};

use crate::config::{Config, OnPoisonRecord, SaslMechanism};
use crate::secrets::{source::arn_region, Reference, Template};

/// One identity's permission policy.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityPolicy {
    /// Who it is for: `role`, `first_hop`, `base identity`, `kafka role`.
    pub name: &'static str,
    /// The identity's ARN when the config names it.
    pub arn: Option<String>,
    /// The IAM policy document.
    pub document: Value,
}

/// Everything `integration policy` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    /// One per identity, the role first.
    pub identities: Vec<IdentityPolicy>,
    /// What the operator must know or narrow by hand.
    pub notes: Vec<String>,
}

impl Policies {
    /// The JSON form (`--format json`).
    pub fn to_json(&self) -> Value {
        json!({
            "policies": self.identities.iter().map(|p| json!({
                "for": p.name, "arn": p.arn, "policy": p.document,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// The text form (`--format text`): a heading per identity, the policy, the notes.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for p in &self.identities {
            match &p.arn {
                Some(arn) => out.push_str(&format!("# {} {arn}\n", p.name)),
                None => out.push_str(&format!("# {}\n", p.name)),
            }
            out.push_str(&serde_json::to_string_pretty(&p.document).expect("JSON"));
            out.push_str("\n\n");
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// The parts of an ARN: `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE`.
fn arn_parts(arn: &str) -> Option<(&str, &str, &str, &str, &str)> {
    let mut f = arn.splitn(6, ':');
    (f.next()? == "arn").then_some(())?;
    Some((f.next()?, f.next()?, f.next()?, f.next()?, f.next()?))
}

fn statement(sid: &str, actions: &[&str], resources: Vec<String>) -> Value {
    json!({"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources})
}

fn document(statements: Vec<Value>) -> Value {
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// The ARN a `secretsmanager:GetSecretValue` statement names for a reference: the ARN as
/// given, or the name with Secrets Manager's six random suffix characters (`-??????`).
fn secret_arn(secret_id: &str, partition: &str, region: &str, account: &str) -> String {
    if secret_id.starts_with("arn:") {
        secret_id.to_owned()
    } else {
        format!("arn:{partition}:secretsmanager:{region}:{account}:secret:{secret_id}-??????")
    }
}

/// `msk_cluster_arn`: `arn:aws:kafka:REGION:ACCOUNT:cluster/NAME/UUID`, which the config
/// cannot know (bootstrap addresses do not carry it); without it the Kafka statements
/// cover every cluster of the account, with a note.
pub fn policies(
    config: &Config,
    templates: &[Template],
    msk_cluster_arn: Option<&str>,
) -> Policies {
    let mut notes = Vec::new();
    let region = config.aws.region.as_str();
    let role = config.aws.assume_role.as_ref();
    let (partition, account) = role
        .and_then(|r| arn_parts(&r.role_arn))
        .map(|(p, _, _, a, _)| (p.to_owned(), a.to_owned()))
        .unwrap_or_else(|| {
            notes.push(
                "no aws.assume_role: the policy is for the base identity itself, and its account is not known (`*` in the ARNs)"
                    .into(),
            );
            ("aws".into(), "*".into())
        });

    // The role: DynamoDB, its Secrets Manager references, MSK unless another role signs.
    let table_arn =
        |name: &str| format!("arn:{partition}:dynamodb:{region}:{account}:table/{name}");
    // Tables named, then the rules' include patterns: a glob is an IAM ARN pattern too (`*`,
    // `?`), a regular expression can only be `*`. Excludes and tags narrow nothing here.
    let rule_names = |scanning: bool| -> Vec<String> {
        let mut names: Vec<String> = config
            .table_rules
            .iter()
            .filter(|r| !scanning || rule_scans(config, r))
            .flat_map(|r| &r.include)
            .map(|p| {
                if p.starts_with(crate::selection::REGEX_PREFIX) {
                    "*".to_owned()
                } else {
                    p.clone()
                }
            })
            .collect();
        if names.iter().any(|n| n == "*") {
            names = vec!["*".into()];
        }
        names.sort();
        names.dedup();
        names
    };
    let tables: Vec<String> = config
        .tables
        .iter()
        .map(|t| t.name.clone())
        .chain(rule_names(false))
        .collect();
    if config
        .table_rules
        .iter()
        .any(|r| !r.exclude.is_empty() || !r.tags.is_empty())
    {
        notes.push("the rules of tables: excludes and tags cannot be written in IAM resources, so the statements cover every table the include patterns name".into());
    }
    let mut statements = vec![
        statement(
            "DescribeTables",
            &["dynamodb:DescribeTable"],
            tables.iter().map(|t| table_arn(t)).collect(),
        ),
        statement(
            "ReadStreams",
            &[
                "dynamodb:DescribeStream",
                "dynamodb:GetShardIterator",
                "dynamodb:GetRecords",
            ],
            tables
                .iter()
                .map(|t| format!("{}/stream/*", table_arn(t)))
                .collect(),
        ),
    ];
    if !config.table_rules.is_empty() {
        // ListTables has no resource of its own.
        statements.push(statement(
            "ListTablesForRules",
            &["dynamodb:ListTables"],
            vec!["*".into()],
        ));
        if config.table_rules.iter().any(|r| !r.tags.is_empty()) {
            statements.push(statement(
                "ReadTagsForRules",
                &["dynamodb:ListTagsOfResource"],
                rule_names(false).iter().map(|t| table_arn(t)).collect(),
            ));
        }
    }
    let scanned: Vec<String> = config
        .tables
        .iter()
        .filter(|t| config.scans(&t.name))
        .map(|t| t.name.clone())
        .chain(rule_names(true))
        .map(|t| table_arn(&t))
        .collect();
    if scanned.is_empty() {
        notes.push(
            "no table has a snapshot sync_mode: no dynamodb:Scan granted (`dynamodb-cdc snapshot --table` needs it on that table)"
                .into(),
        );
    } else {
        statements.push(statement(
            "ScanTablesForSnapshots",
            &["dynamodb:Scan"],
            scanned,
        ));
    }
    let secrets = |before_role: bool| {
        let mut arns: Vec<String> = templates
            .iter()
            .filter(|t| t.key.starts_with("aws.assume_role.") == before_role)
            .flat_map(Template::references)
            .filter_map(|r| match r {
                Reference::SecretsManager { secret_id, .. } => Some(secret_arn(
                    secret_id,
                    &partition,
                    arn_region(secret_id).unwrap_or(region),
                    &account,
                )),
                _ => None,
            })
            .collect();
        arns.sort();
        arns.dedup();
        arns
    };
    let role_secrets = secrets(false);
    let base_secrets = secrets(true);
    if !role_secrets.is_empty() || !base_secrets.is_empty() {
        notes.push("a secret encrypted with a customer-managed KMS key also needs kms:Decrypt on that key (the AWS-managed aws/secretsmanager key needs nothing)".into());
    }
    if !role_secrets.is_empty() {
        statements.push(statement(
            "ReadSecrets",
            &["secretsmanager:GetSecretValue"],
            role_secrets,
        ));
    }
    let mut kafka_role = None;
    if let Some(sasl) = config
        .kafka
        .sasl
        .as_ref()
        .filter(|s| s.mechanism == SaslMechanism::AwsMskIam)
    {
        let kafka_region = sasl.region.as_deref().unwrap_or(region);
        let (cluster, topic_base) = match msk_cluster_arn.and_then(|a| {
            let (_, _, _, _, resource) = arn_parts(a)?;
            let rest = resource.strip_prefix("cluster/")?;
            Some((a.to_owned(), rest.to_owned()))
        }) {
            Some((arn, name_uuid)) => (
                arn,
                format!("arn:{partition}:kafka:{kafka_region}:{account}:topic/{name_uuid}"),
            ),
            None => {
                notes.push("AWS_MSK_IAM: pass --msk-cluster-arn arn:aws:kafka:REGION:ACCOUNT:cluster/NAME/UUID to scope the Kafka statements to one cluster; they now cover every cluster of the account".into());
                (
                    format!("arn:{partition}:kafka:{kafka_region}:{account}:cluster/*/*"),
                    format!("arn:{partition}:kafka:{kafka_region}:{account}:topic/*/*"),
                )
            }
        };
        let mut topics: Vec<String> = config
            .tables
            .iter()
            .map(|t| format!("{topic_base}/{}", config.topic_for(t)))
            .collect();
        // Topics of the tables rules find: their templates with `*` for the table.
        const TABLE: &str = "TABLEXPLACEHOLDER";
        for rule in &config.table_rules {
            let templates = rule
                .overrides
                .iter()
                .filter_map(|o| o.topic.as_deref())
                .chain([config.kafka.topic_template.as_str()]);
            for template in templates {
                if let Ok(topic) = config.topic_name_for(TABLE, template) {
                    topics.push(format!("{topic_base}/{}", topic.replace(TABLE, "*")));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        topics.retain(|t| seen.insert(t.clone()));
        if config.on_poison_record == OnPoisonRecord::DeadLetter {
            topics.push(format!("{topic_base}/{}", config.dead_letter_topic()));
        }
        let mut topic_actions = vec!["kafka-cluster:DescribeTopic", "kafka-cluster:WriteData"];
        if config.kafka.create_topics.is_some() {
            topic_actions.push("kafka-cluster:CreateTopic");
        }
        let kafka = vec![
            statement(
                "ConnectToCluster",
                &["kafka-cluster:Connect"],
                vec![cluster],
            ),
            statement("WriteTopics", &topic_actions, topics),
        ];
        match &sasl.role_arn {
            None => statements.extend(kafka),
            Some(arn) => kafka_role = Some((arn.clone(), kafka)),
        }
    }
    let mut identities = vec![IdentityPolicy {
        name: "role",
        arn: role.map(|r| r.role_arn.clone()),
        document: document(statements),
    }];

    // The chain: the base identity assumes the first hop (or the role), the first hop
    // assumes the role.
    let mut base = Vec::new();
    if let Some(role) = role {
        let first = match &role.first_hop {
            Some(hop) => {
                identities.push(IdentityPolicy {
                    name: "first_hop",
                    arn: Some(hop.role_arn.clone()),
                    document: document(vec![statement(
                        "AssumeTheRole",
                        &["sts:AssumeRole"],
                        vec![role.role_arn.clone()],
                    )]),
                });
                hop.role_arn.clone()
            }
            None => role.role_arn.clone(),
        };
        let mut assumed = vec![first];
        if let Some((arn, _)) = &kafka_role {
            assumed.push(arn.clone());
        }
        base.push(statement("AssumeTheRole", &["sts:AssumeRole"], assumed));
    } else if let Some((arn, _)) = &kafka_role {
        base.push(statement(
            "AssumeTheKafkaRole",
            &["sts:AssumeRole"],
            vec![arn.clone()],
        ));
    }
    if !base_secrets.is_empty() {
        if base_secrets.iter().any(|a| a.ends_with("-??????")) {
            notes.push("a secret named (not by ARN) in aws.assume_role is read in the base identity's own account; the policy assumes that is the role's account: write the secret's ARN in the config if it is not".into());
        }
        base.push(statement(
            "ReadSecretsBeforeTheRole",
            &["secretsmanager:GetSecretValue"],
            base_secrets,
        ));
    }
    if !base.is_empty() {
        identities.push(IdentityPolicy {
            name: "base identity",
            arn: None,
            document: document(base),
        });
    }
    if let Some((arn, kafka)) = kafka_role {
        identities.push(IdentityPolicy {
            name: "kafka role",
            arn: Some(arn),
            document: document(kafka),
        });
    }
    Policies { identities, notes }
}

/// A rule may scan the tables it finds (a snapshot sync mode, its own or an override's, or
/// `on_trimmed_data: resnapshot`).
fn rule_scans(config: &Config, rule: &crate::config::TableRule) -> bool {
    use crate::config::{OnTrimmedData, SyncMode};
    config.sync_mode != SyncMode::Cdc
        || config.on_trimmed_data == OnTrimmedData::Resnapshot
        || rule
            .overrides
            .iter()
            .any(|o| o.sync_mode.is_some_and(|m| m != SyncMode::Cdc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Config, Vec<Template>) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(crate::secrets::load_unresolved(text, &|_| None))
            .unwrap()
    }

    fn golden(name: &str, config: &str, msk_cluster_arn: Option<&str>) {
        let (config, templates) = load(config);
        let got = policies(&config, &templates, msk_cluster_arn).to_text();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/policy")
            .join(format!("{name}.txt"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            got, want,
            "{name}: run with UPDATE_GOLDEN=1 and review the diff"
        );
    }

    const ROLE: &str =
        r#""assume_role": {"role_arn": "arn:aws:iam::123456789012:role/cdc-reader"}"#;

    fn config(aws_extra: &str, kafka_extra: &str, top_extra: &str) -> String {
        format!(
            r#"{{"aws": {{"region": "eu-west-1"{aws_extra}}},
                "tables": [{{"name": "orders"}}, {{"name": "customers", "topic": "cdc.customers"}}],
                "kafka": {{"bootstrap_servers": ["b-1:9098"]{kafka_extra}}},
                "checkpoint": {{"dir": "/var/lib/dynamodb-cdc"}}{top_extra}}}"#
        )
    }

    #[test]
    fn tables_only() {
        golden("tables", &config(&format!(", {ROLE}"), "", ""), None);
    }

    #[test]
    fn secrets_before_and_after_the_role() {
        let aws = r#", "assume_role": {"role_arn": "arn:aws:iam::123456789012:role/cdc-reader",
            "external_id": "${secretsmanager:cdc/external-id}"}"#;
        let kafka = r#", "tls": {}, "sasl": {"mechanism": "PLAIN", "username": "KEY",
            "password": "${secretsmanager:arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/confluent-AbCdEf#api_secret}"}"#;
        golden("secrets", &config(aws, kafka, ""), None);
    }

    #[test]
    fn msk_iam_with_a_cluster_arn_dead_letters_and_created_topics() {
        let kafka = r#", "tls": {}, "sasl": {"mechanism": "AWS_MSK_IAM"},
            "create_topics": {"partitions": 6, "replication_factor": 3}"#;
        golden(
            "msk_iam",
            &config(
                &format!(", {ROLE}"),
                kafka,
                r#", "on_poison_record": "dead_letter""#,
            ),
            Some("arn:aws:kafka:eu-west-1:123456789012:cluster/orders/a1b2c3d4-1"),
        );
    }

    #[test]
    fn msk_iam_with_its_own_role_and_no_cluster_arn() {
        let kafka = r#", "tls": {}, "sasl": {"mechanism": "AWS_MSK_IAM",
            "role_arn": "arn:aws:iam::123456789012:role/cdc-kafka"}"#;
        golden(
            "msk_iam_role",
            &config(&format!(", {ROLE}"), kafka, ""),
            None,
        );
    }

    #[test]
    fn first_hop() {
        let aws = r#", "assume_role": {"role_arn": "arn:aws:iam::210987654321:role/cdc-reader",
            "external_id": "x", "duration_seconds": 3600,
            "first_hop": {"role_arn": "arn:aws:iam::123456789012:role/cdc-hop"}}"#;
        golden("first_hop", &config(aws, "", ""), None);
    }

    #[test]
    fn snapshot_tables_may_scan() {
        golden(
            "snapshot",
            &config(&format!(", {ROLE}"), "", r#", "sync_mode": "snapshot_cdc""#),
            None,
        );
    }

    #[test]
    fn rules_grant_their_globs_list_tables_and_tags() {
        // Globs become ARN patterns, a regex is `*`; tags add ListTagsOfResource; an
        // override with a snapshot mode adds Scan on the rule's patterns; MSK topics follow
        // the templates.
        let text = r#"{"aws": {"region": "eu-west-1",
                "assume_role": {"role_arn": "arn:aws:iam::123456789012:role/cdc-reader"}},
            "tables": [{"name": "orders"},
                {"include": ["app-*", "svc_?"], "exclude": ["*-tmp"], "tags": {"cdc": []},
                 "overrides": [{"match": "app-*", "topic": "apps.{table}", "sync_mode": "snapshot_cdc"}]}],
            "kafka": {"bootstrap_servers": ["b-1:9098"], "tls": {}, "sasl": {"mechanism": "AWS_MSK_IAM"}},
            "checkpoint": {"dir": "/var/lib/dynamodb-cdc"}}"#;
        golden("rules", text, None);
        let regex = text.replace("\"svc_?\"", "\"re:^svc_\"");
        let (config, templates) = load(&regex);
        let got = policies(&config, &templates, None).to_text();
        assert!(
            got.contains("\"arn:aws:dynamodb:eu-west-1:123456789012:table/*\"")
                && !got.contains("table/app-*\""),
            "{got}"
        );
    }

    #[test]
    fn no_role() {
        golden("no_role", &config("", "", ""), None);
    }

    #[test]
    fn snapshots_add_scan_on_their_tables_only() {
        let text = config(&format!(", {ROLE}"), "", "").replace(
            r#"{"name": "customers", "topic""#,
            r#"{"name": "customers", "sync_mode": "snapshot_cdc", "topic""#,
        );
        let (config, templates) = load(&text);
        let p = policies(&config, &templates, None);
        let doc = &p.identities[0].document;
        let scan: Vec<&Value> = doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["Action"].to_string().contains("dynamodb:Scan"))
            .collect();
        assert_eq!(scan.len(), 1, "{doc}");
        assert_eq!(
            scan[0]["Resource"],
            serde_json::json!(["arn:aws:dynamodb:eu-west-1:123456789012:table/customers"])
        );
        assert_eq!(scan[0]["Action"], serde_json::json!(["dynamodb:Scan"]));
    }

    #[test]
    fn the_role_policy_names_each_table_and_its_streams_only() {
        let (config, templates) = load(&config(&format!(", {ROLE}"), "", ""));
        let p = policies(&config, &templates, None);
        let doc = &p.identities[0].document;
        let all: Vec<&str> = doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["Resource"].as_array().unwrap())
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(
            all,
            [
                "arn:aws:dynamodb:eu-west-1:123456789012:table/orders",
                "arn:aws:dynamodb:eu-west-1:123456789012:table/customers",
                "arn:aws:dynamodb:eu-west-1:123456789012:table/orders/stream/*",
                "arn:aws:dynamodb:eu-west-1:123456789012:table/customers/stream/*",
            ]
        );
        assert!(!doc.to_string().contains("\"*\""), "no wildcard resource");
    }
}
