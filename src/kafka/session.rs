//! The connection to the cluster: TLS, SASL, and a new login after a rejection.
//!
//! rskafka keeps the SASL settings of a client for its whole life, reconnecting with them
//! whenever a broker closes a connection (it does not re-authenticate in place, KIP-368: a
//! broker with `connections.max.reauth.ms` closes the connection when the session ends,
//! which is a transient, retried failure). When a broker refuses the login, the password
//! may have been rotated: [`Session::renew`] reads the credentials again (re-resolving
//! their `${secretsmanager:...}` references) and builds a new client. Users of the old one
//! (partition producers, topic lookups) see the generation change and move over.
//!
//! ```text
//! produce ──auth refused──▶ renew(generation) ──▶ SaslCredentials::current() (secrets again)
//!    ▲                                               │
//!    └──── retry with the new client ◀── build ◀─────┘   (one renewal per generation)
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::BackoffConfig;
use tracing::{error, info};

use crate::config::{SaslMechanism, Secret};
use crate::error::Error;

/// A user name and password being read (from the config, or Secrets Manager).
pub type CredentialsFuture = Pin<Box<dyn Future<Output = Result<(String, Secret), Error>> + Send>>;

/// Where PLAIN and SCRAM credentials come from: read at the first connection and again
/// after every rejected login.
pub trait SaslCredentials: Send + Sync + fmt::Debug {
    /// The user name and password to log in with now.
    fn current(&self) -> CredentialsFuture;
}

/// Credentials written in the config (or resolved once): nothing to re-read.
#[derive(Debug, Clone)]
pub struct FixedCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: Secret,
}

impl SaslCredentials for FixedCredentials {
    fn current(&self) -> CredentialsFuture {
        let c = self.clone();
        Box::pin(async move { Ok((c.username, c.password)) })
    }
}

/// How the daemon logs in to the brokers.
#[derive(Clone)]
pub enum Sasl {
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with a user name and password.
    Password {
        /// Which of the three.
        mechanism: SaslMechanism,
        /// Where the credentials come from.
        credentials: Arc<dyn SaslCredentials>,
    },
    /// OAUTHBEARER (AWS_MSK_IAM): a token made by a callback at every connection.
    OauthBearer(SaslConfig),
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Password { mechanism, .. } => write!(f, "Sasl::Password({mechanism})"),
            Self::OauthBearer(_) => f.write_str("Sasl::OauthBearer"),
        }
    }
}

impl Sasl {
    /// The mechanism's name as the config writes it.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Self::Password { mechanism, .. } => mechanism.as_str(),
            Self::OauthBearer(_) => SaslMechanism::AwsMskIam.as_str(),
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The brokers refused the SASL login (or the credentials could not be read).
    Auth,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
    /// Anything else: unreachable, timed out, metadata.
    Other,
}

/// A failed connection attempt, with what to fix. Never holds a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    /// The class of failure.
    pub kind: ConnectFailure,
    /// What happened, naming the config keys involved.
    pub message: String,
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        Error::Kafka {
            topic: String::new(),
            partition: -1,
            message: e.message,
        }
    }
}

/// Whether `err` says the brokers refused our login.
pub fn is_auth_failure(err: &KafkaError) -> bool {
    if let KafkaError::ServerError { protocol_error, .. } = err {
        return matches!(
            protocol_error,
            ProtocolError::SaslAuthenticationFailed
                | ProtocolError::IllegalSaslState
                | ProtocolError::UnsupportedSaslMechanism
        );
    }
    // A refused login during a (re)connection is wrapped in connection errors, as text.
    let text = err.to_string();
    text.contains("Sasl") || text.contains("SASL") || text.contains("SaslAuthenticationFailed")
}

/// Whether `err` is a failed TLS handshake.
fn is_tls_failure(err: &KafkaError) -> bool {
    let text = err.to_string();
    [
        "certificate",
        "TLS",
        "tls",
        "handshake",
        "CertificateRequired",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// The cluster connection: settings, and the current client with its generation.
pub struct Session {
    bootstrap_servers: Vec<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<Sasl>,
    timeout: Duration,
    current: RwLock<(u64, Arc<Client>)>,
    renewing: tokio::sync::Mutex<()>,
    probing: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl)
            .field("generation", &self.client().0)
            .finish()
    }
}

impl Session {
    /// One connection attempt, bounded by `timeout`.
    pub async fn connect(
        bootstrap_servers: Vec<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        sasl: Option<Sasl>,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        let client = build(&bootstrap_servers, &tls, &sasl, timeout).await?;
        Ok(Self {
            bootstrap_servers,
            tls,
            sasl,
            timeout,
            current: RwLock::new((0, Arc::new(client))),
            renewing: tokio::sync::Mutex::new(()),
            probing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The current client and its generation.
    pub fn client(&self) -> (u64, Arc<Client>) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// After the brokers refused the login of client `generation`: reads the credentials
    /// again and builds a new client (once per generation: concurrent callers wait for the
    /// first). An ERROR line names `kafka.sasl`, the mechanism and the brokers.
    pub async fn renew(&self, generation: u64) -> Result<(), ConnectError> {
        let _one = self.renewing.lock().await;
        if self.client().0 != generation {
            return Ok(());
        }
        let mechanism = self.sasl.as_ref().map_or("none", Sasl::mechanism);
        error!(
            mechanism,
            bootstrap_servers = ?self.bootstrap_servers,
            "kafka.sasl: the brokers refused the login; reading the credentials again and reconnecting"
        );
        let client = build(&self.bootstrap_servers, &self.tls, &self.sasl, self.timeout).await?;
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = (generation + 1, Arc::new(client));
        info!(mechanism, "kafka.sasl: logged in again");
        Ok(())
    }
}

impl Session {
    /// After client `generation` stopped answering: rskafka reconnects inside a produce call
    /// and retries a refused login there without telling, so a new client is built in the
    /// background with the credentials read again. When it logs in, it replaces the stuck
    /// one; when the login is refused, an ERROR line says so (naming `kafka.sasl`). One probe
    /// at a time; it ends within its connection limit.
    pub fn probe(self: &Arc<Self>, generation: u64) {
        use std::sync::atomic::Ordering;
        if self.sasl.is_none() || self.client().0 != generation {
            return;
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let session = self.clone();
        // Bounded by `build`'s own limit, so it cannot outlive the process's shutdown by long.
        tokio::spawn(async move {
            let _one = session.renewing.lock().await;
            if session.client().0 == generation {
                match build(
                    &session.bootstrap_servers,
                    &session.tls,
                    &session.sasl,
                    session.timeout,
                )
                .await
                {
                    Ok(client) => {
                        let mut guard = session.current.write().unwrap_or_else(|p| p.into_inner());
                        *guard = (generation + 1, Arc::new(client));
                        info!("kafka: connected anew after the brokers stopped answering");
                    }
                    Err(e) if e.kind == ConnectFailure::Auth => error!(
                        mechanism = session.sasl.as_ref().map_or("none", Sasl::mechanism),
                        bootstrap_servers = ?session.bootstrap_servers,
                        error = %e,
                        "kafka.sasl: the brokers refused the login; reading the credentials again and reconnecting"
                    ),
                    Err(_) => {}
                }
            }
            session.probing.store(false, Ordering::Release);
        });
    }
}

/// rskafka's own retries give up after `deadline`, so that our loop sees the error and logs it.
pub(super) fn backoff_config(deadline: Duration) -> BackoffConfig {
    BackoffConfig {
        init_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        base: 2.0,
        deadline: Some(deadline),
    }
}

async fn build(
    bootstrap_servers: &[String],
    tls: &Option<Arc<rustls::ClientConfig>>,
    sasl: &Option<Sasl>,
    timeout: Duration,
) -> Result<Client, ConnectError> {
    let brokers = bootstrap_servers.join(",");
    let mut builder = ClientBuilder::new(bootstrap_servers.to_vec())
        .client_id("dynamodb-cdc")
        .backoff_config(backoff_config(timeout));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.clone());
    }
    let mechanism = sasl.as_ref().map(Sasl::mechanism);
    match sasl {
        None => {}
        Some(Sasl::OauthBearer(config)) => builder = builder.sasl_config(config.clone()),
        Some(Sasl::Password {
            mechanism,
            credentials,
        }) => {
            let (username, password) = credentials.current().await.map_err(|e| ConnectError {
                kind: ConnectFailure::Auth,
                message: format!("kafka.sasl: cannot read the {mechanism} credentials: {e}"),
            })?;
            let c = Credentials::new(username, password.expose().to_owned());
            builder = builder.sasl_config(match mechanism {
                SaslMechanism::Plain => SaslConfig::Plain(c),
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(c),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(c),
                SaslMechanism::AwsMskIam => unreachable!("AWS_MSK_IAM is Sasl::OauthBearer"),
            });
        }
    }
    // rskafka gives up after `timeout` of retries and reports the last error (a refused
    // login, a certificate); its last backoff may overshoot, so the hard limit is later.
    let limit = timeout * 2 + Duration::from_secs(5);
    let e = match tokio::time::timeout(limit, builder.build()).await {
        Ok(Ok(client)) => return Ok(client),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(ConnectError {
                kind: ConnectFailure::Other,
                message: format!(
                    "connect to {brokers}: no answer within {} ms",
                    limit.as_millis()
                ),
            })
        }
    };
    Err(if mechanism.is_some() && is_auth_failure(&e) {
        ConnectError {
            kind: ConnectFailure::Auth,
            message: format!(
                "kafka.sasl: {} login refused by {brokers}: {e}; check kafka.sasl.username and kafka.sasl.password",
                mechanism.unwrap_or_default()
            ),
        }
    } else if tls.is_some() && is_tls_failure(&e) {
        ConnectError {
            kind: ConnectFailure::Tls,
            message: format!(
                "kafka.tls: TLS with {brokers} failed: {e}; check kafka.tls.ca_file, kafka.tls.server_name and the client certificate"
            ),
        }
    } else {
        ConnectError {
            kind: ConnectFailure::Other,
            message: format!("connect to {brokers}: {e}"),
        }
    })
}
