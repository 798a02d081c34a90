"""TopK transcoder: a sparse dictionary that reads one hook and predicts another.

    pre   = (x_in - b_in) @ W_enc + b_enc                    (B, width)
    z     = TopK(pre), ReLU on the kept values               k nonzeros per token
    y_hat = z @ W_dec + b_dec (+ x_in @ W_skip)              (B, d_out)

Unlike an SAE the input and output widths differ, so the encoder centre `b_in` and the
decoder bias `b_dec` are separate parameters. The optional skip connection (a dense linear
map, zero at init) carries the linear part of hook A -> hook B, leaving the latents for the
nonlinear remainder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.dictionaries.base import load_family, write_checkpoint

DICTIONARY_NAME = "transcoder"


@dataclass(frozen=True)
class TranscoderConfig:
    """Shape of a TopK transcoder."""

    d_in: int
    """Width of the input hook's activations."""
    d_out: int
    """Width of the output hook's activations (the prediction target)."""
    width: int
    """Number of latents."""
    k: int
    """Active latents per token (TopK)."""
    skip: bool = False
    """Add a dense linear skip connection x_in @ W_skip (zero at init)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "width", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TranscoderConfig.{name}={v!r}: expected a positive int")
        if self.k > self.width:
            raise ValueError(
                f"TranscoderConfig.k={self.k} > width={self.width}: k counts active latents, "
                "so pick k <= width (e.g. k=32)"
            )
        if not isinstance(self.skip, bool):
            raise ValueError(f"TranscoderConfig.skip={self.skip!r}: expected True or False")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TranscoderConfig:
        return cls(**d)


class TranscoderOutput(NamedTuple):
    y_hat: Tensor
    """(B, d_out) prediction of the output hook."""
    top_acts: Tensor
    """(B, k) activations of the latents in `top_indices` (>= 0; ReLU-ed)."""
    top_indices: Tensor
    """(B, k) int64 latent ids."""


class TopKTranscoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig, *, device: str | torch.device = "cpu", dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.lineage: dict | None = None
        w_dec = torch.randn(cfg.width, cfg.d_out, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        # Unit-norm encoder columns: with inputs scaled to norm sqrt(d_in), pre-activations start O(1).
        w_enc = torch.randn(cfg.d_in, cfg.width, device=device, dtype=dtype)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width, device=device, dtype=dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, device=device, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, device=device, dtype=dtype))
        else:
            self.register_parameter("W_skip", None)

    unit_norm_decoder = True
    """Decoder rows stay at norm 1 while training (the loop keeps them on the sphere)."""

    def _check(self, x_in: Tensor) -> Tensor:
        if x_in.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input last dim is {x_in.shape[-1]} but this transcoder has d_in={self.cfg.d_in}: "
                "feed activations from the hook it was trained to read"
            )
        return x_in.reshape(-1, self.cfg.d_in)

    def encode(self, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """(top_acts, top_indices), each (B, k)."""
        x = self._check(x_in)
        pre = torch.addmm(self.b_enc, x - self.b_in, self.W_enc)
        vals, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
        return F.relu(vals), idx

    def decode(self, top_acts: Tensor, top_indices: Tensor, x_in: Tensor | None = None) -> Tensor:
        """Sparse decode over the k slots, plus the skip path when the model has one."""
        y = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum") + self.b_dec
        if self.W_skip is not None:
            if x_in is None:
                raise ValueError("this transcoder has a skip connection: pass x_in to decode")
            y = y + self._check(x_in) @ self.W_skip
        return y

    def dense_latents(self, x_in: Tensor) -> Tensor:
        """(B, width) latent vector: the k encoded activations, zeros elsewhere (for mining)."""
        acts, idx = self.encode(x_in)
        return torch.zeros(acts.shape[0], self.cfg.width, device=acts.device, dtype=acts.dtype).scatter_(1, idx, acts)

    def forward(self, x_in: Tensor) -> TranscoderOutput:
        acts, idx = self.encode(x_in)
        y = self.decode(acts, idx, x_in)
        return TranscoderOutput(y.reshape(*x_in.shape[:-1], self.cfg.d_out), acts, idx)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_scales(self, s_in: float, s_out: float) -> TopKTranscoder:
        """A copy taking raw x_in and predicting raw y, where this one maps s_in*x -> s_out*y.

        TopK + ReLU is positively homogeneous, so scaling the pre-activations by 1/s_out keeps
        the selected latents: W_enc' = (s_in/s_out) W_enc, b_enc' = b_enc/s_out,
        b_in' = b_in/s_in, b_dec' = b_dec/s_out, W_skip' = (s_in/s_out) W_skip; W_dec stays
        unit-norm. Then y_hat'(x) = y_hat(s_in*x) / s_out exactly.
        """
        if not (s_in > 0 and s_out > 0):
            raise ValueError(f"scales s_in={s_in}, s_out={s_out} must both be > 0")
        out = TopKTranscoder(self.cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        out.load_state_dict(self.state_dict())
        r = s_in / s_out
        out.W_enc.mul_(r)
        out.b_enc.div_(s_out)
        out.b_in.div_(s_in)
        out.b_dec.div_(s_out)
        if out.W_skip is not None:
            out.W_skip.mul_(r)
        out.lineage = self.lineage
        return out

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """weights.safetensors + config.json ("dictionary": "transcoder"; lineage under "lineage")."""
        return write_checkpoint(directory, self, self.cfg.to_dict(), DICTIONARY_NAME, extra_config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TopKTranscoder:
        return load_family(cls, directory, DICTIONARY_NAME, TranscoderConfig, device)
