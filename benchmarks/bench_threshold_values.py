"""Where a JumpReLU loses to a TopK at matched L0 on the ground truth: its dictionary, its
selection, or the values it gives the latents it selects.

A TopK SAE (k = 8) and a JumpReLU (λ = 1) are trained with their defaults on bench_frontiers.py's
ground truth (`--draws`, `--min-magnitude`, `--steps`, `--seed`). On the held-out tokens each
dictionary is then read, through its own encoder, four ways:
- its own code;
- each token's k largest pre-activations (the selection a TopK makes), at the k on either side
  of the JumpReLU's L0, so the two dictionaries compare at the same selection rule;
- every code again with the values of its selected latents refit by least squares per token
  (`refit`), which scores the selection alone;
- its own selection with per-latent affine values alpha_i · pre_i + beta_i, fit by least squares on
  the training pool (`own_affine`). With its gates held, those are all the values a JumpReLU's
  parameters can give (alpha scales W_enc, b_enc and θ, beta shifts b_enc and θ), so this reading
  bounds what better training of its values could gain (a bound: the fit is not held to
  alpha > 0 and alpha · θ + beta > 0, and the fraction of latents outside is reported).
A JumpReLU's code is pre · H(pre − θ): a selected latent's value is at least its threshold θ. The
JumpReLU's selected latents are binned by value / θ, and each bin reports the mean value, the mean
refit value, and the FVU when only that bin's values are refit; for the TopK the bins are value /
the token's largest unselected pre-activation (its cut).

    .venv/bin/python benchmarks/bench_threshold_values.py [--draws 16] [--min-magnitude 0.5] \\
        [--steps 1024] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, write  # noqa: E402
from bench_code_oracle import fvu  # noqa: E402
from bench_frontiers import GroundTruth, _interpolate  # noqa: E402
from ground_truth import MIN_MAGNITUDE  # noqa: E402

BINS = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, math.inf)
"""Edges of value / θ (JumpReLU) or value / cut (TopK) for the per-bin rows."""


def refit_values(W_dec: torch.Tensor, b_dec: torch.Tensor, mask: torch.Tensor, x: torch.Tensor,
                 chunk: int = 1024) -> torch.Tensor:
    """(n, width) least-squares values of each token's selected latents (`mask`), 0 elsewhere. A
    ridge of 1e-4 keeps the solve finite where two selected rows nearly coincide.

    Tokens are solved in order of their L0, so a token that selects a hundred latents pads only
    its neighbours' systems; a chunk holds at most 2^24 Gram entries. Solved in float64."""
    out = torch.zeros(mask.shape)
    counts = mask.sum(1)
    order = counts.argsort()
    a = 0
    while a < len(order):
        kmax = max(1, int(counts[order[min(a + chunk, len(order)) - 1]]))
        ids = order[a:a + max(1, min(chunk, 2**24 // kmax**2))]
        m = mask[ids]
        kmax = max(1, int(m.sum(1).max()))
        flags, idx = m.float().topk(kmax, dim=1)  # the selected latents first, padded with unselected
        valid = flags > 0
        # float64 from the Gram on: a float32 Gram of near-parallel rows loses the digits the ridge keeps
        rows = W_dec.double()[idx] * valid[..., None]  # (n, kmax, d), padding rows 0
        gram = rows @ rows.transpose(1, 2) + torch.diag_embed((~valid).double()) + 1e-4 * torch.eye(kmax)
        # Cholesky (the ridge makes every system positive definite): the batched pivoted LU of
        # torch.linalg.solve failed inside MKL (SLASWP) on tokens selecting 100-150 latents
        factor, info = torch.linalg.cholesky_ex(gram)
        if bool(info.any()):
            raise RuntimeError(f"least-squares refit: {int((info > 0).sum())} Gram matrices are not positive definite")
        c = torch.cholesky_solve(rows @ (x[ids] - b_dec).double()[..., None], factor).squeeze(-1).float()
        out[ids] = torch.zeros(len(ids), mask.shape[1]).scatter_(1, idx, c * valid)
        a += len(ids)
    return out


def affine_values(sae, x: torch.Tensor, select, chunk: int = 4096, ridge: float = 1e-6) -> tuple:
    """Per-latent (alpha, beta) minimising the squared error of the code alpha_i * pre_i + beta_i on
    each token's selected latents (`select(pre)`, a bool mask), over the tokens `x`; solved in
    closed form in float64.

    For a JumpReLU with its gates held, these are exactly the values its parameters can express:
    alpha * W_enc, alpha * b_enc + beta and alpha * theta + beta keep every gate and give these
    values, as long as alpha > 0 and alpha * theta + beta > 0. The solve does not impose those
    bounds, so it can only overstate what a JumpReLU could gain (the fraction of live latents
    outside them is reported)."""
    width = sae.cfg.width
    D = sae.W_dec.double()
    gram = torch.zeros(2 * width, 2 * width, dtype=torch.float64)
    rhs = torch.zeros(2 * width, dtype=torch.float64)
    for a in range(0, len(x), chunk):
        xb = x[a:a + chunk]
        pre = sae.pre_acts(xb)
        mask = select(pre)
        code = torch.cat([(pre * mask).double(), mask.double()], dim=1).to_sparse()  # (n, 2w): P | G
        dense = code.to_dense()
        gram += torch.sparse.mm(code.t(), dense)
        rhs += (torch.sparse.mm(code.t(), (xb - sae.b_dec).double()) * D.repeat(2, 1)).sum(1)
    overlap = D @ D.T
    gram *= overlap.repeat(2, 2)  # design column (i, token) is P_ti d_i, so the Gram is (PᵀP) ∘ (D Dᵀ)
    gram += ridge * torch.eye(2 * width, dtype=torch.float64)
    solution = torch.linalg.solve(gram, rhs)
    return solution[:width].float(), solution[width:].float()


def affine_reading(sae, x_fit: torch.Tensor, x: torch.Tensor, select, cut: torch.Tensor) -> dict:
    """FVU on `x` of the code alpha_i * pre_i + beta_i on the SAE's own selection, with (alpha, beta)
    from `affine_values` over `x_fit` (the training pool); the medians of alpha and of the value
    at the cut / the cut (`cut`: the JumpReLU's θ, the TopK's largest unselected pre-activation),
    and the fraction of latents selected in `x` whose alpha or value at the cut is not positive."""
    alpha, beta = affine_values(sae, x_fit, select)
    pre = sae.pre_acts(x)
    mask = select(pre)
    code = torch.where(mask, alpha * pre + beta, 0.0)
    live = mask.any(0)
    at_cut = (alpha * cut + beta)[mask] / cut[mask]
    outside = (alpha <= 0)[None] | (alpha * cut + beta <= 0)
    return {"fvu": fvu(x, code @ sae.W_dec + sae.b_dec), "alpha_median": float(alpha[live].median()),
            "value_at_cut_over_cut_median": float(at_cut.median()),
            "outside_bounds": float((outside & mask).any(0)[live].float().mean())}


def top_k_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(pre.shape, dtype=torch.bool).scatter_(1, pre.topk(k, dim=1).indices, True) & (pre > 0)


def read(sae, x: torch.Tensor, mask: torch.Tensor, pre: torch.Tensor, values: torch.Tensor | None = None) -> dict:
    """L0, FVU and FVU with `values` (default: `refit_values` of `mask`) on the selected latents."""
    values = refit_values(sae.W_dec, sae.b_dec, mask, x) if values is None else values
    return {"l0": float(mask.sum(1).float().mean()), "fvu": fvu(x, (pre * mask) @ sae.W_dec + sae.b_dec),
            "fvu_refit": fvu(x, values @ sae.W_dec + sae.b_dec)}


def value_bins(sae, x: torch.Tensor, mask: torch.Tensor, pre: torch.Tensor, refit: torch.Tensor, cut: torch.Tensor,
               scale: float) -> list[dict]:
    """Per bin of value / cut: selected latents per token, mean value and mean refit value (scaled
    units, where a token's mean squared norm is d), and the FVU with only that bin refit."""
    code = pre * mask
    ratio = pre / cut
    rows = []
    for lo, hi in zip(BINS, BINS[1:]):
        sel = mask & (ratio >= lo) & (ratio < hi)
        mixed = torch.where(sel, refit, code)
        rows.append({"bin": [lo, hi if math.isfinite(hi) else None], "per_token": float(sel.sum()) / len(x),
                     "mean_value": float(code[sel].mean()) * scale, "mean_refit": float(refit[sel].mean()) * scale,
                     "fvu_with_bin_refit": fvu(x, mixed @ sae.W_dec + sae.b_dec)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--min-magnitude", type=float, default=MIN_MAGNITUDE)
    ap.add_argument("--steps", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=8, help="the TopK's k")
    ap.add_argument("--sparsity-coef", type=float, default=1.0, help="the JumpReLU's λ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threshold_values.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frontier = SimpleNamespace(d=128, expansion=16, batch_size=4096, pool_tokens=131072, eval_tokens=16384,
                               n_features=1024, seed=args.seed, draws=args.draws, min_magnitude=args.min_magnitude,
                               train_tokens=args.steps * 4096)
    data = GroundTruth(frontier)
    scale = math.sqrt(frontier.d) / data.mean_norm
    x = data.held_out
    result = {"machine": machine(), "config": vars(args), "scale": scale}
    trained = {}
    for name, arch, knob in (("topk", "topk", {"k": args.k}), ("jumprelu", "jumprelu", {"sparsity_coef": args.sparsity_coef})):
        t0 = time.perf_counter()
        trained[name] = data.row_with_model(arch, **knob)
        print(f"{name} trained in {time.perf_counter() - t0:.0f} s", flush=True)
    with torch.no_grad():
        pres = {name: sae.pre_acts(x) for name, (sae, _) in trained.items()}
        jr = trained["jumprelu"][0]
        selections = {"topk": lambda pre: top_k_mask(pre, args.k), "jumprelu": lambda pre: pre > jr.threshold}
        own = {name: selections[name](pres[name]) for name in pres}
        l0 = float(own["jumprelu"].sum(1).float().mean())
        ks = range(max(1, math.floor(l0) - 1), math.ceil(l0) + 2)
        for name, (sae, row) in trained.items():
            pre = pres[name]
            top = {k: read(sae, x, top_k_mask(pre, k), pre) for k in ks}
            at_l0 = {key: _interpolate([(k, r[key]) for k, r in top.items()], l0) for key in ("fvu", "fvu_refit")}
            if name == "jumprelu":
                cut = jr.threshold.expand_as(pre)
            else:
                cut = pre.topk(args.k + 1, dim=1).values[:, args.k:].expand_as(pre).clamp_min(1e-12)
            refit = refit_values(sae.W_dec, sae.b_dec, own[name], x)
            result[name] = {"training": row, "own": read(sae, x, own[name], pre, refit), "top_k": top,
                            "top_k_at_jumprelu_l0": at_l0,
                            "value_bins": value_bins(sae, x, own[name], pre, refit, cut, scale),
                            "own_affine": affine_reading(sae, data.train, x, selections[name], cut)}
            print(name, {k: round(v, 4) for k, v in result[name]["own"].items()},
                  "top-k at the JumpReLU's L0", {k: round(v, 4) for k, v in at_l0.items()},
                  "affine values", {k: round(v, 4) for k, v in result[name]["own_affine"].items()}, flush=True)
            for b in result[name]["value_bins"]:
                print("   ", b["bin"], f"{b['per_token']:.2f}/token value {b['mean_value']:.2f} refit "
                      f"{b['mean_refit']:.2f} FVU {b['fvu_with_bin_refit']:.4f}", flush=True)
        live = own["jumprelu"].any(0)
        result["jumprelu"]["scaled_threshold_quantiles"] = {
            str(q): float(jr.threshold[live].quantile(q)) * scale for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    write(args.out, result, runs_key="machine")


if __name__ == "__main__":
    main()
