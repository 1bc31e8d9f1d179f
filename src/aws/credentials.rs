//! Assumed-role credentials with a background refresher.
//!
//! ```text
//! base chain (env, profile, instance role)
//!    └─ AssumeRole first_hop (optional)        ─┐ redone on every refresh
//!         └─ AssumeRole role_arn + external_id ─┘
//!              └─ RoleCredentials (shared, read by every AWS client on each request)
//! ```
//!
//! The SDK's own identity cache refreshes only seconds before expiry, on the next request.
//! A daemon must never stall readers on a refresh, so [`RoleCredentials`] owns a task that
//! assumes the role again `refresh_before_expiry_seconds` before the current session
//! expires. When STS fails, the still-valid session keeps being used and the refresh is
//! retried with backoff. Keys never reach a log line: only the key id's last 4 characters
//! and the expiry are logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{
    error::CredentialsError, future, ProvideCredentials, SharedCredentialsProvider,
};
use aws_credential_types::Credentials;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AssumeRoleConfig;
use crate::error::{aws_message, classify_aws, AwsErrorKind, Error};
use crate::retry::Backoff;
use crate::tasks::Background;

/// Longest pause between two refresh attempts while STS fails.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Credentials of the assumed role, kept fresh by a background task.
#[derive(Clone)]
pub struct RoleCredentials {
    shared: Arc<Shared>,
}

struct Shared {
    current: RwLock<Credentials>,
    assume_role_calls: AtomicU64,
    refreshes: AtomicU64,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("RoleCredentials")
            .field("access_key_id", &redact(current.access_key_id()))
            .field("expiry", &current.expiry())
            .finish_non_exhaustive()
    }
}

/// Shows only the last four characters of a key id.
fn redact(key_id: &str) -> String {
    let tail: String = key_id
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("****{tail}")
}

impl RoleCredentials {
    /// The credentials in use now.
    pub fn current(&self) -> Credentials {
        self.shared
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// AssumeRole calls made so far (two per refresh when chained).
    pub fn assume_role_calls(&self) -> u64 {
        self.shared.assume_role_calls.load(Ordering::Relaxed)
    }

    /// Completed background refreshes.
    pub fn refreshes(&self) -> u64 {
        self.shared.refreshes.load(Ordering::Relaxed)
    }
}

impl ProvideCredentials for RoleCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let current = self.current();
        let expired = current.expiry().is_some_and(|e| e <= SystemTime::now());
        future::ProvideCredentials::ready(if expired {
            Err(CredentialsError::provider_error(
                "the assumed-role session expired and STS has not answered a refresh yet",
            ))
        } else {
            Ok(current)
        })
    }
}

/// Assumes the configured role (through the first hop when set).
#[derive(Debug, Clone)]
pub struct RoleAssumer {
    config: AssumeRoleConfig,
    sts_base: SdkConfig,
}

impl RoleAssumer {
    /// `base` carries the base credentials, region and endpoint; the STS endpoint override
    /// applies on top.
    pub fn new(config: AssumeRoleConfig, base: &SdkConfig) -> Self {
        let mut builder = base.to_builder();
        if let Some(url) = &config.sts_endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Self {
            config,
            sts_base: builder.build(),
        }
    }

    /// The target role.
    pub fn role_arn(&self) -> &str {
        &self.config.role_arn
    }

    /// One full assume: first hop (if any), then the target role.
    pub async fn assume(&self, calls: &AtomicU64) -> Result<Credentials, Error> {
        let mut sts_config = aws_sdk_sts::config::Builder::from(&self.sts_base);
        if let Some(hop) = &self.config.first_hop {
            let sts = aws_sdk_sts::Client::from_conf(sts_config.clone().build());
            calls.fetch_add(1, Ordering::Relaxed);
            let first = assume_one(
                &sts,
                &hop.role_arn,
                &hop.session_name,
                hop.external_id.as_deref(),
                self.config.duration_seconds,
            )
            .await?;
            sts_config = sts_config.credentials_provider(SharedCredentialsProvider::new(first));
        }
        let sts = aws_sdk_sts::Client::from_conf(sts_config.build());
        calls.fetch_add(1, Ordering::Relaxed);
        assume_one(
            &sts,
            &self.config.role_arn,
            &self.config.session_name,
            self.config.external_id.as_deref(),
            self.config.duration_seconds,
        )
        .await
    }

    /// Assumes the role once and starts the background refresher (owned by `background`),
    /// which stops when `cancel` fires.
    pub async fn start(
        self,
        cancel: CancellationToken,
        background: &Background,
    ) -> Result<RoleCredentials, Error> {
        let calls = AtomicU64::new(0);
        let first = self.assume(&calls).await?;
        log_session(&self.config.role_arn, &first, "assumed role");
        let creds = RoleCredentials {
            shared: Arc::new(Shared {
                current: RwLock::new(first),
                assume_role_calls: calls,
                refreshes: AtomicU64::new(0),
            }),
        };
        let refresher = creds.clone();
        background.spawn("credential refresher".into(), async move {
            self.refresh_loop(refresher, cancel).await
        });
        Ok(creds)
    }

    async fn refresh_loop(self, creds: RoleCredentials, cancel: CancellationToken) {
        let margin = Duration::from_secs(self.config.refresh_before_expiry_seconds.into());
        let mut backoff = Backoff::new(Duration::from_millis(500), MAX_RETRY_DELAY);
        let mut wait = refresh_delay(&creds.current(), margin);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.assume(&creds.shared.assume_role_calls).await {
                Ok(fresh) => {
                    log_session(&self.config.role_arn, &fresh, "refreshed role session");
                    wait = refresh_delay(&fresh, margin);
                    *creds
                        .shared
                        .current
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = fresh;
                    creds.shared.refreshes.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                }
                Err(e) => {
                    let current = creds.current();
                    let left = current
                        .expiry()
                        .and_then(|x| x.duration_since(SystemTime::now()).ok())
                        .unwrap_or_default();
                    // Retry at least twice more before the session runs out.
                    wait = backoff
                        .next_delay()
                        .unwrap_or(MAX_RETRY_DELAY)
                        .min((left / 2).max(Duration::from_secs(1)));
                    if left.is_zero() {
                        error!(
                            role_arn = %self.config.role_arn,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "role session expired and refresh failed; AWS calls fail until STS answers"
                        );
                    } else {
                        warn!(
                            role_arn = %self.config.role_arn,
                            error = %e,
                            session_left_s = left.as_secs(),
                            retry_in_ms = wait.as_millis() as u64,
                            "role session refresh failed; still using the current session"
                        );
                    }
                }
            }
        }
    }
}

fn log_session(role_arn: &str, creds: &Credentials, what: &str) {
    let expires_at = creds
        .expiry()
        .map(|e| chrono::DateTime::<chrono::Utc>::from(e).to_rfc3339())
        .unwrap_or_else(|| "never".into());
    info!(
        role_arn,
        access_key_id = %redact(creds.access_key_id()),
        expires_at,
        "{what}"
    );
}

/// How long to wait before refreshing `creds`: until `margin` before expiry, at least 1 s.
fn refresh_delay(creds: &Credentials, margin: Duration) -> Duration {
    let Some(expiry) = creds.expiry() else {
        return Duration::from_secs(3600);
    };
    expiry
        .checked_sub(margin)
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

async fn assume_one(
    sts: &aws_sdk_sts::Client,
    role_arn: &str,
    session_name: &str,
    external_id: Option<&str>,
    duration_seconds: u32,
) -> Result<Credentials, Error> {
    let fail = |message: String| Error::AssumeRole {
        role_arn: role_arn.to_owned(),
        message,
    };
    let started = std::time::Instant::now();
    let out = sts
        .assume_role()
        .role_arn(role_arn)
        .role_session_name(session_name)
        .set_external_id(external_id.map(str::to_owned))
        .duration_seconds(duration_seconds as i32)
        .send()
        .await;
    crate::telemetry::get().aws_request(
        "AssumeRole",
        started.elapsed(),
        out.as_ref().err().map(classify_aws),
    );
    let out = out.map_err(|e| {
        let hint = match classify_aws(&e) {
            AwsErrorKind::Fatal => {
                " (check the role's trust policy, the external ID and the base credentials)"
            }
            _ => "",
        };
        fail(format!("{}{hint}", aws_message(&e)))
    })?;
    let c = out
        .credentials()
        .ok_or_else(|| fail("STS returned no credentials".into()))?;
    let expiry = SystemTime::try_from(*c.expiration())
        .map_err(|e| fail(format!("STS returned an invalid expiration: {e}")))?;
    Ok(Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_owned()),
        Some(expiry),
        "dynamodb-cdc-assume-role",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_scheduled_margin_before_expiry() {
        let c = Credentials::new(
            "AKIA",
            "secret",
            None,
            Some(SystemTime::now() + Duration::from_secs(3600)),
            "t",
        );
        let d = refresh_delay(&c, Duration::from_secs(300));
        assert!(
            d <= Duration::from_secs(3300) && d > Duration::from_secs(3290),
            "{d:?}"
        );
        // Already inside the margin: refresh soon, but never in a hot loop.
        assert_eq!(
            refresh_delay(&c, Duration::from_secs(4000)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn debug_output_hides_the_keys() {
        let creds = RoleCredentials {
            shared: Arc::new(Shared {
                current: RwLock::new(Credentials::new(
                    "ASIAEXAMPLEKEYID1234",
                    "very-secret-key",
                    Some("session-token-value".into()),
                    None,
                    "t",
                )),
                assume_role_calls: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
            }),
        };
        let text = format!("{creds:?}");
        assert!(!text.contains("very-secret-key"), "{text}");
        assert!(!text.contains("session-token-value"), "{text}");
        assert!(!text.contains("ASIAEXAMPLEKEYID"), "{text}");
        assert!(text.contains("1234"), "{text}");
    }

    #[tokio::test]
    async fn expired_session_is_an_error_not_stale_keys() {
        let creds = RoleCredentials {
            shared: Arc::new(Shared {
                current: RwLock::new(Credentials::new(
                    "A",
                    "S",
                    None,
                    Some(SystemTime::now() - Duration::from_secs(1)),
                    "t",
                )),
                assume_role_calls: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
            }),
        };
        assert!(creds.provide_credentials().await.is_err());
    }
}
