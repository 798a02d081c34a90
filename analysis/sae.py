"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    pre    = (x - b_dec) @ W_enc + b_enc                       (B, width)
    z      = TopK(ReLU(pre))                                   k nonzeros per token
    x_hat  = z @ W_dec + b_dec

Only the encoder matmul is dense. The code keeps z as (values, indices) pairs and decodes
by gathering the k selected rows of W_dec, so decoding costs O(B·k·d) rather than O(B·width·d).
The decoder rows are unit-norm (the trainer keeps them so); activations therefore carry the
magnitude of each feature's contribution.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class SAEConfig:
    """Shape of a TopK SAE (the model config; training settings live in `SAETrainConfig`)."""

    d_in: int
    """Width of the activations the SAE reads and reconstructs (the hook's d_model)."""
    width: int
    """Number of latents (dictionary size), typically 16-32 x d_in."""
    k: int
    """Latents kept per token by the TopK activation (the L0 budget)."""
    architecture: Literal["topk"] = "topk"
    """Activation function family; only TopK is implemented."""

    def __post_init__(self) -> None:
        if self.d_in <= 0:
            raise ValueError(f"d_in={self.d_in} must be > 0: pass the hook's activation width")
        if self.width <= 0:
            raise ValueError(f"width={self.width} must be > 0: pass the number of latents")
        if not 0 < self.k <= self.width:
            raise ValueError(
                f"k={self.k} must satisfy 0 < k <= width={self.width}: lower k or widen the SAE"
            )
        if self.architecture != "topk":
            raise ValueError(f"architecture={self.architecture!r} is not supported: use 'topk'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """(B, k) post-ReLU activations of the selected latents (zeros where fewer than k are positive)."""
    top_indices: Tensor
    """(B, k) int64 latent ids of those activations."""


class SAEOutput(NamedTuple):
    x_hat: Tensor
    """(B, d_in) reconstruction."""
    top_acts: Tensor
    top_indices: Tensor


class TopKSAE(nn.Module):
    """TopK SAE working on (..., d_in) activations; leading dims are flattened and restored."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device = "cpu", dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.lineage: dict | None = None
        w_dec = torch.randn(cfg.width, cfg.d_in, device=device, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # W_enc = W_dec.T at init (the paper's initialisation). It is stored with a
        # (width, d_in)-contiguous layout: the sparse backward pass gathers and scatters whole
        # latent columns, which is then a contiguous row access.
        self.W_enc = nn.Parameter(w_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    # -- shape handling -------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input last dim is {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}: "
                "feed activations from the hook the SAE was trained on"
            )
        return x.reshape(-1, self.cfg.d_in)

    # -- forward pieces -------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """(B, width) encoder pre-activations; the one dense matmul."""
        x = self._flatten(x)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: Tensor) -> EncoderOutput:
        """TopK(ReLU(pre)). ReLU is monotone, so selecting on `pre` and applying ReLU to the k
        winners gives the same activations while touching only B*k values."""
        vals, idx = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(vals.relu(), idx)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sparse decode: x_hat = sum_j top_acts[:, j] * W_dec[top_indices[:, j]] + b_dec."""
        y = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum")
        return y + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        shape = x.shape
        enc = self.encode(x)
        x_hat = self.decode(enc.top_acts, enc.top_indices)
        return SAEOutput(x_hat.reshape(shape), enc.top_acts, enc.top_indices)

    def dense_latents(self, x: Tensor) -> Tensor:
        """(B, width) latent vector with the k winners filled in and zeros elsewhere."""
        enc = self.encode(x)
        z = torch.zeros(enc.top_acts.shape[0], self.cfg.width, device=x.device, dtype=enc.top_acts.dtype)
        return z.scatter_(1, enc.top_indices, enc.top_acts)

    # -- transforms -----------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, s: float) -> TopKSAE:
        """A copy that takes raw x where this SAE was trained on s*x.

        With b_enc' = b_enc/s and b_dec' = b_dec/s the new pre-activations are pre/s, so the
        same latents win, activations shrink by s, and x_hat' = x_hat(s*x)/s. W_enc and W_dec
        are untouched, which keeps the decoder rows unit-norm.
        """
        if not s > 0:
            raise ValueError(f"scale s={s} must be > 0")
        out = TopKSAE(self.cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        out.load_state_dict(self.state_dict())
        out.b_enc.div_(s)
        out.b_dec.div_(s)
        out.lineage = self.lineage
        return out

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """weights.safetensors + config.json; `extra_config` (lineage) is stored under "lineage"."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        lineage = extra_config if extra_config is not None else self.lineage
        config = {**self.cfg.to_dict(), "lineage": lineage or {}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"no SAE checkpoint at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        lineage = config.pop("lineage", {})
        cfg = SAEConfig.from_dict(config)
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        sae = cls(cfg, device=device, dtype=tensors["W_dec"].dtype)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(tensors[name])
        sae.lineage = lineage
        return sae
