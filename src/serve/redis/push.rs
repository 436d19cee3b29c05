//! Push over RESP, fed by the hub (its conflating, bounded queue per connection):
//!
//! - Keyspace notifications: `SUBSCRIBE __keyspace@0__:SOURCE:KEY` and `PSUBSCRIBE` patterns
//!   deliver `set` (a key written) and `del` (a key deleted), as Redis keyspace notifications
//!   do. A pattern's literal `SOURCE:PREFIX` narrows the hub subscription; the whole pattern is
//!   matched at delivery. Other channels may be subscribed to and never deliver anything.
//! - Client-side caching: `CLIENT TRACKING ON` (RESP3) sends `invalidate` pushes. In RESP2,
//!   as in Redis, a second connection subscribes to `__redis__:invalidate` and the tracking
//!   connection names it with `REDIRECT <its CLIENT ID>`: invalidations go to it as `message`s
//!   of that channel (a bounded inbox per receiver: past `redis.queue` pending invalidations
//!   they collapse into one "flush everything"). In the default mode a key read while tracking is watched until its first change, which
//!   invalidates it once; `BCAST` (with `PREFIX`es, or none for every key) invalidates every
//!   change under the prefixes. `OPTIN`/`OPTOUT` with `CLIENT CACHING yes|no` choose which
//!   reads are tracked; `NOLOOP` is accepted (clients cannot write here, so there is no loop).
//!   Keys of on_demand sources are not fed to the hub: a read of one while tracking is
//!   followed by its invalidation at once, so a near cache never holds it.
//!
//! A keyspace subscriber that falls behind its queue (`redis.queue`) has lost notifications:
//! it is closed and counted, as Redis closes a pub/sub client past its output buffer limit.
//! A tracking client that falls behind is told to flush its whole cache (`invalidate` with a
//! null), which keeps it exact.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use super::reply::Out;
use super::scan::{glob, narrow};
use super::Shared;
use crate::hub::{Delivery, Selection, SubId, Subscriber};

const KEYSPACE: &[u8] = b"__keyspace@0__:";

/// The channel a RESP2 client subscribes to for the invalidations of its tracking connections.
const INVALIDATE_CHANNEL: &[u8] = b"__redis__:invalidate";

/// Invalidations on their way to a connection subscribed to `__redis__:invalidate`, from the
/// tracking connections that redirect to it. `None` = flush every key.
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Option<Vec<Bytes>>>>,
    cap: usize,
    ready: tokio::sync::Notify,
}

impl Inbox {
    fn new(cap: usize) -> Self {
        Inbox {
            queue: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues an invalidation. Past the bound the queue becomes one flush, which covers
    /// everything it replaces: the receiver's caches stay exact, whatever its pace.
    fn send(&self, keys: Option<Vec<Bytes>>) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if keys.is_none() || q.len() >= self.cap {
                q.clear();
                q.push_back(None);
            } else {
                q.push_back(keys);
            }
        }
        self.ready.notify_one();
    }

    fn drain(&self) -> VecDeque<Option<Vec<Bytes>>> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The inboxes of connections subscribed to `__redis__:invalidate`, by client id.
#[derive(Default)]
pub(crate) struct Redirects(Mutex<HashMap<u64, Arc<Inbox>>>);

impl Redirects {
    fn get(&self, id: u64) -> Option<Arc<Inbox>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn insert(&self, id: u64, inbox: Arc<Inbox>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, inbox);
    }

    fn remove(&self, id: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

/// What a pushing connection waits for next.
pub(crate) enum Event {
    /// A delivery of its hub subscriber.
    Hub(Delivery),
    /// Invalidations redirected to it are waiting in its inbox.
    Redirected,
}

/// What a hub subscription of this connection stands for.
#[derive(Debug, Clone)]
enum Target {
    Channel(Bytes),
    Pattern(Bytes),
    /// A key read in the default tracking mode: invalidated once, then forgotten.
    Tracked(Arc<str>, Arc<str>),
    /// A `BCAST` prefix.
    Bcast,
}

#[derive(Debug, Default)]
struct Tracking {
    bcast: bool,
    optin: bool,
    optout: bool,
    noloop: bool,
    prefixes: Vec<Bytes>,
    /// Default mode: the keys read and watched until their next change.
    tracked: HashMap<(Arc<str>, Arc<str>), SubId>,
    /// `REDIRECT id`: invalidations go to that connection's inbox instead of this connection.
    redirect: Option<(u64, Weak<Inbox>)>,
}

/// One connection's subscriptions and tracking.
#[derive(Default)]
pub(crate) struct Push {
    /// This connection's client id (`CLIENT ID`).
    id: u64,
    subscriber: Option<Subscriber>,
    /// Subscribed to `__redis__:invalidate`: what tracking connections redirect here.
    inbox: Option<Arc<Inbox>>,
    channels: HashMap<Bytes, Vec<SubId>>,
    patterns: HashMap<Bytes, Vec<SubId>>,
    targets: HashMap<SubId, Target>,
    tracking: Option<Tracking>,
    /// `CLIENT CACHING yes|no` for the next command, and whether it was set by this one.
    caching: Option<bool>,
    caching_fresh: bool,
    counted: bool,
}

impl Push {
    pub(crate) fn new(id: u64) -> Self {
        Push {
            id,
            ..Self::default()
        }
    }

    /// Subscribed to something, or tracking: deliveries must be read.
    pub(crate) fn is_active(&self) -> bool {
        !self.channels.is_empty() || !self.patterns.is_empty() || self.tracking.is_some()
    }

    /// RESP2 with subscriptions: only the pub/sub commands are allowed.
    pub(crate) fn resp2_subscribed(&self, resp3: bool) -> bool {
        !resp3 && (!self.channels.is_empty() || !self.patterns.is_empty())
    }

    pub(crate) fn channels(&self) -> usize {
        self.channels.len()
    }

    pub(crate) fn patterns(&self) -> usize {
        self.patterns.len()
    }

    /// The next delivery of the hub, or redirected invalidations; pending forever without
    /// either.
    pub(crate) async fn next(&mut self) -> Event {
        let inbox = self.inbox.clone();
        let hub = async {
            match &mut self.subscriber {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        match inbox {
            Some(inbox) => tokio::select! {
                d = hub => Event::Hub(d),
                _ = inbox.ready.notified() => Event::Redirected,
            },
            None => Event::Hub(hub.await),
        }
    }

    /// Writes the invalidations waiting in this connection's inbox as `message`s of
    /// `__redis__:invalidate` (a null message = flush every key).
    pub(crate) fn deliver_redirected(&mut self, sh: &Shared, out: &mut Out) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        for keys in inbox.drain() {
            sh.stats.pushes.fetch_add(1, Ordering::Relaxed);
            out.push(3);
            out.bulk(b"message");
            out.bulk(INVALIDATE_CHANNEL);
            match keys {
                None => out.null(),
                Some(keys) => {
                    out.array(keys.len());
                    for k in keys {
                        out.bulk(&k);
                    }
                }
            }
        }
    }

    fn count(&mut self, sh: &Shared) {
        let active = self.is_active();
        if active != self.counted {
            self.counted = active;
            if active {
                sh.stats.pubsub_clients.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.stats.pubsub_clients.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn hub_subs(&self) -> usize {
        self.targets.len() + self.channels.len() + self.patterns.len()
    }

    /// Subscribes the hub to `selection` of the full source `name` for `target`.
    fn watch(
        &mut self,
        sh: &Shared,
        name: &str,
        selection: Selection,
        target: Target,
    ) -> Option<SubId> {
        let source = sh.store.source(name)?.clone();
        if source.is_on_demand() {
            return None;
        }
        let subscriber = self
            .subscriber
            .get_or_insert_with(|| Subscriber::new(&sh.hub, "redis", sh.cfg.queue, None));
        let sub = subscriber.subscribe(source, selection, false);
        self.targets.insert(sub, target);
        Some(sub)
    }

    fn unwatch(&mut self, sub: SubId) {
        self.targets.remove(&sub);
        if let Some(s) = &mut self.subscriber {
            s.unsubscribe(sub);
        }
    }

    /// The hub subscriptions a channel or pattern needs.
    fn watch_channel(&mut self, sh: &Shared, ch: &Bytes, pattern: bool) -> Vec<SubId> {
        let target = if pattern {
            Target::Pattern(ch.clone())
        } else {
            Target::Channel(ch.clone())
        };
        if !pattern {
            let Some(rest) = ch.strip_prefix(KEYSPACE) else {
                return Vec::new();
            };
            let Some((source, key)) = super::cmd::split_key(rest) else {
                return Vec::new();
            };
            let sel = Selection::Keys(vec![key.to_string()]);
            return self.watch(sh, source, sel, target).into_iter().collect();
        }
        // A pattern that can only match keyspace channels of one source narrows to it.
        let narrowed = ch.strip_prefix(KEYSPACE).map(narrow);
        match narrowed {
            Some(n) if n.source.is_some() => {
                let source = n.source.unwrap_or_default();
                let sel = Selection::Prefix(n.prefix.to_string());
                self.watch(sh, source, sel, target).into_iter().collect()
            }
            _ => {
                // Could match any keyspace channel (`__keyspace@*__:*`) or none: watch every
                // full source and match at delivery.
                let probe = b"__keyspace@0__:";
                if !(glob_prefix_possible(ch, probe)) {
                    return Vec::new();
                }
                let names: Vec<Arc<str>> = sh
                    .store
                    .sources()
                    .iter()
                    .map(|s| s.name().clone())
                    .collect();
                names
                    .iter()
                    .filter_map(|n| {
                        self.watch(sh, n, Selection::Prefix(String::new()), target.clone())
                    })
                    .collect()
            }
        }
    }

    pub(crate) fn subscribe(&mut self, sh: &Shared, out: &mut Out, chans: &[Bytes], pattern: bool) {
        let kind: &[u8] = if pattern { b"psubscribe" } else { b"subscribe" };
        for ch in chans {
            let known = if pattern {
                self.patterns.contains_key(ch)
            } else {
                self.channels.contains_key(ch)
            };
            if !known {
                if self.hub_subs() >= sh.cfg.max_subscriptions {
                    out.error(
                        "ERR too many subscriptions on this connection (redis.max_subscriptions)",
                    );
                    continue;
                }
                let subs = self.watch_channel(sh, ch, pattern);
                if !pattern && ch.as_ref() == INVALIDATE_CHANNEL {
                    let inbox = Arc::new(Inbox::new(sh.cfg.queue));
                    sh.redirects.insert(self.id, inbox.clone());
                    self.inbox = Some(inbox);
                }
                if pattern {
                    self.patterns.insert(ch.clone(), subs);
                } else {
                    self.channels.insert(ch.clone(), subs);
                }
            }
            out.push(3);
            out.bulk(kind);
            out.bulk(ch);
            out.int((self.channels.len() + self.patterns.len()) as i64);
        }
        self.count(sh);
    }

    pub(crate) fn unsubscribe(
        &mut self,
        sh: &Shared,
        out: &mut Out,
        chans: &[Bytes],
        pattern: bool,
    ) {
        let kind: &[u8] = if pattern {
            b"punsubscribe"
        } else {
            b"unsubscribe"
        };
        let names: Vec<Bytes> = if chans.is_empty() {
            let map = if pattern {
                &self.patterns
            } else {
                &self.channels
            };
            map.keys().cloned().collect()
        } else {
            chans.to_vec()
        };
        if names.is_empty() {
            out.push(3);
            out.bulk(kind);
            out.null();
            out.int((self.channels.len() + self.patterns.len()) as i64);
        }
        for ch in names {
            let map = if pattern {
                &mut self.patterns
            } else {
                &mut self.channels
            };
            if let Some(subs) = map.remove(&ch) {
                for sub in subs {
                    self.unwatch(sub);
                }
                if !pattern && ch.as_ref() == INVALIDATE_CHANNEL {
                    self.close_inbox(sh);
                }
            }
            out.push(3);
            out.bulk(kind);
            out.bulk(&ch);
            out.int((self.channels.len() + self.patterns.len()) as i64);
        }
        self.count(sh);
    }

    /// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p]... [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`.
    pub(crate) fn tracking(&mut self, sh: &Shared, out: &mut Out, my_id: u64, args: &[Bytes]) {
        let Some(onoff) = args.first() else {
            return out.error("ERR wrong number of arguments for 'client|tracking' command");
        };
        if onoff.eq_ignore_ascii_case(b"off") {
            self.stop_tracking();
            self.count(sh);
            return out.ok();
        }
        if !onoff.eq_ignore_ascii_case(b"on") {
            return out.error("ERR syntax error");
        }
        let mut t = Tracking::default();
        let mut i = 1;
        while i < args.len() {
            let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
            match opt.as_str() {
                "bcast" => t.bcast = true,
                "optin" => t.optin = true,
                "optout" => t.optout = true,
                "noloop" => t.noloop = true,
                "prefix" | "redirect" => {
                    let Some(v) = args.get(i + 1) else {
                        return out.error("ERR syntax error");
                    };
                    if opt == "prefix" {
                        t.prefixes.push(v.clone());
                    } else {
                        let Some(id) = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        else {
                            return out.error("ERR value is not an integer or out of range");
                        };
                        if id != my_id {
                            let Some(inbox) = sh.redirects.get(id) else {
                                return out.error(
                                    "ERR The client ID you want redirect to does not exist",
                                );
                            };
                            t.redirect = Some((id, Arc::downgrade(&inbox)));
                        }
                    }
                    i += 1;
                }
                _ => return out.error("ERR syntax error"),
            }
            i += 1;
        }
        if t.optin && t.optout {
            return out.error("ERR You can't use both OPTIN and OPTOUT");
        }
        if !t.prefixes.is_empty() && !t.bcast {
            return out.error("ERR PREFIX option requires BCAST mode to be enabled");
        }
        if (t.optin || t.optout) && t.bcast {
            return out.error("ERR OPTIN and OPTOUT are not compatible with BCAST");
        }
        if !out.resp3 && t.redirect.is_none() {
            return out.error(
                "ERR CLIENT TRACKING in RESP2 needs REDIRECT <id> of a connection subscribed to __redis__:invalidate; or use RESP3 (HELLO 3), whose invalidations are pushed on the tracking connection",
            );
        }
        self.stop_tracking();
        if t.bcast {
            let prefixes = if t.prefixes.is_empty() {
                vec![Bytes::new()]
            } else {
                t.prefixes.clone()
            };
            let names: Vec<Arc<str>> = sh
                .store
                .sources()
                .iter()
                .map(|s| s.name().clone())
                .collect();
            for p in prefixes {
                // `SOURCE:KEYPREFIX` watches one source; a prefix without `:` watches every
                // source whose name starts with it.
                let text = String::from_utf8_lossy(&p).into_owned();
                match text.split_once(':') {
                    Some((source, key)) => {
                        self.watch(
                            sh,
                            source,
                            Selection::Prefix(key.to_string()),
                            Target::Bcast,
                        );
                    }
                    None => {
                        for n in names.iter().filter(|n| n.starts_with(text.as_str())) {
                            self.watch(sh, n, Selection::Prefix(String::new()), Target::Bcast);
                        }
                    }
                }
            }
        }
        self.tracking = Some(t);
        self.count(sh);
        out.ok();
    }

    fn stop_tracking(&mut self) {
        if self.tracking.take().is_none() {
            return;
        }
        let subs: Vec<SubId> = self
            .targets
            .iter()
            .filter(|(_, t)| matches!(t, Target::Tracked(..) | Target::Bcast))
            .map(|(s, _)| *s)
            .collect();
        for sub in subs {
            self.unwatch(sub);
        }
    }

    /// `CLIENT CACHING yes|no`: whether the next command's reads are tracked (OPTIN/OPTOUT).
    pub(crate) fn caching(&mut self, out: &mut Out, v: &[u8]) {
        let Some(t) = &self.tracking else {
            return out.error("ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled");
        };
        let yes = v.eq_ignore_ascii_case(b"yes");
        if !yes && !v.eq_ignore_ascii_case(b"no") {
            return out.error("ERR syntax error");
        }
        if (yes && !t.optin) || (!yes && !t.optout) {
            return out.error(if yes {
                "ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode."
            } else {
                "ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode."
            });
        }
        self.caching = Some(yes);
        self.caching_fresh = true;
        out.ok();
    }

    /// After each command: a `CLIENT CACHING` applies to the next command only.
    pub(crate) fn end_command(&mut self) {
        if self.caching_fresh {
            self.caching_fresh = false;
        } else {
            self.caching = None;
        }
    }

    pub(crate) fn tracking_info(&self, out: &mut Out) {
        out.map(3);
        out.bulk(b"flags");
        match &self.tracking {
            None => {
                out.set(1);
                out.simple("off");
            }
            Some(t) => {
                let flags: Vec<&str> = [
                    Some("on"),
                    t.bcast.then_some("bcast"),
                    t.optin.then_some("optin"),
                    t.optout.then_some("optout"),
                    t.noloop.then_some("noloop"),
                ]
                .into_iter()
                .flatten()
                .collect();
                out.set(flags.len());
                for f in flags {
                    out.simple(f);
                }
            }
        }
        out.bulk(b"redirect");
        out.int(self.redirect());
        out.bulk(b"prefixes");
        let prefixes = self
            .tracking
            .as_ref()
            .map(|t| t.prefixes.clone())
            .unwrap_or_default();
        out.array(prefixes.len());
        for p in prefixes {
            out.bulk(&p);
        }
    }

    /// `CLIENT GETREDIR`: -1 when not tracking, 0 when pushing on this connection, else the
    /// id of the connection invalidations are redirected to.
    pub(crate) fn redirect(&self) -> i64 {
        match &self.tracking {
            None => -1,
            Some(t) => t
                .redirect
                .as_ref()
                .map_or(0, |(id, _)| i64::try_from(*id).unwrap_or(i64::MAX)),
        }
    }

    /// Sends an invalidation (`None` = flush every key): to the redirect target when there is
    /// one, else on this connection. A redirect target that has gone is reported to a RESP3
    /// client with a `tracking-redir-broken` push, as Redis does (RESP2 has no way to say it).
    fn invalidate(&self, sh: &Shared, out: &mut Out, keys: Option<Vec<Bytes>>) {
        if let Some((id, target)) = self.tracking.as_ref().and_then(|t| t.redirect.as_ref()) {
            match target.upgrade() {
                Some(inbox) => inbox.send(keys),
                None if out.resp3 => {
                    out.push(2);
                    out.bulk(b"tracking-redir-broken");
                    out.int(i64::try_from(*id).unwrap_or(i64::MAX));
                }
                None => {}
            }
            return;
        }
        sh.stats.pushes.fetch_add(1, Ordering::Relaxed);
        out.push(2);
        out.bulk(b"invalidate");
        match keys {
            None => out.null(),
            Some(keys) => {
                out.array(keys.len());
                for k in keys {
                    out.bulk(&k);
                }
            }
        }
    }

    fn close_inbox(&mut self, sh: &Shared) {
        if self.inbox.take().is_some() {
            sh.redirects.remove(self.id);
        }
    }

    /// After a read of `source:key` has been answered: tracks it (default mode), or, for an
    /// on_demand source, invalidates it at once.
    pub(crate) fn track(&mut self, sh: &Shared, out: &mut Out, source: &str, key: &str) {
        let Some(t) = &self.tracking else {
            return;
        };
        if t.bcast
            || (t.optin && self.caching != Some(true))
            || (t.optout && self.caching == Some(false))
        {
            return;
        }
        let Some(src) = sh.store.source(source) else {
            return;
        };
        if src.is_on_demand() {
            let name = Bytes::from(format!("{source}:{key}"));
            self.invalidate(sh, out, Some(vec![name]));
            return;
        }
        let id = (src.name().clone(), Arc::<str>::from(key));
        if t.tracked.contains_key(&id) {
            return;
        }
        if self.hub_subs() >= sh.cfg.max_subscriptions {
            // Full, as Redis's tracking table: forget every tracked key, telling the client.
            self.flush_tracked(sh, out);
        }
        let sel = Selection::Keys(vec![key.to_string()]);
        if let Some(sub) = self.watch(sh, source, sel, Target::Tracked(id.0.clone(), id.1.clone()))
        {
            if let Some(t) = &mut self.tracking {
                t.tracked.insert(id, sub);
            }
        }
    }

    fn flush_tracked(&mut self, sh: &Shared, out: &mut Out) {
        let subs: Vec<SubId> = self
            .tracking
            .as_mut()
            .map(|t| t.tracked.drain().map(|(_, s)| s).collect())
            .unwrap_or_default();
        for sub in subs {
            self.unwatch(sub);
        }
        self.invalidate(sh, out, None);
    }

    /// Writes a delivery as pushes. `Err` when a keyspace subscriber fell behind.
    pub(crate) fn deliver(&mut self, sh: &Shared, out: &mut Out, d: Delivery) -> Result<(), ()> {
        match d {
            Delivery::Row { .. } | Delivery::Synced { .. } => Ok(()),
            Delivery::TooSlow => Err(()),
            Delivery::Reset { sub, .. } => match self.targets.get(&sub) {
                Some(Target::Tracked(..) | Target::Bcast) => {
                    self.flush_tracked(sh, out);
                    Ok(())
                }
                Some(Target::Channel(_) | Target::Pattern(_)) => Err(()),
                None => Ok(()),
            },
            Delivery::Change { sub, change } => {
                let Some(target) = self.targets.get(&sub).cloned() else {
                    return Ok(());
                };
                let event: &[u8] = if change.value.is_some() {
                    b"set"
                } else {
                    b"del"
                };
                let mut name = Vec::with_capacity(change.source.len() + 1 + change.key.len());
                name.extend_from_slice(change.source.as_bytes());
                name.push(b':');
                name.extend_from_slice(change.key.as_bytes());
                match target {
                    Target::Channel(ch) => {
                        sh.stats.pushes.fetch_add(1, Ordering::Relaxed);
                        out.push(3);
                        out.bulk(b"message");
                        out.bulk(&ch);
                        out.bulk(event);
                    }
                    Target::Pattern(p) => {
                        let mut channel = KEYSPACE.to_vec();
                        channel.extend_from_slice(&name);
                        if glob(&p, &channel) {
                            sh.stats.pushes.fetch_add(1, Ordering::Relaxed);
                            out.push(4);
                            out.bulk(b"pmessage");
                            out.bulk(&p);
                            out.bulk(&channel);
                            out.bulk(event);
                        }
                    }
                    Target::Tracked(source, key) => {
                        if let Some(t) = &mut self.tracking {
                            t.tracked.remove(&(source, key));
                        }
                        self.unwatch(sub);
                        self.invalidate(sh, out, Some(vec![Bytes::from(name)]));
                    }
                    Target::Bcast => self.invalidate(sh, out, Some(vec![Bytes::from(name)])),
                }
                Ok(())
            }
        }
    }

    /// Drops every subscription and tracking (RESET, or the connection closing).
    pub(crate) fn clear(&mut self, sh: &Shared) {
        self.close_inbox(sh);
        self.channels.clear();
        self.patterns.clear();
        self.targets.clear();
        self.tracking = None;
        self.caching = None;
        self.subscriber = None;
        self.count(sh);
    }
}

/// True if some string starting with `prefix` could match `pattern` (a cheap check that a
/// pattern can name keyspace channels at all): the pattern's literal start agrees with it.
fn glob_prefix_possible(pattern: &[u8], prefix: &[u8]) -> bool {
    pattern
        .iter()
        .zip(prefix)
        .take_while(|(p, _)| !matches!(p, b'*' | b'?' | b'[' | b'\\'))
        .all(|(p, c)| p == c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inbox against an oracle: every key queued since the last drain comes out, in order,
    /// unless more than `cap` were queued or a flush was, in which case one flush does.
    #[test]
    fn an_inbox_past_its_bound_collapses_into_one_flush() {
        for cap in [1usize, 2, 5] {
            for n in 0..8usize {
                for flush_at in [None, Some(0), Some(n / 2)] {
                    let inbox = Inbox::new(cap);
                    let mut oracle: Vec<Option<Vec<Bytes>>> = Vec::new();
                    let mut flushed = false;
                    for i in 0..n {
                        if flush_at == Some(i) {
                            inbox.send(None);
                            flushed = true;
                        }
                        inbox.send(Some(vec![Bytes::from(format!("k{i}"))]));
                        oracle.push(Some(vec![Bytes::from(format!("k{i}"))]));
                    }
                    let got: Vec<_> = inbox.drain().into_iter().collect();
                    if flushed || n > cap {
                        // A flush first, then whatever came after it (within the bound).
                        assert_eq!(got.first(), Some(&None), "cap {cap} n {n} {flush_at:?}");
                        assert!(got.len() <= cap + 1, "cap {cap} n {n}: {got:?}");
                        let tail: Vec<_> = got[1..].to_vec();
                        assert_eq!(tail, oracle[oracle.len() - tail.len()..].to_vec());
                    } else {
                        assert_eq!(got, oracle, "cap {cap} n {n}");
                    }
                    assert!(inbox.drain().is_empty());
                }
            }
        }
    }
}
