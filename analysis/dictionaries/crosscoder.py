"""Acausal crosscoder: one sparse latent vector that reads and writes several layers at once
(Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing").

    pre     = Σ_l (x^l − b_dec^l) @ W_enc^l + b_enc               (B, width), one code for all layers
    f       = ReLU(pre)          (architecture "relu")
            | TopK(pre), ReLU-ed (architecture "topk")
    x̂^l     = f @ W_dec^l + b_dec^l                               each latent has one decoder row per layer

Layers are stored concatenated along the feature axis: W_enc is (Σ d_l, width), W_dec is
(width, Σ d_l) and b_dec is (Σ d_l,), with layer l in the slice `cfg.slices()[l]`. The encoder is
then one matmul over the concatenated input, decoding is one embedding_bag, and layers of
different widths need no padding. `decoder_norms()` gives the (width, L) per-layer row norms.

Inputs are either a (B, L, d) tensor (all layers the same width) or a sequence of L tensors
(B, d_l); reconstructions come back in the same form. Codes travel as `EncoderOutput` padded
sparse pairs exactly like SAE codes, so mining and feature statistics work unchanged.

Decoder normalisation. ReLU crosscoders keep free decoder norms: the sparsity penalty weights
each latent by Σ_l ‖W_dec^l_i‖, which is what stops the code shrinking while the rows grow. TopK
has no penalty, so f_i and W_dec_i trade scale freely and the rows must be pinned; we keep the
*concatenated* row (all L layers together) at norm 1, not each per-layer row. Per-layer unit
norms would force every latent to write equally strongly into every layer, which contradicts
what crosscoders are for: a feature may live mostly in one layer, and the split of its norm
over layers (‖W_dec^l_i‖² sums to 1 over l) is then the fraction of its output energy in layer
l, a quantity worth reading off. Layers are scaled to mean norm sqrt(d_l) before training, so no
layer dominates the concatenated norm just by its raw magnitude.

Save/load mirror each other: config.json ("dictionary": "crosscoder", lineage under "lineage")
beside weights.safetensors; `analysis.dictionaries.load_dictionary` dispatches here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.dictionaries.base import EncoderOutput, sparsify, load_family, write_checkpoint

DICTIONARY_NAME = "crosscoder"
CrosscoderArchitecture = Literal["topk", "relu"]
CROSSCODER_ARCHITECTURES: tuple[str, ...] = get_args(CrosscoderArchitecture)
# Same units as the ReLU SAE's default (per-token squared error of sqrt(d)-scaled inputs): both the
# reconstruction error and the norm-weighted penalty are sums over layers, so they scale alike.
DEFAULT_CROSSCODER_SPARSITY_COEF = 5.0


@dataclass(frozen=True)
class CrosscoderConfig:
    """Shape of an acausal crosscoder over `n_layers` hooks of the same tokens."""

    d_ins: int | tuple[int, ...]
    """Activation width per layer: one int (every layer that wide) or one int per layer.
    Resolved to a tuple of `n_layers` ints, so config.json and ids record the real shape."""
    n_layers: int
    """Number of layers (hooks) the crosscoder reads and reconstructs, >= 1."""
    width: int
    """Number of latents, shared by all layers."""
    architecture: CrosscoderArchitecture = "topk"
    """topk (k largest pre-activations per token, concatenated-unit-norm decoder rows) | relu
    (ReLU code, penalty λ Σ_i f_i Σ_l ‖W_dec^l_i‖, free decoder norms)."""
    k: int | None = None
    """topk: active latents per token (required); must be None for relu."""
    sparsity_coef: float | None = None
    """relu: penalty weight λ in units of per-token squared error of the scaled inputs (None =
    DEFAULT_CROSSCODER_SPARSITY_COEF); must stay None for topk."""
    hooks: tuple[str, ...] | None = None
    """Hook name of each layer, in order (e.g. blocks.{0,1,2}.hook_resid_post); None = unnamed."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, int) or isinstance(self.n_layers, bool) or self.n_layers < 1:
            raise ValueError(f"CrosscoderConfig.n_layers={self.n_layers!r}: expected a positive int (layers read)")
        d_ins = (self.d_ins,) * self.n_layers if isinstance(self.d_ins, int) else tuple(self.d_ins)
        if len(d_ins) != self.n_layers:
            raise ValueError(
                f"CrosscoderConfig.d_ins has {len(d_ins)} widths {d_ins} but n_layers={self.n_layers}: "
                "pass one width per layer, or a single int for equal widths")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in d_ins):
            raise ValueError(f"CrosscoderConfig.d_ins={d_ins}: expected positive ints (each hook's d_model)")
        object.__setattr__(self, "d_ins", d_ins)  # frozen: resolve once
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise ValueError(f"CrosscoderConfig.width={self.width!r}: expected a positive int (number of latents)")
        if self.architecture not in CROSSCODER_ARCHITECTURES:
            raise ValueError(
                f"CrosscoderConfig.architecture={self.architecture!r}: use one of {list(CROSSCODER_ARCHITECTURES)}")
        if self.architecture == "topk":
            if self.sparsity_coef is not None:
                raise ValueError(
                    f"sparsity_coef={self.sparsity_coef} has no meaning for a topk crosscoder: pass None "
                    "(its sparsity is k)")
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.width:
                raise ValueError(
                    f"k={self.k!r} must satisfy 0 < k <= width={self.width} for a topk crosscoder: "
                    "lower k or widen the crosscoder")
        else:
            if self.k is not None:
                raise ValueError(f"k={self.k} has no meaning for a relu crosscoder: pass k=None (use sparsity_coef)")
            if self.sparsity_coef is None:
                object.__setattr__(self, "sparsity_coef", DEFAULT_CROSSCODER_SPARSITY_COEF)
            if not self.sparsity_coef > 0:
                raise ValueError(f"sparsity_coef={self.sparsity_coef} must be > 0 for a relu crosscoder")
        if self.hooks is not None:
            hooks = tuple(self.hooks)
            if len(hooks) != self.n_layers or not all(isinstance(h, str) and h for h in hooks):
                raise ValueError(
                    f"CrosscoderConfig.hooks={hooks!r}: expected {self.n_layers} non-empty hook names "
                    f"(n_layers={self.n_layers}), or None")
            object.__setattr__(self, "hooks", hooks)

    @property
    def d_total(self) -> int:
        """Width of the concatenated input Σ_l d_l."""
        return sum(self.d_ins)

    @property
    def equal_widths(self) -> bool:
        return len(set(self.d_ins)) == 1

    def slices(self) -> tuple[slice, ...]:
        """Where each layer sits in the concatenated feature axis."""
        ends = [0]
        for d in self.d_ins:
            ends.append(ends[-1] + d)
        return tuple(slice(a, b) for a, b in zip(ends, ends[1:]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["d_ins"] = list(self.d_ins)
        d["hooks"] = None if self.hooks is None else list(self.hooks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CrosscoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CrosscoderConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("d_ins"), list):
            d["d_ins"] = tuple(d["d_ins"])
        if isinstance(d.get("hooks"), list):
            d["hooks"] = tuple(d["hooks"])
        return cls(**d)


class CrosscoderOutput(NamedTuple):
    x_hat: Tensor | tuple[Tensor, ...]
    """Reconstruction in the input's form: (..., L, d) tensor, or a tuple of (..., d_l) tensors."""
    top_acts: Tensor
    """(B, m) activations of the latents in `top_indices` (0.0 in unused slots); B = tokens."""
    top_indices: Tensor
    """(B, m) int64 latent ids, unique within a row; m = k for topk."""


class Crosscoder(nn.Module):
    """Acausal crosscoder; see the module docstring for the maths and the storage layout."""

    def __init__(self, cfg: CrosscoderConfig, *, device: str | torch.device = "cpu", dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.lineage: dict | None = None
        w_dec = torch.randn(cfg.width, cfg.d_total, device=device, dtype=dtype)
        # relu: small rows (the penalty then starts small), as for ReLU SAEs; topk: unit rows
        norm = 1.0 if cfg.architecture == "topk" else 0.1
        w_dec *= norm / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # W_enc = W_dec^T at init, (d_total, width) with a width-major layout like the SAEs': the
        # sparse encoder backward produces its gradient in that layout (whole latent columns)
        self.W_enc = nn.Parameter(w_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_total, device=device, dtype=dtype))

    @property
    def unit_norm_decoder(self) -> bool:
        """topk keeps concatenated decoder rows at norm 1; relu's penalty uses the norms instead."""
        return self.cfg.architecture == "topk"

    # -- shape handling -------------------------------------------------------------------
    def concat(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """(B, L, d) tensor or L tensors (..., d_l) -> (tokens, Σ d_l), checking layers and widths."""
        L, d_ins = self.cfg.n_layers, self.cfg.d_ins
        if isinstance(x, Tensor):
            if x.ndim < 2 or x.shape[-2] != L or not self.cfg.equal_widths or x.shape[-1] != d_ins[0]:
                raise ValueError(
                    f"input shape {tuple(x.shape)} does not match this crosscoder's n_layers={L}, "
                    f"d_ins={d_ins}: pass a (B, {L}, d) tensor when all layers share d, else a tuple "
                    "of per-layer (B, d_l) tensors")
            return x.reshape(-1, L * d_ins[0])
        parts = list(x)
        if len(parts) != L:
            raise ValueError(
                f"got {len(parts)} layers but this crosscoder has n_layers={L}: pass one tensor per "
                f"hook it was trained on ({self.cfg.hooks or 'in training order'})")
        widths = tuple(p.shape[-1] for p in parts)
        if widths != d_ins:
            raise ValueError(
                f"layer widths {widths} do not match this crosscoder's d_ins={d_ins}: feed the "
                "activations of the hooks it was trained on, in the same order")
        tokens = {p.shape[:-1].numel() for p in parts}
        if len(tokens) != 1:
            raise ValueError(f"layers hold different token counts {[tuple(p.shape) for p in parts]}: align them")
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=1)

    def split(self, x_cat: Tensor, like: Tensor | Sequence[Tensor] | None = None) -> Tensor | tuple[Tensor, ...]:
        """(tokens, Σ d_l) -> the input's form: (..., L, d) when `like` is a tensor (or None with
        equal widths), else a tuple of (..., d_l)."""
        L = self.cfg.n_layers
        if isinstance(like, Tensor) or (like is None and self.cfg.equal_widths):
            lead = like.shape[:-2] if isinstance(like, Tensor) else x_cat.shape[:1]
            return x_cat.reshape(*lead, L, self.cfg.d_ins[0])
        parts = [x_cat[:, s] for s in self.cfg.slices()]
        if like is not None:
            parts = [p.reshape(*q.shape[:-1], p.shape[-1]) for p, q in zip(parts, like)]
        return tuple(parts)

    # -- forward pieces -------------------------------------------------------------------
    def pre_acts(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """(tokens, width) pre-activations Σ_l (x^l − b_dec^l) W_enc^l + b_enc: one matmul."""
        return self.pre_acts_concat(self.concat(x))

    def pre_acts_concat(self, x_cat: Tensor) -> Tensor:
        """`pre_acts` of an already concatenated (tokens, Σ d_l) input."""
        return torch.addmm(self.b_enc, x_cat - self.b_dec, self.W_enc)

    def encode(self, x: Tensor | Sequence[Tensor]) -> EncoderOutput:
        return self.encode_concat(self.concat(x))

    def encode_concat(self, x_cat: Tensor) -> EncoderOutput:
        """`encode` of an already concatenated (tokens, Σ d_l) input."""
        pre = self.pre_acts_concat(x_cat)
        if self.cfg.architecture == "topk":
            # ReLU is monotone: select on pre, ReLU only the k winners
            vals, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
            return EncoderOutput(vals.relu(), idx)
        return sparsify(pre.relu())

    def dense_latents(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """(tokens, width) code: the encoded activations, zeros elsewhere."""
        enc = self.encode(x)
        z = enc.top_acts.new_zeros(enc.top_acts.shape[0], self.cfg.width)
        return z.scatter_(1, enc.top_indices, enc.top_acts)

    def decode_concat(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """(tokens, Σ d_l) reconstruction of every layer, one sparse embedding_bag."""
        y = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum")
        return y + self.b_dec

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Per-layer reconstructions: (tokens, L, d) when all widths are equal, else a tuple."""
        return self.split(self.decode_concat(top_acts, top_indices))

    def forward(self, x: Tensor | Sequence[Tensor]) -> CrosscoderOutput:
        enc = self.encode(x)
        x_hat = self.split(self.decode_concat(enc.top_acts, enc.top_indices), like=x)
        return CrosscoderOutput(x_hat, enc.top_acts, enc.top_indices)

    def decoder_norms(self) -> Tensor:
        """(width, L) norm of each latent's decoder row in each layer, ‖W_dec^l_i‖."""
        return torch.stack([self.W_dec[:, s].norm(dim=1) for s in self.cfg.slices()], dim=1)

    def penalty(self, z: Tensor) -> Tensor:
        """Σ_tokens Σ_i f_i Σ_l ‖W_dec^l_i‖ for a dense (tokens, width) code (not yet times λ)."""
        return (z @ self.decoder_norms().sum(1)).sum()

    # -- transforms -----------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Concatenated decoder rows to norm 1 (topk; see the module docstring for why)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scales: float | Sequence[float]) -> Crosscoder:
        """A copy that takes raw x where this crosscoder was trained on (s_1 x^1, …, s_L x^L).

        With c = the geometric mean of the s_l, set W_enc^l' = (s_l/c) W_enc^l, b_enc' = b_enc/c,
        b_dec^l' = b_dec^l/s_l and W_dec^l' = (c/s_l) W_dec^l. Then pre' = pre/c, so ReLU and TopK
        keep the same latents with activations divided by c, and x̂^l'(x) = x̂^l(s x)/s_l exactly.
        Equal scales give c = s: only the biases change, as for SAEs, and decoder rows keep their
        norms. Unequal scales move each latent's norm split across layers into raw units.
        """
        L = self.cfg.n_layers
        s = [float(scales)] * L if isinstance(scales, (int, float)) else [float(v) for v in scales]
        if len(s) != L or not all(v > 0 and math.isfinite(v) for v in s):
            raise ValueError(f"scales={scales!r}: expected {L} finite values > 0 (one per layer), or one float")
        c = math.exp(sum(math.log(v) for v in s) / L)
        out = Crosscoder(self.cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        out.load_state_dict(self.state_dict())
        for s_l, sl in zip(s, self.cfg.slices()):
            out.W_enc[sl] *= s_l / c
            out.b_dec[sl] /= s_l
            out.W_dec[:, sl] *= c / s_l
        out.b_enc /= c
        out.lineage = self.lineage
        return out

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """weights.safetensors + config.json ("dictionary": "crosscoder"; lineage under "lineage")."""
        return write_checkpoint(directory, self, self.cfg.to_dict(), DICTIONARY_NAME, extra_config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
        return load_family(cls, directory, DICTIONARY_NAME, CrosscoderConfig, device)
