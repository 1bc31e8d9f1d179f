//! A tansu broker of a test's own that checks SCRAM logins ([`ScramBroker`]), optionally
//! behind a [`TlsTerminator`] (TLS, or mutual TLS).
//!
//! tansu 0.6 checks SCRAM only with its sqlite storage (`--features libsql`), and takes
//! new users only from an unauthenticated client (`tansu user create`). So the broker is
//! started without `--authentication`, the users and topics are created, and it is
//! restarted on the same database and ports with `--authentication`; tansu's own justfile
//! does the same. It does not check PLAIN and rejects OAUTHBEARER.
//!
//! The sqlite database and the broker's log live in a temporary directory of the broker's
//! own; the log is printed when a test panics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rskafka::client::{ClientBuilder, Credentials, SaslConfig};

use super::tls::{TestPki, TlsTerminator};

/// How long the broker may take to answer, and a CLI command to finish.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A SCRAM mechanism tansu stores credentials for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    /// The value of `tansu user create --mechanism`.
    fn cli(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "scram256",
            Mechanism::ScramSha512 => "scram512",
        }
    }

    /// The SASL mechanism name (`kafka.sasl.mechanism` in the daemon's config).
    pub fn sasl_name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// rskafka's SASL config for this mechanism.
    pub fn sasl_config(self, user: &str, password: &str) -> SaslConfig {
        let credentials = Credentials::new(user.to_owned(), password.to_owned());
        match self {
            Mechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
            Mechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
        }
    }
}

/// A tansu broker (sqlite storage) that requires SCRAM logins, on ports of its own; killed
/// when dropped.
#[derive(Debug)]
pub struct ScramBroker {
    bin: PathBuf,
    dir: tempfile::TempDir,
    cluster: String,
    plain_port: u16,
    tls: Option<TlsTerminator>,
    authenticate: bool,
    child: Option<Child>,
    log: PathBuf,
}

impl ScramBroker {
    /// Starts a broker that knows `users` (name, password, mechanism) and holds `topics`
    /// (name, partitions), behind TLS (the terminator, with the PKI's server certificate)
    /// when `tls` is given. None when tansu is missing and the test is skipped (see
    /// [`super::tansu_bin_or_skip`]; under `CI` that panics instead).
    pub async fn start(
        users: &[(&str, &str, Mechanism)],
        tls: Option<&TestPki>,
        topics: &[(&str, i32)],
    ) -> Option<ScramBroker> {
        ScramBroker::start_with(users, tls.map(|pki| (pki, false)), topics).await
    }

    /// [`ScramBroker::start`] with the TLS terminator's `require_client_cert` (mutual TLS).
    /// With no `users`, the broker does not authenticate at all (a TLS-only broker).
    pub async fn start_with(
        users: &[(&str, &str, Mechanism)],
        tls: Option<(&TestPki, bool)>,
        topics: &[(&str, i32)],
    ) -> Option<ScramBroker> {
        let bin = super::tansu_bin_or_skip()?;
        let dir = tempfile::tempdir().expect("tempdir for the broker");
        let plain_port = free_port();
        let plain: SocketAddr = ([127, 0, 0, 1], plain_port).into();
        let tls = tls.map(|(pki, mutual)| TlsTerminator::start(pki, plain, mutual));
        let mut broker = ScramBroker {
            bin,
            cluster: super::unique("scram"),
            log: dir.path().join("tansu.log"),
            dir,
            plain_port,
            tls,
            authenticate: false,
            child: None,
        };
        broker.spawn(false).await;
        for (user, password, mechanism) in users {
            broker.create_user(user, password, *mechanism).await;
        }
        for (topic, partitions) in topics {
            broker
                .cli(&[
                    "topic",
                    "create",
                    topic,
                    "--partitions",
                    &partitions.to_string(),
                ])
                .await;
        }
        if !users.is_empty() {
            broker.stop().await;
            broker.spawn(true).await;
            for (user, password, mechanism) in users {
                broker.check_login(user, password, *mechanism).await;
            }
        }
        Some(broker)
    }

    /// Changes `user`'s password (or adds the user): stops the broker, restarts it without
    /// authentication, stores the new credentials, and restarts it with authentication on
    /// the same ports and database. Clients see the broker go away and come back.
    pub async fn set_password(&mut self, user: &str, new_password: &str, mechanism: Mechanism) {
        assert!(self.authenticate, "set_password on a broker without users");
        self.stop().await;
        self.spawn(false).await;
        self.create_user(user, new_password, mechanism).await;
        self.stop().await;
        self.spawn(true).await;
        self.check_login(user, new_password, mechanism).await;
    }

    /// The address clients bootstrap from: the TLS port when there is TLS, else the plain one.
    pub fn bootstrap(&self) -> String {
        match &self.tls {
            Some(tls) => tls.addr().to_string(),
            None => self.plain_addr(),
        }
    }

    /// The broker's own plaintext listener (with TLS, the terminator's upstream).
    pub fn plain_addr(&self) -> String {
        format!("127.0.0.1:{}", self.plain_port)
    }

    /// The TLS terminator in front of the broker, if any.
    pub fn tls(&self) -> Option<&TlsTerminator> {
        self.tls.as_ref()
    }

    /// The broker's directory (sqlite database, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the broker logged so far (all its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts tansu on the sqlite database in `dir` and waits until it answers ApiVersions.
    async fn spawn(&mut self, authenticate: bool) {
        assert!(self.child.is_none(), "broker already running");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log");
        writeln!(
            file,
            "=== dynamodb-cdc tests: starting tansu, authentication {authenticate}"
        )
        .unwrap();
        let listener = format!("tcp://{}", self.plain_addr());
        let advertised = format!("tcp://{}", self.bootstrap());
        let mut cmd = Command::new(&self.bin);
        cmd.args(["broker", "--cluster-id", &self.cluster])
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &advertised])
            // A URL relative to the working directory: tansu joins even an absolute path to it.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if authenticate {
            cmd.arg("--authentication");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.authenticate = authenticate;
        let start = Instant::now();
        while !kafka_answers(&self.plain_addr()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("tansu exited ({status}):\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "tansu does not answer ApiVersions on {} after {TIMEOUT:?}:\n{}",
                self.plain_addr(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 10 s).
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("broker running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn create_user(&self, user: &str, password: &str, mechanism: Mechanism) {
        assert!(
            !self.authenticate,
            "users are created without authentication"
        );
        self.cli(&[
            "user",
            "create",
            user,
            password,
            "--mechanism",
            mechanism.cli(),
            // Kafka's default (tansu's is 8192): a debug-build client hashes it on every
            // login.
            "--iterations",
            "4096",
        ])
        .await;
    }

    /// Runs `tansu ARGS --broker tcp://<plain port>`; panics (with its output, which may
    /// hold a test password: these are throw-away test credentials) when it fails.
    async fn cli(&self, args: &[&str]) {
        let out = self.dir.path().join("cli.log");
        let file = std::fs::File::create(&out).unwrap();
        let mut child = Command::new(&self.bin)
            .args(args)
            .args(["--broker", &format!("tcp://{}", self.plain_addr())])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        let what = format!("tansu {}", args[..2.min(args.len())].join(" "));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                panic!("{what}: no exit after {TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "{what} failed ({status}):\n{}\n--- broker log ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            self.log_text()
        );
    }

    /// Waits until `user` can log in with `password` (tansu's `user create` does not report
    /// a failure, so this is the check that it worked).
    async fn check_login(&self, user: &str, password: &str, mechanism: Mechanism) {
        let client = tokio::time::timeout(
            TIMEOUT,
            ClientBuilder::new(vec![self.plain_addr()])
                .sasl_config(mechanism.sasl_config(user, password))
                .backoff_config(rskafka::BackoffConfig {
                    deadline: Some(TIMEOUT),
                    ..Default::default()
                })
                .build(),
        )
        .await;
        match client {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "{user} ({}) cannot log in to the new broker: {e}\n{}",
                mechanism.sasl_name(),
                self.log_text()
            ),
            Err(_) => panic!("{user}: no login within {TIMEOUT:?}\n{}", self.log_text()),
        }
    }
}

impl Drop for ScramBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- tansu log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Whether a Kafka broker on `addr` answers an ApiVersions v0 request (which a broker
/// must answer before any SASL login) within a second.
pub fn kafka_answers(addr: &str) -> bool {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let client_id = b"dynamodb-cdc-tests";
    let correlation_id: i32 = 0x0dcdc;
    let mut msg = Vec::new();
    msg.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    msg.extend_from_slice(&0i16.to_be_bytes()); // v0
    msg.extend_from_slice(&correlation_id.to_be_bytes());
    msg.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    msg.extend_from_slice(client_id);
    let mut request = (msg.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&msg);
    if conn.write_all(&request).is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    if conn.read_exact(&mut head).is_err() {
        return false;
    }
    let size = i32::from_be_bytes(head[..4].try_into().unwrap());
    let correlation = i32::from_be_bytes(head[4..].try_into().unwrap());
    size >= 6 && correlation == correlation_id
}
