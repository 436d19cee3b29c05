//! The feed client's protocol checks fed arbitrary Sync streams decoded from the input (stray
//! and out-of-order chunks, gaps, duplicates, regressions, epoch changes, unknown topics) for a
//! full and an on_demand topic, as its session loop handles them. `replay` panics if a version
//! a reader can see goes back within an epoch; a crash here is also any panic in the client.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viewcar::internals::{decode_feed_streams, replay_feed};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(replay_feed(decode_feed_streams(data)));
});
