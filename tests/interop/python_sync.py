"""A Sync stream read by grpcio, a gRPC implementation other than the one viewcar is built on:
the whole-topic snapshot (shared chunks, sent as they were encoded), then a change batch, then
the stream's end in the trailers; and a compressed Sync refused with a status naming why.

Reads commands on stdin: after printing "synced N" it waits for the line "published KEY",
then expects a batch changing KEY.

Usage: python_sync.py PROTO_DIR OUT_DIR ADDR TOPIC ROWS
"""

import queue
import sys

from grpc_tools import protoc

proto_dir, out_dir, addr, topic, rows = sys.argv[1:6]
rows = int(rows)
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                  "viewcar/feed/v1/feed.proto"])
assert rc == 0, f"protoc: {rc}"
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from viewcar.feed.v1 import feed_pb2, feed_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(addr)
feed = feed_pb2_grpc.FeedStub(channel)

requests = queue.Queue()
requests.put(feed_pb2.SyncRequest(subscribe=feed_pb2.Subscribe(topic=topic)))


def pending():
    while True:
        req = requests.get()
        if req is None:
            return
        yield req


responses = feed.Sync(pending(), timeout=60)


def updates():
    """The stream's messages other than Progress (sent on idle topics at any time)."""
    for resp in responses:
        if resp.WhichOneof("kind") != "progress":
            yield resp


updates = updates()
entries, chunks, position = {}, 0, None
for resp in updates:
    assert resp.WhichOneof("kind") == "snapshot", resp
    chunk = resp.snapshot
    assert chunk.topic == topic, chunk.topic
    assert chunk.total_entries == rows, chunk.total_entries
    position = (chunk.position.epoch, chunk.position.version)
    for e in chunk.entries:
        entries[e.key] = e.value
    chunks += 1
    if chunk.last:
        break
assert len(entries) == rows, f"{len(entries)} entries of {rows}"
print(f"synced {len(entries)} in {chunks} chunks", flush=True)

line = sys.stdin.readline().split()
assert line[0] == "published", line
key = line[1]
for resp in updates:
    assert resp.WhichOneof("kind") == "changes", resp
    batch = resp.changes
    assert batch.epoch == position[0] and batch.prev_version >= position[1], (batch, position)
    if any(c.key == key for c in batch.changes):
        break
print("changed", key, flush=True)

# Ending the requests ends the stream: the server closes it with status OK in the trailers.
requests.put(None)
rest = list(updates)
assert responses.code() == grpc.StatusCode.OK, (responses.code(), responses.details(), rest)

# A compressed request is refused, with a status that says what to do instead.
try:
    for _ in feed.Sync(iter([feed_pb2.SyncRequest(subscribe=feed_pb2.Subscribe(topic=topic))]),
                       compression=grpc.Compression.Gzip, timeout=30):
        pass
    raise AssertionError("a gzip-compressed Sync was served")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (e.code(), e.details())
    assert "uncompressed" in e.details(), e.details()
print("ok", flush=True)
