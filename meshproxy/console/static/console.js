// meshproxy console: four views over /console/api (see meshproxy/console/api.py). No framework, no build step.
"use strict";

const API = "/console/api";
const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace: a name, never fetched
const POLL_MS = 2000;
const state = { view: "", timer: null, proxies: [] };

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function get(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const item of [].concat(value)) if (item !== "" && item !== null && item !== undefined) query.append(key, item);
  }
  const response = await fetch(API + path + (query.toString() ? "?" + query : ""));
  if (!response.ok) throw new Error(`${response.status}: ${(await response.text()).trim()}`);
  return response.json();
}

const fmtMs = (ms) => {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 2 : 0)} ms`;
};
const fmtRate = (rate) => rate === null || rate === undefined ? "– rps" : `${rate.toFixed(rate < 10 ? 2 : 1)} rps`;
const fmtTime = (seconds) => {
  const d = new Date(seconds * 1000);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
};

function formParams(form) {
  const params = {};
  for (const [key, value] of new FormData(form)) params[key] = value;
  return params;
}

// ------------------------------------------------------------------ navigation

function show() {
  const [view, arg] = (location.hash.slice(1) || "graph").split("/");
  clearInterval(state.timer);
  state.view = view;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  if (view === "graph") { refreshGraph(); state.timer = setInterval(refreshGraph, POLL_MS); }
  if (view === "traces") { if (arg) showTrace(arg); else findTraces(); }
  if (view === "requests") { refreshRequests(); state.timer = setInterval(refreshRequests, POLL_MS); }
  if (view === "routing") loadRoutes();
}

async function loadProxies() {
  state.proxies = (await get("/proxies")).proxies;
  $("#proxies").textContent = `${state.proxies.length} prox${state.proxies.length === 1 ? "y" : "ies"}`;
  for (const select of document.querySelectorAll(".proxy-select")) {
    for (const name of state.proxies) select.append(el("option", { value: name }, name));
  }
}

// ------------------------------------------------------------------ graph

function layout(nodes, edges) {
  // Kiali draws left to right: a node's column is its longest distance from a node nothing calls.
  const incoming = new Map(nodes.map((n) => [n.id, []]));
  for (const e of edges) incoming.get(e.target)?.push(e.source);
  const rank = new Map();
  const visit = (id, seen) => {
    if (rank.has(id)) return rank.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const r = Math.max(-1, ...incoming.get(id).map((src) => visit(src, seen))) + 1;
    rank.set(id, r);
    return r;
  };
  for (const n of nodes) visit(n.id, new Set());
  const columns = new Map();
  for (const n of [...nodes].sort((a, b) => a.label.localeCompare(b.label))) {
    const r = rank.get(n.id);
    if (!columns.has(r)) columns.set(r, []);
    columns.get(r).push(n);
  }
  const width = $("#graph").clientWidth || 1200;
  const count = Math.max(...columns.keys()) + 1;
  const dx = Math.max(200, (width - 220) / Math.max(1, count - 1));
  const positions = new Map();
  let height = 0;
  for (const [r, column] of columns) {
    column.forEach((n, i) => positions.set(n.id, { x: 110 + r * dx, y: 60 + i * 110 }));
    height = Math.max(height, 60 + column.length * 110);
  }
  return { positions, width: Math.max(width, 220 + (count - 1) * dx), height: Math.max(height, 300) };
}

function edgeLabel(e) {
  const lines = [fmtRate(e.rate)];
  if (e.requests) {
    if (e.errors || e.client_errors) lines.push(`${e.error_rate.toFixed(1)} % 5xx`);
    lines.push(`p50 ${fmtMs(e.p50_ms)} p99 ${fmtMs(e.p99_ms)}`);
    const flags = Object.keys(e.flags);
    if (flags.length) lines.push(flags.join(" "));
  }
  return lines;
}

async function refreshGraph() {
  let graph;
  try {
    graph = await get("/graph", { window: $("#graph-window").value });
  } catch (error) {
    $("#graph-status").textContent = `graph unavailable: ${error.message}`;
    return;
  }
  const showIdle = $("#graph-idle").checked;
  const edges = graph.edges.filter((e) => showIdle || e.requests > 0);
  const used = new Set(edges.flatMap((e) => [e.source, e.target]));
  const nodes = graph.nodes.filter((n) => showIdle || used.has(n.id));
  $("#graph-status").textContent = graph.seconds === null
    ? "first sample taken: rates appear at the next update"
    : `over the last ${graph.seconds.toFixed(0)} s (window ${graph.window_seconds} s), updated ${fmtTime(graph.at)}`;
  drawGraph(nodes, edges);
  drawEdgeTable(edges, new Map(graph.nodes.map((n) => [n.id, n])));
}

function drawGraph(nodes, edges) {
  const root = $("#graph");
  root.replaceChildren();
  if (!nodes.length) {
    root.append(svg("text", { x: 20, y: 30 }, "No traffic in this window yet."));
    return;
  }
  const { positions, width, height } = layout(nodes, edges);
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.append(svg("defs", {}, ...["healthy", "degraded", "failure", "idle"].map((h) =>
    svg("marker", { id: `arrow-${h}`, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse" }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: `arrow ${h}`,
      fill: getComputedStyle(document.documentElement).getPropertyValue(
        { healthy: "--ok", degraded: "--warn", failure: "--bad", idle: "--idle" }[h]) })))));
  for (const e of edges) {
    const a = positions.get(e.source), b = positions.get(e.target);
    const angle = Math.atan2(b.y - a.y, b.x - a.x);
    const x1 = a.x + 24 * Math.cos(angle), y1 = a.y + 24 * Math.sin(angle);
    const x2 = b.x - 26 * Math.cos(angle), y2 = b.y - 26 * Math.sin(angle);
    const group = svg("g", { class: `edge ${e.health}`, "data-source": e.source, "data-target": e.target,
      "data-health": e.health, "data-rate": e.rate ?? "", "data-requests": e.requests });
    group.append(svg("path", { d: `M${x1},${y1} L${x2},${y2}`, "marker-end": `url(#arrow-${e.health})` }));
    const lines = edgeLabel(e), mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
    const label = svg("text", { x: mx, y: my - 7 - 13 * (lines.length - 1), "text-anchor": "middle" });
    lines.forEach((line, i) => label.append(svg("tspan", { x: mx, dy: i ? 13 : 0 }, line)));
    group.append(label, svg("title", {}, `${e.source} → ${e.target}: ${e.requests} requests, codes ` +
      JSON.stringify(e.codes)));
    root.append(group);
  }
  for (const n of nodes) {
    const p = positions.get(n.id);
    const group = svg("g", { class: `node ${n.kind}`, "data-id": n.id, transform: `translate(${p.x},${p.y})` });
    group.append(n.kind === "service"
      ? svg("polygon", { points: "0,-24 22,16 -22,16" })
      : svg("circle", { r: 20 }));
    group.append(svg("text", { y: 40 }, n.label), svg("title", {}, n.id));
    root.append(group);
  }
}

function drawEdgeTable(edges, nodes) {
  const name = (id) => nodes.get(id)?.label ?? id;
  $("#edges").replaceChildren(el("tr", {}, ["From", "To", "Requests", "Rate", "5xx %", "p50", "p99", "Codes", "Flags"]
    .map((h) => el("th", {}, h))), ...edges.map((e) => el("tr", { class: e.health === "failure" ? "error" : "" },
    el("td", {}, name(e.source)), el("td", {}, name(e.target)), el("td", {}, e.requests), el("td", {}, fmtRate(e.rate)),
    el("td", {}, e.error_rate.toFixed(1)), el("td", {}, fmtMs(e.p50_ms)), el("td", {}, fmtMs(e.p99_ms)),
    el("td", {}, Object.entries(e.codes).map(([c, n]) => `${c}×${n}`).join(" ")),
    el("td", { class: "flags" }, Object.entries(e.flags).map(([f, n]) => `${f}×${n}`).join(" ")))));
}

// ------------------------------------------------------------------ traces

async function findTraces() {
  $("#trace-detail").replaceChildren();
  const { traces } = await get("/traces", formParams($("#trace-search")));
  $("#trace-list").replaceChildren(el("tr", {}, ["Started", "Root", "Services", "Spans", "Duration", "Flags"]
    .map((h) => el("th", {}, h))), ...traces.map((t) => el("tr", {
      class: `clickable trace ${t.error ? "error" : ""}`, "data-trace": t.trace_id,
      onclick: () => { location.hash = `traces/${t.trace_id}`; } },
    el("td", {}, fmtTime(t.start_us / 1e6)), el("td", {}, `${t.root_service}: ${t.root}`),
    el("td", {}, t.services.join(", ")), el("td", {}, t.spans), el("td", {}, fmtMs(t.duration_ms)),
    el("td", { class: "flags" }, t.flags.join(" ")))));
  if (!traces.length) $("#trace-list").append(el("tr", {}, el("td", {}, "No trace matches (only sampled requests have spans).")));
}

function faultText(span) {
  const f = span.fault;
  if (!f) return null;
  const parts = [];
  if (span.flags.includes("DI")) parts.push(`delay ${f.delay_seconds} s injected (${f.delay_percent} % of requests)`);
  if (span.flags.includes("FI")) parts.push(`abort ${f.abort_status ?? f.abort_grpc_status} injected (${f.abort_percent} % of requests)`);
  const route = span.route;
  if (!route) return `fault: ${parts.join(", ")}`;
  const where = route.virtual_service ? `VirtualService ${route.virtual_service} http[${route.index}]` : "the default route";
  return `fault: ${parts.join(", ")} by ${route.name !== "-" ? `route ${route.name} of ` : ""}${where}`;
}

function durationPlace(left, width) {
  // after the bar when there is room, else before it, else inside it (a bar from start to end)
  if (left + width <= 85) return `left:${left + width + 0.5}%`;
  if (left > 15) return `right:${100 - left + 0.5}%`;
  return `right:${Math.max(100 - left - width, 0) + 0.5}%;color:#fff`;
}

async function showTrace(traceId) {
  let trace;
  try {
    trace = await get(`/traces/${traceId}`);
  } catch (error) {
    $("#trace-detail").replaceChildren(el("p", {}, `Trace ${traceId}: ${error.message}`));
    return;
  }
  $("#trace-list").replaceChildren();
  const start = trace.start_us, total = Math.max(trace.duration_ms, 0.001);
  const rows = trace.spans.map((s) => {
    const left = ((s.start_us - start) / 1000) / total * 100;
    const width = Math.max(s.duration_ms / total * 100, 0.2);
    const fault = faultText(s);
    const delayed = s.flags.split(",").includes("DI");
    const notes = [fault && el("span", { class: "fault" }, fault), ...(s.explanation || []).filter((line) => !line.startsWith("fault"))]
      .filter(Boolean);
    return el("div", { class: `span ${s.error ? "error" : ""} ${delayed ? "delayed" : ""}`, "data-span": s.span_id,
      "data-flags": s.flags, "data-duration": s.duration_ms },
      el("div", { class: "row" },
        el("div", { class: "label", style: `padding-left:${6 + 16 * s.depth}px`,
          title: JSON.stringify(s.attributes, null, 1) },
          `${s.service} · ${s.name} `, el("span", { class: "muted" }, `${s.kind} ${s.status}`), " ",
          s.flags !== "-" ? el("span", { class: "flags" }, s.flags) : null),
        el("div", { class: "track" },
          el("div", { class: "bar", style: `left:${left}%;width:${width}%` }),
          el("span", { class: "bar-text", style: durationPlace(left, width) },
            fmtMs(s.duration_ms)))),
      notes.length ? el("div", { class: "span-notes" }, notes.map((n, i) => [i ? " · " : "", n])) : null);
  });
  $("#trace-detail").replaceChildren(
    el("h2", {}, `Trace ${trace.trace_id}`),
    el("p", { class: "muted" }, `${trace.spans.length} spans, ${fmtMs(trace.duration_ms)}, services ${trace.services.join(", ")}`,
      " · ", el("a", { href: "#traces" }, "back to search")),
    el("div", { class: "timeline" }, rows));
}

// ------------------------------------------------------------------ requests

async function refreshRequests() {
  let records;
  try {
    records = (await get("/requests", { ...formParams($("#request-filter")), limit: 300 })).requests;
  } catch (error) {
    $("#request-count").textContent = error.message;
    return;
  }
  $("#request-count").textContent = `${records.length} request(s), newest first`;
  $("#request-list").replaceChildren(el("tr", {}, ["Time", "Proxy", "Request", "Status", "Flags", "Route → destination",
    "Attempts", "Duration", "What happened", "Trace"].map((h) => el("th", {}, h))), ...records.map((r) => {
    const failed = r.status === 0 || r.status >= 500;
    const dest = r.destination
      ? `${r.destination.service || r.destination.cluster}${r.destination.subset ? " subset " + r.destination.subset : ""}`
      : r.route?.destinations?.length ? `(not sent: ${r.route.destinations.join(", ")})` : "–";
    const route = r.route ? (r.route.virtual_service ? `${r.route.virtual_service} http[${r.route.index}]` : "default") : "none";
    return el("tr", { class: `request ${failed ? "error" : ""}`, "data-status": r.status, "data-flags": r.flags },
      el("td", {}, fmtTime(r.time)), el("td", {}, `${r.proxy} (${r.direction})`),
      el("td", {}, `${r.method} ${r.authority}${r.path}`), el("td", {}, r.status),
      el("td", { class: "flags" }, r.flags === "-" ? "" : r.flags),
      el("td", {}, `${route} → ${dest}`, r.endpoint ? el("div", { class: "muted" }, r.endpoint) : null),
      el("td", {}, r.attempts), el("td", {}, fmtMs(r.duration_ms)),
      el("td", {}, el("ul", { class: "explanation" }, r.explanation.map((line) => el("li", {}, line))),
        el("div", { class: "muted" }, r.details)),
      el("td", {}, r.trace_id ? el("a", { href: `#traces/${r.trace_id}`, class: "trace-link" }, "trace") : "–"));
  }));
}

// ------------------------------------------------------------------ routing

function routeTable(vhost) {
  const header = el("tr", {}, ["#", "Route", "VirtualService", "Match", "Destination", "Timeout", "Retries", "Fault"]
    .map((h) => el("th", {}, h)));
  const rows = vhost.routes.map((r, i) => {
    const flags = [r.fault?.delay_percent ? "DI" : "", r.fault?.abort_percent ? "FI" : ""].join(",");
    return el("tr", {}, el("td", {}, i), el("td", {}, r.name),
      el("td", {}, r.virtual_service ? `${r.virtual_service} http[${r.index}]` : "default"),
      el("td", {}, r.match), el("td", {}, r.destination),
      el("td", {}, r.timeout_seconds ? `${r.timeout_seconds} s` : "none"), el("td", {}, r.retries),
      el("td", { class: "fault" }, r.fault ? faultText({ fault: r.fault, flags, route: null }) : ""));
  });
  return [el("h3", {}, `${vhost.name} `, el("span", { class: "muted" }, vhost.domains.join(", "))),
    el("table", { class: "grid" }, header, rows)];
}

async function loadRoutes() {
  const chosen = $("#which-route select[name=proxy]").value;
  const { proxies } = await get("/routes");
  $("#route-tables").replaceChildren(...proxies.filter((p) => !chosen || p.proxy === chosen).map((p) =>
    el("div", { class: "proxy-routes", "data-proxy": p.proxy },
      el("h2", {}, `${p.proxy} · config version ${p.version}`),
      el("h3", {}, "Loaded files"), el("ul", {}, p.files.map((f) => el("li", {}, f))),
      p.warnings.length ? el("ul", { class: "flags" }, p.warnings.map((w) => el("li", {}, w))) : null,
      p.virtual_hosts.map(routeTable))));
}

async function whichRoute(event) {
  event.preventDefault();
  const params = formParams(event.target);
  params.header = (params.headers || "").split("\n").map((line) => line.trim()).filter(Boolean);
  delete params.headers;
  try {
    const answer = await get("/route", params);
    $("#route-answer").hidden = false;
    $("#route-answer").textContent = [`${answer.proxy}: request ${answer.request}`, ...answer.lines].join("\n");
    $("#route-answer").dataset.chosen = answer.chosen ? answer.chosen.name : "";
  } catch (error) {
    $("#route-answer").hidden = false;
    $("#route-answer").textContent = error.message;
  }
}

// ------------------------------------------------------------------ start

$("#trace-search").addEventListener("submit", (event) => {
  event.preventDefault();
  if (location.hash !== "#traces") location.hash = "traces"; else findTraces();
});
$("#request-filter").addEventListener("submit", (event) => { event.preventDefault(); refreshRequests(); });
$("#which-route").addEventListener("submit", whichRoute);
$("#which-route select[name=proxy]").addEventListener("change", loadRoutes);
$("#graph-window").addEventListener("change", refreshGraph);
$("#graph-idle").addEventListener("change", refreshGraph);
window.addEventListener("hashchange", show);
loadProxies().finally(show);
