"""Crosscoder training: the config and the objective an acausal crosscoder
(`analysis.dictionaries.Crosscoder`) gives the one loop (`analysis.dictionaries.training.loop`).

- each layer scaled by s_l = sqrt(d_l) / mean_norm_l, folded back into the returned weights
  (`Crosscoder.fold_input_scale`), so the result takes RAW activations;
- b_dec^l starts at the geometric median of layer l's scaled sample, W_enc at W_dec^T;
- topk: a TopK SAE over the concatenated layers (one encoder matmul, one code, one decoder), so
  the SAE's sparse forward and AuxK apply unchanged (k_aux = Σ d_l / 2);
- relu: penalty λ Σ_tokens Σ_i f_i Σ_l ‖W_dec^l_i‖ (dense autograd).

Loss normalisation (the SAE convention, summed over layers): every term is divided by the
pooled batch variance Σ_l Σ_b ‖x^l_b − mean_b(x^l)‖², so the reconstruction term is the pooled
batch FVU Σ_l err_l / Σ_l var_l and λ stays in units of per-token squared error. Pooling, rather
than averaging per-layer FVUs, keeps Lindsey et al.'s sum of squared errors over layers and does
not up-weight a layer just because its variance is small.

    loader = MultiShuffledLoader(stores, train_images, batch_size=cfg.batch_size, seed=0)
    result = train_crosscoder(loader, CrosscoderTrainConfig(width=512, k=32), mean_norms=loader.mean_norms,
                              init_batch=next(iter(sample_loader)), checkpoint_dir=d, checkpoint_every=200)
    result.dictionary.save(d, extra_config=lineage)          # load back with load_dictionary(d)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence, Unpack

import torch
from torch import Tensor

from analysis.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from analysis.dictionaries.objectives import TrainForward, auxk_loss, sae_weights, train_forward
from analysis.dictionaries.training.loop import Objective, TrainOptions, TrainResult, geometric_median, train
from analysis.dictionaries.training.schedule import PenaltySchedule, TrainerConfig

Batch = Tensor | Sequence[Tensor]
"""(B, L, d) tensor, or one (B, d_l) tensor per layer (what `MultiShuffledLoader` yields)."""


@dataclass(frozen=True, kw_only=True)
class CrosscoderTrainConfig(TrainerConfig, PenaltySchedule):
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

    def __post_init__(self) -> None:
        if self.k is None and self.architecture == "topk":
            object.__setattr__(self, "k", 32)  # frozen: resolve once so ids hash the real value
        self.crosscoder_config((1,))  # validates architecture, width, k and sparsity_coef
        self.check_schedule()
        self.check_sparsity_warmup()

    def crosscoder_config(self, d_ins: Sequence[int], hooks: Sequence[str] | None = None) -> CrosscoderConfig:
        return CrosscoderConfig(d_ins=tuple(d_ins), n_layers=len(d_ins), width=self.width,
                                architecture=self.architecture, k=self.k, sparsity_coef=self.sparsity_coef,
                                hooks=None if hooks is None else tuple(hooks))


def _layers(batch: Batch) -> tuple[int, tuple[int, ...]]:
    """(n_layers, d_ins) of a batch in either accepted form."""
    if isinstance(batch, Tensor):
        if batch.ndim != 3:
            raise ValueError(f"a crosscoder batch tensor must be (B, L, d), got {tuple(batch.shape)}")
        return batch.shape[1], (batch.shape[2],) * batch.shape[1]
    return len(batch), tuple(int(b.shape[-1]) for b in batch)


def crosscoder_train_forward(cc: Crosscoder, x: Tensor, low: torch.dtype | None = None,
                             reuse: Tensor | None = None) -> TrainForward:
    """Training forward on the concatenated scaled input x (B, Σ d_l). topk: the SAE's sparse
    forward over the concatenated layers; relu: dense autograd with the per-layer-norm-weighted
    penalty (unweighted by λ here)."""
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


class CrosscoderObjective(Objective):
    extra_columns = ("layer_fvu",)

    def __init__(self, cfg: CrosscoderTrainConfig, *, mean_norms: Sequence[float], init_batch: Batch,
                 hooks: Sequence[str] | None):
        n_layers, d_ins = _layers(init_batch)
        norms = [float(v) for v in mean_norms]
        if len(norms) != n_layers:
            raise ValueError(
                f"mean_norms has {len(norms)} values but init_batch has n_layers={n_layers}: pass one mean "
                "norm per layer (MultiShuffledLoader.mean_norms)")
        if not all(v > 0 and math.isfinite(v) for v in norms):
            raise ValueError(f"mean_norms={norms} must all be finite and > 0 (mean L2 norms of the activations)")
        cc_cfg = cfg.crosscoder_config(d_ins, hooks)
        self.name, self.width, self.row_width = f"{cfg.architecture} crosscoder", cfg.width, cc_cfg.d_total
        self.scales = [math.sqrt(d) / n for d, n in zip(d_ins, norms)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            cc = Crosscoder(cc_cfg)
        x0 = cc.concat(init_batch)
        device = x0.device
        self.model = cc.to(device)
        self.scale = torch.cat([torch.full((d,), s, dtype=torch.float32) for d, s in zip(d_ins, self.scales)]
                               ).to(device)
        self.slices = cc_cfg.slices()
        with torch.no_grad():
            x0 = x0.float() * self.scale
            for sl in self.slices:
                cc.b_dec[sl] = geometric_median(x0[:, sl]).to(device)
        self.sparsity_coef = cc_cfg.sparsity_coef
        if cc_cfg.architecture == "topk":
            self.aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, cc_cfg.d_total // 2)

    def flatten(self, batch: Batch) -> Tensor:
        return self.model.concat(batch)  # checks the layer count and widths

    def scaled(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        x = rows * self.scale
        return x, x

    def forward(self, x: Tensor, low: torch.dtype | None, reuse: Tensor | None) -> TrainForward:
        return crosscoder_train_forward(self.model, x, low, reuse)

    def loss(self, fwd: TrainForward, target: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        # per-dimension error and variance, so the per-layer FVUs are slices of the pooled sums
        var_dim = (target - target.mean(0)).pow(2).sum(0)
        var = var_dim.sum().clamp_min(1e-12)
        err_dim = (fwd.x_hat - target).pow(2).sum(0)
        with torch.no_grad():
            layer_fvu = [err_dim[sl].sum() / var_dim[sl].sum().clamp_min(1e-12) for sl in self.slices]
        return err_dim.sum() / var, var, layer_fvu

    def aux_loss(self, fwd: TrainForward, target: Tensor, dead: Tensor) -> Tensor:
        return auxk_loss(sae_weights(self.model), fwd, target, dead, self.aux_k)

    def finish(self, threshold: float | None) -> Crosscoder:
        return self.model.fold_input_scale(self.scales)


def train_crosscoder(
    loader: Iterable[Batch],
    cfg: CrosscoderTrainConfig,
    *,
    mean_norms: Sequence[float],
    init_batch: Batch,
    hooks: Sequence[str] | None = None,
    eval_batch: Batch | None = None,
    **options: Unpack[TrainOptions],
) -> TrainResult:
    """Train a crosscoder on aligned per-layer batches (e.g. a `MultiShuffledLoader`); the log
    rows add `layer_fvu` (per-layer batch FVU), `eval_fvu` is pooled over the layers.

    `mean_norms` holds each layer's mean raw token norm (store stats; `loader.mean_norms`),
    `init_batch` a raw sample in either batch form; n_layers and d_ins are read from it. `hooks`
    names the layers in the saved config (None: the loader's `hooks` when it has them).
    Raises ValueError when a batch's layer count or widths differ from the crosscoder's.
    """
    if hooks is None:
        hooks = getattr(loader, "hooks", None)
    objective = CrosscoderObjective(cfg, mean_norms=mean_norms, init_batch=init_batch, hooks=hooks)
    return train(objective, loader, cfg, device=objective.scale.device, eval_batch=eval_batch, **options)
