"""The HTML feature browser at 16k latents: build time and the first render in headless Chromium.

No 16k-latent dictionary is mined in this repo's suites, so this fabricates what the features
stage writes for one, in a temporary data root: a dataset of 224x224 RGB images (smooth synthetic
pictures, so PNG sizes are realistic), the `feature_stats` and `top_images` tables and
`heatmaps.npy` of a ViT-B/16 store (1 class token + 14x14 patches) with `--width` latents, ~10%
of them dead, up to 16 top images each from `--images` held-out images. The activation store itself
is not fabricated: the browser reads only its token layout, which is stubbed here.

Times `build_browser` cold (every image PNG written) and warm (PNGs already there, as when a second
dictionary of the same dataset is built), and Chromium's wall time to load the page and dump its DOM:
a blank page (Chromium's own start), the page as opened, sorted by density, and with a card open.
Writes benchmarks/results/browser.json.

    python benchmarks/bench_browser.py [--width 16384] [--images 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, write  # noqa: E402
from analysis.activations.tokens import TokenGroups  # noqa: E402
from analysis.catalog import write_table_partition  # noqa: E402
from analysis.data.images import write_image_dataset  # noqa: E402
from analysis.evaluation.metrics import log10_density_histogram  # noqa: E402
from analysis.paths import DataRoot  # noqa: E402
from analysis.stages import notebook  # noqa: E402
from analysis.stages.browser import build_browser  # noqa: E402

DICT_ID, DATASET_ID, STORE_ID, HOOK = "sae-bench16k", "bench-images", "bench-store", "blocks.6.hook_resid_post"
GROUPS = TokenGroups(cls=(0, 1), registers=(0, 0), patches=(1, 197), patch_grid=(14, 14))
N_TOP, N_TOKENS = 16, 2048 * 197


class _StubStore:
    """Stands in for ActivationStore.open: the browser reads only the store's token layout."""

    token_groups = GROUPS

    @classmethod
    def open(cls, _path):
        return cls()


def fabricate(root: DataRoot, width: int, n_images: int, rng: np.random.Generator) -> None:
    _dataset(root, n_images, rng)
    fire = rng.integers(1, N_TOKENS // 20, width) * (rng.random(width) > 0.1)  # ~10% dead
    n_top = np.where(fire > 0, np.minimum(N_TOP, fire), 0)
    feature = np.repeat(np.arange(width, dtype=np.int32), n_top)
    rank = np.concatenate([np.arange(n, dtype=np.int16) for n in n_top])
    peak = (rng.gamma(2.0, 1.0, width) * (fire > 0)).astype(np.float32)  # a dead latent's max is 0
    activation = peak[feature] / (1 + rank.astype(np.float32) / 4)
    top = pa.table({"feature": feature, "rank": rank, "image_idx": rng.integers(0, n_images, len(feature)),
                    "activation": activation, "token": rng.integers(0, 197, len(feature)).astype(np.int32)})
    stats = pa.table({"feature": np.arange(width, dtype=np.int32), "fire_count": fire.astype(np.int64),
                      "frequency": fire / N_TOKENS,
                      "mean_activation": pa.array(peak / 3, mask=fire == 0), "max_activation": peak})
    heat = np.zeros((width, N_TOP, 197), np.float16)
    heat[feature, rank] = (rng.random((len(feature), 197)) ** 8 * activation[:, None]).astype(np.float16)
    directory = root.dictionary(DICT_ID)
    directory.mkdir(parents=True)
    np.save(directory / "heatmaps.npy", heat)
    lineage = {"kind": "sae", "hook": HOOK, "architecture": "topk", "expansion": 21, "k": 32, "seed": 0,
               "sparsity_coef": None, "store_id": STORE_ID, "store_lineage": {"dataset_id": DATASET_ID}}
    (directory / "config.json").write_text(json.dumps({"width": width, "lineage": lineage}))
    (directory / "features.json").write_text(json.dumps({"n_features": width, "n_alive": int((fire > 0).sum())}))
    write_table_partition(root.table("top_images"), {"dict_id": DICT_ID}, top)
    write_table_partition(root.table("feature_stats"), {"dict_id": DICT_ID}, stats)
    write_table_partition(root.table("density_histogram"), {"dict_id": DICT_ID},
                          pa.Table.from_pylist(log10_density_histogram(fire, N_TOKENS)))


def _dataset(root: DataRoot, n: int, rng: np.random.Generator) -> None:
    """Smooth pictures (a colour gradient and a disc), so their PNGs are the size of real photos'."""
    rows, cols = np.mgrid[0:224, 0:224].astype(np.float32)
    y, x = rows[..., None] / 224, cols[..., None] / 224
    images = np.empty((n, 224, 224, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.random((3, 3)) * 255
        cy, cx, r = rng.random(3) * [224, 224, 60] + [0, 0, 20]
        img = a * x + b * y + c * (1 - x) / 2
        img[(rows - cy) ** 2 + (cols - cx) ** 2 < r * r] = rng.random(3) * 255
        images[i] = np.clip(img, 0, 255)
    labels = {"label": rng.integers(0, 10, n)}
    write_image_dataset(root.images(DATASET_ID), images, labels, attrs={"class_names": [f"class{i}" for i in range(10)]})


def chromium_dump(url: str) -> tuple[float, str]:
    """(seconds, DOM after the page's script ran) of one headless Chromium load."""
    start = time.perf_counter()
    proc = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=5000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120, check=True)
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "browser.json"))
    args = parser.parse_args()
    notebook.ActivationStore = _StubStore  # see the module docstring
    tmp = Path(tempfile.mkdtemp(prefix="bench_browser_"))
    try:
        root = DataRoot(tmp)
        start = time.perf_counter()
        fabricate(root, args.width, args.images, np.random.default_rng(0))
        fabricate_s = time.perf_counter() - start
        builds = []
        for _ in range(args.repeats):
            shutil.rmtree(root.reports, ignore_errors=True)  # cold: every image written again
            start = time.perf_counter()
            page = build_browser(root, DICT_ID)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            build_browser(root, DICT_ID)
            builds.append({"cold_s": cold, "warm_s": time.perf_counter() - start})
        blank = tmp / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body>blank</body></html>")
        alive = next(r["feature"] for r in pq.read_table(root.table("feature_stats")).to_pylist() if r["fire_count"])
        views = {"blank page (chromium start)": blank.as_uri(), "page as opened": page.as_uri(),
                 "sorted by density": page.as_uri() + "#sort=density_desc",
                 "with a card open": page.as_uri() + f"#feature={alive}"}
        renders = {name: [] for name in views}
        for _ in range(args.repeats):  # interleaved, so drift hits every view alike
            for name, url in views.items():
                seconds, dom = chromium_dump(url)
                if name != "blank page (chromium start)":
                    assert 'data-rows="100"' in dom and '<pre id="errors"></pre>' in dom, dom[-2000:]
                if name == "with a card open":
                    assert len(re.findall('data-loaded="1"', dom)) == N_TOP, "the card's images did not load"
                renders[name].append(seconds)
        sizes = {"index.html_MB": page.stat().st_size / 1e6,
                 "cards_MB": sum(p.stat().st_size for p in (page.parent / "cards").iterdir()) / 1e6,
                 "card_files": len(list((page.parent / "cards").iterdir())),
                 "image_files": len(list((root.reports / "browser" / "images" / DATASET_ID).iterdir())),
                 "images_MB": sum(p.stat().st_size for p in (root.reports / "browser" / "images").rglob("*.png")) / 1e6}
        result = {
            "width": args.width, "n_images": args.images, "n_top": N_TOP, "patch_grid": list(GROUPS.patch_grid),
            "fabricate_s": round(fabricate_s, 2),
            "build_cold_s_median": round(statistics.median(b["cold_s"] for b in builds), 2),
            "build_warm_s_median": round(statistics.median(b["warm_s"] for b in builds), 2),
            "chromium_dump_s_median": {k: round(statistics.median(v), 3) for k, v in renders.items()},
            "sizes": {k: round(v, 2) for k, v in sizes.items()},
            "machine": machine(chromium=subprocess.run(["chromium", "--version"], capture_output=True,
                                                       text=True).stdout.strip()),
            "runs": {"builds": builds, "renders": renders},
        }
        write(args.out, result, runs_key="runs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
