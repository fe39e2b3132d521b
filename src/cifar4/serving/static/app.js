// The cifar4 page: pick a run, send images to /api/predict, show what the model saw and said.
"use strict";
const $ = (id) => document.getElementById(id);
let runs = [];

function fmt(x) { return x == null ? "-" : (typeof x === "number" ? x.toLocaleString() : String(x)); }
function pct(x) { return x == null ? "-" : (100 * x).toFixed(2) + " %"; }

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

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
  $("card-curves").src = run.curves;
  $("card-confusion").src = run.confusion;
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
  const top = Object.entries(p.probabilities).sort((a, b) => b[1] - a[1])[0][0];
  for (const [c, v] of Object.entries(p.probabilities)) {
    const bar = document.createElement("div"); bar.className = "bar" + (c === top ? " top" : "");
    const n = document.createElement("span"); n.textContent = c;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill"; fill.style.display = "block";
    fill.style.width = `${(100 * v).toFixed(1)}%`;
    track.append(fill);
    const val = document.createElement("span"); val.textContent = (100 * v).toFixed(1) + " %";
    bar.append(n, track, val);
    info.append(bar);
  }
  div.append(picture, info);
  $("results").prepend(div);
}

async function classify(files, truth) {
  if (!files.length) return;
  $("message").textContent = "";
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  form.append("run", $("run").value);
  if ($("attention").checked) form.append("attention", "true");
  try {
    const body = await api("/api/predict", { method: "POST", body: form });
    for (const p of body.predictions) showPrediction(p, truth);
  } catch (e) {
    $("message").textContent = e.message;
  }
}

async function tryTestImage() {
  try {
    const t = await api(`/api/test-image?run=${encodeURIComponent($("run").value)}`);
    const blob = await (await fetch(t.image)).blob();
    await classify([new File([blob], `test image (${t.label}).png`, { type: "image/png" })], t.label);
  } catch (e) {
    $("message").textContent = e.message;
  }
}

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
    $("message").textContent = e.message;
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
