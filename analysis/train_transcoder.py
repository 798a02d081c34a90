"""Training and evaluation of TopK transcoders (hook A -> hook B), DESIGN.md §4 recipe.

- x_in scaled by s_in = sqrt(d_in)/mean_norm_in and y by s_out = sqrt(d_out)/mean_norm_out,
  folded back into the returned weights (`TopKTranscoder.fold_scales`);
- b_in starts at the geometric median of the x_in sample, b_dec at that of y;
- unit-norm decoder rows: the gradient parallel to each row is removed before the step and the
  rows renormalised after it;
- Adam with linear warm-up, linear decay over the last 20 % of steps, grad-norm clipping;
- loss = Σ‖ŷ − y‖² / Σ‖y − mean_batch(y)‖² (the batch FVU of the target).

Plain autograd for now (no sparse backward, no AuxK).
"""

from __future__ import annotations

import math
import time
from typing import Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.activations import chan_merge
from analysis.dictionaries.transcoder import TopKTranscoder, TranscoderConfig
from analysis.optim import remove_parallel_grad, warmup_decay_lr
from analysis.train_sae import geometric_median


class TranscoderTrainResult(NamedTuple):
    transcoder: TopKTranscoder
    """Trained transcoder with both scales folded in: takes RAW x_in, predicts RAW y."""
    log: list[dict]
    """Per-`log_every` rows: step, tokens, loss (batch FVU), l0, dead_fraction, lr."""
    steps: int
    tokens: int
    seconds: float


def _check_pair(x: Tensor, y: Tensor, cfg: TranscoderConfig) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"batches must be (x_in (B, d_in), y (B, d_out)), got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[1] != cfg.d_in or y.shape[1] != cfg.d_out:
        raise ValueError(
            f"activation widths x_in={x.shape[1]}, y={y.shape[1]} do not match the transcoder's "
            f"d_in={cfg.d_in}, d_out={cfg.d_out}: build TranscoderConfig from the two stores' d_model"
        )


def train_transcoder(
    batches: Iterable[tuple[Tensor, Tensor]],
    cfg: TranscoderConfig,
    *,
    mean_norm_in: float,
    mean_norm_out: float,
    init_batch: tuple[Tensor, Tensor],
    n_train_tokens: int,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    log_every: int = 50,
) -> TranscoderTrainResult:
    """Train a TopK transcoder on aligned (x_in, y) batches (e.g. a `PairedShuffledLoader`).

    `mean_norm_in/out` are the raw activations' mean L2 norms (store stats), `init_batch` a raw
    (x_in, y) sample for the bias inits. Training stops after `n_train_tokens` tokens; the
    schedule's step count is n_train_tokens // (first batch size). `lr` None means
    2e-4 / sqrt(width / 2**14); `warmup_steps` None means 5 % of the steps.
    Raises RuntimeError naming the first step whose loss is not finite.
    """
    for name, v in (("mean_norm_in", mean_norm_in), ("mean_norm_out", mean_norm_out)):
        if not v > 0:
            raise ValueError(f"{name}={v} must be > 0 (the mean L2 norm of the raw activations)")
    if n_train_tokens < 1:
        raise ValueError(f"n_train_tokens={n_train_tokens} must be > 0")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr={lr} must be > 0, or None for the width-scaled default")
    x0, y0 = init_batch
    _check_pair(x0, y0, cfg)
    device = x0.device
    s_in, s_out = math.sqrt(cfg.d_in) / mean_norm_in, math.sqrt(cfg.d_out) / mean_norm_out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tc = TopKTranscoder(cfg).to(device)
    with torch.no_grad():
        tc.b_in.copy_(geometric_median(x0.float() * s_in).to(device))
        tc.b_dec.copy_(geometric_median(y0.float() * s_out).to(device))
    base_lr = lr if lr is not None else 2e-4 / math.sqrt(cfg.width / 2**14)
    params = list(tc.parameters())
    opt = torch.optim.Adam(params, lr=base_lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)

    log: list[dict] = []
    window: list[Tensor] = []
    step = tokens = 0
    total = None
    bar = tqdm(total=n_train_tokens, desc="train transcoder", unit="tok", unit_scale=True, disable=not progress)

    def lr_at(step: int) -> float:
        warm = warmup_steps if warmup_steps is not None else max(1, total // 20)
        return warmup_decay_lr(step, total, base_lr, warm)

    def flush() -> None:
        nonlocal window
        if not window:
            return
        stats = torch.stack(window).cpu()
        bad = (~torch.isfinite(stats[:, 0])).nonzero()
        if len(bad):
            raise RuntimeError(
                f"transcoder training diverged: loss is not finite at step {step - len(window) + int(bad[0])}; "
                "lower lr or check the activations for NaN/inf")
        mean = stats.mean(0)
        row = {"step": step, "tokens": tokens, "loss": float(mean[0]), "l0": float(mean[1]),
               "dead_fraction": float((since_fired >= tokens).float().mean()),
               "lr": opt.param_groups[0]["lr"]}
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", dead=f"{row['dead_fraction']:.3f}")
        window = []

    t0 = time.perf_counter()
    for x, y in batches:
        if tokens >= n_train_tokens:
            break
        _check_pair(x, y, cfg)
        if total is None:
            total = max(1, n_train_tokens // x.shape[0])
        for group in opt.param_groups:
            group["lr"] = lr_at(min(step, total - 1))
        x = x.to(device, torch.float32) * s_in
        y = y.to(device, torch.float32) * s_out
        out = tc(x)
        loss = (out.y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss.backward()
        with torch.no_grad():
            remove_parallel_grad(tc.W_dec)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tc.normalize_decoder()
            fired = torch.zeros(cfg.width, dtype=torch.bool, device=device)
            fired[out.top_indices[out.top_acts > 0]] = True
            since_fired = torch.where(fired, 0, since_fired + x.shape[0])
            window.append(torch.stack([loss.detach(), (out.top_acts > 0).sum(1).float().mean()]))
        step += 1
        tokens += x.shape[0]
        bar.update(x.shape[0])
        if step % log_every == 0:
            flush()
    if step == 0:
        raise ValueError("batches yielded nothing: pass a non-empty (x_in, y) stream")
    flush()
    bar.close()
    tc.zero_grad(set_to_none=True)
    return TranscoderTrainResult(tc.fold_scales(s_in, s_out), log, step, tokens, time.perf_counter() - t0)


@torch.no_grad()
def transcoder_metrics(tc: TopKTranscoder, paired_batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(L0, FVU_out) over an evaluation stream of raw (x_in, y) batches (DESIGN.md §4).

    FVU = Σ‖y − ŷ‖² / Σ‖y − μ_y‖², μ_y the per-dimension mean of the evaluation targets; the
    denominator is merged per batch in float64 (Chan et al.), never variance-from-zero.
    """
    n, mean, m2 = 0, None, None
    err = 0.0
    active = 0
    dev = tc.W_dec.device
    for x, y in paired_batches:
        _check_pair(x, y, tc.cfg)
        x, y = x.to(dev, torch.float32), y.to(dev, torch.float32)
        out = tc(x)
        err += float((out.y_hat.double() - y.double()).pow(2).sum())
        active += int((out.top_acts != 0).sum())
        yd = y.double()
        b_mean = yd.mean(0)
        b_m2 = (yd - b_mean).pow(2).sum(0)
        if mean is None:
            n, mean, m2 = y.shape[0], b_mean, b_m2
        else:
            n, mean, m2 = chan_merge(n, mean, m2, y.shape[0], b_mean, b_m2)
    if n == 0:
        raise ValueError("paired_batches yielded nothing: pass a non-empty evaluation stream")
    return active / n, err / max(float(m2.sum()), 1e-300)
