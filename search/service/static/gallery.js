// The search page's gallery (GET /searches/{id}/images): one row per model (float16, linear
// 8-bit, each recipe) and one thumbnail per prompt, with each row's mean image PSNR / SSIM and
// worst prompt. Clicking a thumbnail opens it beside the float16 image of the same prompt (side
// by side, and one frame with a slider that wipes between the two), its metrics under it.
// Images are fetched with the token (an <img src> cannot send it) and shown from object URLs;
// the service marks them immutable, so the browser's cache serves them again. refresh() answers
// the images JSON (the recipes table shows each row's mean PSNR and SSIM).
"use strict";

function galleryView(sid, el) {
  const urls = new Map();  // image URL -> object URL (kept while the page shows this search)
  let shown = null, data = null;

  async function image(url) {
    if (!urls.has(url)) {
      urls.set(url, (async () => {
        const r = await mbpAuth.fetch(url, { cache: "default" });
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        return URL.createObjectURL(await r.blob());
      })());
    }
    return urls.get(url);
  }

  function fill(img) {
    image(img.dataset.src).then((u) => { img.src = u; }, () => { img.alt = "image not available"; img.classList.add("broken"); });
  }

  function metrics(im) {  // PSNR null: the very pixels of the float16 image (infinite PSNR)
    return im.psnr === null || im.psnr === undefined ? `identical to the float16 image (PSNR ∞ · SSIM ${num(im.ssim, 4)})`
      : `PSNR ${num(im.psnr, 2)} dB · SSIM ${num(im.ssim, 4)} vs float16`;
  }

  function rowHead(row) {
    const bits = row.avg_bits === null || row.avg_bits === undefined ? (row.key === "original" ? "16 bits" : "") : `${num(row.avg_bits, 2)} bits`;
    const name = row.key === "original" ? "float16 (original)" : row.key;
    const same = row.key !== "original" && row.images.length && row.images.every((im) => im.psnr === null || im.psnr === undefined);
    const m = same ? `<br><span class="muted">identical to float16 (PSNR ∞)</span>`
      : row.psnr_mean === null || row.psnr_mean === undefined ? ""
      : `<br><span class="muted">PSNR ${num(row.psnr_mean, 2)} dB · SSIM ${num(row.ssim_mean, 4)}${row.worst_prompt !== null && row.worst_prompt !== undefined ? ` · worst: prompt ${row.worst_prompt}` : ""}</span>`;
    return `<th class="gallery-row"><code>${esc(name)}</code> <span class="muted">${bits}</span>${m}</th>`;
  }

  function grid(d) {
    const head = `<tr><th></th>${d.prompts.map((p, i) => `<th class="prompt" title="${esc(p)}">${i}: ${esc(String(p).slice(0, 40))}</th>`).join("")}</tr>`;
    const body = d.rows.map((row) => `<tr data-key="${esc(row.key)}">${rowHead(row)}${row.images.map((im) =>
      `<td><img class="thumb" data-key="${esc(row.key)}" data-prompt="${im.prompt}" data-src="${esc(im.url)}" alt="${esc(row.key)}, prompt ${im.prompt}" title="${esc(metrics(im))}"></td>`).join("")}</tr>`).join("");
    return `<div class="scroll"><table id="gallery-grid">${head}${body}</table></div><div id="gallery-compare"></div>`;
  }

  function open(key, prompt) {
    const row = data.rows.find((r) => r.key === key), orig = data.rows.find((r) => r.key === "original");
    const im = row && row.images.find((x) => x.prompt === prompt), ref = orig && orig.images.find((x) => x.prompt === prompt);
    if (!im || !ref) return;
    const box = el.querySelector("#gallery-compare");
    box.dataset.key = key; box.dataset.prompt = String(prompt);
    box.innerHTML = `<h3>${esc(key)} vs float16 · prompt ${prompt}: <span class="muted">${esc(data.prompts[prompt])}</span></h3>
<div class="side-by-side"><figure><img id="cmp-ref" data-src="${esc(ref.url)}" alt="float16"><figcaption>float16 (original)</figcaption></figure>
<figure><img id="cmp-img" data-src="${esc(im.url)}" alt="${esc(key)}"><figcaption>${esc(key)}</figcaption></figure>
<figure class="wipe"><div class="wipe-frame"><img data-src="${esc(ref.url)}" alt="float16"><img class="wipe-top" data-src="${esc(im.url)}" alt="${esc(key)}" style="clip-path:inset(0 50% 0 0)"></div>
<figcaption>left of the line: ${esc(key)}, right: float16 <input type="range" id="wipe" min="0" max="100" value="50" aria-label="wipe"></figcaption></figure></div>
<p id="cmp-metrics">${esc(metrics(im))} · sha256 <code>${esc(String(im.sha256 || "").slice(0, 16))}…</code></p>`;
    box.querySelectorAll("img[data-src]").forEach(fill);
    box.querySelector("#wipe").oninput = (ev) => {
      box.querySelector(".wipe-top").style.clipPath = `inset(0 ${100 - Number(ev.target.value)}% 0 0)`;
    };
  }

  el.addEventListener("click", (ev) => {
    const t = ev.target.closest("img.thumb");
    if (t) open(t.dataset.key, Number(t.dataset.prompt));
  });

  return async function refresh() {
    let d;
    try { d = (await json(`/searches/${sid}/images`)).body; } catch (e) {
      d = { status: "missing", prompts: [], rows: [], error: e.message };
    }
    const count = d.rows.reduce((n, r) => n + r.images.length, 0);
    const key = `${d.status}:${d.rows.length}:${count}`;
    el.dataset.status = d.status; el.dataset.images = String(count);
    if (key === shown) return d;
    shown = key; data = d;
    const all = d.rows.length * d.prompts.length;
    const make = `<code>search images ${esc(sid)} -o DIR</code> generates them (a new search does, unless --no-gallery)`;
    if (!count) {
      el.innerHTML = `<p class="muted" id="gallery-hint">${d.status === "running" ? "generating the images…" : `no images yet: ${make}`}</p>`;
      return d;
    }
    const opened = el.querySelector("#gallery-compare");
    const was = opened && opened.dataset.key ? [opened.dataset.key, Number(opened.dataset.prompt)] : null;
    const note = d.status === "running" ? `generating the images: ${count} of ${all} so far`
      : d.status === "missing" ? `${count} of ${all} images; ${make}` : "";
    el.innerHTML = (note ? `<p class="muted" id="gallery-hint">${note}</p>` : "") + grid(d);
    el.querySelectorAll("img.thumb").forEach(fill);
    if (was) open(...was);
    return d;
  };
}
