"""`encoder_init='least_squares'` against `transpose`, on the ground truth of bench_sae_peers.py
(a sparse feature model with known directions: 8·d true directions, 16·d latents, 256 steps of
4096 tokens), for TopK and BatchTopK over seeds, at the families' shared rate `default_lr`.

`--lr-factors`: TopK k = 32 with the least-squares init at each of these multiples of the shared
rate instead (how TopK's default rate, 4x the shared one, was chosen).

Each (d, architecture, k, seed) trains twice, once per init, on the same activations; held-out
FVU, L0 and dead fraction (`reconstruction_metrics`), the fraction of true directions recovered at
cosine > 0.9, and the first logged training loss (8 steps). The summary gives, per (d,
architecture, k, init), the mean and the range over seeds.

`--suite`: the default suite's SAEs instead (its store, built under --root or reused; both
hooks, k = 8 and 32, its training settings), each init at 1x, 2x and 4x the suite's learning
rate, or the training overrides of `--variants`: held-out FVU over the evaluation images and the
dead fraction over the dead-latent window, as the evaluation stage counts them.

Writes benchmarks/results/encoder_init.json (encoder_init_suite.json with --suite).

    .venv/bin/python benchmarks/bench_encoder_init.py [--dims 128,384] [--seeds 0,1,2] [--threads 2]
    .venv/bin/python benchmarks/bench_encoder_init.py --lr-factors 1,2,4,8 --seeds 0,1 \
        --out benchmarks/results/topk_lr.json
    .venv/bin/python benchmarks/bench_encoder_init.py --suite --out benchmarks/results/encoder_init_suite.json
    .venv/bin/python benchmarks/bench_encoder_init.py --suite --variants benchmarks/auxk_variants.json \
        --out benchmarks/results/auxk_variants_suite.json
    .venv/bin/python benchmarks/bench_encoder_init.py --suite --seeds 0,1 \
        --variants benchmarks/jumprelu_variants.json --out benchmarks/results/jumprelu_suite.json

A variant may set another architecture and its sparsity (`jumprelu_variants.json`): it then
trains once per hook and seed, not once per k of the suite's members.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, write  # noqa: E402
from ground_truth import eval_batches, make_activations, recovery, train_batches  # noqa: E402

from analysis.dictionaries.training.sae import SAETrainConfig, train_sae  # noqa: E402
from analysis.dictionaries.training.schedule import default_lr  # noqa: E402
from analysis.evaluation.metrics import reconstruction_metrics  # noqa: E402

STEPS, BATCH = 256, 4096
RUNS = {128: [("topk", 16), ("topk", 32), ("batchtopk", 32)], 384: [("topk", 32), ("batchtopk", 32)]}


def one_run(train, held_out, directions, d: int, arch: str, k: int, seed: int, init: str,
            lr: float | None = None) -> dict:
    cfg = SAETrainConfig(width=16 * d, architecture=arch, k=k, batch_size=BATCH, n_train_tokens=BATCH * STEPS,
                         seed=seed, encoder_init=init, lr=lr)
    logs: list[dict] = []
    t0 = time.perf_counter()
    result = train_sae(train_batches(train, BATCH, BATCH * STEPS), d, cfg, mean_norm=float(train[:65536].norm(dim=1).mean()),
                       init_batch=train[:BATCH], progress=False, log_every=8, on_log=logs.append)
    seconds = time.perf_counter() - t0
    sae = result.dictionary.eval()
    with torch.no_grad():
        m = reconstruction_metrics(sae, eval_batches(held_out))
        rec = recovery(directions, sae.W_dec)
    return {"d": d, "architecture": arch, "k": k, "seed": seed, "init": init, "lr": cfg.base_lr(), "fvu": m.fvu, "l0": m.l0,
            "dead_fraction": m.dead_fraction, **rec, "first_loss": logs[0]["loss"], "seconds": seconds}


def summary(rows: list[dict]) -> list[dict]:
    out = []
    fields = ("d", "architecture", "k", "init", "lr")
    for key in sorted({tuple(r.get(f) for f in fields) for r in rows}):
        same = [r for r in rows if tuple(r.get(f) for f in fields) == key]
        entry = dict(zip(fields, key), seeds=len(same))
        for metric in ("fvu", "dead_fraction", "recovered_fraction", "first_loss"):
            values = [r[metric] for r in same]
            entry[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


def suite_variants(path: str | None) -> dict[str, dict]:
    """--variants: a JSON file of name -> SAETrainConfig overrides of the suite's training settings
    ("lr_factor" multiplies its rate); without one, each init at 1x, 2x and 4x the rate."""
    if path:
        return json.loads(Path(path).read_text())
    return {f"{init} {factor}x": {"encoder_init": init, "lr_factor": factor}
            for init in ("transpose", "least_squares") for factor in (1, 2, 4)}


def suite_runs(args) -> list[dict]:
    """The default suite's SAEs with each init and learning-rate factor (see the module docstring)."""
    from dataclasses import replace

    from analysis.activations.loader import ShuffledLoader
    from analysis.activations.reader import ActivationStore, iter_images
    from analysis.paths import DataRoot
    from analysis.stages.activations import materialize_store, token_selection
    from analysis.stages.dataset import dead_window_images, evaluation_images, split_indices
    from analysis.stages.saes import train_config
    from analysis.stages.suite import load_suite

    spec = load_suite(ROOT / "pipelines" / "suites" / "default.yaml")
    root = DataRoot(Path(args.root))
    materialize_store(spec, root)
    train_idx, _ = split_indices(root, spec.dataset_id)
    eval_idx = evaluation_images(spec, root)
    window = dead_window_images(spec, root, token_selection(spec).groups.n_tokens)
    members = [m for m in spec.members() if m.kind == "sae" and m.seed in {int(v) for v in args.seeds.split(",")}]
    rows, done = [], set()
    for member in members:
        store = ActivationStore.open(root.hook_store(spec.store_id, member.hook))
        base = train_config(spec, member, store.d_model)
        for name, over in suite_variants(args.variants).items():
            over = dict(over)
            factor = over.pop("lr_factor", 1)
            cfg = replace(base, **over, lr=factor * base.base_lr())
            key = (member.hook, member.seed, json.dumps(cfg.resolved(), sort_keys=True))
            if key in done:  # a variant that sets its own sparsity (another architecture) once per hook and seed
                continue
            done.add(key)
            loader = lambda: ShuffledLoader(store, train_idx, batch_size=cfg.batch_size, seed=member.seed)  # noqa: E731
            sae = train_sae(loader(), store.d_model, cfg, mean_norm=float(store.stats.mean_norm),
                            init_batch=next(iter(loader())), progress=False).dictionary.eval()
            with torch.no_grad():
                held_out = reconstruction_metrics(sae, (x.reshape(-1, store.d_model) for _, x in
                                                        iter_images(store, eval_idx)))
                dead = reconstruction_metrics(sae, (x.reshape(-1, store.d_model) for _, x in
                                                    iter_images(store, window))).dead_fraction
            row = {"hook": member.hook, "architecture": cfg.architecture, "k": cfg.k,
                   "sparsity_coef": cfg.sparsity_coef, "seed": member.seed, "variant": name,
                   "init": cfg.encoder_init, "lr_factor": factor, "aux_coef": cfg.aux_coef,
                   "dead_tokens": cfg.dead_tokens, "l0": held_out.l0, "fvu": held_out.fvu, "dead_fraction": dead}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="128,384")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suite", action="store_true", help="the default suite's SAEs (module docstring)")
    ap.add_argument("--root", default="/tmp/spectra-bench-encoder-init", help="--suite: data root of its store")
    ap.add_argument("--lr-factors", help="comma-separated multiples of default_lr: TopK k=32 (least_squares) at each")
    ap.add_argument("--variants", help="--suite: JSON file of name -> training overrides (suite_variants)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encoder_init.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.suite:
        rows = suite_runs(args)
        write(args.out, {"machine": machine(), "args": vars(args), "runs": rows}, runs_key="runs")
        return
    rows = []
    for d in [int(v) for v in args.dims.split(",")]:
        pool, held = (2**17, 2**14) if d <= 128 else (2**18, 2**15)
        x, directions = make_activations(pool + held, d, 8 * d, 0)
        x, directions = torch.from_numpy(x), torch.from_numpy(directions)
        train, held_out = x[:pool], x[pool:]
        # at the families' shared rate (`default_lr`), where results/encoder_init.json was
        # measured, not TopK's default since (4x that)
        runs = [(arch, k, init, default_lr(16 * d)) for arch, k in RUNS[d] for init in ("transpose", "least_squares")]
        if args.lr_factors:  # TopK k = 32 with the least-squares init, at each multiple of the shared rate
            runs = [("topk", 32, "least_squares", float(f) * default_lr(16 * d)) for f in args.lr_factors.split(",")]
        for arch, k, init, lr in runs:
            for seed in [int(v) for v in args.seeds.split(",")]:
                row = one_run(train, held_out, directions, d, arch, k, seed, init, lr)
                rows.append(row)
                print(f"d={d} {arch} k={k} seed {seed} {init:13s} FVU {row['fvu']:.4f} dead "
                      f"{row['dead_fraction']:.3f} recovered {row['recovered_fraction']:.3f} first loss "
                      f"{row['first_loss']:.2f} ({row['seconds']:.0f} s)", flush=True)
                write(args.out, {"machine": machine(), "args": vars(args), "summary": summary(rows),
                                 "runs": rows}, runs_key="runs")


if __name__ == "__main__":
    main()
