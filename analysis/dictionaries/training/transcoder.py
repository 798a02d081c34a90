"""Transcoder training: the config and the objective a TopK transcoder (hook A -> hook B) gives
the one loop (`analysis.dictionaries.training.loop`).

- x_in scaled by s_in = sqrt(d_in)/mean_norm_in and the target y by s_out = sqrt(d_out)/mean_norm_out,
  folded back into the returned weights (`TopKTranscoder.fold_scales`);
- b_in starts at the geometric median of the x_in sample, b_dec at that of y;
- the TopK SAE's sparse forward with the input centred on b_in, plus the dense skip path;
- loss = Σ‖ŷ − y‖² / Σ‖y − mean_batch(y)‖² (the batch FVU of the target); AuxK lets dead latents
  predict the residual y − ŷ (k_aux = d_out / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Unpack

import torch
from torch import Tensor

from analysis.dictionaries.objectives import TopKWeights, TrainForward, auxk_loss, topk_forward
from analysis.dictionaries.training.loop import Objective, TrainOptions, TrainResult, geometric_median, train
from analysis.dictionaries.training.schedule import TrainerConfig
from analysis.dictionaries.transcoder import TopKTranscoder, TranscoderConfig

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True, kw_only=True)
class TranscoderTrainConfig(TrainerConfig):
    """How to train one TopK transcoder; d_in and d_out come from the two stores."""

    width: int
    """Number of latents."""
    k: int = 32
    """Active latents per token."""
    skip: bool = False
    """Add a dense linear skip connection x_in @ W_skip (zero at init)."""

    def __post_init__(self) -> None:
        self.transcoder_config(1, 1)  # validates width, k and skip
        self.check_schedule()

    def transcoder_config(self, d_in: int, d_out: int) -> TranscoderConfig:
        return TranscoderConfig(d_in=d_in, d_out=d_out, width=self.width, k=self.k, skip=self.skip)


def check_pair(x: Tensor, y: Tensor, cfg: TranscoderConfig) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"batches must be (x_in (B, d_in), y (B, d_out)), got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[1] != cfg.d_in or y.shape[1] != cfg.d_out:
        raise ValueError(
            f"activation widths x_in={x.shape[1]}, y={y.shape[1]} do not match the transcoder's "
            f"d_in={cfg.d_in}, d_out={cfg.d_out}: build the transcoder from the two stores' d_model")


class TranscoderObjective(Objective):
    def __init__(self, cfg: TranscoderTrainConfig, *, mean_norm_in: float, mean_norm_out: float, init_batch: Pair):
        for name, v in (("mean_norm_in", mean_norm_in), ("mean_norm_out", mean_norm_out)):
            if not v > 0:
                raise ValueError(f"{name}={v} must be > 0 (the mean L2 norm of the raw activations)")
        x0, y0 = init_batch
        shape = cfg.transcoder_config(x0.shape[-1], y0.shape[-1])
        check_pair(x0, y0, shape)
        self.shape, self.k = shape, cfg.k
        self.name, self.width, self.row_width = "topk transcoder", cfg.width, shape.d_in + shape.d_out
        self.s_in, self.s_out = math.sqrt(shape.d_in) / mean_norm_in, math.sqrt(shape.d_out) / mean_norm_out
        device = x0.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = TopKTranscoder(shape).to(device)
        with torch.no_grad():
            self.model.b_in.copy_(geometric_median(x0.float() * self.s_in).to(device))
            self.model.b_dec.copy_(geometric_median(y0.float() * self.s_out).to(device))
        self.aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, shape.d_out // 2)

    def flatten(self, batch: Pair) -> Tensor:
        x, y = batch
        check_pair(x, y, self.shape)
        return torch.cat([x, y.to(x.dtype)], dim=1)  # rebatched as one block of rows, then split

    def scaled(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        d_in = self.shape.d_in
        return rows[:, :d_in] * self.s_in, rows[:, d_in:] * self.s_out

    def _weights(self) -> TopKWeights:
        tc = self.model
        return TopKWeights(tc.W_enc, tc.b_enc, tc.b_in, tc.W_dec, tc.b_dec)

    def forward(self, x: Tensor, low: torch.dtype | None, reuse: Tensor | None) -> TrainForward:
        fwd = topk_forward(self._weights(), x, self.k, low_precision=low, reuse=reuse)
        if self.model.W_skip is None:
            return fwd
        return fwd._replace(x_hat=fwd.x_hat + x @ self.model.W_skip)

    def aux_loss(self, fwd: TrainForward, target: Tensor, dead: Tensor) -> Tensor:
        return auxk_loss(self._weights(), fwd, target, dead, self.aux_k)

    def finish(self, threshold: float | None) -> TopKTranscoder:
        return self.model.fold_scales(self.s_in, self.s_out)


def train_transcoder(
    batches: Iterable[Pair],
    cfg: TranscoderTrainConfig,
    *,
    mean_norm_in: float,
    mean_norm_out: float,
    init_batch: Pair,
    eval_batch: Pair | None = None,
    **options: Unpack[TrainOptions],
) -> TrainResult:
    """Train a TopK transcoder on aligned raw (x_in, y) batches (e.g. a `PairedShuffledLoader`).

    `mean_norm_in/out` are the raw activations' mean L2 norms (store stats), `init_batch` a raw
    (x_in, y) sample for the bias inits (d_in and d_out are read from it), `eval_batch` raw
    held-out (x_in, y) scored at every log row (`eval_fvu` is of y, against the held-out mean).
    """
    objective = TranscoderObjective(cfg, mean_norm_in=mean_norm_in, mean_norm_out=mean_norm_out,
                                    init_batch=init_batch)
    return train(objective, batches, cfg, device=init_batch[0].device, eval_batch=eval_batch, **options)
