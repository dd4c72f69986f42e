// The search page's charts: uPlot (vendored) for the x/y plots, a plain canvas for the heatmap.
// Every chart records how many points it drew in its element's data-points attribute.
"use strict";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const STRATEGY_STYLE = { apple: ["Apple's thresholds", "#111827"], optimal: ["optimal (knapsack)", "#16a34a"],
                         refined: ["refined (measured)", "#dc2626"] };

function drawn(series) {  // values uPlot draws: null / undefined are gaps
  return series.reduce((n, v) => n + (v === null || v === undefined ? 0 : 1), 0);
}

function plotWidth(el) { return Math.max(Math.min(el.parentElement.clientWidth / 2 - 40, 620), 320); }

function makePlot(el, title, xLabel, series, tables) {
  el.innerHTML = "";
  const data = uPlot.join(tables);
  const opts = {
    title: title, width: plotWidth(el), height: 300,
    scales: { x: { time: false } },
    axes: [{ label: xLabel }, { label: "PSNR (dB)" }],
    series: [{ label: xLabel, value: (u, v) => v == null ? "—" : v.toFixed(1) }].concat(series),
  };
  const plot = new uPlot(opts, data, el);
  el.dataset.points = String(data.slice(1).reduce((n, s) => n + drawn(s), 0));
  return plot;
}

function pointsOnly(label, color) {
  return { label: label, stroke: color, fill: color, width: 0, paths: () => null,
           points: { show: true, size: 9, fill: color }, value: (u, v) => v == null ? "—" : v.toFixed(2) + " dB" };
}

// PSNR vs size: recipes by strategy (points), and the linear 8-bit line.
function psnrSizeChart(el, d) {
  const strategies = [...new Set(d.recipes.map((r) => r.strategy))].sort();
  const tables = [], series = [];
  for (const st of strategies) {
    const rs = d.recipes.filter((r) => r.strategy === st).sort((a, b) => a.x - b.x);
    const [label, color] = STRATEGY_STYLE[st] || [st, COLORS[series.length % COLORS.length]];
    tables.push([rs.map((r) => r.x), rs.map((r) => r.y)]);
    series.push(pointsOnly(label, color));
  }
  if (d.linear8 !== null && d.linear8 !== undefined) {
    tables.push([[0, 50, 100], [d.linear8, d.linear8, d.linear8]]);
    series.push({ label: "linear_8bit", stroke: "#2563eb", dash: [4, 4], width: 1, points: { show: false } });
  }
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no recipes yet" });
  const plot = makePlot(el, "PSNR vs size (recipes)", "size reduction vs float16 (%)", series, tables);
  el.dataset.points = String(d.recipes.length);  // the recipes; the linear 8-bit line is not a point
  el.dataset.recipes = strategies.map((st) => st + ":" + d.recipes.filter((r) => r.strategy === st).length).join(",");
  const caption = document.createElement("div");
  caption.className = "muted";
  el.appendChild(caption);
  el.addEventListener("mousemove", () => {
    const i = plot.cursor.idx;
    if (i === null || i === undefined) return;
    const x = plot.data[0][i];
    const hit = d.recipes.filter((r) => Math.abs(r.x - x) < 1e-9);
    caption.textContent = hit.map((r) => `${r.key} (${r.strategy}, ${r.avg_bits.toFixed(2)} bits, ${r.y.toFixed(2)} dB)`).join("; ");
  });
  return plot;
}

// Cumulative curves: one line per format, point i = the first i layers palettized.
function cumulativeChart(el, d) {
  const tables = [], series = [];
  d.formats.forEach((f, i) => {
    const c = d.curves[f];
    if (!c || !c.x.length) return;
    tables.push([c.x, c.y]);
    series.push({ label: f + "-bit", stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
                  value: (u, v) => v == null ? "—" : v.toFixed(2) + " dB" });
  });
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no cumulative curves yet" });
  return makePlot(el, "Cumulative curves per format", "size reduction vs float16 (%)", series, tables);
}

function heatColor(t) {  // 0 (worst) .. 1 (best): purple -> blue -> green -> yellow
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const p = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(Math.floor(p), stops.length - 2);
  const f = p - i, a = stops[i], b = stops[i + 1];
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}

// Layers x formats heatmap of isolated PSNRs; hovering names layer, format, PSNR and MB.
function heatmap(el, d, tooltip) {
  el.innerHTML = "";
  const title = document.createElement("div");
  title.className = "u-title";
  title.textContent = "Isolated PSNR per layer × format";
  el.appendChild(title);
  const nl = d.layers.length, nf = d.formats.length;
  const W = Math.max(Math.min(nl * 12, 1200), 300), rowH = 24, left = 50;
  const canvas = document.createElement("canvas");
  canvas.width = W + left; canvas.height = nf * rowH + 4;
  el.appendChild(canvas);
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
  el.dataset.points = String(cells.size);
  const legend = document.createElement("div");
  legend.className = "muted";
  legend.textContent = cells.size ? `${cells.size} of ${d.pairs} (layer, format) pairs measured; ` +
    `PSNR ${lo.toFixed(1)} dB (dark) to ${hi.toFixed(1)} dB (bright); layers in module order` : "no isolated measurements yet";
  el.appendChild(legend);
  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const li = Math.floor((ev.clientX - r.left - left) / cw), fi = Math.floor((ev.clientY - r.top) / rowH);
    const c = cells.get(li + ":" + fi);
    if (!c) { tooltip.hidden = true; return; }
    tooltip.textContent = `${d.layers[li]} · ${d.formats[fi]}-bit · ${c[2].toFixed(2)} dB · ${c[3].toFixed(3)} MB`;
    tooltip.style.left = ev.clientX + 12 + "px"; tooltip.style.top = ev.clientY + 12 + "px";
    tooltip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
}

// Compare: each search's measured recipes as one curve (points joined by size).
function compareChart(el, list) {
  const tables = [], series = [];
  list.forEach((d, i) => {
    const rs = d.recipes.slice().sort((a, b) => a.x - b.x);
    if (!rs.length) return;
    tables.push([rs.map((r) => r.x), rs.map((r) => r.y)]);
    series.push({ label: `${d.id} ${d.model_version || d.model}`, stroke: COLORS[i % COLORS.length], width: 1.5,
                  spanGaps: true, points: { show: true, size: 7 },
                  value: (u, v) => v == null ? "—" : v.toFixed(2) + " dB" });
  });
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no measured recipes" });
  return makePlot(el, "Recipes: PSNR vs size", "size reduction vs float16 (%)", series, tables);
}
