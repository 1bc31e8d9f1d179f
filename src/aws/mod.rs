//! AWS clients: one function builds the shared SDK config (region, endpoint override,
//! timeouts, credentials), and [`retrying`] is the one retry loop every AWS call goes
//! through.
//!
//! The SDK's own retries are turned off so that backoff, throttling and logging are decided
//! in one place ([`crate::retry`], [`crate::error::classify_aws`]).

pub mod credentials;

use std::future::Future;
use std::time::Duration;

use aws_config::identity::IdentityCache;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::AwsConfig;
use crate::error::{aws_message, classify_aws, AwsErrorKind, Error};
use crate::retry::{retry, Failure, GaveUp, Retrying};
use crate::tasks::Background;

pub use credentials::{RoleAssumer, RoleCredentials};

/// The AWS side of the daemon: clients that share one identity.
#[derive(Debug, Clone)]
pub struct AwsClients {
    /// DescribeTable.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// DescribeStream, GetShardIterator, GetRecords.
    pub streams: aws_sdk_dynamodbstreams::Client,
    /// The assumed-role session, when `aws.assume_role` is set.
    pub role: Option<RoleCredentials>,
    /// The SDK config those clients share (its credentials are the role session's), for
    /// further clients under the same identity (Secrets Manager).
    pub sdk: SdkConfig,
}

/// The base SDK config: region, endpoint override, timeouts and the default credential
/// chain. No AWS call is made.
pub async fn base_config(aws: &AwsConfig) -> SdkConfig {
    operator_config(aws, None).await
}

/// [`base_config`] with the credentials of a named profile (`integration setup
/// --profile`), or the default chain when `profile` is `None`.
pub async fn operator_config(aws: &AwsConfig, profile: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(aws.region.clone()))
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_millis(aws.request_timeout_ms))
                .build(),
        );
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

/// Builds the clients: assumes the role (when configured) and starts its background
/// refresher (owned by `background`), which stops when `cancel` fires.
pub async fn connect(
    aws: &AwsConfig,
    cancel: &CancellationToken,
    background: &Background,
) -> Result<AwsClients, Error> {
    let base = base_config(aws).await;
    let (sdk, role) = match &aws.assume_role {
        None => (base, None),
        Some(role_config) => {
            let assumer = RoleAssumer::new(role_config.clone(), &base);
            let role = assumer.start(cancel.clone(), background).await?;
            let sdk = base
                .to_builder()
                .credentials_provider(SharedCredentialsProvider::new(role.clone()))
                // The refresher owns the session; the SDK must not cache it on its own.
                .identity_cache(IdentityCache::no_cache())
                .build();
            (sdk, Some(role))
        }
    };
    Ok(AwsClients {
        dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
        streams: aws_sdk_dynamodbstreams::Client::new(&sdk),
        role,
        sdk,
    })
}

/// An AWS call that failed for good, or was cancelled (`kind` is `None`).
#[derive(Debug, Clone)]
pub struct AwsFailure {
    /// How the error was classified; `None` when shutdown stopped the retries.
    pub kind: Option<AwsErrorKind>,
    /// The AWS error code, when the service answered with one (`AccessDeniedException`).
    pub code: Option<String>,
    /// The AWS error chain.
    pub message: String,
}

/// Runs `call` until it succeeds, retrying throttling and transient failures with jittered
/// backoff (throttling backs off longer, [`crate::retry::retry`]) and a warning per attempt.
/// Returns the first error retrying cannot fix, or a cancelled failure when `cancel` fires.
pub async fn retrying<T, E, R, F, Fut>(
    name: &'static str,
    cancel: &CancellationToken,
    mut call: F,
) -> Result<T, AwsFailure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + crate::error::HttpStatus,
{
    let attempt = || {
        let fut = call();
        async move {
            let started = std::time::Instant::now();
            let result = fut.await;
            crate::telemetry::get().aws_request(
                name,
                started.elapsed(),
                result.as_ref().err().map(|e| classify_aws(e)),
            );
            result.map_err(|err| {
                let failure = AwsFailure {
                    kind: Some(classify_aws(&err)),
                    code: err.code().map(str::to_owned),
                    message: aws_message(&err),
                };
                match failure.kind {
                    Some(AwsErrorKind::Throttled) => Failure::Throttled(failure),
                    Some(AwsErrorKind::Transient) => Failure::Transient(failure),
                    _ => Failure::Fatal(failure),
                }
            })
        }
    };
    let log = |f: &AwsFailure, r: Retrying| {
        warn!(
            call = name,
            attempt = r.attempt,
            kind = ?f.kind.unwrap_or(AwsErrorKind::Transient),
            retry_in_ms = r.delay.as_millis() as u64,
            error = %f.message,
            "AWS call failed; retrying"
        );
    };
    retry(cancel, attempt, log).await.map_err(|g| match g {
        GaveUp::Fatal(f) => f,
        GaveUp::Cancelled(_) => AwsFailure {
            kind: None,
            code: None,
            message: "cancelled".into(),
        },
    })
}
