//! A gate on polling: something polled with the gate's own waker is polled again only once that
//! waker fired, or right after it was ready (a future or stream that answered may have more
//! without waking anyone). A `Sync` stream's task is woken for many reasons (HTTP/2 polls its
//! body after each frame; the session waits on several things at once), and polling what
//! nothing woke costs a pass over everything it waits on to learn it has nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// One gate: a set of one, registering the task at each poll.
pub(crate) struct Gate(Gates);

impl Gate {
    /// Open to begin with: the first poll goes through.
    pub(crate) fn new() -> Self {
        Gate(Gates::new(1))
    }

    /// `poll` with the gate's waker if the gate is open, else `Pending`; `cx`'s task is woken
    /// when the gate's waker fires.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before the gate is read: a wake in between wakes the task.
        self.0.register(cx);
        self.0.poll(0, poll)
    }
}

/// Several gates of one task sharing one registration of its waker: the task registers once
/// per poll ([`Gates::register`]), and a member nothing woke costs one load, where a gate of
/// its own each would cost a registration each (a session waits on four things besides its
/// queue, and is polled once per batch it sends).
pub(crate) struct Gates {
    shared: Arc<Shared>,
    wakers: Vec<Waker>,
}

struct Shared {
    /// Bit `i`: member `i` was woken (or has just answered), so it is polled next time.
    woken: AtomicU32,
    task: AtomicWaker,
}

struct Member {
    shared: Arc<Shared>,
    bit: u32,
}

impl Wake for Member {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.woken.fetch_or(self.bit, Ordering::Release);
        self.shared.task.wake();
    }
}

impl Gates {
    /// `n` gates, all open to begin with. Panics past 32 (the bits of one word): the callers'
    /// counts are constants, and a gate past the end would leave its wait never polled.
    pub(crate) fn new(n: usize) -> Self {
        assert!(n <= 32, "Gates::new({n}): at most 32 gates");
        let shared = Arc::new(Shared {
            woken: AtomicU32::new(u32::MAX),
            task: AtomicWaker::new(),
        });
        let wakers = (0..n)
            .map(|i| {
                Waker::from(Arc::new(Member {
                    shared: shared.clone(),
                    bit: 1 << i,
                }))
            })
            .collect();
        Gates { shared, wakers }
    }

    /// Makes `cx`'s task the one woken by every member; before any [`Gates::poll`] of a poll.
    pub(crate) fn register(&self, cx: &Context<'_>) {
        self.shared.task.register(cx.waker());
    }

    /// `poll` with member `i`'s waker if that gate is open, else `Pending`. Panics if there is
    /// no gate `i` (a wait that would never be polled otherwise).
    pub(crate) fn poll<T>(
        &self,
        i: usize,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let Some(waker) = self.wakers.get(i) else {
            panic!("gate {i} of {}", self.wakers.len());
        };
        let bit = 1u32 << i;
        if self.shared.woken.load(Ordering::Acquire) & bit == 0 {
            return Poll::Pending;
        }
        self.shared.woken.fetch_and(!bit, Ordering::AcqRel);
        let got = poll(&mut Context::from_waker(waker));
        if got.is_ready() {
            self.shared.woken.fetch_or(bit, Ordering::Release);
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::counting;
    use std::sync::atomic::AtomicUsize;

    /// Oracle: a counter of polls. Closed, the gate polls nothing; a wake opens it for one
    /// poll that stays pending; a ready answer keeps it open; no wake is lost between the
    /// check and the registration.
    #[test]
    fn a_gate_polls_once_per_wake_and_again_after_an_answer() {
        let gate = Gate::new();
        let polls = AtomicUsize::new(0);
        let saved: std::sync::Mutex<Option<Waker>> = std::sync::Mutex::new(None);
        let mut cx = Context::from_waker(Waker::noop());
        let pending = |cx: &mut Context<'_>| {
            polls.fetch_add(1, Ordering::Relaxed);
            *saved.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        assert!(gate.poll(&mut cx, pending).is_pending());
        for _ in 0..5 {
            assert!(gate.poll(&mut cx, pending).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled while closed");
        saved.lock().unwrap().take().unwrap().wake();
        assert!(gate.poll(&mut cx, pending).is_pending());
        assert!(gate.poll(&mut cx, pending).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 2, "one poll per wake");
        saved.lock().unwrap().take().unwrap().wake_by_ref();
        assert!(gate.poll(&mut cx, |_| Poll::Ready(7)).is_ready());
        assert!(
            gate.poll(&mut cx, |_| Poll::Ready(8)) == Poll::Ready(8),
            "open again after an answer"
        );
    }

    /// The same oracle for a set: each member polled once per wake of its own (a wake of one
    /// opens no other), again after an answer, and every wake reaches the registered task.
    #[test]
    fn a_set_of_gates_polls_each_member_once_per_wake_of_its_own() {
        let gates = Gates::new(3);
        let (task, task_waker) = counting();
        let cx = Context::from_waker(&task_waker);
        let polls: [AtomicUsize; 3] = Default::default();
        let saved: std::sync::Mutex<[Option<Waker>; 3]> = Default::default();
        let pending = |i: usize| {
            let (polls, saved) = (&polls, &saved);
            move |cx: &mut Context<'_>| {
                polls[i].fetch_add(1, Ordering::Relaxed);
                saved.lock().unwrap()[i] = Some(cx.waker().clone());
                Poll::<()>::Pending
            }
        };
        let round = || {
            gates.register(&cx);
            for i in 0..3 {
                assert!(gates.poll(i, pending(i)).is_pending());
            }
        };
        round();
        round();
        let counts = || {
            polls
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(), [1, 1, 1], "polled while closed");
        let w1 = saved.lock().unwrap()[1].take().unwrap();
        w1.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was not woken");
        round();
        round();
        assert_eq!(counts(), [1, 2, 1], "one poll of the woken member only");
        saved.lock().unwrap()[2].take().unwrap().wake_by_ref();
        gates.register(&cx);
        assert_eq!(gates.poll(2, |_| Poll::Ready(5)), Poll::Ready(5));
        assert_eq!(
            gates.poll(2, |_| Poll::Ready(6)),
            Poll::Ready(6),
            "open after an answer"
        );
        assert!(gates.poll(0, pending(0)).is_pending());
        assert_eq!(counts(), [1, 2, 1]);
    }

    #[test]
    #[should_panic(expected = "at most 32 gates")]
    fn more_than_32_gates_are_refused() {
        let _ = Gates::new(33);
    }

    #[test]
    #[should_panic(expected = "gate 4 of 4")]
    fn a_gate_past_the_end_is_a_bug_not_a_wait() {
        let gates = Gates::new(4);
        let _ = gates.poll(4, |_| Poll::Ready(()));
    }
}
