//! The commands: reads of `SOURCE:KEY` through the one read path, the connection commands
//! clients send on connect (HELLO, AUTH, SELECT, CLIENT, COMMAND, INFO), pub/sub and tracking
//! (in `push`), and refusals: writes answer `-READONLY`, anything else `-ERR unknown command`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::push::Push;
use super::read_error;
use super::reply::Out;
use super::scan::{self, Position};
use super::Shared;
use crate::serve::read::ReadError;

/// The Redis version clients are told (HELLO, INFO): the command set and replies follow it.
/// 7.4: redis-py (5.1 and later) turns its client-side cache on only for a server that says
/// 7.4 or later; the tracking and invalidation replies it relies on are those of 7.4.
pub(crate) const REDIS_VERSION: &str = "7.4.0";

/// One connection's state.
pub(crate) struct Conn {
    pub id: u64,
    /// The client's address (`unix` for a Unix socket client).
    pub peer: String,
    pub out: Out,
    pub push: Push,
    pub quit: bool,
    authed: bool,
    name: Option<Bytes>,
    lib_name: Option<Bytes>,
    lib_ver: Option<Bytes>,
}

/// A command's metadata, for COMMAND and arity checks: name, arity (negative = at least),
/// flags, first key, last key, key step.
type Spec = (&'static str, i64, &'static [&'static str], i64, i64, i64);

/// Every command served.
const COMMANDS: &[Spec] = &[
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("type", 2, &["readonly", "fast"], 1, 1, 1),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("dbsize", 1, &["readonly", "fast"], 0, 0, 0),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("echo", 2, &["fast"], 0, 0, 0),
    (
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    ("select", 2, &["loading", "stale", "fast"], 0, 0, 0),
    ("client", -2, &["noscript", "loading", "stale"], 0, 0, 0),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    (
        "quit",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "reset",
        1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "subscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    (
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    (
        "psubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    (
        "punsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
];

/// Commands that change data: refused with `-READONLY`.
const WRITES: &[&str] = &[
    "set",
    "setnx",
    "setex",
    "psetex",
    "mset",
    "msetnx",
    "getset",
    "getdel",
    "getex",
    "append",
    "setrange",
    "incr",
    "incrby",
    "incrbyfloat",
    "decr",
    "decrby",
    "del",
    "unlink",
    "expire",
    "pexpire",
    "expireat",
    "pexpireat",
    "persist",
    "rename",
    "renamenx",
    "move",
    "copy",
    "restore",
    "hset",
    "hsetnx",
    "hmset",
    "hdel",
    "hincrby",
    "hincrbyfloat",
    "lpush",
    "rpush",
    "lpushx",
    "rpushx",
    "lpop",
    "rpop",
    "lset",
    "linsert",
    "lrem",
    "ltrim",
    "rpoplpush",
    "lmove",
    "lmpop",
    "blpop",
    "brpop",
    "blmove",
    "sadd",
    "srem",
    "spop",
    "smove",
    "sinterstore",
    "sunionstore",
    "sdiffstore",
    "zadd",
    "zincrby",
    "zrem",
    "zpopmin",
    "zpopmax",
    "zmpop",
    "zremrangebyscore",
    "zremrangebyrank",
    "zremrangebylex",
    "zunionstore",
    "zinterstore",
    "zdiffstore",
    "xadd",
    "xdel",
    "xtrim",
    "pfadd",
    "pfmerge",
    "setbit",
    "bitop",
    "bitfield",
    "geoadd",
    "flushdb",
    "flushall",
    "swapdb",
    "publish",
    "spublish",
    "eval",
    "evalsha",
    "fcall",
    "multi",
    "exec",
];

const READONLY: &str =
    "READONLY viewcar is a read-only cache sidecar: write to the origin (Publish), not to it";

/// Commands allowed in RESP2 while subscribed.
const SUBSCRIBED_OK: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
    "ping",
    "quit",
    "reset",
];

fn lower(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_ascii_lowercase()
}

fn spec(name: &str) -> Option<&'static Spec> {
    COMMANDS.iter().find(|c| c.0 == name)
}

/// The UTF-8 text of an argument, lossy where it is not UTF-8, cut for an error message.
fn shown(arg: &[u8]) -> String {
    let s = String::from_utf8_lossy(&arg[..arg.len().min(128)]);
    s.replace(['\r', '\n'], " ")
}

/// `SOURCE:KEY` split at the first `:`; `None` when it names no key of any source.
pub(crate) fn split_key(full: &[u8]) -> Option<(&str, &str)> {
    let full = std::str::from_utf8(full).ok()?;
    let (source, key) = full.split_once(':')?;
    (!source.is_empty() && !key.is_empty()).then_some((source, key))
}

fn parse_u64(arg: &[u8]) -> Option<u64> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

impl Conn {
    pub(crate) fn new(id: u64, peer: String, sh: &Shared) -> Self {
        Conn {
            id,
            peer,
            out: Out::new(4096),
            push: Push::new(id),
            quit: false,
            authed: sh.cfg.token.is_none(),
            name: None,
            lib_name: None,
            lib_ver: None,
        }
    }

    /// Answers one command into `self.out`.
    pub(crate) async fn execute(&mut self, sh: &Shared, args: Vec<Bytes>) {
        sh.stats.commands.fetch_add(1, Ordering::Relaxed);
        self.dispatch(sh, args).await;
        self.push.end_command();
    }

    async fn dispatch(&mut self, sh: &Shared, args: Vec<Bytes>) {
        // The hot path first, without building the lowercase name.
        if args[0].eq_ignore_ascii_case(b"get") && args.len() == 2 && self.authed {
            if self.push.resp2_subscribed(self.out.resp3) {
                return self.subscribed_only("get");
            }
            return self.get(sh, &args[1]).await;
        }
        let name = lower(&args[0]);
        if !self.authed && !matches!(name.as_str(), "auth" | "hello" | "quit" | "reset") {
            sh.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            return self.out.error("NOAUTH Authentication required.");
        }
        if let Some(&(_, arity, ..)) = spec(&name) {
            let n = args.len() as i64;
            if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
                return self.out.error(&format!(
                    "ERR wrong number of arguments for '{name}' command"
                ));
            }
        }
        if self.push.resp2_subscribed(self.out.resp3) && !SUBSCRIBED_OK.contains(&name.as_str()) {
            return self.subscribed_only(&name);
        }
        let a = &args[1..];
        match name.as_str() {
            "get" => self.get(sh, &a[0]).await,
            "mget" => self.mget(sh, a).await,
            "exists" => self.exists(sh, a).await,
            "strlen" => {
                match self.read(sh, &a[0]).await {
                    Ok(v) => self.out.int(v.map_or(0, |v| v.len() as i64)),
                    Err(e) => return self.read_failed(&e),
                }
                self.track(sh, &a[0]);
            }
            "type" => {
                match self.read(sh, &a[0]).await {
                    Ok(Some(_)) => self.out.simple("string"),
                    Ok(None) => self.out.simple("none"),
                    Err(e) => return self.read_failed(&e),
                }
                self.track(sh, &a[0]);
            }
            "scan" => self.scan(sh, a),
            "dbsize" => {
                let n: usize = sh.store.sources().iter().map(|s| s.len()).sum();
                self.out.int(n as i64);
            }
            "ping" => self.ping(a),
            "echo" => self.out.bulk(&a[0]),
            "hello" => self.hello(sh, a),
            "auth" => self.auth(sh, a),
            "select" => {
                if &a[0][..] == b"0" {
                    self.out.ok();
                } else {
                    self.out.error("ERR DB index is out of range");
                }
            }
            "client" => self.client(sh, a),
            "info" => self.info(sh, a),
            "command" => self.command(a),
            "quit" => {
                self.out.ok();
                self.quit = true;
            }
            "reset" => {
                self.reset(sh);
                self.out.simple("RESET");
            }
            "subscribe" | "psubscribe" => {
                self.push
                    .subscribe(sh, &mut self.out, a, name == "psubscribe")
            }
            "unsubscribe" | "punsubscribe" => {
                self.push
                    .unsubscribe(sh, &mut self.out, a, name == "punsubscribe")
            }
            w if WRITES.contains(&w) => self.out.error(READONLY),
            _ => {
                let mut msg = format!(
                    "ERR unknown command '{}', with args beginning with: ",
                    shown(&args[0])
                );
                for arg in a.iter().take(16) {
                    let _ = write!(msg, "'{}' ", shown(arg));
                }
                self.out.error(&msg);
            }
        }
    }

    fn subscribed_only(&mut self, name: &str) {
        self.out.error(&format!(
            "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
        ));
    }

    /// Reads `SOURCE:KEY`: `Ok(None)` when absent, or when no such source exists.
    async fn read(&mut self, sh: &Shared, full: &[u8]) -> Result<Option<Bytes>, ReadError> {
        let Some((source, key)) = split_key(full) else {
            sh.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let got = match sh.reader.get(source, key, &sh.freshness).await {
            Ok(got) => got.answer.value,
            Err(ReadError::UnknownSource(_)) => None,
            Err(e) => return Err(e),
        };
        let counter = if got.is_some() {
            &sh.stats.hits
        } else {
            &sh.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(got)
    }

    /// After a read of `full` was answered: tracking, if it is on.
    fn track(&mut self, sh: &Shared, full: &[u8]) {
        if self.push.is_active() {
            if let Some((source, key)) = split_key(full) {
                self.push.track(sh, &mut self.out, source, key);
            }
        }
    }

    fn read_failed(&mut self, e: &ReadError) {
        self.out.error(&read_error(e));
    }

    async fn get(&mut self, sh: &Shared, full: &[u8]) {
        match self.read(sh, full).await {
            Ok(Some(v)) => self.out.bulk(&v),
            Ok(None) => self.out.null(),
            Err(e) => return self.read_failed(&e),
        }
        self.track(sh, full);
    }

    /// Every key of known sources is read in one batch (whole versions of each source, as
    /// BatchGet answers); the rest are nil.
    async fn mget(&mut self, sh: &Shared, keys: &[Bytes]) {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(keys.len());
        let mut at: Vec<Option<usize>> = Vec::with_capacity(keys.len());
        for k in keys {
            match split_key(k).filter(|(s, _)| sh.store.source(s).is_some()) {
                Some(pair) => {
                    at.push(Some(pairs.len()));
                    pairs.push(pair);
                }
                None => at.push(None),
            }
        }
        let answers = match sh.reader.batch(&pairs, &sh.freshness).await {
            Ok(a) => a,
            Err(e) => return self.read_failed(&e),
        };
        self.out.array(keys.len());
        for i in at {
            match i.and_then(|i| answers[i].value.as_ref()) {
                Some(v) => {
                    sh.stats.hits.fetch_add(1, Ordering::Relaxed);
                    self.out.bulk(v);
                }
                None => {
                    sh.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.out.null();
                }
            }
        }
        for k in keys {
            self.track(sh, k);
        }
    }

    async fn exists(&mut self, sh: &Shared, keys: &[Bytes]) {
        let mut n = 0;
        for k in keys {
            match self.read(sh, k).await {
                Ok(Some(_)) => n += 1,
                Ok(None) => {}
                Err(e) => return self.read_failed(&e),
            }
        }
        self.out.int(n);
        for k in keys {
            self.track(sh, k);
        }
    }

    fn scan(&mut self, sh: &Shared, a: &[Bytes]) {
        let Some(cursor) = parse_u64(&a[0]) else {
            return self.out.error("ERR invalid cursor");
        };
        let mut pattern: Option<&[u8]> = None;
        let mut count = 10usize;
        let mut only_strings = true;
        let mut i = 1;
        while i < a.len() {
            let opt = lower(&a[i]);
            let Some(val) = a.get(i + 1) else {
                return self.out.error("ERR syntax error");
            };
            match opt.as_str() {
                "match" => pattern = Some(&val[..]),
                "count" => match parse_u64(val) {
                    Some(n) if n > 0 => count = usize::try_from(n).unwrap_or(usize::MAX),
                    _ => return self.out.error("ERR syntax error"),
                },
                "type" => only_strings = val.eq_ignore_ascii_case(b"string"),
                _ => return self.out.error("ERR syntax error"),
            }
            i += 2;
        }
        let start = if cursor == 0 {
            Some(Position {
                source: 0,
                after: None,
            })
        } else {
            sh.cursors.take(cursor)
        };
        let Some(start) = start else {
            return self.out.error("ERR invalid cursor");
        };
        let (keys, next) = scan::step(&sh.store, start, count.min(sh.scan_max), pattern);
        let next = next.map_or(0, |p| sh.cursors.save(p));
        self.out.array(2);
        self.out.bulk(next.to_string().as_bytes());
        if only_strings {
            self.out.array(keys.len());
            for k in &keys {
                self.out.bulk(k);
            }
        } else {
            self.out.array(0);
        }
    }

    fn ping(&mut self, a: &[Bytes]) {
        if a.len() > 1 {
            return self
                .out
                .error("ERR wrong number of arguments for 'ping' command");
        }
        if self.push.resp2_subscribed(self.out.resp3) {
            self.out.array(2);
            self.out.bulk(b"pong");
            self.out.bulk(a.first().map_or(&b""[..], |m| &m[..]));
            return;
        }
        match a.first() {
            Some(m) => self.out.bulk(m),
            None => self.out.simple("PONG"),
        }
    }

    fn check_token(&mut self, sh: &Shared, user: Option<&[u8]>, pass: &[u8]) -> bool {
        let Some(token) = &sh.cfg.token else {
            return false;
        };
        let user_ok = user.is_none_or(|u| u == b"default");
        let ok = crate::auth::same_secret(pass, token.as_bytes()) && user_ok;
        if !ok {
            sh.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn auth(&mut self, sh: &Shared, a: &[Bytes]) {
        if a.len() > 2 {
            return self.out.error("ERR syntax error");
        }
        if sh.cfg.token.is_none() {
            return self.out.error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        }
        let (user, pass) = match a {
            [pass] => (None, pass),
            [user, pass] => (Some(&user[..]), pass),
            _ => return self.out.error("ERR syntax error"),
        };
        if self.check_token(sh, user, pass) {
            self.authed = true;
            self.out.ok();
        } else {
            self.out
                .error("WRONGPASS invalid username-password pair or user is disabled.");
        }
    }

    fn hello(&mut self, sh: &Shared, a: &[Bytes]) {
        let mut resp3 = self.out.resp3;
        if let Some(v) = a.first() {
            match parse_u64(v) {
                Some(2) => resp3 = false,
                Some(3) => resp3 = true,
                Some(_) => return self.out.error("NOPROTO unsupported protocol version"),
                None => {
                    return self
                        .out
                        .error("ERR Protocol version is not an integer or out of range")
                }
            }
        }
        let mut i = 1;
        let mut name = None;
        while i < a.len() {
            let opt = lower(&a[i]);
            match (opt.as_str(), a.get(i + 1), a.get(i + 2)) {
                ("auth", Some(user), Some(pass)) => {
                    if sh.cfg.token.is_none() {
                        // Redis without a password accepts the default user with any password.
                        if &user[..] != b"default" {
                            return self.out.error(
                                "WRONGPASS invalid username-password pair or user is disabled.",
                            );
                        }
                    } else if self.check_token(sh, Some(user), pass) {
                        self.authed = true;
                    } else {
                        return self.out.error(
                            "WRONGPASS invalid username-password pair or user is disabled.",
                        );
                    }
                    i += 3;
                }
                ("setname", Some(n), _) => {
                    name = Some(n.clone());
                    i += 2;
                }
                _ => {
                    return self.out.error(&format!(
                        "ERR Syntax error in HELLO option '{}'",
                        shown(&a[i])
                    ))
                }
            }
        }
        if !self.authed {
            sh.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            return self.out.error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if name.is_some() {
            self.name = name;
        }
        self.out.resp3 = resp3;
        self.out.map(8);
        self.out.bulk(b"server");
        self.out.bulk(b"redis");
        self.out.bulk(b"version");
        self.out.bulk(REDIS_VERSION.as_bytes());
        self.out.bulk(b"proto");
        self.out.int(if resp3 { 3 } else { 2 });
        self.out.bulk(b"id");
        self.out.int(self.id as i64);
        self.out.bulk(b"mode");
        self.out.bulk(b"standalone");
        self.out.bulk(b"role");
        self.out.bulk(b"replica");
        self.out.bulk(b"modules");
        self.out.array(0);
        self.out.bulk(b"viewcar");
        self.out.bulk(env!("CARGO_PKG_VERSION").as_bytes());
    }

    fn client_line(&self) -> String {
        let text = |b: &Option<Bytes>| {
            b.as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned()
        };
        format!(
            "id={} addr={} laddr= fd=0 name={} db=0 sub={} psub={} resp={} lib-name={} lib-ver={}\n",
            self.id,
            self.peer,
            text(&self.name),
            self.push.channels(),
            self.push.patterns(),
            if self.out.resp3 { 3 } else { 2 },
            text(&self.lib_name),
            text(&self.lib_ver),
        )
    }

    fn client(&mut self, sh: &Shared, a: &[Bytes]) {
        let sub = lower(&a[0]);
        let args = &a[1..];
        match (sub.as_str(), args) {
            ("id", []) => self.out.int(self.id as i64),
            ("getname", []) => match &self.name {
                Some(n) => {
                    let n = n.clone();
                    self.out.bulk(&n)
                }
                None => self.out.null(),
            },
            ("setname", [n]) => {
                if n.iter().any(|b| *b <= b' ' || *b > b'~') {
                    return self.out.error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                }
                self.name = (!n.is_empty()).then(|| n.clone());
                self.out.ok();
            }
            ("setinfo", [attr, value]) => {
                match lower(attr).as_str() {
                    "lib-name" => self.lib_name = Some(value.clone()),
                    "lib-ver" => self.lib_ver = Some(value.clone()),
                    _ => {
                        return self
                            .out
                            .error(&format!("ERR Unrecognized option '{}'", shown(attr)))
                    }
                }
                self.out.ok();
            }
            ("info", []) | ("list", _) => {
                let line = self.client_line();
                if sub == "info" {
                    self.out.text(&line);
                } else {
                    self.out.bulk(line.as_bytes());
                }
            }
            ("no-evict" | "no-touch", [_]) => self.out.ok(),
            ("tracking", _) => self.push.tracking(sh, &mut self.out, self.id, args),
            ("caching", [v]) => self.push.caching(&mut self.out, v),
            ("trackinginfo", []) => self.push.tracking_info(&mut self.out),
            ("getredir", []) => self.out.int(self.push.redirect()),
            _ => self.out.error(&format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
                shown(&a[0])
            )),
        }
    }

    fn command(&mut self, a: &[Bytes]) {
        let Some(sub) = a.first().map(|s| lower(s)) else {
            self.out.array(COMMANDS.len());
            for c in COMMANDS {
                self.command_entry(c);
            }
            return;
        };
        match sub.as_str() {
            "count" => self.out.int(COMMANDS.len() as i64),
            "info" => {
                let names = &a[1..];
                if names.is_empty() {
                    self.out.array(COMMANDS.len());
                    for c in COMMANDS {
                        self.command_entry(c);
                    }
                    return;
                }
                self.out.array(names.len());
                for n in names {
                    match spec(&lower(n)) {
                        Some(c) => self.command_entry(c),
                        None => self.out.null(),
                    }
                }
            }
            // Documentation only: clients (redis-cli) use it for hints; none is given.
            "docs" => self.out.map(0),
            "list" => {
                self.out.array(COMMANDS.len());
                for c in COMMANDS {
                    self.out.bulk(c.0.as_bytes());
                }
            }
            "getkeys" => self
                .out
                .error("ERR COMMAND GETKEYS is not supported by viewcar"),
            _ => self.out.error(&format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try COMMAND HELP.",
                shown(&a[0])
            )),
        }
    }

    fn command_entry(&mut self, c: &Spec) {
        let (name, arity, flags, first, last, step) = *c;
        self.out.array(10);
        self.out.bulk(name.as_bytes());
        self.out.int(arity);
        self.out.set(flags.len());
        for f in flags {
            self.out.simple(f);
        }
        self.out.int(first);
        self.out.int(last);
        self.out.int(step);
        self.out.set(0);
        self.out.set(0);
        self.out.array(0);
        self.out.array(0);
    }

    fn info(&mut self, sh: &Shared, a: &[Bytes]) {
        let wanted: Vec<String> = a.iter().map(|s| lower(s)).collect();
        let all = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
        let want = |s: &str| all || wanted.iter().any(|w| w == s);
        let st = &sh.stats;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut t = String::new();
        if want("server") {
            let _ = write!(
                t,
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nviewcar_version:{}\r\nredis_mode:standalone\r\nos:{}\r\narch_bits:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                usize::BITS,
                std::process::id(),
                sh.port,
                sh.started.elapsed().as_secs(),
            );
        }
        if want("clients") {
            let _ = write!(
                t,
                "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\npubsub_clients:{}\r\nblocked_clients:0\r\n\r\n",
                n(&st.open),
                sh.cfg.maxclients,
                n(&st.pubsub_clients),
            );
        }
        if want("stats") {
            let _ = write!(
                t,
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nauth_failures:{}\r\nclosed_protocol_error:{}\r\nclosed_query_buffer:{}\r\nclient_output_buffer_limit_disconnections:{}\r\nclosed_idle:{}\r\npushes_sent:{}\r\n\r\n",
                n(&st.accepted),
                n(&st.commands),
                n(&st.rejected_full),
                n(&st.hits),
                n(&st.misses),
                n(&st.auth_failures),
                n(&st.closed_protocol),
                n(&st.closed_query_buffer),
                n(&st.closed_output_buffer),
                n(&st.closed_idle),
                n(&st.pushes),
            );
        }
        if want("replication") {
            let synced = sh.store.sources().iter().all(|s| s.is_synced());
            let connected = sh.store.sources().iter().all(|s| s.is_connected());
            let _ = write!(
                t,
                "# Replication\r\nrole:slave\r\nmaster_link_status:{}\r\nmaster_sync_in_progress:{}\r\nreplica_read_only:1\r\n\r\n",
                if connected { "up" } else { "down" },
                u8::from(!synced),
            );
        }
        if want("sources") {
            t.push_str("# Sources\r\n");
            for s in sh.store.sources() {
                let _ = write!(
                    t,
                    "source_{}:kind={},mode={},origin={},synced={},connected={},version={},keys={},staleness_ms={}\r\n",
                    s.name(),
                    if s.is_view() { "view" } else { "topic" },
                    s.mode().as_str(),
                    s.origin().unwrap_or(""),
                    u8::from(s.is_synced()),
                    u8::from(s.is_connected()),
                    s.version(),
                    s.len(),
                    s.staleness_ms(),
                );
            }
            t.push_str("\r\n");
        }
        if want("keyspace") {
            let keys: usize = sh.store.sources().iter().map(|s| s.len()).sum();
            let _ = write!(
                t,
                "# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n\r\n"
            );
        }
        let t = t.trim_end_matches("\r\n").to_string() + "\r\n";
        self.out.text(&t);
    }

    /// RESET: back to a new connection's state (RESP2, no name, no subscriptions or tracking;
    /// not authenticated when a token is required).
    fn reset(&mut self, sh: &Shared) {
        self.push.clear(sh);
        self.out.resp3 = false;
        self.name = None;
        self.authed = sh.cfg.token.is_none();
    }

    /// The connection is going: its subscriptions go with it.
    pub(crate) fn close(&mut self, sh: &Shared) {
        self.push.clear(sh);
    }

    /// Writes one hub delivery as pushes; `Err` when the client must be closed (its output
    /// is past `redis.max_output_bytes`, or it fell behind its keyspace subscription).
    pub(crate) fn deliver(&mut self, sh: &Shared, e: super::push::Event) -> Result<(), ()> {
        match e {
            super::push::Event::Hub(d) => self.push.deliver(sh, &mut self.out, d)?,
            super::push::Event::Redirected => {}
        }
        // Redirected invalidations go out with any delivery: a wake-up lost to a delivery that
        // won the race is made up for here.
        self.push.deliver_redirected(sh, &mut self.out);
        if self.out.buf.len() > sh.cfg.max_output_bytes.as_usize() {
            return Err(());
        }
        Ok(())
    }
}
