"""Training step time of every SAE architecture, against TopK of the same shape in the same run.

Each architecture trains `--steps` steps through the real loop (`train_sae`: forward, loss,
backward, Adam, the decoder-norm projection) on the ground truth of `ground_truth.py` (d = 128,
1024 true directions, 2048 latents by default: the shape of bench_frontiers.py). The first
`--warmup` steps are not timed. TopK and BatchTopK run at k = `--k`; ReLU and JumpReLU at their
default λ (their L0 does not change the cost of their dense code). Repeats alternate the
architectures, and each ratio is the median of neighbouring runs (`median_ratio`): these
machines drift, ratios hold.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--out ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, median_ratio, write  # noqa: E402
from ground_truth import make_activations, train_batches  # noqa: E402

from analysis.dictionaries.config import K_ARCHITECTURES  # noqa: E402
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae  # noqa: E402

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")


class Timed:
    """A batch iterator that records the time at which each batch is asked for."""

    def __init__(self, batches):
        self.batches, self.stamps = batches, []

    def __iter__(self):
        for batch in self.batches:
            self.stamps.append(time.perf_counter())
            yield batch


def seconds_per_step(arch: str, x: torch.Tensor, mean_norm: float, args) -> float:
    knob = {"k": args.k} if arch in K_ARCHITECTURES else {}
    cfg = SAETrainConfig(width=args.expansion * args.d, architecture=arch, batch_size=args.batch_size,
                         n_train_tokens=args.steps * args.batch_size, **knob)
    timed = Timed(train_batches(x, args.batch_size, cfg.n_train_tokens))
    train_sae(timed, args.d, cfg, mean_norm=mean_norm, init_batch=x[:args.batch_size], progress=False,
              log_every=10**9)
    done = time.perf_counter()
    # batch n is asked for when step n - 1 has finished: time from the first timed step's start
    start = timed.stamps[args.warmup]
    return (done - start) / (args.steps - args.warmup)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--n-features", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--architectures", default=",".join(ARCHITECTURES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    archs = args.architectures.split(",")
    if "topk" not in archs or set(archs) - set(ARCHITECTURES):
        raise SystemExit(f"--architectures {archs}: choose from {list(ARCHITECTURES)}, including topk (the baseline)")
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")
    torch.set_num_threads(args.threads)
    x = torch.from_numpy(make_activations(2**17, args.d, args.n_features, 0)[0])
    mean_norm = float(x[:65536].norm(dim=1).mean())  # the store's statistic in production

    runs = {a: [] for a in archs}
    for repeat in range(args.repeats):
        for arch in archs:
            runs[arch].append(seconds_per_step(arch, x, mean_norm, args))
            print(f"repeat {repeat} {arch:10s} {runs[arch][-1] * 1000:7.1f} ms/step", flush=True)
    summary = {a: {"ms_per_step": 1000 * statistics.median(runs[a]),
                   "ratio_to_topk": median_ratio(runs[a], runs["topk"])} for a in archs}
    write(args.out, {"machine": machine(), "config": vars(args), "summary": summary, "runs": runs},
          runs_key="runs")


if __name__ == "__main__":
    main()
