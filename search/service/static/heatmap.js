// The two layer-by-layer pictures of a search page, drawn on plain canvases: the isolated PSNR of
// every (layer, format) with its colour bar, and the layer map (which format each recipe gave each
// layer). Both share one layer axis in module order, labelled by module group (down_blocks.0,
// mid_block, ...): a layer's full name is in the tooltip. Cell geometry (LEFT, ROW_H, cells per
// layer) is fixed so a test can read the painted pixels back.
"use strict";
const HEAT = { LEFT: 50, ROW_H: 24, GROUP_H: 20 };
const FORMAT_COLORS = { "1": "#7f1d1d", "2": "#dc2626", "3": "#f97316", "4": "#facc15", "6": "#4ade80", "8": "#2563eb",
                        "16": "#e5e7eb" };

function heatColor(t) {  // 0 (worst) .. 1 (best): purple -> blue -> green -> yellow
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const p = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(Math.floor(p), stops.length - 2);
  const f = p - i, a = stops[i], b = stops[i + 1];
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}

function formatColor(f) {  // grouped formats (4g16) share their bit depth's hue, drawn a shade darker
  const m = /^(\d+)(g\d+)?$/.exec(String(f));
  return m ? (FORMAT_COLORS[m[1]] || "#9ca3af") : "#9ca3af";
}

// "down_blocks.1.attentions.0.proj_in" -> "down_blocks.1"; "mid_block.resnets.0.conv1" -> "mid_block".
function moduleGroup(layer) {
  const p = layer.split(".");
  return /^\d+$/.test(p[1] || "") ? p[0] + "." + p[1] : p[0];
}

function layerWidth(nl) { return Math.max(Math.min(nl * 12, 1200), 300); }

// Consecutive layers of one module group: [[group, first index, end index]].
function groupRuns(layers) {
  const runs = [];
  layers.forEach((l, i) => {
    const g = moduleGroup(l);
    if (runs.length && runs[runs.length - 1][0] === g) runs[runs.length - 1][2] = i + 1;
    else runs.push([g, i, i + 1]);
  });
  return runs;
}

// The module-group band under the cells, from x = left: alternating shades, a label where it fits.
function drawGroups(ctx, layers, y, cw, left) {
  ctx.font = "10px sans-serif";
  groupRuns(layers).forEach(([g, a, b], k) => {
    const x = left + a * cw, w = (b - a) * cw;
    ctx.fillStyle = k % 2 ? "#d1d5db" : "#e5e7eb";
    ctx.fillRect(x, y, w, HEAT.GROUP_H - 2);
    const short = g.replace("_blocks", "").replace("_block", "").replace("transformer", "tb");
    if (ctx.measureText(short).width + 4 <= w) { ctx.fillStyle = "#111"; ctx.fillText(short, x + 2, y + 13); }
  });
}

function makeCanvas(el, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  el.appendChild(canvas);
  return canvas;
}

function hoverCells(canvas, tooltip, describe) {
  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const text = describe(ev.clientX - r.left, ev.clientY - r.top);
    if (!text) { tooltip.hidden = true; return; }
    tooltip.textContent = text;
    tooltip.style.left = ev.clientX + 12 + "px"; tooltip.style.top = ev.clientY + 12 + "px";
    tooltip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
}

// Under both pictures: the group band names its group, the layer under the pointer.
function groupAt(layers, cw, x, left) {
  const li = Math.floor((x - left) / cw);
  return li >= 0 && li < layers.length ? `${moduleGroup(layers[li])} · ${layers[li]}` : null;
}

function colourBar(el, lo, hi) {
  const bar = document.createElement("div");
  bar.className = "colour-bar";
  const stops = [0, 0.25, 0.5, 0.75, 1].map((t) => `${heatColor(t)} ${100 * t}%`).join(",");
  bar.innerHTML = `<span class="muted">${lo.toFixed(1)} dB</span><span class="ramp" style="background:linear-gradient(to right,${stops})"></span><span class="muted">${hi.toFixed(1)} dB</span>`;
  el.appendChild(bar);
}

// Layers x formats heatmap of isolated PSNRs; hovering names layer, format, PSNR and MB.
function heatmap(el, d, tooltip) {
  el.innerHTML = `<div class="u-title">Isolated PSNR per layer × format</div>`;
  const nl = d.layers.length, nf = d.formats.length, W = layerWidth(nl), rowH = HEAT.ROW_H, left = HEAT.LEFT;
  const canvas = makeCanvas(el, W + left, nf * rowH + 4 + HEAT.GROUP_H);
  const ctx = canvas.getContext("2d");
  const cw = W / Math.max(nl, 1);
  const ys = d.isolated.map((c) => c[2]);
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const cells = new Map();
  ctx.fillStyle = "#f3f4f6"; ctx.fillRect(left, 0, W, nf * rowH);
  ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
  d.formats.forEach((f, i) => ctx.fillText(f + "-bit", 4, i * rowH + 16));
  for (const c of d.isolated) {
    ctx.fillStyle = heatColor(hi > lo ? (c[2] - lo) / (hi - lo) : 1);
    ctx.fillRect(left + c[0] * cw, c[1] * rowH + 1, Math.max(cw, 1), rowH - 2);
    cells.set(c[0] + ":" + c[1], c);
  }
  if (nl) drawGroups(ctx, d.layers, nf * rowH + 4, cw, left);
  el.dataset.points = String(cells.size);
  el.dataset.groups = String(groupRuns(d.layers).length);
  if (cells.size) colourBar(el, lo, hi);
  const legend = document.createElement("div");
  legend.className = "muted";
  legend.textContent = cells.size ? `${cells.size} of ${d.pairs} (layer, format) pairs measured; ` +
    "layers in module order, grouped by module under the cells" : "no isolated measurements yet";
  el.appendChild(legend);
  hoverCells(canvas, tooltip, (x, y) => {
    const li = Math.floor((x - left) / cw), fi = Math.floor(y / rowH);
    if (fi >= nf) return groupAt(d.layers, cw, x, left);
    const c = cells.get(li + ":" + fi);
    return c ? `${d.layers[li]} · ${d.formats[fi]}-bit · ${c[2].toFixed(2)} dB · ${c[3].toFixed(3)} MB` : null;
  });
}

// One row per recipe, one cell per layer coloured by the format the recipe gave it (16: kept
// float16); hovering names recipe, layer and format.
function layerMap(el, d, tooltip) {
  const maps = d.layer_map || [];
  el.innerHTML = `<div class="u-title">Layer map: the format each recipe gives each layer</div>`;
  if (!maps.length) { el.insertAdjacentHTML("beforeend", `<div class="muted">no recipes yet</div>`); el.dataset.rows = "0"; return; }
  const nl = d.layers.length, W = layerWidth(nl), rowH = 16, left = 170;
  const canvas = makeCanvas(el, W + left, maps.length * rowH + 4 + HEAT.GROUP_H);
  const ctx = canvas.getContext("2d"), cw = W / Math.max(nl, 1);
  ctx.font = "11px ui-monospace, monospace";
  maps.forEach((m, ri) => {
    ctx.fillStyle = "#333";
    ctx.fillText(`${m.strategy.slice(0, 7)} ${m.avg_bits.toFixed(2)} bits`, 2, ri * rowH + 12);
    m.formats.forEach((f, li) => { ctx.fillStyle = formatColor(f); ctx.fillRect(left + li * cw, ri * rowH + 1, Math.max(cw, 1), rowH - 2); });
  });
  drawGroups(ctx, d.layers, maps.length * rowH + 4, cw, left);
  const used = [...new Set(maps.flatMap((m) => m.formats))].sort((a, b) => parseFloat(a) - parseFloat(b));
  el.insertAdjacentHTML("beforeend", `<div class="format-legend">${used.map((f) =>
    `<span><i style="background:${formatColor(f)}"></i>${f === "16" ? "float16 (kept)" : esc(f) + "-bit"}</span>`).join("")}</div>`);
  el.dataset.rows = String(maps.length);
  el.dataset.keys = maps.map((m) => m.key).join(",");
  hoverCells(canvas, tooltip, (x, y) => {
    const li = Math.floor((x - left) / cw), ri = Math.floor(y / rowH);
    if (ri >= maps.length) return groupAt(d.layers, cw, x, left);
    if (li < 0 || li >= nl) return null;
    const m = maps[ri], f = m.formats[li];
    return `${m.key} · ${d.layers[li]} · ${f === "16" ? "float16 (kept)" : f + "-bit"}`;
  });
}
