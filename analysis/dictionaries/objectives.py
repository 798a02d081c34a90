"""One training forward pass per architecture, on inputs already scaled to mean norm sqrt(d).

TopK and BatchTopK keep the encoder matmul as the only dense product: the gradient of the
selected pre-activations is written by hand (`SelectedPre`) as a scatter over the chosen
(token, latent) pairs instead of autograd's dense (B, width) backward, and decoding is an
embedding_bag over those pairs. ReLU and JumpReLU codes are dense by nature during training
(early on most latents are active), so they use plain autograd with a dense decode.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.dictionaries.base import SparseAutoencoder
from analysis.dictionaries.models import batch_topk


class TrainForward(NamedTuple):
    x_hat: Tensor
    """(B, d) reconstruction of the scaled input (differentiable)."""
    penalty: Tensor
    """Scalar: sum over tokens of the unweighted sparsity penalty (0 for TopK/BatchTopK)."""
    fire_counts: Tensor
    """(width,) float count of tokens on which each latent fired."""
    l0: Tensor
    """Scalar: mean nonzero latents per token."""
    pre: Tensor | None
    """(B, width) no-grad pre-activations (TopK families, for AuxK)."""
    xc: Tensor | None
    """(B, d) x − b_dec (TopK families, for AuxK)."""
    min_kept: Tensor | None
    """BatchTopK: smallest selected activation of the batch (the threshold estimate)."""


class SelectedPre(torch.autograd.Function):
    """pre[b, j] for selected (b, j) pairs, pre = (x - b_dec) @ W_enc + b_enc.

    Values come from the dense no-grad matmul; only the backward pass is written here:
    - W_enc and b_enc get a scatter into the selected columns per token (O(B·m·d), where
      autograd's dense backward costs two (B, width, d) matmuls);
    - b_dec enters every token the same way, so its gradient collapses to -W_enc @ grad_b_enc,
      one mat-vec instead of a per-token gather.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W_enc, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W_enc, idx = ctx.saved_tensors
        d, width = W_enc.shape
        flat = idx.reshape(-1)
        rows = (g.unsqueeze(-1) * xc.unsqueeze(1)).reshape(-1, d)
        grad_w = xc.new_zeros(width, d).index_add_(0, flat, rows).T  # (d, width), width-contiguous
        grad_b = g.new_zeros(width).index_add_(0, flat, g.reshape(-1))
        return None, grad_w, grad_b, -(W_enc @ grad_b), None, None


def sparse_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j acts[:, j] * W_dec[idx[:, j]] without bias; embedding_bag's own backward is already
    sparse in the rows it touches (faster on CPU than a hand-written scatter)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


def _counts(width: int, idx: Tensor, fired: Tensor) -> Tensor:
    return fired.new_zeros(width, dtype=torch.float32).index_add_(0, idx.reshape(-1), fired.reshape(-1).float())


def train_forward(sae: SparseAutoencoder, x: Tensor) -> TrainForward:
    arch, width = sae.cfg.architecture, sae.cfg.width
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    zero = x.new_zeros(())
    if arch in ("topk", "batchtopk"):
        with torch.no_grad():
            xc = x - b_dec
            pre = torch.addmm(b_enc, xc, W_enc)
            if arch == "topk":
                vals, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
                keep = None
            else:
                vals, idx, keep = batch_topk(pre, sae.cfg.k)
        acts = SelectedPre.apply(xc, W_enc, b_enc, b_dec, idx, vals).relu()
        min_kept = None
        if keep is not None:
            acts = acts * keep  # unselected slots: value and gradient 0
            min_kept = vals[keep].min() if bool(keep.any()) else None
        x_hat = sparse_decode(acts, idx, W_dec) + b_dec
        fired = acts.detach() > 0
        return TrainForward(x_hat, zero, _counts(width, idx, fired), fired.sum(1).float().mean(), pre, xc, min_kept)

    pre = torch.addmm(b_enc, x - b_dec, W_enc)
    if arch == "relu":
        z = pre.relu()
        penalty = (z @ W_dec.norm(dim=1)).sum()  # Σ_tokens Σ_i z_i ‖W_dec,i‖
    elif arch == "jumprelu":
        z, l0_tokens = sae.train_forward(pre)
        penalty = l0_tokens.sum()
    else:  # SAEConfig validates the name; a new architecture must be added here
        raise ValueError(f"no training forward for architecture={arch!r}")
    fired = z.detach() > 0
    x_hat = torch.addmm(b_dec, z, W_dec)
    return TrainForward(x_hat, penalty, fired.sum(0).float(), fired.sum(1).float().mean(), None, None, None)


def auxk_loss(sae: SparseAutoencoder, fwd: TrainForward, x: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK (Gao et al. §A.2): the best `aux_k` dead latents try to explain the residual the live
    ones left, which gives dead latents a gradient; normalised like the main loss."""
    n_dead = int(dead.sum())
    with torch.no_grad():
        aux_vals, aux_idx = fwd.pre.masked_fill(~dead, -math.inf).topk(min(aux_k, n_dead), sorted=False)
    aux_acts = SelectedPre.apply(fwd.xc, sae.W_enc, sae.b_enc, sae.b_dec, aux_idx, aux_vals).relu()
    residual = (x - fwd.x_hat).detach()
    return normalized_sq_error(sparse_decode(aux_acts, aux_idx, sae.W_dec), residual)


def normalized_sq_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (the FVU of the batch)."""
    return (x_hat - x).pow(2).sum() / batch_variance(x)


def batch_variance(x: Tensor) -> Tensor:
    return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
