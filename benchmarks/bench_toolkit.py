"""Every toolkit analysis on a timm ViT (random weights: no download), against a bare forward pass
over the same images in the same run.

Each analysis is timed once, as the toolkit stage runs it (16 images per forward), and reported
in seconds and as a multiple of one bare forward over the images it reads, so the figure
survives this machine's drift. Patching sweeps one (clean, corrupted) pair: the residual stream
over layers x token groups (`token_blocks`, 64 cells by default) and every head.

Writes benchmarks/results/toolkit.json.

    .venv/bin/python benchmarks/bench_toolkit.py [--model vit_base_patch16_224] [--images 32]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import machine, write  # noqa: E402

from analysis.evaluation.toolkit.attention import attention_distance, attention_patterns, attention_to_cls  # noqa: E402
from analysis.evaluation.toolkit.attribution import direct_logit_attribution  # noqa: E402
from analysis.evaluation.toolkit.lens import class_embedding_lens  # noqa: E402
from analysis.evaluation.toolkit.memories import key_value_agreement, memories_table  # noqa: E402
from analysis.evaluation.toolkit.patching import logit_diff_metric, sweep_heads, sweep_resid, token_blocks  # noqa: E402
from analysis.evaluation.toolkit.perturbation import perturbation_table  # noqa: E402
from analysis.evaluation.toolkit.probe import probe_layers  # noqa: E402
from analysis.models.vit import HookedViT  # noqa: E402

BATCH = 16  # the toolkit stage's images per forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT name (random weights)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--patch-positions", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "toolkit.json"))
    args = ap.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedViT.from_timm(timm.create_model(args.model, pretrained=False).eval())
    cfg = model.cfg
    size = cfg.image_size
    x = torch.rand(args.images, cfg.in_chans, size, size)
    y = torch.randint(0, cfg.n_classes, (args.images,))
    is_train = np.arange(args.images) < (3 * args.images) // 4

    def forward():
        with torch.no_grad():
            for lo in range(0, len(x), BATCH):
                model(x[lo:lo + BATCH])

    groups, _ = token_blocks(cfg, args.patch_positions)
    metric = logit_diff_metric(torch.tensor([1]), torch.tensor([2]))
    analyses = {
        "bare_forward": forward,
        "lens": lambda: class_embedding_lens(model, x, y, batch_size=BATCH),
        "attribution_heads": lambda: direct_logit_attribution(model, x, y, heads=True, batch_size=BATCH),
        "attention": lambda: [(attention_distance(p, cfg), attention_to_cls(p, cfg))
                              for p in (attention_patterns(model, x[lo:lo + BATCH]) for lo in range(0, len(x), BATCH))],
        "patching_resid_one_pair": lambda: sweep_resid(model, x[:1], x[1:2], metric, positions=groups),
        "patching_heads_one_pair": lambda: sweep_heads(model, x[:1], x[1:2], metric),
        "perturbation": lambda: perturbation_table(model, x, y, batch_size=BATCH),
        "memories_table": lambda: memories_table(model),
        "key_value_last_block": lambda: key_value_agreement(model, x, y, cfg.n_layers - 1, batch_size=BATCH),
        "probe": lambda: probe_layers(model, x, y % 4, is_train, batch_size=BATCH),
    }
    seconds, peak = {}, {}
    for name, fn in analyses.items():
        t0 = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - t0, 3)
        peak[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)  # GB, running max
        print(f"{name:26s} {seconds[name]:8.2f} s  peak RSS {peak[name]:.2f} GB", flush=True)
    base = seconds["bare_forward"]
    result = {"machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "out"},
              "n_token_groups": len(groups), "seconds": seconds, "peak_rss_gb": peak,
              "ratio_to_bare_forward": {k: round(v / base, 2) for k, v in seconds.items()}}
    write(args.out, result, runs_key="seconds")


if __name__ == "__main__":
    main()
