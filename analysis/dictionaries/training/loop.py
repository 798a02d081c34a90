"""The one training loop of every dictionary family (SAEs, transcoders, crosscoders).

The recipe (Gao et al. 2024, DESIGN.md §4), owned here once:
- inputs scaled to mean norm sqrt(d), folded back into the returned weights by the family;
- fused Adam with warm-up, linear decay over the last 20 % of steps and grad-norm clipping;
- unit-norm decoder rows: the gradient parallel to each row is removed before the step and the
  rows renormalised after it;
- AuxK on latents that have not fired for `dead_tokens` tokens (every TopK family);
- a sparsity penalty λ warmed up linearly (penalty architectures);
- BatchTopK's running inference threshold;
- a log row every `log_every` steps (training and held-out FVU, L0, dead fraction), a stop naming
  the first step whose loss was not finite, and checkpoint/resume to the same final weights.

A family supplies only what differs (`Objective`): its model, how a loader batch becomes one
(B, D) row block and then (input, target) at training scale, its forward pass and its loss.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypedDict

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis.dictionaries.objectives import TrainForward, batch_variance, normalized_sq_error
from analysis.dictionaries.resume import load_train_state, save_train_state
from analysis.dictionaries.training.schedule import (
    TrainerConfig,
    match_state_layout,
    remove_parallel_grad,
)


class TrainResult(NamedTuple):
    dictionary: nn.Module
    """The trained dictionary with its input scales folded in: it takes RAW activations."""
    log: list[dict]
    """One row per `log_every` steps: step, tokens, loss (batch FVU), sparsity_loss, aux_loss, l0,
    dead_fraction, lr, sparsity_coef, the family's own columns, and eval_fvu/eval_l0 on held-out
    tokens when the run has them."""
    steps: int
    tokens: int
    seconds: float


class TrainOptions(TypedDict, total=False):
    """How a run reports and checkpoints; the keyword options every family's train_* passes on."""

    progress: bool
    """Show a tqdm bar (default True)."""
    on_log: Callable[[dict], None] | None
    """Called with every log row."""
    on_step: Callable[[dict], None] | None
    """Called with one row per training step (step, tokens, loss, sparsity_loss, aux_loss, l0 and
    the family's own columns), in order, at each log row: an experiment tracker's full history."""
    log_every: int
    """Steps between log rows (default 50)."""
    checkpoint_dir: str | Path | None
    """Save the training state here and resume from it."""
    checkpoint_every: int
    """Steps between saved states, a multiple of log_every."""


class Objective(ABC):
    """What one family gives the loop. `model` is at training scale until `finish`."""

    name: str
    """For the progress bar and errors, e.g. "topk SAE"."""
    model: nn.Module
    """Has `parameters()`, `W_dec`, `unit_norm_decoder` and `normalize_decoder()`."""
    width: int
    """Number of latents."""
    row_width: int
    """Columns of one flattened batch row (`flatten`)."""
    sparsity_coef: float | None = None
    """Base penalty weight λ; None: no penalty (TopK families)."""
    aux_k: int | None = None
    """Dead latents AuxK may use; None: no AuxK (penalty architectures)."""
    extra_columns: tuple[str, ...] = ()
    """Names of the per-step statistics `loss` returns beyond the loss itself (list-valued log
    columns, e.g. a crosscoder's per-layer FVU)."""

    @abstractmethod
    def flatten(self, batch: Any) -> Tensor:
        """One loader batch as (B, row_width) raw rows (validating its shape)."""

    @abstractmethod
    def scaled(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 (B, row_width) raw rows -> (input, target) at training scale."""

    @abstractmethod
    def forward(self, x: Tensor, low: torch.dtype | None, reuse: Tensor | None) -> TrainForward:
        """Training forward of the input; `x_hat` is the prediction of the target."""

    def param_groups(self) -> list[dict]:
        """Adam's parameter groups; a group's `lr_scale` multiplies the scheduled learning rate."""
        return [{"params": list(self.model.parameters())}]

    def loss(self, fwd: TrainForward, target: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(reconstruction loss, batch variance the penalty is divided by, extra statistics)."""
        var = batch_variance(target)
        return (fwd.x_hat - target).pow(2).sum() / var, var, []

    def aux_loss(self, fwd: TrainForward, target: Tensor, dead: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no AuxK loss")

    @abstractmethod
    def finish(self, threshold: float | None) -> nn.Module:
        """The trained model for RAW activations (scales folded in, BatchTopK threshold set)."""


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations from the mean; robust centre for decoder biases."""
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


def rebatch(rows: Iterable[Tensor], size: int, device) -> Iterator[Tensor]:
    """Exact `size`-row float32 batches from arbitrary-size ones (a trailing remainder is dropped)."""
    buf: list[Tensor] = []
    have = 0
    for b in rows:
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


def check_resumable(batches, cfg: TrainerConfig, log_every: int, checkpoint_every: int) -> None:
    if checkpoint_every <= 0 or checkpoint_every % log_every:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be a positive multiple of log_every={log_every}")
    if not (hasattr(batches, "state") and hasattr(batches, "load_state")):
        raise ValueError(
            f"resumable training needs a loader with state()/load_state(), got {type(batches).__name__}: "
            "pass the loader itself (ShuffledLoader, MultiShuffledLoader, …), not an iterator over it")
    if getattr(batches, "batch_size", None) != cfg.batch_size:
        raise ValueError(
            f"loader batch_size={getattr(batches, 'batch_size', None)} != cfg.batch_size={cfg.batch_size}: "
            "a resumable run needs whole loader batches (no re-chunking)")


def train(objective: Objective, batches: Iterable, cfg: TrainerConfig, *, device: torch.device,
          eval_batch: Any = None, progress: bool = True, on_log: Callable[[dict], None] | None = None,
          on_step: Callable[[dict], None] | None = None, log_every: int = 50, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0) -> TrainResult:
    """Train `objective.model` on `batches` (anything `objective.flatten` reads) for `cfg`.

    With `eval_batch` (raw held-out tokens in the loader's batch form), every log row also
    carries `eval_fvu` (against the held-out mean) and `eval_l0`: the training-time code
    (BatchTopK's batch selection), so overfitting or collapse shows while training runs.

    With `checkpoint_dir`, the full training state is saved there every `checkpoint_every`
    steps (a multiple of `log_every`) and a run finding a state resumes from it, reaching the
    same final weights as an uninterrupted run; `batches` must then be the loader itself.
    Raises RuntimeError naming the first step whose loss was not finite.
    """
    if checkpoint_dir is not None:
        check_resumable(batches, cfg, log_every, checkpoint_every)
    run = _Run(objective, cfg, device, on_log, on_step)
    if eval_batch is not None:
        run.eval_pair = objective.scaled(objective.flatten(eval_batch).to(device, torch.float32))
    if checkpoint_dir is not None and run.resume(checkpoint_dir):
        batches.load_state(run.loader_state)
    bar = tqdm(total=cfg.total_steps, initial=run.step, desc=f"train {objective.name}", unit="step",
               disable=not progress)
    t0 = time.perf_counter()
    for rows in rebatch((objective.flatten(b) for b in batches), cfg.batch_size, device):
        if run.step >= cfg.total_steps:
            break
        run.train_step(rows)
        bar.update(1)
        if run.step % log_every == 0:
            bar.set_postfix(run.flush())
            if checkpoint_dir is not None and run.step % checkpoint_every == 0 and run.step < cfg.total_steps:
                run.save(checkpoint_dir, batches.state())
    run.flush()
    bar.close()
    if run.step == 0:
        raise ValueError("the loader yielded no full batch: pass a non-empty stream of training batches")
    objective.model.zero_grad(set_to_none=True)
    threshold = None if run.threshold is None else float(run.threshold)
    return TrainResult(objective.finish(threshold), run.log, run.step, run.tokens, time.perf_counter() - t0)


class _Run:
    """The mutable state of one training run: optimiser, counters, log window."""

    def __init__(self, objective: Objective, cfg: TrainerConfig, device: torch.device,
                 on_log: Callable[[dict], None] | None, on_step: Callable[[dict], None] | None = None):
        self.obj, self.cfg, self.on_log, self.on_step = objective, cfg, on_log, on_step
        self.params = list(objective.model.parameters())
        groups = objective.param_groups()
        # fused: one kernel over all parameters (on CPU ~7x faster than the per-tensor loop at 4.7M params)
        self.opt = torch.optim.Adam(groups, lr=cfg.lr_at(0), betas=(0.9, 0.999), eps=6.25e-10, fused=True)
        self.low = cfg.low_precision(device)
        self.use_aux = objective.aux_k is not None and cfg.aux_coef > 0
        self.since_fired = torch.zeros(objective.width, dtype=torch.long, device=device)
        self.threshold: Tensor | None = None  # BatchTopK: running estimate of the inference threshold
        self.step = self.tokens = self.window_start = 0
        self.coef = 0.0
        self.log: list[dict] = []
        self.window: list[Tensor] = []  # per-step (loss, sparsity, aux, l0, extras…), checked at log time
        self.reuse: Tensor | None = None  # the (B, width) pre-activation buffer, overwritten each step
        self.eval_pair: tuple[Tensor, Tensor] | None = None
        self.device = device

    def train_step(self, rows: Tensor) -> None:
        obj, cfg = self.obj, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step) * group.get("lr_scale", 1.0)
        x, target = obj.scaled(rows)
        fwd = obj.forward(x, self.low, self.reuse)
        loss, var, extras = obj.loss(fwd, target)
        sparsity = torch.zeros((), device=self.device)
        if obj.sparsity_coef is not None:
            self.coef = cfg.sparsity_coef_at(self.step, obj.sparsity_coef)  # a PenaltySchedule config
            # λ is in units of per-token squared error (Conerly et al.): the penalty shares the
            # reconstruction term's batch-variance denominator
            sparsity = self.coef * fwd.penalty / var
        dead = self.since_fired >= cfg.dead_tokens
        aux = torch.zeros((), device=self.device)
        if self.use_aux and bool(dead.any()):
            aux = obj.aux_loss(fwd, target, dead)
        (loss + sparsity + cfg.aux_coef * aux).backward()
        with torch.no_grad():
            model = obj.model
            if model.unit_norm_decoder:  # stay on the unit sphere: drop the radial gradient
                remove_parallel_grad(model.W_dec)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if model.unit_norm_decoder:
                model.normalize_decoder()
            if fwd.min_kept is not None:
                d = cfg.threshold_ema_decay()  # BatchTopK only, so an SAETrainConfig
                self.threshold = fwd.min_kept if self.threshold is None else d * self.threshold + (1 - d) * fwd.min_kept
            self.since_fired = torch.where(fwd.fire_counts > 0, 0, self.since_fired + x.shape[0])
            self.window.append(torch.stack([loss.detach(), sparsity.detach(), aux.detach(), fwd.l0, *extras]))
        self.reuse = fwd.pre
        del fwd  # drop this step's graph before the next forward allocates
        self.step += 1
        self.tokens += x.shape[0]

    def flush(self) -> dict:
        """Append the log row of the steps since the last one; returns the progress-bar fields."""
        if not self.window:
            return {}
        stats = torch.stack(self.window).cpu()
        bad = (~torch.isfinite(stats[:, :3].sum(1))).nonzero()
        if len(bad):
            raise RuntimeError(
                f"{self.obj.name} training diverged: loss is not finite at step {self.window_start + int(bad[0])}; "
                "lower lr or check the activations for NaN/inf (keep the last good checkpoint)")
        if self.on_step is not None:
            self._report_steps(stats)
        mean = stats.mean(0)
        row = {"step": self.step, "tokens": self.tokens, "loss": float(mean[0]), "sparsity_loss": float(mean[1]),
               "aux_loss": float(mean[2]), "l0": float(mean[3]),
               # Fired on no token in the last N = min(dead_tokens, tokens seen): a run shorter than
               # the window still reports the latents it never used, instead of a flattering 0.
               "dead_fraction": float((self.since_fired >= min(self.cfg.dead_tokens, self.tokens)).float().mean()),
               "lr": self.opt.param_groups[0]["lr"], "sparsity_coef": self.coef}
        for name in self.obj.extra_columns:  # one value per remaining column, e.g. per layer
            row[name] = [float(v) for v in mean[4:]]
        if self.eval_pair is not None:
            row.update(self.held_out())
        self.log.append(row)
        if self.on_log is not None:
            self.on_log(row)
        self.window, self.window_start = [], self.step
        return {"loss": f"{row['loss']:.4f}", "l0": f"{row['l0']:.1f}", "dead": f"{row['dead_fraction']:.3f}"}

    def _report_steps(self, stats: Tensor) -> None:
        """One row per step of the window: (loss, sparsity, aux, l0, extras…) per row of `stats`."""
        for i, values in enumerate(stats.tolist()):
            step = self.window_start + i + 1
            row = {"step": step, "tokens": step * self.cfg.batch_size, "loss": values[0], "sparsity_loss": values[1],
                   "aux_loss": values[2], "l0": values[3]}
            for name in self.obj.extra_columns:
                row[name] = values[4:]
            self.on_step(row)

    @torch.no_grad()
    def held_out(self) -> dict:
        x, target = self.eval_pair
        fwd = self.obj.forward(x, None, None)
        return {"eval_fvu": float(normalized_sq_error(fwd.x_hat, target)), "eval_l0": float(fwd.l0)}

    def save(self, directory, loader_state) -> None:
        extra = {"since_fired": self.since_fired} | ({} if self.threshold is None else {"threshold": self.threshold})
        save_train_state(directory, sae=self.obj.model, opt=self.opt, tensors=extra, meta={
            "step": self.step, "tokens": self.tokens, "log": self.log, "coef": self.coef,
            "loader_state": list(loader_state)})

    def resume(self, directory) -> bool:
        """Restore the state saved in `directory`, if any; the loader position is `loader_state`."""
        resumed = load_train_state(directory, sae=self.obj.model, opt=self.opt, device=self.device)
        if resumed is None:
            return False
        loop, meta = resumed
        match_state_layout(self.opt)  # restored moments must share the parameters' layout (fused Adam)
        self.since_fired, self.threshold = loop["since_fired"], loop.get("threshold")
        self.step = self.window_start = meta["step"]
        self.tokens, self.log, self.coef = meta["tokens"], meta["log"], meta["coef"]
        self.loader_state = meta["loader_state"]
        return True
