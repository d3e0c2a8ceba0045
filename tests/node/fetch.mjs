// One request with Node's own fetch through HTTPS_PROXY, as worker code makes it: undici's
// EnvHttpProxyAgent as the global dispatcher, the proxy's CA from NODE_EXTRA_CA_CERTS.
// Usage: node fetch.mjs '{"url": ..., "method": ..., "headers": {...}, "body": ...}'
// Prints {"status", "headers", "body"} as JSON.
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

setGlobalDispatcher(new EnvHttpProxyAgent());
const spec = JSON.parse(process.argv[2]);
const res = await globalThis.fetch(spec.url, {
  method: spec.method,
  headers: spec.headers,
  body: spec.body ?? undefined,
  redirect: "manual",
});
const headers = {};
res.headers.forEach((v, k) => { headers[k] = v; });
process.stdout.write(JSON.stringify({ status: res.status, headers, body: await res.text() }));
