//! The daemon under test: the release binary, started with a config file written here and
//! base credentials in its environment, measured through `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::procfs;
use anyhow::{anyhow, Result};

/// A running `dynamodb-cdc run`; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Writes `config` to `dir/config.json` and starts `bin run --config` on it, logging to
    /// `dir/daemon.log`. Base credentials come from the environment (SigV4 signs every
    /// request with them); every other AWS variable is cleared.
    pub fn spawn(bin: &Path, dir: &Path, config: &Value) -> Result<Self> {
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)?;
        let log = dir.join("daemon.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&config_path);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCHMARK0000000")
            .env("AWS_SECRET_ACCESS_KEY", "benchmark-secret-key")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "info,rskafka=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Self { child, log })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds used so far.
    pub fn cpu(&self) -> f64 {
        procfs::process_cpu(self.pid()).unwrap_or(0.0)
    }

    /// Peak resident memory so far, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        procfs::peak_rss_kib(self.pid()).unwrap_or(0) as f64 / 1024.0
    }

    /// The last lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error when the daemon is no longer running.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(anyhow!(
                "the daemon exited ({status}); log {}:\n{}",
                self.log.display(),
                self.log_tail(20)
            )),
        }
    }

    /// SIGTERM, then waits (SIGKILL after `within`); the exit status.
    pub async fn stop(mut self, within: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Ok(self.child.wait()?);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
