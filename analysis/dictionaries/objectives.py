"""One training forward pass per architecture, on inputs already scaled to mean norm sqrt(d).

TopK and BatchTopK keep the encoder matmul as the only dense product. Everything after the
selection touches only the chosen (token, latent) pairs:
- the gradient of the selected pre-activations (`SelectedPre`) and of the decoder
  (`SparseDecode`) are written by hand: each weight gradient is one embedding_bag over the
  pairs sorted by latent (`scatter_rows`), each per-pair gradient one fused gathered dot
  product (`gathered_dot`); autograd's dense (B, width) backward never runs;
- with `low_precision` (bf16) the dense matmul only *chooses* the latents; the chosen values are
  recomputed in fp32 by `gathered_dot`, so every value and gradient of a selected latent is the
  fp32 one (only near-ties at the k-th place can pick a different latent).
JumpReLU takes the same sparse path (`jumprelu_forward`) while at most 1/16 of its pairs fire.
A ReLU code is dense by nature during training (early on most latents are active), so ReLU, and
a JumpReLU step above that fill, use plain autograd with a dense decode, under torch.autocast
when `low_precision` is set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.dictionaries.base import SparseAutoencoder
from analysis.dictionaries.models import batch_topk


class TrainForward(NamedTuple):
    x_hat: Tensor
    """(B, d) fp32 reconstruction of the scaled input (differentiable)."""
    penalty: Tensor
    """Scalar fp32: sum over tokens of the unweighted sparsity penalty (0 for TopK/BatchTopK)."""
    fire_counts: Tensor
    """(width,) float count of tokens on which each latent fired."""
    l0: Tensor
    """Scalar: mean nonzero latents per token."""
    pre: Tensor | None
    """(B, width) no-grad pre-activations used to choose latents (TopK families, for AuxK);
    bf16 under `low_precision`."""
    xc: Tensor | None
    """(B, d) x − b_dec (TopK families, for AuxK)."""
    min_kept: Tensor | None
    """BatchTopK: smallest selected activation of the batch (the threshold estimate)."""


# ---- sparse products over (token, latent) pairs --------------------------------------------


class Ragged(NamedTuple):
    """A varying number of pairs per token, as embedding_bag takes it: the pairs of token b are
    positions offsets[b] to offsets[b + 1] (the last to the end) of the flat (N,) ids, and
    rows[p] is the token of pair p. BatchTopK's code is ragged: a batch at k = 16 averages 16
    pairs per token, but its fullest token holds over a hundred, and padding every token to that
    made the sparse products ~10x larger."""

    offsets: Tensor
    rows: Tensor

    @classmethod
    def from_rows(cls, rows: Tensor, n_rows: int) -> Ragged:
        """The layout of flat pairs whose tokens `rows` are in increasing order."""
        counts = torch.bincount(rows, minlength=n_rows)
        return cls(counts.cumsum(0) - counts, rows)


def gathered_dot(table: Tensor, idx: Tensor, vecs: Tensor, ragged: Ragged | None = None) -> Tensor:
    """out[b, j] = table[idx[b, j]] · vecs[b] for an (n, d) table, (B, m) ids and (B, d) vectors
    (with `ragged`: out[p] = table[idx[p]] · vecs[rows[p]] for flat (N,) ids).

    This is exactly the gradient of embedding_bag's per-sample weights, which torch computes
    with a fused kernel reading each table row in place; indexing `table[idx]` first would
    materialise (B, m, d) rows (200 MB at B=4096, m=32, d=384) and run ~8x slower.
    """
    offsets = None if ragged is None else ragged.offsets
    with torch.enable_grad():
        w = torch.zeros(idx.shape, dtype=vecs.dtype, device=vecs.device, requires_grad=True)
        bags = F.embedding_bag(idx, table.detach(), offsets, per_sample_weights=w, mode="sum")
        (out,) = torch.autograd.grad(bags, w, vecs)
    return out


def scatter_rows(idx: Tensor, weights: Tensor, vecs: Tensor, n: int, ragged: Ragged | None = None) -> Tensor:
    """(n, d) out[i] = Σ over pairs with idx[b, j] = i of weights[b, j] · vecs[b] (with `ragged`,
    flat pairs p of token rows[p]).

    Sorted by latent, the pairs of latent i are one bag of token rows, so the whole product is
    a single embedding_bag that writes each output row once (an index_add would first build
    and then scatter a (B·m, d) tensor of scaled rows).
    """
    flat = idx.reshape(-1)
    order = flat.sort(stable=True).indices  # stable: a fixed summation order within each bag
    counts = torch.bincount(flat, minlength=n)
    offsets = counts.cumsum(0) - counts
    tokens = order // idx.shape[1] if ragged is None else ragged.rows[order]
    return F.embedding_bag(tokens, vecs, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")


class SelectedPre(torch.autograd.Function):
    """pre[b, j] for selected (b, j) pairs, pre = (x - b_dec) @ W_enc + b_enc.

    Values are given (from the no-grad selection); only the backward pass is written here:
    - W_enc and b_enc get the per-pair gradient scattered into the selected latents only;
    - b_dec enters every token the same way, so its gradient collapses to -W_enc @ grad_b_enc,
      one mat-vec instead of a per-token gather.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, idx: Tensor, vals: Tensor,
                ragged: Ragged | None = None) -> Tensor:
        ctx.save_for_backward(xc, W_enc, idx)
        ctx.ragged = ragged
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W_enc, idx = ctx.saved_tensors
        width = W_enc.shape[1]
        grad_w = scatter_rows(idx, g, xc, width, ctx.ragged).T  # (d, width) view of a width-major tensor, like W_enc
        grad_b = g.new_zeros(width).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return None, grad_w, grad_b, -(W_enc @ grad_b), None, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j acts[:, j] · W_dec[idx[:, j]] (no bias) with a backward over the selected rows only:
    torch's own embedding_bag weight gradient sorts and scatter-adds through a dense path
    that costs ~5x `scatter_rows` at training sizes."""

    @staticmethod
    def forward(ctx, acts: Tensor, idx: Tensor, W_dec: Tensor, ragged: Ragged | None) -> Tensor:
        ctx.save_for_backward(acts, idx, W_dec)
        ctx.ragged = ragged
        offsets = None if ragged is None else ragged.offsets
        return F.embedding_bag(idx, W_dec, offsets, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        acts, idx, W_dec = ctx.saved_tensors
        grad_acts = gathered_dot(W_dec, idx, g, ctx.ragged) if ctx.needs_input_grad[0] else None
        grad_w = scatter_rows(idx, acts, g, W_dec.shape[0], ctx.ragged) if ctx.needs_input_grad[2] else None
        return grad_acts, None, grad_w, None


def sparse_decode(acts: Tensor, idx: Tensor, W_dec: Tensor, ragged: Ragged | None = None) -> Tensor:
    """sum_j acts[:, j] * W_dec[idx[:, j]] without bias (differentiable in acts and W_dec); with
    `ragged`, the (B, d) sums of each token's flat pairs."""
    return SparseDecode.apply(acts, idx, W_dec, ragged)


def exact_selected(xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, ragged: Ragged | None = None) -> Tensor:
    """fp32 pre-activations of the selected pairs: xc[b] · W_enc[:, idx[b, j]] + b_enc[idx[b, j]]."""
    return gathered_dot(W_enc.T, idx, xc, ragged) + b_enc[idx]


def _counts(width: int, idx: Tensor, fired: Tensor) -> Tensor:
    return fired.new_zeros(width, dtype=torch.float32).index_add_(0, idx.reshape(-1), fired.reshape(-1).float())


# ---- forward passes ------------------------------------------------------------------------


class TopKWeights(NamedTuple):
    """The tensors a TopK-family training step reads:
    pre = (x − center) @ W_enc + b_enc, x̂ = TopK(pre) @ W_dec + b_dec.
    An SAE centres on its decoder bias (center is b_dec); a transcoder has its own input centre."""

    W_enc: Tensor
    b_enc: Tensor
    center: Tensor
    W_dec: Tensor
    b_dec: Tensor


def sae_weights(sae) -> TopKWeights:
    """An SAE (or a TopK crosscoder over its concatenated layers) as TopK weights."""
    return TopKWeights(sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec, sae.b_dec)


def train_forward(sae: SparseAutoencoder, x: Tensor, *, low_precision: torch.dtype | None = None,
                  reuse: Tensor | None = None) -> TrainForward:
    """Training forward of `sae` on scaled fp32 inputs; `low_precision` (e.g. torch.bfloat16)
    runs the dense matmuls in that dtype, see the module docstring.

    `reuse`: the previous step's `pre` (TopK families), overwritten with this step's. A fresh
    (B, width) tensor (100 MB at B=4096, width 6144) costs the kernel a page fault per 4 kB on
    first touch, ~15 % of a CPU step; a warm one costs nothing."""
    arch = sae.cfg.architecture
    if arch in ("topk", "batchtopk"):
        return topk_forward(sae_weights(sae), x, sae.cfg.k, batch=arch == "batchtopk",
                            low_precision=low_precision, reuse=reuse)
    if arch == "jumprelu":
        fwd = jumprelu_forward(sae, x, reuse=reuse)
        if fwd is not None:
            return fwd
    with torch.autocast(x.device.type, dtype=low_precision or torch.bfloat16, enabled=low_precision is not None):
        return _dense_forward(sae, x)


def topk_forward(w: TopKWeights, x: Tensor, k: int, *, batch: bool = False,
                 low_precision: torch.dtype | None = None, reuse: Tensor | None = None) -> TrainForward:
    """TopK (or, with `batch`, BatchTopK) training forward with the sparse backward of the module
    docstring; `x_hat` has no skip path (a transcoder adds its own)."""
    W_enc, b_enc, W_dec = w.W_enc, w.b_enc, w.W_dec
    dtype = low_precision or x.dtype
    width = W_enc.shape[1]
    shape = (x.shape[0], width)
    out = reuse if reuse is not None and reuse.shape == shape and reuse.dtype == dtype else None
    with torch.no_grad():
        xc = x - w.center
        # with low precision the matmul only chooses the latents; their fp32 values are recomputed below
        pre = torch.addmm(b_enc.to(dtype), xc.to(dtype), W_enc.to(dtype), out=out)
        ragged = None
        if batch:
            rows, idx, vals = batch_topk(pre, k)
            ragged = Ragged.from_rows(rows, len(pre))
        else:
            vals, idx = pre.topk(k, dim=-1, sorted=False)
        if low_precision is not None:
            vals = exact_selected(xc, W_enc, b_enc, idx, ragged)
    acts = SelectedPre.apply(xc, W_enc, b_enc, w.center, idx, vals, ragged).relu()
    min_kept = None
    if batch:
        positive = vals[vals > 0]  # an fp32 recomputation can put a bf16-chosen pair at or below 0
        min_kept = positive.min() if len(positive) else None
    x_hat = sparse_decode(acts, idx, W_dec, ragged) + w.b_dec
    fired = acts.detach() > 0
    return TrainForward(x_hat, x.new_zeros(()), _counts(width, idx, fired), fired.sum().float() / x.shape[0],
                        pre, xc, min_kept)


SPARSE_JUMPRELU_MAX_FILL = 1 / 16
"""A JumpReLU step takes the sparse path while at most this fraction of its (token, latent) pairs
fire (L0 128 of 2048 latents); above it, the dense products are cheaper than gathering pairs."""


def jumprelu_forward(sae: SparseAutoencoder, x: Tensor, *, reuse: Tensor | None = None) -> TrainForward | None:
    """JumpReLU's training forward over its firing pairs only, like TopK's: the encoder matmul is
    the one dense product. None when more than `SPARSE_JUMPRELU_MAX_FILL` of the pairs fire.

    The code z = pre · H(pre − θ) is the pre-activations of the pairs above θ (`SelectedPre`), and
    the threshold pseudo-gradients of `_JumpReLUWithCounts` need ∂loss/∂z only on the pairs in
    the kernel's band, |pre − θ| < ε/2, which `_ThresholdBand` gathers from ∂loss/∂x̂. Same
    gradients as the dense path up to summation order (tests/test_sae_objectives.py)."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    theta = sae.threshold
    width = W_enc.shape[1]
    out = reuse if reuse is not None and reuse.shape == (x.shape[0], width) and reuse.dtype == x.dtype else None
    with torch.no_grad():
        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, W_enc, out=out)
        th = theta.detach().to(pre.dtype)
        active = pre > th
        if int(active.sum()) > SPARSE_JUMPRELU_MAX_FILL * active.numel():
            return None
        rows, idx = active.nonzero(as_tuple=True)
        vals = pre[rows, idx]
        band_rows, band_idx = ((pre - th).abs_() < sae.cfg.bandwidth / 2).nonzero(as_tuple=True)
        counts = torch.bincount(idx, minlength=width).to(torch.promote_types(pre.dtype, torch.float32))
    ragged = Ragged.from_rows(rows, len(x))
    z = SelectedPre.apply(xc, W_enc, b_enc, b_dec, idx, vals, ragged)
    decoded, counts = _ThresholdBand.apply(sparse_decode(z, idx, W_dec, ragged), counts, theta, W_dec.detach(),
                                           band_idx, Ragged.from_rows(band_rows, len(x)), sae.cfg.bandwidth)
    return TrainForward((decoded + b_dec).float(), counts.sum().float(), counts.detach(),
                        counts.detach().sum() / x.shape[0], pre, xc, None)


class _ThresholdBand(torch.autograd.Function):
    """Identity on the decoded code and the firing counts, whose backward also gives θ its
    pseudo-gradients (Rajamanoharan et al. 2024, eqs. 11-12, rectangle kernel of width ε):
    ∂L/∂θ_i = −(1/ε) Σ over band pairs (b, i) of (θ_i · ∂L/∂z_bi + ∂L/∂n_i), where
    ∂L/∂z_bi = ∂L/∂x̂_b · W_dec[i], gathered for the band pairs only."""

    @staticmethod
    def forward(ctx, decoded: Tensor, counts: Tensor, theta: Tensor, W_dec: Tensor, band_idx: Tensor,
                band: Ragged, eps: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(theta, W_dec, band_idx)
        ctx.band, ctx.eps = band, eps
        return decoded.clone(), counts.clone()

    @staticmethod
    def backward(ctx, g_decoded: Tensor, g_counts: Tensor):
        theta, W_dec, band_idx = ctx.saved_tensors
        g_z = gathered_dot(W_dec, band_idx, g_decoded, ctx.band)
        per_pair = torch.addcmul(g_counts.to(g_z.dtype)[band_idx], g_z, theta.to(g_z.dtype)[band_idx])
        grad_theta = torch.zeros_like(theta).index_add_(0, band_idx, per_pair.to(theta.dtype)).div_(-ctx.eps)
        return g_decoded, None, grad_theta, None, None, None, None


def _dense_forward(sae: SparseAutoencoder, x: Tensor) -> TrainForward:
    arch = sae.cfg.architecture
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    # JumpReLU's encoder stays fp32 under autocast: bf16 rounds pre in steps of 2^-6 at values
    # 2-4, a third of the default kernel width ε = 0.05, which moved the threshold
    # pseudo-gradient by 12 % in tests/test_sae_objectives.py's autocast case
    with torch.autocast(x.device.type, enabled=arch != "jumprelu" and torch.is_autocast_enabled(x.device.type)):
        pre = torch.addmm(b_enc, x - b_dec, W_enc)
    if arch == "relu":
        z = pre.relu()
        penalty = (z @ W_dec.norm(dim=1)).sum()  # Σ_tokens Σ_i z_i ‖W_dec,i‖
        fire_counts = (z.detach() > 0).sum(0, dtype=torch.float32)
    elif arch == "jumprelu":
        z, counts = sae.train_forward(pre)
        penalty = counts.sum()  # Σ_tokens L0
        fire_counts = counts.detach()
    else:  # SAEConfig validates the name; a new architecture must be added here
        raise ValueError(f"no training forward for architecture={arch!r}")
    x_hat = torch.addmm(b_dec, z, W_dec)
    # the loss and its reductions stay fp32 whatever precision the matmuls ran in
    return TrainForward(x_hat.float(), penalty.float(), fire_counts, fire_counts.sum() / x.shape[0],
                        None, None, None)


def auxk_loss(w: TopKWeights, fwd: TrainForward, target: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK (Gao et al. §A.2): the best `aux_k` dead latents try to explain the residual the live
    ones left (target − x̂), which gives dead latents a gradient; normalised like the main loss.

    Only the dead columns of `pre` are searched (a gather of n_dead columns, instead of a
    masked copy of the whole (B, width) tensor); values are recomputed in fp32 when `pre` was
    a low-precision selection."""
    with torch.no_grad():
        dead_ids = dead.nonzero().squeeze(1)
        cand = fwd.pre if len(dead_ids) == dead.numel() else fwd.pre.index_select(1, dead_ids)
        aux_vals, pos = cand.topk(min(aux_k, len(dead_ids)), dim=-1, sorted=False)
        aux_idx = dead_ids[pos]
        if aux_vals.dtype != fwd.xc.dtype:
            aux_vals = exact_selected(fwd.xc, w.W_enc, w.b_enc, aux_idx)
    aux_acts = SelectedPre.apply(fwd.xc, w.W_enc, w.b_enc, w.center, aux_idx, aux_vals).relu()
    residual = (target - fwd.x_hat).detach()
    return normalized_sq_error(sparse_decode(aux_acts, aux_idx, w.W_dec), residual)


def normalized_sq_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (the FVU of the batch)."""
    return (x_hat - x).pow(2).sum() / batch_variance(x)


def batch_variance(x: Tensor) -> Tensor:
    return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
