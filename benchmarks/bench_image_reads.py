"""Reading stored images the way extraction does: whole-chunk blocks, one or several in flight.

On an accelerator the forward pass outruns one reader (an H200 ran ViT-B/16 at 9,259 images/s
while the capture with its Zarr reads managed 2,607), so how fast the stored uint8 images come
off the disk decides extraction there. This times, over one stored dataset of JPEG photos
(bench_folder_ingest's folder, the timm ViT eval transform: 224 px), a pass over every image:

    zarr_k     images[lo:hi] through Zarr, k blocks in flight (each read a fresh array)
    direct_k   analysis.data.images.read_images into k + 1 reused buffers, k in flight

Medians of interleaved repeats, and each variant's ratio to zarr_1 in the same repeat.

    .venv/bin/python benchmarks/bench_image_reads.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from _results import machine, median_ratio, write
from analysis.data.images import read_images
from analysis.data.ingest import ingest
from analysis.data.sources import FolderSource
from analysis.models.inputs import Preprocessing
from bench_folder_ingest import make_folder


def one_pass(images: zarr.Array, block: int, in_flight: int, direct: bool) -> float:
    """Seconds to read every image in blocks, `in_flight` reads queued, as extract_shard does."""
    n = images.shape[0]
    blocks = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
    buffers = [np.empty((block,) + images.shape[1:], np.uint8) for _ in range(in_flight + 1)] if direct else []

    def read(j: int) -> np.ndarray:
        lo, hi = blocks[j]
        return read_images(images, lo, hi, buffers[j % len(buffers)]) if direct else images[lo:hi]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        pending = deque(pool.submit(read, j) for j in range(min(in_flight, len(blocks))))
        for j in range(len(blocks)):
            pending.popleft().result()
            if j + in_flight < len(blocks):
                pending.append(pool.submit(read, j + in_flight))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "image_reads.json"))
    args = ap.parse_args()
    pre = Preprocessing(size=224, resize=248)  # timm's ViT eval transform
    runs: dict[str, list[float]] = {f"{kind}_{k}": [] for kind in ("zarr", "direct") for k in args.in_flight}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "jpegs", args.images)
        source = FolderSource(str(tmp / "jpegs"))
        listing = source.listing()
        ingest(source.entries(), listing.n_entries, pre, tmp / "ds", class_names=listing.class_names, progress=False)
        images = zarr.open_array(str(tmp / "ds" / "images.zarr"), mode="r")
        block = images.chunks[0]  # extraction's 64 MiB reads hold one 256-image chunk at 224 px
        for _ in range(args.repeats):
            for name in runs:
                kind, k = name.split("_")
                runs[name].append(images.shape[0] / one_pass(images, block, int(k), kind == "direct"))
    base = f"zarr_{args.in_flight[0]}"
    result = {"machine": machine(zarr=zarr.__version__), "args": vars(args), "images_per_s": runs,
              "median_images_per_s": {n: statistics.median(v) for n, v in runs.items()},
              "ratio_over_" + base: {n: median_ratio(v, runs[base]) for n, v in runs.items()}}
    write(args.out, result, runs_key="images_per_s")


if __name__ == "__main__":
    main()
