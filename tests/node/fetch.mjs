// One request with Node's fetch through HTTPS_PROXY, as worker code makes it.
// Usage: node fetch.mjs '{"url": ..., "method": ..., "headers": {...}, "body": ...}'
// Prints {"status", "headers", "body"} as JSON.
import { EnvHttpProxyAgent, fetch } from "undici";

const spec = JSON.parse(process.argv[2]);
const res = await fetch(spec.url, {
  method: spec.method,
  headers: spec.headers,
  body: spec.body ?? undefined,
  dispatcher: new EnvHttpProxyAgent(),
  redirect: "manual",
});
const headers = {};
res.headers.forEach((v, k) => { headers[k] = v; });
process.stdout.write(JSON.stringify({ status: res.status, headers, body: await res.text() }));
