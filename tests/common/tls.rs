//! TLS for tests: a throw-away PKI ([`TestPki`]: a CA, a server certificate for
//! `localhost` and 127.0.0.1, a client certificate, and an unrelated second CA, all as PEM
//! files in a temporary directory) and a TLS terminator ([`TlsTerminator`]) that accepts
//! TLS on a local port and pipes the plain bytes to an upstream address, such as a tansu
//! broker (tansu 0.6 parses `--cert`/`--key` but serves plain TCP).
//!
//! Every rustls config is built with the ring provider explicitly: the AWS SDK links
//! aws-lc-rs too, and with two providers linked `ServerConfig::builder()` panics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

/// The name the server certificate is issued for (besides the IP address 127.0.0.1).
pub const SERVER_NAME: &str = "localhost";
/// The server certificate's subject common name.
pub const SERVER_CN: &str = "dynamodb-cdc test broker";
/// The server certificate's expiry (`not_after`), as year, month, day (00:00:00 UTC).
pub const SERVER_NOT_AFTER: (i32, u8, u8) = (2099, 12, 31);

/// The ring crypto provider (see the module docs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA, certificates signed by it, and an unrelated CA, written as PEM files into a
/// temporary directory that lives as long as this value.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    server_cert_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl TestPki {
    /// Generates the PKI (ECDSA P-256 keys; a few milliseconds).
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir for the test PKI");

        let (ca_pem, ca_der, ca) = new_ca("dynamodb-cdc test CA");
        let (other_ca_pem, _, other_ca) = new_ca("unrelated test CA");

        let mut server = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".into()])
            .expect("server certificate names");
        server
            .distinguished_name
            .push(DnType::CommonName, SERVER_CN);
        server.not_after =
            rcgen::date_time_ymd(SERVER_NOT_AFTER.0, SERVER_NOT_AFTER.1, SERVER_NOT_AFTER.2);
        server.use_authority_key_identifier_extension = true;
        server.key_usages.push(KeyUsagePurpose::DigitalSignature);
        server
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server.signed_by(&server_key, &ca).expect("server cert");

        let client = client_params("dynamodb-cdc test client");
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client.signed_by(&client_key, &ca).expect("client cert");

        let other = client_params("client of the unrelated CA");
        let other_key = KeyPair::generate().expect("other client key");
        let other_cert = other.signed_by(&other_key, &other_ca).expect("other cert");

        let files = [
            ("ca.pem", ca_pem),
            ("server.pem", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client_cert.pem()),
            ("client.key", client_key.serialize_pem()),
            ("other-ca.pem", other_ca_pem),
            ("other-client.pem", other_cert.pem()),
            ("other-client.key", other_key.serialize_pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem).expect("write PEM file");
        }
        TestPki {
            dir,
            ca_der,
            server_cert_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
        }
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// A CA that signed neither (a client trusting only it must refuse the server).
    pub fn other_ca_file(&self) -> PathBuf {
        self.file("other-ca.pem")
    }

    /// The server's certificate (for [`SERVER_NAME`] and 127.0.0.1).
    pub fn server_cert_file(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The server's private key (PKCS#8 PEM).
    pub fn server_key_file(&self) -> PathBuf {
        self.file("server.key")
    }

    /// A client certificate signed by [`TestPki::ca_file`]'s CA.
    pub fn client_cert_file(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// The key of [`TestPki::client_cert_file`] (PKCS#8 PEM).
    pub fn client_key_file(&self) -> PathBuf {
        self.file("client.key")
    }

    /// A client certificate signed by the unrelated CA (refused by mutual TLS).
    pub fn other_client_cert_file(&self) -> PathBuf {
        self.file("other-client.pem")
    }

    /// The key of [`TestPki::other_client_cert_file`].
    pub fn other_client_key_file(&self) -> PathBuf {
        self.file("other-client.key")
    }

    fn server_config(&self, require_client_cert: bool) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).expect("CA certificate");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(
                vec![self.server_cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone())),
            )
            .expect("server certificate and key")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn new_ca(name: &str) -> (String, CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), cert.der().clone(), Issuer::new(params, key))
}

fn client_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    params
}

/// A rustls client config trusting the CAs in the PEM files `roots`, presenting the
/// certificate chain and key in `identity` (cert file, key file) when given: what a test
/// hands to `rskafka::client::ClientBuilder::tls_config`.
pub fn client_config(
    roots: &[&Path],
    identity: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for file in roots {
        for cert in CertificateDer::pem_file_iter(file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
        {
            store.add(cert.expect("PEM certificate")).expect("CA");
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(store);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap_or_else(|e| panic!("read {}: {e}", cert.display()))
                .collect::<Result<Vec<_>, _>>()
                .expect("PEM certificates");
            let key = PrivateKeyDer::from_pem_file(key)
                .unwrap_or_else(|e| panic!("read {}: {e}", key.display()));
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate and key")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Accepts TLS on 127.0.0.1:[`TlsTerminator::port`] and pipes each connection's plain bytes
/// to and from `upstream` (one task per connection). Stops listening and closes every
/// connection when dropped. Needs a tokio runtime (call it inside a `#[tokio::test]`).
#[derive(Debug)]
pub struct TlsTerminator {
    addr: SocketAddr,
    stop: CancellationToken,
    failures: Arc<Mutex<Vec<String>>>,
}

impl TlsTerminator {
    /// Listens on a free port. With `require_client_cert`, a client that presents no
    /// certificate signed by the PKI's CA is refused during the handshake.
    pub fn start(pki: &TestPki, upstream: SocketAddr, require_client_cert: bool) -> TlsTerminator {
        TlsTerminator::start_on(pki, 0, upstream, require_client_cert)
    }

    /// [`TlsTerminator::start`] on `port` (0: a free one).
    pub fn start_on(
        pki: &TestPki,
        port: u16,
        upstream: SocketAddr,
        require_client_cert: bool,
    ) -> TlsTerminator {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("TLS terminator: bind 127.0.0.1:{port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(require_client_cert)));
        let stop = CancellationToken::new();
        let failures = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            upstream,
            stop.clone(),
            failures.clone(),
        ));
        TlsTerminator {
            addr,
            stop,
            failures,
        }
    }

    /// Where clients connect (TLS).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The handshakes refused so far (the TLS error of each, e.g. a missing client
    /// certificate), and upstream connections that failed.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: SocketAddr,
    stop: CancellationToken,
    failures: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let (socket, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    failures.lock().unwrap().push(format!("accept: {e}"));
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve(socket, acceptor, upstream, peer, failures) => {}
            }
        });
    }
}

async fn serve(
    socket: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: SocketAddr,
    peer: SocketAddr,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let mut tls = match acceptor.accept(socket).await {
        Ok(tls) => tls,
        Err(e) => {
            failures
                .lock()
                .unwrap()
                .push(format!("TLS handshake with {peer}: {e}"));
            return;
        }
    };
    let mut plain = match tokio::net::TcpStream::connect(upstream).await {
        Ok(plain) => plain,
        Err(e) => {
            failures
                .lock()
                .unwrap()
                .push(format!("connect to upstream {upstream} for {peer}: {e}"));
            return;
        }
    };
    // Ends when either side closes or fails; the other side is then dropped (closed).
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
}
