"""Notebook helpers: a root's catalog, a dictionary by id, and one feature as a card.

    from analysis.stages.notebook import open_catalog, load_dictionary, feature_card, top_images_grid
    con = open_catalog("data")                      # read-only DuckDB, every catalog table
    sae = load_dictionary("data", "sae-3827d300af36")
    feature_card("data", "sae-3827d300af36", 53)    # renders in Jupyter; .save_png(path)

Everything is read from the artifacts a run wrote (the `top_images` and `feature_stats` tables,
the dictionary's `heatmaps.npy`, the dataset's images and labels, the store's token layout);
nothing is recomputed and no Dagster is needed.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from analysis.activations.reader import ActivationStore
from analysis.catalog import connect_catalog
from analysis.data.images import open_images, read_labels
from analysis.dictionaries import CONFIG_FILE, load_dictionary as load_dictionary_dir
from analysis.paths import DataRoot
from analysis.stages.dictionaries import FEATURES_FILE, HEATMAPS_FILE

TILE = 128
"""Side in pixels of one image in a rendered card (small images are scaled up, nearest-neighbour)."""


def _root(root: str | Path | DataRoot) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(Path(root))


def open_catalog(root: str | Path | DataRoot) -> duckdb.DuckDBPyConnection:
    """The root's catalog, read-only: every table of README's "Query the catalog"."""
    path = _root(root).catalog
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: run `make run` with SPECTRA_ROOT={_root(root).root} "
                                "(or materialize the catalog asset) first")
    return connect_catalog(path, read_only=True)


def dictionary_ids(root: str | Path | DataRoot) -> list[str]:
    """Ids of the dictionaries saved under the root (directories holding a checkpoint)."""
    base = _root(root).root / "dictionaries"
    return sorted(p.name for p in base.glob("*") if (p / CONFIG_FILE).exists()) if base.exists() else []


def _dictionary_dir(root: DataRoot, dict_id: str) -> Path:
    directory = root.dictionary(dict_id)
    if (directory / CONFIG_FILE).exists():
        return directory
    known = dictionary_ids(root)
    near = difflib.get_close_matches(dict_id, known, n=5, cutoff=0.5)
    hint = f"did you mean {near}?" if near else f"the root holds {len(known)}: {known[:8]}{' …' if len(known) > 8 else ''}"
    raise KeyError(f"no dictionary {dict_id!r} under {root.root}: {hint} "
                   "(SELECT dict_id FROM dictionaries lists them with their lineage)")


def load_dictionary(root: str | Path | DataRoot, dict_id: str, device: str = "cpu"):
    """The dictionary `dict_id` of the root (SAE, transcoder or crosscoder), taking raw activations."""
    return load_dictionary_dir(_dictionary_dir(_root(root), dict_id), device=device)


@dataclass
class FeatureCard:
    """One latent: its statistics and its top held-out images with per-patch activations."""

    dict_id: str
    feature: int
    stats: dict
    """The latent's `feature_stats` row (fire_count, frequency, mean_activation, max_activation)."""
    image_idx: np.ndarray
    """(n,) dataset indices of the top images, strongest first."""
    activations: np.ndarray
    """(n,) the latent's largest activation in each image."""
    tokens: np.ndarray
    """(n,) store position of the token that activation sits on."""
    images: np.ndarray
    """(n, H, W, C) uint8 images."""
    labels: list
    """(n,) each image's dataset label."""
    heatmaps: np.ndarray | None
    """(n, rows, cols) the latent's activation on each patch; None when the store keeps no patches."""

    def render(self, tile: int = TILE) -> Image.Image:
        """The top images side by side, each under its patch heatmap (red; one scale for the whole
        card, the largest patch activation of any of them), captioned with activation and label."""
        n = len(self.image_idx)
        caption = 14
        canvas = Image.new("RGB", (max(n, 1) * tile, tile + caption), "white")
        draw = ImageDraw.Draw(canvas)
        scale = float(self.heatmaps.max()) if self.heatmaps is not None and self.heatmaps.size else 0.0
        for i in range(n):
            img = self.images[i]
            rgb = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB").resize(
                (tile, tile), Image.NEAREST)
            if scale > 0:
                heat = np.clip(self.heatmaps[i] / scale, 0, 1).astype(np.float32)
                alpha = Image.fromarray((heat * 160).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
                rgb = Image.composite(Image.new("RGB", rgb.size, (255, 0, 0)), rgb, alpha)
            canvas.paste(rgb, (i * tile, 0))
            draw.text((i * tile + 2, tile + 1), f"{self.activations[i]:.2f} {self.labels[i]}", fill="black")
        return canvas

    def save_png(self, path: str | Path) -> Path:
        path = Path(path)
        self.render().save(path, format="PNG")
        return path

    def _repr_html_(self) -> str:
        buf = io.BytesIO()
        self.render().save(buf, format="PNG")
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in self.stats.items())
        return (f"<div><b>{html.escape(self.dict_id)} · feature {self.feature}</b>"
                f"<table>{rows}</table>"
                f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/></div>")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def feature_card(root: str | Path | DataRoot, dict_id: str, feature: int) -> FeatureCard:
    """The card of latent `feature` of `dict_id`, from what its features stage mined."""
    root = _root(root)
    directory = _dictionary_dir(root, dict_id)
    if not (directory / FEATURES_FILE).exists():
        raise FileNotFoundError(f"{dict_id} has no mined features ({directory / FEATURES_FILE} is missing): "
                                f"materialize its features partition (make run does) first")
    stats = pq.read_table(root.table("feature_stats") / f"dict_id={dict_id}").to_pylist()
    width = len(stats)
    if not (isinstance(feature, (int, np.integer)) and 0 <= feature < width):
        alive = [r["feature"] for r in stats if r["fire_count"] > 0]
        near = sorted(alive, key=lambda f: abs(f - feature) if isinstance(feature, (int, np.integer)) else f)[:5]
        raise IndexError(f"feature={feature!r} is not a latent of {dict_id} (width {width}: 0..{width - 1}); "
                         f"latents that fire, nearest first: {near}")
    row = next(r for r in stats if r["feature"] == feature)
    top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}", filters=[("feature", "=", int(feature))])
    top = {name: column.to_numpy() for name, column in zip(top.column_names, top.sort_by("rank").columns)}
    ranks = top["rank"]
    image_idx = top["image_idx"]
    lineage = json.loads((directory / CONFIG_FILE).read_text()).get("lineage", {})
    store = lineage["store_lineage"]
    images = open_images(root.images(store["dataset_id"]))
    pixels = images.get_orthogonal_selection((image_idx,)) if len(image_idx) else np.zeros((0, *images.shape[1:]),
                                                                                           np.uint8)
    labels = read_labels(root.images(store["dataset_id"])).column("label").to_numpy()
    hook = lineage.get("hook") or lineage["hooks"][0]  # a crosscoder's heatmaps follow its first layer's tokens
    groups = ActivationStore.open(root.hook_store(lineage["store_id"], hook)).token_groups
    heatmaps = None
    patches = None if groups is None else groups.positions("patches")
    if patches is not None and len(image_idx):
        per_token = np.load(directory / HEATMAPS_FILE, mmap_mode="r")[feature][ranks].astype(np.float32)
        if per_token.shape[-1] == groups.n_tokens:
            heatmaps = per_token[:, patches].reshape(len(ranks), *groups.patch_grid)
    return FeatureCard(dict_id=dict_id, feature=int(feature),
                       stats={k: v for k, v in row.items() if k not in ("feature", "dict_id")},
                       image_idx=image_idx, activations=top["activation"],
                       tokens=top["token"], images=np.asarray(pixels),
                       labels=[labels[i].item() if hasattr(labels[i], "item") else labels[i] for i in image_idx],
                       heatmaps=heatmaps)


def top_images_grid(root: str | Path | DataRoot, dict_id: str, features, path: str | Path | None = None,
                    tile: int = TILE) -> Image.Image:
    """Several features' cards stacked, one row each (saved as PNG when `path` is given)."""
    rows = [feature_card(root, dict_id, f).render(tile) for f in features]
    if not rows:
        raise ValueError("features is empty: pass the latent indices to show, e.g. [0, 1, 2]")
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    if path is not None:
        grid.save(Path(path), format="PNG")
    return grid
