// Tally's dashboard: reads the query API of the process that serves it (same origin).
"use strict";

const fmt = new Intl.NumberFormat("en-US");
const $ = (id) => document.getElementById(id);
const SCALE = 120; // the bars run from 0 to 120 % of the limit
const MARKS = [80, 100, 110];

// The API key, when the API requires one: kept for this tab only (sessionStorage).
const KEY_ITEM = "tally-api-key";

async function getJson(path) {
  const headers = { accept: "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.authorization = `Bearer ${key}`;
  const resp = await fetch(path, { headers });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    throw new Error(body.message || `${resp.status} ${resp.statusText}`);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// "1 d 4 h", "3 h 20 min", "12 min"
function duration(ms) {
  const min = Math.max(0, Math.floor(ms / 60000));
  const d = Math.floor(min / 1440);
  const h = Math.floor((min % 1440) / 60);
  const m = min % 60;
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${m} min`;
  return `${m} min`;
}

function graceText(meter) {
  // Shown while over the soft limit; once blocked the grace no longer matters.
  if (!meter.grace_until || meter.state !== "over") return "";
  const left = Date.parse(meter.grace_until) - Date.now();
  return left > 0 ? `grace ends in ${duration(left)}` : "grace over";
}

function usageBar(meter) {
  const bar = el("span", { class: "bar" });
  const pct = meter.percent == null ? 0 : meter.percent;
  const fill = el("span", { class: `fill state-${meter.state}` });
  fill.style.width = `${Math.min(pct, SCALE) / SCALE * 100}%`;
  bar.append(fill);
  if (meter.limit != null) {
    for (const m of MARKS) {
      const mark = el("span", { class: "mark", "data-percent": String(m), title: `${m} %` });
      mark.style.left = `${m / SCALE * 100}%`;
      bar.append(mark);
    }
  }
  const label = meter.percent == null ? "" : `${meter.percent.toFixed(1)} %`;
  return [bar, el("span", { class: "pct", text: label })];
}

let summary = null;

async function loadCustomer(customer) {
  $("customer-error").hidden = true;
  try {
    summary = await getJson(`/v1/usage/summary?customer=${encodeURIComponent(customer)}`);
  } catch (e) {
    $("summary").hidden = true;
    $("customer-error").textContent = e.message;
    $("customer-error").hidden = false;
    return;
  }
  const url = new URL(location.href);
  url.searchParams.set("customer", customer);
  history.replaceState(null, "", url);
  $("plan-line").textContent =
    `${summary.customer}: plan ${summary.plan}, period ${summary.period_start.slice(0, 10)} to ${summary.period_end.slice(0, 10)}`;
  const rows = summary.meters.map((m) => {
    const state = el("td", { class: "state" },
      el("span", { class: `badge state-${m.state}`, text: m.state }));
    const grace = graceText(m);
    if (grace) state.append(el("span", { class: "grace", text: grace }));
    return el("tr", { "data-meter": m.meter },
      el("td", { class: "meter", text: m.meter }),
      el("td", { class: "num usage", text: `${fmt.format(m.usage)} ${m.unit}` }),
      el("td", { class: "num limit", text: m.limit == null ? "unlimited" : fmt.format(m.limit) }),
      el("td", { class: "used" }, ...usageBar(m)),
      state);
  });
  $("meters").tBodies[0].replaceChildren(...rows);
  const select = $("chart-meter");
  const chosen = select.value || "api_requests";
  select.replaceChildren(...summary.meters.map((m) => el("option", { value: m.meter, text: m.meter })));
  select.value = summary.meters.some((m) => m.meter === chosen) ? chosen : summary.meters[0].meter;
  $("summary").hidden = false;
  await drawChart();
}

async function drawChart() {
  if (!summary) return;
  const meter = $("chart-meter").value;
  const q = new URLSearchParams({
    customer: summary.customer, meter, from: summary.period_start, window: "day",
  });
  const chart = $("chart");
  let series;
  try {
    series = await getJson(`/v1/usage?${q}`);
  } catch (e) {
    chart.replaceChildren(el("p", { class: "error", text: e.message }));
    return;
  }
  const start = Date.parse(summary.period_start);
  const end = Date.parse(summary.period_end);
  const days = Math.max(1, Math.round((end - start) / 86400000));
  const W = 720, H = 180, pad = 30;
  const max = Math.max(1, ...series.points.map((p) => p.value));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + pad}`);
  svg.setAttribute("width", String(W));
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${meter} per day`);
  const slot = (W - pad) / days;
  for (const p of series.points) {
    const i = Math.floor((Date.parse(p.start) - start) / 86400000);
    const h = (p.value / max) * (H - 10);
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("class", "bar-day");
    r.setAttribute("x", String(pad + i * slot + 1));
    r.setAttribute("y", String(H - h));
    r.setAttribute("width", String(Math.max(1, slot - 2)));
    r.setAttribute("height", String(h));
    r.setAttribute("data-day", p.start.slice(0, 10));
    r.setAttribute("data-value", String(p.value));
    const t = document.createElementNS(ns, "title");
    t.textContent = `${p.start.slice(0, 10)}: ${fmt.format(p.value)} ${series.unit}`;
    r.append(t);
    svg.append(r);
  }
  const label = (x, y, text, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", String(x));
    t.setAttribute("y", String(y));
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  };
  label(pad - 4, 10, fmt.format(max), "end");
  label(pad - 4, H, "0", "end");
  label(pad, H + 16, summary.period_start.slice(0, 10), "start");
  label(W, H + 16, summary.period_end.slice(0, 10), "end");
  chart.replaceChildren(svg);
}

const STATS = [
  ["Events accepted", (s) => s.events.accepted],
  ["Duplicates dropped", (s) => s.events.duplicate],
  ["Events rejected", (s) => s.events.rejected],
  ["Events aggregated", (s) => s.aggregated_events],
  ["Aggregator lag (records)", (s) => s.consumer_lag.aggregator],
  ["Enforcer lag (records)", (s) => s.consumer_lag.enforcer],
  ["Customers in the enforcer", (s) => s.customers_in_memory],
  ["Checks allowed", (s) => s.decisions.allow],
  ["Checks warned", (s) => s.decisions.warn],
  ["Checks blocked", (s) => s.decisions.block],
  ["Stripe reports accepted", (s) => s.billing_reports.accepted],
];

async function loadOperator() {
  $("operator-error").hidden = true;
  try {
    const [stats, totals] = await Promise.all([
      getJson("/v1/operator/stats"), getJson("/v1/usage/totals"),
    ]);
    $("stats").replaceChildren(...STATS.flatMap(([name, get]) => {
      const v = get(stats);
      return [el("dt", { text: name }),
        el("dd", { "data-stat": name, text: v == null ? "-" : fmt.format(v) })];
    }));
    $("totals").tBodies[0].replaceChildren(...totals.meters.map((m) =>
      el("tr", { "data-meter": m.meter },
        el("td", { text: m.meter }),
        el("td", { class: "num", text: `${fmt.format(m.usage)} ${m.unit}` }),
        el("td", { class: "num", text: fmt.format(m.customers) }))));
    const select = $("top-meter");
    if (!select.options.length) {
      select.replaceChildren(...totals.meters.map((m) => el("option", { value: m.meter, text: m.meter })));
      select.value = "api_requests";
    }
    await loadTop();
  } catch (e) {
    $("operator-error").textContent = e.message;
    $("operator-error").hidden = false;
  }
}

async function loadTop() {
  const meter = $("top-meter").value;
  const top = await getJson(`/v1/usage/top?meter=${encodeURIComponent(meter)}&limit=10`);
  $("top").tBodies[0].replaceChildren(...top.customers.map((c, i) =>
    el("tr", { "data-customer": c.customer },
      el("td", { class: "num", text: String(i + 1) }),
      el("td", {}, el("a", { href: `?customer=${encodeURIComponent(c.customer)}`, text: c.customer })),
      el("td", { class: "num", text: `${fmt.format(c.usage)} ${top.unit}` }))));
}

function show(view) {
  const operator = view === "operator";
  $("customer-view").hidden = operator;
  $("operator-view").hidden = !operator;
  $("tab-customer").classList.toggle("active", !operator);
  $("tab-operator").classList.toggle("active", operator);
  if (operator) loadOperator();
}

$("customer-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loadCustomer($("customer").value.trim());
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set" : "tly_…";
  if (!$("operator-view").hidden) loadOperator();
  else if ($("customer").value.trim()) loadCustomer($("customer").value.trim());
});
if (sessionStorage.getItem(KEY_ITEM)) $("api-key").placeholder = "key set";
$("chart-meter").addEventListener("change", drawChart);
$("top-meter").addEventListener("change", () => loadTop().catch((e) => {
  $("operator-error").textContent = e.message;
  $("operator-error").hidden = false;
}));
$("tab-customer").addEventListener("click", () => show("customer"));
$("tab-operator").addEventListener("click", () => show("operator"));

// Refresh what is on screen every 10 s.
setInterval(() => {
  if (!$("operator-view").hidden) loadOperator();
  else if (summary) loadCustomer(summary.customer);
}, 10000);

const initial = new URLSearchParams(location.search).get("customer");
if (initial) {
  $("customer").value = initial;
  loadCustomer(initial);
}
if (location.hash === "#operator") show("operator");
