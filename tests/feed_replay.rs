//! The feed client's protocol checks fed arbitrary Sync streams (stray and out-of-order chunks,
//! gaps, duplicates, regressions, epoch changes, unknown topics) for a full and an on_demand
//! topic, as the session loop handles them: it never panics, a stream that breaks the protocol
//! is dropped, and no version a reader can see goes back within an epoch (checked by
//! `replay` after every message). The fuzz target `feed_client` runs the same with coverage.

use proptest::prelude::*;
use viewcar::internals::{decode_feed_streams, replay_feed};

fn run(data: &[u8]) -> viewcar::internals::Replayed {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(replay_feed(decode_feed_streams(data)))
}

#[test]
fn a_well_formed_stream_is_handled_whole() {
    // Stream 1: a snapshot of `t` at e0@2 (one chunk, last), then a batch 2 -> 3, progress.
    let bytes = [
        3, // 3 messages
        0, 0, 1, 0, 2, 1, 0, 2, 2, 1, // snapshot t @ e0/2, 1 entry a="vv"@2, last
        3, 0, 0, 2, 1, 1, 1, 1, 1, // changes t e0 2 -> 3, one change b="w", not deleted
        6, 0, 1, 0, 3, // progress t @ e0/3
    ];
    let r = run(&bytes);
    assert_eq!(r.protocol_errors, 0, "{r:?}");
    assert_eq!(r.handled, 3, "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FEED_REPLAY_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_streams_never_panic_or_go_back(data in prop::collection::vec(any::<u8>(), 0..600)) {
        run(&data);
    }
}
