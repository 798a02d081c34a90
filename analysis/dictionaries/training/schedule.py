"""What every dictionary trainer shares: the run-length and optimiser fields, their validation,
and the learning-rate and sparsity-coefficient schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The fields of every family's trainer config (`SAETrainConfig`, `TranscoderTrainConfig`,
    `CrosscoderTrainConfig`); each family adds its shape (`width`, `k`, …) and sparsity fields."""

    batch_size: int = 4096
    """Tokens per optimizer step (incoming batches are re-chunked to this size)."""
    n_train_tokens: int = 2_000_000
    """Training length in tokens; steps = n_train_tokens // batch_size."""
    lr: float | None = None
    """Adam learning rate; None means 4e-4 / sqrt(width / 2**14) (`default_lr`), 4x that for TopK,
    BatchTopK and JumpReLU SAEs (`analysis.dictionaries.training.sae.LR_FACTOR`)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up from ~0 over this many steps; None means 5 % of the steps."""
    lr_decay: bool = True
    """Decay the learning rate linearly to 0 over the last 20 % of steps."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss (TopK families); None means half the reconstructed width."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (TopK families only); 0 disables it."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (and AuxK acts on it)."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the initial weights (the loop itself draws no random numbers)."""
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    """Precision of the dense matmuls. "bfloat16": TopK families choose their latents from a bf16
    encoder matmul and recompute the chosen values in fp32 (values and gradients of the chosen
    latents are fp32; near-ties at the k-th place may pick another latent); penalty
    architectures run their forward under torch.autocast. Parameters, thresholds and the loss
    stay fp32. "auto": bfloat16 on CUDA, off elsewhere. "off": fp32 throughout."""

    width: int  # every family sets it; declared here because the default lr scales with it

    def check_schedule(self) -> None:
        """Validate the shared fields; each family's __post_init__ calls it."""
        where = type(self).__name__
        for name in ("batch_size", "n_train_tokens", "dead_tokens", "width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be > 0")
        if self.n_train_tokens < self.batch_size:
            raise ValueError(f"n_train_tokens={self.n_train_tokens} < batch_size={self.batch_size}: "
                             "train for at least one full batch")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0, or None for the width-scaled default")
        if (self.warmup_steps or 0) < 0 or self.grad_clip < 0 or self.aux_coef < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}, "
                             f"aux_coef={self.aux_coef} must all be >= 0")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be > 0, or None for half the reconstructed width")
        if self.autocast not in ("auto", "off", "bfloat16"):
            raise ValueError(f"autocast={self.autocast!r} must be 'auto', 'off' or 'bfloat16'")

    def low_precision(self, device: torch.device | str) -> torch.dtype | None:
        """The dtype of the dense matmuls on `device` (None = fp32), resolving "auto"."""
        if self.autocast == "bfloat16" or (self.autocast == "auto" and torch.device(device).type == "cuda"):
            return torch.bfloat16
        return None

    @property
    def total_steps(self) -> int:
        return self.n_train_tokens // self.batch_size

    def base_lr(self) -> float:
        """`lr`, or `default_lr(width)`."""
        return self.lr if self.lr is not None else default_lr(self.width)

    def warmup(self) -> int:
        """`warmup_steps`, or 5 % of the steps (at least one)."""
        return self.warmup_steps if self.warmup_steps is not None else five_percent_of(self.total_steps)

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: warm-up, flat, then linear decay to 0."""
        return warmup_decay_lr(step, self.total_steps, self.base_lr(), self.warmup(), self.lr_decay)

    def resolved(self) -> dict:
        """The fields with the learning rate and warm-up that training uses in place of None: what
        ids hash and lineage records, so a changed default makes a new id, never a silent reuse."""
        return {**asdict(self), "lr": self.base_lr(), "warmup_steps": self.warmup()}


def default_lr(width: int) -> float:
    """4e-4 / sqrt(width / 2**14): the width scaling of Gao et al. (2024) at twice their constant.

    Their 2e-4 is fitted to runs of billions of tokens; on runs of 0.5k-2k steps, the length of
    this project's suites, twice it (with a 5 % warm-up) gave lower held-out FVU at both scales
    measured: the ground truth of benchmarks/bench_sae_peers.py (width 6144: FVU 0.199 -> 0.173;
    that ground truth then handed a seed-0 dictionary its answer at initialisation, so those two
    figures are optimistic) and the default suite's width-256 SAEs (FVU 33-41 % lower over 3
    seeds; k=8 dead 1.2-2.3 % -> 3.1-5.1 %). benchmarks/README.md has the tables. TopK, BatchTopK
    and JumpReLU SAEs default to 4x this (`analysis.dictionaries.training.sae.LR_FACTOR`): on the fixed ground
    truth they do far better."""
    return 4e-4 / math.sqrt(width / 2**14)


class PenaltySchedule:
    """Mixed into the configs of families with a sparsity penalty (SAE, crosscoder), which define
    `sparsity_warmup_steps`: λ ramps in linearly over that many steps (None: 5 % of the run)."""

    def check_sparsity_warmup(self) -> None:
        if self.sparsity_warmup_steps is not None and self.sparsity_warmup_steps < 0:
            raise ValueError(f"sparsity_warmup_steps={self.sparsity_warmup_steps} must be >= 0, "
                             "or None for 5 % of the steps")

    def sparsity_coef_at(self, step: int, coef: float) -> float:
        """Penalty weight for 0-based `step`: `coef` ramped in linearly over the warm-up."""
        warm = self.sparsity_warmup_steps
        if warm is None:
            warm = five_percent_of(self.total_steps)
        return coef * min(1.0, (step + 1) / warm) if warm > 0 else coef


def five_percent_of(total_steps: int) -> int:
    """The default length of every ramp (learning-rate and penalty warm-ups): 5 % of the run."""
    return max(1, total_steps // 20)


def warmup_decay_lr(step: int, total: int, base_lr: float, warmup: int, decay: bool = True) -> float:
    """Learning rate for 0-based `step`: linear warm-up, flat, then linear decay to 0 over the last 20%."""
    lr = base_lr
    if warmup > 0:
        lr *= min(1.0, (step + 1) / warmup)
    decay_start = int(0.8 * total)
    if decay and step >= decay_start:
        lr *= (total - step) / max(1, total - decay_start)
    return lr


@torch.no_grad()
def remove_parallel_grad(W: torch.nn.Parameter) -> None:
    """Keep unit-norm rows on the sphere: drop each row's gradient component along the row."""
    # row dot products without a (rows, d) temporary, then one in-place update
    W.grad.addcmul_(W, torch.linalg.vecdot(W.grad, W).unsqueeze(1), value=-1)


@torch.no_grad()
def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimizer tensor its parameter's memory layout.

    A loaded state dict comes back contiguous while a fresh state follows the parameter's
    strides (zeros_like); fused Adam takes another code path, with other rounding, when the
    two differ, so a resumed run would drift from an uninterrupted one.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
