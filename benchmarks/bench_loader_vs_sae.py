"""Does the shuffled loader keep a TopK SAE trainer fed? Loader rows/s vs SAE-step tokens/s.

Same run, same machine: one shuffled-loader epoch over a d=384 float16 store (built with the real
extraction path, see bench_loader.build_store) against `train_sae` steps at d=384, width 16*d,
k=32, batch 4096 on in-memory batches (so the SAE figure is compute only). Target: loader >= 3x.
Writes benchmarks/results/loader_vs_sae.json.

    python benchmarks/bench_loader_vs_sae.py [--images 4096] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from bench_loader import D, build_store  # noqa: E402

from analysis.activations.reader import ActivationStore  # noqa: E402
from analysis.activations.loader import ShuffledLoader
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae  # noqa: E402


def loader_rows_per_s(store: ActivationStore, batch_size: int, epoch: int) -> float:
    loader = ShuffledLoader(store, np.arange(store.n_images), batch_size=batch_size, seed=0)
    t0 = time.perf_counter()
    rows = sum(len(b) for b in loader.epoch(epoch))
    return rows / (time.perf_counter() - t0)


def sae_tokens_per_s(batches: list[torch.Tensor], width: int, k: int, steps: int) -> float:
    cfg = SAETrainConfig(width=width, k=k, batch_size=len(batches[0]), n_train_tokens=steps * len(batches[0]),
                         warmup_steps=1)
    stream = (batches[i % len(batches)] for i in range(10**9))
    result = train_sae(stream, D, cfg, mean_norm=float(batches[0].norm(dim=1).mean()), init_batch=batches[0],
                       progress=False, log_every=max(steps, 1))
    return result.tokens / result.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader_vs_sae.json"))
    args = ap.parse_args()
    width = args.expansion * D
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.open(build_store(Path(tmp), args.images))
        batches = [b.clone() for _, b in zip(range(4), ShuffledLoader(
            store, np.arange(store.n_images), batch_size=args.batch_size, seed=1).epoch(0))]
        loader_runs, sae_runs = [], []
        loader_rows_per_s(store, args.batch_size, 99)  # warm the page cache
        for r in range(args.repeats):
            loader_runs.append(loader_rows_per_s(store, args.batch_size, r))
            sae_runs.append(sae_tokens_per_s(batches, width, args.k, args.steps))
            print(f"repeat {r + 1}/{args.repeats}: loader {loader_runs[-1]:,.0f} rows/s, "
                  f"SAE step {sae_runs[-1]:,.0f} tokens/s")
    loader_med, sae_med = statistics.median(loader_runs), statistics.median(sae_runs)
    ratios = [a / b for a, b in zip(loader_runs, sae_runs)]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
                     "numpy": np.__version__},
        "config": {"images": args.images, "tokens_per_image": store.n_tokens, "d": D, "width": width, "k": args.k,
                   "batch_size": args.batch_size, "sae_steps": args.steps, "store_dtype": store.dtype},
        "runs": {"loader_rows_per_s": loader_runs, "sae_tokens_per_s": sae_runs, "ratio": ratios},
        "loader_rows_per_s_median": loader_med,
        "sae_tokens_per_s_median": sae_med,
        "loader_over_sae_median": statistics.median(ratios),
        "target": ">= 3",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nloader {loader_med:,.0f} rows/s vs SAE {sae_med:,.0f} tokens/s: "
          f"{result['loader_over_sae_median']:.1f}x (target >= 3x); wrote {args.out}")


if __name__ == "__main__":
    main()
