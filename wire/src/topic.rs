//! Topic names and topic filters (MQTT 5.0 §4.7, §4.8.2): validation, shared-subscription parsing and a
//! reference matcher.
//!
//! What it does: checks the syntax rules the codec enforces on PUBLISH topics and SUBSCRIBE/UNSUBSCRIBE
//! filters, splits `$share/{group}/{filter}`, and matches one filter against one topic by walking both level
//! by level.
//!
//! What it does not do: index subscriptions. [`matches`] is the slow, obviously-correct definition that the
//! broker's subscription trie is tested against; it is not meant for the hot path.

/// Longest string an MQTT UTF-8 string field can carry.
const MAX_LEN: usize = u16::MAX as usize;

const SHARE_PREFIX: &str = "$share/";

/// A topic name as allowed in PUBLISH: non-empty, no wildcard characters, no U+0000, at most 65,535 bytes.
///
/// An empty topic with a Topic Alias (5.0) is a property of the packet, not of the name, so it is the
/// decoder's business, not this function's.
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LEN && !s.contains(['+', '#', '\0'])
}

/// A topic filter as allowed in SUBSCRIBE/UNSUBSCRIBE, including shared filters (`$share/{group}/{filter}`).
///
/// A string starting with `$share/` is only valid as a well-formed shared filter: treating a malformed one as
/// a plain filter would silently create a non-shared subscription the client did not ask for.
pub fn valid_topic_filter(s: &str) -> bool {
    if s.starts_with(SHARE_PREFIX) {
        return s.len() <= MAX_LEN && parse_shared(s).is_some();
    }
    valid_plain_filter(s)
}

fn valid_plain_filter(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_LEN || s.contains('\0') {
        return false;
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('+') && level != "+" {
            return false;
        }
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
    }
    true
}

/// The parts of a shared subscription filter `$share/{group}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    /// The share name: non-empty, without '+', '#' or '/'.
    pub group: &'a str,
    /// The filter the group subscribes to; a valid (non-shared) topic filter.
    pub filter: &'a str,
}

/// Splits a shared filter. `None` for a non-shared filter and for a malformed shared one.
pub fn parse_shared(filter: &str) -> Option<SharedFilter<'_>> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    // The group ends at the first '/', so it cannot contain one.
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#', '\0']) || !valid_plain_filter(inner) {
        return None;
    }
    Some(SharedFilter { group, filter: inner })
}

/// Whether `filter` matches `topic`.
///
/// `+` matches exactly one level, `#` matches its own level and everything below, including the parent
/// (`a/#` matches `a`). Topics starting with `$` are not matched by a filter whose first level is a
/// wildcard (§4.7.2). A shared filter matches what its inner filter matches. Empty levels are ordinary
/// levels (`a//b` has three). Both arguments are assumed valid; an invalid filter just matches literally.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = parse_shared(filter).map_or(filter, |shared| shared.filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Number of '/'-separated levels; `""` has one (empty) level.
pub fn levels(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "a/b", "/", "a//b", "$SYS/x", "é/ü", " "] {
            assert!(valid_topic_name(ok), "{ok:?}");
        }
        for bad in ["", "a/+", "#", "a/b#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
        assert!(valid_topic_name(&"x".repeat(65_535)));
        assert!(!valid_topic_name(&"x".repeat(65_536)));
    }

    #[test]
    fn plain_filters() {
        for ok in ["a", "#", "+", "a/#", "+/+", "a/+/b", "/", "//", "+/", "/#", "$share", "$sharex/a", "a//#"]
        {
            assert!(valid_topic_filter(ok), "{ok:?}");
        }
        for bad in ["", "a+", "a/b+", "+a/b", "#/a", "a/#/b", "a/b#", "a#", "\0", "a/\0"] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        assert!(!valid_topic_filter(&"x".repeat(65_536)));
    }

    #[test]
    fn shared_filters() {
        assert_eq!(parse_shared("$share/g/a/+"), Some(SharedFilter { group: "g", filter: "a/+" }));
        assert_eq!(parse_shared("$share/g/#"), Some(SharedFilter { group: "g", filter: "#" }));
        assert_eq!(parse_shared("$share/g//"), Some(SharedFilter { group: "g", filter: "/" }));
        for bad in ["$share/g", "$share/g/", "$share//a", "$share/+/a", "$share/g#/a", "$share/g/a#", "a/b"] {
            assert_eq!(parse_shared(bad), None, "{bad:?}");
        }
        assert!(valid_topic_filter("$share/group/a/b"));
        assert!(!valid_topic_filter("$share/group"));
        assert!(!valid_topic_filter("$share//a"));
        assert!(!valid_topic_filter("$share/a+/x"));
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "b", false),
            ("#", "a/b", true),
            ("#", "/", true),
            ("+", "/", false),
            ("+/+", "/", true),
            ("+", "$SYS", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("a/b", "a/b/", false),
            ("$share/g/a/+", "a/b", true),
            ("$share/g/#", "$SYS", false),
        ];
        for (f, t, want) in cases {
            assert_eq!(matches(f, t), want, "{f:?} vs {t:?}");
        }
    }

    #[test]
    fn level_counts() {
        assert_eq!(levels(""), 1);
        assert_eq!(levels("a"), 1);
        assert_eq!(levels("a/b"), 2);
        assert_eq!(levels("a//b"), 3);
        assert_eq!(levels("/"), 2);
    }
}
