// The flood of benchmarks/flood.py from a lighter client: Node's @grpc/grpc-js.
//
// Python's grpc client spends about as much CPU per call as the gateway does, so on a small machine
// a Python flood mostly measures itself. This one sends pre-serialized GenerateRequest bytes (written
// by `flood.py --write-payload`) as streaming Generate calls, all at once, over several connections and
// tenants, and prints per-status counts and latency percentiles (send to final status) as JSON.
//
//   (cd benchmarks/node && npm install)
//   node benchmarks/node/flood.mjs --target 127.0.0.1:50051 --payload /tmp/payload.bin --requests 10240
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import grpc from "@grpc/grpc-js";

const { values: opts } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    payload: { type: "string" },
    requests: { type: "string", default: "10240" },
    tenants: { type: "string", default: "200" },
    channels: { type: "string", default: "16" },
  },
});
const payload = readFileSync(opts.payload);
const count = Number(opts.requests);
const identity = (buffer) => buffer;
// One connection per client object (grpc-js would otherwise share one per target).
const clients = Array.from({ length: Number(opts.channels) }, () =>
  new grpc.Client(opts.target, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 }));

function call(index) {
  return new Promise((resolve) => {
    const metadata = new grpc.Metadata();
    metadata.set("x-tenant-id", `tenant-${index % Number(opts.tenants)}`);
    const started = performance.now();
    const stream = clients[index % clients.length].makeServerStreamRequest(
      "/inflight.v1.Generation/Generate", identity, identity, payload, metadata);
    stream.on("data", () => {});
    stream.on("error", () => {});
    stream.on("status", (status) => resolve({ code: grpc.status[status.code], seconds: (performance.now() - started) / 1000 }));
  });
}

await Promise.all(clients.map((client) => new Promise((resolve) => client.waitForReady(Date.now() + 10000, resolve))));
const began = performance.now();
const pending = [];
for (let i = 0; i < count; i++) pending.push(call(i));
const issued = (performance.now() - began) / 1000;
const results = await Promise.all(pending);

const byCode = {};
for (const { code, seconds } of results) (byCode[code] ??= []).push(seconds);
const percentile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
const summary = Object.fromEntries(Object.entries(byCode).map(([code, list]) => {
  list.sort((a, b) => a - b);
  return [code, { count: list.length, p50: percentile(list, 0.5), p90: percentile(list, 0.9), p99: percentile(list, 0.99), max: list.at(-1) }];
}));
console.log(JSON.stringify({ requests: count, issued_seconds: issued, wall_seconds: (performance.now() - began) / 1000,
                             cpu_seconds: process.cpuUsage().user / 1e6 + process.cpuUsage().system / 1e6, by_code: summary }, null, 1));
clients.forEach((client) => client.close());
