//! Redis for the comparison: a `redis-server` child on a free loopback port, and a minimal RESP2
//! client (GET, pipelined GETs, SET, INFO). Hand-written because the harness needs four
//! commands and full control of pipelining, not a client library's pooling and retries.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::procs::{self, Proc};
use super::BenchError;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Vec<Reply>),
}

/// One connection to Redis.
pub struct Redis {
    conn: BufReader<TcpStream>,
    out: Vec<u8>,
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl Redis {
    pub async fn connect(port: u16) -> std::io::Result<Redis> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        Ok(Redis {
            conn: BufReader::with_capacity(64 << 10, s),
            out: Vec::with_capacity(4096),
        })
    }

    /// Sends every command in one write, then reads their replies in order.
    pub async fn pipeline(&mut self, cmds: &[Vec<&[u8]>]) -> std::io::Result<Vec<Reply>> {
        self.out.clear();
        for c in cmds {
            encode(&mut self.out, c);
        }
        self.conn.get_mut().write_all(&self.out).await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    pub async fn cmd(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut r = self.pipeline(&[args.to_vec()]).await?;
        r.pop().ok_or_else(|| bad("no reply"))
    }

    pub async fn get(&mut self, key: &str) -> std::io::Result<Option<Bytes>> {
        match self.cmd(&[b"GET", key.as_bytes()]).await? {
            Reply::Bulk(v) => Ok(v),
            other => Err(bad(format!("GET: unexpected reply {other:?}"))),
        }
    }

    /// The `used_memory` line of `INFO memory`.
    pub async fn used_memory(&mut self) -> std::io::Result<u64> {
        let info = match self.cmd(&[b"INFO", b"memory"]).await? {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).to_string(),
            other => return Err(bad(format!("INFO: unexpected reply {other:?}"))),
        };
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| bad("INFO memory has no used_memory"))
    }

    fn read_reply(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + '_>>
    {
        Box::pin(async move {
            let mut line = Vec::with_capacity(32);
            self.conn.read_until(b'\n', &mut line).await?;
            if line.len() < 3 || !line.ends_with(b"\r\n") {
                return Err(bad("connection closed or bad line"));
            }
            let body =
                std::str::from_utf8(&line[1..line.len() - 2]).map_err(|_| bad("not UTF-8"))?;
            match line[0] {
                b'+' => Ok(Reply::Simple(body.to_string())),
                b'-' => Ok(Reply::Error(body.to_string())),
                b':' => Ok(Reply::Int(body.parse().map_err(|_| bad("bad integer"))?)),
                b'$' => {
                    let n: i64 = body.parse().map_err(|_| bad("bad length"))?;
                    if n < 0 {
                        return Ok(Reply::Bulk(None));
                    }
                    let mut buf = vec![0u8; n as usize + 2];
                    self.conn.read_exact(&mut buf).await?;
                    buf.truncate(n as usize);
                    Ok(Reply::Bulk(Some(Bytes::from(buf))))
                }
                b'*' => {
                    let n: i64 = body.parse().map_err(|_| bad("bad array length"))?;
                    let mut items = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n.max(0) {
                        items.push(self.read_reply().await?);
                    }
                    Ok(Reply::Array(items))
                }
                other => Err(bad(format!("unknown reply type {:?}", other as char))),
            }
        })
    }
}

/// Where `redis-server` is, if installed.
pub fn find_server() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

/// A `redis-server` child: no persistence, loopback only, killed on drop.
pub struct RedisServer {
    pub proc: Proc,
    pub port: u16,
}

impl RedisServer {
    /// Starts redis-server if installed; `Ok(None)` when it is not.
    pub async fn start() -> Result<Option<RedisServer>, BenchError> {
        let Some(exe) = find_server() else {
            return Ok(None);
        };
        let dir = procs::temp_dir("redis")?;
        let port = procs::free_port()?;
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (proc, _) = procs::spawn(&exe, &args, &dir.join("redis.log"), false)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = Redis::connect(port).await {
                if c.cmd(&[b"PING"]).await.is_ok() {
                    return Ok(Some(RedisServer { proc, port }));
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::setup(format!(
                    "redis-server did not start: {}",
                    proc.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `rows` with pipelined SETs, 1000 per round trip.
    pub async fn load(&self, rows: impl Iterator<Item = (String, Bytes)>) -> std::io::Result<u64> {
        let mut c = Redis::connect(self.port).await?;
        let mut n = 0;
        let mut rows = rows;
        loop {
            let b: Vec<(String, Bytes)> = rows.by_ref().take(1000).collect();
            if b.is_empty() {
                break;
            }
            let cmds: Vec<Vec<&[u8]>> = b
                .iter()
                .map(|(k, v)| vec![&b"SET"[..], k.as_bytes(), &v[..]])
                .collect();
            for r in c.pipeline(&cmds).await? {
                if let Reply::Error(e) = r {
                    return Err(bad(format!("SET: {e}")));
                }
            }
            n += b.len() as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_command_as_a_resp_array() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET", b"k1"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n");
    }

    #[tokio::test]
    async fn parses_replies_of_every_type() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"$5\r\nhello\r\n$-1\r\n:42\r\n*2\r\n+OK\r\n-ERR no\r\n")
                .await
                .unwrap();
        });
        let mut c = Redis::connect(port).await.unwrap();
        let r = c
            .pipeline(&[vec![b"A"], vec![b"B"], vec![b"C"], vec![b"D"]])
            .await
            .unwrap();
        assert_eq!(
            r,
            vec![
                Reply::Bulk(Some(Bytes::from_static(b"hello"))),
                Reply::Bulk(None),
                Reply::Int(42),
                Reply::Array(vec![
                    Reply::Simple("OK".into()),
                    Reply::Error("ERR no".into())
                ]),
            ]
        );
    }
}
