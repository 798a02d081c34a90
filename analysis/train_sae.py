"""Training loop for `TopKSAE` (recipe of Gao et al. 2024 / DESIGN.md §4).

- inputs scaled by s = sqrt(d_in) / mean_norm, folded back into the returned weights;
- b_dec starts at the geometric median of a sample, W_enc at W_dec.T;
- unit-norm decoder rows: the gradient component parallel to each row is removed before the
  step and the rows are renormalised after it;
- AuxK loss on latents that have not fired for `dead_tokens` tokens;
- Adam with warm-up, linear decay over the last 20 % of steps, and grad-norm clipping.

Speed: the encoder matmul is the only dense product. The gradient of the selected
pre-activations is written by hand (`_SelectedPre`) as a scatter over the B*k winners instead
of autograd's dense (B, width) backward; decoding is an embedding_bag over the k winners.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from analysis.sae import SAEConfig, TopKSAE


@dataclass(frozen=True)
class SAETrainConfig:
    """How to train one TopK SAE (the SAE's shape is `SAEConfig`, built from this + d_in)."""

    width: int
    """Number of latents."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 4096
    """Tokens per optimizer step (incoming batches are re-chunked to this size)."""
    n_train_tokens: int = 2_000_000
    """Training length in tokens; steps = n_train_tokens // batch_size."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(width / 2**14) (the paper's scaling law)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from ~0 over this many steps."""
    lr_decay: bool = True
    """Decay the learning rate linearly to 0 over the last 20 % of steps."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None means d_in // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the initial weights (training is otherwise deterministic on CPU)."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.width:
            raise ValueError(f"k={self.k} must satisfy 0 < k <= width={self.width}: lower k or raise width")
        for name in ("batch_size", "n_train_tokens", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.n_train_tokens < self.batch_size:
            raise ValueError(
                f"n_train_tokens={self.n_train_tokens} < batch_size={self.batch_size}: "
                "train for at least one full batch"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0, or None for the width-scaled default")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.aux_coef < 0:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}, aux_coef={self.aux_coef} "
                "must all be >= 0"
            )
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be > 0, or None for d_in // 2")

    @property
    def total_steps(self) -> int:
        return self.n_train_tokens // self.batch_size

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width / 2**14)

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: warm-up, flat, then linear decay to 0."""
        lr = self.base_lr()
        if self.warmup_steps > 0:
            lr *= min(1.0, (step + 1) / self.warmup_steps)
        total = self.total_steps
        decay_start = int(0.8 * total)
        if self.lr_decay and step >= decay_start:
            lr *= (total - step) / max(1, total - decay_start)
        return lr


class TrainResult(NamedTuple):
    sae: TopKSAE
    """Trained SAE with the input scale folded in: it takes RAW activations."""
    log: list[dict]
    steps: int
    tokens: int
    seconds: float


# ---- hand-written sparse gradients ----------------------------------------------------------


class _SelectedPre(torch.autograd.Function):
    """pre[b, j] for the selected (b, j) pairs, pre = (x - b_dec) @ W_enc + b_enc.

    Values come from the dense no-grad matmul; only the backward pass is written here:
    - W_enc and b_enc get a scatter into the k selected columns per token (O(B·k·d), where
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


def _sparse_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j acts[:, j] * W_dec[idx[:, j]] without bias; embedding_bag's own backward is already
    sparse in the rows it touches (faster on CPU than a hand-written scatter)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


# ---- helpers -------------------------------------------------------------------------------


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations from the mean; robust centre for b_dec."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * y.norm().clamp_min(1.0):
            y = y_new
            break
        y = y_new
    return y.float()


def _rebatch(batches: Iterable[Tensor], size: int, d_in: int, device) -> Iterator[Tensor]:
    """Exact `size`-token float32 batches from arbitrary-size ones (a trailing remainder is dropped)."""
    buf: list[Tensor] = []
    have = 0
    for b in batches:
        if b.ndim != 2 or b.shape[1] != d_in:
            raise ValueError(f"training batches must be (B, d_in={d_in}), got {tuple(b.shape)}")
        b = b.to(device=device, dtype=torch.float32)
        if have == 0 and b.shape[0] == size:
            yield b  # the common case: no copy
            continue
        buf.append(b)
        have += b.shape[0]
        while have >= size:
            cat = torch.cat(buf)
            yield cat[:size]
            rest = cat[size:]
            buf, have = ([rest] if rest.shape[0] else []), rest.shape[0]


def _normalized_sq_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (the FVU of the batch)."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


# ---- the loop ------------------------------------------------------------------------------


def train_sae(
    batches: Iterable[Tensor],
    d_in: int,
    cfg: SAETrainConfig,
    *,
    mean_norm: float,
    init_batch: Tensor,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 50,
) -> TrainResult:
    """Train a TopK SAE on (B, d_in) activation batches; see the module docstring.

    `mean_norm` is the mean L2 norm of the raw activations (from the activation store) and
    `init_batch` a sample of raw activations for the geometric-median b_dec.
    Raises RuntimeError naming the first step whose loss was not finite.
    """
    if not mean_norm > 0:
        raise ValueError(f"mean_norm={mean_norm} must be > 0 (the mean L2 norm of the activations)")
    device = init_batch.device
    scale = math.sqrt(d_in) / mean_norm
    sae_cfg = SAEConfig(d_in=d_in, width=cfg.width, k=cfg.k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(sae_cfg).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(init_batch.float().reshape(-1, d_in) * scale).to(device))

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr_at(0), betas=(0.9, 0.999), eps=6.25e-10)
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, d_in // 2)
    since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)

    log: list[dict] = []
    window: list[tuple[Tensor, Tensor, Tensor]] = []  # per-step (loss, aux, l0), checked at log time
    window_start = 0
    total = cfg.total_steps
    step = tokens = 0
    bar = tqdm(total=total, desc="train SAE", unit="step", disable=not progress)

    def flush() -> None:
        nonlocal window, window_start
        if not window:
            return
        stats = torch.stack([torch.stack(w) for w in window]).cpu()
        bad = (~torch.isfinite(stats[:, 0])).nonzero()
        if len(bad):
            raise RuntimeError(
                f"SAE training diverged: loss is not finite at step {window_start + int(bad[0])}; "
                "lower lr or check the activations for NaN/inf (keep the last good checkpoint)"
            )
        mean = stats.mean(0)
        row = {
            "step": step, "tokens": tokens, "loss": float(mean[0]), "aux_loss": float(mean[1]),
            "l0": float(mean[2]),
            # Fired on no token in the last N = min(dead_tokens, tokens seen): a run shorter than
            # the window still reports the latents it never used, instead of a flattering 0.
            "dead_fraction": float((since_fired >= min(cfg.dead_tokens, tokens)).float().mean()),
            "lr": opt.param_groups[0]["lr"],
        }
        log.append(row)
        if on_log is not None:
            on_log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", dead=f"{row['dead_fraction']:.3f}")
        window, window_start = [], step

    t0 = time.perf_counter()
    for x in _rebatch(batches, cfg.batch_size, d_in, device):
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        x = x * scale
        with torch.no_grad():
            xc = x - b_dec
            pre = torch.addmm(b_enc, xc, W_enc)
            vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        acts = _SelectedPre.apply(xc, W_enc, b_enc, b_dec, idx, vals).relu()
        x_hat = _sparse_decode(acts, idx, W_dec) + b_dec
        loss = _normalized_sq_error(x_hat, x)

        dead = since_fired >= cfg.dead_tokens
        n_dead = int(dead.sum())
        aux_loss = torch.zeros((), device=device)
        if n_dead > 0 and cfg.aux_coef > 0:
            # AuxK: the best `aux_k` dead latents try to explain the residual the live ones left,
            # which gives dead latents a gradient (Gao et al. §A.2); normalised like the main loss.
            with torch.no_grad():
                aux_vals, aux_idx = pre.masked_fill(~dead, -math.inf).topk(min(aux_k, n_dead), sorted=False)
            aux_acts = _SelectedPre.apply(xc, W_enc, b_enc, b_dec, aux_idx, aux_vals).relu()
            residual = (x - x_hat).detach()
            aux_loss = _normalized_sq_error(_sparse_decode(aux_acts, aux_idx, W_dec), residual)
        (loss + cfg.aux_coef * aux_loss).backward()

        with torch.no_grad():
            # keep the decoder on the unit sphere: drop the radial part of the gradient
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.normalize_decoder()
            fired = acts.detach() > 0
            counts = torch.zeros(cfg.width, device=device).index_add_(0, idx.reshape(-1), fired.reshape(-1).float())
            since_fired = torch.where(counts > 0, 0, since_fired + x.shape[0])
            window.append((loss.detach(), aux_loss.detach(), fired.sum(1).float().mean()))

        step += 1
        tokens += x.shape[0]
        bar.update(1)
        if step % log_every == 0:
            flush()
    flush()
    bar.close()
    seconds = time.perf_counter() - t0
    sae.zero_grad(set_to_none=True)
    return TrainResult(sae.fold_input_scale(scale), log, step, tokens, seconds)
