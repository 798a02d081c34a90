"""The one definition of every dictionary metric (DESIGN.md §4).

`reconstruction_metrics` (SAEs) and `prediction_metrics` (transcoders) stream an evaluation set
once; `downstream_metrics` splices the SAE into a model's forward pass, `spliced_downstream_metrics`
any set of replacement hooks (e.g. `transcoder_splice_hooks`). Any object with `cfg.width` whose call returns
(x_hat, top_acts, top_indices) works as `sae` (TopK SAEs, and stubs in tests).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence, Union

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

    def scored():
        for x in batches:
            x = x.reshape(-1, x.shape[-1])
            out = sae(x)
            yield x, out.x_hat.reshape(x.shape), out.top_acts, out.top_indices

    return _score(scored(), sae.cfg.width, dense_threshold)


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
            yield y, out.y_hat.reshape(y.shape), out.top_acts, out.top_indices

    return _score(scored(), model.cfg.width, dense_threshold)


def _score(scored: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]], width: int,
           dense_threshold: float) -> ReconstructionMetrics:
    """Metrics over a stream of (target, prediction, top_acts, top_indices), all per token."""
    moments: _RunningMoments | None = None
    sq_err = cos_sum = shrink_sum = nnz = 0.0
    fire = torch.zeros(width, dtype=torch.int64)
    for x, x_hat, top_acts, top_indices in scored:
        x64, xh64 = x.double(), x_hat.double()
        if moments is None:
            moments = _RunningMoments(x.shape[-1])
        moments.update(x64)
        sq_err += float((x64 - xh64).pow(2).sum())
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


Positions = Union[slice, Sequence[int]]
"""Token positions along the model's token axis that a dictionary covers: those its activation
store keeps (`analysis.tokens.select_tokens(...).keep`). Splicing and ablation touch only these;
a dictionary trained on patches never sees, so never replaces, the class token."""


def _index(positions: Positions) -> slice | list[int]:
    return positions if isinstance(positions, slice) else list(positions)


def _replaced(act: Tensor, positions: Positions, new: Tensor) -> Tensor:
    """`act` with the tokens at `positions` replaced by `new` (the rest untouched)."""
    idx = _index(positions)
    if idx == slice(None):
        return new.to(act.dtype)
    out = act.clone()
    out[:, idx] = new.to(act.dtype)
    return out


def _apply(fn: Callable[[Tensor], Tensor], act: Tensor, positions: Positions) -> Tensor:
    """`fn` (rows, d) -> (rows, d) applied to the tokens at `positions` of act (B, T, d)."""
    sel = act[:, _index(positions)]
    return fn(sel.reshape(-1, sel.shape[-1])).reshape(sel.shape)


def downstream_metrics(model, sae, hook_name: str, batches: Iterable[tuple[Tensor, Tensor]], *,
                       positions: Positions = slice(None)) -> DownstreamMetrics:
    """Clean vs SAE-spliced vs zero-ablated forward passes at `hook_name`, at `positions`.

    `model(x)` gives logits; `model.run_with_hooks(x, fwd_hooks=[(name, fn)])` calls
    `fn(act, *, hook)` with act (B, T, d) and uses its return value as the replacement.
    """

    def splice(act: Tensor, *, hook) -> Tensor:
        return _replaced(act, positions, _apply(lambda rows: sae(rows).x_hat, act, positions))

    return spliced_downstream_metrics(model, [(hook_name, splice)], hook_name, batches, positions=positions)


def transcoder_splice_hooks(transcoder, in_hook: str, out_hook: str, *,
                            positions: Positions = slice(None)) -> list[tuple[str, Callable]]:
    """Forward hooks replacing `out_hook` at `positions` by the transcoder's prediction from
    `in_hook` of the same forward pass (`in_hook` must run first, e.g. resid_mid -> mlp_out)."""
    held: dict[str, Tensor] = {}

    def read(act: Tensor, *, hook) -> None:
        held["x"] = act

    def write(act: Tensor, *, hook) -> Tensor:
        if "x" not in held:
            raise RuntimeError(f"{out_hook} ran before {in_hook}: a transcoder must read an earlier hook")
        x = held.pop("x")
        return _replaced(act, positions, _apply(lambda rows: transcoder(rows).y_hat, x, positions))

    return [(in_hook, read), (out_hook, write)]


def crosscoder_splice_hooks(model, crosscoder, hooks: Sequence[str], *,
                            positions: Positions = slice(None)) -> Callable[[Tensor], list]:
    """Per batch: every hook of an acausal crosscoder replaced at `positions` by its reconstruction.

    The crosscoder reads all its layers at once (later ones included), so the clean activations
    come from a first forward pass and the reconstructions are spliced into a second."""

    def make(x: Tensor) -> list[tuple[str, Callable]]:
        _, cache = model.run_with_cache(x, names_filter=list(hooks))
        acts = [cache[h] for h in hooks]
        sel = [a[:, _index(positions)] for a in acts]
        x_hat = crosscoder([s.reshape(-1, s.shape[-1]) for s in sel]).x_hat
        x_hat = x_hat.unbind(1) if isinstance(x_hat, Tensor) else x_hat
        recon = {h: _replaced(a, positions, r.reshape(s.shape)) for h, r, a, s in zip(hooks, x_hat, acts, sel)}
        return [(h, lambda act, *, hook, h=h: recon[h]) for h in hooks]

    return make


@torch.no_grad()
def spliced_downstream_metrics(model, splice_hooks: list[tuple[str, Callable]] | Callable[[Tensor], list],
                               ablate_hooks: str | Sequence[str],
                               batches: Iterable[tuple[Tensor, Tensor]], *,
                               positions: Positions = slice(None)) -> DownstreamMetrics:
    """Clean vs spliced vs zero-ablated passes. `splice_hooks` are forward hooks, or a function
    of the batch returning them (e.g. `crosscoder_splice_hooks`); `ablate_hooks` are zeroed at
    `positions` (the tokens the dictionary replaces, so both sides of loss recovered match)."""
    ablate_hooks = [ablate_hooks] if isinstance(ablate_hooks, str) else list(ablate_hooks)

    def ablate(act: Tensor, *, hook) -> Tensor:
        return _replaced(act, positions, torch.zeros_like(act[:, _index(positions)]))

    n = 0
    ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    correct = dict.fromkeys(ce, 0)
    kl = {"spliced": 0.0, "ablated": 0.0}
    for x, labels in batches:
        logits = {
            "clean": model(x),
            "spliced": model.run_with_hooks(x, fwd_hooks=splice_hooks(x) if callable(splice_hooks) else splice_hooks),
            "ablated": model.run_with_hooks(x, fwd_hooks=[(h, ablate) for h in ablate_hooks]),
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
