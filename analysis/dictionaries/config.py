"""Shape and sparsity mechanism of one sparse autoencoder (the model config).

Training settings (lr, batch, length) live in `analysis.dictionaries.training.sae.SAETrainConfig`. Fields that an
architecture does not use must stay None, so a config never carries a knob that does nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

# Defaults for inputs scaled to mean norm sqrt(d_in) (the trainer's convention), where the
# reconstruction term is the per-token squared error summed over dimensions. ReLU's 1 (was 5, the
# value Conerly et al. use on runs of billions of tokens): on runs of 0.5k steps L1 shrinks every
# code well before 5 (benchmarks/bench_frontiers.py: λ = 3 already leaves the default suite's
# blocks.0 SAE at loss recovered 0.30 and the ground truth at FVU 0.50; λ = 1 gives 0.66 and 0.17).
DEFAULT_SPARSITY_COEF = {"relu": 1.0, "jumprelu": 1.0}
DEFAULT_THRESHOLD_INIT = 0.5
DEFAULT_BANDWIDTH = 0.05

_USES = {  # architecture -> optional fields it needs
    "topk": {"k"},
    "batchtopk": {"k"},
    "relu": {"sparsity_coef"},
    "jumprelu": {"sparsity_coef", "threshold_init", "bandwidth"},
}
# how an architecture sets its sparsity: a k of active latents, or a penalty coefficient
K_ARCHITECTURES: tuple[str, ...] = tuple(a for a in ARCHITECTURES if "k" in _USES[a])
PENALTY_ARCHITECTURES: tuple[str, ...] = tuple(a for a in ARCHITECTURES if "sparsity_coef" in _USES[a])


@dataclass(frozen=True)
class SAEConfig:
    """Shape of an SAE; optional fields a given architecture does not use must be None."""

    d_in: int
    """Width of the activations the SAE reads and reconstructs (the hook's d_model)."""
    width: int
    """Number of latents (dictionary size), typically 16-32 x d_in."""
    k: int | None = None
    """topk: latents kept per token; batchtopk: mean latents kept per token (k·B per batch).
    Required for those two, None for relu/jumprelu (their sparsity comes from a penalty)."""
    architecture: Architecture = "topk"
    """topk | batchtopk (trained with a batch-level TopK, inference is a JumpReLU with the saved
    threshold) | relu (ReLU + L1 weighted by decoder row norm) | jumprelu (learned per-latent
    thresholds, L0 penalty through a straight-through estimator)."""
    sparsity_coef: float | None = None
    """relu: L1 weight λ; jumprelu: L0 weight λ (both in units of per-token squared error of the
    sqrt(d_in)-scaled input). None picks the architecture default; must stay None otherwise."""
    threshold_init: float | None = None
    """jumprelu: initial threshold of every latent (scaled-input units); None = default."""
    bandwidth: float | None = None
    """jumprelu: width ε of the rectangle kernel in the threshold pseudo-gradient; None = default."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported: use one of {list(ARCHITECTURES)}"
            )
        if self.d_in <= 0:
            raise ValueError(f"d_in={self.d_in} must be > 0: pass the hook's activation width")
        if self.width <= 0:
            raise ValueError(f"width={self.width} must be > 0: pass the number of latents")
        uses = _USES[self.architecture]
        defaults = {
            "sparsity_coef": DEFAULT_SPARSITY_COEF.get(self.architecture),
            "threshold_init": DEFAULT_THRESHOLD_INIT,
            "bandwidth": DEFAULT_BANDWIDTH,
        }
        for name in ("k", "sparsity_coef", "threshold_init", "bandwidth"):
            value = getattr(self, name)
            if name not in uses:
                if value is not None:
                    raise ValueError(
                        f"{name}={value} has no meaning for architecture={self.architecture!r}: "
                        f"pass {name}=None (it uses {sorted(uses)})"
                    )
            elif value is None and name in defaults:
                # frozen dataclass: resolve the default once so config.json records the real value
                object.__setattr__(self, name, defaults[name])
        if "k" in uses:
            if self.k is None or not 0 < self.k <= self.width:
                raise ValueError(
                    f"k={self.k} must satisfy 0 < k <= width={self.width} for {self.architecture!r}: "
                    "lower k or widen the SAE"
                )
        for name in ("sparsity_coef", "threshold_init", "bandwidth"):
            value = getattr(self, name)
            if name in uses and not value > 0:
                raise ValueError(f"{name}={value} must be > 0 for {self.architecture!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)
