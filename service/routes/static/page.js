/* hopgate's page: score dropped images, draw each verdict against the ID score distribution,
   show the memories they were retrieved to, and poll /metrics for a live panel.
   Everything comes from this server: no external script, font or image. */
"use strict";

const KEY = "hopgate-api-key";
const CHUNK = 16;            // images per /score request
let model = null;            // GET /page/model
let pending = [];            // files waiting for an API key
const memoryCache = new Map();

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fmt = (x, d = 2) => (x === undefined || x === null || Number.isNaN(x)) ? "\u2013"
  : Number(x).toFixed(d);

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

async function api(path, init = {}) {
  const r = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  if (r.status === 401) { askKey(); throw new Error("API key needed"); }
  return r;
}

function askKey(message) {
  $("key-form").hidden = false;
  $("key-status").textContent = message || (sessionStorage.getItem(KEY) ? "wrong key" : "");
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key-status").textContent = "";
  loadModel().then(() => {
    if (model) { $("key-form").hidden = true; const files = pending; pending = []; score(files); }
  });
});

async function loadModel() {
  try {
    const r = await api("/page/model");
    if (!r.ok) { $("model").textContent = "model not ready (" + r.status + ")"; return; }
    model = await r.json();
    $("model").textContent = model.name + " \u00b7 " + model.version + " \u00b7 " +
      model.classes.length + " classes, " + model.memories + " memories \u00b7 threshold " +
      fmt(model.threshold) + " keeps " + Math.round(model.target_tpr * 100) + " % of ID";
  } catch (err) {
    $("model").textContent = "model: " + err.message;
  }
}

/* --- scoring --------------------------------------------------------------------------- */

async function score(files) {
  files = Array.from(files).filter((f) => f.size > 0);
  if (!files.length) return;
  if (!model) { await loadModel(); }
  if (!model) { pending = pending.concat(files); return; }
  for (let i = 0; i < files.length; i += CHUNK) {
    const chunk = files.slice(i, i + CHUNK);
    const cards = chunk.map((f) => card(f));
    const body = new FormData();
    chunk.forEach((f) => body.append("images", f, f.name));
    let answer;
    try {
      const r = await api("/score", { method: "POST", body: body });
      answer = await r.json();
      if (!answer.results) {   // the whole request failed: one error body
        const err = answer.error || { message: "HTTP " + r.status };
        answer = { results: chunk.map(() => ({ error: err })) };
      }
    } catch (err) {
      if (err.message === "API key needed") { pending = pending.concat(chunk); }
      cards.forEach((c) => c.remove());
      continue;
    }
    answer.results.forEach((res, j) => show(cards[j], res));
  }
}

function card(file) {
  const el = document.createElement("article");
  el.className = "result";
  const img = document.createElement("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  const body = document.createElement("div");
  body.className = "body";
  body.innerHTML = '<div class="verdict">scoring\u2026</div><div class="muted">' +
    esc(file.name) + "</div>";
  el.append(img, body);
  $("results").prepend(el);
  return el;
}

function show(el, res) {
  const body = el.querySelector(".body");
  const name = body.querySelector(".muted").outerHTML;
  if (res.error) {
    el.classList.add("failed");
    body.innerHTML = '<div class="verdict">not scored</div>' + name +
      '<p class="error">' + esc(res.error.status + " " + res.error.reason + ": " +
      res.error.message) + "</p>";
    return;
  }
  el.classList.add(res.ood ? "ood" : "id");
  const cls = res.ood
    ? '<p class="note" title="' + esc(res.note || "") + '">The classifier\'s guess outside ' +
      "its domain: <b>" + esc(res.label) + "</b> (class " + res.predicted_class +
      "). Do not trust it: the image is unlike anything it was trained on.</p>"
    : "<p>Class: <b>" + esc(res.label) + "</b> (class " + res.predicted_class + ")</p>";
  body.innerHTML =
    '<div class="verdict">' + (res.ood ? "OOD \u2013 unlike the training data"
                                        : "ID \u2013 like the training data") + "</div>" +
    name +
    '<p class="figures"><span>score <b class="score">' + fmt(res.score) + "</b></span>" +
    "<span>threshold <b>" + fmt(res.threshold) + "</b></span>" +
    '<span>p-value <b class="p-value">' + fmt(res.p_value, 3) + "</b></span></p>" + cls +
    '<div class="chart">' + chart(res.score, res.threshold) + "</div>" +
    '<div class="memories"></div>';
  const box = body.querySelector(".memories");
  if (!res.memories || !res.memories.length) {
    box.innerHTML = '<span class="muted">' + (res.ood
      ? "No memory: the state fell into the origin attractor (OOD)."
      : "No memory retrieved.") + "</span>";
  }
  (res.memories || []).forEach((m) => memory(box, m));
}

/* --- the score chart: ID calibration scores as a histogram, threshold, this score ------- */

function chart(score, threshold) {
  const q = model.score_quantiles, n = q.length;
  const W = 560, H = 130, L = 8, R = 8, T = 18, B = 22;
  let lo = Math.min(q[0], threshold), hi = q[n - 1];
  const pad = (hi - lo) * 0.06 || 1;
  lo -= pad; hi += pad;
  const x = (v) => L + (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo) * (W - L - R);
  const bins = 48, width = (hi - lo) / bins, mass = new Array(bins).fill(0);
  q.forEach((v) => { mass[Math.min(bins - 1, Math.max(0, Math.floor((v - lo) / width)))] += 1; });
  const peak = Math.max(...mass) || 1;
  let bars = "";
  mass.forEach((m, i) => {
    const h = m / peak * (H - T - B), x0 = L + i * (W - L - R) / bins;
    bars += '<rect x="' + x0.toFixed(1) + '" y="' + (H - B - h).toFixed(1) + '" width="' +
      ((W - L - R) / bins - 1).toFixed(1) + '" height="' + h.toFixed(1) + '" fill="#9ab"/>';
  });
  const xt = x(threshold), xs = x(score);
  const off = score < lo ? "\u25c0 " : score > hi ? " \u25b6" : "";
  const anchor = xs > W * 0.7 ? "end" : "start";
  const colour = score < threshold ? "#b3261e" : "#1b7f3b";
  const right = xt < W - 210;  // the distribution's label away from the threshold's
  return '<svg viewBox="0 0 ' + W + " " + H + '" role="img" aria-label="score ' +
    fmt(score) + " against the ID score distribution, threshold " + fmt(threshold) + '">' +
    '<rect x="' + L + '" y="' + T + '" width="' + (xt - L).toFixed(1) + '" height="' +
    (H - T - B) + '" fill="#fbe9e7"/>' + bars +
    '<line class="threshold" x1="' + xt.toFixed(1) + '" x2="' + xt.toFixed(1) + '" y1="' +
    (T - 6) + '" y2="' + (H - B) + '" stroke="#b3261e" stroke-width="2" stroke-dasharray="5 3"/>' +
    '<text x="' + (xt - 4).toFixed(1) + '" y="' + (T - 8) + '" font-size="11" fill="#b3261e" ' +
    'text-anchor="end">threshold ' + fmt(threshold, 1) + "</text>" +
    '<line class="marker" x1="' + xs.toFixed(1) + '" x2="' + xs.toFixed(1) + '" y1="' + T +
    '" y2="' + (H - B + 4) + '" stroke="' + colour + '" stroke-width="3"/>' +
    '<text x="' + (anchor === "end" ? xs - 4 : xs + 4).toFixed(1) + '" y="' + (H - 4) +
    '" font-size="12" font-weight="bold" text-anchor="' + anchor + '" fill="' + colour + '">' +
    off + "this image " + fmt(score, 1) + "</text>" +
    '<text x="' + (right ? W - R : L) + '" y="' + (T - 8) + '" font-size="11" fill="#666" ' +
    'text-anchor="' + (right ? "end" : "start") + '">ID score distribution (calibration)</text>' +
    "</svg>";
}

/* --- memories and their exemplars ------------------------------------------------------- */

async function memoryInfo(index) {
  if (!memoryCache.has(index)) {
    memoryCache.set(index, api("/memories/" + index).then((r) => r.ok ? r.json() : null));
  }
  return memoryCache.get(index);
}

async function memory(box, m) {
  const el = document.createElement("div");
  el.className = "memory";
  el.innerHTML = "<div>memory <b>" + m.index + "</b> \u00b7 " +
    esc(m.label !== undefined ? m.label : "?") + " \u00b7 weight " + fmt(m.weight) + "</div>";
  box.append(el);
  const info = await memoryInfo(m.index).catch(() => null);
  if (!info) return;
  const row = document.createElement("div");
  el.append(row);
  if (!info.exemplars.length) { row.className = "muted"; row.textContent = "no exemplars"; }
  for (const url of info.exemplars) {
    const img = document.createElement("img");
    img.alt = "exemplar of memory " + m.index;
    img.title = "training image retrieved to memory " + m.index + " (" + info.label + ")";
    row.append(img);
    try {  // fetched, not linked: the API key goes in a header
      const r = await api(url);
      if (r.ok) img.src = URL.createObjectURL(await r.blob());
    } catch (err) { img.alt = err.message; }
  }
}

/* --- picking and dropping --------------------------------------------------------------- */

const drop = $("drop");
$("files").addEventListener("change", (e) => { score(e.target.files); e.target.value = ""; });
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => score(e.dataTransfer.files));

/* --- live panel: /metrics (Prometheus text), every 2 s ---------------------------------- */

let last = null;

function metric(text, name) {
  let total = null;
  const re = new RegExp("^" + name + "(\\{[^}]*\\})?\\s+(\\S+)$", "gm");
  let m;
  while ((m = re.exec(text)) !== null) { total = (total || 0) + Number(m[2]); }
  return total;
}

async function poll() {
  try {
    const text = await (await fetch("/metrics")).text();
    const now = performance.now(), requests = metric(text, "hopgate_requests_total");
    if (last && requests !== null) {
      $("live-rate").textContent = fmt((requests - last.requests) / ((now - last.t) / 1000), 1);
    }
    if (requests !== null) last = { t: now, requests: requests };
    const ood = metric(text, "hopgate_ood_rate");
    $("live-ood").textContent = ood === null ? "\u2013" : fmt(ood * 100, 1) + " %";
    const psi = metric(text, "hopgate_score_drift_psi");
    const ks = metric(text, "hopgate_score_drift_ks");
    $("live-psi").textContent = psi === null ? "\u2013" : fmt(psi, 3);
    $("live-ks").textContent = ks === null ? "\u2013" : fmt(ks, 3);
  } catch (err) { /* the server is away: keep the last figures */ }
}

loadModel();
poll();
setInterval(poll, 2000);
