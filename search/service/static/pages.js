// The three views: the searches list (with the submit form), one search, compare.
// Each view has render() (builds the page once) and refresh() (polled every 2 s, updates in place).
"use strict";
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const num = (v, d) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));
const ACTIVE = ["pending", "running", "cancelling"];

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function when(iso) { return iso ? new Date(iso).toLocaleString() : "—"; }
function bar(fraction) { return `<span class="bar"><span style="width:${(100 * fraction).toFixed(1)}%"></span></span>`; }
async function json(path, opts) {
  const r = await mbpAuth.fetch(path, opts);
  const body = r.status === 304 ? null : await r.json().catch(() => ({}));
  if (!r.ok && r.status !== 304) throw new Error((body && body.detail) || `HTTP ${r.status}`);
  return { status: r.status, body: body, etag: r.headers.get("ETag") };
}
function best(b) { return b ? `<code>${esc(b.key)}</code> ${num(b.avg_bits, 2)} bits, ${num(b.psnr, 2)} dB` : "—"; }
function progressCell(row) {
  const p = row.progress;
  const eta = p.eta_s !== null ? ` ETA ${duration(p.eta_s)}` : "";
  return `${bar(p.fraction)} <span class="muted">${(100 * p.fraction).toFixed(0)}%${eta}</span>`;
}
async function action(sid, what, errEl) {
  errEl.textContent = "";
  try { await json(`/searches/${sid}/${what}`, { method: "POST" }); } catch (e) { errEl.textContent = e.message; }
}

// ---------------------------------------------------------------- searches list
function listView() {
  const selected = new Set();
  return {
    render(root) {
      root.innerHTML = `
<h2>Start a search</h2>
<form class="submit" id="submit-form">
  <label>model <input name="model" required placeholder="tiny-sdxl, a Hub id, or a server path" size="34"></label>
  <label>bit depths / formats <input name="nbits" placeholder="e.g. 2,4,6,8 [all]" size="14"></label>
  <label>recipes <input name="num_recipes" type="number" min="1" placeholder="7" style="width:5em"></label>
  <label>min size <input name="min_size" type="number" min="0" placeholder="default" style="width:8em"></label>
  <label>strategy <select name="strategy"><option>apple</option><option>optimal</option><option>both</option></select></label>
  <label>evaluations <select name="evals"><option>full</option><option>fast</option></select></label>
  <label>workers <input name="workers" type="number" min="1" placeholder="auto" style="width:5em"></label>
  <label>image steps <input name="gallery_steps" type="number" min="1" placeholder="20" style="width:5em"></label>
  <button type="submit" id="submit-button">Submit</button>
</form>
<div id="submit-error" class="error"></div>
<h2>Searches <button id="compare-button" disabled>compare selected</button></h2>
<div id="action-error" class="error"></div>
<div class="scroll"><table id="searches"><thead><tr><th></th><th>search</th><th>model</th><th>status</th><th>phase</th>
<th>progress</th><th>started</th><th class="num">evaluations</th><th>best recipe so far</th><th></th></tr></thead>
<tbody></tbody></table></div>`;
      const form = root.querySelector("#submit-form");
      form.onsubmit = async (ev) => {
        ev.preventDefault();
        const err = root.querySelector("#submit-error");
        err.textContent = "";
        const body = {};
        for (const [k, v] of new FormData(form)) {
          if (String(v).trim() === "") continue;
          body[k] = ["num_recipes", "min_size", "workers", "gallery_steps"].includes(k) ? Number(v) : String(v).trim();
        }
        if (body.strategy === "apple") delete body.strategy;
        if (body.evals === "full") delete body.evals;
        try {
          const r = await json("/searches", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify(body) });
          err.textContent = "";
          root.dataset.lastSubmitted = r.body.id;
          this.refresh(root);
        } catch (e) { err.textContent = e.message; }
      };
      root.querySelector("#compare-button").onclick = () => { location.hash = "#/compare/" + [...selected].join(","); };
      root.querySelector("#searches").addEventListener("click", (ev) => {
        const b = ev.target.closest("button[data-act]");
        if (b) action(b.dataset.sid, b.dataset.act, root.querySelector("#action-error")).then(() => this.refresh(root));
        const c = ev.target.closest("input[type=checkbox]");
        if (c) {
          c.checked ? selected.add(c.value) : selected.delete(c.value);
          root.querySelector("#compare-button").disabled = selected.size < 2;
        }
      });
    },
    async refresh(root) {
      const rows = (await json("/dashboard/searches")).body;
      const tbody = root.querySelector("#searches tbody");
      if (!tbody) return;
      const html = rows.map((r) => {
        const active = ACTIVE.includes(r.status);
        const act = active ? `<button data-act="cancel" data-sid="${r.id}">cancel</button>`
          : r.status !== "completed" ? `<button data-act="resume" data-sid="${r.id}">resume</button>` : "";
        const err = r.error ? `<div class="error">${esc(r.error)}</div>` : "";
        return `<tr data-id="${r.id}" data-status="${r.status}" data-evaluations="${r.evaluations}">
<td><input type="checkbox" value="${r.id}" ${selected.has(r.id) ? "checked" : ""}></td>
<td><a href="#/search/${r.id}"><code>${r.id}</code></a></td><td>${esc(r.model)}</td>
<td class="status-${r.status}">${r.status}${err}</td><td>${esc(r.phase)}</td><td>${progressCell(r)}</td>
<td>${when(r.created_at)}</td><td class="num evals">${r.progress.done} / ${r.progress.total}${r.progress.total_known ? "" : "+"}</td>
<td>${best(r.best)}</td><td>${act}</td></tr>`;
      }).join("") || `<tr><td colspan="10" class="muted">no searches yet</td></tr>`;
      if (html !== this.shown) { tbody.innerHTML = html; this.shown = html; }  // untouched rows stay clickable
      root.dataset.rows = String(rows.length);
    },
  };
}

// ---------------------------------------------------------------- one search
function searchView(sid) {
  let etag = null, gallery = null, images = {};
  return {
    render(root) {
      root.innerHTML = `
<h2 id="title">search <code>${esc(sid)}</code></h2>
<div id="summary"></div><div id="failure" class="error"></div><div id="action-error" class="error"></div>
<div class="charts"><div class="chart" id="chart-psnr"></div><div class="chart" id="chart-cumulative"></div></div>
<div class="chart heatmap scroll" id="chart-heatmap"></div>
<h2>Recipes</h2>
<div class="scroll"><table id="recipes"><thead><tr><th>key</th><th>strategy</th><th class="num">bits</th><th class="num">MB</th>
<th class="num">predicted dB</th><th class="num">measured dB</th><th class="num">image PSNR dB</th><th class="num">image SSIM</th><th>Core ML validation</th></tr></thead><tbody></tbody></table></div>
<div id="coreai" class="scroll"></div>
<div class="chart heatmap scroll" id="layer-map"></div>
<h2>Images</h2><div id="gallery" class="gallery"></div>
<div class="grid">
 <div><h2>Phases</h2><table id="phases"><thead><tr><th>phase</th><th>progress</th><th class="num">done</th><th class="num">wall time</th></tr></thead><tbody></tbody></table></div>
 <div><h2>Evaluators</h2><table id="evaluators"><thead><tr><th>node</th><th>worker</th><th>device</th><th class="num">evaluations/s</th></tr></thead><tbody></tbody></table>
 <p id="floor"></p></div>
</div>
<h2>Downloads</h2><ul id="downloads">
 <li><a href="#" data-dl="/searches/${sid}/recipes.json" data-name="${sid}-recipes.json" id="dl-json">Apple JSON (the recipe file for <code>search apply --recipe-file</code>)</a></li>
 <li><a href="#" data-dl="/searches/${sid}/plot.png" data-name="${sid}-psnr.png" id="dl-plot">PSNR plot (PNG)</a></li>
</ul>
<h2>Messages</h2><pre id="messages" class="muted"></pre>`;
      root.querySelector("#downloads").addEventListener("click", (ev) => {
        const a = ev.target.closest("a[data-dl]");
        if (a) { ev.preventDefault(); download(a.dataset.dl, a.dataset.name); }
      });
      root.querySelector("#summary").addEventListener("click", (ev) => {
        const b = ev.target.closest("button[data-act]");
        if (b) action(sid, b.dataset.act, root.querySelector("#action-error")).then(() => this.refresh(root));
      });
      gallery = galleryView(sid, root.querySelector("#gallery"));
    },
    async refresh(root) {
      const charts = json(`/searches/${sid}/measurements`, { headers: etag ? { "If-None-Match": etag } : {} });
      const pictures = gallery();
      const d = (await json(`/dashboard/searches/${sid}`)).body;  // the three requests in flight at once
      images = Object.fromEntries((await pictures).rows.map((r) => [r.key, r]));
      const p = d.progress, active = ACTIVE.includes(d.status);
      const act = active ? `<button data-act="cancel">cancel</button>` : d.status !== "completed" ? `<button data-act="resume">resume</button>` : "";
      root.querySelector("#summary").innerHTML = `<p>model <b>${esc(d.model)}</b> (${esc(d.model_version)}) ·
<span class="status-${d.status}" id="status">${d.status}</span> · phase ${esc(d.phase)} · started ${when(d.created_at)} ·
${d.candidates} candidate layers, ${d.pairs} (layer, format) pairs · ${bar(p.fraction)} evaluations
<span id="evals">${p.done} / ${p.total}${p.total_known ? "" : "+"}</span> · reused <span id="reused">${d.reused ?? 0}</span>${p.eta_s !== null ? " · ETA " + duration(p.eta_s) : ""} ·
best so far: ${best(d.best)} ${act}</p>`;
      root.dataset.status = d.status;
      root.querySelector("#failure").textContent = d.status === "failed" && d.error ? "failed: " + d.error : "";
      root.querySelector("#phases tbody").innerHTML = d.phases.map((ph) =>
        `<tr data-phase="${esc(ph.phase)}"><td>${esc(ph.label)}</td><td>${bar(ph.total ? Math.min(ph.done / ph.total, 1) : 0)}</td><td class="num">${ph.done} / ${ph.total ?? "?"}</td><td class="num">${duration(ph.wall_s)}</td></tr>`).join("")
        || `<tr><td colspan="4" class="muted">not started</td></tr>`;
      root.querySelector("#evaluators tbody").innerHTML = d.evaluators.map((e) =>
        `<tr><td><code>${esc(e.node)}</code></td><td><code>${esc(e.worker)}</code></td><td>${esc(e.device || "—")}</td><td class="num">${num(e.per_s, 2)}</td></tr>`).join("")
        || `<tr><td colspan="4" class="muted">no evaluations in the last minute</td></tr>`;
      const f = d.eval_floor;
      root.querySelector("#floor").textContent = !f ? "evaluation floor: not measured (yet)"
        : f.psnr === null ? `evaluation floor: none, runs repeat bit for bit (${f.probes} probes)`
        : `evaluation floor: ${num(f.psnr, 2)} dB (${f.probes} probes)`;
      root.querySelector("#recipes tbody").innerHTML = d.recipes.map((r) => {
        const v = d.validations[r.key];
        const val = v ? `${v.structural_ok ? "structure ok" : "structure FAILED"}${v.numeric_psnr !== null ? ", " + num(v.numeric_psnr, 2) + " dB" : ""}${v.runtime_note ? " · " + esc(v.runtime_note) : ""}` : "—";
        return `<tr><td class="key">${esc(r.key)}</td><td>${esc(r.strategy)}</td><td class="num">${num(r.avg_bits, 2)}</td><td class="num">${num(r.size_mb, 1)}</td><td class="num">${num(r.predicted_psnr, 2)}</td><td class="num">${num(r.psnr, 2)}</td>
<td class="num">${num((images[r.key] || {}).psnr_mean, 2)}</td><td class="num">${num((images[r.key] || {}).ssim_mean, 4)}</td><td>${val}</td></tr>`;
      }).join("") || `<tr><td colspan="9" class="muted">no recipes yet</td></tr>`;
      root.querySelector("#messages").textContent = (d.messages || []).join("\n").replace(/\[\/?[a-z ]+\]/g, "");
      coremlLinks(sid, root.querySelector("#downloads"), d);
      coreaiTable(root.querySelector("#coreai"), d.coreai || {});
      const m = await charts;
      if (m.status !== 304) {
        etag = m.etag;
        const tip = document.getElementById("tooltip");
        psnrSizeChart(root.querySelector("#chart-psnr"), m.body);
        cumulativeChart(root.querySelector("#chart-cumulative"), m.body);
        heatmap(root.querySelector("#chart-heatmap"), m.body, tip);
        layerMap(root.querySelector("#layer-map"), m.body, tip);
        root.dataset.chartsVersion = etag || "";
      }
    },
  };
}

// The Core AI folders of a search (issue 36, detail.coreai): per recipe its checks on the Linux Core AI
// runtime and the rows of the comparison with Apple's 4bit preset, as `search status` prints them.
function coreaiTable(el, folders) {
  const rows = [];
  for (const [key, c] of Object.entries(folders)) {
    const luts = c.luts_ok === null ? "not checked" : c.luts_ok ? "yes" : "NO";
    const diff = c.difference_db === null ? "" : ` (${c.difference_db >= 0 ? "+" : ""}${num(c.difference_db, 2)})`;
    rows.push(`<tr data-coreai="${esc(key)}"><td class="key">${esc(key)}</td><td class="status-${esc(c.status)}">${esc(c.status)}</td><td>${luts}</td>
<td class="num">${num(c.runtime_psnr, 2)}</td><td class="num">${num(c.measured_psnr, 2)}${diff}</td><td>${!c.ok ? "<b>not ok</b>: " + esc(c.detail) : c.floor_psnr == null ? "ok" : `ok (float16 floor ${num(c.floor_psnr, 2)} dB: ${esc(c.detail)})`}</td><td></td><td></td><td></td></tr>`);
    for (const r of (c.comparison && c.comparison.rows) || []) {
      rows.push(`<tr class="muted"><td></td><td colspan="5">${esc(r.name)}</td><td class="num">${num(r.bits_per_weight, 3)}</td><td class="num">${num(r.asset_bytes / 1e6, 3)}</td><td class="num">${num(r.psnr, 2)}</td></tr>`);
    }
    if (c.comparison) rows.push(`<tr class="muted"><td></td><td colspan="8">recipe − Apple 4bit: ${c.comparison.delta_db >= 0 ? "+" : ""}${num(c.comparison.delta_db, 2)} dB</td></tr>`);
  }
  const html = rows.length ? `<h2>Core AI</h2><table id="coreai-table"><thead><tr><th>recipe</th><th>status</th><th>LUTs bit for bit</th>
<th class="num">runtime dB</th><th class="num">measured dB</th><th>checks</th><th class="num">bits/weight</th><th class="num">asset MB</th><th class="num">PSNR dB</th></tr></thead>
<tbody>${rows.join("")}</tbody></table>` : "";
  if (el.dataset.shown !== html) { el.innerHTML = html; el.dataset.shown = html; }
}

async function download(path, name) {
  const r = await mbpAuth.fetch(path);
  if (!r.ok) { alert((await r.json().catch(() => ({}))).detail || `HTTP ${r.status}`); return; }
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url; a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// The Core ML packages and bundles (Resources folders for Apple's Swift pipeline) the service keeps,
// from the search's detail (coreml.packages, bundles): a download link each, with its size, once its
// zip is stored whole (status "shipped"). Redrawn only when that list changes.
function coremlLinks(sid, list, d) {
  const mb = (bytes) => `${num(bytes / 1e6, 2)} MB`;
  const items = [];
  for (const [key, p] of Object.entries((d.coreml && d.coreml.packages) || {})) {
    if (p.status === "shipped") items.push([`${key}.mlpackage.zip`, `Core ML package ${key} (${mb(p.size_bytes)} zip)`]);
  }
  for (const [key, b] of Object.entries(d.bundles || {})) {
    if (b.status === "shipped") {
      items.push([`${key}.bundle.zip`, `Resources folder for Apple's Swift pipeline, recipe ${key}: ${mb(b.total_bytes)} (${mb(b.zip_bytes)} zip)`]);
    }
  }
  for (const [key, c] of Object.entries(d.coreai || {})) {
    if (c.status === "shipped") items.push([`${key}.coreai.zip`, `Core AI folder, recipe ${key}: ${mb(c.total_bytes)} (${mb(c.zip_bytes)} zip)`]);
  }
  const html = items.map(([name, text]) => `<li class="coreml-dl"><a href="#" data-dl="/searches/${sid}/coreml/${encodeURIComponent(name)}" data-name="${esc(`${sid}-${name}`)}">${esc(text)}</a></li>`).join("");
  if (list.dataset.coreml === html) return;
  list.dataset.coreml = html;
  list.querySelectorAll("li.coreml-dl").forEach((li) => li.remove());
  list.insertAdjacentHTML("beforeend", html);
}
