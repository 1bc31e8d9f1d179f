//! TLS to the brokers: the rustls client config that `kafka.tls` describes.
//!
//! - roots: the system's certificates (`rustls-native-certs`) plus `ca_file`;
//! - `cert_file` + `key_file`: the client certificate for mutual TLS;
//! - `server_name`: the name every broker's certificate must carry instead of the host
//!   connected to (a certificate is always verified: there is no way to turn that off).
//!
//! The crypto provider is chosen explicitly (ring, the one rskafka's tokio-rustls uses):
//! the AWS SDK links aws-lc-rs as well, and with two providers linked
//! `ClientConfig::builder()` cannot pick one and panics.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::KafkaTlsConfig;
use crate::error::ConfigError;

/// The one crypto provider of the daemon's TLS.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client config of `kafka.tls`. Every failure names the key to fix.
pub fn client_config(tls: &KafkaTlsConfig) -> Result<Arc<ClientConfig>, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: key.to_owned(),
        message,
    };
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (system, _) = roots.add_parsable_certificates(native.certs);
    if let Some(ca_file) = &tls.ca_file {
        let certs = read_certs(ca_file).map_err(|m| invalid("kafka.tls.ca_file", m))?;
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(invalid(
                "kafka.tls.ca_file",
                format!(
                    "{}: no usable CA certificate ({ignored} could not be parsed)",
                    ca_file.display()
                ),
            ));
        }
    } else if system == 0 {
        return Err(invalid(
            "kafka.tls",
            "this machine has no system root certificates (install ca-certificates) and \
             kafka.tls.ca_file is not set"
                .into(),
        ));
    }
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("kafka.tls", format!("TLS set-up: {e}")))?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| invalid("kafka.tls", format!("TLS set-up: {e}")))?;
    let builder = match &tls.server_name {
        None => builder.with_webpki_verifier(webpki),
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                invalid(
                    "kafka.tls.server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                )
            })?;
            // Verification stays on; only the name checked is the configured one.
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedName {
                    inner: webpki,
                    name,
                }))
        }
    };
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = read_certs(cert_file).map_err(|m| invalid("kafka.tls.cert_file", m))?;
            if chain.is_empty() {
                return Err(invalid(
                    "kafka.tls.cert_file",
                    format!("{}: no certificate in the file", cert_file.display()),
                ));
            }
            let key = read_key(key_file).map_err(|m| invalid("kafka.tls.key_file", m))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                invalid(
                    "kafka.tls.key_file",
                    format!("does not fit kafka.tls.cert_file: {e}"),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // The error says what is wrong with the file, never its content.
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        format!(
            "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

/// Verifies as WebPKI does, against `name` instead of the host connected to.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What `check` prints of a broker's certificate: its subject and when it expires.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The subject's distinguished name.
    pub subject: String,
    /// The end of its validity (RFC 3339).
    pub not_after: String,
    /// Days from now to `not_after` (negative once expired).
    pub days_left: i64,
}

/// A TLS handshake with `broker` (`host:port`) as the daemon would make it, reporting the
/// broker's certificate. For `check`.
pub async fn handshake(
    config: Arc<ClientConfig>,
    broker: &str,
    timeout: std::time::Duration,
) -> Result<PeerCertificate, String> {
    let (host, _) = broker
        .rsplit_once(':')
        .ok_or_else(|| format!("{broker:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a DNS name or IP address"))?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(broker)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| "TLS handshake: the broker sent no certificate".to_owned())?;
        describe(cert)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
}

fn describe(cert: &CertificateDer<'_>) -> Result<PeerCertificate, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot parse the broker's certificate: {e}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    let now = chrono::Utc::now().timestamp();
    Ok(PeerCertificate {
        subject: parsed.subject().to_string(),
        not_after: chrono::DateTime::from_timestamp(not_after, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        days_left: (not_after - now).div_euclid(86_400),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> (tempfile::TempDir, rcgen::CertifiedKey<rcgen::KeyPair>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ca.signing_key.serialize_pem()).unwrap();
        (dir, ca)
    }

    #[test]
    fn builds_plain_mutual_and_named_configs_without_panicking() {
        let (dir, _) = pki();
        let ca_file = Some(dir.path().join("ca.pem"));
        for tls in [
            KafkaTlsConfig {
                ca_file: ca_file.clone(),
                ..Default::default()
            },
            KafkaTlsConfig {
                ca_file: ca_file.clone(),
                cert_file: Some(dir.path().join("ca.pem")),
                key_file: Some(dir.path().join("key.pem")),
                server_name: Some("broker.internal".into()),
            },
        ] {
            client_config(&tls).unwrap();
        }
    }

    #[test]
    fn unreadable_or_wrong_files_name_their_key_and_never_the_content() {
        let (dir, _) = pki();
        let missing = KafkaTlsConfig {
            ca_file: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let e = client_config(&missing).unwrap_err().to_string();
        assert!(e.starts_with("config key kafka.tls.ca_file:"), "{e}");
        assert!(e.contains("nope.pem"), "{e}");

        // A key file given as the certificate: no certificate; the key's bytes never shown.
        let swapped = KafkaTlsConfig {
            ca_file: Some(dir.path().join("ca.pem")),
            cert_file: Some(dir.path().join("key.pem")),
            key_file: Some(dir.path().join("ca.pem")),
            server_name: None,
        };
        let e = client_config(&swapped).unwrap_err().to_string();
        assert!(e.starts_with("config key kafka.tls.cert_file:"), "{e}");
        let key = std::fs::read_to_string(dir.path().join("key.pem")).unwrap();
        let body = key.lines().nth(1).unwrap();
        assert!(!e.contains(body), "{e}");
    }

    #[test]
    fn the_certificate_summary_has_subject_and_expiry() {
        let (_, ca) = pki();
        let p = describe(ca.cert.der()).unwrap();
        assert!(p.subject.contains("rcgen"), "{}", p.subject);
        assert!(p.days_left > 365, "{p:?}");
        assert!(p.not_after.len() >= 20, "{p:?}");
    }
}
