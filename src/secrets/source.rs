//! Where `${secretsmanager:...}` values come from: AWS Secrets Manager, behind a trait so
//! that unit tests can use a map.

use std::future::Future;
use std::pin::Pin;

use aws_config::{Region, SdkConfig};
use tokio_util::sync::CancellationToken;

use crate::aws::retrying;
use crate::config::Secret;

/// Why a secret could not be read. Never holds the secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    /// The AWS error code (`ResourceNotFoundException`, `AccessDeniedException`, ...), or a
    /// code of ours (`NoSecretString`, `Cancelled`).
    pub code: String,
    /// What AWS said.
    pub message: String,
}

/// A secret's value being read.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Secret, LookupError>> + Send + 'a>>;

/// Reads a secret's SecretString by name or ARN.
pub trait SecretSource: Send + Sync + std::fmt::Debug {
    /// The SecretString of `secret_id` (current version).
    fn secret_string<'a>(&'a self, secret_id: &'a str) -> LookupFuture<'a>;
}

/// AWS Secrets Manager with one identity: in the ARN's region when the id is an ARN, else
/// the SDK config's. Throttling and 5xx are retried (one retry layer,
/// [`crate::aws::retrying`]) until `cancel` fires.
#[derive(Debug, Clone)]
pub struct SecretsManager {
    sdk: SdkConfig,
    cancel: CancellationToken,
}

impl SecretsManager {
    /// A source calling Secrets Manager with `sdk`'s credentials, region and endpoint.
    pub fn new(sdk: &SdkConfig, cancel: CancellationToken) -> Self {
        Self {
            sdk: sdk.clone(),
            cancel,
        }
    }

    fn client(&self, secret_id: &str) -> aws_sdk_secretsmanager::Client {
        let mut config = aws_sdk_secretsmanager::config::Builder::from(&self.sdk);
        if let Some(region) = arn_region(secret_id) {
            config = config.region(Region::new(region.to_owned()));
        }
        aws_sdk_secretsmanager::Client::from_conf(config.build())
    }
}

/// The region of a Secrets Manager ARN (`arn:PARTITION:secretsmanager:REGION:...`).
pub fn arn_region(secret_id: &str) -> Option<&str> {
    let mut fields = secret_id.split(':');
    (fields.next() == Some("arn"))
        .then(|| {
            fields.next()?;
            (fields.next()? == "secretsmanager").then_some(())?;
            fields.next().filter(|r| !r.is_empty())
        })
        .flatten()
}

impl SecretSource for SecretsManager {
    fn secret_string<'a>(&'a self, secret_id: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            let client = self.client(secret_id);
            let output = retrying("GetSecretValue", &self.cancel, || {
                client.get_secret_value().secret_id(secret_id).send()
            })
            .await
            .map_err(|failure| LookupError {
                code: match (failure.code, failure.kind) {
                    (Some(code), _) => code,
                    (None, None) => "Cancelled".to_owned(),
                    (None, Some(kind)) => format!("{kind:?}"),
                },
                message: failure.message,
            })?;
            match output.secret_string {
                Some(value) => Ok(Secret::new(value)),
                None => Err(LookupError {
                    code: "NoSecretString".into(),
                    message: "the secret holds SecretBinary only; store the value as a string"
                        .into(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_of_an_arn() {
        assert_eq!(
            arn_region("arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/kafka-AbCdEf"),
            Some("eu-west-1")
        );
        assert_eq!(
            arn_region("arn:aws-cn:secretsmanager:cn-north-1:1:secret:x"),
            Some("cn-north-1")
        );
        assert_eq!(arn_region("prod/kafka"), None);
        assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
        assert_eq!(arn_region("arn:aws:secretsmanager::1:secret:x"), None);
    }
}
