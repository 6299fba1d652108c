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

use std::sync::Arc;

use ahash::AHashMap;
use shardmq_wire::topic;

use super::LineError;
use crate::trie::TopicTrie;

const READ: u8 = 1;
const WRITE: u8 = 2;
/// The `deny` access.
const DENY: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: u8,
    topic: Box<str>,
}

/// Rules compiled for checking: a topic trie of their accesses, which a publish or delivery check walks
/// one level at a time however many rules there are (a linear walk cost ~15 ns a rule, twice per
/// message: a 1,000-rule file made a shard several times slower), and the list, which the cover check
/// of a SUBSCRIBE reads.
#[derive(Default)]
struct RuleSet {
    trie: TopicTrie<u8>,
    rules: Box<[Rule]>,
}

impl std::fmt::Debug for RuleSet {
    // The trie holds the same rules as the list.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.rules.iter()).finish()
    }
}

impl RuleSet {
    fn new(rules: Vec<Rule>) -> RuleSet {
        let mut trie = TopicTrie::new();
        for r in &rules {
            trie.insert(&r.topic, r.access);
        }
        RuleSet { trie, rules: rules.into() }
    }

    /// Whether a rule matching `topic` denies it, and the accesses the matching rules grant.
    fn matching(&self, topic_name: &str) -> (bool, u8) {
        let (mut deny, mut granted) = (false, 0);
        self.trie.for_each_match(topic_name, |a| match *a {
            DENY => deny = true,
            a => granted |= a,
        });
        (deny, granted)
    }
}

/// The parsed file, each section compiled once and shared by every client it applies to.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Arc<RuleSet>,
    users: AHashMap<Box<str>, Arc<RuleSet>>,
    /// For a user the file does not name.
    nobody: Arc<RuleSet>,
    patterns: Vec<Rule>,
}

/// One client's rules: its section's (shared) and the patterns substituted for it (its own, if any
/// applies).
#[derive(Debug, Default)]
pub struct ClientAcl {
    own: Arc<RuleSet>,
    patterns: Option<Box<RuleSet>>,
    /// The user name the rules were made for: stored with a persistent session, so that the same rules
    /// are rebuilt when it is restored from the log.
    username: Option<Box<str>>,
}

impl Acl {
    pub fn parse(text: &str) -> Result<Acl, LineError> {
        let mut anonymous = Vec::new();
        let mut users: AHashMap<Box<str>, Vec<Rule>> = AHashMap::default();
        let mut patterns = Vec::new();
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
                    users.entry(rest.into()).or_default();
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
                        ("pattern", _) => patterns.push(rule),
                        (_, None) => anonymous.push(rule),
                        (_, Some(u)) => users.entry(u.clone()).or_default().push(rule),
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
        Ok(Acl {
            anonymous: Arc::new(RuleSet::new(anonymous)),
            users: users.into_iter().map(|(u, r)| (u, Arc::new(RuleSet::new(r)))).collect(),
            nobody: Arc::default(),
            patterns,
        })
    }

    /// The rules for a client, with `%c` and `%u` substituted.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        let own = match username {
            Some(u) => self.users.get(u).unwrap_or(&self.nobody),
            None => &self.anonymous,
        };
        let mut rules: Vec<Rule> = Vec::new();
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
        ClientAcl {
            own: own.clone(),
            patterns: (!rules.is_empty()).then(|| Box::new(RuleSet::new(rules))),
            username: username.map(Into::into),
        }
    }
}

impl ClientAcl {
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    pub fn can_publish(&self, topic_name: &str) -> bool {
        self.check(WRITE, topic_name)
    }

    pub fn can_read(&self, topic_name: &str) -> bool {
        self.check(READ, topic_name)
    }

    /// A matching deny rule decides; otherwise a matching rule with the access (as Mosquitto).
    fn check(&self, access: u8, topic_name: &str) -> bool {
        let (deny, granted) = self.own.matching(topic_name);
        let (p_deny, p_granted) = self.patterns.as_ref().map_or((false, 0), |p| p.matching(topic_name));
        !(deny || p_deny) && (granted | p_granted) & access != 0
    }

    /// `filter` without any `$share/group/` prefix: refused when a deny rule covers it, allowed when a
    /// read rule does (once per SUBSCRIBE, so the rules are read as a list).
    pub fn can_subscribe(&self, filter: &str) -> bool {
        let rules = self.own.rules.iter().chain(self.patterns.iter().flat_map(|p| p.rules.iter()));
        let mut readable = false;
        for r in rules.filter(|r| covers(&r.topic, filter)) {
            if r.access == DENY {
                return false;
            }
            readable |= r.access & READ != 0;
        }
        readable
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

    /// The compiled check decides as a walk of every rule, deny first, does (what it replaced).
    #[test]
    fn the_trie_decides_as_the_rule_list_does() {
        use proptest::prelude::*;
        let level = prop::sample::select(vec!["a", "b", "+", "#", "$s"]);
        let filter = prop::collection::vec(level.clone(), 1..4).prop_filter_map("valid filter", |l| {
            let f = l.join("/");
            topic::valid_topic_filter(&f).then_some(f)
        });
        let name =
            prop::collection::vec(prop::sample::select(vec!["a", "b", "$s"]), 1..4).prop_map(|l| l.join("/"));
        let access = prop::sample::select(vec!["read", "write", "readwrite", "deny"]);
        let rules = prop::collection::vec((access, filter), 0..8);
        proptest!(|(rules in rules, topics in prop::collection::vec(name, 1..6))| {
            let text: String = rules.iter().map(|(a, f)| format!("topic {a} {f}\n")).collect();
            let acl = Acl::parse(&text).unwrap().for_client("c", None);
            for t in &topics {
                for access in [READ, WRITE] {
                    let matching = rules.iter().filter(|(_, f)| topic::matches(f, t));
                    let accesses: Vec<u8> = matching
                        .map(|(a, _)| match *a { "read" => READ, "write" => WRITE, "readwrite" => READ | WRITE, _ => DENY })
                        .collect();
                    let want = !accesses.contains(&DENY) && accesses.iter().any(|a| a & access != 0);
                    prop_assert_eq!(acl.check(access, t), want, "{:?} {} {}", text, t, access);
                }
            }
        });
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
