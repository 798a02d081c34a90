"""Mining an arrival into a dictionary's tables (its saved states) against mining everything again.

A suite of generated shapes with a watched folder: the mouse, its residual-stream store and one
TopK SAE (width 256, k 8, the default suite's settings at a shorter run) are built once under
--root. Per repeat, `--arrival-images` new shapes are dropped into the folder as PNGs and:

- `arrival`: `ensure_arrival` registers, ingests and extracts them (every hook of the suite);
- `incremental`: `ensure_features` then mines only that arrival and merges it with the saved
  states of the held-out images and of earlier arrivals;
- `from_scratch`: the same features stage with the saved states deleted, mining the held-out
  images and every arrival again (what a suite without saved states pays for each arrival).

The tables both write are checked equal. The result holds the medians and the median of the
per-repeat ratios incremental / from_scratch; the held-out images mined grow with --eval-images,
the arrival with --arrival-images.

    .venv/bin/python benchmarks/bench_arrivals.py [--eval-images 2048] [--arrival-images 256] [--repeats 3]

Writes benchmarks/results/arrivals.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import machine, median_ratio, write  # noqa: E402

from analysis.data.shapes import ShapesConfig, generate_shapes  # noqa: E402
from analysis.paths import DataRoot  # noqa: E402
from analysis.stages.activations import materialize_store  # noqa: E402
from analysis.stages.arrivals import STATES_DIR, ensure_arrival, register_arrivals  # noqa: E402
from analysis.stages.dictionaries import FEATURES_FILE, dictionary_id, ensure_dictionary  # noqa: E402
from analysis.stages.features import FEATURE_TABLES, ensure_features  # noqa: E402
from analysis.stages.suite import parse_suite  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def suite(inbox: Path, eval_images: int):
    n_images = 10 * eval_images  # the generator holds out a tenth
    return parse_suite({
        "name": "bench_arrivals", "dataset": {"params": {"n_images": n_images, "seed": 0}},
        "model": {"train": {"epochs": 1}},
        "activations": {"hooks": [HOOK], "images_per_shard": 4096, "images_per_chunk": 256},
        "dictionaries": {"hooks": [HOOK], "architectures": ["topk"], "expansions": [4], "ks": [8], "seeds": [0],
                         "train": {"batch_size": 4096, "n_train_tokens": 409600, "lr": 0.0032,
                                   "encoder_init": "transpose"}},
        "transcoders": {"pairs": []}, "crosscoders": {"hook_groups": []},
        "evaluation": {"max_images": eval_images, "n_top": 16},
        "arrivals": {"path": str(inbox)},
    })


def drop(inbox: Path, spec, seed: int, n: int) -> None:
    data = generate_shapes(ShapesConfig(n_images=n, seed=seed))
    names = spec.class_names()
    for i, (pixels, label) in enumerate(zip(data.images, data.labels["label"])):
        path = inbox / names[label] / f"r{seed}_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0]).save(path)


def tables(root: DataRoot, dict_id: str) -> dict:
    out = {name: pq.read_table(root.table(name) / f"dict_id={dict_id}") for name in FEATURE_TABLES
           if (root.table(name) / f"dict_id={dict_id}").exists()}
    out["heatmaps"] = np.load(root.dictionary(dict_id) / "heatmaps.npy")
    return out


def same(a: dict, b: dict) -> bool:
    """Equal tables and heatmaps; the mean activation aside (its sums are grouped otherwise)."""
    def table(t):
        return t.drop_columns(["mean_activation"]) if "mean_activation" in t.column_names else t

    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) if k == "heatmaps" else table(a[k]).equals(table(b[k])) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-images", type=int, default=2048)
    ap.add_argument("--arrival-images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", help="data root (default: a new temporary directory; the store is reused there)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arrivals.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = Path(args.root or tempfile.mkdtemp(prefix="spectra-arrivals-"))
    inbox = base / "inbox"
    shutil.rmtree(inbox, ignore_errors=True)  # arrivals of an earlier run of this script start over
    shutil.rmtree(base / "data" / "arrivals", ignore_errors=True)
    inbox.mkdir(parents=True)
    spec = suite(inbox, args.eval_images)
    root = DataRoot(base / "data")
    materialize_store(spec, root)
    member = spec.members()[0]
    ensure_dictionary(spec, root, member, progress=False)
    dict_id = dictionary_id(spec, member)
    directory = root.dictionary(dict_id)
    shutil.rmtree(directory / STATES_DIR, ignore_errors=True)
    (directory / FEATURES_FILE).unlink(missing_ok=True)
    ensure_features(spec, root, member)  # the held-out images' state, saved
    runs = []
    for repeat in range(args.repeats):
        drop(inbox, spec, seed=100 + repeat, n=args.arrival_images)
        start = time.perf_counter()
        key = register_arrivals(spec, root).key
        ensure_arrival(spec, root, key, progress=False)
        arrival = time.perf_counter() - start
        start = time.perf_counter()
        ensure_features(spec, root, member)
        incremental = time.perf_counter() - start
        merged = tables(root, dict_id)
        shutil.rmtree(directory / STATES_DIR)
        (directory / FEATURES_FILE).unlink()
        start = time.perf_counter()
        ensure_features(spec, root, member)
        from_scratch = time.perf_counter() - start
        if not same(merged, tables(root, dict_id)):
            raise AssertionError("the merged tables differ from those mined from scratch")
        runs.append({"arrivals": repeat + 1, "arrival_s": arrival, "incremental_s": incremental,
                     "from_scratch_s": from_scratch})
        print(runs[-1])
    result = {
        "machine": machine(), "eval_images": args.eval_images, "arrival_images": args.arrival_images,
        "tokens_per_image": 17, "sae": "topk width 256 k 8",
        "median_arrival_s": statistics.median(r["arrival_s"] for r in runs),
        "median_incremental_s": statistics.median(r["incremental_s"] for r in runs),
        "median_from_scratch_s": statistics.median(r["from_scratch_s"] for r in runs),
        "incremental_over_from_scratch": median_ratio([r["incremental_s"] for r in runs],
                                                      [r["from_scratch_s"] for r in runs]),
        "runs": runs,
    }
    write(args.out, result, runs_key="runs")


if __name__ == "__main__":
    main()
