// The balancer's status page: polls /stats every second and draws it.
// Rates are the differences between two polls over the balancer's own
// clock (its uptime); shares are over the last five seconds. One poll is in
// flight at a time. Everything the balancer reports is put in the page as
// text, never as markup, and rows are updated in place, so that a button
// keeps its focus and a click never lands on a row being replaced.
"use strict";

const POLL_MS = 1000;
const SHARE_WINDOW = 5;
const CHART_POINTS = 300;
const MIN_GAP_SECONDS = 0.5;
const TOKEN_KEY = "spike-admin-token";

const samples = []; // /stats replies, newest last, SHARE_WINDOW + 1 of them
const rpsHistory = [];
let waitingForToken = false;
let polling = false;
let pollAgain = false;

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function number(n) {
  return Number.isFinite(n) ? Math.round(n).toLocaleString("en") : "-";
}

function rate(n) {
  if (!Number.isFinite(n)) return "-";
  return n >= 100 ? number(n) : n.toFixed(1);
}

function duration(seconds) {
  if (!Number.isFinite(seconds)) return "-";
  if (seconds < 60) return seconds.toFixed(0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.floor(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

// A counter's growth from `before` to `after`: a counter that went down
// (an upstream removed and added again) counts from zero.
function growth(before, after) {
  return after >= before ? after - before : after;
}

// The state a row shows, and its colour class.
function stateOf(u) {
  if (u.weight === 0 && !u.backup && u.state === "up") return "draining";
  return u.state;
}

function stateText(u) {
  let text = stateOf(u);
  if (u.state === "resting" && u.rest_seconds_left != null) {
    text += " (tried again in " + Math.ceil(u.rest_seconds_left) + " s)";
  }
  if (u.weight === 0 && !u.backup && u.state !== "up") text += ", drained";
  if (u.backup) text += ", backup";
  return text;
}

function upstreamIn(stats, addr) {
  return stats.upstreams.find((u) => u.addr === addr);
}

// Per second of an upstream's counter `field` between the two newest
// samples.
function perSecond(addr, field) {
  if (samples.length < 2) return NaN;
  const [older, newer] = samples.slice(-2);
  const a = upstreamIn(older, addr);
  const b = upstreamIn(newer, addr);
  const seconds = newer.uptime_seconds - older.uptime_seconds;
  if (!a || !b || !(seconds > 0)) return NaN;
  return growth(a[field], b[field]) / seconds;
}

// An upstream's share of the requests of the last SHARE_WINDOW seconds.
function recentShare(addr) {
  if (samples.length < 2) return NaN;
  const first = samples[0];
  const last = samples[samples.length - 1];
  let total = 0;
  let mine = 0;
  for (const u of last.upstreams) {
    const before = upstreamIn(first, u.addr);
    const delta = growth(before ? before.requests : 0, u.requests);
    total += delta;
    if (u.addr === addr) mine = delta;
  }
  return total > 0 ? (100 * mine) / total : NaN;
}

async function change(addr, action, method, body, question) {
  if (!window.confirm(question)) return;
  const message = $("message");
  try {
    const response = await fetch("/upstreams/" + addr + "/" + action, {
      method,
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify(body),
    });
    const reply = await response.json().catch(() => ({}));
    if (response.ok) {
      message.className = "";
      message.textContent = addr + ": " + action + " done; weight now " + reply.weight + ".";
    } else {
      message.className = "error";
      message.textContent =
        addr + ": " + action + " refused (" + response.status + " " + (reply.error || "") + ")" +
        (reply.detail ? ": " + reply.detail : "");
    }
  } catch (error) {
    message.className = "error";
    message.textContent = addr + ": " + action + " failed: " + error;
  }
  poll();
}

const COLUMNS = ["addr", "state", "weight", "rps", "requests", "share", "in-flight", "failures",
  "failovers", "check", "since", "idle"];

function actionButton(label, className, addr, handler) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = label;
  button.setAttribute("aria-label", label + " " + addr);
  button.addEventListener("click", handler);
  return button;
}

// A new row for upstream `addr`, its buttons reading the upstream's
// latest state when clicked.
function newRow(addr) {
  const row = document.createElement("tr");
  row.dataset.upstream = addr;
  for (const column of COLUMNS) {
    const td = document.createElement("td");
    td.className = column;
    row.appendChild(td);
  }
  const latest = () => upstreamIn(samples[samples.length - 1], addr);
  const actions = document.createElement("td");
  actions.className = "actions";
  actions.appendChild(actionButton("drain", "drain", addr, () =>
    change(addr, "drain", "POST", {}, "Drain " + addr + "? Its weight goes to 0; requests in flight finish.")));
  actions.appendChild(actionButton("restore", "restore", addr, () => {
    const u = latest();
    change(addr, "restore", "POST", {}, "Restore " + addr + " to its weight in the file (" + (u ? u.file_weight : "?") + ")?");
  }));
  actions.appendChild(actionButton("set weight", "set-weight", addr, () => {
    const u = latest();
    const answer = window.prompt("New weight for " + addr + " (0 to 10000):", u ? String(u.weight) : "");
    if (answer === null) return;
    const weight = Number(answer);
    if (!Number.isInteger(weight)) {
      $("message").className = "error";
      $("message").textContent = "'" + answer + "' is not a whole number.";
      return;
    }
    change(addr, "weight", "PUT", { weight }, "Set the weight of " + addr + " to " + weight + "?");
  }));
  row.appendChild(actions);
  return row;
}

function setCell(row, column, text, title) {
  const td = row.querySelector("td." + column);
  if (td.textContent !== text) td.textContent = text;
  if ((td.title || "") !== (title || "")) td.title = title || "";
  return td;
}

function renderUpstreams(stats) {
  const body = document.querySelector("#upstreams tbody");
  const existing = new Map([...body.rows].map((row) => [row.dataset.upstream, row]));
  const weights = stats.upstreams.reduce((sum, u) => sum + (u.backup ? 0 : u.weight), 0);
  const ordered = [];
  for (const u of stats.upstreams) {
    const row = existing.get(u.addr) || newRow(u.addr);
    existing.delete(u.addr);
    const className = stateOf(u) + (u.backup ? " backup" : "");
    if (row.className !== className) row.className = className;
    setCell(row, "addr", u.addr);
    setCell(row, "state", stateText(u));
    const weight = u.overridden ? u.weight + " (file: " + u.file_weight + ")" : String(u.weight);
    setCell(row, "weight", weight, u.overridden ? "set at runtime; the file says " + u.file_weight : "")
      .classList.toggle("overridden", u.overridden);
    setCell(row, "rps", rate(perSecond(u.addr, "requests")));
    setCell(row, "requests", number(u.requests));
    const share = recentShare(u.addr);
    const weightShare = weights > 0 && !u.backup ? (100 * u.weight) / weights : 0;
    setCell(row, "share", (Number.isFinite(share) ? share.toFixed(1) + "%" : "-") + " / " + weightShare.toFixed(1) + "%");
    setCell(row, "in-flight", number(u.in_flight));
    const failures = perSecond(u.addr, "failures");
    setCell(row, "failures", number(u.failures) + (failures > 0 ? " (" + rate(failures) + "/s)" : ""));
    const reasons = Object.entries(u.failovers_by_reason || {})
      .filter(([, n]) => n > 0)
      .map(([reason, n]) => reason + " " + n)
      .join(", ");
    const failovers = perSecond(u.addr, "failovers");
    setCell(row, "failovers",
      number(u.failovers) + (failovers > 0 ? " (" + rate(failovers) + "/s)" : "") + (reasons ? ": " + reasons : ""));
    let check = "-";
    if (u.last_check) {
      check = (u.last_check.passed ? "passed" : "failed") + " in " + u.last_check.latency_ms.toFixed(1) + " ms, " + duration(u.last_check.seconds_ago) + " ago";
      if (!u.last_check.passed && u.last_error) check += ": " + u.last_error;
    }
    setCell(row, "check", check);
    setCell(row, "since", duration(u.seconds_since_state_change));
    setCell(row, "idle", number(u.idle_connections));
    ordered.push(row);
  }
  for (const gone of existing.values()) gone.remove();
  ordered.forEach((row, i) => {
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
  });
}

function renderChart() {
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const points = rpsHistory.filter(Number.isFinite);
  if (points.length < 2) return;
  const top = Math.max(1, ...points);
  context.strokeStyle = "#2a6fb0";
  context.lineWidth = 1.5;
  context.beginPath();
  points.forEach((value, i) => {
    const x = width - (points.length - 1 - i) * (width / (CHART_POINTS - 1));
    const y = height - 2 - (value / top) * (height - 4);
    if (i === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.stroke();
  context.fillStyle = "#666";
  context.font = "11px system-ui, sans-serif";
  context.fillText("max " + number(top) + "/s", 4, 12);
}

function render(stats) {
  $("version").textContent = "version " + stats.version;
  $("uptime").textContent = "up " + duration(stats.uptime_seconds);
  const live = $("live");
  live.textContent = "live, " + new Date().toLocaleTimeString();
  live.classList.remove("stale");

  let rps = NaN;
  if (samples.length >= 2) {
    const [older, newer] = samples.slice(-2);
    const seconds = newer.uptime_seconds - older.uptime_seconds;
    rps = seconds > 0 ? growth(older.requests, newer.requests) / seconds : NaN;
    if (Number.isFinite(rps)) {
      rpsHistory.push(rps);
      if (rpsHistory.length > CHART_POINTS) rpsHistory.shift();
    }
  }
  $("rps").textContent = rate(rps);
  $("requests").textContent = number(stats.requests);
  $("connections").textContent = number(stats.client_connections.open);
  $("parked").textContent = number(stats.client_connections.parked) + " parked (idle)";
  $("retries").textContent = number(stats.retries);
  $("despite-rest").textContent = number(stats.picks_despite_rest) + " sent to a resting upstream";
  const refusals = Object.entries(stats.rejections || {}).filter(([, n]) => n > 0);
  $("refused").textContent = number(refusals.reduce((sum, [, n]) => sum + n, 0));
  $("refusals").textContent = refusals.map(([reason, n]) => reason + ": " + n).join(", ") || "none";

  const config = stats.config;
  $("config-path").textContent = config.path;
  $("config-loaded").textContent = config.loaded_at;
  $("config-restart").textContent = config.restart_required.length ? config.restart_required.join(", ") : "nothing";
  $("config-differs").textContent = config.differs_from_file
    ? "the running weights differ from the file (marked below)"
    : "none: the running state is the file's";
  const error = $("config-error");
  if (config.last_error) {
    error.textContent = "The last reload failed (" + config.last_error.at + "), the configuration in force is the previous one:\n" + config.last_error.message;
    error.hidden = false;
  } else {
    error.hidden = true;
  }
  renderUpstreams(stats);
  renderChart();
}

function stale(why) {
  const live = $("live");
  live.textContent = why;
  live.classList.add("stale");
}

async function poll() {
  if (waitingForToken) return;
  if (polling) {
    pollAgain = true;
    return;
  }
  polling = true;
  try {
    const response = await fetch("/stats", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      waitingForToken = true;
      const had = sessionStorage.getItem(TOKEN_KEY);
      $("token-message").textContent = had ? "That token was refused." : "";
      $("token-form").hidden = false;
      $("token").focus();
    } else if (!response.ok) {
      const reply = await response.json().catch(() => ({}));
      stale("the balancer refused: " + response.status + " " + (reply.error || ""));
    } else {
      const stats = await response.json();
      const last = samples[samples.length - 1];
      if (!last || stats.uptime_seconds - last.uptime_seconds >= MIN_GAP_SECONDS || stats.uptime_seconds < last.uptime_seconds) {
        if (last && stats.uptime_seconds < last.uptime_seconds) samples.length = 0; // restarted
        samples.push(stats);
        if (samples.length > SHARE_WINDOW + 1) samples.shift();
      }
      render(stats);
    }
  } catch (error) {
    stale("the balancer does not answer (" + error + ")");
  } finally {
    polling = false;
    if (pollAgain) {
      pollAgain = false;
      poll();
    }
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  $("token-form").hidden = true;
  waitingForToken = false;
  poll();
});

poll();
setInterval(poll, POLL_MS);
