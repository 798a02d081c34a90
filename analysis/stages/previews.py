"""Small pictures and links for the Dagster UI, from what the stages wrote: a dictionary's training
curve, a preview grid of a few of its features, and where its browser page is.

They are written under `<root>/reports/` (never into an artifact's own folder, whose files its
done-marker vouches for) and are cheap to redo, so each call rewrites them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from analysis.evaluation.plots import plot_training_curve
from analysis.paths import DataRoot
from analysis.stages.browser import browser_dir, partition_rows
from analysis.stages.notebook import top_images_grid

PREVIEW_FEATURES = 4
PREVIEW_TILE = 48
"""Side in pixels of one image in the features preview: 4 rows of 16 stay under ~100 kB, since the
UI keeps the picture inside the run's event log."""


def train_log(root: DataRoot, dict_id: str) -> list[dict]:
    """The dictionary's train_log rows by step ([] before it is trained)."""
    return sorted(partition_rows(root, "train_log", dict_id), key=lambda r: r["step"])


def training_curve(root: DataRoot, dict_id: str, rows: list[dict]) -> Path | None:
    """reports/training/<dict_id>.png from its train_log `rows` (None when there are none)."""
    if not rows:
        return None
    return plot_training_curve(rows, root.reports / "training" / f"{dict_id}.png", title=dict_id)


def preview_features(root: DataRoot, dict_id: str, n: int = PREVIEW_FEATURES) -> list[int]:
    """The `n` features the preview shows: of those with a full list of top images, the most
    label-selective (lowest label entropy over the images they fire on), then the most frequent."""
    stats = pq.read_table(root.table("feature_stats") / f"dict_id={dict_id}").to_pylist()
    tops = Counter(pq.read_table(root.table("top_images") / f"dict_id={dict_id}",
                                 columns=["feature"]).column("feature").to_pylist())
    full = max(tops.values(), default=0)
    shown = [r for r in stats if full and tops.get(r["feature"]) == full]

    def key(r):
        entropy = r.get("label_entropy")  # None: mined before label statistics, or no labels
        return (entropy is None, entropy or 0.0, -r["fire_count"], r["feature"])

    return [r["feature"] for r in sorted(shown, key=key)[:n]]


def features_preview(root: DataRoot, dict_id: str) -> Path | None:
    """reports/features/<dict_id>.png: the top images of a few features (`preview_features`),
    under their heatmaps; None when no feature fired."""
    features = preview_features(root, dict_id)
    if not features:
        return None
    path = root.reports / "features" / f"{dict_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    top_images_grid(root, dict_id, features, path=path, tile=PREVIEW_TILE)
    return path


def browser_page(root: DataRoot, dict_id: str) -> Path:
    """Where the feature_browser asset writes the dictionary's page (it may not exist yet)."""
    return browser_dir(root) / dict_id / "index.html"
