"""The README's Python example, run against a live origin and sidecar with grpcio (a gRPC
implementation other than the one viewcar is built on): Publish a price at the origin, then
read the product page view with ReadOptions.after naming the version Publish returned.

Usage: python_publish_read.py PROTO_DIR OUT_DIR ORIGIN_ADDR SIDECAR_ADDR KEY
"""

import json
import sys

from grpc_tools import protoc

proto_dir, out_dir, origin_addr, sidecar_addr, key = sys.argv[1:6]
for proto in ("viewcar/cache/v1/cache.proto", "viewcar/feed/v1/feed.proto"):
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", proto])
    assert rc == 0, f"protoc {proto}: {rc}"
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from viewcar.cache.v1 import cache_pb2, cache_pb2_grpc  # noqa: E402
from viewcar.feed.v1 import feed_pb2, feed_pb2_grpc  # noqa: E402

feed = feed_pb2_grpc.FeedStub(grpc.insecure_channel(origin_addr))
cache = cache_pb2_grpc.CacheStub(grpc.insecure_channel(sidecar_addr))
for amount in range(5000, 5050):
    price = json.dumps({"id": key, "amount": amount, "currency": "EUR"}).encode()
    pos = feed.Publish(feed_pb2.PublishRequest(topic="prices", changes=[
        feed_pb2.Change(key=key, value=price),
    ])).position
    page = cache.Get(cache_pb2.GetRequest(source="product_page", key=key,
        options=cache_pb2.ReadOptions(wait_ms=5000,
            after=[cache_pb2.SourceVersion(source="prices", version=pos.version)])))
    assert page.item.found, page
    got = json.loads(page.item.value)["price"]["amount"]
    assert got == amount, f"after prices@{pos.version}: amount {got}, wrote {amount}"
print("ok", flush=True)
