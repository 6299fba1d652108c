//! Mosquitto's ACL file:
//!
//! ```text
//! # before the first `user` line: rules for clients without a user name
//! topic read public/#
//! user alice
//! topic readwrite alice/#        # access: read, write, readwrite (the default) or deny
//! pattern write devices/%c/up    # any section: applies to every client, %c client id, %u user name
//! ```
//!
//! A check passes when no matching `deny` rule and at least one matching rule with the access exists
//! (deny first, as Mosquitto). Rule topics may hold wildcards. For a SUBSCRIBE the filter is compared
//! as a set of topics: it is readable when a read rule covers every topic it can match (`a/+` covers
//! `a/b` and `a/+`, `a/#` covers both and `a/#`; `a/b` does not cover `a/+`), and refused when a deny
//! rule covers it. A filter that is allowed but overlaps a deny rule (`a/#` with `deny a/secret`) is
//! granted, and the denied topics are then filtered on delivery, which checks every message against
//! the receiver's read rules. `%c`/`%u` are substituted at CONNECT; a pattern whose value is missing
//! (no user name for `%u`) or contains `+`, `#` or `/` (which would widen it) does not apply.

use ahash::AHashMap;
use shardmq_wire::topic;

use super::LineError;

const READ: u8 = 1;
const WRITE: u8 = 2;
/// The `deny` access.
const DENY: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: u8,
    topic: Box<str>,
}

/// The parsed file.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: AHashMap<Box<str>, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// One client's rules, patterns substituted, deny rules first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Box<[Rule]>,
    /// The user name the rules were made for: stored with a persistent session, so that the same rules
    /// are rebuilt when it is restored from the log.
    username: Option<Box<str>>,
}

impl Acl {
    pub fn parse(text: &str) -> Result<Acl, LineError> {
        let mut acl = Acl::default();
        let mut user: Option<Box<str>> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(LineError::new(n, "`user` without a name"));
                    }
                    acl.users.entry(rest.into()).or_default();
                    user = Some(rest.into());
                }
                "topic" | "pattern" => {
                    let (access, t) = match rest.split_once([' ', '\t']) {
                        Some((a, t)) => match a {
                            "read" => (READ, t.trim()),
                            "write" => (WRITE, t.trim()),
                            "readwrite" => (READ | WRITE, t.trim()),
                            "deny" => (DENY, t.trim()),
                            _ => (READ | WRITE, rest),
                        },
                        // Mosquitto reads `topic read` as an access without a topic.
                        None if matches!(rest, "read" | "write" | "readwrite" | "deny") => (DENY, ""),
                        None => (READ | WRITE, rest),
                    };
                    if t.is_empty() {
                        return Err(LineError::new(n, format!("`{keyword}` without a topic")));
                    }
                    if !topic::valid_topic_filter(t) {
                        return Err(LineError::new(n, format!("invalid topic {t:?}")));
                    }
                    let rule = Rule { access, topic: t.into() };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                    }
                }
                other => {
                    return Err(LineError::new(
                        n,
                        format!("unknown keyword {other:?} (user, topic or pattern)"),
                    ))
                }
            }
        }
        Ok(acl)
    }

    /// The rules for a client, with `%c` and `%u` substituted.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        let own = match username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or(&[]),
            None => &self.anonymous,
        };
        let mut rules: Vec<Rule> = own.to_vec();
        let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
        for p in &self.patterns {
            let needs_u = p.topic.contains("%u");
            let needs_c = p.topic.contains("%c");
            if needs_u && username.is_none_or(unsafe_value) || needs_c && unsafe_value(client_id) {
                continue;
            }
            let mut t = p.topic.replace("%c", client_id);
            if let Some(u) = username {
                t = t.replace("%u", u);
            }
            rules.push(Rule { access: p.access, topic: t.into() });
        }
        // Deny rules decide first.
        rules.sort_by_key(|r| r.access != DENY);
        ClientAcl { rules: rules.into(), username: username.map(Into::into) }
    }
}

impl ClientAcl {
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    pub fn can_publish(&self, topic_name: &str) -> bool {
        self.check(WRITE, |rule| topic::matches(rule, topic_name))
    }

    pub fn can_read(&self, topic_name: &str) -> bool {
        self.check(READ, |rule| topic::matches(rule, topic_name))
    }

    /// `filter` without any `$share/group/` prefix.
    pub fn can_subscribe(&self, filter: &str) -> bool {
        self.check(READ, |rule| covers(rule, filter))
    }

    fn check(&self, access: u8, applies: impl Fn(&str) -> bool) -> bool {
        for r in self.rules.iter() {
            if applies(&r.topic) {
                if r.access == DENY {
                    return false;
                }
                if r.access & access != 0 {
                    return true;
                }
            }
        }
        false
    }
}

/// Whether every topic `filter` matches is matched by `rule` (both valid filters).
fn covers(rule: &str, filter: &str) -> bool {
    // Wildcards in a rule's first level do not match `$` topics; a filter starting with `$` names only
    // those, while a filter starting with a wildcard names none of them.
    if filter.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(rl), Some(fl)) if rl == fl => {}
            (None, None) => return true,
            // `a/#` also matches `a`: the filter `a` is covered by the rule `a/#`.
            (Some(_), None) => return r.next().is_none() && rule.ends_with("/#"),
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic alice/#
topic deny alice/secret
topic write  log/alice
user bob
topic read sensors/+/temp
pattern readwrite devices/%c/#
pattern write users/%u/out
";

    #[test]
    fn sections_and_access() {
        let acl = Acl::parse(FILE).unwrap();
        let anon = acl.for_client("c1", None);
        assert!(anon.can_read("public/x") && !anon.can_publish("public/x"));
        assert!(!anon.can_read("alice/x"));
        let alice = acl.for_client("c2", Some("alice"));
        assert!(alice.can_read("alice/x") && alice.can_publish("alice/x/y") && alice.can_read("alice"));
        assert!(!alice.can_read("alice/secret") && !alice.can_publish("alice/secret"));
        assert!(alice.can_publish("log/alice") && !alice.can_read("log/alice"));
        assert!(!alice.can_read("public/x"), "anonymous rules are not everyone's");
        let bob = acl.for_client("c3", Some("bob"));
        assert!(bob.can_read("sensors/k/temp") && !bob.can_publish("sensors/k/temp"));
        // A user the file does not name gets the patterns only.
        let eve = acl.for_client("c4", Some("eve"));
        assert!(!eve.can_read("public/x") && eve.can_publish("users/eve/out"));
    }

    #[test]
    fn patterns_substitute_client_id_and_user() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.for_client("dev1", Some("alice"));
        assert!(alice.can_publish("devices/dev1/up") && alice.can_read("devices/dev1/down"));
        assert!(!alice.can_publish("devices/dev2/up"));
        assert!(alice.can_publish("users/alice/out") && !alice.can_publish("users/bob/out"));
        // %u does not apply without a user name; values with wildcards or separators never apply.
        let anon = acl.for_client("dev1", None);
        assert!(!anon.can_publish("users//out") && !anon.can_publish("users/%u/out"));
        assert!(anon.can_publish("devices/dev1/up"));
        let sneaky = acl.for_client("#", Some("+"));
        assert!(!sneaky.can_publish("devices/x/up") && !sneaky.can_publish("users/x/out"));
        let slash = acl.for_client("a/b", None);
        assert!(!slash.can_publish("devices/a/b/up"));
    }

    #[test]
    fn subscribe_filters_must_be_covered() {
        let acl = Acl::parse(FILE).unwrap();
        let bob = acl.for_client("c", Some("bob"));
        assert!(bob.can_subscribe("sensors/k/temp") && bob.can_subscribe("sensors/+/temp"));
        assert!(
            !bob.can_subscribe("sensors/#") && !bob.can_subscribe("sensors/+/+") && !bob.can_subscribe("#")
        );
        let alice = acl.for_client("c", Some("alice"));
        assert!(
            alice.can_subscribe("alice/#")
                && alice.can_subscribe("alice")
                && alice.can_subscribe("alice/+/x")
        );
        assert!(!alice.can_subscribe("alice/secret"), "covered by a deny rule");
        // Overlapping a deny rule is allowed; delivery filters the denied topics.
        assert!(alice.can_subscribe("alice/+") && !alice.can_read("alice/secret"));
        assert!(!alice.can_subscribe("log/alice"), "write-only");
        let all = Acl::parse("topic #\n").unwrap().for_client("c", None);
        assert!(all.can_subscribe("#") && all.can_subscribe("a/+/b") && !all.can_subscribe("$SYS/x"));
        assert!(!all.can_read("$SYS/x") && all.can_read("a"));
    }

    #[test]
    fn covers_levels() {
        for (rule, filter, want) in [
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/b", "a/+", false),
            ("a/#", "a", true),
            ("a/#", "a/#", true),
            ("a/+", "a", false),
            ("a", "a/b", false),
            ("+/b", "$x/b", false),
            ("$x/#", "$x/b", true),
        ] {
            assert_eq!(covers(rule, filter), want, "{rule} covers {filter}");
        }
    }

    #[test]
    fn malformed_lines_are_numbered() {
        for (text, line) in [
            ("topic read a\nfoo bar\n", 2),
            ("user\n", 1),
            ("\n\ntopic read\n", 3),
            ("topic read a/#/b\n", 1),
            ("pattern deny a+\n", 1),
        ] {
            let e = Acl::parse(text).err().unwrap_or_else(|| panic!("accepted {text:?}"));
            assert_eq!(e.line, line, "{text:?}: {e:?}");
        }
    }
}
