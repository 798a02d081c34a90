"""Training and evaluation of acausal crosscoders (`analysis.dictionaries.Crosscoder`), with the
SAE recipe of `analysis.dictionaries.training.sae` (DESIGN.md §4):

- each layer scaled by s_l = sqrt(d_l) / mean_norm_l, folded back into the returned weights
  (`Crosscoder.fold_input_scale`), so the result takes RAW activations;
- b_dec^l starts at the geometric median of layer l's scaled sample, W_enc at W_dec^T;
- topk: concatenated decoder rows kept at norm 1 (parallel gradient removed before the step,
  renormalised after), AuxK on latents dead for `dead_tokens` tokens (k_aux = Σ d_l / 2);
- relu: penalty λ Σ_tokens Σ_i f_i Σ_l ‖W_dec^l_i‖ with λ warmed up linearly;
- Adam with warm-up, linear decay over the last 20 % of steps, grad-norm clipping;
- checkpoint/resume to bit-identical final weights (`analysis.dictionaries.resume`).

Loss normalisation (the train_sae convention, summed over layers): every term is divided by the
pooled batch variance Σ_l Σ_b ‖x^l_b − mean_b(x^l)‖², so the reconstruction term is the pooled
batch FVU Σ_l err_l / Σ_l var_l (the `fvu` metric below) and λ stays in units of per-token
squared error. Pooling, rather than averaging per-layer FVUs, keeps Lindsey et al.'s sum of
squared errors over layers and does not up-weight a layer just because its variance is small.

Public API (what the suite calls):

    loader = MultiShuffledLoader(stores, train_images, batch_size=cfg.batch_size, seed=0)
    result = train_crosscoder(loader, CrosscoderTrainConfig(width=512, k=32), mean_norms=loader.mean_norms,
                              init_batch=next(iter(sample_loader)), checkpoint_dir=d, checkpoint_every=200)
    result.crosscoder.save(d, extra_config=lineage)          # load back with load_dictionary(d)
    m = crosscoder_metrics(result.crosscoder, eval_batches)   # l0, fvu, fvu_per_layer, dead/dense
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from analysis.dictionaries.objectives import TrainForward, auxk_loss, train_forward
from analysis.dictionaries.resume import load_train_state, save_train_state
from analysis.dictionaries.training.schedule import TrainSchedule, match_state_layout, remove_parallel_grad
from analysis.dictionaries.training.sae import _rebatch, geometric_median

Batch = Tensor | Sequence[Tensor]
"""(B, L, d) tensor, or one (B, d_l) tensor per layer (what `MultiShuffledLoader` yields)."""


@dataclass(frozen=True)
class CrosscoderTrainConfig(TrainSchedule):
    """How to train one crosscoder; its shape (d_ins, n_layers, hooks) comes from the data."""

    width: int
    """Number of latents."""
    architecture: Literal["topk", "relu"] = "topk"
    """See `CrosscoderConfig.architecture`."""
    k: int | None = None
    """topk: active latents per token, None = 32; must be None for relu."""
    sparsity_coef: float | None = None
    """relu: penalty weight λ (None = the CrosscoderConfig default); None for topk."""
    sparsity_warmup_steps: int | None = None
    """relu: λ ramps linearly from ~0 over this many steps; None = 5 % of the steps."""
    batch_size: int = 4096
    """Tokens per optimizer step (incoming batches are re-chunked to this size)."""
    n_train_tokens: int = 2_000_000
    """Training length in tokens; steps = n_train_tokens // batch_size."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(width / 2**14)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from ~0 over this many steps."""
    lr_decay: bool = True
    """Decay the learning rate linearly to 0 over the last 20 % of steps."""
    aux_k: int | None = None
    """topk: dead latents used by the AuxK loss; None means Σ d_l // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (topk only); 0 disables it."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the initial weights (the loop itself draws no random numbers)."""
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    """Precision of the dense matmuls, as `SAETrainConfig.autocast`: "bfloat16" makes topk choose
    its latents from a bf16 encoder matmul (chosen values and gradients recomputed in fp32) and
    runs relu's forward under torch.autocast; "auto" = bfloat16 on CUDA, off elsewhere."""

    def __post_init__(self) -> None:
        if self.k is None and self.architecture == "topk":
            object.__setattr__(self, "k", 32)  # frozen: resolve once so ids hash the real value
        self.crosscoder_config((1,))  # validates architecture, width, k and sparsity_coef
        self.check_schedule()

    def crosscoder_config(self, d_ins: Sequence[int], hooks: Sequence[str] | None = None) -> CrosscoderConfig:
        return CrosscoderConfig(d_ins=tuple(d_ins), n_layers=len(d_ins), width=self.width,
                                architecture=self.architecture, k=self.k, sparsity_coef=self.sparsity_coef,
                                hooks=None if hooks is None else tuple(hooks))


class CrosscoderTrainResult(NamedTuple):
    crosscoder: Crosscoder
    """Trained crosscoder with the per-layer input scales folded in: it takes RAW activations."""
    log: list[dict]
    """Per-`log_every` rows: step, tokens, loss (pooled batch FVU), sparsity_loss, aux_loss, l0,
    dead_fraction, lr, sparsity_coef (train_sae's columns) and layer_fvu (per-layer batch FVU)."""
    steps: int
    tokens: int
    seconds: float


def _layers(batch: Batch) -> tuple[int, tuple[int, ...]]:
    """(n_layers, d_ins) of a batch in either accepted form."""
    if isinstance(batch, Tensor):
        if batch.ndim != 3:
            raise ValueError(f"a crosscoder batch tensor must be (B, L, d), got {tuple(batch.shape)}")
        return batch.shape[1], (batch.shape[2],) * batch.shape[1]
    return len(batch), tuple(int(b.shape[-1]) for b in batch)


def _train_forward(cc: Crosscoder, x: Tensor, low: torch.dtype | None = None,
                   reuse: Tensor | None = None) -> TrainForward:
    """Training forward on the concatenated scaled input x (B, Σ d_l).

    topk: a TopK crosscoder is a TopK SAE over the concatenated layers (one encoder matmul, one
    code, one decoder), so the SAE trainer's forward and its sparse kernels apply unchanged.
    relu: dense autograd with the per-layer-norm-weighted penalty (unweighted by λ here).
    """
    if cc.cfg.architecture == "topk":
        return train_forward(cc, x, low_precision=low, reuse=reuse)
    with torch.autocast(x.device.type, dtype=low or torch.bfloat16, enabled=low is not None):
        z = torch.addmm(cc.b_enc, x - cc.b_dec, cc.W_enc).relu()
        x_hat = torch.addmm(cc.b_dec, z, cc.W_dec)
        penalty = cc.penalty(z)
    fired = z.detach() > 0
    # the loss and its reductions stay fp32 whatever precision the matmuls ran in
    return TrainForward(x_hat.float(), penalty.float(), fired.sum(0).float(), fired.sum(1).float().mean(),
                        None, None, None)


def train_crosscoder(
    loader: Iterable[Batch],
    cfg: CrosscoderTrainConfig,
    *,
    mean_norms: Sequence[float],
    init_batch: Batch,
    hooks: Sequence[str] | None = None,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 50,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    eval_batch: Batch | None = None,
) -> CrosscoderTrainResult:
    """Train a crosscoder on aligned per-layer batches (e.g. a `MultiShuffledLoader`).

    With `eval_batch` (raw held-out tokens in either batch form), every log row also carries
    `eval_fvu` (pooled, against the held-out mean) and `eval_l0` on it.

    `mean_norms` holds each layer's mean raw token norm (store stats; `loader.mean_norms`),
    `init_batch` a raw sample in either batch form; n_layers and d_ins are read from it. `hooks`
    names the layers in the saved config (None: the loader's `hooks` when it has them).
    Raises RuntimeError naming the first step whose loss was not finite, ValueError when a
    batch's layer count or widths differ from the crosscoder's.

    With `checkpoint_dir`, the full training state (weights, Adam, step, dead counters, loader
    position, log) is saved every `checkpoint_every` steps (a multiple of `log_every`) and a run
    finding a state resumes from it, reaching the same final weights as an uninterrupted run;
    `loader` must then be the loader itself (state()/load_state()) yielding `cfg.batch_size` rows.
    """
    if checkpoint_dir is not None:
        if checkpoint_every <= 0 or checkpoint_every % log_every:
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be a positive multiple of log_every={log_every}")
        if not (hasattr(loader, "state") and hasattr(loader, "load_state")):
            raise ValueError(
                f"resumable training needs a loader with state()/load_state(), got {type(loader).__name__}: "
                "pass the MultiShuffledLoader itself, not an iterator over it")
        if getattr(loader, "batch_size", None) != cfg.batch_size:
            raise ValueError(
                f"loader batch_size={getattr(loader, 'batch_size', None)} != cfg.batch_size={cfg.batch_size}: "
                "a resumable run needs whole loader batches (no re-chunking)")
    n_layers, d_ins = _layers(init_batch)
    norms = [float(v) for v in mean_norms]
    if len(norms) != n_layers:
        raise ValueError(
            f"mean_norms has {len(norms)} values but init_batch has n_layers={n_layers}: pass one mean "
            "norm per layer (MultiShuffledLoader.mean_norms)")
    if not all(v > 0 and math.isfinite(v) for v in norms):
        raise ValueError(f"mean_norms={norms} must all be finite and > 0 (mean L2 norms of the activations)")
    if hooks is None:
        hooks = getattr(loader, "hooks", None)
    cc_cfg = cfg.crosscoder_config(d_ins, hooks)
    scales = [math.sqrt(d) / n for d, n in zip(d_ins, norms)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        cc = Crosscoder(cc_cfg)
    x0 = cc.concat(init_batch)
    device = x0.device
    cc = cc.to(device)
    scale = torch.cat([torch.full((d,), s, dtype=torch.float32) for d, s in zip(d_ins, scales)]).to(device)
    with torch.no_grad():
        x0 = x0.float() * scale
        for sl in cc_cfg.slices():
            cc.b_dec[sl] = geometric_median(x0[:, sl]).to(device)

    params = list(cc.parameters())
    # fused: one kernel over all parameters (much faster on CPU than the per-tensor loop)
    opt = torch.optim.Adam(params, lr=cfg.lr_at(0), betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    low = cfg.low_precision(device)
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, cc_cfg.d_total // 2)
    use_aux = cc_cfg.architecture == "topk" and cfg.aux_coef > 0
    since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)
    slices = cc_cfg.slices()

    log: list[dict] = []
    window: list[Tensor] = []  # per-step (loss, sparsity, aux, l0, fvu_0..fvu_{L-1}), checked at log time
    window_start = 0
    total = cfg.total_steps
    step = tokens = 0
    coef = 0.0
    resumed = load_train_state(checkpoint_dir, sae=cc, opt=opt, device=device) if checkpoint_dir else None
    if resumed is not None:
        loop, meta = resumed
        since_fired = loop["since_fired"]
        step = window_start = meta["step"]
        tokens, log, coef = meta["tokens"], meta["log"], meta["coef"]
        loader.load_state(meta["loader_state"])
        match_state_layout(opt)  # restored moments must share W_enc's width-major layout (fused Adam)
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.architecture} crosscoder", unit="step",
               disable=not progress)

    def flush() -> None:
        nonlocal window, window_start
        if not window:
            return
        stats = torch.stack(window).cpu()
        bad = (~torch.isfinite(stats[:, :3].sum(1))).nonzero()
        if len(bad):
            raise RuntimeError(
                f"crosscoder training diverged: loss is not finite at step {window_start + int(bad[0])}; "
                "lower lr or check the activations for NaN/inf (keep the last good checkpoint)")
        mean = stats.mean(0)
        row = {
            "step": step, "tokens": tokens, "loss": float(mean[0]), "sparsity_loss": float(mean[1]),
            "aux_loss": float(mean[2]), "l0": float(mean[3]),
            # as train_sae: a run shorter than the window reports latents it never used
            "dead_fraction": float((since_fired >= min(cfg.dead_tokens, tokens)).float().mean()),
            "lr": opt.param_groups[0]["lr"], "sparsity_coef": coef,
            "layer_fvu": [float(v) for v in mean[4:]],
        }
        if eval_x is not None:
            row.update(held_out())
        log.append(row)
        if on_log is not None:
            on_log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
        window, window_start = [], step

    eval_x = None if eval_batch is None else cc.concat(eval_batch).to(device, torch.float32) * scale

    @torch.no_grad()
    def held_out() -> dict:
        fwd_eval = _train_forward(cc, eval_x, low)
        fvu = (fwd_eval.x_hat - eval_x).pow(2).sum() / (eval_x - eval_x.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {"eval_fvu": float(fvu), "eval_l0": float(fwd_eval.l0)}

    concat = (cc.concat(b) for b in loader)  # checks every batch's layer count and widths
    reuse = None  # topk: the (B, width) pre-activation buffer, overwritten each step
    t0 = time.perf_counter()
    for x in _rebatch(concat, cfg.batch_size, cc_cfg.d_total, device):
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        x = x * scale
        fwd = _train_forward(cc, x, low, reuse)
        # per-dimension batch variance and error, so the per-layer FVUs are slices of the pooled sums
        var_dim = (x - x.mean(0)).pow(2).sum(0)
        var = var_dim.sum().clamp_min(1e-12)  # = batch_variance(x)
        err_dim = (fwd.x_hat - x).pow(2).sum(0)
        loss = err_dim.sum() / var
        sparsity = torch.zeros((), device=device)
        if cc_cfg.sparsity_coef is not None:
            coef = cfg.sparsity_coef_at(step, cc_cfg.sparsity_coef)
            sparsity = coef * fwd.penalty / var
        dead = since_fired >= cfg.dead_tokens
        aux_loss = torch.zeros((), device=device)
        if use_aux and bool(dead.any()):
            aux_loss = auxk_loss(cc, fwd, x, dead, aux_k)
        (loss + sparsity + cfg.aux_coef * aux_loss).backward()

        with torch.no_grad():
            if cc.unit_norm_decoder:  # on the concatenated unit sphere: drop the radial gradient
                remove_parallel_grad(cc.W_dec)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cc.unit_norm_decoder:
                cc.normalize_decoder()
            since_fired = torch.where(fwd.fire_counts > 0, 0, since_fired + x.shape[0])
            layer_fvu = [err_dim[sl].sum() / var_dim[sl].sum().clamp_min(1e-12) for sl in slices]
            window.append(torch.stack([loss.detach(), sparsity.detach(), aux_loss.detach(), fwd.l0, *layer_fvu]))
        reuse = fwd.pre
        del fwd, err_dim  # drop this step's graph before the next forward allocates

        step += 1
        tokens += x.shape[0]
        bar.update(1)
        if step % log_every == 0:
            flush()
            if checkpoint_dir is not None and step % checkpoint_every == 0 and step < total:
                save_train_state(checkpoint_dir, sae=cc, opt=opt, tensors={"since_fired": since_fired}, meta={
                    "step": step, "tokens": tokens, "log": log, "coef": coef,
                    "loader_state": list(loader.state())})
    flush()
    bar.close()
    if step == 0:
        raise ValueError("the loader yielded no full batch: pass a non-empty stream of aligned batches")
    cc.zero_grad(set_to_none=True)
    return CrosscoderTrainResult(cc.fold_input_scale(scales), log, step, tokens, time.perf_counter() - t0)
