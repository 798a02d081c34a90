"""A store-wide pass (statistics + one dictionary's encode/decode over every token), and mining
every image, in-process against the same passes on a dask.distributed LocalCluster, at two store
sizes (1x and 4x images).

In-process: one process with `--threads` torch threads reads every chunk, folds the statistics
(`Moments`) and scores the dictionary (`reconstruction_metrics`). dask: `store_statistics` and
`dictionary_pass` (analysis/evaluation/dask_passes.py) on `--workers` worker processes with one
thread each, after one warm-up pass (workers import torch once). Mining: `mine_features` in
process against `mining_pass` (tasks of `--images-per-task` images, states merged here), the
same 64-image batches and the same tables (checked). Each is timed `--repeats` times; the result
holds the medians and the median of the per-repeat ratios dask / in-process.

The store is a mouse's residual stream over generated shapes, built here under --root (reused
when present); the dictionary is a freshly initialised TopK SAE (the pass costs the same whatever
its weights).

Writes benchmarks/results/dask_passes.json.

    .venv/bin/python benchmarks/bench_dask_passes.py [--images 5000] [--scales 1,4] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import machine, median_ratio, write  # noqa: E402

from analysis.activations.reader import ActivationStore, iter_images  # noqa: E402
from analysis.activations.stats import Moments  # noqa: E402
from analysis.dictionaries import build_sae  # noqa: E402
from analysis.dictionaries.training.sae import SAETrainConfig  # noqa: E402
from analysis.evaluation.dask_passes import dictionary_pass, mining_pass, store_statistics  # noqa: E402
from analysis.evaluation.mining import mine_features  # noqa: E402
from analysis.evaluation.metrics import reconstruction_metrics  # noqa: E402
from analysis.paths import DataRoot  # noqa: E402
from analysis.stages.activations import materialize_store  # noqa: E402
from analysis.stages.suite import parse_suite  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def build_store(root: DataRoot, n_images: int):
    spec = parse_suite({"name": f"dask{n_images}", "dataset": {"params": {"n_images": n_images, "seed": 0}},
                        "model": {"train": {"epochs": 1}},
                        "activations": {"hooks": [HOOK], "images_per_shard": 4096, "images_per_chunk": 256}})
    materialize_store(spec, root)
    return root.hook_store(spec.store_id, HOOK)


def in_process(location, sae) -> dict:
    store = ActivationStore.open(location)
    moments = Moments()
    for chunk in range(store.n_chunks):
        start = chunk * store.chunk_images
        stop = min(start + store.chunk_images, store.n_images)
        moments.add(store.read(start, stop), store.read_norms(start, stop))
    batches = (x.reshape(-1, store.d_model) for _, x in iter_images(store, range(store.n_images),
                                                                     images_per_batch=store.chunk_images))
    metrics = reconstruction_metrics(sae, batches)
    return {"n_tokens": metrics.n_tokens, "fvu": metrics.fvu, "dead": metrics.dead_fraction}


def on_dask(location, sae) -> dict:
    stats = store_statistics(location)
    result = dictionary_pass(location, sae)
    assert stats.n_tokens == result.n_tokens
    return {"n_tokens": result.n_tokens, "fvu": result.fvu, "dead": result.firing_fractions()[0]}


def mine_in_process(location, sae):
    store = ActivationStore.open(location)
    return mine_features(sae, iter_images(store, range(store.n_images), images_per_batch=64), n_top=16)


def mine_on_dask(location, sae, images_per_task: int):
    n = ActivationStore.open(location).n_images
    return mining_pass(location, sae, range(n), images_per_batch=64, images_per_task=images_per_task, n_top=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--scales", default="1,4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images-per-task", type=int, default=2048, help="mining_pass's task size")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "spectra-bench-dask"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dask_passes.json"))
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster

    torch.set_num_threads(args.threads)
    root = DataRoot(Path(args.root))
    rows = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        for scale in [int(s) for s in args.scales.split(",")]:
            location = build_store(root, args.images * scale)
            d = ActivationStore.open(location).d_model
            sae = build_sae(SAETrainConfig(width=8 * d, architecture="topk", k=16).sae_config(d))
            on_dask(location, sae)  # warm-up: the workers import torch and open the store once
            local, remote = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = in_process(location, sae)
                local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = on_dask(location, sae)
                remote.append(time.perf_counter() - t0)
                assert a["n_tokens"] == b["n_tokens"] and abs(a["fvu"] - b["fvu"]) < 1e-9 * abs(a["fvu"])
            mine_on_dask(location, sae, args.images_per_task)  # warm-up
            mine_local, mine_remote = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a_mined = mine_in_process(location, sae)
                mine_local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b_mined = mine_on_dask(location, sae, args.images_per_task)
                mine_remote.append(time.perf_counter() - t0)
                assert a_mined.top_images.equals(b_mined.top_images)
            row = {"scale": scale, "images": args.images * scale, "tokens": a["n_tokens"], "d": d,
                   "width": 8 * d, "in_process_s": statistics.median(local), "dask_s": statistics.median(remote),
                   "dask_over_in_process": median_ratio(remote, local),
                   "mining_in_process_s": statistics.median(mine_local), "mining_dask_s": statistics.median(mine_remote),
                   "mining_dask_over_in_process": median_ratio(mine_remote, mine_local)}
            rows.append(row)
            print(row, flush=True)
    write(args.out, {"machine": machine(dask_workers=args.workers, in_process_threads=args.threads),
                     "rows": rows, "runs": rows}, runs_key="runs")


if __name__ == "__main__":
    main()
