"""Attention views of a HookedViT (or a ZeroShotClassifier over one): the patterns themselves, two
per-head summaries (attention to the class token, mean attention distance) and two pictures (a
static PNG grid and a self-contained interactive HTML page).

Patterns are (L, B, H, T, T) = (layer, image, head, query token, key token), each query row
summing to 1; tokens are laid out as the model does: class token (if any), registers, then the
grid_size**2 patches in row-major order. Functions taking one image's patterns want (L, H, T, T).
"""

from __future__ import annotations

import base64
import html
import io
import json
import operator
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from analysis.evaluation.html import ERROR_GUARD
from analysis.evaluation.plots import pyplot
from analysis.evaluation.toolkit.readout import tower_of
from analysis.models.config import ViTConfig

__all__ = ["attention_patterns", "attention_to_cls", "attention_distance", "attention_grid_png", "attention_html"]



def _cfg(cfg) -> ViTConfig:
    """A ViTConfig, or the config of a model passed in its place."""
    return cfg if isinstance(cfg, ViTConfig) else tower_of(cfg).cfg


@torch.no_grad()
def attention_patterns(model, images_tensor: Tensor, *, layers: Sequence[int] | None = None,
                       batch_size: int = 64) -> Tensor:
    """Attention patterns (L, B, H, T, T), float32 on the CPU, of blocks `layers` (None: all, in order)
    for float images (B, C, S, S) in [0, 1] (`analysis.models.inputs.to_model_input` makes them)."""
    tower = tower_of(model)
    cfg = tower.cfg
    want = (cfg.in_chans, cfg.image_size, cfg.image_size)
    x = images_tensor
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1:] != want or not x.is_floating_point() or not len(x):
        got = f"{x.dtype} {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"images_tensor is {got}: expected float (B, {', '.join(map(str, want))}) with B >= 1; "
                         "convert uint8 (N, H, W, C) images with analysis.models.inputs.to_model_input(images, device)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    layers = list(range(cfg.n_layers)) if layers is None else _check_layers(layers, cfg.n_layers)
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    device = next(tower.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        # stop after the last block asked for: later blocks cannot change these patterns
        _, cache = tower.run_with_cache(x[start:start + batch_size].to(device), names_filter=names,
                                        stop_at_layer=max(layers) + 1)
        out.append(torch.stack([cache[n].float().cpu() for n in names]))
    return torch.cat(out, dim=1)


def _check_layers(layers, n_layers: int) -> list[int]:
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    ok = [isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < n_layers for i in layers]
    if not layers or not all(ok):
        raise ValueError(f"layers={layers!r}: the model has {n_layers} blocks, so expected indices in "
                         f"0..{n_layers - 1} (or None for all of them)")
    return [int(i) for i in layers]


def _check_patterns(patterns: Tensor, cfg: ViTConfig, *, one_image: bool) -> Tensor:
    shape, ndim = ("(L, H, T, T)", 4) if one_image else ("(L, B, H, T, T)", 5)
    want = (cfg.n_heads, cfg.n_tokens, cfg.n_tokens)
    if not isinstance(patterns, Tensor) or patterns.ndim != ndim or patterns.shape[-3:] != want or 0 in patterns.shape:
        got = tuple(patterns.shape) if isinstance(patterns, Tensor) else type(patterns).__name__
        five = one_image and getattr(patterns, "ndim", 0) == 5
        fix = "; for one image of a batch pass patterns[:, i]" if five else ""
        raise ValueError(f"patterns {got}: expected {shape} with H={cfg.n_heads} heads and T={cfg.n_tokens} tokens "
                         f"({cfg.n_prefix} prefix + {cfg.grid_size}x{cfg.grid_size} patches) for this config; "
                         f"compute them with attention_patterns(model, images){fix}")
    return patterns.detach().float().cpu()


def attention_to_cls(patterns: Tensor, cfg) -> Tensor:
    """(L, H): the attention mass a patch query puts on the class token, averaged over images and
    patch queries."""
    cfg = _cfg(cfg)
    if not cfg.class_token:
        raise ValueError("this model has no class token (class_token=False), so there is no attention to it: "
                         "use attention_distance, or read patterns[..., :cfg.n_prefix] for its register tokens")
    p = _check_patterns(patterns, cfg, one_image=False)
    return p[:, :, :, cfg.n_prefix:, 0].mean(dim=(1, 3))


def _patch_distances(g: int) -> Tensor:
    """(P, P) Euclidean distances between the centres of a g x g grid's patches (row-major), in patches."""
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    return (pos[:, None] - pos[None]).norm(dim=-1)


def attention_distance(patterns: Tensor, cfg, *, pixels: bool = True) -> Tensor:
    """(L, H): mean attention distance (Dosovitskiy et al. 2021, Fig. 7).

    For each patch query q, Σ_k a(q, k)·‖pos(q) − pos(k)‖ over the patch keys k, where the weights
    a(q, ·) are the query's attention renormalised over the patch keys (mass on the class token and
    registers, which have no position, is dropped); averaged over patch queries and images. A query
    with no mass on any patch has no distance and is left out of the average. Distances run between
    patch centres, in pixels (pixels=True, patch_size per patch step) or in patches.
    """
    cfg = _cfg(cfg)
    p = _check_patterns(patterns, cfg, one_image=False)[..., cfg.n_prefix:, cfg.n_prefix:]
    weights = p / p.sum(-1, keepdim=True)  # 0/0 = NaN for a query with no patch mass, skipped by nanmean
    per_query = (weights * _patch_distances(cfg.grid_size)).sum(-1)  # (L, B, H, P)
    dist = per_query.transpose(1, 2).flatten(2).nanmean(-1)
    return dist * cfg.patch_size if pixels else dist


def _check_image(image: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    s = cfg.image_size
    if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
            or image.shape[:2] != (s, s) or image.shape[2] not in (1, 3)):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image is {got}: expected uint8 ({s}, {s}, C) with C 1 or 3, the image the patterns "
                         "were computed from (e.g. data.images[i])")
    return image


def _query_token(query, cfg: ViTConfig) -> tuple[int, int | None]:
    """(token index, patch index or None for the class token) of a query given as "cls" or a patch index."""
    n_patches = cfg.grid_size**2
    if query == "cls":
        if not cfg.class_token:
            raise ValueError(f"query='cls' but this model has no class token: pass a patch index 0..{n_patches - 1}")
        return 0, None
    try:
        patch = operator.index(query)
    except TypeError:
        patch = None
    if patch is None or isinstance(query, bool) or not 0 <= patch < n_patches:
        raise ValueError(f"query={query!r}: expected 'cls' or a patch index 0..{n_patches - 1} (row-major over the "
                         f"{cfg.grid_size}x{cfg.grid_size} grid: row * {cfg.grid_size} + column)")
    return cfg.n_prefix + patch, patch


def _row_labels(layers, n: int) -> list[int]:
    labels = list(range(n)) if layers is None else [operator.index(i) for i in layers]
    if len(labels) != n:
        raise ValueError(f"layers={labels!r} names {len(labels)} blocks but the patterns hold {n}: pass the "
                         "layers given to attention_patterns, or None for 0..L-1")
    return labels


def attention_grid_png(image_uint8: np.ndarray, patterns_one_image: Tensor, cfg, query, path: str | Path, *,
                       layers: Sequence[int] | None = None, cell_px: int = 160) -> Path:
    """A PNG grid, one row per layer and one column per head (titles L{i}H{h}), each cell the image
    under the query token's attention over the patch grid (colour and opacity scaled to the cell's
    max), the query patch outlined in cyan. query: "cls" or a patch index. layers: the block index of
    each row when the patterns hold a subset. The PNG is heads·cell_px wide, layers·cell_px + 44 tall."""
    cfg = _cfg(cfg)
    image = _check_image(image_uint8, cfg)
    p = _check_patterns(patterns_one_image, cfg, one_image=True)
    token, patch = _query_token(query, cfg)
    labels = _row_labels(layers, p.shape[0])
    n_rows, n_cols, g, ps, header, dpi = p.shape[0], cfg.n_heads, cfg.grid_size, cfg.patch_size, 44, 100
    plt = pyplot()
    fig = plt.figure(figsize=(n_cols * cell_px / dpi, (n_rows * cell_px + header) / dpi), dpi=dpi)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - header / (n_rows * cell_px + header),
                        wspace=0.05, hspace=0.2)
    cmap = plt.get_cmap("inferno")
    for r in range(n_rows):
        for h in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + h + 1)
            heat = p[r, h, token, cfg.n_prefix:].reshape(g, g).numpy()
            heat = np.kron(heat / max(heat.max(), 1e-12), np.ones((ps, ps)))  # nearest upsampling to pixels
            overlay = cmap(heat)
            overlay[..., 3] = 0.75 * heat  # faint where attention is low, so the image shows through
            ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.imshow(overlay)
            if patch is not None:
                row, col = divmod(patch, g)
                ax.add_patch(plt.Rectangle((col * ps - 0.5, row * ps - 0.5), ps, ps, fill=False, edgecolor="cyan", lw=1.5))
            ax.set_title(f"L{labels[r]}H{h}", fontsize=8, pad=2)
            ax.set_axis_off()
    fig.suptitle(f"query {'cls' if patch is None else f'patch {patch}'}; each cell scaled to its max", fontsize=8,
                 y=1 - 4 / (n_rows * cell_px + header), va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# State lives in the URL hash (#layer=<block>&head=<h|mean>&query=<cls|patch>), so a view can be
# shared and a headless browser can be driven to one; after drawing, the canvas's data attributes
# record what it shows (layer, head, query, max, peak patch, image loaded, pixel checksum).
_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const P = D.grid * D.grid, NP = D.prefix.length, SCALE = Math.max(1, Math.floor(384 / D.size));
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];  // inferno
function color(v) {
  const x = Math.min(1, Math.max(0, v)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  return STOPS[i].map((c, j) => Math.round(c + f * (STOPS[i + 1][j] - c)));
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const s = {layer: D.layers.length - 1, head: "mean", query: D.cls ? "cls" : Math.floor(P / 2)};
  const li = D.layers.indexOf(parseInt(p.get("layer"), 10)), h = parseInt(p.get("head"), 10), q = p.get("query");
  if (li >= 0) s.layer = li;
  if (h >= 0 && h < D.heads) s.head = h;
  if (q === "cls" && D.cls) s.query = "cls";
  else if (/^\d+$/.test(q || "") && parseInt(q, 10) < P) s.query = parseInt(q, 10);
  return s;
}
function edit(change) {
  const s = readHash();
  change(s);  // then hashchange renders
  location.hash = new URLSearchParams({layer: D.layers[s.layer], head: s.head, query: s.query}).toString();
}
function attention(s) {  // the query's attention over all T tokens, one head or the mean over heads
  const t = s.query === "cls" ? 0 : NP + s.query;
  const rows = s.head === "mean" ? D.att[s.layer].map((h) => h[t]) : [D.att[s.layer][s.head][t]];
  return rows[0].map((_, k) => rows.reduce((a, r) => a + r[k], 0) / rows.length);
}
const img = new Image();
let loaded = false;
function render() {
  const s = readHash(), a = attention(s), patches = a.slice(NP), max = Math.max(...patches);
  [$("layer").value, $("head").value] = [s.layer, s.head];
  const cv = $("canvas"), ctx = cv.getContext("2d", {willReadFrequently: true}), c = D.patch * SCALE;
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (loaded) ctx.drawImage(img, 0, 0, cv.width, cv.height);
  patches.forEach((v, i) => {
    const x = max > 0 ? v / max : 0, [r, g, b] = color(x);
    ctx.fillStyle = `rgba(${r},${g},${b},${(0.75 * x).toFixed(3)})`;
    ctx.fillRect((i % D.grid) * c, Math.floor(i / D.grid) * c, c, c);
  });
  if (s.query !== "cls") {  // outline the query patch
    [ctx.strokeStyle, ctx.lineWidth] = ["cyan", 2];
    ctx.strokeRect((s.query % D.grid) * c + 1, Math.floor(s.query / D.grid) * c + 1, c - 2, c - 2);
  }
  const px = ctx.getImageData(0, 0, cv.width, cv.height).data;
  let checksum = 0;
  for (let i = 0; i < px.length; i += 4) checksum += px[i] + px[i + 1] + px[i + 2];
  Object.assign(cv.dataset, {layer: D.layers[s.layer], head: s.head, query: s.query, max: max.toFixed(4),
                             peak: patches.indexOf(max), image: loaded ? "1" : "0", checksum});
  const where = s.query === "cls" ? "the class token"
    : `patch ${s.query} (row ${Math.floor(s.query / D.grid)}, column ${s.query % D.grid})`;
  $("info").textContent = `block ${D.layers[s.layer]}, ${s.head === "mean" ? "mean over heads" : "head " + s.head},` +
    ` query ${where}: max on a patch ${max.toFixed(4)}` +
    (NP ? "; on " + D.prefix.map((n, k) => `${n} ${a[k].toFixed(4)}`).join(", ") : "");
}
$("layer").innerHTML = D.layers.map((l, i) => `<option value="${i}">block ${l}</option>`).join("");
$("head").innerHTML = '<option value="mean">mean over heads</option>' +
  Array.from({length: D.heads}, (_, h) => `<option value="${h}">head ${h}</option>`).join("");
$("canvas").width = $("canvas").height = D.size * SCALE;
$("cls").hidden = !D.cls;
$("layer").addEventListener("change", (e) => edit((s) => { s.layer = parseInt(e.target.value, 10); }));
$("head").addEventListener("change", (e) => edit((s) => {
  s.head = e.target.value === "mean" ? "mean" : parseInt(e.target.value, 10);
}));
$("cls").addEventListener("click", () => edit((s) => { s.query = "cls"; }));
$("canvas").addEventListener("click", (e) => {
  const c = D.patch * SCALE, col = Math.floor(e.offsetX / c), row = Math.floor(e.offsetY / c);
  if (col >= 0 && col < D.grid && row >= 0 && row < D.grid) edit((s) => { s.query = row * D.grid + col; });
});
img.onload = () => { loaded = true; render(); };
img.onerror = () => report("the embedded image failed to decode");
img.src = D.image;
window.addEventListener("hashchange", render);
render();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 1em; color: #222; } .controls { display: flex; gap: 1em; }
#errors { color: #b00; background: #fee; white-space: pre-wrap; margin: 0; } #errors:empty { display: none; }
canvas { display: block; margin: .5em 0; cursor: crosshair; image-rendering: pixelated; }
</style></head>
<body>
<pre id="errors"></pre>
<script>{guard}</script>
<h1>{title}</h1>
<div class="controls"><label>layer <select id="layer"></select></label><label>head <select id="head"></select></label>
<button id="cls">query: class token</button><span>click a patch to make it the query</span></div>
<canvas id="canvas"></canvas>
<div id="info"></div>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""


def attention_html(image_uint8: np.ndarray, patterns_one_image: Tensor, cfg, path: str | Path, *, title: str = "",
                   layers: Sequence[int] | None = None) -> Path:
    """A self-contained interactive page (opens from file://, no network): the image with the chosen
    query's attention overlaid on a canvas, a layer and head selector (or the mean over heads), a
    click on a patch or the class-token button to choose the query. The URL hash sets and records the
    view: #layer=<block>&head=<h or mean>&query=<cls or patch>. Patterns are embedded rounded to 4
    decimals (L·H·T² numbers: fine for small models, megabytes for ViT-B)."""
    cfg = _cfg(cfg)
    image = _check_image(image_uint8, cfg)
    p = _check_patterns(patterns_one_image, cfg, one_image=True)
    labels = _row_labels(layers, p.shape[0])
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    prefix = (["cls"] if cfg.class_token else []) + [f"reg{i}" for i in range(cfg.n_registers)]
    data = {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "layers": labels, "heads": cfg.n_heads, "grid": cfg.grid_size, "patch": cfg.patch_size,
            "size": cfg.image_size, "prefix": prefix, "cls": cfg.class_token,
            "att": np.round(p.numpy().astype(np.float64), 4).tolist()}
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    parts = {"title": html.escape(title or "attention"), "guard": ERROR_GUARD, "script": _SCRIPT, "data": blob}
    text = re.sub(r"\{(title|guard|script|data)\}", lambda m: parts[m.group(1)], _PAGE)  # one pass: no re-expansion
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
