"""SAE training: the config and the objective every SAE architecture gives the one loop.

- inputs scaled by s = sqrt(d_in) / mean_norm, folded back into the returned weights;
- b_dec starts at the geometric median of a sample, W_enc at W_dec.T, scaled to the first code's
  least-squares fit by default for topk, batchtopk and jumprelu (jumprelu's thresholds set from the
  sample first: `encoder_init`, `initial_l0`);
- relu/jumprelu: penalty λ·(L1 or L0), divided by the batch variance like the reconstruction term;
- batchtopk: the inference threshold is the running mean of the smallest kept activation.

The per-architecture forward passes (and their sparse gradients) are in
`analysis.dictionaries.objectives`; everything else is `analysis.dictionaries.training.loop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Unpack

import torch
from torch import Tensor

from analysis.dictionaries import SAEConfig, SparseAutoencoder, build_sae
from analysis.dictionaries.models import JumpReLUSAE
from analysis.dictionaries.config import K_ARCHITECTURES
from analysis.dictionaries.objectives import TrainForward, auxk_loss, sae_weights, train_forward
from analysis.dictionaries.training.loop import Objective, TrainOptions, TrainResult, geometric_median, train
from analysis.dictionaries.training.schedule import PenaltySchedule, TrainerConfig, default_lr


DEFAULT_ENCODER_INIT = {"topk": "least_squares", "batchtopk": "least_squares", "jumprelu": "least_squares"}
"""`encoder_init` when None; architectures not named here start from W_dec.T. Measured on the
ground truth of benchmarks/bench_sae_peers.py (benchmarks/README.md): TopK with its default rate,
FVU 0.470 -> 0.185 and true directions recovered 1.3 % -> 73.9 % at width 6144
(results/sae_peers.json); BatchTopK k = 32 at the shared rate, width 2048, FVU 0.421 -> 0.286
over 3 seeds (results/encoder_init.json); JumpReLU, with its thresholds started at `initial_l0`
and its default rate, see `LR_FACTOR`."""

LR_FACTOR = {"topk": 4.0, "batchtopk": 4.0, "jumprelu": 4.0}
"""Default learning rate over the shared law `default_lr` (which scales as 1/sqrt(width)), for
the SAE families measured at a larger one; the others use the shared law.

TopK (256 steps, k = 32, least-squares init, ground truth of benchmarks/bench_sae_peers.py):
held-out FVU at 1x / 4x is 0.256 / 0.173 at width 2048 and 0.412 / 0.185 at width 6144 over two
seeds (results/topk_lr.json), where sparsify's defaults reach 0.183 and 0.220. JumpReLU (width
2048, least-squares init, λ = 1, one seed): FVU 0.377 at L0 18.8 at 1x, 0.297 at L0 15.6 at 4x,
where TopK interpolates to 0.217 and 0.234 (benchmarks/README.md, "JumpReLU's start").
BatchTopK (width 2048, least-squares init, two seeds, results/frontiers_d128*.json): FVU at
k = 8 / 16 / 32 / 64 went from 0.51 / 0.40 / 0.29 / 0.16 at 1x to 0.37 / 0.29 / 0.20 / 0.055 at
4x, true directions recovered at k = 8-16 from 6-9 % to 50-61 %, at the cost of dead latents
(0.2-2.5 % -> 13-56 %). ReLU, transcoders and crosscoders were not measured at it. The default
suite's width-256 SAEs set their own rate and init: there TopK's 4x with this init leaves
28-40 % of a k = 8 SAE's latents dead (1x with W_dec.T: 3-5 %)."""

JUMPRELU_INITIAL_L0 = 32
"""`initial_l0` when None: the L0 a least-squares JumpReLU starts at (TopK's default k)."""


def topk_default_lr(width: int) -> float:
    """TopK's default rate, LR_FACTOR["topk"] x `default_lr(width)`: 1.6e-3 / sqrt(width / 2**14)."""
    return LR_FACTOR["topk"] * default_lr(width)


THRESHOLD_TRAVEL = 2.0
"""How far (in log units) a JumpReLU log-threshold must be able to move over one run by default.

Adam moves a parameter by about its learning rate per step whatever the gradient's size, so at
the shared rate a log-threshold can travel only ~lr x steps: 0.17 over the 256 steps of
benchmarks/bench_frontiers.py's ground truth (width 6144), where every threshold stayed near its
initial 0.5 and L0 sat at 114-125 for every λ from 0.1 to 3, the penalty doing nothing. With
the default `threshold_learning_rate` (12x the weights' there) λ = 0.3 / 1 / 3 / 10 give L0 46.5 /
35.9 / 26.8 / 20.4 (measured while that ground truth still started a seed-0 dictionary at the true
directions; the fixed one's figures are in benchmarks/README.md). Runs long enough that
lr x steps exceeds it keep the shared rate."""


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig(TrainerConfig, PenaltySchedule):
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
    threshold_lr: float | None = None
    """jumprelu: Adam learning rate of the log-thresholds (same schedule as `lr`); None = the
    larger of the base lr and THRESHOLD_TRAVEL / steps (`threshold_learning_rate`). Must be None
    for the other architectures."""
    threshold_decay: float | None = None
    """batchtopk: decay of the running mean of the smallest kept activation (the inference
    threshold); None: a time constant of 5 % of the steps (`threshold_ema_decay`)."""
    encoder_init: Literal["transpose", "least_squares"] | None = None
    """W_enc at the start: W_dec.T (`transpose`, Gao et al. 2024), or that times the factor that
    gives the first code's reconstruction of the init batch its least-squares scale
    (`least_squares`: `scale_encoder_to_fit`, which leaves the chosen latents as they are; for
    jumprelu each threshold is first set from the init batch, see `initial_l0`, and scaled with
    the encoder). None: `least_squares` for topk, batchtopk and jumprelu, `transpose` for relu
    (`DEFAULT_ENCODER_INIT`)."""
    initial_l0: int | None = None
    """jumprelu with `least_squares`: each latent's threshold starts where it fires on
    initial_l0 / width of the init batch's tokens, so the first code has about initial_l0 latents
    per token; None = JUMPRELU_INITIAL_L0. From the fixed `threshold_init` (0.5) of the transpose
    init the first code had ~500 latents per token on the ground truth and training spent its
    first 100 of 256 steps collapsing to L0 7 and climbing back (`start_thresholds_at_l0`)."""

    def __post_init__(self) -> None:
        if self.k is None and self.architecture in K_ARCHITECTURES:
            object.__setattr__(self, "k", 32)  # frozen: resolve once so ids hash the real value
        if self.encoder_init is None:
            object.__setattr__(self, "encoder_init", DEFAULT_ENCODER_INIT.get(self.architecture, "transpose"))
        self.sae_config(d_in=1)  # validates architecture, k and the sparsity fields
        self.check_schedule()
        self.check_sparsity_warmup()
        if self.threshold_lr is not None and self.architecture != "jumprelu":
            raise ValueError(f"threshold_lr={self.threshold_lr} has no meaning for "
                             f"architecture={self.architecture!r}: only jumprelu learns thresholds; pass None")
        if self.threshold_lr is not None and not self.threshold_lr > 0:
            raise ValueError(f"threshold_lr={self.threshold_lr} must be > 0, or None to let a threshold "
                             f"move by e^{THRESHOLD_TRAVEL:g} over the run")
        if self.encoder_init not in ("transpose", "least_squares"):
            raise ValueError(f"encoder_init={self.encoder_init!r}: expected 'transpose' or 'least_squares'")
        self._check_initial_l0()
        if self.threshold_decay is not None and not 0 <= self.threshold_decay < 1:
            raise ValueError(f"threshold_decay={self.threshold_decay} must be in [0, 1), e.g. 0.99, "
                             "or None for a time constant of 5 % of the steps")

    @property
    def thresholds_from_data(self) -> bool:
        """A jumprelu with the least-squares start: its thresholds are set from the init batch."""
        return self.architecture == "jumprelu" and self.encoder_init == "least_squares"

    def _check_initial_l0(self) -> None:
        if not self.thresholds_from_data:
            if self.initial_l0 is not None:
                raise ValueError(f"initial_l0={self.initial_l0} has no meaning for architecture="
                                 f"{self.architecture!r}, encoder_init={self.encoder_init!r}: only a jumprelu "
                                 "with encoder_init='least_squares' starts its thresholds from the data; pass None")
            return
        if self.threshold_init is not None:
            raise ValueError(f"threshold_init={self.threshold_init} with architecture='jumprelu' and "
                             "encoder_init='least_squares': the thresholds start from the init batch "
                             "(initial_l0); pass threshold_init=None, or encoder_init='transpose' to start "
                             "every threshold at threshold_init")
        if self.initial_l0 is not None and not 0 < self.initial_l0 < self.width:
            raise ValueError(f"initial_l0={self.initial_l0} must be in (0, width={self.width}), "
                             f"or None for {JUMPRELU_INITIAL_L0}")

    @property
    def initial_l0_value(self) -> int:
        """`initial_l0`, or JUMPRELU_INITIAL_L0 (at most half the width)."""
        if self.initial_l0 is not None:
            return self.initial_l0
        return min(JUMPRELU_INITIAL_L0, max(1, self.width // 2))

    def base_lr(self) -> float:
        """`lr`, or the default: LR_FACTOR (1 for families not in it) x `default_lr(width)`."""
        if self.lr is None:
            return LR_FACTOR.get(self.architecture, 1.0) * default_lr(self.width)
        return super().base_lr()

    def threshold_ema_decay(self) -> float:
        """`threshold_decay`, or 1 - 1/τ with τ = 5 % of the steps (at least one step).

        The estimate must describe the final encoder. A fixed 0.99 (τ = 100 steps) still carried
        the first steps' larger minima at the end of a 256-step run: on the ground truth of
        benchmarks/bench_sae_peers.py at k = 32 the saved threshold was 0.70 where the final
        encoder's k·B-th largest held-out pre-activation was 0.58, and inference fired 17.5
        latents per token, not 32. With τ = 5 % the mean covers the end of the learning-rate
        decay, where the encoder barely moves."""
        if self.threshold_decay is not None:
            return self.threshold_decay
        return 1 - 1 / max(1.0, self.total_steps / 20)

    def threshold_learning_rate(self) -> float:
        """jumprelu: `threshold_lr`, or max(base lr, THRESHOLD_TRAVEL / steps): the rate at which a
        log-threshold can move by about THRESHOLD_TRAVEL over the run (a little less: the warm-up
        and decay), never below the weights'."""
        if self.threshold_lr is not None:
            return self.threshold_lr
        return max(self.base_lr(), THRESHOLD_TRAVEL / self.total_steps)

    def resolved(self) -> dict:
        fields = super().resolved()
        # absent, not None, where unused: ids of dictionaries trained before a field existed stay valid
        if self.encoder_init == "transpose":  # the one init there was before the field
            del fields["encoder_init"]
        if self.thresholds_from_data:
            fields["initial_l0"] = self.initial_l0_value
        else:
            del fields["initial_l0"]
        if self.architecture == "jumprelu":  # learns its thresholds at their own learning rate
            return {**fields, "threshold_lr": self.threshold_learning_rate()}
        del fields["threshold_lr"]
        if self.architecture == "batchtopk":  # estimates its threshold with a running mean
            fields["threshold_decay"] = self.threshold_ema_decay()
        return fields

    def sae_config(self, d_in: int) -> SAEConfig:
        return SAEConfig(d_in=d_in, width=self.width, k=self.k, architecture=self.architecture,
                         sparsity_coef=self.sparsity_coef, threshold_init=self.threshold_init,
                         bandwidth=self.bandwidth)


@torch.no_grad()
def scale_encoder_to_fit(sae: SparseAutoencoder, sample: Tensor) -> float:
    """Multiply W_enc and b_enc by the least-squares scale of the reconstruction of `sample` (scaled
    inputs) by the current code, α = <x̂ - b, x - b> / <x̂ - b, x̂ - b>; returns α (1, and nothing
    changed, when it is not a positive number). `encoder_init='least_squares'`.

    With W_enc = W_dec.T and unit decoder rows the first code overshoots: each selected latent
    carries x's whole projection on its row, and the rows overlap. On the ground truth of
    benchmarks/bench_sae_peers.py (d=128) the first reconstruction's FVU is 2.8 for TopK k=32 and
    4.9 for BatchTopK (which gives high-norm tokens more latents), and the first tens of steps go
    to shrinking it. For TopK, BatchTopK and ReLU a scale leaves the chosen latents as they are."""
    fwd = train_forward(sae, sample)
    code_part, target = fwd.x_hat - sae.b_dec, sample - sae.b_dec
    alpha = float((code_part * target).sum() / (code_part * code_part).sum().clamp_min(1e-30))
    if not math.isfinite(alpha) or alpha <= 0:
        return 1.0
    sae.W_enc.mul_(alpha)
    sae.b_enc.mul_(alpha)
    if isinstance(sae, JumpReLUSAE):  # thresholds scale with the pre-activations: same latents pass
        sae.log_threshold.add_(math.log(alpha))
    return alpha


@torch.no_grad()
def start_thresholds_at_l0(sae: JumpReLUSAE, sample: Tensor, l0: int) -> None:
    """Set each latent's threshold between its m-th and (m+1)-th largest pre-activation on
    `sample` (scaled inputs), m = round(len(sample) x l0 / width) (at least 1): every latent fires
    on m tokens, so the first code has about `l0` latents per token and no latent starts dead. A
    threshold is kept above 1e-6 (log θ must be finite) for a latent whose m+1 largest
    pre-activations are not positive."""
    n = len(sample)
    if n < 2:
        raise ValueError(f"init_batch has {n} token(s): a JumpReLU's starting thresholds are set from its "
                         "pre-activations, which needs at least 2 (pass a batch of the activations)")
    m = min(n - 1, max(1, round(n * l0 / sae.cfg.width)))
    top = sae.pre_acts(sample).topk(m + 1, dim=0).values
    theta = ((top[m - 1] + top[m]) / 2).clamp_min(1e-6)
    sae.log_threshold.copy_(theta.log())


class SAEObjective(Objective):
    def __init__(self, d_in: int, cfg: SAETrainConfig, *, mean_norm: float, init_batch: Tensor):
        if not mean_norm > 0:
            raise ValueError(f"mean_norm={mean_norm} must be > 0 (the mean L2 norm of the activations)")
        if init_batch.shape[-1] != d_in:
            raise ValueError(f"init_batch has width {init_batch.shape[-1]} but d_in={d_in}: "
                             "pass a sample of the activations the SAE will be trained on")
        self.cfg, self.d_in = cfg, d_in
        self.name = f"{cfg.architecture} SAE"
        self.width = cfg.width
        self.row_width = d_in
        self.scale = math.sqrt(d_in) / mean_norm
        sae_cfg = cfg.sae_config(d_in)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model: SparseAutoencoder = build_sae(sae_cfg).to(init_batch.device)
        with torch.no_grad():
            sample = init_batch.float().reshape(-1, d_in) * self.scale
            self.model.b_dec.copy_(geometric_median(sample).to(init_batch.device))
            if cfg.encoder_init == "least_squares":
                if cfg.thresholds_from_data:
                    start_thresholds_at_l0(self.model, sample, cfg.initial_l0_value)
                scale_encoder_to_fit(self.model, sample)
        self.sparsity_coef = sae_cfg.sparsity_coef
        if cfg.architecture in K_ARCHITECTURES:
            self.aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, d_in // 2)

    def flatten(self, batch: Tensor) -> Tensor:
        if batch.ndim != 2 or batch.shape[1] != self.d_in:
            raise ValueError(f"training batches must be (B, d_in={self.d_in}), got {tuple(batch.shape)}")
        return batch

    def scaled(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        x = rows * self.scale
        return x, x

    def forward(self, x: Tensor, low: torch.dtype | None, reuse: Tensor | None) -> TrainForward:
        return train_forward(self.model, x, low_precision=low, reuse=reuse)

    def param_groups(self) -> list[dict]:
        if self.cfg.architecture != "jumprelu":
            return super().param_groups()
        weights = [p for name, p in self.model.named_parameters() if name != "log_threshold"]
        return [{"params": weights},
                {"params": [self.model.log_threshold],
                 "lr_scale": self.cfg.threshold_learning_rate() / self.cfg.base_lr()}]

    def aux_loss(self, fwd: TrainForward, target: Tensor, dead: Tensor) -> Tensor:
        return auxk_loss(sae_weights(self.model), fwd, target, dead, self.aux_k)

    def finish(self, threshold: float | None) -> SparseAutoencoder:
        if threshold is not None:
            with torch.no_grad():
                self.model.inference_threshold.fill_(threshold)
        return self.model.fold_input_scale(self.scale)


def train_sae(
    batches: Iterable[Tensor],
    d_in: int,
    cfg: SAETrainConfig,
    *,
    mean_norm: float,
    init_batch: Tensor,
    eval_tokens: Tensor | None = None,
    **options: Unpack[TrainOptions],
) -> TrainResult:
    """Train an SAE of `cfg.architecture` on (B, d_in) activation batches (`analysis.dictionaries.
    training.loop.train` explains logging, held-out rows and resuming).

    `mean_norm` is the mean L2 norm of the raw activations (from the activation store),
    `init_batch` a sample of raw activations for the geometric-median b_dec and `eval_tokens`
    raw held-out activations (N, d_in) scored at every log row.
    """
    objective = SAEObjective(d_in, cfg, mean_norm=mean_norm, init_batch=init_batch)
    if eval_tokens is not None and (eval_tokens.ndim != 2 or eval_tokens.shape[1] != d_in or not len(eval_tokens)):
        raise ValueError(f"eval_tokens must be (N > 0, d_in={d_in}) raw activations, got {tuple(eval_tokens.shape)}")
    return train(objective, batches, cfg, device=init_batch.device, eval_batch=eval_tokens, **options)
