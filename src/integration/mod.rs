//! `dynamodb-cdc integration ...`: what a self-hosted daemon needs from IAM, printed for
//! exactly its config (the "provider integration" of managed connectors).
//!
//! ```text
//! config ─▶ policy       permission policies: role, first hop, base identity, Kafka role
//!        ─▶ trust-policy who may assume each role (principal + sts:ExternalId)
//!        ─▶ setup        both, put on the roles with the operator's credentials (IAM)
//! ```

pub mod policy;
pub mod setup;
pub mod trust;

use std::path::Path;

use tokio_util::sync::CancellationToken;

use aws_config::SdkConfig;

use crate::aws::{base_config, operator_config, retrying};
use crate::config::Config;
use crate::error::{ConfigError, Error};
use crate::secrets::{self, SecretsManager, Template};

/// How a command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Headings, pretty JSON, notes.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

async fn load(path: &Path) -> Result<(Config, Vec<Template>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    secrets::load_unresolved(&text, &|variable| std::env::var_os(variable)).await
}

/// [`load`] of a config that names a role (`trust-policy` and `setup` are about it).
async fn load_with_role(path: &Path) -> Result<(Config, Vec<Template>), ConfigError> {
    let loaded = load(path).await?;
    if loaded.0.aws.assume_role.is_none() {
        return Err(ConfigError::Invalid {
            key: "aws.assume_role".into(),
            message: "there is no role to trust or set up: add aws.assume_role.role_arn".into(),
        });
    }
    Ok(loaded)
}

/// `integration policy`: no AWS call.
pub async fn policy(
    path: &Path,
    format: Format,
    msk_cluster_arn: Option<&str>,
) -> Result<String, Error> {
    let (config, templates) = load(path).await?;
    let p = policy::policies(&config, &templates, msk_cluster_arn);
    Ok(match format {
        Format::Text => p.to_text(),
        Format::Json => format!("{:#}\n", p.to_json()),
    })
}

/// `integration trust-policy`: the principal is `principal`, or the base credentials'
/// identity (GetCallerIdentity); an external ID held in Secrets Manager is read with the
/// base credentials.
pub async fn trust_policy(
    path: &Path,
    principal: Option<&str>,
    placeholder: bool,
    format: Format,
) -> Result<String, Error> {
    let render = |v: serde_json::Value| match format {
        Format::Text => format!("{}\n", serde_json::to_string_pretty(&v).expect("JSON")),
        Format::Json => format!("{v:#}\n"),
    };
    if placeholder {
        return Ok(render(trust::placeholder()));
    }
    let (config, templates) = load_with_role(path).await?;
    let cancel = CancellationToken::new();
    let base = base_config(&config.aws).await;
    let principal = match principal {
        Some(p) => trust::principal_for(p),
        None => caller(&base, &cancel).await?,
    };
    let external_id = external_id(&config, &templates, &base, &cancel).await?;
    let t = trust::policies(&config, &principal, external_id.as_deref(), || {
        uuid::Uuid::new_v4().to_string()
    })
    .expect("assume_role is set");
    Ok(match format {
        Format::Text => t.to_text(),
        Format::Json => format!("{:#}\n", t.to_json()),
    })
}

/// The trust-policy principal of the credentials in `sdk` (GetCallerIdentity).
async fn caller(sdk: &SdkConfig, cancel: &CancellationToken) -> Result<String, Error> {
    let sts = aws_sdk_sts::Client::new(sdk);
    let me = retrying("GetCallerIdentity", cancel, || {
        sts.get_caller_identity().send()
    })
    .await
    .map_err(|f| Error::AssumeRole {
        role_arn: "(base credentials)".into(),
        message: format!(
            "GetCallerIdentity failed ({}); pass --principal ARN instead",
            f.message
        ),
    })?;
    Ok(trust::principal_for(me.arn().unwrap_or_default()))
}

/// `aws.assume_role.external_id`, read from Secrets Manager (with `sdk`'s credentials) when
/// it is a reference.
async fn external_id(
    config: &Config,
    templates: &[Template],
    sdk: &SdkConfig,
    cancel: &CancellationToken,
) -> Result<Option<String>, Error> {
    Ok(
        match templates
            .iter()
            .find(|t| t.key == "aws.assume_role.external_id")
        {
            Some(t) => Some(secrets::render(t, &SecretsManager::new(sdk, cancel.clone())).await?),
            None => config
                .aws
                .assume_role
                .as_ref()
                .and_then(|r| r.external_id.clone()),
        },
    )
}

/// `integration setup`: with the operator's credentials (`profile`, else the default
/// chain), creates or updates the config's roles so that `principal` (the daemon's base
/// identity) may assume them with the config's external ID and they may do exactly what
/// the config needs. The base identity's own policy is printed, not applied.
pub async fn setup(
    path: &Path,
    principal: &str,
    profile: Option<&str>,
    msk_cluster_arn: Option<&str>,
    dry_run: bool,
    format: Format,
) -> Result<String, Error> {
    let (config, templates) = load_with_role(path).await?;
    let cancel = CancellationToken::new();
    let sdk = operator_config(&config.aws, profile).await;
    let Some(external_id) = external_id(&config, &templates, &sdk, &cancel).await? else {
        return Err(ConfigError::Invalid {
            key: "aws.assume_role.external_id".into(),
            message: format!(
                "setup needs the external ID the role's trust policy will require: add \"external_id\": \"{}\" (a new random one) to aws.assume_role, then run setup again",
                uuid::Uuid::new_v4()
            ),
        }
        .into());
    };
    let principal = trust::principal_for(principal);
    let trust = trust::policies(&config, &principal, Some(&external_id), || unreachable!())
        .expect("assume_role is set");
    let policies = policy::policies(&config, &templates, msk_cluster_arn);
    let iam = aws_sdk_iam::Client::new(&sdk);
    let changes = setup::apply(&iam, &trust, &policies, dry_run).await?;
    let base_policy = policies
        .identities
        .iter()
        .find(|p| p.name == "base identity")
        .map(|p| p.document.clone());
    Ok(match format {
        Format::Json => format!(
            "{:#}\n",
            serde_json::json!({
                "dry_run": dry_run,
                "roles": changes.iter().map(|c| serde_json::json!({
                    "role_arn": c.role_arn, "actions": c.actions,
                })).collect::<Vec<_>>(),
                "base_identity": {"principal": principal, "policy": base_policy},
                "notes": policies.notes,
            })
        ),
        Format::Text => {
            let mut out = String::new();
            for c in &changes {
                out.push_str(&format!(
                    "{}{}: {}\n",
                    if dry_run { "would change " } else { "" },
                    c.role_arn,
                    c.actions.join(", ")
                ));
            }
            if let Some(p) = base_policy {
                out.push_str(&format!(
                    "\n# the base identity {principal} needs this policy (setup does not change it; attach it yourself)\n{}\n",
                    serde_json::to_string_pretty(&p).expect("JSON")
                ));
            }
            for n in &policies.notes {
                out.push_str(&format!("note: {n}\n"));
            }
            out
        }
    })
}
