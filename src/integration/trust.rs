//! Trust policies: who may assume the daemon's roles, guarded by the external ID.

use serde_json::{json, Value};

use crate::config::Config;

/// One role's trust policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleTrust {
    /// `role`, `first_hop` or `kafka role`.
    pub name: &'static str,
    /// The role the policy is for.
    pub role_arn: String,
    /// The trust policy document.
    pub document: Value,
}

/// Everything `integration trust-policy` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Trust {
    /// The roles' trust policies, the first one assumed first.
    pub roles: Vec<RoleTrust>,
    /// An external ID made up because the config has none for `aws.assume_role`: the
    /// policy uses it, and the config must get it.
    pub generated_external_id: Option<String>,
    /// What the operator must know.
    pub notes: Vec<String>,
}

impl Trust {
    /// The JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "trust_policies": self.roles.iter().map(|r| json!({
                "for": r.name, "role_arn": r.role_arn, "policy": r.document,
            })).collect::<Vec<_>>(),
            "generated_external_id": self.generated_external_id,
            "notes": self.notes,
        })
    }

    /// The text form: a heading per role, the policy, then the notes.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for r in &self.roles {
            out.push_str(&format!(
                "# trust policy of the {} {}\n",
                r.name, r.role_arn
            ));
            out.push_str(&serde_json::to_string_pretty(&r.document).expect("JSON"));
            out.push_str("\n\n");
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// The principal a trust policy must name for `caller` (what GetCallerIdentity returns):
/// an assumed-role session `arn:aws:sts::A:assumed-role/R/S` becomes the role
/// `arn:aws:iam::A:role/R`; users and roles stay as they are.
pub fn principal_for(caller: &str) -> String {
    let parts: Vec<&str> = caller.splitn(6, ':').collect();
    if let [arn, partition, "sts", "", account, resource] = parts[..] {
        if let Some(rest) = resource.strip_prefix("assumed-role/") {
            let role = rest.split('/').next().unwrap_or(rest);
            return format!("{arn}:{partition}:iam::{account}:role/{role}");
        }
        // moto answers GetCallerIdentity for a user with an sts ARN; IAM names users in iam.
        if resource.starts_with("user/") {
            return format!("{arn}:{partition}:iam::{account}:{resource}");
        }
    }
    caller.to_owned()
}

fn trust(principal: &str, external_id: Option<&str>) -> Value {
    let mut statement = json!({
        "Effect": "Allow",
        "Principal": {"AWS": principal},
        "Action": "sts:AssumeRole",
    });
    if let Some(id) = external_id {
        statement["Condition"] = json!({"StringEquals": {"sts:ExternalId": id}});
    }
    json!({"Version": "2012-10-17", "Statement": [statement]})
}

/// The deny-all trust policy to create a role with before its principal is known (the
/// role exists, nobody may assume it; `trust-policy` later prints the real one).
pub fn placeholder() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "sts:AssumeRole",
    }]})
}

/// The trust policies of the config's roles for `principal` (the base identity, as
/// [`principal_for`] gives it). `external_id` is `aws.assume_role.external_id` as resolved
/// (`None`: the config has none, and `new_external_id` makes one).
pub fn policies(
    config: &Config,
    principal: &str,
    external_id: Option<&str>,
    new_external_id: impl FnOnce() -> String,
) -> Option<Trust> {
    let role = config.aws.assume_role.as_ref()?;
    let mut notes = Vec::new();
    let mut generated = None;
    let external_id = match external_id {
        Some(id) => id.to_owned(),
        None => {
            let id = new_external_id();
            notes.push(format!(
                "the config has no aws.assume_role.external_id: this one was generated; add it to the config: \"external_id\": \"{id}\" (or keep it in Secrets Manager and write \"external_id\": \"${{secretsmanager:NAME}}\")"
            ));
            generated = Some(id);
            generated.clone().expect("just set")
        }
    };
    let mut roles = Vec::new();
    match &role.first_hop {
        Some(hop) => {
            roles.push(RoleTrust {
                name: "first_hop",
                role_arn: hop.role_arn.clone(),
                document: trust(principal, hop.external_id.as_deref()),
            });
            if hop.external_id.is_none() {
                notes.push("aws.assume_role.first_hop has no external_id: its trust policy names the principal only".into());
            }
            roles.push(RoleTrust {
                name: "role",
                role_arn: role.role_arn.clone(),
                document: trust(&hop.role_arn, Some(&external_id)),
            });
        }
        None => roles.push(RoleTrust {
            name: "role",
            role_arn: role.role_arn.clone(),
            document: trust(principal, Some(&external_id)),
        }),
    }
    if let Some(sasl) = &config.kafka.sasl {
        if let Some(arn) = &sasl.role_arn {
            roles.push(RoleTrust {
                name: "kafka role",
                role_arn: arn.clone(),
                document: trust(principal, sasl.external_id.as_ref().map(|s| s.expose())),
            });
        }
    }
    if principal.contains(":role/") {
        notes.push("the principal is a role: a role with a path (role/path/name) must be named with its path, which an assumed-role session ARN does not show; pass --principal to be exact".into());
    }
    Some(Trust {
        roles,
        generated_external_id: generated,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assumed_role_sessions_become_their_role() {
        assert_eq!(
            principal_for("arn:aws:sts::123456789012:assumed-role/ops-admin/alice@example.com"),
            "arn:aws:iam::123456789012:role/ops-admin"
        );
        assert_eq!(
            principal_for("arn:aws-cn:sts::123456789012:assumed-role/r/s"),
            "arn:aws-cn:iam::123456789012:role/r"
        );
        assert_eq!(
            principal_for("arn:aws:sts::123456789012:user/moto"),
            "arn:aws:iam::123456789012:user/moto"
        );
        for same in [
            "arn:aws:iam::123456789012:user/cdc-base",
            "arn:aws:iam::123456789012:role/cdc-host",
            "arn:aws:iam::123456789012:root",
        ] {
            assert_eq!(principal_for(same), same);
        }
    }

    fn config(assume_role: &str) -> Config {
        Config::parse(&format!(
            r#"{{"aws": {{"region": "eu-west-1", "assume_role": {assume_role}}},
                "tables": [{{"name": "orders"}}],
                "kafka": {{"bootstrap_servers": ["b:9092"]}},
                "checkpoint": {{"dir": "/tmp/x"}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_role_trusts_the_principal_with_the_external_id() {
        let c = config(r#"{"role_arn": "arn:aws:iam::1:role/cdc", "external_id": "e-1"}"#);
        let t = policies(
            &c,
            "arn:aws:iam::2:user/base",
            Some("e-1"),
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(t.generated_external_id, None);
        assert_eq!(
            t.roles,
            [RoleTrust {
                name: "role",
                role_arn: "arn:aws:iam::1:role/cdc".into(),
                document: json!({"Version": "2012-10-17", "Statement": [{
                    "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::2:user/base"},
                    "Action": "sts:AssumeRole",
                    "Condition": {"StringEquals": {"sts:ExternalId": "e-1"}}}]}),
            }]
        );
    }

    #[test]
    fn a_missing_external_id_is_generated_and_the_note_says_where_it_goes() {
        let c = config(r#"{"role_arn": "arn:aws:iam::1:role/cdc"}"#);
        let t = policies(&c, "arn:aws:iam::2:user/base", None, || "gen-1".into()).unwrap();
        assert_eq!(t.generated_external_id.as_deref(), Some("gen-1"));
        assert_eq!(
            t.roles[0].document["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"],
            "gen-1"
        );
        assert!(
            t.notes[0].contains("\"external_id\": \"gen-1\""),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn a_chain_trusts_the_base_then_the_first_hop() {
        let c = config(
            r#"{"role_arn": "arn:aws:iam::1:role/cdc", "external_id": "e-1", "duration_seconds": 3600,
                "first_hop": {"role_arn": "arn:aws:iam::3:role/hop", "external_id": "e-hop"}}"#,
        );
        let t = policies(
            &c,
            "arn:aws:iam::2:user/base",
            Some("e-1"),
            || unreachable!(),
        )
        .unwrap();
        let names: Vec<_> = t
            .roles
            .iter()
            .map(|r| (r.name, r.role_arn.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("first_hop", "arn:aws:iam::3:role/hop"),
                ("role", "arn:aws:iam::1:role/cdc")
            ]
        );
        let principal = |i: usize| t.roles[i].document["Statement"][0]["Principal"]["AWS"].clone();
        assert_eq!(principal(0), "arn:aws:iam::2:user/base");
        assert_eq!(principal(1), "arn:aws:iam::3:role/hop");
        let external = |i: usize| {
            t.roles[i].document["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"]
                .clone()
        };
        assert_eq!(external(0), "e-hop");
        assert_eq!(external(1), "e-1");
    }

    #[test]
    fn the_placeholder_denies_everyone() {
        let p = placeholder();
        assert_eq!(p["Statement"][0]["Effect"], "Deny");
        assert_eq!(p["Statement"][0]["Principal"]["AWS"], "*");
    }
}
