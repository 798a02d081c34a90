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
import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from analysis.activations.reader import ActivationStore
from analysis.activations.tokens import TokenSelection, select_tokens
from analysis.catalog import connect_catalog
from analysis.dictionaries import CONFIG_FILE, load_dictionary as load_dictionary_dir
from analysis.models.config import ViTConfig
from analysis.models.vit import CONFIG_FILE as MODEL_CONFIG_FILE
from analysis.paths import DataRoot
from analysis.stages.arrivals import suite_images
from analysis.stages.dictionaries import FEATURES_FILE, HEATMAPS_FILE, dictionary_lineage
from analysis.stages.members import member_from_lineage

TILE = 128
"""Side in pixels of one image in a rendered card (small images are scaled up, nearest-neighbour)."""
HEAT_ALPHA = 160
"""Opacity (of 255) of the red heatmap overlay on a patch at the card's largest activation; the
HTML feature browser (analysis.stages.browser) draws its overlays with the same rule."""


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
                alpha = Image.fromarray((heat * HEAT_ALPHA).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
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


class _MinedDictionary:
    """What a dictionary's features stage wrote, read once for any number of cards: its feature
    statistics and top images, the dataset's images and labels, and the store's token layout."""

    def __init__(self, root: DataRoot, dict_id: str):
        self.dict_id, self.directory = dict_id, _dictionary_dir(root, dict_id)
        lineage = dictionary_lineage(root, dict_id)
        if not (self.directory / FEATURES_FILE).exists():
            raise _no_features(root, dict_id, lineage)
        self.stats = pq.read_table(root.table("feature_stats") / f"dict_id={dict_id}").sort_by("feature").to_pylist()
        self.top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}").sort_by([("feature", "ascending"),
                                                                                          ("rank", "ascending")])
        self.dataset_id = lineage["store_lineage"]["dataset_id"]
        # by global image id: the dataset's images, then those of the arrivals mined with them
        arrivals = json.loads((self.directory / FEATURES_FILE).read_text()).get("arrivals", [])
        self.images, self.labels = suite_images(root, self.dataset_id, arrivals)
        hook = lineage.get("hook") or lineage["hooks"][0]  # a crosscoder's heatmaps follow its first layer's tokens
        store = ActivationStore.open(root.hook_store(lineage["store_id"], hook))
        self.groups = store.token_groups
        self.sampled = _patch_sample(root, store.lineage)
        self.heatmaps = np.load(self.directory / HEATMAPS_FILE, mmap_mode="r")  # (width, n_top, T)
        if self.groups is not None and self.heatmaps.shape[-1] != self.groups.n_tokens:
            raise ValueError(f"{self.directory / HEATMAPS_FILE} holds {self.heatmaps.shape[-1]} tokens per image but "
                             f"the store holds {self.groups.n_tokens}: materialize the features partition of "
                             f"{dict_id} again, which rewrites it from the store")

    def card(self, feature: int) -> FeatureCard:
        width = len(self.stats)
        if not (isinstance(feature, (int, np.integer)) and 0 <= feature < width):
            target = feature if isinstance(feature, (int, np.integer)) else 0
            alive = sorted((r["feature"] for r in self.stats if r["fire_count"] > 0), key=lambda f: abs(f - target))
            raise IndexError(f"feature={feature!r} is not a latent of {self.dict_id} (width {width}: "
                             f"0..{width - 1}); latents that fire, nearest first: {alive[:5]}")
        mask = pc.equal(self.top.column("feature"), int(feature))
        top = {name: column.to_numpy() for name, column in zip(self.top.column_names, self.top.filter(mask).columns)}
        image_idx, ranks = top["image_idx"], top["rank"]
        pixels = (self.images.get_orthogonal_selection((image_idx,)) if len(image_idx)
                  else np.zeros((0, *self.images.shape[1:]), np.uint8))
        heatmaps = self.patch_heatmaps(self.heatmaps[feature][ranks], image_idx) if len(image_idx) else None
        return FeatureCard(dict_id=self.dict_id, feature=int(feature),
                           stats={k: v for k, v in self.stats[feature].items() if k not in ("feature", "dict_id")},
                           image_idx=image_idx, activations=top["activation"], tokens=top["token"],
                           images=np.asarray(pixels), labels=self.labels[image_idx].tolist(), heatmaps=heatmaps)

    def patch_heatmaps(self, per_token: np.ndarray, image_idx: np.ndarray) -> np.ndarray | None:
        """(..., T) per-token activations (rows of `heatmaps.npy`) of images `image_idx` (...) as
        (..., rows, cols) float32 over the patch grid; None when the store keeps no patch tokens.
        A store keeping a per-image sample of patches places each image's at its own positions
        (the other cells stay 0: not stored, not zero activation)."""
        patches = None if self.groups is None else self.groups.positions("patches")
        if patches is None:
            return None
        heat = np.asarray(per_token[..., patches], dtype=np.float32)
        grid = self.groups.patch_grid
        if self.sampled is None:
            return heat.reshape(*heat.shape[:-1], *grid)
        flat = heat.reshape(-1, heat.shape[-1])
        cells = self.sampled.positions_for(np.asarray(image_idx).reshape(-1))[:, patches].numpy()
        cells = cells - self.sampled.patch_start
        placed = np.zeros((len(flat), math.prod(grid)), np.float32)
        np.put_along_axis(placed, cells, flat, axis=1)
        return placed.reshape(*heat.shape[:-1], *grid)


def _patch_sample(root: DataRoot, store_lineage: dict) -> TokenSelection | None:
    """The token selection of a store that keeps a per-image sample of patches (which patches each
    image's stored tokens are), rebuilt from its lineage and its model's config; None otherwise."""
    sample = store_lineage.get("patches_sample")
    if not sample:
        return None
    config = json.loads((root.model(store_lineage["model_id"]) / MODEL_CONFIG_FILE).read_text())["config"]
    return select_tokens(ViTConfig.from_dict(config), store_lineage["tokens"], sample["n"])


def _no_features(root: DataRoot, dict_id: str, lineage: dict) -> FileNotFoundError:
    """The error for a dictionary whose features were never mined, naming the exact partition."""
    try:
        key = member_from_lineage(lineage).key
    except (KeyError, TypeError):  # a checkpoint saved outside a suite has no member fields
        key = "<member key>"
    marker = root.dictionary(dict_id) / FEATURES_FILE
    return FileNotFoundError(
        f"{dict_id} has no mined features ({marker} is missing): materialize the `features` asset's partition "
        f"{key!r} (`make run` mines every member of the suite), or that partition alone with "
        f"`SPECTRA_SUITE=<suite> SPECTRA_ROOT={root.root} DAGSTER_HOME={root.root / 'dagster_home'} "
        f".venv/bin/dagster asset materialize -m pipelines.definitions --select features --partition {key}`")


def feature_card(root: str | Path | DataRoot, dict_id: str, feature: int) -> FeatureCard:
    """The card of latent `feature` of `dict_id`, from what its features stage mined."""
    return _MinedDictionary(_root(root), dict_id).card(feature)


def top_images_grid(root: str | Path | DataRoot, dict_id: str, features, path: str | Path | None = None,
                    tile: int = TILE) -> Image.Image:
    """Several features' cards stacked, one row each (saved as PNG when `path` is given)."""
    mined = _MinedDictionary(_root(root), dict_id)  # read once for every row
    rows = [mined.card(f).render(tile) for f in features]
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
