"""redis-py's client-side cache against a viewcar sidecar's Redis protocol listener.

Run by tests/redis.rs with the listener's port. redis-py keeps a near cache over RESP3
CLIENT TRACKING; this checks that it turns on (redis-py refuses a server it does not trust),
that a repeated read is served from it, and that a change at the origin reaches the cache:
once the test has changed the key (it writes the new value on stdin), reads move from the old
value to the new one and never back. Any warning redis-py emits fails the run.
"""

import sys
import time
import warnings

warnings.simplefilter("error")

import redis  # noqa: E402
from redis.cache import CacheConfig  # noqa: E402

port = int(sys.argv[1])
key = sys.argv[2]
r = redis.Redis(port=port, protocol=3, cache_config=CacheConfig())
first = r.get(key)
assert first is not None, "the key is there before the change"
assert r.get(key) == first
size = r.get_cache().size
assert size == 1, f"the read is cached: cache size {size}"
print("cached", flush=True)

expected = sys.stdin.readline().strip().encode()
deadline = time.monotonic() + 10
seen_new = False
while time.monotonic() < deadline:
    v = r.get(key)
    if v == expected:
        seen_new = True
    elif seen_new or v != first:
        raise SystemExit(f"read {v!r} after the new value (or neither old nor new)")
    if seen_new and r.get_cache().size == 1:
        break
    time.sleep(0.005)
assert seen_new, f"the cache still answers {first!r} 10 s after the change"
assert redis.Redis(port=port, protocol=2).get(key) == expected
print("ok", flush=True)
