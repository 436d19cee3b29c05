//! Tokens: the one bearer-token parser and the one constant-time compare, used by every
//! listener that takes a token (the origin's `Publish`, the WebSocket upgrade, the Redis
//! protocol's `AUTH`).
//!
//! It sits at the bottom of the crate (it uses nothing of it) so that the origin and the
//! sidecar's servers share it without either depending on the other.

/// The token of an `Authorization` header value of the `Bearer` scheme (RFC 6750), or `None`
/// for another scheme or no token. The scheme is matched case-insensitively, as RFC 7235
/// (section 2.1) says; surrounding whitespace of the token is not part of it.
pub(crate) fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// True if `presented` is `expected`, compared without an early exit so that the time a wrong
/// token takes does not tell how much of it was right. (Only the length can leak, and the
/// length of a token is not a secret worth guarding.)
pub(crate) fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// True if `presented` is the token `expected`, in constant time (see [`same_secret`]).
pub(crate) fn token_matches(presented: Option<&str>, expected: &str) -> bool {
    presented.is_some_and(|p| same_secret(p.as_bytes(), expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "bEaReR  abc ",
            " Bearer abc",
        ] {
            assert_eq!(bearer(h), Some("abc"), "{h:?}");
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_not_bearer_tokens() {
        for h in [
            "Basic abc",
            "Bearerabc",
            "Bearer",
            "Bearer ",
            "Bearer   ",
            "",
            "abc",
        ] {
            assert_eq!(bearer(h), None, "{h:?}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(same_secret(b"", b""));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"xbc", b"abc"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(token_matches(Some("s3cret"), "s3cret"));
        assert!(!token_matches(Some("s3cre"), "s3cret"));
        assert!(!token_matches(None, "s3cret"));
    }
}
