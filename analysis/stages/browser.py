"""A static, self-contained HTML feature browser per dictionary, and an index page linking them.

    from analysis.stages.browser import build_browser, build_browser_index
    page = build_browser("data", "sae-3827d300af36")      # data/reports/browser/sae-3827d300af36/index.html
    build_browser_index("data", ["sae-3827d300af36"])      # data/reports/browser/index.html

Layout under `<root>/reports/browser/` (the folder as a whole is self-contained: copy it anywhere
and open it from file://, with no server and no network; style and script are inline):

    index.html                            every dictionary given, linked, with its key metrics
    <dict_id>/index.html                  the feature table (one JSON blob; the script renders 100 rows
                                          at a time, sortable and filterable) and the card of one feature
    <dict_id>/cards/<chunk>.js            the top images of 256 features (dataset index, activation, token,
                                          label, patch heatmap quantised to 8 bits), loaded when a card opens
    images/<dataset_id>/<image_idx>.png   each top image once (at most TILE px a side), shared by every
                                          dictionary mined on that dataset

No card is rendered at build time: the page draws the card being shown, each top image's PNG under
a canvas holding its patch heatmap (red, one opacity scale per feature, the rule of
`FeatureCard.render`). Only features that fired have card data; dead ones are listed and marked.
Everything is read from what the features stage mined (`_MinedDictionary`), plus the dictionary's
`evaluations` row and `density_histogram` where the evaluation stage has written them.

Measured at 16,384 latents x 16 top images on a 14x14 patch grid (benchmarks/bench_browser.py,
2 cores): 1.0 s a build, plus 8 s the first time 2,048 top images are written as PNGs; the page
is 0.8 MB and its cards 68 MB in 64 files (one 1 MB file loads when a card opens).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from analysis.dictionaries import CONFIG_FILE
from analysis.integrity import atomic_write, file_lock, read_done, write_done
from analysis.evaluation.mining_counts import HISTOGRAM_LOG2
from analysis.paths import DataRoot
from analysis.stages.browser_page import page_template, render_index, render_page
from analysis.stages.dictionaries import EVALUATION_FILE, FEATURES_FILE
from analysis.stages.notebook import HEAT_ALPHA, TILE, _MinedDictionary, _dictionary_dir, _fmt, _root
from analysis.stages.report import member_dict_ids
from analysis.stages.suite import SuiteSpec

CHUNK = 256
"""Features per card-data file: a card opens after loading one file of this many features."""
PAGE_ROWS = 100
"""Rows of the feature table rendered at once (the rest are a page away), so a 16k-latent table
renders as fast as a small one."""
IMAGE_BATCH = 256  # images read from the dataset's Zarr array at once while writing PNGs
PAGE_MARKER = "browser.done.json"
"""In a page's folder: what the page was built from (`page_inputs`) and the files it vouches for
(the page, its card data, its images), so `build_suite_browser` rebuilds only what changed."""

# The feature table's columns (feature_stats' own, renamed for the page, and the top-label pair
# computed from the top images' labels), their titles, and the ones with min/max filters.
COLUMNS = {"feature": "feature", "fire_count": "fires", "density": "density", "mean_activation": "mean act",
           "max_activation": "max act", "top_image_label": "top-image label",
           "top_image_label_share": "top-image label share", "label_entropy": "label entropy (bits)",
           "cls_frequency": "class-token density", "high_norm": "high-norm tokens",
           "head_top_class": "head's class", "n_top": "top images"}
FILTERS = ["density", "max_activation", "mean_activation", "top_image_label_share"]
# The evaluations columns shown as a dictionary's key metrics (page header and index), in order.
KEY_METRICS = ["kind", "hook", "architecture", "k", "width", "l0", "fvu", "dead_fraction", "loss_recovered"]


def browser_dir(root: str | Path | DataRoot) -> Path:
    return _root(root).reports / "browser"


def build_browser(root: str | Path | DataRoot, dict_id: str) -> Path:
    """Write the browser page of `dict_id` (layout in the module docstring) and return its
    index.html. Unknown ids raise KeyError naming near matches; a dictionary whose features were
    never mined raises FileNotFoundError naming the `features` partition to materialize."""
    root = _root(root)
    mined = _MinedDictionary(root, dict_id)
    top = {name: mined.top.column(name).to_numpy() for name in ("feature", "rank", "image_idx", "activation", "token")}
    bounds = np.searchsorted(top["feature"], np.arange(len(mined.stats) + 1))  # feature f's top rows: bounds[f:f+2]
    label_codes, label_names = _label_codes(mined)
    final = browser_dir(root) / dict_id
    image_dir = browser_dir(root) / "images" / mined.dataset_id
    with file_lock(root.lock(f"browser.{dict_id}")):  # a second build of the same page waits, then redoes it
        for leftover in final.parent.glob(f".{dict_id}.*"):  # of a build killed mid-way (we hold its lock)
            shutil.rmtree(leftover, ignore_errors=True)
        samples = _samples(root, dict_id, len(mined.stats))
        _write_images(mined, np.unique(np.concatenate([top["image_idx"], samples["image_idx"]])), image_dir)
        work = final.parent / f".{dict_id}.{uuid.uuid4().hex[:12]}.tmp"  # swapped in whole: never half a page
        try:
            _write_cards(mined, top, bounds, label_codes, label_names, work / "cards", samples)
            rows = _feature_rows(mined, bounds, label_codes[top["image_idx"]], label_names)
            data = _page_data(mined, rows, os.path.relpath(image_dir, final), _histogram(root, dict_id))
            (work / "index.html").write_text(render_page(f"{dict_id} · features", _key_metrics(root, dict_id), data))
            _swap_in(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        shown = np.unique(np.concatenate([top["image_idx"], samples["image_idx"]]))
        write_done(final / PAGE_MARKER, {"inputs": page_inputs(root, dict_id)},
                   [final / "index.html", final / "cards", *(image_dir / f"{i}.png" for i in shown)])
    return final / "index.html"


def page_inputs(root: DataRoot, dict_id: str) -> str:
    """A digest of everything a page is built from: the done-markers of the dictionary's features
    and evaluation stages (each records the sha256 of every file it wrote) and the page's own
    template and script, so new mining, a new evaluation or a changed page all rebuild it."""
    h = hashlib.sha256(page_template().encode())
    for name in (FEATURES_FILE, EVALUATION_FILE):
        marker = root.dictionary(dict_id) / name
        h.update(name.encode() + b"\0" + (marker.read_bytes() if marker.exists() else b"absent") + b"\0")
    return h.hexdigest()


def _label_codes(mined: _MinedDictionary) -> tuple[np.ndarray, list[str]]:
    """(every dataset image's label as an int code, code -> shown name): codes follow the labels'
    sorted order (so a tie between labels goes to the lowest), an image without one gets the last;
    names are class names where the dataset has them and its labels index them, else the label."""
    encoded = pa.array(mined.labels).dictionary_encode()
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order) + 1, np.int64)  # dictionary index -> sorted position; the extra slot: no label
    rank[order], rank[-1] = np.arange(len(order)), len(order)
    codes = rank[pc.fill_null(encoded.indices, len(order)).to_numpy(zero_copy_only=False)]
    values = encoded.dictionary.take(pa.array(order)).to_pylist()
    classes = list(mined.images.attrs.get("class_names") or [])
    names = [classes[v] if isinstance(v, int) and 0 <= v < len(classes) else str(v) for v in values]
    return codes, names + ["(no label)"]


def _write_images(mined: _MinedDictionary, image_idx: np.ndarray, directory: Path) -> None:
    """Each image as a PNG, at most TILE px a side (the page shows them at TILE); files already
    there are kept (dataset ids are content ids: the same id holds the same pixels)."""
    todo = np.array([i for i in image_idx.tolist() if not (directory / f"{i}.png").exists()], dtype=np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), IMAGE_BATCH):
        batch = todo[start:start + IMAGE_BATCH]
        for idx, pixels in zip(batch.tolist(), mined.images.get_orthogonal_selection((batch,))):
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            image.thumbnail((TILE, TILE))  # only ever shrinks; the page scales small ones up, pixelated
            tmp = directory / f".{idx}.{uuid.uuid4().hex[:8]}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, directory / f"{idx}.png")  # a reader never sees half a file


SAMPLES_SHOWN = 8
"""Images of a card's row across the activation range: evenly spaced quantiles of the feature's
sample (`feature_samples`), weakest to strongest."""


def _samples(root: DataRoot, dict_id: str, width: int) -> dict:
    """The dictionary's feature_samples as arrays (feature-major, weakest first) and each
    feature's row range `bounds`; empty where mining wrote none (mined before the table existed)."""
    path = root.table("feature_samples") / f"dict_id={dict_id}"
    if path.exists():
        table = pq.read_table(path).sort_by([("feature", "ascending"), ("quantile", "ascending")])
        out = {name: table.column(name).to_numpy() for name in ("feature", "image_idx", "activation", "quantile")}
    else:
        out = {"feature": np.zeros(0, np.int32), "image_idx": np.zeros(0, np.int64),
               "activation": np.zeros(0, np.float32), "quantile": np.zeros(0, np.float32)}
    out["bounds"] = np.searchsorted(out["feature"], np.arange(width + 1))
    return out


def _sample_row(samples: dict, feature: int, label_names: list[str], label_codes: np.ndarray) -> list | None:
    """[image_idx, activation, quantile, label] of up to SAMPLES_SHOWN samples evenly spaced in
    the feature's sample, or None when it has none."""
    a, b = samples["bounds"][feature], samples["bounds"][feature + 1]
    if a == b:
        return None
    pick = np.unique(np.linspace(a, b - 1, min(SAMPLES_SHOWN, b - a)).round().astype(int))
    images = samples["image_idx"][pick]
    return [images.tolist(), [_number(v) for v in samples["activation"][pick]],
            [_number(v) for v in samples["quantile"][pick]], [label_names[c] for c in label_codes[images]]]


def _write_cards(mined: _MinedDictionary, top: dict, bounds: np.ndarray, label_codes: np.ndarray,
                 label_names: list[str], directory: Path, samples: dict) -> None:
    """cards/<chunk>.js for every chunk of CHUNK features holding one that fired.
    Each feature: [image_idx, activation, token, label, heatmap (base64 uint8, rows*cols per image,
    scaled to the feature's largest patch activation) or null, that largest activation, samples
    across its range (`_sample_row`) or null, the head's top classes (head_top3) or null, its
    activation histogram (`_trimmed`) or null]."""
    directory.mkdir(parents=True)
    width = len(bounds) - 1
    for start in range(0, width, CHUNK):
        stop = min(start + CHUNK, width)
        if bounds[stop] == bounds[start]:
            continue  # no feature of this chunk fired
        ids = np.zeros(mined.heatmaps[start:stop].shape[:2], np.int64)  # the image of each heatmap row
        span = slice(bounds[start], bounds[stop])
        ids[top["feature"][span] - start, top["rank"][span]] = top["image_idx"][span]
        grids = mined.patch_heatmaps(mined.heatmaps[start:stop], ids)  # (n, n_top, rows, cols) or None
        entries = {}
        for f in range(start, stop):
            a, b = bounds[f], bounds[f + 1]
            if a == b:
                continue
            heat, scale = _quantised(None if grids is None else grids[f - start][top["rank"][a:b]])
            images = top["image_idx"][a:b]
            entries[str(f)] = [images.tolist(), [_number(v) for v in top["activation"][a:b]],
                               top["token"][a:b].tolist(), [label_names[c] for c in label_codes[images]],
                               heat, _number(scale), _sample_row(samples, f, label_names, label_codes),
                               mined.stats[f].get("head_top3"), _trimmed(mined.stats[f].get("activation_histogram"))]
        text = json.dumps(entries, separators=(",", ":"), allow_nan=False)
        (directory / f"{start // CHUNK:04d}.js").write_text(f"spectraCards({start // CHUNK},{text});\n")


def _trimmed(histogram: list[int] | None) -> list[int] | None:
    """[first non-empty bin, its count, …, the last non-empty bin's count] of a HISTOGRAM_LOG2
    histogram, or None (no histogram mined, or no firing)."""
    if not histogram or not any(histogram):
        return None
    nonzero = [i for i, n in enumerate(histogram) if n]
    return [nonzero[0], *histogram[nonzero[0]:nonzero[-1] + 1]]


def _quantised(grid: np.ndarray | None) -> tuple[str | None, float | None]:
    """A feature's (n, rows, cols) patch heatmaps as base64 bytes on one scale (its largest value)."""
    if grid is None:
        return None, None
    scale = float(grid.max()) if grid.size else 0.0
    levels = np.zeros(grid.shape, np.uint8) if scale <= 0 else np.round(np.clip(grid / scale, 0, 1) * 255)
    return base64.b64encode(levels.astype(np.uint8).tobytes()).decode(), scale


def _number(value) -> float | int | None:
    """4 significant digits (the page shows 3): keeps a 16k-latent blob small; NaN and None as null."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.4g}")


def _feature_rows(mined: _MinedDictionary, bounds: np.ndarray, top_codes: np.ndarray,
                  label_names: list[str]) -> list[list]:
    """One row per latent, in the order of COLUMNS."""
    top_image_label, share = _top_image_labels(bounds, top_codes)
    rows = []
    for f, stats in enumerate(mined.stats):
        n_top = int(bounds[f + 1] - bounds[f])
        rows.append([f, int(stats["fire_count"]), _number(stats["frequency"]), _number(stats["mean_activation"]),
                     _number(stats["max_activation"]), label_names[top_image_label[f]] if n_top else None,
                     _number(share[f]) if n_top else None,
                     # mining's own statistics over every image it fires on (None: mined before them)
                     _number(stats.get("label_entropy")), _number(stats.get("cls_frequency")),
                     stats.get("high_norm"), stats.get("head_top_class"), n_top])
    return rows


def _top_image_labels(bounds: np.ndarray, top_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: the commonest label code among its top images (ties: the lowest code) and the
    fraction of its top images holding it (0 where it has none). `top_codes` follows the top
    rows, which are grouped by latent (`bounds`)."""
    width = len(bounds) - 1
    n_top = np.diff(bounds)
    feature = np.repeat(np.arange(width), n_top)
    n_labels = int(top_codes.max()) + 1 if len(top_codes) else 1
    pairs, counts = np.unique(feature * n_labels + top_codes, return_counts=True)
    pair_feature, pair_label = pairs // n_labels, pairs % n_labels
    order = np.lexsort((pair_label, -counts, pair_feature))  # per latent: largest count, then lowest code
    first = order[np.r_[True, pair_feature[order][1:] != pair_feature[order][:-1]]] if len(order) else order
    label, share = np.zeros(width, np.int64), np.zeros(width)
    label[pair_feature[first]] = pair_label[first]
    share[pair_feature[first]] = counts[first] / n_top[pair_feature[first]]
    return label, share


def _page_data(mined: _MinedDictionary, rows: list[list], image_dir: str, histogram) -> dict:
    """The blob the page's script reads (analysis.stages.browser_page)."""
    groups = mined.groups
    grid = None if groups is None or groups.positions("patches") is None else list(groups.patch_grid)
    other = {} if groups is None else {kind: list(getattr(groups, kind)) for kind in ("cls", "registers")
                                      if groups.positions(kind) is not None}
    return {"columns": list(COLUMNS), "titles": COLUMNS, "filters": FILTERS, "rows": rows, "chunk": CHUNK,
            "page_rows": PAGE_ROWS, "tile": TILE, "image_dir": Path(image_dir).as_posix(), "patch_grid": grid,
            "other_tokens": other, "heat_alpha": HEAT_ALPHA, "histogram": histogram,
            "activation_bins": list(HISTOGRAM_LOG2)}


def partition_rows(root: DataRoot, table: str, dict_id: str) -> list[dict]:
    """The dictionary's rows of a per-dictionary table; [] when its stage has not written them."""
    path = root.table(table) / f"dict_id={dict_id}"
    return pq.read_table(path).to_pylist() if path.exists() else []


def _histogram(root: DataRoot, dict_id: str) -> list | None:
    """[log10_lo (None for the never-fired row), log10_hi, n_latents] per bin, or None."""
    rows = sorted(partition_rows(root, "density_histogram", dict_id), key=lambda r: r["log10_lo"])
    return [[None if math.isinf(r["log10_lo"]) else r["log10_lo"], r["log10_hi"], r["n_latents"]]
            for r in rows] or None


def _key_metrics(root: DataRoot, dict_id: str) -> dict:
    """The dictionary's headline numbers: its evaluations row where there is one (else what its
    config and lineage say), and how many of its latents fired on the mined images (from the
    features stage's marker)."""
    config = json.loads((root.dictionary(dict_id) / CONFIG_FILE).read_text())
    [row] = partition_rows(root, "evaluations", dict_id) or [{}]
    known = {**config.get("lineage", {}), "width": config.get("width"), **row}
    metrics = {k: _fmt(known[k]) if known.get(k) is not None else "–" for k in KEY_METRICS}
    features = json.loads((root.dictionary(dict_id) / FEATURES_FILE).read_text())
    metrics["alive"] = f"{features['n_alive']} of {features['n_features']}"
    return metrics


def _swap_in(work: Path, final: Path) -> None:
    """Replace the folder `final` with `work`: the old one is moved aside first, then removed."""
    old = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def build_browser_index(root: str | Path | DataRoot, dict_ids) -> Path:
    """Write `<root>/reports/browser/index.html`, linking the page of each of `dict_ids` (built by
    `build_browser` first) with its key metrics; returns its path."""
    root = _root(root)
    base = browser_dir(root)
    for dict_id in dict_ids:
        _dictionary_dir(root, dict_id)  # KeyError with near matches for an unknown id
    missing = [d for d in dict_ids if not (base / d / "index.html").exists()]
    if missing:
        raise FileNotFoundError(f"no browser page for {missing} under {base}: build_browser(root, dict_id) "
                                "writes one (the feature_browser asset does it for every mined suite member)")
    rows = [{"dict_id": d, "href": f"{d}/index.html", **_key_metrics(root, d)} for d in dict_ids]
    page = render_index(["dict_id", *KEY_METRICS, "alive"], rows)
    return atomic_write(base / "index.html", lambda tmp: tmp.write_text(page))


def build_suite_browser(spec: SuiteSpec, root: DataRoot) -> dict:
    """The page of every suite member whose features are mined, and the index linking them; the
    members without (`unmined`) are named, not fatal: the browser shows what there is so far."""
    ids = member_dict_ids(spec)
    mined = {key: d for key, d in ids.items() if (root.dictionary(d) / FEATURES_FILE).exists()}
    reused = []
    for dict_id in mined.values():
        # a page built from the same inputs whose files are intact is current; damage is logged and rebuilt
        done = read_done(browser_dir(root) / dict_id / PAGE_MARKER)
        if done is not None and done.get("inputs") == page_inputs(root, dict_id):
            reused.append(dict_id)
            continue
        build_browser(root, dict_id)
    index = build_browser_index(root, list(mined.values()))
    return {"path": index, "url": index.as_uri(), "n_dictionaries": len(mined), "dict_ids": list(mined.values()),
            "unmined": [key for key in ids if key not in mined], "reused": reused}
