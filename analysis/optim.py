"""Optimisation pieces shared by every dictionary trainer (SAEs, transcoders)."""

from __future__ import annotations

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
    W.grad -= (W.grad * W).sum(1, keepdim=True) * W
