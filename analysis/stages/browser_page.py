"""The feature browser's HTML: one page template (inline style and script) and the index page.

The page is static: `browser.build_browser` embeds the feature table as one JSON blob, and the
script below renders it. It opens from file:// with no server and no network, so it never uses
fetch() (refused for file:// URLs); per-feature card data comes from `cards/<chunk>.js` files
added as <script> tags, which file:// pages may load.

The script honours a URL hash, which is also how it records its own state (shareable, and how
tests/test_browser.py drives it): `#sort=density_desc&page=1&q=cat&min_density=0.001&
max_top_image_label_share=0.5&dead=hide&feature=12`. Errors (window.onerror, unhandled promise
rejections, images that fail to load) are written into <pre id="errors">, so a headless
browser's DOM dump shows them.
"""

from __future__ import annotations

import html
import json

from analysis.evaluation.html import ERROR_GUARD

_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 18px; margin: 0 0 .3em; } h2 { font-size: 15px; margin: .2em 0; }
#errors { color: #b00; background: #fee; white-space: pre-wrap; margin: 0; }
#errors:empty { display: none; }
.layout { display: flex; gap: 1.5em; align-items: flex-start; }
.list { flex: 0 0 auto; } .card { flex: 1 1 auto; min-width: 300px; position: sticky; top: 0; }
table { border-collapse: collapse; } td, th { padding: 1px 6px; text-align: right; }
th { cursor: pointer; background: #eee; user-select: none; white-space: nowrap; }
#features tbody tr { cursor: pointer; } #features tbody tr:hover { background: #eef; }
tr.dead { color: #999; } tr.selected { background: #ffd !important; }
.badge { font-size: 11px; padding: 0 4px; border-radius: 3px; background: #ddd; color: #555; }
.filters { margin: .4em 0; display: flex; flex-wrap: wrap; gap: .3em 1em; }
.filters input[type=number] { width: 6em; } .pager button { margin-right: .3em; }
.metrics th { cursor: default; font-weight: normal; color: #555; } .stats td:first-child { text-align: left; color: #555; }
.tiles { display: flex; flex-wrap: wrap; gap: 6px; margin-top: .5em; }
.tile { position: relative; font-size: 11px; }
.tile img, .tile canvas { display: block; image-rendering: pixelated; }
.tile canvas { position: absolute; left: 0; top: 0; }
svg .bar { fill: #89a; } svg .bar.here { fill: #d33; }
"""

# The page's script: parse the blob, keep state in the URL hash, render one page of rows and the
# selected feature's card. Plain ES2017, no libraries.

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const COL = Object.fromEntries(D.columns.map((c, i) => [c, i]));
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (v) => v === null ? "–" : (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : String(v));

// ---- state <-> URL hash ----
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const [sortCol, dir] = (p.get("sort") || "feature_asc").split(/_(?=(?:asc|desc)$)/);
  const s = {sort: COL[sortCol] === undefined ? "feature" : sortCol, desc: dir === "desc",
             page: Math.max(0, parseInt(p.get("page") || "0", 10) || 0), q: p.get("q") || "",
             hideDead: p.get("dead") === "hide", min: {}, max: {}, feature: null};
  for (const c of D.filters) {
    if (p.has("min_" + c)) s.min[c] = parseFloat(p.get("min_" + c));
    if (p.has("max_" + c)) s.max[c] = parseFloat(p.get("max_" + c));
  }
  const f = parseInt(p.get("feature"), 10);
  if (f >= 0 && f < D.rows.length) s.feature = f;
  return s;
}
function writeHash(s) {
  const p = new URLSearchParams();
  p.set("sort", `${s.sort}_${s.desc ? "desc" : "asc"}`);
  if (s.page) p.set("page", s.page);
  if (s.q) p.set("q", s.q);
  if (s.hideDead) p.set("dead", "hide");
  for (const c of D.filters) {
    if (Number.isFinite(s.min[c])) p.set("min_" + c, s.min[c]);
    if (Number.isFinite(s.max[c])) p.set("max_" + c, s.max[c]);
  }
  if (s.feature !== null) p.set("feature", s.feature);
  location.hash = p.toString();  // the hashchange handler renders
}

// ---- the feature list: filter, sort (nulls last, ties by feature), one page of rows ----
let cached = {key: null, rows: null};
function visibleRows(s) {
  const key = JSON.stringify([s.sort, s.desc, s.q, s.hideDead, s.min, s.max]);
  if (cached.key === key) return cached.rows;
  const q = s.q.trim().toLowerCase(), asNumber = /^\d+$/.test(q) ? parseInt(q, 10) : null;
  const rows = D.rows.filter((r) => {
    if (s.hideDead && r[COL.fire_count] === 0) return false;
    if (q && r[COL.feature] !== asNumber && !String(r[COL.top_image_label] ?? "").toLowerCase().includes(q)) return false;
    for (const c of D.filters) {
      const v = r[COL[c]];
      if (Number.isFinite(s.min[c]) && !(v !== null && v >= s.min[c])) return false;
      if (Number.isFinite(s.max[c]) && !(v !== null && v <= s.max[c])) return false;
    }
    return true;
  });
  const i = COL[s.sort], sign = s.desc ? -1 : 1;
  rows.sort((a, b) => {
    const x = a[i], y = b[i];
    if (x !== y) {
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    }
    return a[COL.feature] - b[COL.feature];
  });
  cached = {key, rows};
  return rows;
}

function renderList(s) {
  const rows = visibleRows(s), pages = Math.max(1, Math.ceil(rows.length / D.page_rows));
  const page = Math.min(s.page, pages - 1), shown = rows.slice(page * D.page_rows, (page + 1) * D.page_rows);
  $("head").innerHTML = D.columns.map((c) => `<th data-col="${c}">${esc(D.titles[c])}` +
    (c === s.sort ? (s.desc ? " ▼" : " ▲") : "") + "</th>").join("");
  $("body").innerHTML = shown.map((r) => {
    const f = r[COL.feature], dead = r[COL.fire_count] === 0;
    const cls = [dead ? "dead" : "", f === s.feature ? "selected" : ""].join(" ").trim();
    return `<tr data-feature="${f}"${cls ? ` class="${cls}"` : ""}>` + D.columns.map((c, j) =>
      `<td>${esc(fmt(r[j]))}${c === "feature" && dead ? ' <span class="badge">dead</span>' : ""}</td>`).join("") + "</tr>";
  }).join("");
  $("count").textContent = rows.length ? `rows ${page * D.page_rows + 1}–${page * D.page_rows + shown.length} ` +
    `of ${rows.length} (of ${D.rows.length} features), page ${page + 1}/${pages}` : `no feature matches (of ${D.rows.length})`;
  $("prev").disabled = page === 0;
  $("next").disabled = page >= pages - 1;
  document.body.dataset.rows = String(shown.length);
}

// ---- one feature's card: stats, top images under their patch heatmaps, density histogram ----
const chunks = {}, waiting = {};
window.spectraCards = (k, entries) => { chunks[k] = entries; (waiting[k] || []).forEach((done) => done(entries)); };
function loadChunk(k) {
  if (chunks[k]) return Promise.resolve(chunks[k]);
  return new Promise((resolve, reject) => {
    const first = !waiting[k];
    (waiting[k] = waiting[k] || []).push(resolve);
    if (!first) return;
    const tag = document.createElement("script");
    tag.src = `cards/${String(k).padStart(4, "0")}.js`;
    tag.onerror = () => reject(new Error(`card data ${tag.src} failed to load: build the browser again`));
    document.head.appendChild(tag);
  });
}

function tokenKind(t) {
  for (const [kind, [a, b]] of Object.entries(D.other_tokens)) if (t >= a && t < b) return ` (${kind})`;
  return "";
}

function drawHeat(canvas, bytes, offset, scaleAlpha) {
  const [rows, cols] = D.patch_grid, ctx = canvas.getContext("2d");
  for (let y = 0; y < rows; y++) for (let x = 0; x < cols; x++) {
    ctx.fillStyle = `rgba(255,0,0,${(bytes[offset + y * cols + x] / 255) * scaleAlpha})`;
    ctx.fillRect(x, y, 1, 1);
  }
}

function renderTiles(entry) {
  const [images, acts, tokens, labels, heat64, scale] = entry;
  const bytes = heat64 ? Uint8Array.from(atob(heat64), (c) => c.charCodeAt(0)) : null;
  const cells = D.patch_grid ? D.patch_grid[0] * D.patch_grid[1] : 0;
  const box = $("tiles");
  box.innerHTML = "";
  images.forEach((idx, i) => {
    const tile = imageTile(idx, "tile");
    if (bytes) {
      const canvas = document.createElement("canvas");
      [canvas.height, canvas.width] = D.patch_grid;
      canvas.style.width = canvas.style.height = `${D.tile}px`;
      drawHeat(canvas, bytes, i * cells, D.heat_alpha / 255);
      tile.appendChild(canvas);
    }
    tile.appendChild(caption(`${fmt(acts[i])} · ${labels[i]}${tokenKind(tokens[i])}`));
    box.appendChild(tile);
  });
  $("scale").textContent = bytes ? `red opacity: 0 → ${fmt(scale)} (the largest patch activation ` +
    "of these images; one scale for the whole card)" : "no patch heatmaps for this store";
  const [, , , , , , samples, classes, activations] = entry;
  $("classes").textContent = classes ? `the model's head reads its decoder direction as: ${classes.join(", ")}` : "";
  renderSamples(samples);
  renderActivations(activations);
}

// [first bin, counts…] of the images it fires on, each counted at its max activation, on the
// fixed log2 bins D.activation_bins = [first edge, last edge, width]
function renderActivations(hist) {
  const box = $("activations");
  box.innerHTML = "";
  delete box.dataset.bins;
  if (!hist) return;
  const [first, ...counts] = hist, [lo, , step] = D.activation_bins, w = 10, h = 50;
  const top = Math.max(...counts, 1), edge = (i) => fmt(2 ** (lo + i * step));
  const bars = counts.map((n, i) => {
    const bh = Math.max(n ? 1 : 0, (n / top) * h);
    return `<rect class="bar" x="${i * w}" y="${h - bh}" width="${w - 1}" height="${bh}">` +
      `<title>${edge(first + i)} – ${edge(first + i + 1)}: ${n} images</title></rect>`;
  }).join("");
  box.dataset.bins = String(counts.length);
  box.innerHTML = "<h2>Its activations: the images it fires on, by their max activation (log scale)</h2>" +
    `<svg width="${Math.max(counts.length * w, 40)}" height="${h + 2}">${bars}</svg>` +
    `<div>${edge(first)} … ${edge(first + counts.length)}, ${counts.reduce((a, b) => a + b, 0)} images</div>`;
}

function renderSamples(samples) {
  const box = $("samples");
  box.innerHTML = "";
  $("samples-title").innerHTML = samples ? "<h2>Across its range: a uniform sample of the images it fires on, " +
    "weakest to strongest (q: quantile in the sample)</h2>" : "";
  if (!samples) return;
  const [images, acts, quantiles, labels] = samples;
  images.forEach((idx, i) => {
    const tile = imageTile(idx, "tile sample");
    tile.appendChild(caption(`q ${fmt(quantiles[i])} · ${fmt(acts[i])} · ${labels[i]}`));
    box.appendChild(tile);
  });
}

function imageTile(idx, className) {  // one dataset image; data-loaded once it has
  const tile = document.createElement("div"), img = new Image();
  tile.className = className;
  img.width = img.height = D.tile;
  img.alt = `image ${idx}`;
  img.onload = () => { tile.dataset.loaded = "1"; };
  img.onerror = () => report(`image ${img.src} failed to load: build the browser again`);
  img.src = `${D.image_dir}/${idx}.png`;
  tile.appendChild(img);
  return tile;
}

function caption(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div;
}

function histogramSvg(density) {
  if (!D.histogram) return "";
  const bins = D.histogram, w = 14, h = 60, top = Math.max(...bins.map((b) => b[2]), 1);
  const at = density > 0 ? Math.log10(density) : null;
  const bars = bins.map(([lo, hi, n], i) => {
    const here = at === null ? lo === null : (lo !== null && at >= lo && (at < hi || (hi === 0 && at === 0)));
    const bh = Math.max(n ? 1 : 0, (n / top) * h);
    return `<rect class="bar${here ? " here" : ""}" x="${i * w}" y="${h - bh}" width="${w - 2}" height="${bh}">` +
      `<title>${lo === null ? "never fired" : `10^${lo} – 10^${hi}`}: ${n} latents</title></rect>`;
  }).join("");
  const first = bins.length > 1 ? bins[1][0] : 0;
  return `<svg width="${bins.length * w}" height="${h + 2}">${bars}</svg>` +
    `<div>first bar: latents that never fired; then log10 density from ${first} to 0, ${bins.length - 1} bins</div>`;
}

let openFeature = null;
function renderCard(s) {
  const f = s.feature;
  if (f === openFeature) return;
  openFeature = f;
  $("card").hidden = f === null;
  if (f === null) return;
  const r = D.rows[f], dead = r[COL.fire_count] === 0;
  $("card-title").innerHTML = `feature ${f}` + (dead ? ' <span class="badge">dead: never fired on the mined images</span>' : "");
  $("card").dataset.feature = String(f);
  $("stats").innerHTML = D.columns.filter((c) => c !== "feature")
    .map((c) => `<tr><td>${esc(D.titles[c])}</td><td>${esc(fmt(r[COL[c]]))}</td></tr>`).join("");
  $("histogram").innerHTML = D.histogram ? "<h2>Firing density of every latent (held-out split)</h2>" +
    histogramSvg(r[COL.density]) + "<div>red: the bin of this feature's density</div>" : "";
  for (const id of ["tiles", "samples", "samples-title", "classes", "activations"]) $(id).innerHTML = "";
  $("scale").textContent = r[COL.n_top] ? "loading…" : "no top images: this feature never fired";
  if (!r[COL.n_top]) return;
  loadChunk(Math.floor(f / D.chunk)).then((entries) => {
    const entry = entries[String(f)];
    if (!entry) throw new Error(`feature ${f} is missing from its card data: build the browser again`);
    if (openFeature === f) renderTiles(entry);  // not if another card opened meanwhile
  }).catch((e) => report(String(e)));
}

// ---- controls ----
function render() {
  const s = readHash();
  $("q").value = s.q;
  $("hide-dead").checked = s.hideDead;
  for (const c of D.filters) {
    $("min_" + c).value = Number.isFinite(s.min[c]) ? s.min[c] : "";
    $("max_" + c).value = Number.isFinite(s.max[c]) ? s.max[c] : "";
  }
  renderList(s);
  renderCard(s);
}

function buildControls() {
  $("filters").innerHTML = D.filters.map((c) => `<label>${esc(D.titles[c])} ` +
    `<input type="number" step="any" id="min_${c}" placeholder="min"> – ` +
    `<input type="number" step="any" id="max_${c}" placeholder="max"></label>`).join("");
  const edit = (change) => { const s = readHash(); change(s); writeHash(s); };
  $("filters").addEventListener("change", (e) => edit((s) => {
    const [bound, ...rest] = e.target.id.split("_"), c = rest.join("_"), v = parseFloat(e.target.value);
    s[bound][c] = Number.isFinite(v) ? v : undefined;
    s.page = 0;
  }));
  $("q").addEventListener("input", (e) => edit((s) => { s.q = e.target.value; s.page = 0; }));
  $("hide-dead").addEventListener("change", (e) => edit((s) => { s.hideDead = e.target.checked; s.page = 0; }));
  $("head").addEventListener("click", (e) => {
    const c = e.target.closest("th")?.dataset.col;
    if (c) edit((s) => { s.desc = s.sort === c ? !s.desc : c !== "feature"; s.sort = c; s.page = 0; });
  });
  $("body").addEventListener("click", (e) => {
    const tr = e.target.closest("tr");
    if (tr) edit((s) => { s.feature = parseInt(tr.dataset.feature, 10); });
  });
  $("prev").addEventListener("click", () => edit((s) => { s.page = Math.max(0, s.page - 1); }));
  $("next").addEventListener("click", () => edit((s) => { s.page += 1; }));
}

buildControls();
window.addEventListener("hashchange", render);
render();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body>
<pre id="errors"></pre>
<script>{guard}</script>
<p><a href="../index.html">all dictionaries</a></p>
<h1>{title}</h1>
<table class="metrics">{metrics}</table>
<div class="layout">
<div class="list">
  <div class="filters"><label>feature or label <input id="q" type="search"></label>
    <label><input id="hide-dead" type="checkbox"> hide dead</label></div>
  <div class="filters" id="filters"></div>
  <div class="pager"><button id="prev">◀ prev</button><button id="next">next ▶</button><span id="count"></span></div>
  <table id="features"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
</div>
<div class="card" id="card" hidden>
  <h2 id="card-title"></h2>
  <table class="stats" id="stats"></table>
  <div id="scale"></div>
  <div class="tiles" id="tiles"></div>
  <div id="classes"></div>
  <div id="samples-title"></div>
  <div class="tiles" id="samples"></div>
  <div id="activations"></div>
  <div id="histogram"></div>
</div>
</div>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""


def _json_for_script(value) -> str:
    """JSON that cannot end the <script> element it sits in (no `</`), and no NaN (not JSON)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _metric_rows(metrics: dict) -> str:
    """One header row of names over one row of values."""
    return ("<tr>" + "".join(f"<th>{html.escape(str(k))}</th>" for k in metrics) + "</tr><tr>"
            + "".join(f"<td>{html.escape(str(v))}</td>" for v in metrics.values()) + "</tr>")


def page_template() -> str:
    """Everything of a dictionary page that is code, not data (a change rebuilds every page)."""
    return _PAGE + _STYLE + ERROR_GUARD + _SCRIPT


def render_page(title: str, metrics: dict, data: dict) -> str:
    """A dictionary's page: `metrics` (name -> shown value) above the feature list; `data` is the
    blob the script reads (columns, titles, rows, filters, chunk, page_rows, tile, image_dir,
    patch_grid, other_tokens, heat_alpha, histogram)."""
    return _PAGE.format(title=html.escape(title), style=_STYLE, guard=ERROR_GUARD, metrics=_metric_rows(metrics),
                        data=_json_for_script(data), script=_SCRIPT)


_INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Spectra feature browser</title><style>{style}</style></head>
<body>
<h1>Spectra feature browser</h1>
<p>{n} dictionaries; each link opens its feature list and cards.</p>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
</body></html>
"""


def render_index(columns: list[str], rows: list[dict]) -> str:
    """The index page: one row per dictionary (`rows[i]["href"]` links its `dict_id` cell)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td><a href=\"{html.escape(r['href'])}\">{html.escape(str(r[c]))}</a></td>" if c == "dict_id"
                         else f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>"
        for r in rows)
    return _INDEX.format(style=_STYLE, n=len(rows), head=head, rows=body)
