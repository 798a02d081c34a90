"""What every SAE architecture shares: parameters, the dense encoder matmul, sparse decoding,
scale folding and save/load.

    pre    = (x - b_dec) @ W_enc + b_enc                       (B, width)
    z      = activation(pre)                                   architecture-specific, sparse
    x_hat  = z @ W_dec + b_dec

Latent codes travel as padded sparse pairs (`EncoderOutput`): per token, `top_acts[b, j]` is the
activation of latent `top_indices[b, j]`. TopK has exactly k slots; the threshold-based
architectures get as many slots as the busiest token of the batch needs, the unused slots of
other tokens holding 0.0 (indices stay unique within a row). Every consumer therefore works
the same way for all architectures: decode is an embedding_bag over the slots, and a latent
"fired" where its slot value is nonzero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from analysis.dictionaries.config import SAEConfig
from analysis.integrity import atomic_write, write_bytes

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
DICTIONARY_KEY = "dictionary"  # config.json key naming the dictionary family (SAEs today)


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """(B, m) activations of the latents in `top_indices` (0.0 in unused slots)."""
    top_indices: Tensor
    """(B, m) int64 latent ids, unique within a row; m = k for TopK."""


class SAEOutput(NamedTuple):
    x_hat: Tensor
    """(..., d_in) reconstruction, same shape as the input."""
    top_acts: Tensor
    top_indices: Tensor


def sparsify(z: Tensor) -> EncoderOutput:
    """Dense (B, width) nonnegative codes -> padded pairs with m = max nonzeros per row."""
    m = max(1, int((z != 0).sum(1).max())) if z.shape[0] else 1
    vals, idx = z.topk(min(m, z.shape[1]), dim=1, sorted=False)
    return EncoderOutput(vals, idx)


class SparseAutoencoder(nn.Module):
    """Base class; subclasses set `architecture` and implement `encode`."""

    architecture: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at norm 1 by the trainer (all but relu, whose penalty uses the norms)."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device = "cpu", dtype=torch.float32):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs architecture={self.architecture!r}, got "
                f"{cfg.architecture!r}: build it with build_sae(cfg)"
            )
        self.cfg = cfg
        self.lineage: dict | None = None
        w_dec = torch.randn(cfg.width, cfg.d_in, device=device, dtype=dtype)
        w_dec *= self._init_decoder_norm() / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # W_enc = W_dec.T at init (Gao et al., Conerly et al.). It is stored with a
        # (width, d_in)-contiguous layout: the sparse backward pass gathers and scatters whole
        # latent columns, which is then a contiguous row access.
        self.W_enc = nn.Parameter(w_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    def _init_decoder_norm(self) -> float:
        return 1.0

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
        raise NotImplementedError

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
        """(B, width) latent vector: the encoded activations, zeros elsewhere."""
        enc = self.encode(x)
        z = torch.zeros(enc.top_acts.shape[0], self.cfg.width, device=x.device, dtype=enc.top_acts.dtype)
        return z.scatter_(1, enc.top_indices, enc.top_acts)

    # -- transforms -----------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, s: float) -> SparseAutoencoder:
        """A copy that takes raw x where this SAE was trained on s*x.

        With b_enc' = b_enc/s and b_dec' = b_dec/s the new pre-activations are pre/s; every
        activation here is positively homogeneous once thresholds are divided by s too
        (`_fold_thresholds`), so the same latents fire, activations shrink by s and
        x_hat' = x_hat(s*x)/s. W_enc and W_dec are untouched (unit-norm rows stay unit-norm).
        """
        if not s > 0:
            raise ValueError(f"scale s={s} must be > 0")
        out = type(self)(self.cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        out.load_state_dict(self.state_dict())
        out.b_enc.div_(s)
        out.b_dec.div_(s)
        out._fold_thresholds(s)
        out.lineage = self.lineage
        return out

    def _fold_thresholds(self, s: float) -> None:
        pass

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """weights.safetensors + config.json; `extra_config` (lineage) is stored under "lineage"."""
        return write_checkpoint(directory, self, self.cfg.to_dict(), "sae", extra_config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Load a checkpoint saved by `save`; use `load_dictionary` when the architecture is unknown."""
        cfg, lineage, tensors = read_checkpoint(directory, device)
        if cfg.architecture != cls.architecture:
            raise ValueError(
                f"{directory} holds a {cfg.architecture!r} SAE, not {cls.architecture!r}: "
                "load it with analysis.dictionaries.load_dictionary(directory)"
            )
        sae = cls(cfg, device=device, dtype=tensors["W_dec"].dtype)
        # strict: a missing or extra tensor is a corrupt or foreign checkpoint, never silently ok
        sae.load_state_dict(tensors, strict=True)
        sae.lineage = lineage
        return sae


def write_checkpoint(directory: str | Path, module: nn.Module, config: dict, family: str,
                     extra_config: dict | None = None) -> Path:
    """Every dictionary's `save`: weights.safetensors beside config.json, which holds the shape
    config, the family under "dictionary" and the lineage (`extra_config`, else `module.lineage`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    lineage = extra_config if extra_config is not None else getattr(module, "lineage", None)
    config = {**config, DICTIONARY_KEY: family, "lineage": lineage or {}}
    write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    return directory


def read_family_config(directory: str | Path, family: str) -> tuple[dict, dict]:
    """(shape config dict, lineage) of a checkpoint that must be of `family`, with clear errors."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        what = "SAE" if family == "sae" else family
        raise FileNotFoundError(f"no {what} checkpoint at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    lineage = config.pop("lineage", {})
    kind = config.pop(DICTIONARY_KEY, "sae")  # checkpoints written before the key existed are SAEs
    if kind != family:
        raise ValueError(
            f"{directory} holds a {kind!r} dictionary, not a {family!r}: "
            "load it with analysis.dictionaries.load_dictionary(directory)")
    return config, lineage


def load_family(cls, directory: str | Path, family: str, config_cls, device: str | torch.device = "cpu"):
    """Every non-SAE dictionary's `load`: `cls(config_cls.from_dict(config))` with the weights
    loaded strictly (a missing or extra tensor means a foreign or corrupt file) and its lineage."""
    config, lineage = read_family_config(directory, family)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))
    module = cls(config_cls.from_dict(config), device=device, dtype=tensors["W_dec"].dtype)
    module.load_state_dict(tensors, strict=True)
    module.lineage = lineage
    return module


def read_config(directory: str | Path) -> tuple[SAEConfig, dict]:
    """(config, lineage) of an SAE checkpoint directory, with clear errors when absent."""
    config, lineage = read_family_config(directory, "sae")
    return SAEConfig.from_dict(config), lineage


def read_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SAEConfig, dict, dict]:
    """(config, lineage, tensors) of a checkpoint directory."""
    cfg, lineage = read_config(directory)
    return cfg, lineage, load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))
