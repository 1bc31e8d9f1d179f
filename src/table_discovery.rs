//! Table discovery: which tables the rules of `tables` select now.
//!
//! ```text
//! ListTables (every page) -> name rule (include/exclude) -> DescribeTable (stream, ARN)
//!   -> ListTagsOfResource (only when the rule lists tags) -> override (topic, sync_mode,
//!   start_position) -> topic collisions -> a Round: every table, selected or why not
//! ```
//!
//! A table listed by name in the config is never taken by a rule. The first rule whose
//! patterns match a name decides about it. A selected table is started by
//! [`crate::app`] (with its sync mode), one that disappears from a round is drained and
//! stopped; `dynamodb-cdc tables` prints a round and exits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::aws::retrying;
use crate::config::{Config, SyncMode, TableConfig, TableRule};
use crate::discovery::{aws_error, DiscoveryError};
use crate::error::AwsErrorKind;

/// At most this many tables are described (and their tags read) at once.
const CONCURRENT_DESCRIBES: usize = 8;

/// What a round says about one table of the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The table.
    pub table: String,
    /// Selected or not, and why.
    pub verdict: Verdict,
}

/// A table's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Listed by name in the config (the rules do not apply to it).
    Named,
    /// A rule selects it: its settings (topic resolved, `discovered` set) and its stream.
    Selected {
        /// How the pipeline captures it.
        config: TableConfig,
        /// Its stream's view type (`NEW_AND_OLD_IMAGES`, ...), or `none` for a table whose
        /// sync mode needs no stream.
        stream: String,
    },
    /// Not captured.
    Skipped {
        /// Why (for the log and `dynamodb-cdc tables`).
        reason: String,
        /// The command that fixes it, when one does (a stream to enable).
        fix: Option<String>,
        /// A rule's patterns and tags matched: the table would be captured once fixed.
        matched: bool,
    },
}

/// One listing of the account's tables, judged by the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Every table ListTables returned, in its order.
    pub entries: Vec<Entry>,
}

impl Round {
    /// The tables the rules select.
    pub fn selected(&self) -> impl Iterator<Item = &TableConfig> {
        self.entries.iter().filter_map(|e| match &e.verdict {
            Verdict::Selected { config, .. } => Some(config),
            _ => None,
        })
    }

    /// The entry of `table`, if ListTables returned it.
    pub fn entry(&self, table: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.table == table)
    }

    /// Skips selected tables whose topic collides with a named table's or with one kept
    /// before it (Kafka treats `.` and `_` alike). Tables in `running` are kept first, so a
    /// new table never takes a running one's topic; the others by name.
    pub fn drop_collisions(&mut self, config: &Config, running: &HashSet<String>) {
        let mut order: Vec<usize> = (0..self.entries.len())
            .filter(|&i| matches!(self.entries[i].verdict, Verdict::Selected { .. }))
            .collect();
        order.sort_by_key(|&i| {
            let t = &self.entries[i].table;
            (!running.contains(t), t.clone())
        });
        let mut taken: HashMap<String, String> = config
            .tables
            .iter()
            .filter(|t| !t.discovered)
            .map(|t| (collision_key(&config.topic_for(t)), t.name.clone()))
            .collect();
        for i in order {
            let Verdict::Selected { config: table, .. } = &self.entries[i].verdict else {
                continue;
            };
            let topic = config.topic_for(table);
            let key = collision_key(&topic);
            if let Some(owner) = taken.get(&key) {
                self.entries[i].verdict = Verdict::Skipped {
                    reason: format!(
                        "its topic {topic:?} collides with the topic of table {owner} (Kafka treats . and _ alike); give one of them its own topic with an override"
                    ),
                    fix: None,
                    matched: true,
                };
            } else {
                taken.insert(key, self.entries[i].table.clone());
            }
        }
    }
}

fn collision_key(topic: &str) -> String {
    topic.replace('.', "_")
}

/// ListTables, following `LastEvaluatedTableName` through every page (100 names a page).
pub async fn list_tables(
    dynamodb: &aws_sdk_dynamodb::Client,
    cancel: &CancellationToken,
) -> Result<Vec<String>, DiscoveryError> {
    let mut names = Vec::new();
    let mut start: Option<String> = None;
    loop {
        let out = retrying("ListTables", cancel, || {
            dynamodb
                .list_tables()
                .limit(100)
                .set_exclusive_start_table_name(start.clone())
                .send()
        })
        .await
        .map_err(|f| aws_error("ListTables", f))?;
        names.extend(out.table_names().iter().cloned());
        match out.last_evaluated_table_name() {
            Some(last) if Some(last) != start.as_deref() => start = Some(last.to_owned()),
            _ => break,
        }
    }
    Ok(names)
}

/// Lists the account's tables and judges each by `config`'s rules. A call that fails for
/// good fails the round (ListTables), or skips that one table with the reason (its
/// DescribeTable or ListTagsOfResource).
pub async fn discover(
    dynamodb: &aws_sdk_dynamodb::Client,
    config: &Arc<Config>,
    cancel: &CancellationToken,
) -> Result<Round, DiscoveryError> {
    let names = list_tables(dynamodb, cancel).await?;
    let named: HashSet<&str> = config
        .tables
        .iter()
        .filter(|t| !t.discovered)
        .map(|t| t.name.as_str())
        .collect();
    let mut verdicts: Vec<Option<Verdict>> = vec![None; names.len()];
    let mut pending = Vec::new();
    let rules: Vec<_> = config
        .table_rules
        .iter()
        .map(TableRule::selection)
        .collect();
    for (i, name) in names.iter().enumerate() {
        if named.contains(name.as_str()) {
            verdicts[i] = Some(Verdict::Named);
            continue;
        }
        match rules.iter().position(|r| r.selects_name(name)) {
            Some(r) => pending.push((i, r)),
            None => {
                verdicts[i] = Some(Verdict::Skipped {
                    reason: rules
                        .first()
                        .and_then(|r| r.why_not(name, None))
                        .unwrap_or_else(|| "no rule of tables matches".into()),
                    fix: None,
                    matched: false,
                })
            }
        }
    }
    // DescribeTable (and tags) for the names a rule matched, a few at once.
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = pending.into_iter();
    loop {
        while tasks.len() < CONCURRENT_DESCRIBES {
            let Some((i, rule)) = queue.next() else { break };
            let (dynamodb, config, cancel, name, selection) = (
                dynamodb.clone(),
                config.clone(),
                cancel.clone(),
                names[i].clone(),
                rules[rule].clone(),
            );
            tasks.spawn(async move {
                let rule = &config.table_rules[rule];
                let verdict = judge(&dynamodb, &config, rule, &selection, &name, &cancel).await;
                (i, verdict)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (i, verdict) = done.map_err(|e| DiscoveryError::Aws {
            call: "DescribeTable",
            message: format!("task failed: {e}"),
        })?;
        match verdict {
            Err(DiscoveryError::Cancelled) => return Err(DiscoveryError::Cancelled),
            Err(e) => {
                verdicts[i] = Some(Verdict::Skipped {
                    reason: e.to_string(),
                    fix: None,
                    matched: false,
                })
            }
            Ok(None) => {}
            Ok(Some(v)) => verdicts[i] = Some(v),
        }
    }
    Ok(Round {
        entries: names
            .into_iter()
            .zip(verdicts)
            // None: deleted between ListTables and DescribeTable.
            .filter_map(|(table, verdict)| verdict.map(|verdict| Entry { table, verdict }))
            .collect(),
    })
}

/// The verdict on one table whose name `rule` (compiled: `selection`) matched; `None` when
/// it no longer exists.
async fn judge(
    dynamodb: &aws_sdk_dynamodb::Client,
    config: &Config,
    rule: &TableRule,
    selection: &crate::selection::Selection,
    name: &str,
    cancel: &CancellationToken,
) -> Result<Option<Verdict>, DiscoveryError> {
    let out = match retrying("DescribeTable", cancel, || {
        dynamodb.describe_table().table_name(name).send()
    })
    .await
    {
        Ok(out) => out,
        Err(f) if f.kind == Some(AwsErrorKind::NotFound) => return Ok(None),
        Err(f) => return Err(aws_error("DescribeTable", f)),
    };
    let Some(desc) = out.table() else {
        return Ok(None);
    };
    if selection.needs_tags() {
        let arn = desc.table_arn().unwrap_or_default();
        let tags = list_tags(dynamodb, arn, cancel).await?;
        if let Some(reason) = selection.why_not(name, Some(&tags)) {
            return Ok(Some(Verdict::Skipped {
                reason,
                fix: None,
                matched: false,
            }));
        }
    }
    let chosen = rule.override_for(name);
    let sync_mode = chosen.and_then(|o| o.sync_mode);
    let template = chosen
        .and_then(|o| o.topic.as_deref())
        .unwrap_or(&config.kafka.topic_template);
    let topic = match config.topic_name_for(name, template) {
        Ok(t) => t,
        Err(reason) => {
            return Ok(Some(Verdict::Skipped {
                reason,
                fix: None,
                matched: true,
            }))
        }
    };
    let spec = desc.stream_specification();
    let enabled = spec.is_some_and(|s| s.stream_enabled()) && desc.latest_stream_arn().is_some();
    let view_type = spec
        .and_then(|s| s.stream_view_type())
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let needs_stream = sync_mode.unwrap_or(config.sync_mode) != SyncMode::Snapshot;
    if needs_stream && !enabled {
        return Ok(Some(Verdict::Skipped {
            reason: "the table has no stream enabled".into(),
            fix: Some(format!(
                "aws dynamodb update-table --table-name {name} --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"
            )),
            matched: true,
        }));
    }
    if needs_stream && view_type == "KEYS_ONLY" {
        return Ok(Some(Verdict::Skipped {
            reason: "its stream is KEYS_ONLY: change events need the item images".into(),
            fix: Some(format!(
                "aws dynamodb update-table --table-name {name} --stream-specification StreamEnabled=false && aws dynamodb update-table --table-name {name} --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"
            )),
            matched: true,
        }));
    }
    Ok(Some(Verdict::Selected {
        config: TableConfig {
            name: name.to_owned(),
            topic: Some(topic),
            sync_mode,
            start_position: chosen.and_then(|o| o.start_position),
            discovered: true,
        },
        stream: if needs_stream {
            view_type
        } else {
            "none".into()
        },
    }))
}

/// ListTagsOfResource, every page.
async fn list_tags(
    dynamodb: &aws_sdk_dynamodb::Client,
    arn: &str,
    cancel: &CancellationToken,
) -> Result<HashMap<String, String>, DiscoveryError> {
    let mut tags = HashMap::new();
    let mut token: Option<String> = None;
    loop {
        let out = retrying("ListTagsOfResource", cancel, || {
            dynamodb
                .list_tags_of_resource()
                .resource_arn(arn)
                .set_next_token(token.clone())
                .send()
        })
        .await
        .map_err(|f| aws_error("ListTagsOfResource", f))?;
        for tag in out.tags() {
            tags.insert(tag.key().to_owned(), tag.value().to_owned());
        }
        match out.next_token() {
            Some(next) if Some(next) != token.as_deref() => token = Some(next.to_owned()),
            _ => break,
        }
    }
    Ok(tags)
}

/// The tables with a directory in `checkpoint.dir` that a rule's patterns select (tags are
/// not read), not listed by name: what `status` adds to the named tables.
pub fn checkpointed_rule_tables(config: &Config) -> Vec<String> {
    if config.table_rules.is_empty() {
        return Vec::new();
    }
    let rules: Vec<_> = config
        .table_rules
        .iter()
        .map(TableRule::selection)
        .collect();
    let Ok(entries) = std::fs::read_dir(&config.checkpoint.dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && !config.tables.iter().any(|t| t.name == *n))
        .filter(|n| rules.iter().any(|r| r.selects_name(n)))
        .collect();
    names.sort();
    names
}

/// `dynamodb-cdc tables`: one line per table of `round` (JSON lines with `json`): table,
/// topic, sync mode, stream, and whether it is captured or why not; `streams` gives the
/// stream view type of the tables listed by name. Then a summary line (text only).
pub fn render(
    round: &Round,
    config: &Config,
    streams: &HashMap<String, String>,
    json: bool,
) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut json_rows = Vec::new();
    let (mut captured, mut named, mut matching, mut other) = (0, 0, 0, 0);
    let mut push =
        |table: &str, topic: &str, sync: &str, stream: &str, status: String, fix: Option<&str>| {
            json_rows.push(serde_json::json!({
                "table": table, "topic": topic, "sync_mode": sync, "stream": stream,
                "status": status, "fix": fix,
            }));
            let status = match fix {
                Some(fix) => format!("{status}; fix: {fix}"),
                None => status,
            };
            rows.push([
                table.into(),
                topic.into(),
                sync.into(),
                stream.into(),
                status,
            ]);
        };
    let listed: HashSet<&str> = round.entries.iter().map(|e| e.table.as_str()).collect();
    for t in config.tables.iter().filter(|t| !t.discovered) {
        if !listed.contains(t.name.as_str()) {
            named += 1;
            push(
                &t.name,
                &config.topic_for(t),
                config.sync_mode_for(&t.name).as_str(),
                "-",
                "listed by name, but ListTables does not return it (not found)".into(),
                None,
            );
        }
    }
    for e in &round.entries {
        match &e.verdict {
            Verdict::Named => {
                named += 1;
                let t = config
                    .tables
                    .iter()
                    .find(|t| t.name == e.table)
                    .expect("named");
                let stream = streams.get(&e.table).map_or("-", String::as_str);
                push(
                    &e.table,
                    &config.topic_for(t),
                    config.sync_mode_for(&e.table).as_str(),
                    stream,
                    "captured (listed by name)".into(),
                    None,
                );
            }
            Verdict::Selected { config: t, stream } => {
                captured += 1;
                let sync = t.sync_mode.unwrap_or(config.sync_mode);
                push(
                    &e.table,
                    &config.topic_for(t),
                    sync.as_str(),
                    stream,
                    "captured (a rule selects it)".into(),
                    None,
                );
            }
            Verdict::Skipped {
                reason,
                fix,
                matched,
            } => {
                if *matched {
                    matching += 1;
                } else {
                    other += 1;
                }
                push(
                    &e.table,
                    "-",
                    "-",
                    "-",
                    format!("skipped: {reason}"),
                    fix.as_deref(),
                );
            }
        }
    }
    if json {
        return json_rows.iter().map(|r| format!("{r}\n")).collect();
    }
    let header = ["TABLE", "TOPIC", "SYNC MODE", "STREAM", "STATUS"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter().zip(row) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(&row[4]);
        out.push('\n');
    }
    out.push_str(&format!(
        "{captured} selected by the rules, {named} listed by name, {matching} matching but not captured, {other} not selected\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rules: serde_json::Value) -> Config {
        Config::parse(
            &serde_json::json!({
                "aws": {"region": "us-east-1"},
                "kafka": {"bootstrap_servers": ["127.0.0.1:9092"]},
                "checkpoint": {"dir": "/tmp/x"},
                "tables": rules,
            })
            .to_string(),
        )
        .unwrap()
    }

    fn selected(table: &str, topic: &str) -> Entry {
        Entry {
            table: table.into(),
            verdict: Verdict::Selected {
                config: TableConfig {
                    name: table.into(),
                    topic: Some(topic.into()),
                    sync_mode: None,
                    start_position: None,
                    discovered: true,
                },
                stream: "NEW_AND_OLD_IMAGES".into(),
            },
        }
    }

    #[test]
    fn collisions_keep_named_then_running_tables_then_names_in_order() {
        let c = config(serde_json::json!([{"name": "orders"}, {"include": ["*"]}]));
        let mut round = Round {
            entries: vec![
                selected("b_x", "t.b_x"),
                selected("a.x", "t.b.x"),
                selected("orders2", "dynamodb.orders"),
                selected("z", "t.z"),
            ],
        };
        let running: HashSet<String> = ["b_x".to_owned()].into();
        round.drop_collisions(&c, &running);
        let kept: Vec<&str> = round.selected().map(|t| t.name.as_str()).collect();
        assert_eq!(kept, ["b_x", "z"]);
        let Verdict::Skipped { reason, .. } = &round.entry("a.x").unwrap().verdict else {
            panic!()
        };
        assert!(reason.contains("table b_x"), "{reason}");
        let Verdict::Skipped { reason, .. } = &round.entry("orders2").unwrap().verdict else {
            panic!()
        };
        assert!(reason.contains("table orders"), "{reason}");
        // Without a running table, the first name keeps the topic.
        let mut round = Round {
            entries: vec![selected("b_x", "t.b_x"), selected("a.x", "t.b.x")],
        };
        round.drop_collisions(&c, &HashSet::new());
        let kept: Vec<&str> = round.selected().map(|t| t.name.as_str()).collect();
        assert_eq!(kept, ["a.x"]);
    }
}
