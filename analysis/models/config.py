"""ViTConfig: the architecture of a HookedViT.

The defaults describe the pipeline's small "mouse" ViT (class token, learned position
embedding over every token, pre-norm blocks, final LayerNorm, linear head). The other
fields cover the variants that real checkpoints use (timm `VisionTransformer`, open_clip
image towers); their defaults reproduce the mouse architecture exactly, so configs saved
before these fields existed load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

POOLS = ("cls", "mean")
NORMS = ("final", "fc_norm", "none")
HEADS = ("linear", "proj", "none")
ACTS = ("gelu", "quick_gelu", "gelu_tanh")


def _check_choice(name: str, value: object, choices: tuple[str, ...], fix: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}; {fix}")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a HookedViT (the run config lives elsewhere, e.g. MouseTrainConfig)."""

    image_size: int = 64
    """Input height and width in pixels (square images)."""
    patch_size: int = 8
    """Patch height and width; must divide image_size."""
    in_chans: int = 1
    """Input channels (1 for dSprites-style shapes, 3 for RGB)."""
    d_model: int = 64
    """Residual stream width."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    d_mlp: int = 256
    """Hidden width of each MLP."""
    n_classes: int = 3
    """Output width of the head: classes for "linear", embedding width for "proj"."""
    pool: Literal["cls", "mean"] = "cls"
    """What the head reads: the class token, or the mean over patch tokens (timm "avg")."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon."""
    class_token: bool = True
    """Prepend a learned class token (timm `class_token`); pool="cls" needs it."""
    n_registers: int = 0
    """Learned register tokens placed after the class token, before the patches."""
    pos_embed_prefix: bool = True
    """Position embedding covers class/register tokens too (False = timm `no_embed_class`)."""
    patch_bias: bool = True
    """Bias in the patch-embedding convolution (CLIP towers have none)."""
    qkv_bias: bool = True
    """Bias in the fused q/k/v projection."""
    layer_scale: bool = False
    """Per-channel learned scale on each attention and MLP output (timm `init_values`, CaiT/DeiT-3)."""
    ln_pre: bool = False
    """LayerNorm on the embeddings before block 0 (CLIP `ln_pre`, timm `pre_norm`)."""
    norm: Literal["final", "fc_norm", "none"] = "final"
    """Where the last LayerNorm sits: on every token before pooling ("final"), on the pooled
    vector (timm `fc_norm`, open_clip `final_ln_after_pool`), or nowhere."""
    head: Literal["linear", "proj", "none"] = "linear"
    """Linear classifier with bias, bias-free projection (CLIP), or no head (pooled features)."""
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    """MLP non-linearity: exact GELU, CLIP's x*sigmoid(1.702x), or tanh-approximated GELU."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "d_model", "n_layers", "n_heads", "d_mlp", "n_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                f"pick a divisor such as {[p for p in (4, 8, 14, 16, 32) if self.image_size % p == 0]}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                "pick n_heads so each head gets d_model // n_heads dimensions"
            )
        _check_choice("pool", self.pool, POOLS, "use 'cls' for the class token or 'mean' for average pooling")
        _check_choice("norm", self.norm, NORMS, "use 'final' unless converting an fc_norm model")
        _check_choice("head", self.head, HEADS, "use 'linear' for a classifier, 'proj' for a CLIP projection")
        _check_choice("act", self.act, ACTS, "use 'gelu' unless converting a QuickGELU CLIP model")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps={self.ln_eps}: expected a small positive float, e.g. 1e-6")
        if isinstance(self.n_registers, bool) or not isinstance(self.n_registers, int) or self.n_registers < 0:
            raise ValueError(f"n_registers={self.n_registers!r}: expected an int >= 0 (0 = no registers)")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' with class_token=False: there is no class token to read; use pool='mean'")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: class token (if any) then registers."""
        return int(self.class_token) + self.n_registers

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.grid_size**2

    @property
    def n_pos(self) -> int:
        """Rows of the learned position embedding."""
        return self.grid_size**2 + (self.n_prefix if self.pos_embed_prefix else 0)

    @property
    def d_out(self) -> int:
        """Width of forward()'s output."""
        return self.d_model if self.head == "none" else self.n_classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)
