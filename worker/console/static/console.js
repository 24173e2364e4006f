// The worker console. Every value from the server goes into the page as text
// (el() makes text nodes; nothing here assigns innerHTML), so a dead letter's
// "<script>" is shown, never run.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(node, ...children) {
  node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function flash(text, isError) {
  const node = $("flash");
  node.textContent = text;
  node.className = isError ? "error" : "";
  node.dataset.kind = isError ? "error" : "ok";
  node.hidden = false;
}

async function api(path, body) {
  const options = body === undefined
    ? {}
    : { method: "POST", headers: { "Content-Type": "application/json", "X-Worker-Console": "1" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the console does not answer: is `worker console` still running?");
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`the console answered ${response.status} without JSON`);
  }
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

// A confirmation that states its scope; resolves true on the button that repeats it.
function confirmAction(text, action, items) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  fill($("confirm-list"), ...(items || []).map((i) => el("li", {}, i)));
  $("confirm-yes").textContent = action;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.showModal();
  });
}

// ---- tabs

const refreshers = {};
let current = "dead-letters";
let timer = null;

function show(tab) {
  current = tab;
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== tab;
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("on", button.dataset.tab === tab);
  clearInterval(timer);
  const refresh = refreshers[tab];
  refresh.once();
  if (refresh.every) timer = setInterval(refresh.every, 1000);
}

// ---- dead letters

const dl = { kind: undefined, reason: undefined, offset: 0, matching: 0, limit: 100, watching: [] };

async function loadDeadLetters(rescan) {
  const q = new URLSearchParams({ offset: String(dl.offset) });
  if (dl.kind !== undefined) q.set("kind", dl.kind);
  if (dl.reason !== undefined) q.set("reason", dl.reason);
  if (rescan) q.set("rescan", "1");
  $("dl-summary").textContent = rescan ? "Scanning the dead letters…" : $("dl-summary").textContent;
  let data;
  try {
    data = await api("/api/dead-letters?" + q);
  } catch (err) {
    $("dl-summary").textContent = "Could not list the dead letters.";
    flash(err.message, true);
    return;
  }
  dl.matching = data.matching;
  dl.limit = data.limit;
  const more = data.truncated ? " (a scan stops at 10000: there may be more; replay some and rescan)" : "";
  $("dl-summary").textContent =
    `${data.total} dead letter(s) on ${data.subscription}, scanned ${when(data.scanned_at)} in ${data.scan_s}s, left in place${more}.`;
  $("dl-summary").dataset.total = String(data.total);
  fill($("dl-groups"), ...data.groups.map(groupRow));
  if (!data.groups.length) fill($("dl-groups"), el("tr", {}, el("td", { colspan: 7 }, "No dead letters.")));
  const filter = [dl.kind !== undefined ? `kind ${dl.kind || "(none)"}` : null, dl.reason ? `reason ${dl.reason}` : null].filter(Boolean).join(", ");
  $("dl-filter").textContent = filter ? `(${filter})` : "(all)";
  const last = Math.min(data.offset + data.entries.length, data.matching);
  $("dl-page").textContent = data.matching ? `${data.offset + 1}-${last} of ${data.matching}` : "none";
  $("dl-prev").disabled = data.offset === 0;
  $("dl-next").disabled = last >= data.matching;
  fill($("dl-rows"), ...data.entries.map(entryRow));
}

function groupRow(g) {
  const replay = g.kind
    ? el("button", { "data-testid": "dl-replay", onclick: () => replayGroup(g.kind, g.reason) }, "Replay…")
    : el("span", { title: "no kind: replay these by job id with `worker replay --job-id`" }, "no kind");
  return el("tr", { "data-testid": "dl-group", "data-kind": g.kind, "data-reason": g.reason },
    el("td", {}, g.kind || "(none)"),
    el("td", {}, g.reason),
    el("td", { class: "n", "data-testid": "dl-count" }, g.count),
    el("td", {}, when(g.first)),
    el("td", {}, when(g.last)),
    el("td", {}, String(g.example || "").slice(0, 160)),
    el("td", {},
      el("button", { "data-testid": "dl-show", onclick: () => { dl.kind = g.kind; dl.reason = g.reason; dl.offset = 0; loadDeadLetters(false); } }, "Show"),
      " ", replay));
}

function entryRow(e) {
  return el("tr", { "data-testid": "dl-row" },
    el("td", {}, el("button", { class: "link", "data-testid": "dl-open", onclick: () => openDetail(e.message_id) }, e.job_id || e.message_id)),
    el("td", {}, e.kind || "-"),
    el("td", {}, e.lane),
    el("td", {}, e.reason),
    el("td", { "data-testid": "dl-error" }, e.error),
    el("td", { class: "n" }, e.attempts ?? "-"),
    el("td", {}, when(e.dead_lettered_at)),
    el("td", { class: "n" }, e.replay_count));
}

async function openDetail(messageId) {
  let d;
  try {
    d = await api("/api/dead-letters/" + encodeURIComponent(messageId));
  } catch (err) {
    flash(err.message, true);
    return;
  }
  $("dl-detail-id").textContent = d.job_id || d.message_id;
  const fields = [["message id", d.message_id], ["job id", d.job_id], ["kind", d.kind], ["status", d.status],
    ["reason", d.reason], ["error", d.error], ["attempts", d.attempts], ["dead-lettered", when(d.dead_lettered_at)],
    ["dead-lettered by", d.by], ["replays", d.replay_count]];
  fill($("dl-detail-fields"), ...fields.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? "-"))));
  fill($("dl-detail-attrs"), ...Object.entries(d.attributes).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
  $("dl-detail-size").textContent = `${d.data_bytes} bytes${d.data_cut ? ", the first 2 MiB shown" : ""}`;
  $("dl-detail-data").textContent = d.data;
  $("dl-detail").hidden = false;
  $("dl-detail").scrollIntoView();
}

async function replayGroup(kind, reason) {
  let dry;
  flash(`dry run for kind ${kind}, reason ${reason}…`, false);
  try {
    dry = await api("/api/dry-run", { kind, reason });
  } catch (err) {
    flash(err.message, true);
    return;
  }
  flash(dry.message, false);
  if (!dry.count) return;
  const sample = dry.job_ids.length < dry.count ? [...dry.job_ids, `… and ${dry.count - dry.job_ids.length} more`] : dry.job_ids;
  const yes = await confirmAction(`${dry.message} Each is republished to the jobs topic, then acked.`, capitalise(dry.scope), sample);
  if (!yes) {
    flash(`not replayed: ${dry.scope} cancelled; nothing changed.`, false);
    return;
  }
  flash(`replaying: ${dry.scope}…`, false);
  let done;
  try {
    done = await api("/api/replay", { kind, reason, count: dry.count });
  } catch (err) {
    flash(err.message, true);
    return;
  }
  const failures = done.failures.map((f) => `${f.job_id}: ${f.error}`).join("; ");
  flash(done.message + (failures ? ` — ${failures}` : ""), !done.ok);
  dl.watching = done.job_ids;
  watchReplayed();
  loadDeadLetters(false);
}

function capitalise(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

async function watchReplayed() {
  if (!dl.watching.length) return;
  $("dl-watch").hidden = false;
  const rows = await Promise.all(dl.watching.map(async (id) => {
    try {
      return await api("/api/jobs/" + encodeURIComponent(id));
    } catch (err) {
      return { job_id: id, result: null, message: err.message };
    }
  }));
  fill($("dl-watch-rows"), ...rows.map((r) => el("tr", { "data-testid": "dl-watched", "data-job-id": r.job_id, "data-status": r.result ? r.result.status : "waiting" },
    el("td", {}, r.job_id),
    el("td", { class: r.result ? r.result.status : "" }, r.result ? r.result.status : "waiting for its result…"),
    el("td", {}, r.result ? when(r.result.finished_at) : "-"))));
}

refreshers["dead-letters"] = { once: () => loadDeadLetters(false), every: watchReplayed };

// ---- instances

let lastConfirmations = {};

async function loadInstances() {
  $("in-summary").textContent = "Asking the worker instances…";
  try {
    renderInstances(await api("/api/instances"));
  } catch (err) {
    $("in-summary").textContent = "No answer.";
    flash(err.message, true);
  }
}

function renderInstances(data) {
  const n = data.instances.length;
  $("in-summary").textContent = n
    ? `${n} worker instance(s) answered on ${data.topic} within ${data.wait_s}s.`
    : `No worker instance answered on ${data.topic} within ${data.wait_s}s.`;
  $("in-summary").dataset.count = String(n);
  fill($("in-rows"), ...data.instances.map((i) => el("tr", { "data-testid": "in-row", "data-replica": i.replica },
    el("td", {}, i.replica),
    el("td", { "data-testid": "in-paused" }, ...pausedCells(i.paused)),
    el("td", {}, ...(i.targets.length ? i.targets.map((t) => el("div", {},
      `${t.name}: `, el("span", { class: t.breaker }, t.breaker), `, limit ${t.limit ?? "-"}/${t.ceiling ?? "-"}, ${t.in_flight} in flight`)) : ["- (no call made yet)"])),
    el("td", {}, `${i.in_flight} / ${i.held}`),
    el("td", {}, ...(i.lanes.length ? i.lanes.map((l) => el("div", {}, `${l.name}: ${l.in_flight}, ${l.calling}, ${l.waiting}, ${l.held}`)) : ["-"])),
    el("td", { "data-testid": "in-confirmed" }, lastConfirmations[i.replica] === undefined ? "-" :
      el("span", { class: lastConfirmations[i.replica] ? "ok" : "no" }, lastConfirmations[i.replica] ? "confirmed" : "NOT confirmed")))));
}

function pausedCells(paused) {
  const kinds = Object.keys(paused);
  if (!kinds.length) return ["-"];
  return kinds.map((k) => el("div", {}, paused[k] ? `${k} (until ${when(paused[k])})` : k));
}

async function order(paused) {
  const kind = $("in-kind").value;
  const duration = $("in-duration").value.trim();
  if (!kind) {
    flash("choose a kind first", true);
    return;
  }
  const n = $("in-summary").dataset.count || "0";
  const scope = paused
    ? `pause ${kind} on every worker instance (${n} answered last time)${duration ? ` for ${duration}` : " until resumed"}`
    : `resume ${kind} on every worker instance (${n} answered last time)`;
  const detail = paused ? "Its jobs wait in Pub/Sub while it is paused." : "Its waiting jobs are called again.";
  if (!(await confirmAction(`${capitalise(scope)}? ${detail}`, capitalise(scope)))) {
    flash(`cancelled: nothing sent.`, false);
    return;
  }
  flash(`${paused ? "pausing" : "resuming"} ${kind}…`, false);
  try {
    const done = await api(paused ? "/api/pause" : "/api/resume", paused ? { kind, duration } : { kind });
    lastConfirmations = Object.fromEntries(done.confirmations.map((c) => [c.replica, c.confirmed]));
    renderInstances(done);
    flash(done.message, !done.ok);
  } catch (err) {
    flash(err.message, true);
  }
}

refreshers.instances = { once: loadInstances };

// ---- live results

async function loadResults() {
  const q = new URLSearchParams({ kind: $("rs-kind").value.trim(), status: $("rs-status").value });
  let data;
  try {
    data = await api("/api/results?" + q);
  } catch (err) {
    $("rs-summary").textContent = err.message;
    return;
  }
  if (data.error) $("rs-summary").textContent = data.error;
  else $("rs-summary").textContent = `Listening on ${data.subscription}${data.unreadable ? ` (${data.unreadable} unreadable messages skipped)` : ""}.`;
  const total = data.rate.reduce((a, b) => a + b, 0);
  $("rs-rate").textContent = `${(total / data.rate.length).toFixed(1)}/s over 2 min, ${data.rate[data.rate.length - 1]} in the last second`;
  spark(data.rate);
  fill($("rs-counts"), ...data.counts.map((c) => el("tr", { "data-testid": "rs-count", "data-kind": c.kind, "data-status": c.status },
    el("td", {}, c.kind || "-"), el("td", { class: c.status }, c.status), el("td", { class: "n" }, c.count))));
  fill($("rs-rows"), ...data.results.map(resultRow));
}

function links(r) {
  return [r.logs ? el("a", { href: r.logs, target: "_blank", rel: "noopener noreferrer" }, "logs") : null, " ",
    r.trace ? el("a", { href: r.trace, target: "_blank", rel: "noopener noreferrer" }, "trace") : null];
}

function resultRow(r) {
  return el("tr", { "data-testid": "rs-row", "data-job-id": r.job_id, "data-status": r.status },
    el("td", {}, r.job_id || "-"), el("td", {}, r.kind || "-"), el("td", { class: r.status }, r.status),
    el("td", {}, r.error || ""), el("td", {}, when(r.finished_at)), el("td", { class: "n" }, r.duration_ms),
    el("td", {}, r.batch || ""), el("td", {}, ...links(r)));
}

function spark(rate) {
  const svg = $("rs-spark");
  const max = Math.max(1, ...rate);
  const points = rate.map((v, i) => `${(i * 240) / (rate.length - 1)},${31 - (v / max) * 30}`).join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.replaceChildren(line);
}

async function findJob(event) {
  event.preventDefault();
  const id = $("rs-job").value.trim();
  if (!id) return;
  try {
    const found = await api("/api/jobs/" + encodeURIComponent(id));
    if (found.result) {
      const r = found.result;
      fill($("rs-found"), el("span", { class: r.status, "data-testid": "rs-found-status" }, r.status),
        ` ${r.error || ""} finished ${when(r.finished_at)} `, ...links(r));
    } else {
      fill($("rs-found"), found.message, " ", el("a", { href: found.logs, target: "_blank", rel: "noopener noreferrer" }, "logs"));
    }
  } catch (err) {
    flash(err.message, true);
  }
}

refreshers.results = { once: loadResults, every: loadResults };

// ---- batches

async function loadBatches() {
  let data;
  try {
    data = await api("/api/batches");
  } catch (err) {
    flash(err.message, true);
    return;
  }
  if (!data.batches.length) {
    fill($("bt-list"), el("p", {}, data.error || "No batch result heard yet."));
    return;
  }
  fill($("bt-list"), ...data.batches.map((b) => el("div", { class: "batch", "data-testid": "batch", "data-batch-id": b.batch_id, "data-done": String(b.done) },
    el("strong", {}, b.batch_id), " ",
    el("span", { "data-testid": "batch-text" }, b.total === null ? "no child result yet" :
      `${b.finished} of ${b.total} finished: ${b.succeeded} succeeded, ${b.failed} failed, ${b.rejected} rejected, ${b.expired} expired, ${b.cancelled} cancelled, ${b.outstanding} outstanding${b.done ? " — done" : ""}`),
    el("progress", { max: b.total || 1, value: b.finished || 0, "data-testid": "batch-bar" }))));
}

refreshers.batches = { once: loadBatches, every: loadBatches };

// ---- jobs waiting on Cloud Tasks for their not_before

const sc = { offset: 0, limit: 100, watching: [] };

async function loadScheduled() {
  let data;
  try {
    data = await api("/api/scheduled?" + new URLSearchParams({ offset: String(sc.offset) }));
  } catch (err) {
    $("sc-summary").textContent = "Could not list the scheduled jobs.";
    flash(err.message, true);
    return;
  }
  renderScheduled(data);
}

function renderScheduled(data) {
  sc.offset = data.offset;
  sc.limit = data.limit;
  $("sc-summary").textContent = `${data.total} scheduled job(s) in ${data.queue}, soonest first.`;
  $("sc-summary").dataset.total = String(data.total);
  const last = Math.min(data.offset + data.jobs.length, data.matching);
  $("sc-page").textContent = data.matching ? `${data.offset + 1}-${last} of ${data.matching}` : "none";
  $("sc-prev").disabled = data.offset === 0;
  $("sc-next").disabled = last >= data.matching;
  fill($("sc-rows"), ...data.jobs.map((j) => el("tr", { "data-testid": "sc-row", "data-job-id": j.job_id, "data-kind": j.kind },
    el("td", {}, j.job_id), el("td", {}, j.kind), el("td", {}, when(j.not_before)), el("td", {}, when(j.publish_at)),
    el("td", { title: j.task }, j.short), el("td", { class: "n" }, j.times_put_off),
    el("td", {}, el("button", { "data-testid": "sc-cancel", onclick: () => cancelScheduled(j) }, "Cancel…")))));
  if (!data.jobs.length) fill($("sc-rows"), el("tr", {}, el("td", { colspan: 7 }, "No job is waiting for its not_before.")));
}

async function cancelScheduled(j) {
  const scope = `cancel scheduled job ${j.job_id} of kind ${j.kind}`;
  if (!(await confirmAction(`${capitalise(scope)}? Its Cloud Tasks task ${j.short} is deleted before ${when(j.not_before)}, so it never runs; its result is recorded as cancelled.`, capitalise(scope)))) {
    flash("cancelled: nothing sent.", false);
    return;
  }
  flash(`cancelling scheduled job ${j.job_id}…`, false);
  try {
    const done = await api("/api/scheduled/cancel", { job_id: j.job_id, kind: j.kind, offset: sc.offset });
    flash(done.message, !done.ok);
    if (done.ok && !sc.watching.includes(j.job_id)) sc.watching.unshift(j.job_id);
    if (done.jobs) renderScheduled(done);
    watchCancelled();
  } catch (err) {
    flash(err.message, true);
  }
}

async function watchCancelled() {
  if (!sc.watching.length) return;
  $("sc-watch").hidden = false;
  const rows = await Promise.all(sc.watching.map(async (id) => {
    try {
      return await api("/api/jobs/" + encodeURIComponent(id));
    } catch (err) {
      return { job_id: id, result: null, message: err.message };
    }
  }));
  fill($("sc-watch-rows"), ...rows.map((r) => el("tr", { "data-testid": "sc-watched", "data-job-id": r.job_id, "data-status": r.result ? r.result.status : "waiting" },
    el("td", {}, r.job_id),
    el("td", { class: r.result ? r.result.status : "" }, r.result ? r.result.status : "waiting for its result…"),
    el("td", {}, r.result ? r.result.error || "" : ""))));
}

refreshers.scheduled = { once: loadScheduled, every: watchCancelled };

// ---- Cloud Run job executions

async function loadExecutions() {
  let data;
  try {
    data = await api("/api/executions");
  } catch (err) {
    $("ex-summary").textContent = "Could not list the executions.";
    flash(err.message, true);
    return;
  }
  renderExecutions(data.executions);
  const running = data.executions.filter((e) => e.state === "running").length;
  $("ex-summary").textContent = `${data.executions.length} recent execution(s), ${running} running.` + (data.message ? ` ${data.message}` : "");
}

function renderExecutions(rows) {
  fill($("ex-rows"), ...rows.map((e) => el("tr", { "data-testid": "ex-row", "data-job-id": e.job_id, "data-state": e.state },
    el("td", {}, e.log_uri ? el("a", { href: e.log_uri, target: "_blank", rel: "noopener noreferrer" }, e.short) : e.short),
    el("td", {}, e.kind), el("td", {}, e.job_id || "-"), el("td", { class: e.state }, e.state), el("td", {}, e.tasks),
    el("td", {}, when(e.created)), el("td", {}, when(e.completed)),
    el("td", {}, e.state === "running" && e.job_id
      ? el("button", { "data-testid": "ex-cancel", onclick: () => cancelExecution(e) }, "Cancel…") : ""))));
}

async function cancelExecution(e) {
  const scope = `cancel execution ${e.short} of job ${e.job_id} (kind ${e.kind})`;
  if (!(await confirmAction(`${capitalise(scope)}? Its tasks are stopped and the job's result is recorded as cancelled.`, capitalise(scope)))) {
    flash("cancelled: nothing sent.", false);
    return;
  }
  flash(`cancelling ${e.short}…`, false);
  try {
    const done = await api("/api/cancel", { job_id: e.job_id });
    flash(done.message, !done.ok);
    renderExecutions(done.executions);
  } catch (err) {
    flash(err.message, true);
  }
}

refreshers.executions = { once: loadExecutions };

// ---- start

document.addEventListener("DOMContentLoaded", async () => {
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => show(button.dataset.tab));
  $("dl-rescan").addEventListener("click", () => loadDeadLetters(true));
  $("dl-prev").addEventListener("click", () => { dl.offset = Math.max(0, dl.offset - dl.limit); loadDeadLetters(false); });
  $("dl-next").addEventListener("click", () => { dl.offset += dl.limit; loadDeadLetters(false); });
  $("dl-all").addEventListener("click", () => { dl.kind = undefined; dl.reason = undefined; dl.offset = 0; loadDeadLetters(false); });
  $("dl-detail-close").addEventListener("click", () => { $("dl-detail").hidden = true; });
  $("in-refresh").addEventListener("click", loadInstances);
  $("ex-refresh").addEventListener("click", loadExecutions);
  $("sc-refresh").addEventListener("click", loadScheduled);
  $("sc-prev").addEventListener("click", () => { sc.offset = Math.max(0, sc.offset - sc.limit); loadScheduled(); });
  $("sc-next").addEventListener("click", () => { sc.offset += sc.limit; loadScheduled(); });
  $("in-pause").addEventListener("click", () => order(true));
  $("in-resume").addEventListener("click", () => order(false));
  $("rs-lookup").addEventListener("submit", findJob);
  try {
    const meta = await api("/api/kinds");
    $("project").textContent = `project ${meta.project}`;
    fill($("in-kind"), ...meta.kinds.map((k) => el("option", { value: k }, k)));
  } catch (err) {
    flash(err.message, true);
  }
  show(location.hash.slice(1) in refreshers ? location.hash.slice(1) : "dead-letters");
});
