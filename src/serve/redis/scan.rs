//! SCAN over every full source as one keyspace of `SOURCE:KEY` names, and Redis's glob patterns.
//!
//! Redis clients parse the cursor as an unsigned integer, and a pooled client may continue a
//! SCAN on another connection, so a cursor is a number naming a position remembered by the
//! listener (source, last key), shared by every connection and bounded (`redis.scan_cursors`,
//! oldest forgotten first; a forgotten cursor is `-ERR invalid cursor`). A walk is in key
//! order, so a key present for the whole walk is returned once; keys added or removed
//! meanwhile may or may not be, as in Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::Store;

/// Where a walk stands: the next source to read and the last key read in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub source: usize,
    pub after: Option<Arc<str>>,
}

/// The positions of open SCAN walks, by cursor.
pub(crate) struct Cursors {
    bound: usize,
    next: AtomicU64,
    open: Mutex<(HashMap<u64, Position>, VecDeque<u64>)>,
}

impl Cursors {
    pub(crate) fn new(bound: usize) -> Self {
        Cursors {
            bound: bound.max(1),
            next: AtomicU64::new(1),
            open: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Remembers `pos`; returns its cursor (never 0, which starts and ends a walk).
    pub(crate) fn save(&self, pos: Position) -> u64 {
        let mut id = self.next.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            id = self.next.fetch_add(1, Ordering::Relaxed);
        }
        // A poisoned lock means a panic while holding it; the map stays consistent.
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while open.0.len() >= self.bound {
            match open.1.pop_front() {
                Some(old) => {
                    open.0.remove(&old);
                }
                None => break,
            }
        }
        open.0.insert(id, pos);
        open.1.push_back(id);
        id
    }

    /// The position of `cursor`, if it is remembered.
    pub(crate) fn take(&self, cursor: u64) -> Option<Position> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let pos = open.0.remove(&cursor)?;
        open.1.retain(|c| *c != cursor);
        Some(pos)
    }
}

/// True if `p` holds a character with a meaning in a glob pattern.
fn is_special(b: u8) -> bool {
    matches!(b, b'*' | b'?' | b'[' | b'\\')
}

/// What a MATCH pattern allows narrowing the walk to: one source (when the part before the
/// first `:` is literal) and a literal key prefix.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Narrow<'a> {
    pub source: Option<&'a str>,
    pub prefix: &'a str,
}

pub(crate) fn narrow(pattern: &[u8]) -> Narrow<'_> {
    let literal = pattern
        .iter()
        .position(|b| is_special(*b))
        .unwrap_or(pattern.len());
    let Some(colon) = pattern[..literal].iter().position(|b| *b == b':') else {
        return Narrow {
            source: None,
            prefix: "",
        };
    };
    match (
        std::str::from_utf8(&pattern[..colon]),
        std::str::from_utf8(&pattern[colon + 1..literal]),
    ) {
        (Ok(source), Ok(prefix)) => Narrow {
            source: Some(source),
            prefix,
        },
        _ => Narrow {
            source: None,
            prefix: "",
        },
    }
}

/// One step of a walk: up to `count` keys examined from `pos`, those matching `pattern`
/// returned as `SOURCE:KEY`; the position after them, or `None` at the end.
pub(crate) fn step(
    store: &Store,
    pos: Position,
    count: usize,
    pattern: Option<&[u8]>,
) -> (Vec<Vec<u8>>, Option<Position>) {
    let sources = store.sources();
    let narrow = pattern.map(narrow).unwrap_or(Narrow {
        source: None,
        prefix: "",
    });
    let mut out = Vec::new();
    let mut budget = count.max(1);
    let mut pos = pos;
    while let Some(source) = sources.get(pos.source) {
        let wanted = match narrow.source {
            Some(name) => **source.name() == *name,
            None => true,
        };
        // on_demand sources hold only the keys read lately: not a keyspace to walk.
        if !wanted || source.is_on_demand() {
            pos = Position {
                source: pos.source + 1,
                after: None,
            };
            continue;
        }
        let keys = source
            .keyspace()
            .scan_keys(narrow.prefix, pos.after.as_deref(), budget);
        let full = keys.len() == budget;
        budget -= keys.len();
        for key in &keys {
            let mut name = Vec::with_capacity(source.name().len() + 1 + key.len());
            name.extend_from_slice(source.name().as_bytes());
            name.push(b':');
            name.extend_from_slice(key.as_bytes());
            if pattern.is_none_or(|p| glob(p, &name)) {
                out.push(name);
            }
        }
        if full {
            pos.after = keys.last().cloned();
            return (out, Some(pos));
        }
        pos = Position {
            source: pos.source + 1,
            after: None,
        };
    }
    (out, None)
}

/// Redis's glob: `*` any run, `?` any one byte, `[abc]`, `[^a]`, `[a-z]` classes, `\x` the
/// byte x. Iterative (a `*` backtracks to its last position only), so a hostile pattern costs
/// at most pattern length times subject length.
pub(crate) fn glob(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                star = Some((p, s));
                p += 1;
                continue;
            }
            if let Some(next) = one(pattern, p, subject[s]) {
                p = next;
                s += 1;
                continue;
            }
        }
        match star {
            Some((sp, ss)) => {
                p = sp + 1;
                s = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

/// If the pattern element at `p` matches byte `c`, the index after that element.
fn one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            while i < pattern.len() && pattern[i] != b']' {
                if pattern[i] == b'\\' && i + 1 < pattern.len() {
                    hit |= pattern[i + 1] == c;
                    i += 2;
                } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']'
                {
                    let (lo, hi) = (
                        pattern[i].min(pattern[i + 2]),
                        pattern[i].max(pattern[i + 2]),
                    );
                    hit |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    hit |= pattern[i] == c;
                    i += 1;
                }
            }
            // An unclosed class runs to the end of the pattern, as in Redis.
            let next = (i + 1).min(pattern.len());
            (hit != negate).then_some(next)
        }
        b => (b == c).then_some(p + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_redis_does() {
        for (p, s, m) in [
            ("*", "", true),
            ("products:*", "products:p1", true),
            ("products:*", "prices:p1", false),
            ("p?oducts:p[0-9]", "products:p7", true),
            ("p?oducts:p[0-9]", "products:px", false),
            ("*:p[^0-4]*", "x:p5abc", true),
            ("*:p[^0-4]*", "x:p3abc", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("[abc", "b", true),
            ("h*llo", "heeeello", true),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), m, "{p} ~ {s}");
        }
    }

    #[test]
    fn a_pattern_narrows_to_its_literal_source_and_prefix() {
        assert_eq!(
            narrow(b"products:p1*"),
            Narrow {
                source: Some("products"),
                prefix: "p1"
            }
        );
        assert_eq!(
            narrow(b"products:*"),
            Narrow {
                source: Some("products"),
                prefix: ""
            }
        );
        assert_eq!(
            narrow(b"prod*:p1"),
            Narrow {
                source: None,
                prefix: ""
            }
        );
    }

    #[test]
    fn cursors_are_bounded_and_never_zero() {
        let c = Cursors::new(2);
        let pos = |s| Position {
            source: s,
            after: None,
        };
        let a = c.save(pos(1));
        let b = c.save(pos(2));
        let d = c.save(pos(3));
        assert!(a != 0 && b != 0 && d != 0);
        assert_eq!(c.take(a), None);
        assert_eq!(c.take(b), Some(pos(2)));
        assert_eq!(c.take(b), None);
        assert_eq!(c.take(d), Some(pos(3)));
    }
}
