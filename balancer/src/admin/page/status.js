// The balancer's status page: polls /stats every second and draws it.
// Rates are the differences between two polls; shares are over the last
// five seconds. Everything the balancer reports is put in the page as
// text, never as markup.
"use strict";

const POLL_MS = 1000;
const SHARE_WINDOW = 5;
const CHART_POINTS = 300;
const TOKEN_KEY = "spike-admin-token";

const samples = []; // {at, stats}, newest last, SHARE_WINDOW + 1 of them
const rpsHistory = [];
let waitingForToken = false;

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

function cell(row, className, text, title) {
  const td = document.createElement("td");
  td.className = className;
  td.textContent = text;
  if (title) td.title = title;
  row.appendChild(td);
  return td;
}

// The state a row shows, and its colour class.
function stateOf(u) {
  if (u.state === "up" && u.weight === 0) return "draining";
  return u.state;
}

function stateText(u) {
  let text = stateOf(u);
  if (u.state === "resting" && u.rest_seconds_left != null) {
    text += " (tried again in " + Math.ceil(u.rest_seconds_left) + " s)";
  }
  if (u.backup) text += ", backup";
  return text;
}

// Requests (and failures...) per second of an upstream between the two
// newest samples.
function perSecond(addr, field) {
  if (samples.length < 2) return NaN;
  const [older, newer] = samples.slice(-2);
  const a = older.stats.upstreams.find((u) => u.addr === addr);
  const b = newer.stats.upstreams.find((u) => u.addr === addr);
  if (!a || !b) return NaN;
  const seconds = (newer.at - older.at) / 1000;
  return seconds > 0 ? Math.max(0, b[field] - a[field]) / seconds : NaN;
}

// An upstream's share of the requests of the last SHARE_WINDOW seconds.
function recentShare(addr) {
  if (samples.length < 2) return NaN;
  const first = samples[0].stats;
  const last = samples[samples.length - 1].stats;
  const before = (a) => (first.upstreams.find((u) => u.addr === a) || { requests: 0 }).requests;
  let total = 0;
  let mine = 0;
  for (const u of last.upstreams) {
    const delta = Math.max(0, u.requests - before(u.addr));
    total += delta;
    if (u.addr === addr) mine = delta;
  }
  return total > 0 ? (100 * mine) / total : NaN;
}

function actionButton(label, className, handler) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = label;
  button.addEventListener("click", handler);
  return button;
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

function renderUpstreams(stats) {
  const body = document.querySelector("#upstreams tbody");
  const weights = stats.upstreams.reduce((sum, u) => sum + (u.backup ? 0 : u.weight), 0);
  const rows = [];
  for (const u of stats.upstreams) {
    const row = document.createElement("tr");
    row.dataset.upstream = u.addr;
    row.className = stateOf(u) + (u.backup ? " backup" : "");
    cell(row, "addr", u.addr);
    cell(row, "state", stateText(u));
    const weight = cell(row, "weight", String(u.weight));
    if (u.overridden) {
      weight.classList.add("overridden");
      weight.textContent = u.weight + " (file: " + u.file_weight + ")";
      weight.title = "set at runtime; the file says " + u.file_weight;
    }
    cell(row, "rps", rate(perSecond(u.addr, "requests")));
    cell(row, "requests", number(u.requests));
    const share = recentShare(u.addr);
    const weightShare = weights > 0 && !u.backup ? (100 * u.weight) / weights : 0;
    cell(row, "share", (Number.isFinite(share) ? share.toFixed(1) + "%" : "-") + " / " + weightShare.toFixed(1) + "%");
    cell(row, "in-flight", number(u.in_flight));
    const failures = perSecond(u.addr, "failures");
    cell(row, "failures", number(u.failures) + (failures > 0 ? " (" + rate(failures) + "/s)" : ""));
    const reasons = Object.entries(u.failovers_by_reason || {})
      .filter(([, n]) => n > 0)
      .map(([reason, n]) => reason + ": " + n)
      .join(", ");
    const failovers = perSecond(u.addr, "failovers");
    cell(row, "failovers", number(u.failovers) + (failovers > 0 ? " (" + rate(failovers) + "/s)" : ""), reasons);
    let check = "-";
    if (u.last_check) {
      check = (u.last_check.passed ? "passed" : "failed") + " in " + u.last_check.latency_ms.toFixed(1) + " ms, " + duration(u.last_check.seconds_ago) + " ago";
      if (!u.last_check.passed && u.last_error) check += ": " + u.last_error;
    }
    cell(row, "check", check);
    cell(row, "since", duration(u.seconds_since_state_change));
    cell(row, "idle", number(u.idle_connections));
    const actions = cell(row, "actions", "");
    actions.appendChild(actionButton("drain", "drain", () =>
      change(u.addr, "drain", "POST", {}, "Drain " + u.addr + "? Its weight goes to 0; requests in flight finish.")));
    actions.appendChild(actionButton("restore", "restore", () =>
      change(u.addr, "restore", "POST", {}, "Restore " + u.addr + " to its weight in the file (" + u.file_weight + ")?")));
    actions.appendChild(actionButton("set weight", "set-weight", () => {
      const answer = window.prompt("New weight for " + u.addr + " (0 to 1000):", String(u.weight));
      if (answer === null) return;
      const weight = Number(answer);
      if (!Number.isInteger(weight)) {
        $("message").className = "error";
        $("message").textContent = "'" + answer + "' is not a whole number.";
        return;
      }
      change(u.addr, "weight", "PUT", { weight }, "Set the weight of " + u.addr + " to " + weight + "?");
    }));
    rows.push(row);
  }
  body.replaceChildren(...rows);
}

function renderChart() {
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  if (rpsHistory.length < 2) return;
  const top = Math.max(1, ...rpsHistory);
  context.strokeStyle = "#2a6fb0";
  context.lineWidth = 1.5;
  context.beginPath();
  rpsHistory.forEach((value, i) => {
    const x = width - (rpsHistory.length - 1 - i) * (width / (CHART_POINTS - 1));
    const y = height - 2 - (value / top) * (height - 4);
    if (i === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.stroke();
  context.fillStyle = "#666";
  context.font = "11px system-ui, sans-serif";
  context.fillText(number(top) + "/s", 4, 12);
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
    rps = Math.max(0, newer.stats.requests - older.stats.requests) / ((newer.at - older.at) / 1000);
    rpsHistory.push(rps);
    if (rpsHistory.length > CHART_POINTS) rpsHistory.shift();
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

async function poll() {
  if (waitingForToken) return;
  try {
    const response = await fetch("/stats", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      waitingForToken = true;
      const had = sessionStorage.getItem(TOKEN_KEY);
      $("token-message").textContent = had ? "That token was refused." : "";
      $("token-form").hidden = false;
      $("token").focus();
      return;
    }
    const stats = await response.json();
    samples.push({ at: Date.now(), stats });
    if (samples.length > SHARE_WINDOW + 1) samples.shift();
    render(stats);
  } catch (error) {
    const live = $("live");
    live.textContent = "the balancer does not answer (" + error + ")";
    live.classList.add("stale");
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
