"""TopK SAE training throughput and quality: Spectra vs sparsify (eai-sparsify) vs SAELens.

One run trains every trainer on the SAME activations with the same d, width, k, batch, token
count and torch threads, each through its own real training loop:
- ours: `analysis.dictionaries.training.sae.train_sae` (fp32; and "ours_bf16" = autocast="bfloat16", bf16 latent
  selection with fp32 values);
- sparsify: `sparsify.Trainer.fit` with its defaults (signum optimizer, no AuxK), reading the
  activations through a stand-in "model" whose hooked module returns the stored rows;
- SAELens: `sae_lens.SAETrainer.fit` on a `TopKTrainingSAE` with its defaults (the loop SAELens'
  own synthetic-data helper uses), fed the same batches.
Each trainer runs in a fresh subprocess (its global torch settings cannot leak into another),
in interleaved order. FVU, L0 and dead fraction are computed on held-out tokens by
`analysis.evaluation.metrics.reconstruction_metrics` for all of them (DESIGN.md §4 formulas).

Activations: a sparse generative model with known features (`ground_truth.py`), so FVU means
something and the features can be found again. By default 3072 unit feature directions in d=384 for 6144 latents
(fewer true features than latents: the regime where a good trainer recovers them), power-law
firing frequencies, ~24 active features per token with non-negative magnitudes, a dense offset and
5 % isotropic noise. Besides FVU, L0 and dead fraction, each trainer is scored on the fraction of
true directions some decoder row matches at cosine > 0.9 (`recovered_fraction`). With
`--n-features 16384` (more features than latents, as in real models) every trainer lands near
FVU 0.35-0.47 and recovery says little. The training pool is cycled when the run is longer than it.

Peers are benchmark-only: `make bench-peers` installs them into .venv-peers (pins in
benchmarks/peers-requirements.txt) and runs this script there. Writes benchmarks/results/sae_peers.json.

    .venv-peers/bin/python benchmarks/bench_sae_peers.py [--threads 1,2] [--train-tokens 1048576]
    python benchmarks/bench_sae_peers.py --device cuda --threads 8 --trainers ours,ours_bf16,sparsify \
        --train-tokens 16777216 --out benchmarks/results/sae_peers_cuda.json

With --device cuda every trainer reads its batches from a pool already on the GPU, and the clock
stops only after the device has finished.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.dictionaries import SAEOutput  # noqa: E402
from analysis.evaluation.metrics import reconstruction_metrics  # noqa: E402
from ground_truth import RECOVERY_COSINE, eval_batches, make_activations, recovery, train_batches  # noqa: E402

TRAINERS = ("ours", "ours_bf16", "sparsify", "saelens")


# ---- one trainer per subprocess ------------------------------------------------------------


def _elapsed(t0: float, device: str) -> float:
    """Seconds since t0 once the device has finished: CUDA trainers return with work still queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class _Adapter:
    """Any trained SAE as the (x_hat, top_acts, top_indices) callable reconstruction_metrics reads;
    `W_dec` its (width, d) decoder rows."""

    def __init__(self, width: int, fn, W_dec: torch.Tensor):
        self.cfg = type("Cfg", (), {"width": width})()
        self._fn = fn
        self.W_dec = W_dec

    def __call__(self, x: torch.Tensor) -> SAEOutput:
        return SAEOutput(*self._fn(x))


def train_ours(train, args, autocast: str):
    from analysis.dictionaries.training.sae import SAETrainConfig, train_sae

    cfg = SAETrainConfig(width=args.width, k=args.k, batch_size=args.batch_size, n_train_tokens=args.train_tokens,
                         autocast=autocast)
    mean_norm = float(train[:65536].norm(dim=1).mean())  # the store's statistic in production
    t0 = time.perf_counter()
    result = train_sae(train_batches(train, args.batch_size, args.train_tokens), train.shape[1], cfg,
                       mean_norm=mean_norm, init_batch=train[:args.batch_size], progress=False, log_every=50)
    seconds = _elapsed(t0, args.device)
    sae = result.dictionary.eval()
    return seconds, result.tokens, sae


def train_sparsify(train, args, workdir: Path):
    from sparsify import SaeConfig, TrainConfig, Trainer

    seq = 64
    if args.batch_size % seq:
        raise ValueError(f"--batch-size={args.batch_size} must be a multiple of {seq} for sparsify's sequences")

    class ActivationModel(torch.nn.Module):
        """Stand-in for the language model sparsify hooks: token id i -> stored row i."""

        def __init__(self, rows: torch.Tensor):
            super().__init__()
            self.acts = torch.nn.Embedding.from_pretrained(rows, freeze=True)
            self.dummy_inputs = {"input_ids": torch.zeros(1, seq, dtype=torch.long)}

        @property
        def base_model(self):
            return self

        @property
        def device(self):
            return self.acts.weight.device

        def forward(self, input_ids):
            return self.acts(input_ids)

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, ids: torch.Tensor):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    n_steps = args.train_tokens // args.batch_size
    ids = torch.cat([torch.arange(s, s + args.batch_size) for s in
                     (np.arange(n_steps) * args.batch_size) % (len(train) - args.batch_size + 1)])
    cfg = TrainConfig(SaeConfig(expansion_factor=args.width // train.shape[1], k=args.k),
                      batch_size=args.batch_size // seq, hookpoints=["acts"], log_to_wandb=False,
                      save_dir=str(workdir / "sparsify"), save_every=10**9)
    trainer = Trainer(cfg, Sequences(ids.reshape(-1, seq)), ActivationModel(train))
    t0 = time.perf_counter()
    trainer.fit()
    seconds = _elapsed(t0, args.device)
    sae = trainer.saes["acts"].eval()

    def run(x):
        out = sae(x)
        return out.sae_out, out.latent_acts, out.latent_indices

    return seconds, n_steps * args.batch_size, _Adapter(args.width, run, sae.W_dec)


def train_saelens(train, args):
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=args.width, k=args.k,
                                                device=args.device))
    lr = 3e-4  # LanguageModelSAERunnerConfig's default
    cfg = SAETrainerConfig(total_training_samples=args.train_tokens, train_batch_size_samples=args.batch_size,
                           lr=lr, lr_end=lr, device=args.device,
                           logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=train_batches(train, args.batch_size, args.train_tokens))
    t0 = time.perf_counter()
    trainer.fit()
    seconds = _elapsed(t0, args.device)
    sae.eval()

    def run(x):
        feats = sae.encode(x)
        acts, idx = feats.topk(args.k, dim=-1)
        return sae.decode(feats), acts, idx

    return seconds, trainer.n_training_samples, _Adapter(args.width, run, sae.W_dec)


def _selection_mismatch(sae, x: torch.Tensor) -> float:
    """Fraction of (token, latent) picks on which a bf16 encoder matmul disagrees with fp32."""
    k, same = sae.cfg.k, []
    for chunk in x.split(4096):
        xc = chunk - sae.b_dec
        exact = torch.addmm(sae.b_enc, xc, sae.W_enc).topk(k, dim=-1).indices
        low = torch.addmm(sae.b_enc.bfloat16(), xc.bfloat16(), sae.W_enc.bfloat16()).topk(k, dim=-1).indices
        same.append((low.unsqueeze(2) == exact.unsqueeze(1)).any(2).reshape(-1))
    return float(1 - torch.cat(same).float().mean())


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    data = np.load(Path(args.data) / "activations.npz")
    train = torch.from_numpy(data["train"]).to(args.device)
    held_out = torch.from_numpy(data["held_out"]).to(args.device)
    directions = torch.from_numpy(data["directions"])
    load0 = os.getloadavg()[0]
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker in ("ours", "ours_bf16"):
            seconds, tokens, sae = train_ours(train, args, "bfloat16" if args.worker == "ours_bf16" else "off")
        elif args.worker == "sparsify":
            seconds, tokens, sae = train_sparsify(train, args, Path(tmp))
        else:
            seconds, tokens, sae = train_saelens(train, args)
        with torch.no_grad():
            m = reconstruction_metrics(sae, eval_batches(held_out))
            extra = {"selection_mismatch": _selection_mismatch(sae, held_out)} if args.worker.startswith("ours") else {}
            extra.update(recovery(directions, sae.W_dec))
    print(json.dumps({**extra,
        "trainer": args.worker, "device": args.device, "threads": args.threads, "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "fvu": m.fvu, "l0": m.l0, "dead_fraction": m.dead_fraction,
        "dense_fraction": m.dense_fraction, "eval_tokens": m.n_tokens,
        "load_avg_1min_before": load0, "load_avg_1min_after": os.getloadavg()[0],
    }))


# ---- the parent: data, interleaved subprocesses, ratios ------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def write_result(args, threads: list[int], trainers: list[str], runs: list[dict]) -> dict:
    """The results file, rewritten after every run so an interrupted benchmark keeps its rows."""
    ratios = {}
    for t in threads:
        by = {r["trainer"]: r for r in runs if r["threads"] == t}
        for ours in ("ours", "ours_bf16"):
            for peer in ("sparsify", "saelens"):
                if ours in by and peer in by:
                    ratios[f"threads{t}/{ours}_over_{peer}"] = by[ours]["tokens_per_s"] / by[peer]["tokens_per_s"]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "eai-sparsify": _version("eai-sparsify"), "sae-lens": _version("sae-lens")},
        "config": {"d": args.d, "width": args.width, "k": args.k, "batch_size": args.batch_size,
                   "train_tokens": args.train_tokens, "pool_tokens": args.pool_tokens, "eval_tokens": args.eval_tokens,
                   "n_features": args.n_features, "seed": args.seed, "threads": threads,
                   "data": "sparse feature model (module docstring); fp32",
                   "recovery_cosine": RECOVERY_COSINE},
        "complete": len(runs) == len(threads) * len(trainers),
        "runs": runs,
        "throughput_ratios": ratios,
        "targets": {"ours_over_sparsify": ">= 1.2", "ours_over_saelens": ">= 3",
                    "fvu": "<= both peers", "dead_fraction": "<= both peers",
                    "recovered_fraction": ">= both peers"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--train-tokens", type=int, default=2**20)
    ap.add_argument("--pool-tokens", type=int, default=2**18, help="distinct training tokens (cycled)")
    ap.add_argument("--eval-tokens", type=int, default=2**15)
    ap.add_argument("--n-features", type=int, default=3072, help="true features (16384: more than latents)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...: where every trainer runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sae_peers.json"))
    ap.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.width = args.width or args.expansion * args.d
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)

    threads = [int(t) for t in args.threads.split(",")]
    trainers = args.trainers.split(",")
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        raise SystemExit(f"unknown --trainers {sorted(unknown)}: choose from {list(TRAINERS)}")
    missing = [mod for name, mod in (("sparsify", "sparsify"), ("saelens", "sae_lens"))
               if name in trainers and importlib.util.find_spec(mod) is None]
    if missing:  # e.g. `make bench` runs every script in the project venv, which has no peers
        print(f"skipped: {missing} not installed here; run `make bench-peers` (it builds .venv-peers)")
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        x, directions = make_activations(args.pool_tokens + args.eval_tokens, args.d, args.n_features, args.seed)
        np.savez(Path(tmp) / "activations.npz", train=x[:args.pool_tokens], held_out=x[args.pool_tokens:],
                 directions=directions)
        del x
        for t in threads:
            # rotate the order per thread count: no trainer always runs first or last
            order = trainers[t % len(trainers):] + trainers[:t % len(trainers)]
            for name in order:
                cmd = [sys.executable, __file__, "--worker", name, "--data", tmp, "--threads", str(t),
                       "--width", str(args.width), "--k", str(args.k), "--batch-size", str(args.batch_size),
                       "--train-tokens", str(args.train_tokens), "--device", args.device]
                env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t),
                       "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                       **({} if args.device.startswith("cuda") else
                          {"SPARSIFY_DISABLE_TRITON": "1"})}  # its documented CPU switch (Triton needs a GPU)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{name} at {t} threads failed (exit {proc.returncode})")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append(row)
                ratios = write_result(args, threads, trainers, runs)
                print(f"threads={t} {name:9s} {row['tokens_per_s']:9,.0f} tokens/s  FVU {row['fvu']:.4f}  "
                      f"L0 {row['l0']:.1f}  dead {row['dead_fraction']:.2%}  "
                      f"recovered {row['recovered_fraction']:.2%}  (load {row['load_avg_1min_before']:.1f})", flush=True)

    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
