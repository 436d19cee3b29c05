//! The request grammar of RESP: a command is an array of bulk strings (`*2\r\n$3\r\nGET\r\n...`)
//! or, as Redis also accepts, an inline line of words (`PING\r\n`).
//!
//! Bounds are checked on each header before anything is buffered for it: the number of
//! arguments (`max_args`), the length of one argument (`max_bulk`), the length of an inline
//! line and of a header line. Nothing recurses and no allocation is sized by the peer beyond
//! those bounds. A malformed request is a [`ParseError`]; the connection answers it and closes,
//! as Redis does ("Protocol error: ...").

use bytes::{Bytes, BytesMut};

/// Longest header line (`*<n>` or `$<n>`): a sign, 19 digits and a margin.
const MAX_HEADER: usize = 32;

/// Bounds of one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Most arguments of one command (the command name included).
    pub max_args: usize,
    /// Longest argument, in bytes.
    pub max_bulk: usize,
    /// Longest inline command line, in bytes.
    pub max_inline: usize,
}

/// A request that breaks the protocol; the text follows "Protocol error: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ParseError(pub &'static str);

/// Takes the first whole command off `buf`: `Ok(None)` if `buf` holds only part of one (read
/// more), `Ok(Some(args))` otherwise. Empty commands (`*0`, a blank inline line) are skipped.
pub(crate) fn next_command(
    buf: &mut BytesMut,
    bounds: &Bounds,
) -> Result<Option<Vec<Bytes>>, ParseError> {
    loop {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let parsed = if first == b'*' {
            multibulk(buf, bounds)?
        } else {
            inline(buf, bounds)?
        };
        match parsed {
            None => return Ok(None),
            Some((args, used)) => {
                let frame = buf.split_to(used).freeze();
                if args.is_empty() {
                    continue;
                }
                return Ok(Some(
                    args.into_iter()
                        .map(|(start, end)| frame.slice(start..end))
                        .collect(),
                ));
            }
        }
    }
}

type Spans = Vec<(usize, usize)>;

/// The line starting at `at` (without its `\r\n`) and where the next one starts; `None` if the
/// line is not whole yet.
fn header_line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, ParseError> {
    let rest = &buf[at.min(buf.len())..];
    let window = &rest[..rest.len().min(MAX_HEADER)];
    match window.iter().position(|&b| b == b'\r') {
        Some(i) => {
            if rest.len() < i + 2 {
                return Ok(None);
            }
            if rest[i + 1] != b'\n' {
                return Err(ParseError("expected '\\n' after '\\r'"));
            }
            Ok(Some((&rest[..i], at + i + 2)))
        }
        None if rest.len() >= MAX_HEADER => Err(ParseError("header line too long")),
        None => Ok(None),
    }
}

/// A decimal integer, optionally negative; `None` if it is not one.
fn number(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if neg { -n } else { n })
}

fn multibulk(buf: &[u8], bounds: &Bounds) -> Result<Option<(Spans, usize)>, ParseError> {
    let Some((line, mut at)) = header_line(buf, 0)? else {
        return Ok(None);
    };
    let n = number(&line[1..]).ok_or(ParseError("invalid multibulk length"))?;
    if n <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    let n = usize::try_from(n).map_err(|_| ParseError("invalid multibulk length"))?;
    if n > bounds.max_args {
        return Err(ParseError("invalid multibulk length"));
    }
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        if kind != b'$' {
            return Err(ParseError("expected '$' before an argument"));
        }
        let Some((line, next)) = header_line(buf, at)? else {
            return Ok(None);
        };
        let len = number(&line[1..])
            .and_then(|l| usize::try_from(l).ok())
            .filter(|l| *l <= bounds.max_bulk)
            .ok_or(ParseError("invalid bulk length"))?;
        let end = next + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ParseError("expected '\\r\\n' after an argument"));
        }
        args.push((next, end));
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn inline(buf: &[u8], bounds: &Bounds) -> Result<Option<(Spans, usize)>, ParseError> {
    let window = &buf[..buf.len().min(bounds.max_inline + 2)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > bounds.max_inline {
            return Err(ParseError("too big inline request"));
        }
        return Ok(None);
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut args = Vec::new();
    let mut i = 0;
    while i < line_end {
        while i < line_end && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < line_end && !buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            if args.len() == bounds.max_args {
                return Err(ParseError("too many arguments in an inline request"));
            }
            args.push((start, i));
        }
    }
    Ok(Some((args, nl + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        max_args: 8,
        max_bulk: 16,
        max_inline: 64,
    };

    fn all(input: &[u8]) -> Result<Vec<Vec<String>>, ParseError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(args) = next_command(&mut buf, &B)? {
            out.push(
                args.iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            );
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline_commands_pipeline() {
        assert_eq!(
            all(
                b"*2\r\n$3\r\nGET\r\n$4\r\np:k1\r\nPING\r\n  ECHO  hi \n*0\r\n\r\n*1\r\n$0\r\n\r\n"
            )
            .unwrap(),
            vec![
                vec!["GET".to_string(), "p:k1".to_string()],
                vec!["PING".to_string()],
                vec!["ECHO".to_string(), "hi".to_string()],
                vec![String::new()],
            ]
        );
    }

    #[test]
    fn a_partial_command_waits_for_the_rest_at_every_cut() {
        let whole = b"*3\r\n$4\r\nMGET\r\n$3\r\na:b\r\n$5\r\nc:d e\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(next_command(&mut buf, &B), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
            buf.extend_from_slice(&whole[cut..]);
            let args = next_command(&mut buf, &B).unwrap().unwrap();
            assert_eq!(args.len(), 3);
            assert_eq!(&args[2][..], b"c:d e");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn malformed_and_oversized_requests_are_protocol_errors() {
        for bad in [
            &b"*x\r\n"[..],
            b"*9\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$17\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*1\r\n$99999999999999999999999\r\n",
            b"*1\rx",
            b"*111111111111111111111111111111111111111",
        ] {
            assert!(all(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(all(&[b'a'; 70]), Err(ParseError("too big inline request")));
        assert!(all(b"a b c d e f g h i\r\n").is_err());
    }

    #[test]
    fn nested_arrays_are_refused_not_recursed() {
        let deep = b"*1\r\n".repeat(100_000);
        assert!(all(&deep).is_err());
    }
}
