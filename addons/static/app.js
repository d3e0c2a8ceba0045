"use strict";
const $ = (id) => document.getElementById(id);
const say = (text) => { $("status").textContent = text; };

async function call(method, path, body) {
  const headers = { "Authorization": "Bearer " + $("token").value.trim() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok) {
    const problem = await r.json().catch(() => ({ detail: r.statusText }));
    throw new Error((problem.field ? problem.field + ": " : "") + problem.detail);
  }
  return r.status === 204 ? null : r.json();
}

const base = () => "/v1/users/" + encodeURIComponent($("user").value.trim()) + "/secrets";

async function load() {
  const rows = await call("GET", base());
  const tbody = $("secrets");
  tbody.replaceChildren();
  for (const s of rows) {
    const tr = document.createElement("tr");
    for (const text of [s.name, s.origins.join(", "), s.updated_at]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const remove = document.createElement("button");
    remove.textContent = "Remove";
    remove.dataset.name = s.name;
    remove.addEventListener("click", () => run(async () => {
      await call("DELETE", base() + "/" + encodeURIComponent(s.name));
      await load();
      say("Removed " + s.name);
    }));
    const td = document.createElement("td");
    td.append(remove);
    tr.append(td);
    tbody.append(tr);
  }
  if (!rows.length) say("No secrets yet");
}

async function run(action) {
  try { await action(); } catch (e) { say(e.message); }
}

$("load").addEventListener("click", () => run(async () => { say(""); await load(); }));
$("add").addEventListener("click", () => run(async () => {
  const origins = $("origins").value.split(/\s+/).filter(Boolean);
  const value = $("value").value;
  $("value").value = "";  // never kept on the page
  const s = await call("POST", base(), { name: $("name").value.trim(), value, origins });
  await load();
  say("Added " + s.name);
}));
