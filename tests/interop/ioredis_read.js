// ioredis (Node.js, RESP2) against a viewcar sidecar's Redis protocol listener: it connects
// (its ready check reads INFO), reads keys plain, with MGET, pipelined and through SCAN, and
// is refused a write. An error event or a warning from ioredis fails the run.
// Run by tests/redis.rs: NODE_PATH=<dir with ioredis> node ioredis_read.js PORT
"use strict";
const Redis = require("ioredis");

const port = Number(process.argv[2]);
const problems = [];
const redis = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 1 });
redis.on("error", (e) => problems.push(`error event: ${e.message}`));
const origWarn = console.warn;
console.warn = (...a) => { problems.push(`warning: ${a.join(" ")}`); origWarn(...a); };

function check(cond, what) {
  if (!cond) throw new Error(what);
}

(async () => {
  await redis.connect();
  check((await redis.ping()) === "PONG", "PING");
  const one = await redis.get("products:p1");
  check(one === '{"name":"one"}', `GET products:p1 = ${one}`);
  check((await redis.get("products:nope")) === null, "GET of an absent key");
  const many = await redis.mget("products:p1", "products:p2", "products:nope");
  check(JSON.stringify(many) === JSON.stringify(['{"name":"one"}', "2", null]), `MGET ${many}`);
  const piped = await redis.pipeline().get("products:p1").get("products:p2").exec();
  check(piped.every(([err]) => err === null) && piped[1][1] === "2", `pipeline ${piped}`);
  const keys = [];
  await new Promise((resolve, reject) => {
    redis.scanStream({ match: "products:*", count: 1 })
      .on("data", (k) => keys.push(...k))
      .on("end", resolve)
      .on("error", reject);
  });
  check(JSON.stringify(keys.sort()) === JSON.stringify(["products:p1", "products:p2"]), `SCAN ${keys}`);
  let refused = null;
  try {
    await redis.set("products:p1", "x");
  } catch (e) {
    refused = e.message;
  }
  check(refused && refused.startsWith("READONLY"), `SET answered ${refused}`);
  const info = await redis.info("server");
  check(/redis_version:/.test(info), "INFO server");
  await redis.quit();
  check(problems.length === 0, problems.join("; "));
  console.log("ok");
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
