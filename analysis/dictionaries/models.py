"""The four SAE architectures behind the `SparseAutoencoder` interface.

- TopK (Gao et al. 2024): the k largest ReLU pre-activations per token.
- BatchTopK (Bussmann et al. 2024): during training the k·B largest over the whole batch, so
  tokens share a budget; the trainer tracks a threshold (running mean of the smallest kept
  activation) and inference is a JumpReLU with it, which makes a token's code independent of
  the rest of its batch.
- ReLU (Conerly et al. 2024, "April update"): ReLU code, L1 penalty weighted by ‖W_dec row‖.
- JumpReLU (Rajamanoharan et al. 2024): z = pre · H(pre − θ) with a learned per-latent θ (fp32);
  θ gets a straight-through pseudo-gradient from a rectangle kernel of bandwidth ε.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from analysis.dictionaries.base import EncoderOutput, SparseAutoencoder, sparsify
from analysis.dictionaries.config import SAEConfig


class TopKSAE(SparseAutoencoder):
    architecture = "topk"

    def encode(self, x: Tensor) -> EncoderOutput:
        """TopK(ReLU(pre)). ReLU is monotone, so selecting on `pre` and applying ReLU to the k
        winners gives the same activations while touching only B*k values."""
        vals, idx = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(vals.relu(), idx)


def _jump(pre: Tensor, threshold: Tensor) -> Tensor:
    # pre > 0 as well: a threshold folded or estimated to <= 0 must not let negative values through
    return pre * ((pre > threshold) & (pre > 0))


class _ThresholdSAE(SparseAutoencoder):
    """Inference shared by BatchTopK and JumpReLU: a per-latent threshold held in fp32."""

    @property
    def threshold(self) -> Tensor:
        raise NotImplementedError

    def dense_latents(self, x: Tensor) -> Tensor:
        return _jump(self.pre_acts(x), self.threshold.to(self.W_enc.dtype))

    def encode(self, x: Tensor) -> EncoderOutput:
        return sparsify(self.dense_latents(x))


class BatchTopKSAE(_ThresholdSAE):
    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig, *, device="cpu", dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        # One value for every latent (the paper's scalar), stored per latent so inference is
        # exactly the JumpReLU code path. 0 until training estimates it (then inference = ReLU).
        self.register_buffer("inference_threshold", torch.zeros(cfg.width, device=device, dtype=torch.float32))

    @property
    def threshold(self) -> Tensor:
        return self.inference_threshold

    def _fold_thresholds(self, s: float) -> None:
        self.inference_threshold.div_(s)

    def encode_batch(self, x: Tensor) -> EncoderOutput:
        """The training-time code: the k·B largest positive pre-activations of the batch, each
        row padded with zeros to the fullest row's count."""
        pre = self.pre_acts(x)
        rows, latents, vals = batch_topk(pre, self.cfg.k)
        counts = torch.bincount(rows, minlength=len(pre))
        slot = torch.arange(len(rows), device=pre.device) - (counts.cumsum(0) - counts)[rows]
        m = max(1, int(counts.max()))  # a row of zeros when no token kept anything
        acts = pre.new_zeros(len(pre), m).index_put_((rows, slot), vals)
        idx = rows.new_zeros(len(pre), m).index_put_((rows, slot), latents)
        return EncoderOutput(acts, idx)


def batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k·B largest positive entries of a (B, width) batch, as flat pairs (rows, latents,
    values): grouped by row in increasing order, each row's pairs by decreasing value. A row
    holds anywhere from 0 to width of them.

    Exact, without a top-(k·B) over all B·width values (~3x the cost below) or a padded per-row
    top-m widened until no row fills it (a row can take hundreds of a batch's winners). The k·B-th
    largest of each row's 2k largest is a lower bound on the batch's k·B-th largest (a subset's
    k·B-th is never above the whole's); the entries at or above it are a few more than k·B,
    found in one pass, and the k·B largest of those are the answer.
    """
    B, width = pre.shape
    n_keep = min(k * B, B * width)
    bound = pre.topk(min(width, 2 * k), dim=1, sorted=False).values.reshape(-1).topk(n_keep, sorted=False).values.min()
    rows, latents = ((pre >= bound) & (pre > 0)).nonzero(as_tuple=True)
    vals = pre[rows, latents]
    if len(vals) > n_keep:
        pick = vals.topk(n_keep, sorted=False).indices.sort().values  # back in (row, latent) order
        rows, latents, vals = rows[pick], latents[pick], vals[pick]
    # by row, then by decreasing value, equal values by latent: two stable sorts (a reconstruction
    # sums each row in this order)
    order = vals.argsort(descending=True, stable=True)
    order = order[rows[order].argsort(stable=True)]
    return rows[order], latents[order], vals[order]


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    unit_norm_decoder = False  # the L1 term is weighted by the row norms instead

    def _init_decoder_norm(self) -> float:
        return 0.1  # small rows, W_enc = W_dec.T (Conerly et al. 2024)

    def dense_latents(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def encode(self, x: Tensor) -> EncoderOutput:
        return sparsify(self.dense_latents(x))


class JumpReLUSAE(_ThresholdSAE):
    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig, *, device="cpu", dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        # log θ keeps θ > 0 under any Adam step; fp32 whatever the module dtype, because a
        # threshold rounded to bf16 moves by up to 0.4 %, flipping latents near it.
        init = torch.full((cfg.width,), math.log(cfg.threshold_init), device=device, dtype=torch.float32)
        self.log_threshold = nn.Parameter(init)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def _fold_thresholds(self, s: float) -> None:
        self.log_threshold.sub_(math.log(s))

    def train_forward(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(dense code, per-latent count of the tokens it fires on) with straight-through
        gradients for θ; the counts' sum is the batch's total L0."""
        return _JumpReLUWithCounts.apply(pre, self.threshold, self.cfg.bandwidth)


class _JumpReLUWithCounts(torch.autograd.Function):
    """z = pre · H(pre − θ) and n_i = Σ_b H(pre_bi − θ_i), with the pseudo-gradients of
    Rajamanoharan et al. (2024), eqs. 11-12, under the rectangle kernel K((pre − θ)/ε)/ε:
    ∂z/∂pre = H(pre − θ), ∂z/∂θ ≈ −θ·K/ε, ∂n/∂θ ≈ −Σ_b K/ε, and no gradient from n to pre.

    One function for both outputs: the band |pre − θ| < ε/2 is found once, both θ-gradients are
    one masked reduction, and the counts are also the latents' firing counts (θ > 0, so z > 0
    exactly where pre > θ). As two functions over float masks, the elementwise passes over the
    (B, width) code took ~3x the step's matmuls on CPU."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        active = pre > theta
        # counts of up to B tokens are exact in fp32 (bf16 would round them above 256)
        return torch.where(active, pre, 0.0), active.sum(0, dtype=torch.promote_types(pre.dtype, torch.float32))

    @staticmethod
    def backward(ctx, g_z: Tensor, g_counts: Tensor):
        pre, theta = ctx.saved_tensors
        grad_pre = torch.where(pre > theta, g_z, 0.0)
        band = (pre - theta).abs_() < ctx.eps / 2
        per_pair = torch.addcmul(g_counts.to(g_z.dtype), g_z, theta)  # θ_i·g_z + g_n_i
        grad_theta = torch.where(band, per_pair, 0.0).sum(0).div_(-ctx.eps)
        return grad_pre, grad_theta.to(theta.dtype), None


SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE)
}


def build_sae(cfg: SAEConfig, *, device="cpu", dtype=torch.float32) -> SparseAutoencoder:
    """A freshly initialised SAE of the configured architecture."""
    return SAE_CLASSES[cfg.architecture](cfg, device=device, dtype=dtype)
