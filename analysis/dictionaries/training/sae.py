"""Training loop for every SAE architecture (recipe of Gao et al. 2024 / DESIGN.md §4).

- inputs scaled by s = sqrt(d_in) / mean_norm, folded back into the returned weights;
- b_dec starts at the geometric median of a sample, W_enc at W_dec.T;
- unit-norm decoder rows (all but relu): the gradient component parallel to each row is removed
  before the step and the rows are renormalised after it;
- AuxK loss (topk/batchtopk) on latents that have not fired for `dead_tokens` tokens;
- relu/jumprelu: sparsity penalty λ·(L1 or L0) with λ warmed up linearly;
- batchtopk: running estimate of the inference threshold (mean of the smallest kept activation);
- Adam with warm-up, linear decay over the last 20 % of steps, and grad-norm clipping.

The per-architecture forward passes (and their sparse gradients) are in
`analysis.dictionaries.objectives`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pathlib import Path

from analysis.dictionaries import SAEConfig, SparseAutoencoder, build_sae
from analysis.dictionaries.resume import load_train_state, save_train_state
from analysis.dictionaries.objectives import auxk_loss, batch_variance, train_forward
from analysis.dictionaries.training.schedule import TrainSchedule, match_state_layout, remove_parallel_grad

_TOPK_FAMILY = ("topk", "batchtopk")


@dataclass(frozen=True)
class SAETrainConfig(TrainSchedule):
    """How to train one SAE (the SAE's shape is `SAEConfig`, built by `sae_config(d_in)`)."""

    width: int
    """Number of latents."""
    k: int | None = None
    """topk/batchtopk: active latents per token, None = 32; must be None for relu/jumprelu."""
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    """SAE family, see `analysis.dictionaries.SAEConfig.architecture`."""
    sparsity_coef: float | None = None
    """relu/jumprelu penalty weight λ (None = the SAEConfig default); None for the TopK families."""
    sparsity_warmup_steps: int | None = None
    """λ ramps linearly from ~0 over this many steps (relu/jumprelu); None = 5 % of the steps."""
    threshold_init: float | None = None
    """jumprelu: initial threshold in scaled-input units (None = SAEConfig default)."""
    bandwidth: float | None = None
    """jumprelu: kernel width ε of the threshold pseudo-gradient (None = SAEConfig default)."""
    threshold_decay: float = 0.99
    """batchtopk: decay of the running mean of the smallest kept activation (the inference
    threshold); an exponential mean forgets the unrepresentative first steps."""
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
    """Dead latents used by the AuxK loss (topk/batchtopk); None means d_in // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (topk/batchtopk only)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the initial weights (training is otherwise deterministic on CPU)."""
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    """Precision of the dense matmuls. "bfloat16": topk/batchtopk choose their latents from a
    bf16 encoder matmul and recompute the chosen values in fp32 (values and gradients of the
    chosen latents are fp32; near-ties at the k-th place may pick another latent); relu/jumprelu
    run their forward under torch.autocast. Parameters, thresholds and the loss stay fp32.
    "auto": bfloat16 on CUDA, off elsewhere. "off": fp32 throughout."""

    def __post_init__(self) -> None:
        if self.k is None and self.architecture in _TOPK_FAMILY:
            object.__setattr__(self, "k", 32)  # frozen: resolve once so ids hash the real value
        self.sae_config(d_in=1)  # validates architecture, k and the sparsity fields
        self.check_schedule()
        if not 0 <= self.threshold_decay < 1:
            raise ValueError(f"threshold_decay={self.threshold_decay} must be in [0, 1), e.g. 0.99")

    def sae_config(self, d_in: int) -> SAEConfig:
        return SAEConfig(d_in=d_in, width=self.width, k=self.k, architecture=self.architecture,
                         sparsity_coef=self.sparsity_coef, threshold_init=self.threshold_init,
                         bandwidth=self.bandwidth)


class TrainResult(NamedTuple):
    sae: SparseAutoencoder
    """Trained SAE with the input scale folded in: it takes RAW activations."""
    log: list[dict]
    steps: int
    tokens: int
    seconds: float


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
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    eval_tokens: Tensor | None = None,
) -> TrainResult:
    """Train an SAE of `cfg.architecture` on (B, d_in) activation batches; see the module docstring.

    With `eval_tokens` (raw held-out activations, (N, d_in)), every log row also carries
    `eval_fvu` and `eval_l0` on them: the training-time code (BatchTopK's batch selection) against
    the held-out mean, so overfitting or collapse shows while training runs.

    `mean_norm` is the mean L2 norm of the raw activations (from the activation store) and
    `init_batch` a sample of raw activations for the geometric-median b_dec.
    Raises RuntimeError naming the first step whose loss was not finite.

    With `checkpoint_dir`, the full training state is saved there every `checkpoint_every`
    steps (a multiple of `log_every`) and a run finding a state resumes from it, reaching the
    same final weights as an uninterrupted run. `batches` must then be the loader itself
    (with `state()`/`load_state()`, e.g. `ShuffledLoader`) yielding `cfg.batch_size` rows.
    """
    if checkpoint_dir is not None:
        if checkpoint_every <= 0 or checkpoint_every % log_every:
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be a positive multiple of log_every={log_every}"
            )
        if not (hasattr(batches, "state") and hasattr(batches, "load_state")):
            raise ValueError(
                f"resumable training needs a loader with state()/load_state(), got {type(batches).__name__}: "
                "pass the ShuffledLoader itself, not an iterator over it"
            )
        if getattr(batches, "batch_size", None) != cfg.batch_size:
            raise ValueError(
                f"loader batch_size={getattr(batches, 'batch_size', None)} != cfg.batch_size={cfg.batch_size}: "
                "a resumable run needs whole loader batches (no re-chunking)"
            )
    if not mean_norm > 0:
        raise ValueError(f"mean_norm={mean_norm} must be > 0 (the mean L2 norm of the activations)")
    if init_batch.shape[-1] != d_in:
        raise ValueError(
            f"init_batch has width {init_batch.shape[-1]} but d_in={d_in}: "
            "pass a sample of the activations the SAE will be trained on"
        )
    device = init_batch.device
    scale = math.sqrt(d_in) / mean_norm
    sae_cfg = cfg.sae_config(d_in)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = build_sae(sae_cfg).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(init_batch.float().reshape(-1, d_in) * scale).to(device))

    params = list(sae.parameters())
    W_dec = sae.W_dec
    # fused: one kernel over all parameters (on CPU ~7x faster than the per-tensor loop at 4.7M params)
    opt = torch.optim.Adam(params, lr=cfg.lr_at(0), betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    low = cfg.low_precision(device)
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, d_in // 2)
    use_aux = cfg.architecture in _TOPK_FAMILY and cfg.aux_coef > 0
    since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)
    threshold = None  # batchtopk: running estimate of the inference threshold (a 0-d tensor)

    log: list[dict] = []
    window: list[Tensor] = []  # per-step (loss, sparsity, aux, l0), checked at log time
    window_start = 0
    total = cfg.total_steps
    step = tokens = 0
    coef = 0.0
    resumed = load_train_state(checkpoint_dir, sae=sae, opt=opt, device=device) if checkpoint_dir else None
    if resumed is not None:
        loop, meta = resumed
        match_state_layout(opt)
        since_fired, threshold = loop["since_fired"], loop.get("threshold")
        step = window_start = meta["step"]
        tokens, log, coef = meta["tokens"], meta["log"], meta["coef"]
        batches.load_state(meta["loader_state"])
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.architecture} SAE", unit="step", disable=not progress)

    def flush() -> None:
        nonlocal window, window_start
        if not window:
            return
        stats = torch.stack(window).cpu()
        bad = (~torch.isfinite(stats[:, :3].sum(1))).nonzero()
        if len(bad):
            raise RuntimeError(
                f"SAE training diverged: loss is not finite at step {window_start + int(bad[0])}; "
                "lower lr or check the activations for NaN/inf (keep the last good checkpoint)"
            )
        mean = stats.mean(0)
        row = {
            "step": step, "tokens": tokens, "loss": float(mean[0]), "sparsity_loss": float(mean[1]),
            "aux_loss": float(mean[2]), "l0": float(mean[3]),
            # Fired on no token in the last N = min(dead_tokens, tokens seen): a run shorter than
            # the window still reports the latents it never used, instead of a flattering 0.
            "dead_fraction": float((since_fired >= min(cfg.dead_tokens, tokens)).float().mean()),
            "lr": opt.param_groups[0]["lr"], "sparsity_coef": coef,
        }
        if eval_x is not None:
            row.update(held_out())
        log.append(row)
        if on_log is not None:
            on_log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
        window, window_start = [], step

    eval_x = None
    if eval_tokens is not None:
        if eval_tokens.ndim != 2 or eval_tokens.shape[1] != d_in or not len(eval_tokens):
            raise ValueError(f"eval_tokens must be (N > 0, d_in={d_in}) raw activations, got {tuple(eval_tokens.shape)}")
        eval_x = eval_tokens.to(device=device, dtype=torch.float32) * scale

    @torch.no_grad()
    def held_out() -> dict:
        fwd_eval = train_forward(sae, eval_x)
        fvu = (fwd_eval.x_hat - eval_x).pow(2).sum() / batch_variance(eval_x)
        return {"eval_fvu": float(fvu), "eval_l0": float(fwd_eval.l0)}

    reuse = None  # the (B, width) pre-activation buffer, overwritten each step
    t0 = time.perf_counter()
    for x in _rebatch(batches, cfg.batch_size, d_in, device):
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        x = x * scale
        fwd = train_forward(sae, x, low_precision=low, reuse=reuse)
        var = batch_variance(x)
        # Both terms share the batch-variance denominator, so λ is in units of per-token squared
        # error (Conerly et al.'s convention) while the reconstruction term is the batch FVU.
        loss = (fwd.x_hat - x).pow(2).sum() / var
        sparsity = torch.zeros((), device=device)
        if sae_cfg.sparsity_coef is not None:
            coef = cfg.sparsity_coef_at(step, sae_cfg.sparsity_coef)
            sparsity = coef * fwd.penalty / var
        dead = since_fired >= cfg.dead_tokens
        aux_loss = torch.zeros((), device=device)
        if use_aux and bool(dead.any()):
            aux_loss = auxk_loss(sae, fwd, x, dead, aux_k)
        (loss + sparsity + cfg.aux_coef * aux_loss).backward()

        with torch.no_grad():
            if sae.unit_norm_decoder:  # stay on the unit sphere: drop the radial gradient
                remove_parallel_grad(W_dec)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sae.unit_norm_decoder:
                sae.normalize_decoder()
            if fwd.min_kept is not None:
                threshold = fwd.min_kept if threshold is None else (
                    cfg.threshold_decay * threshold + (1 - cfg.threshold_decay) * fwd.min_kept)
            since_fired = torch.where(fwd.fire_counts > 0, 0, since_fired + x.shape[0])
            window.append(torch.stack([loss.detach(), sparsity.detach(), aux_loss.detach(), fwd.l0]))
        reuse = fwd.pre
        del fwd  # drop this step's graph before the next forward allocates

        step += 1
        tokens += x.shape[0]
        bar.update(1)
        if step % log_every == 0:
            flush()
            if checkpoint_dir is not None and step % checkpoint_every == 0 and step < total:
                extra = {"since_fired": since_fired} | ({} if threshold is None else {"threshold": threshold})
                save_train_state(checkpoint_dir, sae=sae, opt=opt, tensors=extra, meta={
                    "step": step, "tokens": tokens, "log": log, "coef": coef,
                    "loader_state": list(batches.state())})
    flush()
    bar.close()
    seconds = time.perf_counter() - t0
    if threshold is not None:
        with torch.no_grad():
            sae.inference_threshold.fill_(float(threshold))
    sae.zero_grad(set_to_none=True)
    return TrainResult(sae.fold_input_scale(scale), log, step, tokens, seconds)
