"""Training cost of a TopK transcoder vs a TopK SAE of the same shape, and vs dense autograd.

Same run, same machine, in-memory batches (compute only), interleaved repeats:
- `train_transcoder` (the one loop, the SAE's sparse TopK kernels, skip path) at d_in = d_out = d;
- `train_sae` at d_in = d with the same width, k and batch: the ratio is what a transcoder adds
  (its skip matmul, a separate target); target <= 1.15x;
- the same transcoder trained by plain autograd through `TopKTranscoder.forward` with fused Adam
  (the dense (B, width) backward the sparse kernels avoid): the baseline.
Writes benchmarks/results/transcoder.json.

    python benchmarks/bench_transcoder.py [--d 384] [--width 6144] [--k 32] [--steps 6] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _results import machine, median_ratio, write
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae
from analysis.dictionaries.training.schedule import remove_parallel_grad
from analysis.dictionaries.training.transcoder import TranscoderTrainConfig, train_transcoder
from analysis.dictionaries.transcoder import TopKTranscoder


def stream(batches):
    return (batches[i % len(batches)] for i in range(10**9))


def transcoder_tokens_per_s(pairs, args) -> float:
    b = args.batch_size
    cfg = TranscoderTrainConfig(width=args.width, k=args.k, skip=True, batch_size=b, n_train_tokens=args.steps * b,
                                warmup_steps=1, dead_tokens=b)  # AuxK acts every step, as late in a run
    x0, y0 = pairs[0]
    res = train_transcoder(stream(pairs), cfg, mean_norm_in=float(x0.norm(dim=1).mean()),
                           mean_norm_out=float(y0.norm(dim=1).mean()), init_batch=pairs[0], progress=False,
                           log_every=max(args.steps, 1))
    return res.tokens / res.seconds


def sae_tokens_per_s(pairs, args) -> float:
    b = args.batch_size
    xs = [x for x, _ in pairs]
    cfg = SAETrainConfig(width=args.width, k=args.k, batch_size=b, n_train_tokens=args.steps * b, warmup_steps=1,
                         dead_tokens=b)
    res = train_sae(stream(xs), args.d, cfg, mean_norm=float(xs[0].norm(dim=1).mean()), init_batch=xs[0],
                    progress=False, log_every=max(args.steps, 1))
    return res.tokens / res.seconds


def dense_autograd_tokens_per_s(pairs, args) -> float:
    """The transcoder step without the sparse kernels: autograd through the model's own forward."""
    tc = TopKTranscoder(TranscoderTrainConfig(width=args.width, k=args.k, skip=True).transcoder_config(args.d, args.d))
    opt = torch.optim.Adam(tc.parameters(), lr=1e-3, fused=True)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = pairs[step % len(pairs)]
        loss = (tc(x).y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        loss.backward()
        remove_parallel_grad(tc.W_dec)
        torch.nn.utils.clip_grad_norm_(list(tc.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tc.normalize_decoder()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--width", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transcoder.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(args.batch_size, args.d, generator=g) + 1, torch.randn(args.batch_size, args.d, generator=g))
             for _ in range(2)]
    runs = {"transcoder": [], "sae_same_shape": [], "transcoder_dense_autograd": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        runs["transcoder"].append(transcoder_tokens_per_s(pairs, args))
        runs["sae_same_shape"].append(sae_tokens_per_s(pairs, args))
        runs["transcoder_dense_autograd"].append(dense_autograd_tokens_per_s(pairs, args))
    write(args.out, {
        "machine": machine(), "args": vars(args), "tokens_per_s": runs,
        "median_tokens_per_s": {name: statistics.median(v) for name, v in runs.items()},
        "ratio_sae_over_transcoder": median_ratio(runs["sae_same_shape"], runs["transcoder"]),
        "ratio_transcoder_over_dense_autograd": median_ratio(runs["transcoder"], runs["transcoder_dense_autograd"]),
    }, runs_key="tokens_per_s")

if __name__ == "__main__":
    main()
