//! `kafka.tls` and `kafka.sasl` turned into a [`Security`]: the TLS client config, and the
//! login with where its credentials come from (the config, Secrets Manager, or the AWS
//! session for AWS_MSK_IAM).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::session::{FixedCredentials, Sasl, SaslCredentials};
use super::{msk_iam, tls, Security};
use crate::aws::AwsClients;
use crate::config::{Config, SaslMechanism};
use crate::error::Error;
use crate::tasks::Background;

/// Builds the security settings of `config`. `credentials` overrides where PLAIN/SCRAM
/// credentials come from (re-resolved secret references); without it they are the
/// config's own. AWS_MSK_IAM needs `aws` (its tokens are signed with that session, or with
/// `kafka.sasl.role_arn`'s, started here and refreshed by `background` until `cancel`).
pub async fn security(
    config: &Config,
    aws: Option<&AwsClients>,
    credentials: Option<Arc<dyn SaslCredentials>>,
    cancel: &CancellationToken,
    background: &Background,
) -> Result<Security, Error> {
    let tls = config
        .kafka
        .tls
        .as_ref()
        .map(tls::client_config)
        .transpose()?;
    let sasl = match &config.kafka.sasl {
        None => None,
        Some(sasl) if sasl.mechanism == SaslMechanism::AwsMskIam => {
            let Some(aws) = aws else {
                return Err(Error::Kafka {
                    topic: String::new(),
                    partition: -1,
                    message:
                        "kafka.sasl: AWS_MSK_IAM needs AWS credentials, which are not available"
                            .into(),
                });
            };
            Some(msk_iam_sasl(config, aws, cancel, background).await?)
        }
        Some(sasl) => {
            if tls.is_none() {
                warn!(
                    mechanism = %sasl.mechanism,
                    "kafka.sasl without kafka.tls: the login travels unencrypted (PLAIN sends the password as is); add \"tls\": {{}} unless this is a test broker"
                );
            }
            let credentials = credentials.unwrap_or_else(|| {
                Arc::new(FixedCredentials {
                    username: sasl.username.clone().unwrap_or_default(),
                    password: sasl
                        .password
                        .clone()
                        .unwrap_or_else(|| crate::config::Secret::new("")),
                })
            });
            Some(Sasl::Password {
                mechanism: sasl.mechanism,
                credentials,
            })
        }
    };
    Ok(Security { tls, sasl })
}

/// AWS_MSK_IAM: OAUTHBEARER with a token presigned at every connection from the current
/// credentials of the signing session ([`msk_iam::credentials_for_kafka`]).
async fn msk_iam_sasl(
    config: &Config,
    aws: &AwsClients,
    cancel: &CancellationToken,
    background: &Background,
) -> Result<Sasl, Error> {
    let credentials = msk_iam::credentials_for_kafka(config, aws, cancel, background).await?;
    Ok(Sasl::OauthBearer(msk_iam::sasl_config(
        credentials,
        msk_iam::region(config),
    )))
}
