// The cifar4 page: pick a run, send images to /api/predict, show what the model saw and said.
// Sections: access token, API calls, model card, results, classify, start. A feature that adds
// to the page (an API option, a view of each prediction) registers in `extensions` below rather
// than editing classify() or showPrediction().
"use strict";
const $ = (id) => document.getElementById(id);
let runs = [];

const extensions = {
  formFields: [],       // (form: FormData) => void: more fields for /api/predict
  predictionViews: [],  // (prediction, element: HTMLElement) => void: more to show under a prediction
};
window.cifar4 = { extensions, api: (path, options) => api(path, options), authorized: (p) => authorizedUrl(p) };

function fmt(x) { return x == null ? "-" : (typeof x === "number" ? x.toLocaleString() : String(x)); }
function pct(x) { return x == null ? "-" : (100 * x).toFixed(2) + " %"; }

// ---------------------------------------------------------------- access token
// A server started with --token answers 401 to the API without it: the page asks once and keeps
// the token in sessionStorage, so it lasts while the tab is open and never leaves this browser
// except in the Authorization header.
const TOKEN_KEY = "cifar4-token";
class AuthError extends Error {}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken(refused) {
  $("token-message").textContent = refused ? "That token was refused; check it and try again." : "";
  $("token-form").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  start();
});

// ---------------------------------------------------------------- API calls
async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (r.status === 401) throw new AuthError(body.error || "an access token is needed");
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

const objectUrls = new Map();  // element id -> the blob URL it shows (revoked when replaced)
async function authorizedUrl(path) {  // an <img> cannot send a header: fetch it, show a blob
  const r = await fetch(path, { headers: authHeaders() });
  if (r.status === 401) throw new AuthError("an access token is needed");
  if (!r.ok) return "";
  return URL.createObjectURL(await r.blob());
}

async function showImage(id, path) {
  const url = await authorizedUrl(path).catch(() => "");
  if (objectUrls.has(id)) URL.revokeObjectURL(objectUrls.get(id));
  objectUrls.set(id, url);
  $(id).src = url;
}

function failed(e) {
  if (e instanceof AuthError) askForToken(sessionStorage.getItem(TOKEN_KEY) !== null);
  else $("message").textContent = e.message;
}

// ---------------------------------------------------------------- model card
function showCard() {
  const run = runs.find((r) => r.name === $("run").value);
  if (!run) return;
  $("card-title").textContent = `${run.experiment} (${run.model})`;
  const facts = [["run", run.name], ["parameters", fmt(run.params)], ["epochs", fmt(run.epochs)],
                 ["validation accuracy", pct(run.val_accuracy)], ["test accuracy", pct(run.test_accuracy)],
                 ["classes", run.classes.join(", ")]];
  $("card-facts").replaceChildren(...facts.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  showImage("card-curves", run.curves);
  showImage("card-confusion", run.confusion);
}

// ---------------------------------------------------------------- results
function probabilityBars(probabilities) {
  const top = Object.entries(probabilities).sort((a, b) => b[1] - a[1])[0][0];
  return Object.entries(probabilities).map(([c, v]) => {
    const bar = document.createElement("div"); bar.className = "bar" + (c === top ? " top" : "");
    const n = document.createElement("span"); n.textContent = c;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill"; fill.style.display = "block";
    fill.style.width = `${(100 * v).toFixed(1)}%`;
    track.append(fill);
    const val = document.createElement("span"); val.textContent = (100 * v).toFixed(1) + " %";
    bar.append(n, track, val);
    return bar;
  });
}

function showPrediction(p, truth) {
  const div = document.createElement("div");
  div.className = "result";
  const img = document.createElement("img");
  img.src = p.image; img.alt = `${p.file} as the model sees it (32x32)`;
  const picture = document.createElement("span"); picture.className = "picture";
  picture.append(img);
  if (p.attention) {  // where the model looked, laid over the image; the checkbox shows or hides it
    const heat = document.createElement("img");
    heat.className = "heat"; heat.src = p.attention; heat.alt = `${p.attention_method} map of ${p.file}`;
    picture.append(heat);
  }
  const info = document.createElement("div");
  info.className = "bars";
  const name = document.createElement("div"); name.className = "name"; name.textContent = p.file;
  const label = document.createElement("div"); label.className = "label"; label.textContent = p.class;
  info.append(name, label);
  if (truth) {
    const t = document.createElement("div"); t.className = "truth";
    t.textContent = `true class: ${truth} (${truth === p.class ? "right" : "wrong"})`;
    info.append(t);
  }
  info.append(...probabilityBars(p.probabilities));
  div.append(picture, info);
  for (const view of extensions.predictionViews) view(p, div);
  $("results").prepend(div);
}

// ---------------------------------------------------------------- classify
async function classify(files, truth) {
  if (!files.length) return;
  $("message").textContent = "";
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  form.append("run", $("run").value);
  for (const add of extensions.formFields) add(form);
  if ($("attention").checked) form.append("attention", "true");
  try {
    const body = await api("/api/predict", { method: "POST", body: form });
    for (const p of body.predictions) showPrediction(p, truth);
  } catch (e) {
    failed(e);
  }
}

async function tryTestImage() {
  try {
    const t = await api(`/api/test-image?run=${encodeURIComponent($("run").value)}`);
    const blob = await (await fetch(t.image)).blob();
    await classify([new File([blob], `test image (${t.label}).png`, { type: "image/png" })], t.label);
  } catch (e) {
    failed(e);
  }
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    const body = await api("/api/runs");
    runs = body.runs;
    if (!runs.length) { $("message").textContent = "No finished run to serve: train one with 'cifar4 train'."; return; }
    $("run").replaceChildren(...runs.map((r) => {
      const o = document.createElement("option");
      o.value = r.name; o.textContent = `${r.name} (val ${pct(r.val_accuracy)})`;
      return o;
    }));
    $("run").value = body.default;
    showCard();
  } catch (e) {
    failed(e);
  }
}

$("run").addEventListener("change", showCard);
$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
$("test-image").addEventListener("click", tryTestImage);
const showHeat = () => $("results").classList.toggle("no-heat", !$("attention").checked);
$("attention").addEventListener("change", showHeat);
showHeat();
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify([...e.dataTransfer.files]); });
start();
