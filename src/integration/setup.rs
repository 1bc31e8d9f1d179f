//! `integration setup`: creates or updates the config's roles with the operator's own
//! credentials: each role's trust policy, and its permission policy as the inline policy
//! `dynamodb-cdc`. Changes nothing else; running it twice changes nothing the second time.

use aws_sdk_iam::error::ProvideErrorMetadata;
use serde_json::Value;

use super::policy::Policies;
use super::trust::Trust;
use crate::error::Error;

/// The inline policy's name on every role it manages.
pub const POLICY_NAME: &str = "dynamodb-cdc";

/// What setup did (or, with `--dry-run`, would do) to one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The role's ARN.
    pub role_arn: String,
    /// `created`, `trust policy updated`, `policy dynamodb-cdc updated`, `unchanged`, ...
    pub actions: Vec<&'static str>,
}

/// A role ARN's path and name: `arn:aws:iam::A:role/path/to/name` -> (`/path/to/`, `name`).
pub fn role_path_and_name(arn: &str) -> Option<(String, String)> {
    let resource = arn.splitn(6, ':').nth(5)?;
    let rest = resource.strip_prefix("role/")?;
    let (path, name) = match rest.rsplit_once('/') {
        Some((path, name)) => (format!("/{path}/"), name),
        None => ("/".to_owned(), rest),
    };
    (!name.is_empty()).then(|| (path, name.to_owned()))
}

/// IAM answers with URL-encoded policy documents.
fn decode(document: &str) -> Option<Value> {
    let text = percent_encoding::percent_decode_str(document)
        .decode_utf8()
        .ok()?;
    serde_json::from_str(&text).ok()
}

fn iam_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    role_arn: &str,
    what: &str,
    e: &aws_sdk_iam::error::SdkError<E>,
) -> Error {
    Error::AssumeRole {
        role_arn: role_arn.to_owned(),
        message: format!("iam:{what} failed: {}", crate::error::aws_message(e)),
    }
}

/// Brings every role of `trust` to its trust policy and its `policies` entry (by the same
/// name: `role`, `first_hop`, `kafka role`). With `dry_run`, only says what it would do.
pub async fn apply(
    iam: &aws_sdk_iam::Client,
    trust: &Trust,
    policies: &Policies,
    dry_run: bool,
) -> Result<Vec<Change>, Error> {
    let mut changes = Vec::new();
    for role in &trust.roles {
        let arn = role.role_arn.as_str();
        let Some((path, name)) = role_path_and_name(arn) else {
            return Err(Error::AssumeRole {
                role_arn: arn.to_owned(),
                message: "not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)".into(),
            });
        };
        let permissions = policies
            .identities
            .iter()
            .find(|p| p.name == role.name)
            .map(|p| &p.document);
        let mut actions = Vec::new();
        let existing = match iam.get_role().role_name(&name).send().await {
            Ok(out) => Some(out),
            Err(e) if e.code() == Some("NoSuchEntity") => None,
            Err(e) => return Err(iam_error(arn, "GetRole", &e)),
        };
        match existing {
            None => {
                actions.push("created with its trust policy");
                if !dry_run {
                    iam.create_role()
                        .role_name(&name)
                        .path(&path)
                        .description("Made by dynamodb-cdc integration setup")
                        .assume_role_policy_document(role.document.to_string())
                        .send()
                        .await
                        .map_err(|e| iam_error(arn, "CreateRole", &e))?;
                }
            }
            Some(out) => {
                let current = out
                    .role()
                    .and_then(|r| r.assume_role_policy_document())
                    .and_then(decode);
                if current.as_ref() != Some(&role.document) {
                    actions.push("trust policy updated");
                    if !dry_run {
                        iam.update_assume_role_policy()
                            .role_name(&name)
                            .policy_document(role.document.to_string())
                            .send()
                            .await
                            .map_err(|e| iam_error(arn, "UpdateAssumeRolePolicy", &e))?;
                    }
                }
            }
        }
        if let Some(document) = permissions {
            let current = match iam
                .get_role_policy()
                .role_name(&name)
                .policy_name(POLICY_NAME)
                .send()
                .await
            {
                Ok(out) => decode(out.policy_document()),
                Err(e) if e.code() == Some("NoSuchEntity") => None,
                // A role that does not exist yet (dry run) has no policy.
                Err(_) if dry_run && actions.contains(&"created with its trust policy") => None,
                Err(e) => return Err(iam_error(arn, "GetRolePolicy", &e)),
            };
            if current.as_ref() != Some(document) {
                actions.push(if current.is_none() {
                    "inline policy dynamodb-cdc added"
                } else {
                    "inline policy dynamodb-cdc updated"
                });
                if !dry_run {
                    iam.put_role_policy()
                        .role_name(&name)
                        .policy_name(POLICY_NAME)
                        .policy_document(document.to_string())
                        .send()
                        .await
                        .map_err(|e| iam_error(arn, "PutRolePolicy", &e))?;
                }
            }
        }
        if actions.is_empty() {
            actions.push("unchanged");
        }
        changes.push(Change {
            role_arn: arn.to_owned(),
            actions,
        });
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_and_paths() {
        assert_eq!(
            role_path_and_name("arn:aws:iam::1:role/cdc"),
            Some(("/".into(), "cdc".into()))
        );
        assert_eq!(
            role_path_and_name("arn:aws:iam::1:role/team/cdc/reader"),
            Some(("/team/cdc/".into(), "reader".into()))
        );
        assert_eq!(role_path_and_name("arn:aws:iam::1:user/cdc"), None);
        assert_eq!(role_path_and_name("cdc"), None);
    }

    #[test]
    fn iam_documents_are_url_decoded() {
        assert_eq!(
            decode("%7B%22Version%22%3A%222012-10-17%22%7D"),
            Some(serde_json::json!({"Version": "2012-10-17"}))
        );
        assert_eq!(
            decode(r#"{"Version":"2012-10-17"}"#),
            Some(serde_json::json!({"Version": "2012-10-17"}))
        );
    }
}
