"""The one definition of every reconstruction metric (DESIGN.md §4).

`reconstruction_metrics` (SAEs) and `prediction_metrics` (transcoders) stream an evaluation set
once; given column `slices` (a crosscoder's layers in its concatenated input), the same pass
also gives the FVU of each slice. `crosscoder_metrics` scores a crosscoder on per-layer inputs. Any object with `cfg.width`
whose call returns (x_hat, top_acts, top_indices) works as `sae` (TopK SAEs, and stubs in tests).
The model-level metrics (splicing a dictionary into the forward pass) are in
`analysis.evaluation.downstream`.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class ReconstructionMetrics(NamedTuple):
    n_tokens: int
    l0: float
    """Mean count of nonzero latents per token."""
    fvu: float
    """Σ‖x − x̂‖² / Σ‖x − μ‖², μ the per-dimension mean of the evaluation tokens."""
    explained_variance: float
    """1 − fvu."""
    mse: float
    """Mean squared error per element: Σ‖x − x̂‖² / (n_tokens · d)."""
    cosine: float
    """Mean over tokens of cos(x, x̂)."""
    shrinkage: float
    """Mean over tokens of ‖x̂‖ / ‖x‖ (< 1 means the SAE shrinks activations)."""
    dead_fraction: float
    """Latents that fired on no token of the set."""
    dense_fraction: float
    """Latents firing on more than `dense_threshold` of the tokens."""
    fire_counts: np.ndarray
    """(width,) int64 tokens on which each latent was nonzero."""
    fvu_per_slice: tuple[float, ...] = ()
    """Σ‖x_s − x̂_s‖² / Σ‖x_s − μ_s‖² for each column slice s asked for (e.g. each layer of a
    crosscoder), from the same per-dimension sums as `fvu`; () when none were asked for."""


class RunningMoments:
    """Per-dimension count/mean/M2 in float64, merged batch by batch (Chan et al.)."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        x = x.double().cpu()
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[Tensor], *, dense_threshold: float = 0.1,
                           slices: Sequence[slice] = ()) -> ReconstructionMetrics:
    """Stream (B, d) batches of RAW activations through `sae` and score the reconstructions
    (also per column slice of d, for each of `slices`)."""

    def scored():
        for x in batches:
            x = x.reshape(-1, x.shape[-1])
            out = sae(x)
            yield x, out.x_hat.reshape(x.shape), out.top_acts, out.top_indices

    return _score(scored(), sae.cfg.width, dense_threshold, slices)


@torch.no_grad()
def prediction_metrics(model, pairs: Iterable[tuple[Tensor, Tensor]], *,
                       dense_threshold: float = 0.1) -> ReconstructionMetrics:
    """The same metrics for a dictionary that predicts another hook (a transcoder): `model(x_in)`
    returns (y_hat, top_acts, top_indices) and every formula is applied to the target y, so FVU is
    Σ‖y − ŷ‖² / Σ‖y − μ_y‖² and shrinkage is ‖ŷ‖/‖y‖."""
    device = next(model.parameters()).device

    def scored():
        for x, y in pairs:
            x = x.reshape(-1, x.shape[-1]).to(device, torch.float32)
            y = y.reshape(-1, y.shape[-1]).to(device, torch.float32)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"paired batches must hold the same tokens, got {x.shape[0]} inputs and "
                                 f"{y.shape[0]} targets")
            out = model(x)
            if out.y_hat.shape[-1] != y.shape[-1]:
                raise ValueError(f"the model predicts {out.y_hat.shape[-1]} dimensions but the targets have "
                                 f"{y.shape[-1]}: pair it with the hook it was trained to predict")
            yield y, out.y_hat.reshape(y.shape), out.top_acts, out.top_indices

    return _score(scored(), model.cfg.width, dense_threshold, ())


def _score(scored: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]], width: int,
           dense_threshold: float, slices: Sequence[slice]) -> ReconstructionMetrics:
    """Metrics over a stream of (target, prediction, top_acts, top_indices), all per token."""
    moments: RunningMoments | None = None
    sq_err = cos_sum = shrink_sum = nnz = 0.0
    fire = torch.zeros(width, dtype=torch.int64)
    for x, x_hat, top_acts, top_indices in scored:
        x64, xh64 = x.double(), x_hat.double()
        if moments is None:
            moments = RunningMoments(x.shape[-1])
            err_per_dim = torch.zeros(x.shape[-1], dtype=torch.float64)  # summed over tokens, for `slices`
        moments.update(x64)
        sq = (x64 - xh64).pow(2)
        sq_err += float(sq.sum())
        if slices:
            err_per_dim += sq.sum(0).cpu()
        x_norm, xh_norm = x64.norm(dim=1), xh64.norm(dim=1)
        cos_sum += float(F.cosine_similarity(x64, xh64, dim=1, eps=1e-12).sum())
        shrink_sum += float((xh_norm / x_norm.clamp_min(1e-12)).sum())
        active = top_acts != 0
        nnz += float(active.sum())
        fire += torch.bincount(top_indices[active].reshape(-1).cpu(), minlength=width)
    if moments is None or moments.n == 0:
        raise ValueError("reconstruction_metrics got no tokens: pass at least one non-empty batch")
    n = moments.n
    total_var = float(moments.m2.sum())
    fvu = sq_err / total_var if total_var > 0 else math.nan
    counts = fire.numpy()
    per_slice = tuple(_ratio(err_per_dim[sl], moments.m2[sl]) for sl in slices)
    return ReconstructionMetrics(
        n_tokens=n,
        l0=nnz / n,
        fvu=fvu,
        explained_variance=1.0 - fvu,
        mse=sq_err / (n * moments.mean.numel()),
        cosine=cos_sum / n,
        shrinkage=shrink_sum / n,
        dead_fraction=float((counts == 0).mean()),
        dense_fraction=float((counts > dense_threshold * n).mean()),
        fire_counts=counts,
        fvu_per_slice=per_slice,
    )


def _ratio(err: Tensor, var: Tensor) -> float:
    """Σ err / Σ var over some dimensions; NaN where they hold no variance."""
    v = float(var.sum())
    return float(err.sum()) / v if v > 0 else math.nan


def firing_fractions(fire_counts: np.ndarray, n_tokens: int, dense_threshold: float = 0.1) -> tuple[float, float]:
    """(dead, dense): latents that fired on no token, and on more than `dense_threshold` of them."""
    counts = np.asarray(fire_counts)
    return float((counts == 0).mean()), float((counts > dense_threshold * n_tokens).mean())


def log10_density_histogram(fire_counts: np.ndarray, n_tokens: int, *, bins_per_decade: int = 4) -> list[dict]:
    """Histogram of log10(firing density) over latents, the standard SAE health plot.

    Bins span [floor(log10(1/n_tokens)), 0] (the smallest density a latent that fired once can
    have, up to firing on every token); latents that never fired get their own first row with
    `log10_lo = -inf`, since log10(0) has no bin. Rows: log10_lo, log10_hi, n_latents.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be > 0")
    counts = np.asarray(fire_counts, dtype=np.int64)
    lo = math.floor(math.log10(1.0 / n_tokens))
    edges = np.linspace(lo, 0.0, -lo * bins_per_decade + 1)
    fired = counts[counts > 0]
    hist, _ = np.histogram(np.log10(fired / n_tokens), bins=edges)
    rows = [{"log10_lo": -math.inf, "log10_hi": float(edges[0]), "n_latents": int((counts == 0).sum())}]
    rows += [{"log10_lo": float(a), "log10_hi": float(b), "n_latents": int(c)}
             for a, b, c in zip(edges[:-1], edges[1:], hist)]
    return rows


class CrosscoderMetrics(NamedTuple):
    n_tokens: int
    l0: float
    """Mean count of nonzero latents per token (one code per token for all layers)."""
    fvu: float
    """Pooled: Σ_l Σ‖x^l − x̂^l‖² / Σ_l Σ‖x^l − μ^l‖², μ^l the per-dimension evaluation mean."""
    fvu_per_layer: tuple[float, ...]
    """Σ‖x^l − x̂^l‖² / Σ‖x^l − μ^l‖² for each layer l."""
    explained_variance: float
    """1 − fvu."""
    dead_fraction: float
    """Latents that fired on no token of the set."""
    dense_fraction: float
    """Latents firing on more than `dense_threshold` of the tokens."""
    fire_counts: np.ndarray
    """(width,) int64 tokens on which each latent was nonzero."""


@torch.no_grad()
def crosscoder_metrics(cc, batches: Iterable[Tensor | Sequence[Tensor]], *, dense_threshold: float = 0.1) -> CrosscoderMetrics:
    """Stream RAW evaluation batches through crosscoder `cc` and score it, pooled and per layer
    (DESIGN.md §4). A batch is a (B, L, d) tensor or one (B, d_l) tensor per layer."""
    slices, width = cc.cfg.slices(), cc.cfg.width
    dev = cc.W_dec.device
    moments = RunningMoments(cc.cfg.d_total)  # per-dimension mean/M2 in float64: never vs zero
    err = torch.zeros(cc.cfg.d_total, dtype=torch.float64)
    fire = torch.zeros(width, dtype=torch.int64)
    nnz = 0
    for batch in batches:
        x = cc.concat(batch).to(dev, torch.float32)
        enc = cc.encode_concat(x)
        x_hat = cc.decode_concat(enc.top_acts, enc.top_indices)
        moments.update(x)
        err += (x.double() - x_hat.double()).pow(2).sum(0).cpu()
        active = enc.top_acts != 0
        nnz += int(active.sum())
        fire += torch.bincount(enc.top_indices[active].reshape(-1).cpu(), minlength=width)
    n = moments.n
    if n == 0:
        raise ValueError("crosscoder_metrics got no tokens: pass at least one non-empty batch")
    fvu = _ratio(err, moments.m2)
    counts = fire.numpy()
    return CrosscoderMetrics(
        n_tokens=n, l0=nnz / n, fvu=fvu,
        fvu_per_layer=tuple(_ratio(err[sl], moments.m2[sl]) for sl in slices),
        explained_variance=1.0 - fvu,
        dead_fraction=float((counts == 0).mean()),
        dense_fraction=float((counts > dense_threshold * n).mean()),
        fire_counts=counts,
    )

