//! `${...}` references inside config strings: parsing, and finding every string of a
//! config document that holds one.
//!
//! Grammar (inside any JSON string value):
//! - `${secretsmanager:<name or ARN>}`: the secret's whole SecretString;
//! - `${secretsmanager:<name or ARN>#<json key>}`: one top-level key of a JSON secret;
//! - `${env:NAME}`: an environment variable;
//! - `${file:/path}`: a file's content (one trailing newline removed);
//! - `$${`: a literal `${`.

use serde_json::Value;

use crate::error::ConfigError;

/// Where one reference's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// `${secretsmanager:id}` or `${secretsmanager:id#key}`.
    SecretsManager {
        /// Name or ARN.
        secret_id: String,
        /// The JSON key, when the secret is a JSON object.
        json_key: Option<String>,
    },
    /// `${env:NAME}`.
    Env(String),
    /// `${file:/path}`.
    File(String),
}

impl Reference {
    /// Whether resolving it calls Secrets Manager.
    pub fn is_secrets_manager(&self) -> bool {
        matches!(self, Self::SecretsManager { .. })
    }
}

/// One piece of a string: text as is, or a reference to be replaced by its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text (`$${` already turned into `${`).
    Text(String),
    /// A reference.
    Ref(Reference),
}

/// A config string with references, and the key path it sits at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Key path, e.g. `kafka.sasl.password` or `tables[0].name`.
    pub key: String,
    /// The string's pieces.
    pub parts: Vec<Part>,
}

impl Template {
    /// Parses `text` found at `key`. `None` when the string has neither a reference nor
    /// an escaped `$${` (it stays as written).
    pub fn parse(key: &str, text: &str) -> Result<Option<Self>, ConfigError> {
        if !text.contains("${") {
            return Ok(None);
        }
        let invalid = |message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                literal.push_str("${");
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(invalid(
                        "a reference `${` is not closed with `}` (write `$${` for a literal `${`)"
                            .into(),
                    ));
                };
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Ref(reference(&after[..end]).map_err(invalid)?));
                rest = &after[end + 1..];
            } else {
                literal.push('$');
                rest = &tail[1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Some(Self {
            key: key.to_owned(),
            parts,
        }))
    }

    /// The references, in order.
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
    }
}

fn reference(body: &str) -> Result<Reference, String> {
    let Some((scheme, rest)) = body.split_once(':') else {
        return Err(format!(
            "`${{{body}}}` is not a reference: write ${{secretsmanager:NAME}}, ${{secretsmanager:NAME#KEY}}, ${{env:NAME}} or ${{file:/path}} (or `$${{` for a literal `${{`)"
        ));
    };
    let empty = |what: &str| Err(format!("`${{{scheme}:}}` needs {what}"));
    match scheme {
        "secretsmanager" => {
            let (secret_id, json_key) = match rest.split_once('#') {
                Some((id, key)) => (id, Some(key)),
                None => (rest, None),
            };
            if secret_id.is_empty() {
                return empty("a secret name or ARN");
            }
            if json_key == Some("") {
                return Err(format!(
                    "`${{secretsmanager:{secret_id}#}}` has an empty JSON key: drop the `#` for the whole secret"
                ));
            }
            Ok(Reference::SecretsManager {
                secret_id: secret_id.to_owned(),
                json_key: json_key.map(str::to_owned),
            })
        }
        "env" if rest.is_empty() => empty("a variable name"),
        "env" => Ok(Reference::Env(rest.to_owned())),
        "file" if rest.is_empty() => empty("a file path"),
        "file" => Ok(Reference::File(rest.to_owned())),
        other => Err(format!(
            "unknown reference kind `{other}:`; use secretsmanager:, env: or file: (or `$${{` for a literal `${{`)"
        )),
    }
}

/// Every string of `document` that holds a reference or an escape, with its key path.
/// Object keys are not templates.
pub fn find(document: &Value) -> Result<Vec<Template>, ConfigError> {
    let mut found = Vec::new();
    walk(document, String::new(), &mut found)?;
    Ok(found)
}

fn walk(value: &Value, key: String, found: &mut Vec<Template>) -> Result<(), ConfigError> {
    match value {
        Value::String(text) => {
            if let Some(t) = Template::parse(&key, text)? {
                found.push(t);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{key}[{i}]"), found)?;
            }
        }
        Value::Object(map) => {
            for (name, item) in map {
                let path = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                walk(item, path, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Sets the string at `key` (a path [`find`] produced) to `value`.
pub fn set(document: &mut Value, key: &str, value: String) {
    let mut node = document;
    for segment in segments(key) {
        node = match segment {
            Segment::Name(name) => &mut node[name],
            Segment::Index(i) => &mut node[i],
        };
    }
    *node = Value::String(value);
}

enum Segment<'a> {
    Name(&'a str),
    Index(usize),
}

fn segments(key: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for dotted in key.split('.') {
        let (name, mut indexes) = match dotted.find('[') {
            Some(at) => (&dotted[..at], &dotted[at..]),
            None => (dotted, ""),
        };
        if !name.is_empty() {
            out.push(Segment::Name(name));
        }
        while let Some(close) = indexes.find(']') {
            if let Ok(i) = indexes[1..close].parse() {
                out.push(Segment::Index(i));
            }
            indexes = &indexes[close + 1..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(id: &str, key: Option<&str>) -> Part {
        Part::Ref(Reference::SecretsManager {
            secret_id: id.into(),
            json_key: key.map(Into::into),
        })
    }

    #[test]
    fn plain_strings_are_not_templates() {
        assert_eq!(Template::parse("k", "a $ b {c}").unwrap(), None);
    }

    #[test]
    fn parses_every_kind_and_the_escape() {
        let t = Template::parse(
            "k",
            "x${secretsmanager:prod/kafka#api_secret}-${secretsmanager:arn:aws:secretsmanager:eu-west-1:1:secret:a-Ab1}${env:HOME}${file:/run/s}$${lit}$5",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Text("x".into()),
                sm("prod/kafka", Some("api_secret")),
                Part::Text("-".into()),
                sm("arn:aws:secretsmanager:eu-west-1:1:secret:a-Ab1", None),
                Part::Ref(Reference::Env("HOME".into())),
                Part::Ref(Reference::File("/run/s".into())),
                Part::Text("${lit}$5".into()),
            ]
        );
    }

    #[test]
    fn an_escape_alone_is_a_template_without_references() {
        let t = Template::parse("k", "$${x}").unwrap().unwrap();
        assert_eq!(t.parts, vec![Part::Text("${x}".into())]);
        assert_eq!(t.references().count(), 0);
    }

    #[test]
    fn malformed_references_name_the_key() {
        for (text, needle) in [
            ("${secretsmanager:a", "not closed"),
            ("${vault:a}", "unknown reference kind `vault:`"),
            ("${nothing}", "is not a reference"),
            ("${secretsmanager:}", "secret name or ARN"),
            ("${secretsmanager:a#}", "empty JSON key"),
            ("${env:}", "variable name"),
            ("${file:}", "file path"),
        ] {
            let e = Template::parse("kafka.sasl.password", text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("config key kafka.sasl.password:"), "{e}");
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn find_and_set_use_the_same_key_paths() {
        let mut doc: Value = serde_json::json!({
            "kafka": {"sasl": {"password": "${env:P}"}, "bootstrap_servers": ["a:1", "${env:B}"]},
            "tables": [{"name": "t"}, {"name": "${env:T}"}],
            "n": 5
        });
        let found = find(&doc).unwrap();
        let keys: Vec<_> = found.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "kafka.bootstrap_servers[1]",
                "kafka.sasl.password",
                "tables[1].name"
            ]
        );
        for t in &found {
            set(&mut doc, &t.key, format!("set:{}", t.key));
        }
        assert_eq!(
            doc["kafka"]["bootstrap_servers"][1],
            "set:kafka.bootstrap_servers[1]"
        );
        assert_eq!(doc["kafka"]["sasl"]["password"], "set:kafka.sasl.password");
        assert_eq!(doc["tables"][1]["name"], "set:tables[1].name");
        assert_eq!(doc["tables"][0]["name"], "t");
    }
}
