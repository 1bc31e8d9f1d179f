//! Table selection by rule (the groundwork of table discovery, issue 12; not wired into the
//! config yet): which table names an `include`/`exclude` rule selects, whether a table's
//! tags satisfy the rule's `tags`, and which per-table override applies.
//!
//! - A pattern is a glob over the whole name (`*` any run of characters, `?` one character,
//!   everything else literal: `app-*`, `orders`) or, after `re:`, a regular expression of the
//!   `regex` crate that matches anywhere in the name unless anchored (`re:^svc_(a|b)$`).
//! - A name is selected when an `include` pattern matches it and no `exclude` pattern does
//!   (exclude wins).
//! - Every tag key listed in `tags` must be present; its value must be one of the listed
//!   values, or anything when the list is empty.
//! - Overrides: the first whose pattern matches the name applies.

use std::collections::{BTreeMap, HashMap};

/// One pattern of a rule.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// `*` and `?` over the whole name.
    Glob(String),
    /// `re:...`: a regular expression (unanchored unless written with `^`/`$`).
    Regex(regex::Regex),
}

/// The prefix of a regular-expression pattern.
pub const REGEX_PREFIX: &str = "re:";

impl Pattern {
    /// Parses `text`; the error says what is wrong (for the config error of its key).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(re) = text.strip_prefix(REGEX_PREFIX) {
            if re.is_empty() {
                return Err("an empty regular expression after \"re:\"".into());
            }
            return regex::Regex::new(re)
                .map(Pattern::Regex)
                .map_err(|e| format!("{text:?} is not a regular expression: {e}"));
        }
        if text.is_empty() {
            return Err(
                "an empty pattern; write a table name, a glob (\"app-*\") or \"re:...\"".into(),
            );
        }
        Ok(Pattern::Glob(text.to_owned()))
    }

    /// The pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Glob(g) => glob_match(g.as_bytes(), name.as_bytes()),
            Pattern::Regex(r) => r.is_match(name),
        }
    }
}

/// `*` (any run, empty included) and `?` (one byte; table names are ASCII) over the whole of
/// `name`; linear backtracking to the last `*`.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // The last `*` takes one more byte.
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// An `include`/`exclude`/`tags` rule.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    tags: BTreeMap<String, Vec<String>>,
}

impl Selection {
    /// The rule; an error names the pattern (`include[2]: ...`).
    pub fn new(
        include: &[String],
        exclude: &[String],
        tags: BTreeMap<String, Vec<String>>,
    ) -> Result<Self, String> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(i, p)| Pattern::parse(p).map_err(|e| format!("{key}[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        if include.is_empty() {
            return Err("include: list at least one pattern, e.g. [\"*\"]".into());
        }
        Ok(Self {
            include: parse("include", include)?,
            exclude: parse("exclude", exclude)?,
            tags,
        })
    }

    /// The name is selected (before tags): an include matches, no exclude does.
    pub fn selects_name(&self, name: &str) -> bool {
        self.include.iter().any(|p| p.matches(name))
            && !self.exclude.iter().any(|p| p.matches(name))
    }

    /// The rule looks at tags (ListTagsOfResource is needed).
    pub fn needs_tags(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The table's tags satisfy the rule.
    pub fn selects_tags(&self, tags: &HashMap<String, String>) -> bool {
        self.tags.iter().all(|(key, values)| {
            tags.get(key)
                .is_some_and(|v| values.is_empty() || values.iter().any(|w| w == v))
        })
    }

    /// Why a table is not selected (`None`: it is), for `dynamodb-cdc tables`. `tags` is
    /// `None` when they were not read (the name alone decided).
    pub fn why_not(&self, name: &str, tags: Option<&HashMap<String, String>>) -> Option<String> {
        if !self.include.iter().any(|p| p.matches(name)) {
            return Some("no include pattern matches".into());
        }
        if self.exclude.iter().any(|p| p.matches(name)) {
            return Some("an exclude pattern matches".into());
        }
        let tags = tags?;
        self.tags
            .iter()
            .find_map(|(key, values)| match tags.get(key) {
                None => Some(format!("no tag {key}")),
                Some(v) if !values.is_empty() && !values.iter().any(|w| w == v) => {
                    Some(format!("tag {key} is not one of {}", values.join(", ")))
                }
                Some(_) => None,
            })
    }
}

/// The first override whose pattern matches `name`.
pub fn first_match<'a, T>(overrides: &'a [(Pattern, T)], name: &str) -> Option<&'a T> {
    overrides
        .iter()
        .find(|(p, _)| p.matches(name))
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn globs_match_the_whole_name() {
        for (pattern, name, expected) in [
            ("orders", "orders", true),
            ("orders", "orders2", false),
            ("orders", "my-orders", false),
            ("app-*", "app-", true),
            ("app-*", "app-users", true),
            ("app-*", "xapp-users", false),
            ("*-tmp", "orders-tmp", true),
            ("*-tmp", "orders-tmp2", false),
            ("*", "", true),
            ("*", "anything.at_all-1", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-b-b-c-d", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a?c", "abbc", false),
            ("**x", "x", true),
            ("*.*", "svc.orders", true),
            ("*.*", "svc_orders", false),
            (
                "*aaa*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
                false,
            ),
        ] {
            assert_eq!(p(pattern).matches(name), expected, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn regexes_match_anywhere_unless_anchored() {
        assert!(p("re:_test$").matches("orders_test"));
        assert!(!p("re:_test$").matches("orders_test2"));
        assert!(p("re:^svc_(billing|users)$").matches("svc_users"));
        assert!(!p("re:^svc_(billing|users)$").matches("svc_users_old"));
        assert!(p("re:rd").matches("orders"));
        let e = Pattern::parse("re:(").unwrap_err();
        assert!(
            e.contains("\"re:(\"") && e.contains("regular expression"),
            "{e}"
        );
        assert!(Pattern::parse("re:").unwrap_err().contains("empty"));
        assert!(Pattern::parse("").unwrap_err().contains("empty pattern"));
    }

    #[test]
    fn exclude_wins_and_every_listed_tag_must_be_present() {
        let tags = BTreeMap::from([
            (
                "env".to_owned(),
                vec!["prod".to_owned(), "staging".to_owned()],
            ),
            ("cdc".to_owned(), vec![]),
        ]);
        let rule = Selection::new(
            &[
                "orders".into(),
                "app-*".into(),
                "re:^svc_(billing|users)$".into(),
            ],
            &["*-tmp".into(), "re:_test$".into()],
            tags,
        )
        .unwrap();
        for (name, selected) in [
            ("orders", true),
            ("app-users", true),
            ("app-users-tmp", false),
            ("svc_billing", true),
            ("svc_billing_test", false),
            ("svc_other", false),
            ("customers", false),
        ] {
            assert_eq!(rule.selects_name(name), selected, "{name}");
        }
        assert!(rule.needs_tags());
        let t = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(rule.selects_tags(&t(&[("env", "prod"), ("cdc", "")])));
        assert!(rule.selects_tags(&t(&[("env", "staging"), ("cdc", "yes"), ("x", "y")])));
        assert!(!rule.selects_tags(&t(&[("env", "dev"), ("cdc", "yes")])));
        assert!(!rule.selects_tags(&t(&[("env", "prod")])));
        assert_eq!(rule.why_not("orders", None), None);
        assert_eq!(
            rule.why_not("customers", None).as_deref(),
            Some("no include pattern matches")
        );
        assert_eq!(
            rule.why_not("app-x-tmp", None).as_deref(),
            Some("an exclude pattern matches")
        );
        assert_eq!(
            rule.why_not("orders", Some(&t(&[("env", "prod")])))
                .as_deref(),
            Some("no tag cdc")
        );
        assert_eq!(
            rule.why_not("orders", Some(&t(&[("env", "dev"), ("cdc", "1")])))
                .as_deref(),
            Some("tag env is not one of prod, staging")
        );
        let no_tags = Selection::new(&["*".into()], &[], BTreeMap::new()).unwrap();
        assert!(!no_tags.needs_tags());
        assert!(no_tags.selects_tags(&HashMap::new()));
    }

    #[test]
    fn rule_errors_name_the_pattern() {
        let e = Selection::new(&["ok".into(), "re:[".into()], &[], BTreeMap::new()).unwrap_err();
        assert!(e.starts_with("include[1]: "), "{e}");
        let e = Selection::new(&["*".into()], &["".into()], BTreeMap::new()).unwrap_err();
        assert!(e.starts_with("exclude[0]: "), "{e}");
        let e = Selection::new(&[], &[], BTreeMap::new()).unwrap_err();
        assert!(e.starts_with("include: "), "{e}");
    }

    #[test]
    fn the_first_matching_override_applies() {
        let overrides = vec![
            (p("app-users"), "users"),
            (p("app-*"), "apps"),
            (p("re:."), "any"),
        ];
        assert_eq!(first_match(&overrides, "app-users"), Some(&"users"));
        assert_eq!(first_match(&overrides, "app-orders"), Some(&"apps"));
        assert_eq!(first_match(&overrides, "orders"), Some(&"any"));
        assert_eq!(first_match(&overrides[..2], "orders"), None);
    }
}
