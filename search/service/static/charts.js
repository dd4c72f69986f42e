// The search page's x/y charts, drawn by uPlot (vendored); the heatmap and layer map are in
// heatmap.js, the compare view's chart in compare.js. Every chart records how many points it drew
// in its element's data-points attribute.
//
// Hover: uPlot's legend would show every series' value at the cursor's x (mostly other points'
// or none), so its live values are off; instead the tooltip names the one point nearest the
// pointer (within NEAR_PX), with that point's own values.
"use strict";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const STRATEGY_STYLE = { apple: ["Apple's thresholds", "#111827"], optimal: ["optimal (knapsack)", "#16a34a"],
                         refined: ["refined (measured)", "#dc2626"] };
const NEAR_PX = 14;

function drawn(series) {  // values uPlot draws: null / undefined are gaps
  return series.reduce((n, v) => n + (v === null || v === undefined ? 0 : 1), 0);
}

function plotWidth(el, full) {
  const w = el.parentElement.clientWidth;
  return full ? Math.max(w - 30, 320) : Math.max(Math.min(w / 2 - 40, 620), 320);
}

// points: [{x, y, text}] the tooltip may name; hooks: uPlot hooks (e.g. marks drawn on top).
function makePlot(el, title, xLabel, series, tables, points, extra) {
  el.innerHTML = "";
  const data = uPlot.join(tables);
  const opts = {
    title: title, width: plotWidth(el, extra && extra.full), height: (extra && extra.height) || 300,
    scales: { x: { time: false, range: (extra && extra.xRange) || undefined }, y: { range: headroom } },
    legend: { live: false },
    axes: [{ label: xLabel }, { label: "PSNR (dB)" }],
    series: [{ label: xLabel }].concat(series),
    hooks: (extra && extra.hooks) || {},
  };
  const plot = new uPlot(opts, data, el);
  el.dataset.points = String(data.slice(1).reduce((n, s) => n + drawn(s), 0));
  nearestTip(plot, points || []);
  return plot;
}

// Room above and below the points (a point on the frame is half hidden; "capped" needs a line).
function headroom(u, lo, hi) {
  if (lo === null || hi === null || !isFinite(lo) || !isFinite(hi)) return [0, 1];
  const pad = Math.max((hi - lo) * 0.08, 2);
  return [lo - pad, hi + pad];
}

// The tooltip for the point nearest the pointer, in pixels; data-hover holds its text (tests).
function nearestTip(plot, points) {
  const tip = document.getElementById("tooltip"), el = plot.root.parentElement;
  plot.over.addEventListener("mousemove", (ev) => {
    const r = plot.over.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    let best = null, bestD = NEAR_PX;
    for (const p of points) {
      const d = Math.hypot(plot.valToPos(p.x, "x") - mx, plot.valToPos(Math.min(p.y, p.cap || Infinity), "y") - my);
      if (d <= bestD) { best = p; bestD = d; }
    }
    el.dataset.hover = best ? best.text : "";
    if (!best) { tip.hidden = true; return; }
    tip.textContent = best.text;
    tip.style.left = ev.clientX + 12 + "px"; tip.style.top = ev.clientY + 12 + "px";
    tip.hidden = false;
  });
  plot.over.addEventListener("mouseleave", () => { tip.hidden = true; el.dataset.hover = ""; });
}

function pointsOnly(label, color) {
  return { label: label, stroke: color, fill: color, width: 0, paths: () => null,
           points: { show: true, size: 9, fill: color } };
}

// Recipes whose mean PSNR is above the chart's ceiling are drawn at it: an arrow and "capped"
// above each one says so.
function cappedMarks(recipes) {
  return (u) => {
    const ctx = u.ctx, dpr = devicePixelRatio;
    ctx.save();
    ctx.fillStyle = "#b45309"; ctx.strokeStyle = "#b45309"; ctx.font = `${10 * dpr}px sans-serif`;
    ctx.textAlign = "left"; ctx.textBaseline = "middle"; ctx.lineWidth = dpr;  // not the axes' last settings
    for (const r of recipes.filter((r) => r.capped)) {
      const x = u.valToPos(r.x, "x", true), y = u.valToPos(r.y, "y", true);
      ctx.beginPath(); ctx.moveTo(x, y - 7 * dpr); ctx.lineTo(x, y - 18 * dpr); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(x - 3 * dpr, y - 15 * dpr); ctx.lineTo(x, y - 19 * dpr); ctx.lineTo(x + 3 * dpr, y - 15 * dpr); ctx.stroke();
      ctx.fillText(`capped (> ${r.y.toFixed(0)} dB)`, x + 8 * dpr, y - 4 * dpr);
    }
    ctx.restore();
  };
}

function recipeText(r, cap) {
  const db = r.capped ? `above ${cap} dB (drawn capped at ${cap})` : `${r.y.toFixed(2)} dB`;
  return `${r.key} · ${r.strategy} · ${r.avg_bits.toFixed(2)} bits · ${r.x.toFixed(1)} % smaller · ${db}`;
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
  const points = d.recipes.map((r) => ({ x: r.x, y: r.y, text: recipeText(r, d.cap) }));
  if (d.linear8 !== null && d.linear8 !== undefined) {
    tables.push([[0, 50, 100], [d.linear8, d.linear8, d.linear8]]);
    series.push({ label: "linear_8bit", stroke: "#2563eb", dash: [4, 4], width: 1, points: { show: false } });
    points.push({ x: 50, y: d.linear8, text: `linear_8bit (8 bits, 50.0 % smaller) · ${d.linear8.toFixed(2)} dB` });
  }
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no recipes yet" });
  const plot = makePlot(el, "PSNR vs size (recipes)", "size reduction vs float16 (%)", series, tables, points,
                        { hooks: { draw: [cappedMarks(d.recipes)] } });
  el.dataset.points = String(d.recipes.length);  // the recipes; the linear 8-bit line is not a point
  el.dataset.capped = String(d.recipes.filter((r) => r.capped).length);
  el.dataset.recipes = strategies.map((st) => st + ":" + d.recipes.filter((r) => r.strategy === st).length).join(",");
  return plot;
}

// Cumulative curves: one line per format, point i = the first i layers palettized.
function cumulativeChart(el, d) {
  const tables = [], series = [], points = [];
  d.formats.forEach((f, i) => {
    const c = d.curves[f];
    if (!c || !c.x.length) return;
    tables.push([c.x, c.y]);
    series.push({ label: f + "-bit", stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true });
    c.x.forEach((x, j) => points.push({ x: x, y: c.y[j], text: `${f}-bit, first ${j + 1} layers · ${x.toFixed(1)} % smaller · ${c.y[j].toFixed(2)} dB` }));
  });
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no cumulative curves yet" });
  return makePlot(el, "Cumulative curves per format", "size reduction vs float16 (%)", series, tables, points);
}
