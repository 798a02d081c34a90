"""Training and evaluation of TopK transcoders (hook A -> hook B), DESIGN.md §4 recipe.

- x_in scaled by s_in = sqrt(d_in)/mean_norm_in and y by s_out = sqrt(d_out)/mean_norm_out,
  folded back into the returned weights (`TopKTranscoder.fold_scales`);
- b_in starts at the geometric median of the x_in sample, b_dec at that of y;
- unit-norm decoder rows: the gradient parallel to each row is removed before the step and the
  rows renormalised after it;
- Adam with linear warm-up, linear decay over the last 20 % of steps, grad-norm clipping;
- loss = Σ‖ŷ − y‖² / Σ‖y − mean_batch(y)‖² (the batch FVU of the target);
- with `checkpoint_dir`, the whole training state is saved every `checkpoint_every` steps and a
  rerun resumes from it to the same final weights (analysis.dictionaries.resume).

Plain autograd (no sparse backward, no AuxK).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.dictionaries.resume import load_train_state, save_train_state
from analysis.dictionaries.transcoder import TopKTranscoder, TranscoderConfig
from analysis.evaluation.metrics import prediction_metrics
from analysis.dictionaries.training.schedule import check_run_length, remove_parallel_grad, warmup_decay_lr
from analysis.dictionaries.training.sae import geometric_median


@dataclass(frozen=True)
class TranscoderTrainConfig:
    """How a suite trains its transcoders (the shape comes from the grid: width, k, skip)."""

    batch_size: int = 4096
    """Tokens per optimizer step."""
    n_train_tokens: int = 2_000_000
    """Training length in tokens."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(width / 2**14)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up; None means 5 % of the steps."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead in the log."""

    def __post_init__(self) -> None:
        check_run_length(self)
        if self.grad_clip < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError(f"grad_clip={self.grad_clip} and warmup_steps={self.warmup_steps} must be >= 0")


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
    dead_tokens: int | None = None,
    on_log: Callable[[dict], None] | None = None,
    eval_batch: tuple[Tensor, Tensor] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
) -> TranscoderTrainResult:
    """Train a TopK transcoder on aligned (x_in, y) batches (e.g. a `PairedShuffledLoader`).

    `mean_norm_in/out` are the raw activations' mean L2 norms (store stats), `init_batch` a raw
    (x_in, y) sample for the bias inits. Training stops after `n_train_tokens` tokens; the
    schedule's step count is n_train_tokens // (first batch size). `lr` None means
    2e-4 / sqrt(width / 2**14); `warmup_steps` None means 5 % of the steps.
    With `eval_batch` (raw held-out (x_in, y)), every log row also carries `eval_fvu` (of y,
    against the held-out mean) and `eval_l0` on it. A latent counts as dead in the log when it has not fired for `dead_tokens` tokens (None: for
    the whole run). Raises RuntimeError naming the first step whose loss is not finite.

    With `checkpoint_dir`, the training state is saved there every `checkpoint_every` steps (a
    multiple of `log_every`) and a run finding a state resumes from it; `batches` must then be the
    loader itself (`state()`/`load_state()`, e.g. `PairedShuffledLoader`).
    """
    if checkpoint_dir is not None:
        if checkpoint_every <= 0 or checkpoint_every % log_every:
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be a positive multiple of log_every={log_every}")
        if not (hasattr(batches, "state") and hasattr(batches, "load_state")):
            raise ValueError(
                f"resumable training needs a loader with state()/load_state(), got {type(batches).__name__}: "
                "pass the PairedShuffledLoader itself, not an iterator over it")
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
    resumed = load_train_state(checkpoint_dir, sae=tc, opt=opt, device=device) if checkpoint_dir else None
    if resumed is not None:
        loop, meta = resumed
        since_fired = loop["since_fired"]
        step, tokens, log, total = meta["step"], meta["tokens"], meta["log"], meta["total"]
        batches.load_state(meta["loader_state"])
    bar = tqdm(total=n_train_tokens, initial=tokens, desc="train transcoder", unit="tok", unit_scale=True,
               disable=not progress)

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
               "dead_fraction": float((since_fired >= min(dead_tokens or tokens, tokens)).float().mean()),
               "lr": opt.param_groups[0]["lr"]}
        if eval_batch is not None:
            row.update(held_out())
        log.append(row)
        if on_log is not None:
            on_log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", dead=f"{row['dead_fraction']:.3f}")
        window = []

    if eval_batch is not None:
        _check_pair(*eval_batch, cfg)
        eval_x = eval_batch[0].to(device, torch.float32) * s_in
        eval_y = eval_batch[1].to(device, torch.float32) * s_out

    @torch.no_grad()
    def held_out() -> dict:
        out = tc(eval_x)
        fvu = (out.y_hat - eval_y).pow(2).sum() / (eval_y - eval_y.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {"eval_fvu": float(fvu), "eval_l0": float((out.top_acts > 0).sum(1).float().mean())}

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
            if checkpoint_dir is not None and step % checkpoint_every == 0 and tokens < n_train_tokens:
                save_train_state(checkpoint_dir, sae=tc, opt=opt, tensors={"since_fired": since_fired}, meta={
                    "step": step, "tokens": tokens, "log": log, "total": total,
                    "loader_state": list(batches.state())})
    if step == 0:
        raise ValueError("batches yielded nothing: pass a non-empty (x_in, y) stream")
    flush()
    bar.close()
    tc.zero_grad(set_to_none=True)
    return TranscoderTrainResult(tc.fold_scales(s_in, s_out), log, step, tokens, time.perf_counter() - t0)


def transcoder_metrics(tc: TopKTranscoder, paired_batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(L0, FVU_out) over an evaluation stream of raw (x_in, y) batches (DESIGN.md §4); the full
    set of metrics is `analysis.evaluation.metrics.prediction_metrics`."""

    def checked():
        for x, y in paired_batches:
            _check_pair(x, y, tc.cfg)
            yield x, y

    m = prediction_metrics(tc, checked())
    return m.l0, m.fvu
