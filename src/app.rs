//! The two commands: `run` wires config -> credentials -> Kafka -> one supervisor per table
//! and owns shutdown; `check` reaches every dependency once and reports.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::aws;
use crate::budget::Budget;
use crate::checkpoint::{CheckpointStore, FileStore};
use crate::config::{Config, OnPoisonRecord, TableConfig};
use crate::discovery;
use crate::error::Error;
use crate::kafka::session::SaslCredentials;
use crate::kafka::{self, Kafka, TopicProducer};
use crate::secrets::{SaslResolver, SecretsManager};
use crate::supervisor::{self, TableContext};
use crate::table_discovery::{self, Round, Verdict};
use crate::tasks::{Background, Watch};
use crate::telemetry;

/// Cancels `soft` on the first SIGTERM/SIGINT and `hard` on the second. SIGHUP (which
/// `systemctl reload` sends) asks for a config reload through `reload`; without a config file
/// to reload it is logged and ignored (its default action would kill the process without a
/// drain).
fn watch_signals(
    soft: CancellationToken,
    hard: CancellationToken,
    reload: Option<mpsc::Sender<()>>,
) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        let mut round = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    match &reload {
                        // A reload already queued covers this one.
                        Some(tx) => {
                            info!(signal = "SIGHUP", "reloading the config file");
                            let _ = tx.try_send(());
                        }
                        None => warn!(signal = "SIGHUP", "no config file to reload; SIGHUP ignored, still running"),
                    }
                    continue;
                }
            };
            if round == 0 {
                info!(
                    signal = name,
                    "shutting down: finishing in-flight records and writing checkpoints"
                );
                telemetry::systemd::stopping();
                soft.cancel();
            } else {
                warn!(
                    signal = name,
                    "second signal: stopping without waiting for Kafka"
                );
                hard.cancel();
            }
            round += 1;
        }
    });
}

/// Runs the pipeline until a signal (then drains within `shutdown_timeout_ms`) or a failure.
/// `config_path` is the file SIGHUP reloads.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), Error> {
    let cancel = CancellationToken::new();
    let hard = CancellationToken::new();
    let reload = config_path.as_ref().map(|path| {
        let (tx, rx) = mpsc::channel(1);
        (tx, Reloader::new(path.clone()), rx)
    });
    let (tx, reloader) = match reload {
        Some((tx, reloader, rx)) => (Some(tx), Some((reloader, rx))),
        None => (None, None),
    };
    watch_signals(cancel.clone(), hard.clone(), tx);
    run_with(config, reloader, cancel, hard).await
}

/// [`run`] with the shutdown tokens given: `cancel` drains and stops, `hard` stops without
/// waiting for Kafka.
pub async fn run_until(
    config: Config,
    cancel: CancellationToken,
    hard: CancellationToken,
) -> Result<(), Error> {
    run_with(config, None, cancel, hard).await
}

/// Where SIGHUP reloads the config from, and the document the running config came from.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    /// The running config's document (environment applied, references as written), to
    /// tell which keys a reload changed.
    document: Option<serde_json::Value>,
}

impl Reloader {
    /// Reloads from `path`; the file as it is now is the running config's.
    pub fn new(path: PathBuf) -> Self {
        let document = Self::document(&path).ok();
        Self { path, document }
    }

    fn document(path: &std::path::Path) -> Result<serde_json::Value, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::document_with_env(&text, |v: &str| std::env::var_os(v)).map_err(|e| e.to_string())
    }
}

async fn run_with(
    config: Config,
    reload: Option<(Reloader, mpsc::Receiver<()>)>,
    cancel: CancellationToken,
    hard: CancellationToken,
) -> Result<(), Error> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        tables = config.tables.len(),
        checkpoint_dir = %config.checkpoint.dir.display(),
        "starting dynamodb-cdc"
    );
    // Stops the HTTP server and the systemd notifier once everything else stopped.
    let done = CancellationToken::new();
    let _stop_side_tasks = done.clone().drop_guard();
    let budget = Budget::new(config.kafka.max_buffered_bytes.get());
    telemetry::get().start_pipeline(
        telemetry::Limits {
            max_stall: Duration::from_secs(config.health.max_stall_seconds),
            poll_overdue: Duration::from_millis(config.poll_overdue_ms()),
        },
        config.tables.iter().map(|t| t.name.clone()).collect(),
        (budget.clone(), config.kafka.max_buffered_bytes.get()),
    );
    if let Some(listen) = config.metrics.listen {
        telemetry::server::serve(listen, done.clone()).await?;
    }
    tokio::spawn(telemetry::systemd::run(done.clone()));
    let drain_within = Duration::from_millis(config.shutdown_timeout_ms);
    let (background, watch) = Background::new();
    let started = start(config, budget, cancel.clone(), hard.clone(), &background).await;
    let (pipeline, tables) = match started {
        Ok(t) => t,
        // Shutdown interrupted the start: a clean stop. Any other error is a failure, even
        // when a signal came at the same time.
        Err(Error::Cancelled) => {
            info!("stopped during start-up");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let heartbeat = {
        let (kafka, every) = (
            pipeline.kafka.clone(),
            Duration::from_secs(pipeline.config.health.max_stall_seconds) / 4,
        );
        tokio::spawn(kafka_heartbeat(kafka, every, done.clone()))
    };
    let result = supervise(
        Supervised {
            tables,
            pipeline: Some(pipeline),
            reload,
        },
        watch,
        cancel,
        hard,
        drain_within,
    )
    .await;
    heartbeat.abort();
    result
}

/// Asks Kafka for metadata when nothing was produced for `every`, so that `/healthz` knows
/// Kafka answers while the tables are quiet.
async fn kafka_heartbeat(kafka: Kafka, every: Duration, stop: CancellationToken) {
    let every = every.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let recent = telemetry::get()
            .kafka_ok_at()
            .is_some_and(|at| at.elapsed() < every);
        if !recent {
            match kafka.heartbeat(every).await {
                Ok(()) => telemetry::get().kafka_ok(),
                Err(e) => warn!(error = %e, "Kafka metadata request failed"),
            }
        }
    }
}

/// What [`supervise`] watches: the table tasks, and what starts new ones on a reload.
struct Supervised {
    tables: JoinSet<(String, Result<(), Error>)>,
    /// `None` in tests that supervise bare tasks.
    pipeline: Option<Pipeline>,
    reload: Option<(Reloader, mpsc::Receiver<()>)>,
}

/// A reload's outcome, once the new file was read and its references resolved.
type Loaded = Result<(Config, serde_json::Value), String>;

/// Waits for the tables; the first failure (a table, or a background task that ended)
/// stops the others at their last acknowledged record. After `cancel`, everything must
/// drain within `drain_within`. A reload adds and removes tables meanwhile.
async fn supervise(
    mut s: Supervised,
    mut watch: Watch,
    cancel: CancellationToken,
    hard: CancellationToken,
    drain_within: Duration,
) -> Result<(), Error> {
    let mut failure: Option<Error> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut loading: Option<tokio::task::JoinHandle<Loaded>> = None;
    let fail = |e: Error, failure: &mut Option<Error>| {
        if failure.is_none() {
            error!(error = %e, "pipeline failed; stopping the other tables at their last acknowledged record");
            *failure = Some(e);
        }
        cancel.cancel();
    };
    let can_reload = s.reload.is_some() && s.pipeline.is_some();
    let mut discovery = s.pipeline.as_mut().and_then(|p| p.discovery.take());
    loop {
        // Without reloads, the pipeline ends when its last table did; with them, only at
        // shutdown (a reload may add tables again), or once every table of a config that
        // only loads tables (`sync_mode: snapshot`) is loaded.
        // Rules of `tables` may find tables later too.
        let one_shot = s.pipeline.as_ref().is_some_and(|p| p.config.loads_only());
        let discovering = s
            .pipeline
            .as_ref()
            .is_some_and(|p| !p.config.table_rules.is_empty());
        if s.tables.is_empty()
            && (cancel.is_cancelled() || !(can_reload || discovering) || one_shot)
        {
            break;
        }
        let sleep_until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
        let reload_rx = s.reload.as_mut().map(|(_, rx)| rx);
        tokio::select! {
            joined = s.tables.join_next(), if !s.tables.is_empty() => {
                let (name, result) = joined.expect("not empty").unwrap_or_else(|e| {
                    (String::new(), Err(Error::Internal(format!("a table task panicked: {e}"))))
                });
                let discovered = s.pipeline.as_ref().is_some_and(|p| p.is_discovered(&name));
                let removed = s.pipeline.as_mut().is_some_and(|p| p.stopped(&name));
                match result {
                    // A table a rule found: its end or failure stops it alone.
                    Err(Error::TableDeleted { stream_arn, .. }) if discovered => {
                        info!(table = %name, stream_arn = %stream_arn, "table deleted and its stream read to its end: stopped (found by a rule of tables); its checkpoints are kept");
                        s.pipeline.as_mut().expect("discovered").forget(&name);
                    }
                    Err(e) if discovered && !cancel.is_cancelled() => {
                        error!(table = %name, error = %e, "table stopped on an error; the other tables go on, and discovery starts it again at its next round");
                        s.pipeline.as_mut().expect("discovered").forget(&name);
                    }
                    Err(e) => fail(e, &mut failure),
                    Ok(()) if removed => info!(table = %name, "table stopped; its checkpoints are kept"),
                    Ok(()) => {}
                }
            }
            round = async { discovery.as_mut().expect("guarded").recv().await }, if discovery.is_some() && !cancel.is_cancelled() => {
                match (round, s.pipeline.as_mut()) {
                    (Some(round), Some(pipeline)) => pipeline.discovered(round, &mut s.tables),
                    _ => discovery = None,
                }
            }
            _ = async { reload_rx.expect("guarded").recv().await }, if can_reload && loading.is_none() && !cancel.is_cancelled() => {
                telemetry::systemd::reloading();
                let path = s.reload.as_ref().expect("guarded").0.path.clone();
                loading = Some(tokio::spawn(async move {
                    let document = Reloader::document(&path)?;
                    let config = crate::secrets::load_config(&path).await.map_err(|e| e.to_string())?;
                    Ok((config, document))
                }));
            }
            loaded = async { loading.as_mut().expect("guarded").await }, if loading.is_some() => {
                loading = None;
                let loaded = loaded.unwrap_or_else(|e| Err(format!("reload task panicked: {e}")));
                let (reloader, pipeline) = (&mut s.reload.as_mut().expect("guarded").0, s.pipeline.as_mut().expect("guarded"));
                match loaded {
                    Ok((config, document)) if !cancel.is_cancelled() => {
                        pipeline.apply(config, reloader.document.as_ref(), &document, &mut s.tables);
                        reloader.document = Some(document);
                    }
                    Ok(_) => {}
                    Err(e) => error!(path = %reloader.path.display(), error = %e, "config reload failed; the running config is kept"),
                }
                telemetry::systemd::reloaded();
            }
            ended = watch.next() => {
                // Partition producers live as long as their topic's tables, the refresher
                // until shutdown: one that ends before is a bug, and the process must exit
                // so that systemd restarts it.
                // In a config that only loads tables, a topic's producers end with its
                // table's load (a producer that failed earlier fails that load).
                let retired = ended.panic.is_none()
                    && s.pipeline.as_ref().is_some_and(|p| {
                        p.retired(&ended.name)
                            || (p.config.loads_only() && ended.name.starts_with("kafka producer "))
                    });
                if retired {
                    debug!(task = %ended.name, "producer of a removed table's topic stopped");
                } else if !cancel.is_cancelled() || ended.panic.is_some() {
                    error!(task = %ended.name, panic = ended.panic.as_deref().unwrap_or(""), "background task died");
                    fail(Error::Internal(ended.to_string()), &mut failure);
                }
            }
            _ = cancel.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain_within);
            }
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                error!(timeout_ms = drain_within.as_millis() as u64, "shutdown deadline passed: stopping without waiting for Kafka; unacknowledged records will be read again after a restart");
                hard.cancel();
                s.tables.abort_all();
                return Err(failure.unwrap_or_else(|| Error::Internal("shutdown deadline passed".into())));
            }
            _ = hard.cancelled() => {
                s.tables.abort_all();
                return Err(failure.unwrap_or_else(|| Error::Internal("stopped by a second signal".into())));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            info!("stopped cleanly; every record read was acknowledged and checkpointed");
            Ok(())
        }
    }
}

/// The running pipeline's shared parts, to start and stop tables.
#[derive(Debug)]
struct Pipeline {
    config: Arc<Config>,
    aws: aws::AwsClients,
    kafka: Kafka,
    store: Arc<dyn CheckpointStore>,
    budget: Budget,
    dead_letter: Option<TopicProducer>,
    cancel: CancellationToken,
    /// Each running table's own token (a child of `cancel`): cancelling it drains the table.
    running: HashMap<String, CancellationToken>,
    /// Tables a reload removed that are still draining.
    draining: HashSet<String>,
    /// Topics of tables a reload removed (no running table writes to them): their
    /// partition producers end with the table, which is not a failure.
    retired_topics: HashSet<String>,
    /// The config whose rules the discovery loop applies (a reload sends the new one).
    rules: watch::Sender<Arc<Config>>,
    /// The discovery loop's rounds, until [`supervise`] takes them.
    discovery: Option<mpsc::Receiver<Round>>,
    /// Why each table a rule matches is not captured, as last reported (reported again
    /// only when the reason changes).
    reported: HashMap<String, String>,
}

impl Pipeline {
    /// Starts `table`; `partitions` known (checked at start), or looked up (and the topic
    /// created when `kafka.create_topics` says so) by the table's task.
    fn spawn_table(
        &mut self,
        tables: &mut JoinSet<(String, Result<(), Error>)>,
        table: &TableConfig,
        partitions: Option<u32>,
    ) {
        let token = self.cancel.child_token();
        self.running.insert(table.name.clone(), token.clone());
        let topic = self.config.topic_for(table);
        let name = table.name.clone();
        let kafka = self.kafka.clone();
        let (aws, budget, store, config, dead_letter) = (
            self.aws.clone(),
            self.budget.clone(),
            self.store.clone(),
            self.config.clone(),
            self.dead_letter.clone(),
        );
        tables.spawn(async move {
            let result = async {
                let partitions = match partitions {
                    Some(p) => p,
                    None => kafka.ensure_topic(&topic, &token).await?,
                };
                let ctx = TableContext {
                    table: name.clone(),
                    aws,
                    producer: kafka.topic_producer(&topic, partitions),
                    budget,
                    store,
                    config,
                    dead_letter,
                };
                supervisor::run_table(ctx, token).await
            }
            .await;
            // A table stopped by a reload while its topic was being checked: not a failure.
            let result = match result {
                Err(Error::Cancelled) => Ok(()),
                r => r,
            };
            (name, result)
        });
    }

    /// `task` is a partition producer of a topic no running table writes to.
    fn retired(&self, task: &str) -> bool {
        self.retired_topics.iter().any(|topic| {
            task.strip_prefix("kafka producer ")
                .and_then(|rest| rest.strip_prefix(topic.as_str()))
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// A table task ended; true when a reload had removed it.
    fn stopped(&mut self, table: &str) -> bool {
        self.running.remove(table);
        let removed = self.draining.remove(table);
        if removed {
            telemetry::get().forget_table(table);
        }
        removed
    }

    /// Applies a reloaded config: tables added start, tables removed drain and stop, the
    /// others are untouched; any other change is logged as needing a restart.
    fn apply(
        &mut self,
        new: Config,
        old_document: Option<&serde_json::Value>,
        new_document: &serde_json::Value,
        tables_set: &mut JoinSet<(String, Result<(), Error>)>,
    ) {
        let changed = changed_keys(old_document, new_document);
        if !changed.is_empty() {
            warn!(keys = %changed.join(", "), "config reload: these keys changed and need a restart (systemctl restart dynamodb-cdc); their running values are kept");
        }
        let old: HashMap<&str, &TableConfig> = self
            .config
            .tables
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        // Tables a rule found stay; the discovery round the new rules start decides.
        let mut kept: Vec<TableConfig> = self
            .config
            .tables
            .iter()
            .filter(|t| t.discovered && !new.tables.iter().any(|n| n.name == t.name))
            .cloned()
            .collect();
        let mut added = Vec::new();
        for t in &new.tables {
            match old.get(t.name.as_str()) {
                Some(o) if **o == *t => kept.push(t.clone()),
                Some(o) => {
                    warn!(table = %t.name, "config reload: the table's settings changed and need a restart; the running ones are kept");
                    kept.push((*o).clone());
                }
                None if self.draining.contains(&t.name) => warn!(table = %t.name,
                    "config reload: the table is still draining after its removal; send SIGHUP again once it stopped"),
                None => added.push(t.clone()),
            }
        }
        let removed: Vec<String> = self
            .config
            .tables
            .iter()
            .filter(|t| !t.discovered && !new.tables.iter().any(|n| n.name == t.name))
            .map(|t| t.name.clone())
            .collect();
        for name in &removed {
            info!(table = %name, "config reload: table removed; draining its shard readers");
        }
        let tables = kept.iter().chain(&added).cloned().collect();
        let rules = new.table_rules.clone();
        self.change_tables(tables, &added, &removed, tables_set);
        {
            let mut config = (*self.config).clone();
            config.table_rules = rules;
            self.config = Arc::new(config);
        }
        if self.config.table_rules.is_empty() {
            // No rule any more: the tables they found stop.
            self.discovered(Round::default(), tables_set);
        }
        let _ = self.rules.send(Arc::new(new));
        info!(
            added = added.len(),
            removed = removed.len(),
            tables = self.config.tables.len(),
            "config reloaded"
        );
    }

    /// Sets the running tables to `tables`: `added` start, `removed` drain and stop.
    fn change_tables(
        &mut self,
        tables: Vec<TableConfig>,
        added: &[TableConfig],
        removed: &[String],
        set: &mut JoinSet<(String, Result<(), Error>)>,
    ) {
        let mut config = (*self.config).clone();
        config.tables = tables;
        let live: HashSet<String> = config.tables.iter().map(|t| config.topic_for(t)).collect();
        for t in self
            .config
            .tables
            .iter()
            .filter(|t| removed.contains(&t.name))
        {
            let topic = self.config.topic_for(t);
            if !live.contains(&topic) {
                self.retired_topics.insert(topic);
            }
        }
        // A topic in use again gets new producers; those must not end unnoticed.
        self.retired_topics.retain(|t| !live.contains(t));
        self.config = Arc::new(config);
        for name in removed {
            if let Some(token) = self.running.get(name) {
                token.cancel();
            }
            self.draining.insert(name.clone());
        }
        for t in added {
            info!(table = %t.name, topic = %self.config.topic_for(t), sync_mode = self.config.sync_mode_for(&t.name).as_str(), discovered = t.discovered, "table added; starting it");
            self.spawn_table(set, t, None);
        }
        telemetry::get()
            .set_expected_tables(self.config.tables.iter().map(|t| t.name.clone()).collect());
    }

    /// `table` was found by a rule of `tables`.
    fn is_discovered(&self, table: &str) -> bool {
        self.config
            .tables
            .iter()
            .any(|t| t.name == table && t.discovered)
    }

    /// A table a rule found ended (deleted, failed): no longer one of the running tables,
    /// so that the next round starts it again if it is still there.
    fn forget(&mut self, table: &str) {
        let mut config = (*self.config).clone();
        let topics = |c: &Config, keep: &dyn Fn(&TableConfig) -> bool| -> HashSet<String> {
            c.tables
                .iter()
                .filter(|t| keep(t))
                .map(|t| c.topic_for(t))
                .collect()
        };
        let gone = topics(&config, &|t| t.name == table);
        config.tables.retain(|t| t.name != table);
        let live = topics(&config, &|_| true);
        // Its partition producers end with it.
        self.retired_topics
            .extend(gone.into_iter().filter(|t| !live.contains(t)));
        self.config = Arc::new(config);
        telemetry::get().forget_table(table);
        telemetry::get()
            .set_expected_tables(self.config.tables.iter().map(|t| t.name.clone()).collect());
    }

    /// Applies a discovery round: tables a rule selects now start (with their sync mode),
    /// those it no longer selects (deleted, a tag removed) drain and stop, keeping their
    /// checkpoints. A table that matches but cannot be captured (no stream, a KEYS_ONLY
    /// stream, a topic collision) is reported once, with its fix, and looked at again each
    /// round.
    fn discovered(&mut self, mut round: Round, set: &mut JoinSet<(String, Result<(), Error>)>) {
        let running: HashSet<String> = self
            .config
            .tables
            .iter()
            .filter(|t| t.discovered)
            .map(|t| t.name.clone())
            .collect();
        round.drop_collisions(&self.config, &running);
        for entry in &round.entries {
            match &entry.verdict {
                Verdict::Skipped {
                    reason,
                    fix,
                    matched: true,
                } => {
                    if self.reported.get(&entry.table) != Some(reason) {
                        warn!(table = %entry.table, reason = %reason, fix = fix.as_deref().unwrap_or(""), "table matches a rule of tables but is not captured; checked again each interval");
                        self.reported.insert(entry.table.clone(), reason.clone());
                    } else {
                        debug!(table = %entry.table, reason = %reason, "table still not captured");
                    }
                }
                _ => {
                    self.reported.remove(&entry.table);
                }
            }
        }
        let selected: Vec<&TableConfig> = round.selected().collect();
        let skipped = round
            .entries
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Skipped { matched: true, .. }))
            .count();
        telemetry::get().discovery_round(Some((selected.len(), skipped)));
        let added: Vec<TableConfig> = selected
            .iter()
            .filter(|t| !running.contains(&t.name))
            .filter(|t| {
                let draining = self.draining.contains(&t.name);
                if draining {
                    debug!(table = %t.name, "table selected again while still draining; starting it at the next round");
                }
                !draining
            })
            .map(|t| (*t).clone())
            .collect();
        let mut removed: Vec<String> = running
            .iter()
            .filter(|name| !selected.iter().any(|t| t.name == **name))
            .cloned()
            .collect();
        removed.sort();
        for name in &removed {
            match round.entry(name).map(|e| &e.verdict) {
                Some(Verdict::Skipped { reason, .. }) => {
                    info!(table = %name, reason = %reason, "table no longer matches the rules of tables; draining its shard readers (checkpoints kept)")
                }
                Some(Verdict::Named) => {
                    info!(table = %name, "table is now listed by name; restart to apply its settings")
                }
                _ => {
                    info!(table = %name, "table no longer listed (deleted); draining its shard readers (checkpoints kept)")
                }
            }
        }
        removed
            .retain(|name| !matches!(round.entry(name).map(|e| &e.verdict), Some(Verdict::Named)));
        if added.is_empty() && removed.is_empty() {
            return;
        }
        let tables = self
            .config
            .tables
            .iter()
            .filter(|t| !removed.contains(&t.name))
            .cloned()
            .chain(added.iter().cloned())
            .collect();
        self.change_tables(tables, &added, &removed, set);
        info!(
            added = added.len(),
            removed = removed.len(),
            tables = self.config.tables.len(),
            "tables discovered"
        );
    }
}

/// Lists the account's tables again every `interval_seconds` (at once when a reload changes
/// the rules) and hands each round to [`supervise`]. A failed round is a WARN: the running
/// tables go on.
async fn discovery_loop(
    dynamodb: aws_sdk_dynamodb::Client,
    mut rules: watch::Receiver<Arc<Config>>,
    rounds: mpsc::Sender<Round>,
    cancel: CancellationToken,
) {
    loop {
        let every = rules
            .borrow()
            .discovery_interval()
            .unwrap_or(Duration::from_secs(86_400 * 365));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            changed = rules.changed() => if changed.is_err() { return },
        }
        let config = rules.borrow_and_update().clone();
        if config.table_rules.is_empty() {
            continue;
        }
        match table_discovery::discover(&dynamodb, &config, &cancel).await {
            Ok(round) => {
                if rounds.send(round).await.is_err() {
                    return;
                }
            }
            Err(discovery::DiscoveryError::Cancelled) => return,
            Err(e) => {
                telemetry::get().discovery_round(None);
                warn!(error = %e, retry_in_s = every.as_secs(), "table discovery failed; the running tables go on")
            }
        }
    }
}

/// Top-level keys (and `kafka.*` etc. one level down) whose values differ, `tables` aside.
fn changed_keys(old: Option<&serde_json::Value>, new: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let old = old.and_then(|o| o.as_object()).unwrap_or(&empty);
    let new = new.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changed = Vec::new();
    for key in keys {
        if key == "tables" || old.get(key) == new.get(key) {
            continue;
        }
        match (
            old.get(key).and_then(|v| v.as_object()),
            new.get(key).and_then(|v| v.as_object()),
        ) {
            (Some(a), Some(b)) => {
                let mut inner: Vec<&String> = a.keys().chain(b.keys()).collect();
                inner.sort();
                inner.dedup();
                changed.extend(
                    inner
                        .into_iter()
                        .filter(|k| a.get(*k) != b.get(*k))
                        .map(|k| format!("{key}.{k}")),
                );
            }
            _ => changed.push(key.clone()),
        }
    }
    changed
}

async fn start(
    config: Config,
    budget: Budget,
    cancel: CancellationToken,
    hard: CancellationToken,
    background: &Background,
) -> Result<(Pipeline, JoinSet<(String, Result<(), Error>)>), Error> {
    let config = Arc::new(config);
    let store: Arc<dyn CheckpointStore> = Arc::new(FileStore::open(&config.checkpoint.dir)?);
    let aws = aws::connect(&config.aws, &cancel, background).await?;
    if let Some(role) = &aws.role {
        telemetry::get().set_credentials(role.clone());
    }
    let security = kafka::security::security(
        &config,
        Some(&aws),
        sasl_credentials(&config, &aws, &cancel),
        &cancel,
        background,
    )
    .await?;
    let kafka = Kafka::connect(&config.kafka, &security, &cancel, hard, background).await?;
    telemetry::get().kafka_ok();
    let dead_letter = match config.on_poison_record {
        OnPoisonRecord::Fail => None,
        OnPoisonRecord::DeadLetter => {
            let topic = config.dead_letter_topic();
            let partitions = kafka.ensure_topic(&topic, &cancel).await?;
            Some(kafka.topic_producer(&topic, partitions))
        }
    };
    // Every topic is checked before any table starts: a missing one stops the start.
    let mut partitions = Vec::new();
    for table in &config.tables {
        partitions.push(
            kafka
                .ensure_topic(&config.topic_for(table), &cancel)
                .await?,
        );
    }
    // The rules' first round, before anything starts: a rule that cannot list the tables
    // (no dynamodb:ListTables) stops the start.
    let first_round = if config.table_rules.is_empty() {
        None
    } else {
        let round = table_discovery::discover(&aws.dynamodb, &config, &cancel)
            .await
            .map_err(|e| match e {
                discovery::DiscoveryError::Cancelled => Error::Cancelled,
                e => Error::Discovery(e.to_string()),
            })?;
        Some(round)
    };
    let (rules, rules_rx) = watch::channel(config.clone());
    let (rounds_tx, rounds_rx) = mpsc::channel(1);
    tokio::spawn(discovery_loop(
        aws.dynamodb.clone(),
        rules_rx,
        rounds_tx,
        cancel.clone(),
    ));
    let mut pipeline = Pipeline {
        config: config.clone(),
        aws,
        kafka,
        store,
        budget,
        dead_letter,
        cancel,
        running: HashMap::new(),
        draining: HashSet::new(),
        retired_topics: HashSet::new(),
        rules,
        discovery: Some(rounds_rx),
        reported: HashMap::new(),
    };
    let mut set = JoinSet::new();
    for (table, partitions) in config.tables.iter().zip(partitions) {
        pipeline.spawn_table(&mut set, table, Some(partitions));
    }
    // Tables the rules found check their topic themselves: a missing one fails that
    // table alone.
    if let Some(round) = first_round {
        pipeline.discovered(round, &mut set);
    }
    Ok((pipeline, set))
}

/// Where `dynamodb-cdc snapshot --table` keeps its positions: a directory of its own inside
/// `checkpoint.dir` (a name no table's directory can have), with its own lock, so that it
/// runs beside the daemon and never touches the pipeline's checkpoints.
pub fn manual_snapshot_dir(config: &Config) -> PathBuf {
    config.checkpoint.dir.join(".manual-snapshots")
}

/// `dynamodb-cdc snapshot --table NAME`: loads one table of the config into its topic once
/// (SNAPSHOT rows), resuming an unfinished run of this command, then returns. SIGTERM/SIGINT
/// stop it at its last acknowledged page.
pub async fn snapshot_table(config: Config, table: &str) -> Result<(), Error> {
    // A table listed by name, else one a rule's patterns select (its override applies;
    // tags are not read: naming the table is the choice).
    let by_rule = || {
        config
            .table_rules
            .iter()
            .find(|r| r.selection().selects_name(table))
            .map(|r| {
                let o = r.override_for(table);
                TableConfig {
                    name: table.to_owned(),
                    topic: o
                        .and_then(|o| o.topic.as_deref())
                        .and_then(|t| config.topic_name_for(table, t).ok()),
                    sync_mode: o.and_then(|o| o.sync_mode),
                    start_position: o.and_then(|o| o.start_position),
                    discovered: true,
                }
            })
    };
    let Some(entry) = config
        .tables
        .iter()
        .find(|t| t.name == table)
        .cloned()
        .or_else(by_rule)
    else {
        return Err(Error::Config(crate::error::ConfigError::Invalid {
            key: "--table".into(),
            message: format!(
                "{table:?} is neither in the config's tables nor selected by a rule's patterns ({}); name one of them",
                config
                    .tables
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }));
    };
    let mut config = config;
    if entry.discovered {
        config.tables.push(entry.clone());
    }
    let (cancel, hard) = (CancellationToken::new(), CancellationToken::new());
    watch_signals(cancel.clone(), hard.clone(), None);
    let config = Arc::new(config);
    let store: Arc<dyn CheckpointStore> = Arc::new(FileStore::open(&manual_snapshot_dir(&config))?);
    let (background, _watch) = Background::new();
    let aws = aws::connect(&config.aws, &cancel, &background).await?;
    let security = kafka::security::security(
        &config,
        Some(&aws),
        sasl_credentials(&config, &aws, &cancel),
        &cancel,
        &background,
    )
    .await?;
    let kafka = Kafka::connect(&config.kafka, &security, &cancel, hard, &background).await?;
    let topic = config.topic_for(&entry);
    let partitions = kafka.ensure_topic(&topic, &cancel).await?;
    let dead_letter = match config.on_poison_record {
        OnPoisonRecord::Fail => None,
        OnPoisonRecord::DeadLetter => {
            let dlq = config.dead_letter_topic();
            let partitions = kafka.ensure_topic(&dlq, &cancel).await?;
            Some(kafka.topic_producer(&dlq, partitions))
        }
    };
    let ctx = TableContext {
        table: table.to_owned(),
        aws,
        producer: kafka.topic_producer(&topic, partitions),
        budget: Budget::new(config.kafka.max_buffered_bytes.get()),
        store,
        config: config.clone(),
        dead_letter,
    };
    let snapshot = supervisor::snapshot_context(&ctx, crate::checkpoint::SnapshotKind::Manual);
    match crate::snapshot::run_snapshot(snapshot, &cancel).await? {
        crate::snapshot::SnapshotOutcome::Completed(done) => {
            info!(table = %table, rows = done.rows(), topic = %topic, "snapshot of the table delivered");
            Ok(())
        }
        crate::snapshot::SnapshotOutcome::Stopped | crate::snapshot::SnapshotOutcome::Paused => {
            Err(Error::Cancelled)
        }
    }
}

/// Scans one item the way a snapshot does (`Limit: 1`, the item discarded), once.
async fn probe_scan(dynamodb: &aws_sdk_dynamodb::Client, table: &str) -> (bool, String) {
    use aws_sdk_dynamodb::error::ProvideErrorMetadata;
    match dynamodb
        .scan()
        .table_name(table)
        .limit(1)
        .segment(0)
        .total_segments(1)
        .send()
        .await
    {
        Ok(_) => (true, format!("table {table}: dynamodb:Scan (snapshot)")),
        Err(e) => {
            let why = match (e.code(), e.raw_response().map(|r| r.status().as_u16())) {
                (Some(code), _) => code.to_owned(),
                (None, Some(status)) => format!("HTTP {status}"),
                (None, None) => crate::error::aws_message(&e),
            };
            (
                false,
                format!("dynamodb:Scan on table {table} (snapshot): {why}"),
            )
        }
    }
}

/// Reads one shard the way the pipeline does (GetShardIterator at TRIM_HORIZON, GetRecords
/// with `Limit: 1`, the record discarded): one line per action, naming it and the stream.
/// One attempt each: a probe reports, it does not wait out a refusal.
async fn probe_reads(
    streams: &aws_sdk_dynamodbstreams::Client,
    stream_arn: &str,
    shard_id: &str,
) -> Vec<(bool, String)> {
    use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_dynamodbstreams::types::ShardIteratorType;
    fn why<E: ProvideErrorMetadata + std::error::Error + 'static>(
        e: &SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> String {
        match (e.code(), e.raw_response().map(|r| r.status().as_u16())) {
            (Some(code), _) => code.to_owned(),
            (None, Some(403)) => "HTTP 403 (AccessDenied)".to_owned(),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => crate::error::aws_message(e),
        }
    }
    let iterator = streams
        .get_shard_iterator()
        .stream_arn(stream_arn)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await;
    let iterator = match iterator {
        Ok(out) => out.shard_iterator.unwrap_or_default(),
        Err(e) => {
            return vec![(
                false,
                format!("dynamodb:GetShardIterator on {stream_arn}: {}", why(&e)),
            )]
        }
    };
    let mut lines = vec![(true, format!("dynamodb:GetShardIterator on {stream_arn}"))];
    let records = streams
        .get_records()
        .shard_iterator(&iterator)
        .limit(1)
        .send()
        .await;
    lines.push(match records {
        Ok(out) => (
            true,
            format!(
                "dynamodb:GetRecords on {stream_arn} ({} record(s) read and discarded)",
                out.records().len()
            ),
        ),
        Err(e) => (
            false,
            format!("dynamodb:GetRecords on {stream_arn}: {}", why(&e)),
        ),
    });
    lines
}

/// Tries the role without its external ID: when STS lets that in, the trust policy does
/// not require the external ID (the confused-deputy guard it exists for), a WARN line.
/// Chained roles are not tried (the first hop would have to be assumed first).
async fn external_id_guard(
    aws_config: &crate::config::AwsConfig,
    role: &crate::config::AssumeRoleConfig,
    limit: Duration,
) -> Option<String> {
    if role.external_id.is_none() || role.first_hop.is_some() {
        return None;
    }
    let mut without = role.clone();
    without.external_id = None;
    let base = aws::base_config(aws_config).await;
    let calls = std::sync::atomic::AtomicU64::new(0);
    Some(
        match tokio::time::timeout(limit, aws::RoleAssumer::new(without, &base).assume(&calls)).await {
            Ok(Ok(_)) => format!(
                "WARN assume role {} without the external ID succeeded: its trust policy does not require sts:ExternalId (see dynamodb-cdc integration trust-policy)",
                role.role_arn
            ),
            Ok(Err(_)) => format!(
                "OK   assume role {}: refused without the external ID",
                role.role_arn
            ),
            Err(_) => format!(
                "WARN assume role {} without the external ID: no answer within {} s, so whether its trust policy requires sts:ExternalId is unknown",
                role.role_arn,
                limit.as_secs()
            ),
        },
    )
}

/// Where PLAIN/SCRAM credentials come from after a refused login: the config's
/// references read again (Secrets Manager under the daemon's role), or `None` when
/// `kafka.sasl` holds no reference (the values as written).
fn sasl_credentials(
    config: &Config,
    aws: &aws::AwsClients,
    cancel: &CancellationToken,
) -> Option<Arc<dyn SaslCredentials>> {
    let templates = config.sasl_templates.clone()?;
    let source = Arc::new(SecretsManager::new(&aws.sdk, cancel.clone()));
    Some(Arc::new(SaslResolver::new(templates, source)))
}

/// Checks the config's dependencies, printing one line per check; true when all pass.
/// `dynamodb-cdc tables`: what the config's tables and rules select now (ListTables,
/// DescribeTable, ListTagsOfResource; nothing is read from a stream or written anywhere).
pub async fn tables(config: Config, json: bool) -> Result<String, Error> {
    let cancel = CancellationToken::new();
    let (background, _watch) = Background::new();
    let aws = aws::connect(&config.aws, &cancel, &background).await?;
    let config = Arc::new(config);
    let mut round = table_discovery::discover(&aws.dynamodb, &config, &cancel)
        .await
        .map_err(|e| Error::Discovery(e.to_string()))?;
    round.drop_collisions(&config, &HashSet::new());
    let mut streams = HashMap::new();
    for e in &round.entries {
        if e.verdict == Verdict::Named {
            let stream = match discovery::describe_table(&aws.dynamodb, &e.table, &cancel).await {
                Ok(s) => s.view_type,
                Err(discovery::DiscoveryError::NoStream { .. }) => "none".into(),
                Err(e) => format!("unknown ({e})"),
            };
            streams.insert(e.table.clone(), stream);
        }
    }
    Ok(table_discovery::render(&round, &config, &streams, json))
}

pub async fn check(config: Config) -> bool {
    let mut ok = true;
    let mut report = |passed: bool, what: String| {
        ok &= passed;
        println!("{} {what}", if passed { "OK  " } else { "FAIL" });
    };
    report(
        true,
        match config.table_rules.len() {
            0 => format!("config: {} table(s)", config.tables.len()),
            rules => format!(
                "config: {} table(s) by name, {rules} rule(s)",
                config.tables.len()
            ),
        },
    );
    if config.references.total > 0 {
        report(
            true,
            format!(
                "secrets: {} reference(s) resolved ({} from Secrets Manager)",
                config.references.total, config.references.secrets_manager
            ),
        );
    }
    for (secret_id, key) in &config.references.secrets {
        report(
            true,
            format!("secretsmanager:GetSecretValue on {secret_id} ({key})"),
        );
    }
    match FileStore::open(&config.checkpoint.dir) {
        Ok(_) => report(
            true,
            format!(
                "checkpoint dir {} is writable",
                config.checkpoint.dir.display()
            ),
        ),
        Err(Error::CheckpointInUse { path }) => report(
            true,
            format!(
                "checkpoint dir {} is in use by a running dynamodb-cdc",
                path.display()
            ),
        ),
        Err(e) => report(false, format!("checkpoint dir: {e}")),
    }
    // Every network check gives up after this long instead of retrying forever.
    let limit = Duration::from_millis(config.aws.request_timeout_ms.max(5_000));
    let cancel = CancellationToken::new();
    let timer = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit * 2).await;
            cancel.cancel();
        })
    };
    let (background, _watch) = Background::new();
    let aws = match aws::connect(&config.aws, &cancel, &background).await {
        Ok(a) => {
            match (&config.aws.assume_role, &a.role) {
                (Some(r), Some(creds)) => {
                    let expires = creds.current().expiry();
                    let expiry = expires
                        .map(|e| chrono::DateTime::<chrono::Utc>::from(e).to_rfc3339())
                        .unwrap_or_default();
                    // What STS granted, which a role's MaxSessionDuration can cut short.
                    let minutes = expires
                        .and_then(|e| e.duration_since(std::time::SystemTime::now()).ok())
                        .map(|d| (d.as_secs() + 30) / 60)
                        .unwrap_or_default();
                    report(
                        true,
                        format!(
                            "assume role {} (session expires {expiry}, {minutes} min)",
                            r.role_arn
                        ),
                    );
                }
                _ => report(
                    true,
                    "AWS credentials: default chain (no assume_role)".into(),
                ),
            }
            Some(a)
        }
        Err(e) => {
            report(false, e.to_string());
            None
        }
    };
    if let (Some(_), Some(role)) = (&aws, &config.aws.assume_role) {
        if let Some(line) = external_id_guard(&config.aws, role, limit).await {
            println!("{line}");
        }
    }
    let mut config = config;
    if let (Some(aws), false) = (&aws, config.table_rules.is_empty()) {
        let shared = Arc::new(config.clone());
        match table_discovery::discover(&aws.dynamodb, &shared, &cancel).await {
            Ok(mut round) => {
                round.drop_collisions(&config, &HashSet::new());
                let selected: Vec<TableConfig> = round.selected().cloned().collect();
                let failed: Vec<String> = round
                    .entries
                    .iter()
                    .filter_map(|e| match &e.verdict {
                        Verdict::Skipped { reason, .. } if reason.contains(" failed: ") => {
                            Some(format!("{}: {reason}", e.table))
                        }
                        _ => None,
                    })
                    .collect();
                report(
                    true,
                    format!(
                        "dynamodb:ListTables: {} table(s), {} selected by the rules of tables (dynamodb-cdc tables lists them)",
                        round.entries.len(),
                        selected.len()
                    ),
                );
                for line in failed {
                    report(false, line);
                }
                config.tables.extend(selected);
            }
            Err(e) => report(false, format!("tables rules: {e}")),
        }
    }
    if let Some(aws) = &aws {
        for table in &config.tables {
            let result = async {
                let s = discovery::describe_table(&aws.dynamodb, &table.name, &cancel).await?;
                let l = discovery::list_shards(&aws.streams, &s.stream_arn, &cancel).await?;
                Ok::<_, discovery::DiscoveryError>((s, l))
            }
            .await;
            match result {
                Ok((s, l)) => {
                    report(
                        true,
                        format!(
                            "table {}: stream {} ({}, {}), {} shard(s)",
                            table.name,
                            s.stream_arn,
                            s.view_type,
                            l.status,
                            l.shards.len()
                        ),
                    );
                    if let Some(shard) = l.shards.first() {
                        for (passed, line) in
                            probe_reads(&aws.streams, &s.stream_arn, &shard.shard_id).await
                        {
                            report(passed, line);
                        }
                    }
                }
                Err(discovery::DiscoveryError::Cancelled) => report(
                    false,
                    format!(
                        "table {}: no answer within {} s",
                        table.name,
                        (limit * 2).as_secs()
                    ),
                ),
                Err(discovery::DiscoveryError::Aws { call, message }) => report(
                    false,
                    format!("dynamodb:{call} on table {}: {message}", table.name),
                ),
                Err(discovery::DiscoveryError::NoStream { .. })
                    if config.sync_mode_for(&table.name) == crate::config::SyncMode::Snapshot =>
                {
                    report(
                        true,
                        format!(
                            "table {}: no stream (sync_mode snapshot needs none)",
                            table.name
                        ),
                    )
                }
                Err(e) => report(false, format!("table {}: {e}", table.name)),
            }
            if config.scans(&table.name) {
                let (passed, line) = probe_scan(&aws.dynamodb, &table.name).await;
                report(passed, line);
            }
        }
    }
    let security =
        match kafka::security::security(&config, aws.as_ref(), None, &cancel, &background).await {
            Ok(s) => s,
            Err(e) => {
                report(false, e.to_string());
                timer.abort();
                cancel.cancel();
                return false;
            }
        };
    if let Some(tls) = &security.tls {
        for server in &config.kafka.bootstrap_servers {
            match kafka::tls::handshake(tls.clone(), server, limit).await {
                Ok(cert) if cert.days_left < 0 => report(
                    false,
                    format!(
                        "kafka TLS {server}: certificate {} expired {}",
                        cert.subject, cert.not_after
                    ),
                ),
                Ok(cert) => report(
                    true,
                    format!(
                        "kafka TLS {server}: handshake ok, certificate {} expires {} ({} days)",
                        cert.subject, cert.not_after, cert.days_left
                    ),
                ),
                Err(e) => report(false, format!("kafka.tls: {server}: {e}")),
            }
        }
    }
    match Kafka::connect_once(&config.kafka, &security).await {
        Ok(session) => {
            if let (Some(sasl), Some(login)) = (&security.sasl, &config.kafka.sasl) {
                let who = match &login.username {
                    Some(user) => format!(" as {user}"),
                    None => String::new(),
                };
                report(
                    true,
                    format!(
                        "kafka SASL {}{who}: login accepted by {}",
                        sasl.mechanism(),
                        config.kafka.bootstrap_servers.join(",")
                    ),
                );
            }
            report(
                true,
                format!("kafka {}", config.kafka.bootstrap_servers.join(",")),
            );
            let client = session.client().1;
            let topics = client.list_topics().await;
            for table in &config.tables {
                let topic = config.topic_for(table);
                match &topics {
                    Err(e) => report(false, format!("topic {topic}: cannot list topics: {e}")),
                    Ok(list) => match list.iter().find(|t| t.name == topic) {
                        Some(t) => report(
                            true,
                            format!("topic {topic}: {} partition(s)", t.partitions.len()),
                        ),
                        None => match config.kafka.create_topics {
                            Some(ct) => report(
                                true,
                                format!(
                                    "topic {topic}: missing; will be created with {} partition(s)",
                                    ct.partitions
                                ),
                            ),
                            None => report(
                                false,
                                format!(
                                    "topic {topic}: missing; create it or set kafka.create_topics"
                                ),
                            ),
                        },
                    },
                }
            }
        }
        Err(e) => report(false, e.to_string()),
    }
    timer.abort();
    cancel.cancel();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        let doc = serde_json::json!({
            "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1"},
            "tables": [{"name": "orders"}],
            "kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
            "checkpoint": {"dir": dir}
        });
        Config::parse(&doc.to_string()).unwrap()
    }

    /// A start-up failure is a failure (exit 1) even when a signal arrived meanwhile; only a
    /// start that shutdown interrupted is a clean stop.
    #[tokio::test]
    async fn a_start_up_error_is_not_hidden_by_a_signal() {
        let tmp = tempfile::tempdir().unwrap();
        let _other = FileStore::open(tmp.path()).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let result = run_until(config(tmp.path()), cancel, CancellationToken::new()).await;
        assert!(
            matches!(result, Err(Error::CheckpointInUse { .. })),
            "{result:?}"
        );

        // Interrupted while waiting for an unreachable Kafka: a clean stop.
        let free = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let stopper = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                cancel.cancel();
            })
        };
        let result = run_until(config(free.path()), cancel, CancellationToken::new()).await;
        stopper.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    /// A table task that runs until `cancel`.
    fn a_table_until(cancel: &CancellationToken) -> Supervised {
        let mut tables = JoinSet::new();
        let cancel = cancel.clone();
        tables.spawn(async move {
            cancel.cancelled().await;
            ("t".to_owned(), Ok(()))
        });
        Supervised {
            tables,
            pipeline: None,
            reload: None,
        }
    }

    /// A reload changes only what it can apply live; every other key is named.
    #[test]
    fn a_reload_names_the_keys_that_need_a_restart() {
        let old = serde_json::json!({
            "aws": {"region": "us-east-1"},
            "tables": [{"name": "a"}],
            "kafka": {"bootstrap_servers": ["k:9092"], "tombstones": true},
            "checkpoint": {"dir": "/x"}
        });
        let mut new = old.clone();
        new["tables"] = serde_json::json!([{"name": "a"}, {"name": "b"}]);
        assert!(changed_keys(Some(&old), &new).is_empty());
        new["kafka"]["tombstones"] = false.into();
        new["shutdown_timeout_ms"] = 5.into();
        assert_eq!(
            changed_keys(Some(&old), &new),
            ["kafka.tombstones", "shutdown_timeout_ms"]
        );
    }

    /// A background task (partition producer, credential refresher) that dies stops the
    /// pipeline with an error naming it, so the process exits 1 and systemd restarts it.
    #[tokio::test]
    async fn a_dead_background_task_fails_the_pipeline() {
        let (background, watch) = Background::new();
        let cancel = CancellationToken::new();
        let tables = a_table_until(&cancel);
        background.spawn("credential refresher".into(), async {
            panic!("refresher bug");
        });
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            supervise(
                tables,
                watch,
                cancel.clone(),
                CancellationToken::new(),
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("the pipeline stops");
        let e = result.unwrap_err().to_string();
        assert!(
            e.contains("credential refresher") && e.contains("refresher bug"),
            "{e}"
        );
        assert!(cancel.is_cancelled(), "the tables were told to stop");

        // A task that returns while the pipeline runs is as fatal as a panic.
        let (background, watch) = Background::new();
        let cancel = CancellationToken::new();
        let tables = a_table_until(&cancel);
        background.spawn("kafka producer t/0".into(), async {});
        let result = supervise(
            tables,
            watch,
            cancel,
            CancellationToken::new(),
            Duration::from_secs(5),
        )
        .await;
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("kafka producer t/0"));
    }
}
