//! A gate on polling: something polled with the gate's own waker is polled again only once that
//! waker fired, or right after it was ready (a future or stream that answered may have more
//! without waking anyone). A `Sync` stream's task is woken for many reasons (HTTP/2 polls its
//! body after each frame; the session waits on several things at once), and polling what
//! nothing woke costs a pass over everything it waits on to learn it has nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pub(crate) struct Gate {
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    /// The task polling through the gate, woken along with the flag.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    /// Open to begin with: the first poll goes through.
    pub(crate) fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// `poll` with the gate's waker if the gate is open, else `Pending`; `cx`'s task is woken
    /// when the gate's waker fires.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before the flag is read: a wake in between wakes the task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let got = poll(&mut Context::from_waker(&self.waker));
        if got.is_ready() {
            self.flag.woken.store(true, Ordering::Release);
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
