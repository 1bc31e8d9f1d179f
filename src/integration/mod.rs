//! `dynamodb-cdc integration ...`: what a self-hosted daemon needs from IAM, printed for
//! exactly its config (the "provider integration" of managed connectors).
//!
//! ```text
//! config ─▶ policy       permission policies: role, first hop, base identity, Kafka role
//!        ─▶ trust-policy who may assume each role (principal + sts:ExternalId)
//! ```

pub mod policy;
pub mod trust;

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::aws::{base_config, retrying};
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
    let (config, templates) = load(path).await?;
    if config.aws.assume_role.is_none() {
        return Err(ConfigError::Invalid {
            key: "aws.assume_role".into(),
            message: "there is no role to trust: add aws.assume_role.role_arn".into(),
        }
        .into());
    }
    let cancel = CancellationToken::new();
    let base = base_config(&config.aws).await;
    let principal = match principal {
        Some(p) => trust::principal_for(p),
        None => {
            let sts = aws_sdk_sts::Client::new(&base);
            let me = retrying("GetCallerIdentity", &cancel, || {
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
            trust::principal_for(me.arn().unwrap_or_default())
        }
    };
    let external_id = match templates
        .iter()
        .find(|t| t.key == "aws.assume_role.external_id")
    {
        Some(t) => Some(secrets::render(t, &SecretsManager::new(&base, cancel.clone())).await?),
        None => config
            .aws
            .assume_role
            .as_ref()
            .and_then(|r| r.external_id.clone()),
    };
    let t = trust::policies(&config, &principal, external_id.as_deref(), || {
        uuid::Uuid::new_v4().to_string()
    })
    .expect("assume_role is set");
    Ok(match format {
        Format::Text => t.to_text(),
        Format::Json => format!("{:#}\n", t.to_json()),
    })
}
