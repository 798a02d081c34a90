"""How well a per-token TopK code and a per-latent threshold code can reconstruct the ground truth
of benchmarks/ground_truth.py at the same L0, when the dictionary is the true one: what separates TopK
from JumpReLU once dictionary learning is taken out.

Each held-out token of the ground truth (bench_frontiers.py's d = 128 setting by default) is
encoded over the true directions two ways, each at several L0s:
- `true magnitudes`: the magnitudes the token was made with (a direction drawn twice counts once,
  with their sum), kept where they are among the token's k largest (TopK) or above one threshold
  shared by every direction and token, set so the mean L0 is k (a threshold code: by the
  directions' symmetry one threshold is the best per-latent choice);
- `projections`: what an encoder holding the true directions reads, p = (x − offset) · D^T,
  interference from the token's other directions included, selected the same two ways; the
  values on the chosen latents are then refit by least squares per token, so the score is that
  of the selection alone (raw projections carry every other active direction's overlap).
Each code is decoded as Σ value · direction + offset and scored by FVU (DESIGN.md §4, against
the held-out mean), so the only difference between the two columns of a row is the selection.
`precision` is the fraction of selected latents that are among the token's active directions.
With `--betas`, both selections on the projections are also made with a shift per latent,
β · (mean log frequency − log frequency of the latent on the training pool): per-latent thresholds
θ + shift (what a JumpReLU's thresholds can learn), and each token's k largest of projection −
shift (what a TopK SAE's encoder bias can learn). Rarer latents need a larger projection: a
projection on a rare direction is more often interference. The row keeps every β and each
selection's best (chosen on the held-out tokens: an optimistic bound for both alike).

    .venv/bin/python benchmarks/bench_code_oracle.py [--d 128 --n-features 1024] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, write  # noqa: E402
from ground_truth import DRAWS, MIN_MAGNITUDE, ground_truth_sample  # noqa: E402


def dense_codes(features: torch.Tensor, magnitudes: torch.Tensor, n_features: int) -> torch.Tensor:
    """(n, n_features) true magnitudes, a direction drawn twice holding the sum."""
    return torch.zeros(features.shape[0], n_features).scatter_add_(1, features, magnitudes)


def topk_code(values: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest positive values, the rest 0."""
    top = values.topk(k, dim=1)
    return torch.zeros_like(values).scatter_(1, top.indices, top.values).clamp_min(0)


def threshold_code(values: torch.Tensor, l0: float) -> torch.Tensor:
    """Values above the one threshold at which the mean count per row is `l0` (ties aside)."""
    flat = values.flatten()
    n_keep = int(round(l0 * values.shape[0]))
    threshold = flat.kthvalue(flat.numel() - n_keep).values
    return values * (values > threshold.clamp_min(0))


def shifted_threshold_code(values: torch.Tensor, l0: float, shift: torch.Tensor) -> torch.Tensor:
    """Values above per-latent thresholds θ + shift_i, θ set so the mean count per row is `l0`:
    a threshold code whose thresholds differ by latent (what a JumpReLU can learn)."""
    return values * (threshold_code(values - shift, l0) != 0)


def frequency_shifts(pool_codes: torch.Tensor, beta: float) -> torch.Tensor:
    """β · (log of the mean frequency − log of each latent's frequency on the pool): rarer latents
    get higher thresholds, as a projection reading a rare direction is more often interference
    (the posterior of "active" given a projection scales with the latent's prior frequency)."""
    freq = (pool_codes > 0).double().mean(0).clamp_min(1.0 / pool_codes.shape[0])
    log_freq = freq.log()
    return beta * (log_freq.mean() - log_freq)


def refit(code: torch.Tensor, target: torch.Tensor, directions: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The code's support with its values refit: per token, the least-squares magnitudes of its
    chosen directions for `target` (rank-deficient supports get the minimum-norm solution)."""
    out = torch.zeros_like(code)
    for s in range(0, code.shape[0], chunk):
        block = code[s:s + chunk]
        width = max(1, int((block > 0).sum(1).max()))
        vals, idx = block.topk(width, dim=1)  # the support first, then zero-valued padding
        basis = directions[idx].transpose(1, 2) * (vals > 0).unsqueeze(1)  # (c, d, width), padding zeroed
        fit = torch.linalg.lstsq(basis, target[s:s + chunk].unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        out[s:s + chunk].scatter_(1, idx, fit * (vals > 0))
    return out


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def one_seed(args, seed: int) -> list[dict]:
    sample = ground_truth_sample(args.pool_tokens + args.eval_tokens, args.d, args.n_features, seed, args.draws,
                                 args.min_magnitude)
    held = slice(args.pool_tokens, None)  # the frontier's held-out tokens
    x, directions, offset = sample.x[held].double(), sample.directions.double(), sample.offset.double()
    true = dense_codes(sample.features[held], sample.magnitudes[held], args.n_features).double()
    pool = slice(0, args.pool_tokens)  # the frequencies a trainer could have learned: the training pool's
    pool_true = dense_codes(sample.features[pool], sample.magnitudes[pool], args.n_features)
    sources = {"true magnitudes": true, "projections": (x - offset) @ directions.T}
    rows = []
    for source, values in sources.items():
        for k in args.ks:
            row = {"seed": seed, "source": source, "l0": k}
            for name, code in (("topk", topk_code(values, k)), ("threshold", threshold_code(values, k))):
                if source == "projections":
                    code = refit(code, x - offset, directions)
                chosen = code != 0
                row[f"{name}_fvu"] = fvu(x, code @ directions + offset)
                row[f"{name}_l0"] = float(chosen.sum(1).double().mean())
                row[f"{name}_precision"] = float((chosen & (true > 0)).sum() / chosen.sum().clamp_min(1))
            row["threshold_minus_topk"] = row["threshold_fvu"] - row["topk_fvu"]
            if source == "projections" and args.betas:  # both selections with per-latent shifts by frequency
                for beta in args.betas:
                    shift = frequency_shifts(pool_true, beta)
                    for name, code in (("threshold", shifted_threshold_code(values, k, shift)),
                                       ("topk", topk_code(values - shift, k) != 0)):
                        code = refit(values * code.bool(), x - offset, directions)
                        row[f"frequency_{name}_fvu_beta{beta:g}"] = fvu(x, code @ directions + offset)
                for name in ("threshold", "topk"):
                    best = min(args.betas, key=lambda b: row[f"frequency_{name}_fvu_beta{b:g}"])
                    row[f"frequency_{name}_best_beta"] = best
                    row[f"frequency_{name}_fvu"] = row[f"frequency_{name}_fvu_beta{best:g}"]
                row["frequency_threshold_minus_topk"] = row["frequency_threshold_fvu"] - row["frequency_topk_fvu"]
            rows.append(row)
            print(f"seed {seed} {source:15s} L0 {k:3d}  FVU TopK {row['topk_fvu']:.4f} "
                  f"(precision {row['topk_precision']:.2f})  threshold {row['threshold_fvu']:.4f} "
                  f"(L0 {row['threshold_l0']:.1f}, precision {row['threshold_precision']:.2f})"
                  + (f"  by frequency: threshold {row['frequency_threshold_fvu']:.4f} (beta "
                     f"{row['frequency_threshold_best_beta']:g}), TopK {row['frequency_topk_fvu']:.4f} (beta "
                     f"{row['frequency_topk_best_beta']:g})" if "frequency_topk_fvu" in row else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n-features", type=int, default=1024)
    ap.add_argument("--draws", type=int, default=DRAWS,
                    help="directions drawn per token, about half of which fire (ground_truth.py)")
    ap.add_argument("--min-magnitude", type=float, default=MIN_MAGNITUDE,
                    help="smallest magnitude of an active direction, which are this + Exp(1) (ground_truth.py)")
    ap.add_argument("--pool-tokens", type=int, default=131072)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--ks", default="4,8,11,16,32,64")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--betas", default="",
                    help="comma-separated frequency shifts β tried on the projections (e.g. 0,0.2,0.4; empty: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "code_oracle.json"))
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    args.betas = [float(b) for b in args.betas.split(",") if b]
    torch.set_num_threads(args.threads)
    rows = [row for seed in args.seeds.split(",") for row in one_seed(args, int(seed))]
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write(args.out, {"machine": machine(), "config": config, "rows": rows}, runs_key="rows")


if __name__ == "__main__":
    main()
