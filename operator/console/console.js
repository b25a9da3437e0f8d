// The hapair console: one page, no framework, no build step. Everything it shows comes
// from the controller's /ui/api/ (the same overview `hapair describe` prints), live over
// server-sent events. Text from the controller is only ever set as textContent, never as
// HTML, so a hostile string in a status cannot run.
"use strict";

const state = {
  session: null,
  overview: null,
  usage: {},
  stream: null,
  lastMessage: 0,
};

// How long without any message (the server pings every 5 s) before the link is shown lost.
const SILENCE_MS = 12000;

function $(id) { return document.getElementById(id); }

// el("td", {class: "x"}, "text", childNode, ...)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(kind, value) {
  return el("span", { class: `badge ${kind}-${value}` }, value ?? "unknown");
}

function replace(node, ...children) { node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined)); }

function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === undefined || seconds === null) return "";
  const d = Math.floor(seconds / 86400), h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60), s = Math.floor(seconds % 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function since(time) {
  if (!time) return "";
  const seconds = (Date.now() - Date.parse(time)) / 1000;
  return `${time} (${duration(Math.max(0, seconds))} ago)`;
}

// --- talking to the controller -------------------------------------------------------

async function api(method, path, body) {
  const headers = { "accept": "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && state.session) headers["x-csrf-token"] = state.session.csrf;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  const text = await response.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (response.status === 401) {
    signedOut(data && data.error);
    throw new Error(data && data.error || "not signed in");
  }
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function setConnection(which, text) {
  const node = $("connection");
  node.dataset.state = which;
  node.textContent = text;
}

function connect() {
  if (state.stream) state.stream.close();
  setConnection("connecting", "connecting…");
  const stream = new EventSource("/ui/api/stream");
  state.stream = stream;
  stream.addEventListener("overview", (e) => {
    state.lastMessage = Date.now();
    state.overview = JSON.parse(e.data);
    setConnection("live", "live");
    render();
  });
  stream.addEventListener("ping", () => {
    state.lastMessage = Date.now();
    setConnection("live", "live");
  });
  stream.addEventListener("signed-out", (e) => signedOut(e.data));
  stream.onerror = async () => {
    setConnection("lost", "connection to the controller lost; retrying");
    if (stream.readyState === EventSource.CLOSED) {
      // Refused rather than cut (the session ended, or the controller answered an error):
      // find out which, then try again.
      try {
        await api("GET", "/ui/api/session");
        setTimeout(() => { if (state.session) connect(); }, 1000);
      } catch (_) { /* signedOut has run, or the controller is unreachable: retried below */
        if (state.session) setTimeout(connect, 2000);
      }
    }
  };
}

setInterval(() => {
  if (state.session && state.lastMessage && Date.now() - state.lastMessage > SILENCE_MS) {
    setConnection("lost", "connection to the controller lost; retrying");
    connect();
    state.lastMessage = Date.now();
  }
}, 1000);

async function refreshUsage() {
  if (!state.session) return;
  try {
    const answer = await api("GET", "/ui/api/usage");
    state.usage = answer.nodes || {};
    render();
  } catch (_) { /* the stream shows the connection state */ }
}
setInterval(refreshUsage, 10000);

function signedOut(message) {
  state.session = null;
  state.overview = null;
  if (state.stream) { state.stream.close(); state.stream = null; }
  setConnection("idle", "not connected");
  $("sign-in-error").textContent = message || "";
  show("sign-in");
  $("who").textContent = "";
  $("sign-out").hidden = true;
}

async function signedIn(session) {
  state.session = session;
  $("who").textContent = `${session.actor}, until ${session.expires}`;
  $("sign-out").hidden = false;
  $("sign-in-error").textContent = "";
  connect();
  refreshUsage();
  render();
}

$("sign-in-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  try {
    const response = await fetch("/ui/api/session", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json" }, body: JSON.stringify({ token }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { signedOut(data.error || `sign-in refused (${response.status})`); return; }
    signedIn(data);
  } catch (err) {
    signedOut(`cannot reach the controller: ${err.message}`);
  }
});

$("sign-out").addEventListener("click", async () => {
  try { await api("DELETE", "/ui/api/session"); } catch (_) { /* signed out either way */ }
  signedOut("signed out");
});

// --- routing and rendering -----------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "group" && parts.length === 3) return { page: "group", namespace: parts[1], name: parts[2] };
  return { page: "overview" };
}
window.addEventListener("hashchange", render);

function show(id) {
  for (const section of ["sign-in", "overview", "group"]) $(section).hidden = section !== id;
}

function render() {
  if (!state.session) { show("sign-in"); return; }
  if (!state.overview) return;
  const where = route();
  if (where.page === "group") {
    const group = state.overview.groups.find((g) => g.key === `${where.namespace}/${where.name}`);
    if (group) { show("group"); renderGroup(group); return; }
  }
  show("overview");
  renderOverview();
}

// A group's key is "namespace/name".
function groupId(g) { return g.key; }
function groupPath(g) {
  const [namespace, ...name] = g.key.split("/");
  return `${encodeURIComponent(namespace)}/${encodeURIComponent(name.join("/"))}`;
}

function problems(g) {
  const found = [];
  if (g.error) found.push(`manifest refused (the last good one keeps running): ${g.error}`);
  if (g.deleting) found.push("being deleted");
  // Ready, Synced and Valid are good when True; Degraded and SplitBrain when False.
  for (const c of g.status.conditions || []) {
    const bad = ["Ready", "Synced", "Valid"].includes(c.type) ? c.status === "False"
      : ["Degraded", "SplitBrain"].includes(c.type) && c.status === "True";
    if (bad) found.push(`${c.type}: ${c.message || c.reason}`);
  }
  for (const d of g.nodeDetails || []) {
    if (d.configError) found.push(`${d.node} refused its config: ${d.configError}`);
    const r = d.report;
    if (!r) { found.push(`${d.node} has not reported`); continue; }
    if (r.health !== "Healthy") found.push(`${d.node} is ${r.health}${r.roleReason ? `: ${r.roleReason}` : ""}`);
    for (const s of r.steps || []) if (s.state === "Failed") found.push(`${d.node}: step ${s.name} failed${s.message ? `: ${s.message}` : ""}`);
    for (const m of r.monitors || []) if (!m.healthy) found.push(`${d.node}: monitor ${m.name} failing${m.message ? `: ${m.message}` : ""}`);
  }
  for (const v of g.volumes || []) {
    if (v.status.syncState && v.status.syncState !== "UpToDate") found.push(`volume ${v.name}: ${v.status.syncState}`);
  }
  return found;
}

function failoverText(f) {
  if (!f) return "never";
  return `${f.time}: ${f.from ? `${f.from} → ` : ""}${f.to} (${f.reason}, ${f.durationMs} ms)`;
}

function renderOverview() {
  const ov = state.overview;
  replace($("overview-errors"), (ov.errors || []).concat(ov.deletingVolumes || []).map((e) => el("li", {}, e)));
  const rows = ov.groups.map((g) => {
    const found = problems(g);
    return el("tr", { "data-group": groupId(g) },
      el("td", {}, el("a", { href: `#/group/${groupPath(g)}` }, groupId(g))),
      el("td", {}, badge("phase", g.status.phase || "Pending")),
      el("td", { class: "active" }, g.status.activeNode || "none"),
      el("td", {}, g.status.epoch),
      el("td", {}, (g.volumes || []).map((v) => `${v.name}: ${v.status.syncState || "unknown"}`).join(", ") || "no volumes"),
      el("td", {}, failoverText(g.status.lastFailover)),
      el("td", { class: found.length ? "bad" : "ok" }, found.length ? found.join("; ") : "none"));
  });
  replace($("groups").tBodies[0], rows);
  $("no-groups").hidden = ov.groups.length > 0;
}

function chart(samples) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 360 100");
  svg.setAttribute("preserveAspectRatio", "none");
  const end = Date.now();
  for (const which of ["cpu", "memory"]) {
    const points = (samples || []).map((s) => {
      const x = 360 - (end - s.time) / 10000;
      const y = 100 - (which === "cpu" ? s.cpuPercent : s.memoryPercent);
      return `${x.toFixed(1)},${y}`;
    });
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", which);
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    // A lone sample draws no line: the newest one is always marked.
    if (points.length) {
      const [x, y] = points[points.length - 1].split(",");
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("class", which);
      dot.setAttribute("cx", x);
      dot.setAttribute("cy", y);
      dot.setAttribute("r", "2.5");
      svg.append(dot);
    }
  }
  return svg;
}

function renderNode(g, name) {
  const status = (g.status.nodes || []).find((n) => n.name === name) || {};
  const detail = (g.nodeDetails || []).find((d) => d.node === name) || {};
  const report = detail.report || {};
  const hw = status.hardware || {};
  const last = g.status.lastFailover;
  const role = report.role || status.role;
  const inRole = role === "Primary" && last && last.to === name ? since(last.time) : "";
  const samples = state.usage[name] || [];
  const links = (status.links || []).map((l) => el("tr", {},
    el("td", {}, l.heartbeatLink === undefined ? "public" : `heartbeat ${l.heartbeatLink}`),
    el("td", {}, l.interface), el("td", {}, (l.addresses || []).join(", ")),
    el("td", {}, l.speedMbps ? `${l.speedMbps} Mb/s` : ""),
    el("td", { class: l.up ? "ok" : "bad" }, l.up ? "up" : "down"),
    el("td", {}, l.heartbeatLossPercent === undefined ? "" : `${l.heartbeatLossPercent}% loss`)));
  const heartbeats = (report.heartbeatLinks || []).map((h) => el("tr", {},
    el("td", {}, `link ${h.index}`), el("td", {}, `${h.localAddress} → ${h.peerAddress}`),
    el("td", { class: h.up ? "ok" : "bad" }, h.up ? "up" : "down"), el("td", {}, `${h.lossPercent}% loss`)));
  const storage = (g.volumes || []).map((v) => {
    const replica = (v.status.nodes || []).find((n) => n.node === name);
    const st = replica && replica.storage;
    return el("tr", {}, el("td", {}, v.name),
      el("td", {}, replica ? replica.diskState : "not reported"),
      el("td", {}, st ? `${st.kind === "BlockDevice" ? "device" : "file"} ${st.path}` : ""),
      el("td", {}, st ? bytes(st.sizeBytes) : ""),
      el("td", {}, st && st.filesystemFreeBytes !== undefined ? `${bytes(st.filesystemFreeBytes)} free` : ""),
      el("td", {}, st ? [st.device || "", st.deviceModel ? ` (${st.deviceModel})` : ""] : ""));
  });
  return el("div", { class: "node", "data-node": name },
    el("h3", {}, name, " ", badge("role", role || "unknown"), " ", badge("health", report.health || status.health || "Unknown")),
    report.roleReason ? el("p", { class: "muted" }, report.roleReason) : null,
    el("dl", {},
      el("dt", {}, "In role since"), el("dd", {}, inRole || "—"),
      el("dt", {}, "Uptime"), el("dd", {}, duration(status.uptimeSeconds)),
      el("dt", {}, "Last report"), el("dd", {}, status.lastReport || "never"),
      el("dt", {}, "Peer heard"), el("dd", {}, report.peerReachable ? `yes, last ${report.lastPeerHeartbeat || ""}` : "no"),
      el("dt", {}, "Agent"), el("dd", {}, status.agentVersion || ""),
      el("dt", {}, "Model"), el("dd", {}, hw.model || "unknown"),
      el("dt", {}, "OS"), el("dd", {}, status.os || ""),
      el("dt", {}, "Kernel"), el("dd", {}, hw.kernel || ""),
      el("dt", {}, "CPUs"), el("dd", {}, `${hw.cpus || "?"} × ${hw.cpuModel || "unknown CPU"}`),
      el("dt", {}, "Memory"), el("dd", {}, bytes(hw.memoryBytes)),
      el("dt", {}, "Now"), el("dd", { class: "legend" },
        el("span", { class: "cpu" }, `CPU ${hw.cpuPercent ?? "?"}%`), "  ",
        el("span", { class: "memory" }, `memory ${hw.memoryPercent ?? "?"}%`))),
    el("div", { class: "muted" }, `CPU and memory, last hour (${samples.length} samples)`),
    chart(samples),
    el("table", { class: "links" }, el("thead", {}, el("tr", {}, el("th", {}, "Network"), el("th", {}, "Interface"),
      el("th", {}, "Addresses"), el("th", {}, "Speed"), el("th", {}, "State"), el("th", {}, "Loss"))), el("tbody", {}, links)),
    heartbeats.length ? el("table", { class: "heartbeats" }, el("thead", {}, el("tr", {}, el("th", {}, "Heartbeat"),
      el("th", {}, "Path"), el("th", {}, "State"), el("th", {}, "Loss"))), el("tbody", {}, heartbeats)) : null,
    storage.length ? el("table", { class: "storage" }, el("thead", {}, el("tr", {}, el("th", {}, "Storage"),
      el("th", {}, "Disk"), el("th", {}, "Backing"), el("th", {}, "Size"), el("th", {}, "Filesystem"),
      el("th", {}, "Device"))), el("tbody", {}, storage)) : null);
}

function reportOf(g, node) {
  const d = (g.nodeDetails || []).find((x) => x.node === node);
  return d && d.report || {};
}

function renderFlow(g) {
  const table = $("flow");
  replace(table.tHead, el("tr", {}, el("th", {}, "Step or monitor"), g.nodes.map((n) => el("th", {}, n))));
  const names = [];
  for (const n of g.nodes) for (const s of reportOf(g, n).steps || []) if (!names.includes(s.name)) names.push(s.name);
  const monitors = [];
  for (const n of g.nodes) for (const m of reportOf(g, n).monitors || []) if (!monitors.includes(m.name)) monitors.push(m.name);
  const rows = names.map((step) => el("tr", { "data-step": step }, el("td", {}, `step ${step}`), g.nodes.map((n) => {
    const s = (reportOf(g, n).steps || []).find((x) => x.name === step);
    if (!s) return el("td", {}, "—");
    return el("td", {}, badge("state", s.state), s.restarts ? ` restarted ${s.restarts}×` : "", s.message ? el("div", { class: "muted" }, s.message) : null);
  }))).concat(monitors.map((monitor) => el("tr", {}, el("td", {}, `monitor ${monitor}`), g.nodes.map((n) => {
    const m = (reportOf(g, n).monitors || []).find((x) => x.name === monitor);
    if (!m) return el("td", {}, "—");
    return el("td", { class: m.healthy ? "ok" : "bad" }, m.healthy ? "healthy" : "failing", m.message ? el("div", { class: "muted" }, m.message) : null);
  }))));
  replace(table.tBodies[0], rows.length ? rows : [el("tr", {}, el("td", {}, "no steps reported"))]);
}

function renderVips(g) {
  replace($("vips").tBodies[0], (g.virtualIps || []).map((v) => {
    const holders = g.nodes.filter((n) => (reportOf(g, n).steps || []).some((s) => s.name === v.step && ["Running", "Stabilizing"].includes(s.state)));
    return el("tr", { "data-vip": v.name }, el("td", {}, v.name), el("td", {}, v.address), el("td", {}, v.interface),
      el("td", { class: holders.length > 1 ? "bad held-by" : "held-by" }, holders.join(", ") || "nobody"));
  }));
}

function renderVolumes(g) {
  replace($("volumes"), (g.volumes || []).map((v) => el("div", { class: "volume" },
    el("h3", {}, v.name, " ", el("span", { class: v.status.syncState === "UpToDate" ? "ok" : "bad" }, v.status.syncState || "unknown")),
    el("table", {}, el("thead", {}, el("tr", {}, ["Node", "Disk", "Role", "Connection", "Out of sync", "Resync", "Last verify"].map((h) => el("th", {}, h)))),
      el("tbody", {}, (v.status.nodes || []).map((n) => el("tr", {},
        el("td", {}, n.node), el("td", {}, n.diskState), el("td", {}, n.role || ""), el("td", {}, n.connection),
        el("td", {}, bytes(n.outOfSyncBytes)),
        el("td", {}, n.sync ? [
          el("span", { class: "bar" }, (() => { const d = el("div", {}); d.style.width = `${Math.min(100, Math.floor(100 * n.sync.doneBytes / Math.max(1, n.sync.totalBytes)))}%`; return d; })()),
          ` ${Math.floor(100 * n.sync.doneBytes / Math.max(1, n.sync.totalBytes))}% at ${bytes(n.sync.bytesPerSecond)}/s`,
          n.sync.etaSeconds !== undefined ? `, ETA ${duration(n.sync.etaSeconds)}` : ""] : "—"),
        el("td", {}, n.lastVerify ? `${n.lastVerify.finished}: ${bytes(n.lastVerify.mismatchedBytes)} mismatched of ${bytes(n.lastVerify.checkedBytes)} in ${duration(n.lastVerify.durationSeconds)}` : "never")))))))
    .concat((g.volumes || []).length ? [] : [el("p", { class: "muted" }, "no replicated volumes")]));
}

function renderFailover(g) {
  const f = g.status.lastFailover;
  const history = (g.events || []).filter((e) => ["PeerLost", "Promoting", "Promoted", "Resumed", "Demoted", "SelfFenced", "Switchover", "Failback", "ForceActive", "SplitBrainResolved", "ActiveNodeChanged"].includes(e.reason));
  replace($("failover"),
    el("p", { id: "last-failover" }, failoverText(f)),
    f && f.phases && f.phases.length ? el("ol", { class: "phases" }, f.phases.map((p) => el("li", {}, el("span", {}, `+${p.atMs} ms`), el("span", {}, p.phase)))) : null,
    history.length ? el("table", {}, el("tbody", {}, history.slice().reverse().map((e) => el("tr", {}, el("td", {}, e.time), el("td", {}, e.node || "controller"), el("td", {}, e.reason), el("td", {}, e.message))))) : null);
}

function renderEvents(g) {
  const type = $("event-type").value, node = $("event-node").value, search = $("event-search").value.toLowerCase();
  const nodeSelect = $("event-node");
  const options = ["", "controller"].concat(g.nodes);
  if (nodeSelect.options.length !== options.length) {
    replace(nodeSelect, options.map((o) => el("option", { value: o }, o || "all")));
    nodeSelect.value = node;
  }
  const rows = (g.events || []).slice().reverse().filter((e) =>
    (!type || e.type === type) && (!node || (e.node || "controller") === node) &&
    (!search || `${e.reason} ${e.message}`.toLowerCase().includes(search)));
  replace($("events").tBodies[0], rows.map((e) => el("tr", { class: e.type },
    el("td", {}, e.time), el("td", {}, e.type), el("td", {}, e.node || "controller"), el("td", {}, e.epoch || ""),
    el("td", { class: "reason" }, e.reason), el("td", {}, e.message))));
}
for (const id of ["event-type", "event-node", "event-search"]) $(id).addEventListener("input", render);

// --- actions -------------------------------------------------------------------------

function confirmAction(title, text) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

async function runAction(g, body, title, text) {
  if (!(await confirmAction(title, text))) return;
  const result = $("action-result");
  result.className = "";
  result.textContent = `${title}: sending…`;
  try {
    const path = `/ui/api/groups/${groupPath(g)}/actions`;
    let view = await api("POST", path, body);
    for (let i = 0; i < 120 && view.outcome === "Pending"; i++) {
      result.textContent = `${title} (${view.id}): ${view.message || "waiting for the agents"}`;
      await new Promise((r) => setTimeout(r, 500));
      view = await api("GET", `${path}/${encodeURIComponent(view.id)}`);
    }
    result.className = view.outcome === "Succeeded" ? "ok" : view.outcome === "Pending" ? "" : "bad";
    result.textContent = `${title} (${view.id}): ${view.outcome}${view.message ? `: ${view.message}` : ""}`;
  } catch (err) {
    result.className = "bad";
    result.textContent = `${title}: ${err.message}`;
  }
}

function renderActions(g) {
  const box = $("actions");
  if (!state.session || state.session.role !== "operator") {
    replace(box, el("span", { class: "muted" }, "Viewer: actions need an operator token."));
    return;
  }
  const active = g.status.activeNode;
  const maintenance = g.status.phase === "Maintenance";
  const buttons = [];
  for (const n of g.nodes) {
    if (active && n !== active) {
      buttons.push(el("button", { id: `action-switchover-${n}`, onclick: () => runAction(g, { action: "switchover", to: n },
        `Switch over to ${n}`,
        `The service stops on ${active} and starts on ${n}, in flow order, after ${n}'s volumes are in sync. No data is lost; clients see the short outage of the move.`) }, `Switch over to ${n}`));
    }
  }
  buttons.push(el("button", { id: maintenance ? "action-maintenance-off" : "action-maintenance-on",
    onclick: () => runAction(g, { action: "maintenance", enabled: !maintenance },
      maintenance ? "Leave maintenance" : "Enter maintenance",
      maintenance ? "Automatic failover resumes: a failure of the active node will move the service again."
        : "Automatic actions freeze: nothing fails over, nothing restarts, until maintenance is turned off. The service keeps running where it is.") },
    maintenance ? "Maintenance off" : "Maintenance on"));
  for (const n of g.nodes) {
    buttons.push(el("button", { class: "danger", id: `action-force-active-${n}`, onclick: () => runAction(g, { action: "forceActive", node: n },
      `Force ${n} active`,
      `${n} becomes active whatever its health and sync say (leases never overlap). Writes the other node made that did not reach ${n} are lost.`) }, `Force ${n} active`));
  }
  if (g.status.phase === "SplitBrain") {
    for (const n of g.nodes) {
      buttons.push(el("button", { class: "danger", id: `action-resolve-split-brain-${n}`, onclick: () => runAction(g, { action: "resolveSplitBrain", winner: n },
        `Resolve the split brain: ${n} wins`,
        `${n} keeps its data and becomes active. The other node's writes since the split are discarded (and recorded in its events), and it resyncs from ${n}.`) }, `${n} wins the split brain`));
    }
  }
  replace(box, buttons);
}

function renderGroup(g) {
  $("group-title").textContent = `HaGroup ${groupId(g)}`;
  const s = g.status;
  replace($("group-summary"),
    el("div", {}, el("span", {}, "Phase"), badge("phase", s.phase || "Pending")),
    el("div", {}, el("span", {}, "Active"), el("b", { id: "active-node" }, s.activeNode || "none")),
    el("div", {}, el("span", {}, "Epoch"), String(s.epoch)),
    el("div", {}, el("span", {}, "Witness"), g.witness),
    el("div", {}, el("span", {}, "Controller time"), state.overview.now));
  replace($("group-problems"), problems(g).map((p) => el("li", {}, p)));
  renderActions(g);
  replace($("nodes"), g.nodes.map((n) => renderNode(g, n)));
  renderVips(g);
  renderFlow(g);
  renderVolumes(g);
  renderFailover(g);
  renderEvents(g);
}

// --- start ---------------------------------------------------------------------------

(async () => {
  try {
    const response = await fetch("/ui/api/session", { credentials: "same-origin" });
    if (response.ok) { signedIn(await response.json()); return; }
    const data = await response.json().catch(() => ({}));
    signedOut(data.error === "not signed in" ? "" : data.error);
  } catch (err) {
    signedOut(`cannot reach the controller: ${err.message}`);
  }
})();
