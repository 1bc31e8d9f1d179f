//! Topic names from a template (issue 12 groundwork, not wired yet: `kafka.topic_template`,
//! default `{prefix}{table}`), and the collisions two tables' topics can have.
//!
//! The rule, in this order:
//! 1. `{prefix}`, `{table}`, `{region}`, `{account}` are replaced; any other `{...}` is an
//!    error naming it.
//! 2. A character Kafka does not allow in a topic (anything but `a-z A-Z 0-9 . _ -`) becomes
//!    `_`.
//! 3. A name over 249 characters (Kafka's limit; DynamoDB allows 255 for a table alone) keeps
//!    its first 240 and ends in `-` and 8 hex digits of a hash of the whole name (FNV-1a), so
//!    that long names stay distinct and stable.
//! 4. `.` and `..` (which Kafka refuses) become `_` and `__`.
//!
//! Kafka also treats `.` and `_` as the same character in its metric names: two topics that
//! differ only there collide, as do two equal ones ([`collisions`]).

/// Kafka's longest topic name.
pub const MAX_TOPIC_CHARS: usize = 249;

/// What the placeholders of a template stand for.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// `kafka.topic_prefix`.
    pub prefix: &'a str,
    /// The table.
    pub table: &'a str,
    /// `aws.region`.
    pub region: &'a str,
    /// The tables' AWS account.
    pub account: &'a str,
}

/// The topic `template` names for `names`, by the rule of this module.
pub fn topic_name(template: &str, names: Names<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + names.table.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: a \"{{\" without its \"}}\""))?;
        out.push_str(match &after[..close] {
            "prefix" => names.prefix,
            "table" => names.table,
            "region" => names.region,
            "account" => names.account,
            other => {
                return Err(format!(
                    "{template:?}: unknown placeholder {{{other}}}; use {{prefix}}, {{table}}, {{region}} or {{account}}"
                ))
            }
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    let mut topic: String = out
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if topic.len() > MAX_TOPIC_CHARS {
        let hash = fnv1a(topic.as_bytes());
        topic.truncate(MAX_TOPIC_CHARS - 9);
        topic.push_str(&format!("-{hash:08x}"));
    }
    match topic.as_str() {
        "" => Err(format!("{template:?} makes an empty topic name")),
        "." => Ok("_".into()),
        ".." => Ok("__".into()),
        _ => Ok(topic),
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Pairs of tables whose topics are the same, or differ only by `.` against `_` (Kafka's
/// metric names collide): `(first table, second table, topic of the second)`, in input order.
pub fn collisions<'a>(topics: &'a [(String, String)]) -> Vec<(&'a str, &'a str, &'a str)> {
    let mut seen: std::collections::HashMap<String, &'a str> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (table, topic) in topics {
        let key = topic.replace('.', "_");
        match seen.get(&key) {
            Some(first) => out.push((*first, table.as_str(), topic.as_str())),
            None => {
                seen.insert(key, table.as_str());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(table: &str) -> Names<'_> {
        Names {
            prefix: "dynamodb.",
            table,
            region: "eu-west-1",
            account: "123456789012",
        }
    }

    #[test]
    fn the_default_template_is_todays_prefix_and_table() {
        assert_eq!(
            topic_name("{prefix}{table}", names("orders")).unwrap(),
            "dynamodb.orders"
        );
        assert_eq!(
            topic_name("cdc.{region}.{account}.{table}", names("orders")).unwrap(),
            "cdc.eu-west-1.123456789012.orders"
        );
        assert_eq!(topic_name("fixed", names("orders")).unwrap(), "fixed");
    }

    #[test]
    fn characters_kafka_forbids_become_underscores() {
        let n = Names {
            prefix: "team a/",
            ..names("orders")
        };
        assert_eq!(topic_name("{prefix}{table}", n).unwrap(), "team_a_orders");
        assert_eq!(topic_name("é{table}", names("t")).unwrap(), "_t");
        let dot = Names {
            prefix: "",
            ..names(".")
        };
        assert_eq!(topic_name("{prefix}{table}", dot).unwrap(), "_");
        let dots = Names {
            prefix: "",
            ..names("..")
        };
        assert_eq!(topic_name("{prefix}{table}", dots).unwrap(), "__");
    }

    #[test]
    fn long_names_are_cut_with_a_stable_distinct_hash() {
        let a = "a".repeat(255);
        let mut b = "a".repeat(254);
        b.push('b');
        let ta = topic_name("{prefix}{table}", names(&a)).unwrap();
        let tb = topic_name("{prefix}{table}", names(&b)).unwrap();
        assert_eq!(ta.len(), MAX_TOPIC_CHARS);
        assert_eq!(tb.len(), MAX_TOPIC_CHARS);
        assert_ne!(ta, tb);
        assert_eq!(ta, topic_name("{prefix}{table}", names(&a)).unwrap());
        assert!(ta.starts_with("dynamodb.aaaa"));
        let short = "x".repeat(240);
        assert_eq!(topic_name("{table}", names(&short)).unwrap(), short);
    }

    #[test]
    fn template_errors_name_the_placeholder() {
        let e = topic_name("{prefix}{tabel}", names("t")).unwrap_err();
        assert!(e.contains("{tabel}") && e.contains("{table}"), "{e}");
        assert!(topic_name("{prefix", names("t"))
            .unwrap_err()
            .contains("without"));
        let empty = Names {
            prefix: "",
            ..names("")
        };
        assert!(topic_name("{prefix}{table}", empty)
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn dots_and_underscores_collide_like_equal_names() {
        let topics: Vec<(String, String)> = [
            ("a.b", "dynamodb.a.b"),
            ("a_b", "dynamodb.a_b"),
            ("c", "dynamodb.c"),
            ("d", "dynamodb.c"),
            ("e", "dynamodb.e"),
        ]
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
        assert_eq!(
            collisions(&topics),
            [("a.b", "a_b", "dynamodb.a_b"), ("c", "d", "dynamodb.c")]
        );
    }
}
