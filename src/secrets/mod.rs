//! `${...}` references in the config, resolved before anything connects
//! ([`load_config`]), and `kafka.sasl`'s again after Kafka refused a login
//! ([`SaslResolver`]).
//!
//! ```text
//! config file ─▶ env overrides ─▶ find ${...}
//!   1. ${env:}, ${file:}             anywhere                 (no AWS call)
//!   2. ${secretsmanager:} in aws.assume_role                  base credentials
//!   3. ${secretsmanager:} elsewhere  after assuming the role  role credentials
//! ─▶ Config (values in place; kafka.sasl's templates kept for rotation)
//! ```
//!
//! A value is never logged, written, or put in an error message: errors name the key path,
//! the secret id and the AWS error code.

pub mod source;
pub mod template;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use source::{LookupError, SecretSource, SecretsManager};
pub use template::{Part, Reference, Template};

use crate::aws::{base_config, RoleAssumer};
use crate::config::{defaults, AwsConfig, Config, Secret};
use crate::error::{ConfigError, Error};
use crate::kafka::session::{CredentialsFuture, SaslCredentials};

/// How many references the config held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReferenceCounts {
    /// Every `${...}` resolved.
    pub total: usize,
    /// Those read from Secrets Manager.
    pub secrets_manager: usize,
    /// Each secret read, once: (secret id, the first key path that names it).
    pub secrets: Vec<(String, String)>,
}

/// `kafka.sasl.username` and `password` as written, when either holds a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslTemplates {
    /// The user name: a template, or the value as written.
    pub username: Field,
    /// The password: a template, or the value as written.
    pub password: Field,
}

/// A config string: as written, or with references.
#[derive(Clone, PartialEq, Eq)]
pub enum Field {
    /// No reference.
    Fixed(Secret),
    /// To be resolved each time.
    Template(Template),
}

impl std::fmt::Debug for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(_) => f.write_str("Fixed(** redacted **)"),
            Self::Template(t) => write!(f, "Template({})", t.key),
        }
    }
}

/// Reads a config file, applies the environment overrides, resolves every `${...}`
/// reference (calling STS and Secrets Manager when the references need them), then parses
/// and validates the result. A reference that cannot be resolved is a [`ConfigError`]
/// (exit status 2) naming the key path, the secret id and the AWS error code.
pub async fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    load_text(&text, &|variable| std::env::var_os(variable)).await
}

/// [`load_config`] of a document's text, with `env` for environment overrides and
/// `${env:...}`.
pub async fn load_text(
    text: &str,
    env: &(dyn Fn(&str) -> Option<OsString> + Sync),
) -> Result<Config, ConfigError> {
    let document = Config::document_with_env(text, env)?;
    let templates = template::find(&document)?;
    if templates.is_empty() {
        return Config::parse_with_env(text, env);
    }
    let deadline = Duration::from_millis(defaults::SECRETS_RESOLVE_TIMEOUT_MS);
    match tokio::time::timeout(deadline, resolve_document(document, templates, env)).await {
        Ok(result) => result,
        Err(_) => Err(ConfigError::Invalid {
            key: "(secrets)".into(),
            message: format!(
                "resolving the config's references took longer than {} s (STS or Secrets Manager unreachable or throttling); check aws.endpoint_url, the network and the role",
                deadline.as_secs()
            ),
        }),
    }
}

/// The string `t` stands for, reading Secrets Manager through `source`.
pub async fn render(t: &Template, source: &dyn SecretSource) -> Result<String, ConfigError> {
    let env = |variable: &str| std::env::var_os(variable);
    Values::new(&env).render(t, Some(source)).await
}

/// The config with `${env:}` and `${file:}` resolved and `${secretsmanager:}` references
/// left as written, with every template found: for commands that describe what the config
/// needs (`integration policy`) without calling AWS.
pub async fn load_unresolved(
    text: &str,
    env: &(dyn Fn(&str) -> Option<OsString> + Sync),
) -> Result<(Config, Vec<Template>), ConfigError> {
    let mut document = Config::document_with_env(text, env)?;
    let templates = template::find(&document)?;
    let mut values = Values::new(env);
    let local: Vec<&Template> = templates
        .iter()
        .filter(|t| !t.references().any(Reference::is_secrets_manager))
        .collect();
    values.fill(&mut document, &local, None).await?;
    let config = Config::from_document(document).map_err(|e| redact(e, &values.resolved))?;
    Ok((config, templates))
}

async fn resolve_document(
    mut document: Value,
    templates: Vec<Template>,
    env: &(dyn Fn(&str) -> Option<OsString> + Sync),
) -> Result<Config, ConfigError> {
    let cancel = CancellationToken::new();
    let mut values = Values::new(env);
    let (local, remote): (Vec<&Template>, Vec<&Template>) = templates
        .iter()
        .partition(|t| !t.references().any(Reference::is_secrets_manager));
    values.fill(&mut document, &local, None).await?;
    if let Some(t) = remote
        .iter()
        .find(|t| t.key.starts_with("aws.") && !t.key.starts_with("aws.assume_role."))
    {
        return Err(ConfigError::Invalid {
            key: t.key.clone(),
            message: "a ${secretsmanager:} reference cannot be used here: this value is needed to reach Secrets Manager; use ${env:NAME} or ${file:/path}".into(),
        });
    }
    let (before_role, after_role): (Vec<&Template>, Vec<&Template>) = remote
        .into_iter()
        .partition(|t| t.key.starts_with("aws.assume_role."));
    if !before_role.is_empty() || !after_role.is_empty() {
        let base = base_config(&aws_section(&document)?).await;
        let base_source = SecretsManager::new(&base, cancel.clone());
        values
            .fill(&mut document, &before_role, Some(&base_source))
            .await?;
        if let Some(first) = after_role.first() {
            let aws = aws_section(&document)?;
            let sdk = match &aws.assume_role {
                None => base,
                Some(role) => {
                    let credentials = RoleAssumer::new(role.clone(), &base)
                        .assume(&AtomicU64::new(0))
                        .await
                        .map_err(|e| {
                            let (secret_id, _) = first_secret(first);
                            ConfigError::Secret {
                                key: first.key.clone(),
                                secret_id,
                                code: "AssumeRole".into(),
                                message: format!(
                                    "the role is assumed to read this secret, and that failed: {e}"
                                ),
                            }
                        })?;
                    base.to_builder()
                        .credentials_provider(SharedCredentialsProvider::new(credentials))
                        .build()
                }
            };
            let role_source = SecretsManager::new(&sdk, cancel.clone());
            values
                .fill(&mut document, &after_role, Some(&role_source))
                .await?;
        }
    }
    let mut config = Config::from_document(document).map_err(|e| redact(e, &values.resolved))?;
    config.references = ReferenceCounts {
        total: templates.iter().map(|t| t.references().count()).sum(),
        secrets_manager: templates
            .iter()
            .flat_map(Template::references)
            .filter(|r| r.is_secrets_manager())
            .count(),
        secrets: {
            let mut seen: Vec<(String, String)> = Vec::new();
            for t in &templates {
                for r in t.references() {
                    if let Reference::SecretsManager { secret_id, .. } = r {
                        if !seen.iter().any(|(id, _)| id == secret_id) {
                            seen.push((secret_id.clone(), t.key.clone()));
                        }
                    }
                }
            }
            seen
        },
    };
    let field = |key: &str, written: Option<&str>| {
        templates
            .iter()
            .find(|t| t.key == key)
            .map(|t| Field::Template(t.clone()))
            .unwrap_or_else(|| Field::Fixed(Secret::new(written.unwrap_or_default())))
    };
    if let Some(sasl) = &config.kafka.sasl {
        if templates
            .iter()
            .any(|t| t.key == "kafka.sasl.username" || t.key == "kafka.sasl.password")
        {
            config.sasl_templates = Some(SaslTemplates {
                username: field("kafka.sasl.username", sasl.username.as_deref()),
                password: field(
                    "kafka.sasl.password",
                    sasl.password.as_ref().map(Secret::expose),
                ),
            });
        }
    }
    Ok(config)
}

/// The `aws` section alone (region, endpoint, role), for the calls that resolve secrets.
fn aws_section(document: &Value) -> Result<AwsConfig, ConfigError> {
    let section = document.get("aws").cloned().unwrap_or(Value::Null);
    serde_path_to_error::deserialize(section).map_err(|e| ConfigError::Parse {
        path: format!("aws.{}", e.path()),
        message: e.into_inner().to_string(),
    })
}

fn first_secret(t: &Template) -> (String, Option<String>) {
    t.references()
        .find_map(|r| match r {
            Reference::SecretsManager {
                secret_id,
                json_key,
            } => Some((secret_id.clone(), json_key.clone())),
            _ => None,
        })
        .unwrap_or_default()
}

/// A parse or validation error of the resolved document could quote a resolved value:
/// every value of four characters or more is replaced by `** redacted **`.
fn redact(error: ConfigError, values: &[String]) -> ConfigError {
    let clean = |mut message: String| {
        for v in values.iter().filter(|v| v.chars().count() >= 4) {
            message = message.replace(v.as_str(), "** redacted **");
        }
        message
    };
    match error {
        ConfigError::Parse { path, message } => ConfigError::Parse {
            path,
            message: clean(message),
        },
        ConfigError::Invalid { key, message } => ConfigError::Invalid {
            key,
            message: clean(message),
        },
        other => other,
    }
}

/// Resolves references, reading each secret once per round.
struct Values<'e> {
    env: &'e (dyn Fn(&str) -> Option<OsString> + Sync),
    secrets: HashMap<String, Secret>,
    /// Every string [`Values::fill`] put into a document (to keep them out of errors).
    resolved: Vec<String>,
}

impl<'e> Values<'e> {
    fn new(env: &'e (dyn Fn(&str) -> Option<OsString> + Sync)) -> Self {
        Self {
            env,
            secrets: HashMap::new(),
            resolved: Vec::new(),
        }
    }

    /// Renders each of `templates` and puts the result into `document` at its key.
    async fn fill(
        &mut self,
        document: &mut Value,
        templates: &[&Template],
        source: Option<&dyn SecretSource>,
    ) -> Result<(), ConfigError> {
        for t in templates {
            let value = self.render(t, source).await?;
            self.resolved.push(value.clone());
            template::set(document, &t.key, value);
        }
        Ok(())
    }

    /// The string `t` stands for. `source` reads Secrets Manager (`None`: the template has
    /// no such reference).
    async fn render(
        &mut self,
        t: &Template,
        source: Option<&dyn SecretSource>,
    ) -> Result<String, ConfigError> {
        let mut out = String::new();
        for part in &t.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Ref(r) => out.push_str(self.value(&t.key, r, source).await?.expose()),
            }
        }
        Ok(out)
    }

    async fn field(
        &mut self,
        field: &Field,
        source: &dyn SecretSource,
    ) -> Result<Secret, ConfigError> {
        match field {
            Field::Fixed(v) => Ok(v.clone()),
            Field::Template(t) => self.render(t, Some(source)).await.map(Secret::new),
        }
    }

    async fn value(
        &mut self,
        key: &str,
        reference: &Reference,
        source: Option<&dyn SecretSource>,
    ) -> Result<Secret, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        match reference {
            Reference::Env(name) => match (self.env)(name) {
                None => Err(invalid(format!(
                    "${{env:{name}}}: the environment variable {name} is not set"
                ))),
                Some(value) => value.into_string().map(Secret::new).map_err(|_| {
                    invalid(format!(
                        "${{env:{name}}}: the environment variable {name} is not UTF-8"
                    ))
                }),
            },
            Reference::File(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| invalid(format!("${{file:{path}}}: cannot read the file: {e}")))?;
                let text = text
                    .strip_suffix("\r\n")
                    .or_else(|| text.strip_suffix('\n'))
                    .unwrap_or(&text);
                Ok(Secret::new(text))
            }
            Reference::SecretsManager {
                secret_id,
                json_key,
            } => {
                let fail = |code: &str, message: String| ConfigError::Secret {
                    key: key.to_owned(),
                    secret_id: secret_id.clone(),
                    code: code.to_owned(),
                    message,
                };
                let whole = match self.secrets.get(secret_id) {
                    Some(v) => v.clone(),
                    None => {
                        let source = source.ok_or_else(|| {
                            fail("Internal", "no Secrets Manager client here".into())
                        })?;
                        let v = source
                            .secret_string(secret_id)
                            .await
                            .map_err(|e| fail(&e.code, e.message))?;
                        self.secrets.insert(secret_id.clone(), v.clone());
                        v
                    }
                };
                match json_key {
                    None => Ok(whole),
                    Some(json_key) => json_value(whole.expose(), json_key)
                        .map_err(|(code, message)| fail(code, message)),
                }
            }
        }
    }
}

/// One top-level key of a JSON secret, as a string (numbers and booleans as written).
fn json_value(secret: &str, json_key: &str) -> Result<Secret, (&'static str, String)> {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(secret) else {
        return Err((
            "NotJson",
            format!("the secret is not a JSON object, so #{json_key} cannot be read from it; drop #{json_key} to use the whole secret"),
        ));
    };
    match map.get(json_key) {
        Some(Value::String(s)) => Ok(Secret::new(s.clone())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Secret::new(v.to_string())),
        Some(_) => Err((
            "NotAString",
            format!("the secret's key {json_key} holds an object, array or null, not a string"),
        )),
        None => {
            let keys: BTreeSet<&str> = map.keys().map(String::as_str).collect();
            Err((
                "MissingJsonKey",
                format!(
                    "the secret has no key {json_key} (its keys: {})",
                    keys.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    }
}

/// `kafka.sasl`'s user name and password, resolved again each time they are asked for:
/// a rotated secret (or `${file:}`, `${env:}`) is picked up at the next login.
#[derive(Debug, Clone)]
pub struct SaslResolver {
    templates: SaslTemplates,
    source: Arc<dyn SecretSource>,
}

impl SaslResolver {
    /// Resolves `templates` with `source` (Secrets Manager under the daemon's role).
    pub fn new(templates: SaslTemplates, source: Arc<dyn SecretSource>) -> Self {
        Self { templates, source }
    }

    /// The current user name and password.
    pub async fn resolve(&self) -> Result<(String, Secret), ConfigError> {
        let env = |variable: &str| std::env::var_os(variable);
        let mut values = Values::new(&env);
        let username = values
            .field(&self.templates.username, self.source.as_ref())
            .await?;
        let password = values
            .field(&self.templates.password, self.source.as_ref())
            .await?;
        Ok((username.expose().to_owned(), password))
    }
}

impl SaslCredentials for SaslResolver {
    fn current(&self) -> CredentialsFuture {
        let this = self.clone();
        Box::pin(async move { this.resolve().await.map_err(Error::Config) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Secrets in a map; counts reads.
    #[derive(Default)]
    struct MapSource {
        secrets: Mutex<HashMap<String, String>>,
        reads: Mutex<Vec<String>>,
    }

    impl std::fmt::Debug for MapSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("MapSource")
        }
    }

    impl MapSource {
        fn with(pairs: &[(&str, &str)]) -> Arc<Self> {
            let s = Self::default();
            for (k, v) in pairs {
                s.secrets
                    .lock()
                    .unwrap()
                    .insert(k.to_string(), v.to_string());
            }
            Arc::new(s)
        }
    }

    impl SecretSource for MapSource {
        fn secret_string<'a>(&'a self, secret_id: &'a str) -> source::LookupFuture<'a> {
            Box::pin(async move {
                self.reads.lock().unwrap().push(secret_id.to_owned());
                self.secrets
                    .lock()
                    .unwrap()
                    .get(secret_id)
                    .map(|v| Secret::new(v.clone()))
                    .ok_or(LookupError {
                        code: "ResourceNotFoundException".into(),
                        message: "Secrets Manager can't find the specified secret.".into(),
                    })
            })
        }
    }

    fn template(key: &str, text: &str) -> Template {
        Template::parse(key, text).unwrap().unwrap()
    }

    async fn render(text: &str, source: &MapSource) -> Result<String, ConfigError> {
        let env = |v: &str| (v == "USER_NAME").then(|| OsString::from("alice"));
        Values::new(&env)
            .render(&template("kafka.sasl.password", text), Some(source))
            .await
    }

    #[tokio::test]
    async fn whole_secrets_json_keys_env_and_escapes() {
        let source = MapSource::with(&[
            ("plain", "s3cret"),
            (
                "prod/kafka",
                r#"{"api_key":"K","api_secret":"S","port":9093,"tls":true}"#,
            ),
        ]);
        assert_eq!(
            render("${secretsmanager:plain}", &source).await.unwrap(),
            "s3cret"
        );
        assert_eq!(
            render(
                "${secretsmanager:prod/kafka#api_key}:${secretsmanager:prod/kafka#api_secret}:${secretsmanager:prod/kafka#port}:${secretsmanager:prod/kafka#tls}",
                &source
            )
            .await
            .unwrap(),
            "K:S:9093:true"
        );
        assert_eq!(
            source
                .reads
                .lock()
                .unwrap()
                .iter()
                .filter(|r| *r == "prod/kafka")
                .count(),
            1,
            "one read per secret per round"
        );
        assert_eq!(
            render("u=${env:USER_NAME} $${env:USER_NAME}", &source)
                .await
                .unwrap(),
            "u=alice ${env:USER_NAME}"
        );
    }

    #[tokio::test]
    async fn errors_name_the_key_the_secret_and_the_code_never_the_value() {
        let source = MapSource::with(&[
            ("prod/kafka", r#"{"api_secret":"TOPSECRET"}"#),
            ("raw", "TOPSECRET"),
        ]);
        for (text, code) in [
            ("${secretsmanager:missing}", "ResourceNotFoundException"),
            ("${secretsmanager:prod/kafka#nope}", "MissingJsonKey"),
            ("${secretsmanager:raw#api_secret}", "NotJson"),
        ] {
            let e = render(text, &source).await.unwrap_err();
            let shown = e.to_string();
            assert!(matches!(e, ConfigError::Secret { .. }), "{shown}");
            assert!(
                shown.starts_with("config key kafka.sasl.password: secret "),
                "{shown}"
            );
            assert!(shown.contains(code), "{shown}");
            assert!(!shown.contains("TOPSECRET"), "{shown}");
        }
        let e = render("${secretsmanager:prod/kafka#nope}", &source)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("its keys: api_secret"), "{e}");
        let e = render("${env:NOT_SET_ANYWHERE}", &source)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("NOT_SET_ANYWHERE is not set"), "{e}");
    }

    #[tokio::test]
    async fn files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "pa ss\n\n").unwrap();
        let text = format!("${{file:{}}}", path.display());
        assert_eq!(
            render(&text, &MapSource::default()).await.unwrap(),
            "pa ss\n"
        );
        let e = render("${file:/nonexistent/dynamodb-cdc}", &MapSource::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot read the file"), "{e}");
    }

    #[tokio::test]
    async fn the_sasl_resolver_reads_a_rotated_secret_again() {
        let source = MapSource::with(&[("k", r#"{"u":"alice","p":"one"}"#)]);
        let resolver = SaslResolver::new(
            SaslTemplates {
                username: Field::Template(template("kafka.sasl.username", "${secretsmanager:k#u}")),
                password: Field::Template(template("kafka.sasl.password", "${secretsmanager:k#p}")),
            },
            source.clone(),
        );
        let (user, password) = resolver.resolve().await.unwrap();
        assert_eq!((user.as_str(), password.expose()), ("alice", "one"));
        source
            .secrets
            .lock()
            .unwrap()
            .insert("k".into(), r#"{"u":"alice","p":"two"}"#.into());
        let (_, password) = resolver.current().await.unwrap();
        assert_eq!(password.expose(), "two");
        assert!(!format!("{resolver:?}").contains("alice"));
    }

    fn doc(sasl: &str, assume_role: &str) -> String {
        format!(
            r#"{{"aws": {{"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1"{assume_role}}},
               "tables": [{{"name": "orders"}}],
               "kafka": {{"bootstrap_servers": ["127.0.0.1:9092"], "sasl": {sasl}}},
               "checkpoint": {{"dir": "/tmp/x"}}}}"#
        )
    }

    #[tokio::test]
    async fn env_and_file_references_need_no_aws_and_sasl_templates_are_kept() {
        let env = |v: &str| match v {
            "KAFKA_USER" => Some(OsString::from("alice")),
            "KAFKA_PASSWORD" => Some(OsString::from("pw-from-env")),
            _ => None,
        };
        let text = doc(
            r#"{"mechanism": "SCRAM-SHA-256", "username": "${env:KAFKA_USER}", "password": "${env:KAFKA_PASSWORD}"}"#,
            "",
        );
        let config = load_text(&text, &env).await.unwrap();
        let sasl = config.kafka.sasl.as_ref().unwrap();
        assert_eq!(sasl.username.as_deref(), Some("alice"));
        assert_eq!(sasl.password.as_ref().unwrap().expose(), "pw-from-env");
        assert_eq!(
            config.references,
            ReferenceCounts {
                total: 2,
                secrets_manager: 0,
                secrets: vec![],
            }
        );
        let templates = config.sasl_templates.as_ref().unwrap();
        assert!(matches!(templates.username, Field::Template(_)));
        assert!(!format!("{config:?}").contains("pw-from-env"));
    }

    #[tokio::test]
    async fn a_secrets_manager_reference_in_the_aws_endpoint_is_refused() {
        let text = r#"{"aws": {"region": "${secretsmanager:r}"}, "tables": [{"name": "orders"}],
            "kafka": {"bootstrap_servers": ["127.0.0.1:9092"]}, "checkpoint": {"dir": "/tmp/x"}}"#;
        let e = load_text(text, &|_| None).await.unwrap_err().to_string();
        assert!(e.starts_with("config key aws.region:"), "{e}");
        assert!(e.contains("${env:NAME}"), "{e}");
    }

    #[tokio::test]
    async fn a_resolved_value_is_not_quoted_by_a_parse_error() {
        let env = |v: &str| (v == "MECH").then(|| OsString::from("HUNTER2-NOT-A-MECHANISM"));
        let text = doc(r#"{"mechanism": "${env:MECH}"}"#, "");
        let e = load_text(&text, &env).await.unwrap_err().to_string();
        assert!(e.contains("kafka.sasl.mechanism"), "{e}");
        assert!(!e.contains("HUNTER2"), "{e}");
    }

    #[test]
    fn a_document_without_references_loads_as_before() {
        let text = doc(
            r#"{"mechanism": "PLAIN", "username": "u", "password": "a$b{c}"}"#,
            "",
        );
        let config = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(load_text(&text, &|_| None))
            .unwrap();
        assert!(config.sasl_templates.is_none());
        assert_eq!(config.references, ReferenceCounts::default());
    }
}
