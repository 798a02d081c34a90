"""Training cost of a crosscoder over L layers vs a TopK SAE on the same concatenated input.

Same run, same machine, in-memory batches (compute only): `train_crosscoder` over L layers of
width d (the concatenated input is L·d wide) against `train_sae` with d_in = L·d and the same
width, k and batch. Both do one dense encoder matmul of the same size, so the ratio measures
what the crosscoder adds (per-layer bookkeeping, logging of per-layer FVU). Target: <= 1.15x.
Also times the ReLU crosscoder (dense autograd) for reference. Writes
benchmarks/results/crosscoder.json.

    python benchmarks/bench_crosscoder.py [--d 384] [--layers 3] [--width 4096] [--steps 6] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from _results import machine, median_ratio, write
from analysis.dictionaries.training.crosscoder import CrosscoderTrainConfig, train_crosscoder
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae


def stream(batches):
    return (batches[i % len(batches)] for i in range(10**9))


def crosscoder_tokens_per_s(layer_batches, arch, width, k, steps) -> float:
    b = layer_batches[0][0].shape[0]
    extra = dict(k=k) if arch == "topk" else dict(sparsity_coef=1.0)
    cfg = CrosscoderTrainConfig(width=width, architecture=arch, batch_size=b, n_train_tokens=steps * b,
                                warmup_steps=1, **extra)
    norms = [float(x.norm(dim=1).mean()) for x in layer_batches[0]]
    res = train_crosscoder(stream(layer_batches), cfg, mean_norms=norms, init_batch=layer_batches[0],
                           progress=False, log_every=max(steps, 1))
    return res.tokens / res.seconds


def sae_tokens_per_s(cat_batches, width, k, steps) -> float:
    b, d = cat_batches[0].shape
    cfg = SAETrainConfig(width=width, k=k, batch_size=b, n_train_tokens=steps * b, warmup_steps=1)
    res = train_sae(stream(cat_batches), d, cfg, mean_norm=float(cat_batches[0].norm(dim=1).mean()),
                    init_batch=cat_batches[0], progress=False, log_every=max(steps, 1))
    return res.tokens / res.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 is steadier "
                    "on a shared machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "crosscoder.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layer_batches = [tuple(torch.randn(args.batch_size, args.d, generator=g) * (l + 1) + l
                           for l in range(args.layers)) for _ in range(2)]
    cat_batches = [torch.cat(xs, dim=1) for xs in layer_batches]
    runs = {"crosscoder_topk": [], "sae_topk_concat": [], "crosscoder_relu": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        runs["crosscoder_topk"].append(crosscoder_tokens_per_s(layer_batches, "topk", args.width, args.k, args.steps))
        runs["sae_topk_concat"].append(sae_tokens_per_s(cat_batches, args.width, args.k, args.steps))
        runs["crosscoder_relu"].append(crosscoder_tokens_per_s(layer_batches, "relu", args.width, args.k, args.steps))
    write(args.out, {
        "machine": machine(), "args": vars(args), "tokens_per_s": runs,
        "median_tokens_per_s": {name: statistics.median(v) for name, v in runs.items()},
        "ratio_sae_over_crosscoder_topk": median_ratio(runs["sae_topk_concat"], runs["crosscoder_topk"]),
        "ratio_crosscoder_relu_over_topk": median_ratio(runs["crosscoder_relu"], runs["crosscoder_topk"]),
    }, runs_key="tokens_per_s")

if __name__ == "__main__":
    main()
