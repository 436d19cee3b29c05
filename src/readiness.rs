//! Whether a sidecar should be sent traffic: every full source (topic replicas and views) has
//! its first whole snapshot, and the sidecar is not shutting down.
//!
//! A source never un-syncs (a resnapshot swaps atomically), so once every source has synced the
//! sidecar stays ready until [`Readiness::drain`]; after that it is never ready again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::store::Store;
use crate::types::Mode;

#[derive(Debug)]
pub struct Readiness {
    store: Arc<Store>,
    synced: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Readiness {
            store,
            synced: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// True when every full source has synced and the sidecar is not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.is_synced()
    }

    /// True once every full source has synced.
    pub fn is_synced(&self) -> bool {
        if self.synced.load(Ordering::Acquire) {
            return true;
        }
        let all = self
            .store
            .sources()
            .iter()
            .all(|s| s.mode() != Mode::Full || s.is_synced());
        if all {
            self.synced.store(true, Ordering::Release);
        }
        all
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Full sources that have not synced yet, in config order.
    pub fn waiting_for(&self) -> Vec<Arc<str>> {
        self.store
            .sources()
            .iter()
            .filter(|s| s.mode() == Mode::Full && !s.is_synced())
            .map(|s| s.name().clone())
            .collect()
    }

    /// Full sources the origin refuses now, with its reason, in config order: retried with
    /// backoff, and named by `/readyz` so a mistyped topic is found at a glance.
    pub fn failed(&self) -> Vec<(Arc<str>, Arc<String>)> {
        self.store
            .sources()
            .iter()
            .filter(|s| !s.is_view())
            .filter_map(|s| Some((s.name().clone(), s.failure()?)))
            .collect()
    }

    /// Resolves once every full source has synced.
    pub async fn synced(&self) {
        for s in self.store.sources() {
            if s.mode() != Mode::Full {
                continue;
            }
            let mut rx = s.subscribe_changes();
            while !s.is_synced() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        let _ = self.is_synced();
    }

    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
}
