// The compare view (#/compare/<id>,<id>,...): one full-width chart where every search's Apple,
// optimal and refined recipes are separate marker series (a colour per search, a marker shape per
// strategy, hollow and growing with the search's place in the list, so two searches with equal
// results both stay visible), then a table of every search's recipes and one of the settings in
// which their configs differ. An id that cannot be read is one error line of its own; the others
// are drawn all the same.
"use strict";
const SHAPES = { apple: "circle", optimal: "square", refined: "triangle" };

function shapePath(shape, x, y, r) {
  const p = new Path2D();
  if (shape === "square") p.rect(x - r, y - r, 2 * r, 2 * r);
  else if (shape === "triangle") { p.moveTo(x, y - r * 1.2); p.lineTo(x + r, y + r * 0.8); p.lineTo(x - r, y + r * 0.8); p.closePath(); }
  else if (shape === "diamond") { p.moveTo(x, y - r); p.lineTo(x + r, y); p.lineTo(x, y + r); p.lineTo(x - r, y); p.closePath(); }
  else { p.moveTo(x + r, y); p.arc(x, y, r, 0, 2 * Math.PI); }
  return p;
}

// A uPlot series drawn as hollow markers of one shape and size (no line between points).
function markerSeries(label, color, shape, radius) {
  return {
    label: label, stroke: color, width: 2, points: { show: false },
    paths: (u, si, i0, i1) => {
      const all = new Path2D(), dpr = devicePixelRatio;
      for (let i = i0; i <= i1; i++) {
        const y = u.data[si][i];
        if (y === null || y === undefined) continue;
        all.addPath(shapePath(shape, u.valToPos(u.data[0][i], "x", true), u.valToPos(y, "y", true), radius * dpr));
      }
      return { stroke: all };
    },
  };
}

function configDiffs(searches) {
  const keys = [...new Set(searches.flatMap((s) => Object.keys(s.config || {})))].sort();
  const show = (v) => (v === null || v === undefined ? "—" : Array.isArray(v) ? v.join(",") : typeof v === "object" ? JSON.stringify(v) : String(v));
  return keys.map((k) => [k, searches.map((s) => show((s.config || {})[k]))]).filter(([, vs]) => new Set(vs).size > 1);
}

function compareView(ids) {
  return {
    render(root) {
      root.innerHTML = `<h2>Compare searches</h2><p class="muted" id="compare-hint">Select two or more searches in the list
(<a href="#/">searches</a>) and press “compare selected”.</p><div id="compare-errors"></div>
<div class="chart wide" id="chart-compare"></div>
<h2>Recipes</h2><div class="scroll"><table id="compare-recipes"><thead><tr><th>search</th><th>key</th><th>strategy</th>
<th class="num">bits</th><th class="num">MB</th><th class="num">predicted dB</th><th class="num">measured dB</th></tr></thead><tbody></tbody></table></div>
<h2>Config differences</h2><div class="scroll"><table id="compare-config"><thead></thead><tbody></tbody></table></div>`;
    },
    async refresh(root) {
      if (!ids.length) return;
      root.querySelector("#compare-hint").hidden = true;
      const got = await Promise.all(ids.map(async (id) => {
        try {
          const [m, d] = await Promise.all([json(`/searches/${encodeURIComponent(id)}/measurements`), json(`/searches/${encodeURIComponent(id)}`)]);
          return { id: id, m: m.body, d: d.body };
        } catch (e) { return { id: id, error: e.message }; }
      }));
      const bad = got.filter((g) => g.error), good = got.filter((g) => !g.error);
      root.querySelector("#compare-errors").innerHTML = bad.map((g) =>
        `<div class="error compare-error" data-id="${esc(g.id)}">${esc(g.id)}: ${esc(g.error.split("\n")[0])}</div>`).join("");
      const key = JSON.stringify(good.map((g) => [g.m.id, g.d.status, g.m.recipes.length]));
      if (key === this.drawn) return;  // redrawn only when something changed
      this.drawn = key;
      compareChart(root.querySelector("#chart-compare"), good.map((g) => g.m));
      root.querySelector("#compare-recipes tbody").innerHTML = good.flatMap((g, i) => g.d.recipes.slice()
        .sort((a, b) => b.avg_bits - a.avg_bits).map((r) =>
          `<tr data-search="${g.d.id}"><td><span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span><a href="#/search/${g.d.id}"><code>${g.d.id}</code></a></td>
<td class="key">${esc(r.key)}</td><td>${esc(r.strategy)}</td><td class="num">${num(r.avg_bits, 2)}</td><td class="num">${num(r.size_mb, 1)}</td>
<td class="num">${num(r.predicted_psnr, 2)}</td><td class="num">${num(r.psnr, 2)}</td></tr>`)).join("")
        || `<tr><td colspan="7" class="muted">no recipes</td></tr>`;
      const diffs = configDiffs(good.map((g) => g.d));
      root.querySelector("#compare-config thead").innerHTML = `<tr><th>setting</th>${good.map((g) => `<th><code>${g.d.id}</code></th>`).join("")}</tr>`;
      root.querySelector("#compare-config tbody").innerHTML = diffs.map(([k, vs]) =>
        `<tr data-key="${esc(k)}"><td><code>${esc(k)}</code></td>${vs.map((v) => `<td>${esc(v)}</td>`).join("")}</tr>`).join("")
        || `<tr><td colspan="${good.length + 1}" class="muted">${good.length > 1 ? "the same config" : "—"}</td></tr>`;
    },
  };
}

function compareChart(el, list) {
  const tables = [], series = [], points = [];
  list.forEach((d, i) => {
    const color = COLORS[i % COLORS.length];
    for (const st of [...new Set(d.recipes.map((r) => r.strategy))].sort()) {
      const rs = d.recipes.filter((r) => r.strategy === st).sort((a, b) => a.x - b.x);
      tables.push([rs.map((r) => r.x), rs.map((r) => r.y)]);
      series.push(markerSeries(`${d.id} ${st} ${d.model_version || d.model}`, color, SHAPES[st] || "diamond", 5 + 3 * i));
      rs.forEach((r) => points.push({ x: r.x, y: r.y, text: `${d.id} · ${recipeText(r, d.cap)}` }));
    }
  });
  if (!tables.length) tables.push([[0, 100], [null, null]]), series.push({ label: "no measured recipes" });
  const plot = makePlot(el, "Recipes: PSNR vs size (colour: search, shape: ● Apple ■ optimal ▲ refined)",
                        "size reduction vs float16 (%)", series, tables, points,
                        { full: true, height: 420, xRange: () => [0, 100], hooks: { draw: list.map((d) => cappedMarks(d.recipes)) } });
  el.dataset.series = String(series.length);
  return plot;
}
