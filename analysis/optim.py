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

