//! Replies in RESP2 or RESP3, written straight into the connection's output buffer.
//!
//! The two protocols differ only in a few types: RESP3 has a null (`_`), maps (`%`), sets (`~`)
//! and out-of-band pushes (`>`), which RESP2 writes as a null bulk string and flat arrays.

use bytes::{BufMut, BytesMut};

/// The output buffer of one connection and the protocol it speaks.
#[derive(Debug)]
pub(crate) struct Out {
    pub buf: BytesMut,
    pub resp3: bool,
}

impl Out {
    pub(crate) fn new(capacity: usize) -> Self {
        Out {
            buf: BytesMut::with_capacity(capacity),
            resp3: false,
        }
    }

    fn header(&mut self, kind: u8, n: i64) {
        let mut num = itoa::Buffer::new();
        self.buf.put_u8(kind);
        self.buf.put_slice(num.format(n).as_bytes());
        self.buf.put_slice(b"\r\n");
    }

    fn len_header(&mut self, kind: u8, n: usize) {
        self.header(kind, i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `+text`: `text` must hold no CR or LF (every caller passes a constant or a checked word).
    pub(crate) fn simple(&mut self, text: &str) {
        self.buf.put_u8(b'+');
        self.buf.put_slice(text.as_bytes());
        self.buf.put_slice(b"\r\n");
    }

    pub(crate) fn ok(&mut self) {
        self.buf.put_slice(b"+OK\r\n");
    }

    /// `-CODE message`; line breaks in the message become spaces.
    pub(crate) fn error(&mut self, text: &str) {
        self.buf.put_u8(b'-');
        for b in text.bytes() {
            self.buf
                .put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
        }
        self.buf.put_slice(b"\r\n");
    }

    pub(crate) fn int(&mut self, n: i64) {
        self.header(b':', n);
    }

    pub(crate) fn bulk(&mut self, data: &[u8]) {
        self.len_header(b'$', data.len());
        self.buf.put_slice(data);
        self.buf.put_slice(b"\r\n");
    }

    pub(crate) fn null(&mut self) {
        if self.resp3 {
            self.buf.put_slice(b"_\r\n");
        } else {
            self.buf.put_slice(b"$-1\r\n");
        }
    }

    pub(crate) fn array(&mut self, n: usize) {
        self.len_header(b'*', n);
    }

    /// A map of `n` pairs: `n` keys and values follow, alternating.
    pub(crate) fn map(&mut self, n: usize) {
        if self.resp3 {
            self.len_header(b'%', n);
        } else {
            self.len_header(b'*', n.saturating_mul(2));
        }
    }

    pub(crate) fn set(&mut self, n: usize) {
        if self.resp3 {
            self.len_header(b'~', n);
        } else {
            self.len_header(b'*', n);
        }
    }

    /// An out-of-band message (pub/sub, invalidation): a push in RESP3, an array in RESP2.
    pub(crate) fn push(&mut self, n: usize) {
        if self.resp3 {
            self.len_header(b'>', n);
        } else {
            self.len_header(b'*', n);
        }
    }

    /// A text answer (INFO, CLIENT INFO): a verbatim string in RESP3, a bulk string in RESP2.
    pub(crate) fn text(&mut self, text: &str) {
        if self.resp3 {
            self.len_header(b'=', text.len() + 4);
            self.buf.put_slice(b"txt:");
        } else {
            self.len_header(b'$', text.len());
        }
        self.buf.put_slice(text.as_bytes());
        self.buf.put_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp2_and_resp3_differ_only_where_resp3_has_types() {
        let mut o = Out::new(64);
        o.null();
        o.map(2);
        o.push(3);
        o.int(-7);
        o.bulk(b"ab");
        o.error("ERR a\r\nb");
        assert_eq!(
            &o.buf[..],
            b"$-1\r\n*4\r\n*3\r\n:-7\r\n$2\r\nab\r\n-ERR a  b\r\n"
        );
        let mut o = Out::new(64);
        o.resp3 = true;
        o.null();
        o.map(2);
        o.push(3);
        o.set(1);
        o.text("x");
        assert_eq!(&o.buf[..], b"_\r\n%2\r\n>3\r\n~1\r\n=5\r\ntxt:x\r\n");
    }
}
