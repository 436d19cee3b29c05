//! Load generators: closed loop (C workers, one request after another) and open loop (requests
//! sent on a fixed schedule, latency measured from the *intended* send time so a slow server
//! cannot hide its queueing: no coordinated omission).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

/// One request: given (worker, sequence number), do it and say whether it succeeded.
pub type Op = Arc<dyn Fn(usize, u64) -> OpFuture + Send + Sync>;
pub type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Wraps an async closure as an [`Op`].
pub fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move |w, i| Box::pin(f(w, i)))
}

/// Latencies in nanoseconds, 1 ns .. 100 s at 3 significant digits.
#[allow(clippy::expect_used)] // infallible: constant bounds, checked below
pub fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("constant, valid bounds")
}

/// Recorded latencies of one run.
pub struct Samples {
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Samples {
    pub fn new() -> Self {
        Samples {
            hist: histogram(),
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Samples) {
        let _ = self.hist.add(&other.hist);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Adds the samples of another run of the same op (its time included).
    pub fn absorb(&mut self, other: Samples) {
        self.elapsed += other.elapsed;
        self.merge(other);
    }

    fn record(&mut self, r: Result<(), String>, ns: u64) {
        match r {
            Ok(()) => self.hist.saturating_record(ns.max(1)),
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
        }
    }

    /// The share of requests slower than `ns` (0..1).
    pub fn share_over(&self, ns: u64) -> f64 {
        let n = self.hist.len();
        if n == 0 {
            return 0.0;
        }
        let under = self.hist.count_between(0, ns);
        (n - under.min(n)) as f64 / n as f64
    }

    pub fn summary(&self, name: impl Into<String>) -> Summary {
        let q = |x: f64| self.hist.value_at_quantile(x) as f64 / 1000.0;
        let n = self.hist.len();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        Summary {
            name: name.into(),
            requests: n,
            errors: self.errors,
            seconds: secs,
            throughput: n as f64 / secs,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: self.hist.max() as f64 / 1000.0,
            mean_us: self.hist.mean() / 1000.0,
            first_error: self.first_error.clone(),
        }
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Successful requests per second.
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// `concurrency` workers issue `op` back to back: `warmup` unrecorded, then `run` recorded.
pub async fn closed_loop(concurrency: usize, warmup: Duration, run: Duration, op: Op) -> Samples {
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + run;
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency.max(1) {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Samples::new();
            let mut i = w as u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let r = op(w, i).await;
                i += concurrency as u64;
                if t >= record_from {
                    s.record(r, t.elapsed().as_nanos() as u64);
                }
            }
            s
        }));
    }
    let mut all = Samples::new();
    for t in tasks {
        if let Ok(s) = t.await {
            all.merge(s);
        }
    }
    all.elapsed = run;
    all
}

/// Sends `op` at `rate` per second for `run` (after `warmup` at the same rate, unrecorded).
/// At most `max_in_flight` requests are outstanding; past that, sends wait, and the wait counts
/// in their latency because latency is measured from the scheduled send time.
pub async fn open_loop(
    rate: u32,
    warmup: Duration,
    run: Duration,
    max_in_flight: usize,
    op: Op,
) -> Samples {
    let rate = f64::from(rate.max(1));
    let start = Instant::now();
    let record_from = start + warmup;
    let total = ((warmup + run).as_secs_f64() * rate) as u64;
    let recorded = Arc::new(Mutex::new(Samples::new()));
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = Vec::new();
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let op = op.clone();
        let recorded = recorded.clone();
        tasks.push(tokio::spawn(async move {
            let r = op(0, i).await;
            let ns = at.elapsed().as_nanos() as u64;
            drop(permit);
            if at >= record_from {
                recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(r, ns);
            }
        }));
        if tasks.len() >= 4096 {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut s = std::mem::replace(
        &mut *recorded.lock().unwrap_or_else(|p| p.into_inner()),
        Samples::new(),
    );
    s.elapsed = start.elapsed().saturating_sub(warmup).max(run);
    s
}

/// Runs `f` on `threads` OS threads for `run`, timing each call: for in-process operations
/// that are too fast for a task per call.
pub fn threads_loop<F>(threads: usize, run: Duration, f: F) -> Samples
where
    F: Fn(usize, u64) -> bool + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let end = start + run;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|w| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut s = Samples::new();
                let mut i = w as u64 * 7919;
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let ok = f(w, i);
                    i += 1;
                    let ns = t.elapsed().as_nanos() as u64;
                    s.record(if ok { Ok(()) } else { Err("miss".into()) }, ns);
                }
                s
            })
        })
        .collect();
    let mut all = Samples::new();
    for h in handles {
        if let Ok(s) = h.join() {
            all.merge(s);
        }
    }
    all.elapsed = start.elapsed();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_loop_counts_requests_and_errors() {
        let s = closed_loop(
            2,
            Duration::ZERO,
            Duration::from_millis(50),
            op(|_, i| async move {
                tokio::task::yield_now().await;
                if i % 10 == 0 {
                    Err("every tenth".into())
                } else {
                    Ok(())
                }
            }),
        )
        .await;
        assert!(s.hist.len() > 10);
        assert!(s.errors > 0);
        assert_eq!(s.first_error.as_deref(), Some("every tenth"));
    }

    #[tokio::test]
    async fn open_loop_charges_queueing_to_latency() {
        // One request at a time, each taking 5 ms, sent every 1 ms: later requests wait, and
        // that wait must show up in their latency.
        let s = open_loop(
            1000,
            Duration::ZERO,
            Duration::from_millis(40),
            1,
            op(|_, _| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }),
        )
        .await;
        assert!(s.hist.max() > 50_000_000, "max {} ns", s.hist.max());
    }

    #[test]
    fn share_over_counts_the_tail() {
        let mut s = Samples::new();
        for i in 1..=100u64 {
            s.record(Ok(()), i * 1000);
        }
        let share = s.share_over(90_000);
        assert!((share - 0.10).abs() < 0.02, "{share}");
    }
}
