"""The one definition of every dictionary metric (DESIGN.md §4).

`reconstruction_metrics` streams an evaluation set once; `downstream_metrics` splices the SAE
into a model's forward pass. Any object with `cfg.width` whose call returns
(x_hat, top_acts, top_indices) works as `sae` (TopK SAEs, and stubs in tests).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

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


class _RunningMoments:
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
def reconstruction_metrics(sae, batches: Iterable[Tensor], *, dense_threshold: float = 0.1) -> ReconstructionMetrics:
    """Stream (B, d) batches of RAW activations through `sae` and score the reconstructions."""
    width = sae.cfg.width
    moments: _RunningMoments | None = None
    sq_err = cos_sum = shrink_sum = nnz = 0.0
    fire = torch.zeros(width, dtype=torch.int64)
    for x in batches:
        x = x.reshape(-1, x.shape[-1])
        out = sae(x)
        x64, xh64 = x.double(), out.x_hat.reshape(x.shape).double()
        if moments is None:
            moments = _RunningMoments(x.shape[-1])
        moments.update(x64)
        sq_err += float((x64 - xh64).pow(2).sum())
        x_norm, xh_norm = x64.norm(dim=1), xh64.norm(dim=1)
        cos_sum += float(F.cosine_similarity(x64, xh64, dim=1, eps=1e-12).sum())
        shrink_sum += float((xh_norm / x_norm.clamp_min(1e-12)).sum())
        active = out.top_acts != 0
        nnz += float(active.sum())
        fire += torch.bincount(out.top_indices[active].reshape(-1).cpu(), minlength=width)
    if moments is None or moments.n == 0:
        raise ValueError("reconstruction_metrics got no tokens: pass at least one non-empty batch")
    n = moments.n
    total_var = float(moments.m2.sum())
    fvu = sq_err / total_var if total_var > 0 else math.nan
    counts = fire.numpy()
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
    )


class DownstreamMetrics(NamedTuple):
    n_images: int
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    kl_spliced: float
    """KL(clean ‖ spliced) of the output distributions, mean over images."""
    kl_ablated: float
    """KL(clean ‖ zero-ablated), mean over images."""
    acc_clean: float
    acc_spliced: float
    acc_ablated: float
    loss_recovered: float
    """(ce_ablated − ce_spliced) / (ce_ablated − ce_clean); NaN when the gap is 0."""
    ablation_gap: float
    """ce_ablated − ce_clean: when tiny, loss_recovered is meaningless."""


def _kl_sum(clean_logp: Tensor, other_logits: Tensor) -> float:
    # kl_div(input=log q, target=log p) = Σ p (log p − log q); log_target keeps p = 0 terms at 0
    other_logp = other_logits.double().log_softmax(-1)
    return float(F.kl_div(other_logp, clean_logp, reduction="sum", log_target=True))


@torch.no_grad()
def downstream_metrics(model, sae, hook_name: str, batches: Iterable[tuple[Tensor, Tensor]]) -> DownstreamMetrics:
    """Clean vs SAE-spliced vs zero-ablated forward passes at `hook_name`.

    `model(x)` gives logits; `model.run_with_hooks(x, fwd_hooks=[(name, fn)])` calls
    `fn(act, *, hook)` with act (B, T, d) and uses its return value as the replacement.
    """

    def splice(act: Tensor, *, hook) -> Tensor:
        x_hat = sae(act.reshape(-1, act.shape[-1])).x_hat
        return x_hat.reshape(act.shape).to(act.dtype)

    def ablate(act: Tensor, *, hook) -> Tensor:
        return torch.zeros_like(act)

    n = 0
    ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    correct = dict.fromkeys(ce, 0)
    kl = {"spliced": 0.0, "ablated": 0.0}
    for x, labels in batches:
        logits = {
            "clean": model(x),
            "spliced": model.run_with_hooks(x, fwd_hooks=[(hook_name, splice)]),
            "ablated": model.run_with_hooks(x, fwd_hooks=[(hook_name, ablate)]),
        }
        labels = labels.to(logits["clean"].device)
        clean_logp = logits["clean"].double().log_softmax(-1)
        for name, lg in logits.items():
            ce[name] += float(F.cross_entropy(lg.double(), labels, reduction="sum"))
            correct[name] += int((lg.argmax(-1) == labels).sum())
        for name in kl:
            kl[name] += _kl_sum(clean_logp, logits[name])
        n += x.shape[0]
    if n == 0:
        raise ValueError("downstream_metrics got no images: pass at least one non-empty batch")
    mean_ce = {k: v / n for k, v in ce.items()}
    gap = mean_ce["ablated"] - mean_ce["clean"]
    recovered = (mean_ce["ablated"] - mean_ce["spliced"]) / gap if gap != 0 else math.nan
    return DownstreamMetrics(
        n_images=n,
        ce_clean=mean_ce["clean"],
        ce_spliced=mean_ce["spliced"],
        ce_ablated=mean_ce["ablated"],
        kl_spliced=kl["spliced"] / n,
        kl_ablated=kl["ablated"] / n,
        acc_clean=correct["clean"] / n,
        acc_spliced=correct["spliced"] / n,
        acc_ablated=correct["ablated"] / n,
        loss_recovered=recovered,
        ablation_gap=gap,
    )
