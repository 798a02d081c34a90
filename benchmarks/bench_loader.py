"""Shuffled-loader throughput vs a sequential read of the same activation store.

Builds a synthetic float16 store (ViT-S/16-like shape at 128 px: 65 tokens x 384) with the real
extraction path, then times in one run: a sequential chunk-by-chunk read, one shuffled-loader
epoch, and (for contrast) random single-image reads. Writes benchmarks/results/loader.json.

    python benchmarks/bench_loader.py [--images 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from analysis.activations.store import StoreLayout, create_store
from analysis.activations.extract import extract_shard
from analysis.activations.reader import ActivationStore
from analysis.activations.loader import ShuffledLoader

T, D, SIDE = 65, 384, 32  # tokens, width, tiny image side (the capture ignores resolution)


def build_store(root: Path, n_images: int) -> Path:
    images = zarr.create_array(store=str(root / "images.zarr"), shape=(n_images, SIDE, SIDE, 3),
                               chunks=(512, SIDE, SIDE, 3), dtype="uint8")
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    w = torch.randn(3 * 4 * 4, D, generator=torch.Generator().manual_seed(0)) / 8

    def capture(x):  # 4x4 average-pooled pixels as 64 "patches" + a mean token
        b = x.shape[0]
        p = torch.nn.functional.avg_pool2d(x, SIDE // 8).permute(0, 2, 3, 1).reshape(b, 64, 3)
        tok = p.repeat(1, 1, 16) @ w
        return {"h": torch.cat([tok.mean(1, keepdim=True), tok], 1)}

    lay = StoreLayout(n_images, T, D, images_per_shard=1024, images_per_chunk=128)
    path = root / "h.zarr"
    create_store(path, lay, {"bench": True})
    for s in range(lay.n_shards):
        extract_shard(capture, images, {"h": path}, s, batch_size=256, progress=False)
    return path


def rows_per_s(fn) -> float:
    t0 = time.perf_counter()
    rows = fn()
    return rows / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs; medians reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_store(Path(tmp), args.images)
        build_s = time.perf_counter() - t0
        store = ActivationStore.open(path)

        def sequential():
            return sum(len(store.read_chunk(c).reshape(-1, D)) for c in range(store.n_chunks))

        def shuffled():
            loader = ShuffledLoader(store, np.arange(args.images), batch_size=args.batch_size)
            return sum(len(b) for b in loader.epoch(0))

        def random_images(n=256):
            order = np.random.default_rng(0).permutation(args.images)[:n]
            return sum(len(store.read(int(i), int(i) + 1).reshape(-1, D)) for i in order)

        sequential()  # warm the page cache so both timed passes read from memory alike
        runs = {"sequential": [], "shuffled": [], "random_single_image": []}
        for _ in range(args.repeats):  # interleaved, so load spikes hit all three alike
            runs["sequential"].append(rows_per_s(sequential))
            runs["shuffled"].append(rows_per_s(shuffled))
            runs["random_single_image"].append(rows_per_s(random_images))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    result = {
        "store": {"images": args.images, "tokens": T, "d_model": D, "dtype": "float16",
                  "images_per_chunk": 128, "images_per_shard": 1024,
                  "bytes": args.images * T * D * 2, "build_seconds": round(build_s, 2)},
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        **{f"{k}_rows_per_s_median": round(v) for k, v in med.items()},
        "shuffled_over_sequential": round(med["shuffled"] / med["sequential"], 3),
        "runs_rows_per_s": {k: [round(x) for x in v] for k, v in runs.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
