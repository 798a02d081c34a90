"""Optimisation pieces shared by every dictionary trainer (SAEs, transcoders, crosscoders)."""

from __future__ import annotations

import math

import torch


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


def check_run_length(cfg) -> None:
    """The fields every trainer config has: batch_size, n_train_tokens and dead_tokens > 0, at
    least one full batch, and lr > 0 or None (the width-scaled default)."""
    where = type(cfg).__name__
    for name in ("batch_size", "n_train_tokens", "dead_tokens"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{where}.{name}={getattr(cfg, name)} must be > 0")
    if cfg.n_train_tokens < cfg.batch_size:
        raise ValueError(f"n_train_tokens={cfg.n_train_tokens} < batch_size={cfg.batch_size}: "
                         "train for at least one full batch")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr={cfg.lr} must be > 0, or None for the width-scaled default")


class TrainSchedule:
    """What the SAE and crosscoder trainer configs share: validation of the common fields and the
    learning-rate / sparsity-coefficient schedules. Mixed into frozen dataclasses that define
    width, lr, batch_size, n_train_tokens, warmup_steps, lr_decay, grad_clip, aux_coef, aux_k,
    dead_tokens, sparsity_warmup_steps and autocast."""

    def check_schedule(self) -> None:
        check_run_length(self)
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.aux_coef < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}, "
                             f"aux_coef={self.aux_coef} must all be >= 0")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be > 0, or None for half the input width")
        if self.sparsity_warmup_steps is not None and self.sparsity_warmup_steps < 0:
            raise ValueError(f"sparsity_warmup_steps={self.sparsity_warmup_steps} must be >= 0, or None for 5 %")
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
        """`lr`, or 2e-4 / sqrt(width / 2**14) (Gao et al.'s scaling with width)."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width / 2**14)

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: warm-up, flat, then linear decay to 0."""
        return warmup_decay_lr(step, self.total_steps, self.base_lr(), self.warmup_steps, self.lr_decay)

    def sparsity_coef_at(self, step: int, coef: float) -> float:
        """Penalty weight for 0-based `step`: `coef` ramped in linearly over the warm-up."""
        warm = self.sparsity_warmup_steps
        if warm is None:
            warm = max(1, self.total_steps // 20)
        return coef * min(1.0, (step + 1) / warm) if warm > 0 else coef
