//! Names, modes, units and defaults shared by every layer. Depends on nothing in the crate.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A byte count written as an integer or as a string with a unit: `"64MiB"`, `"512KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: u64 = num
            .replace('_', "")
            .parse()
            .map_err(|_| format!("expected a size such as \"64MiB\", got {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (expected B, KiB, MiB, GiB, KB, MB or GB)"
                ))
            }
        };
        num.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }

    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte size: an integer or a string such as \"64MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Longest duration any setting takes: a year and a day.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// A duration written as a string with a unit: `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a duration such as \"10s\", got {s:?}"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {s:?} (expected ms, s, m, h or d)"
                ))
            }
        };
        if d > MAX_DURATION {
            return Err(format!(
                "duration {s:?} is too long (at most 366d): added to a clock it would overflow"
            ));
        }
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(de::Error::custom)
    }
}

/// How a topic is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every key, kept up to date.
    Full,
    /// Only the keys read lately, within a byte budget.
    OnDemand,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::OnDemand => "on_demand",
        }
    }
}

/// Budget of an on_demand topic without `max_bytes`.
pub const DEFAULT_ON_DEMAND_BYTES: u64 = 64 << 20;
/// Smallest `max_bytes` of an on_demand topic: room for a few dozen small keys.
pub const MIN_ON_DEMAND_BYTES: u64 = 16 << 10;

/// The rule for source names (topics and views): what readers type, in a safe alphabet.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: expected 1 to 128 of [A-Za-z0-9_.-]"
        ))
    }
}

/// The budget rules of an on_demand topic or view: `max_bytes` at least 16KiB, `idle` at least
/// 1s. The error names the field (`max_bytes` or `idle`); `held` says what is kept ("keys",
/// "rows") for the hint.
pub fn check_on_demand_budget(
    max_bytes: Option<ByteSize>,
    idle: Option<Dur>,
    held: &str,
) -> Result<(), (&'static str, String)> {
    if let Some(b) = max_bytes {
        if b.0 < MIN_ON_DEMAND_BYTES {
            return Err((
                "max_bytes",
                format!("{} bytes is below the minimum of 16KiB", b.0),
            ));
        }
    }
    if idle.is_some_and(|d| d.0 < Duration::from_secs(1)) {
        return Err((
            "idle",
            format!("must be at least 1s (omit it to keep {held} until the budget evicts them)"),
        ));
    }
    Ok(())
}

/// `address` with any credentials in it (`http://user:secret@host:7000`) replaced by `***`, for
/// logs and status pages.
pub fn redact_address(address: &str) -> String {
    let Some(scheme_end) = address.find("://") else {
        return address.to_string();
    };
    let rest = &address[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &address[..scheme_end + 3], &rest[at..]),
        None => address.to_string(),
    }
}

/// `text` cut to at most `max` bytes (at a character boundary) with `...` when cut: for echoing
/// client-supplied strings in errors and logs without echoing a megabyte.
pub fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
}

/// A waker that counts its wakes, for tests of what wakes whom.
#[cfg(test)]
pub(crate) fn counting() -> (std::sync::Arc<Count>, std::task::Waker) {
    let c = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
    (c.clone(), std::task::Waker::from(c))
}

#[cfg(test)]
pub(crate) struct Count(pub std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl std::task::Wake for Count {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_an_address_are_redacted() {
        assert_eq!(
            redact_address("http://user:pa55word@host:7000"),
            "http://***@host:7000"
        );
        assert_eq!(
            redact_address("https://token@h:1/p@th"),
            "https://***@h:1/p@th"
        );
        assert_eq!(redact_address("http://host:7000"), "http://host:7000");
        assert_eq!(redact_address("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_address("not a url"), "not a url");
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        assert!(Dur::parse("366d").is_ok());
        let err = Dur::parse("18446744073709551615s").unwrap_err();
        assert!(err.contains("too long"), "{err}");
        assert!(Dur::parse("367d").is_err());
    }
}
