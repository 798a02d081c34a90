"""Which tokens an activation store keeps, and where each kind of token sits in it.

A hooked ViT's token axis is: the class token (if the model has one), then its register tokens
(if any), then the patch grid row by row (analysis.models.vit). A store keeps a selection of them:

    all           every token
    cls           the class token only
    patches       the patch tokens only
    no_registers  the class token and the patches: registers dropped (they carry global,
                  high-norm "scratch" activations, Darcet et al. 2024, "Vision Transformers
                  Need Registers"), so dictionaries and statistics see only the image's tokens

`TokenGroups` records, for the store's own token axis, the [start, stop) range of each kind, so
per-kind metrics, mining heatmaps and notebooks never assume "CLS at 0, patches after it".

With `patches_sample=N` a store keeps only N of the patches of each image: a seeded sample drawn
from the image's index alone (`TokenSelection.positions_for`), so any batch, shard or rerun picks
the same ones, and an ImageNet-sized store of a 197-token ViT shrinks by up to the patch count.
Splicing still replaces every position of the kinds kept (`keep`): a dictionary trained on a
sample of patch tokens is a dictionary of patch tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from analysis.models.config import ViTConfig

TOKEN_SELECTIONS = ("all", "cls", "patches", "no_registers")

Span = tuple[int, int]


@dataclass(frozen=True)
class TokenGroups:
    """[start, stop) of each kind of token along a store's token axis; (0, 0) when absent."""

    cls: Span
    registers: Span
    patches: Span
    patch_grid: tuple[int, int]
    """(rows, cols) of the model's patch grid; the patch range holds it row by row when kept."""

    @property
    def n_tokens(self) -> int:
        return max(stop for _, stop in (self.cls, self.registers, self.patches))

    def positions(self, kind: str) -> slice | None:
        """The store positions of one kind (`cls`, `registers`, `patches`), or None when absent."""
        if kind not in ("cls", "registers", "patches"):
            raise ValueError(f"token kind {kind!r}: expected 'cls', 'registers' or 'patches'")
        start, stop = getattr(self, kind)
        return slice(start, stop) if stop > start else None

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "TokenGroups":
        return cls(**{k: tuple(int(i) for i in raw[k]) for k in ("cls", "registers", "patches", "patch_grid")})


@dataclass(frozen=True)
class TokenSelection:
    """A selection applied to one model: which model positions to keep and what they become."""

    keep: slice | tuple[int, ...]
    """Positions along the model's token axis: a slice when contiguous, else explicit indices.
    With a patch sample, every position of the kinds kept (what splicing replaces)."""
    groups: TokenGroups
    sample: int | None = None
    """Patches stored per image (a seeded sample), or None for all of them."""
    model_positions: dict = field(default_factory=dict, compare=False)
    """Kind kept (`cls`, `registers`, `patches`) -> its positions along the model's token axis
    (every patch, even when the store keeps a sample): what splicing one kind alone replaces."""

    def positions_for(self, image_idx) -> torch.Tensor:
        """(n, T) model positions stored for each image: the kept class token and registers, then
        `sample` patches drawn without replacement from a generator seeded by the image index,
        in row-major order."""
        fixed = _positions(self.keep)
        patches = [p for p in fixed if p >= self.patch_start]
        prefix = [p for p in fixed if p < self.patch_start]
        rows = []
        for i in np.asarray(image_idx, dtype=np.int64).reshape(-1):
            drawn = np.random.default_rng([int(i), _SAMPLE_SEED]).choice(len(patches), self.sample, replace=False)
            rows.append(prefix + [patches[j] for j in np.sort(drawn)])
        return torch.tensor(rows, dtype=torch.long)

    @property
    def patch_start(self) -> int:
        rows, cols = self.groups.patch_grid
        return max(_positions(self.keep)) + 1 - rows * cols


_SAMPLE_SEED = 0
"""Fixed, so the sample depends on the image alone; the store records it in its lineage."""


def _positions(keep: slice | tuple[int, ...]) -> list[int]:
    return list(range(keep.start, keep.stop)) if isinstance(keep, slice) else list(keep)


_KINDS_KEPT = {"all": ("cls", "registers", "patches"), "cls": ("cls",), "patches": ("patches",),
               "no_registers": ("cls", "patches")}


def select_tokens(vit: ViTConfig, selection: str, patches_sample: int | None = None) -> TokenSelection:
    """The positions `selection` keeps from `vit`'s tokens, and the groups of the kept axis; with
    `patches_sample`, N patches of each image (see the module docstring)."""
    if selection not in TOKEN_SELECTIONS:
        raise ValueError(f"token selection {selection!r}: expected one of {', '.join(TOKEN_SELECTIONS)}")
    if selection == "cls" and not vit.class_token:
        raise ValueError(
            "token selection 'cls' but the model has no class token (class_token=False, "
            f"pool={vit.pool!r}): keep 'patches' or 'all' instead"
        )
    grid = vit.image_size // vit.patch_size
    kinds = ["cls"] * int(vit.class_token) + ["registers"] * vit.n_registers + ["patches"] * grid**2
    kept = [i for i, kind in enumerate(kinds) if kind in _KINDS_KEPT[selection]]
    stored = [kinds[i] for i in kept]

    def span(kind: str) -> Span:  # each kind is contiguous along the stored axis
        where = [j for j, k in enumerate(stored) if k == kind]
        return (where[0], where[-1] + 1) if where else (0, 0)

    contiguous = kept == list(range(kept[0], kept[-1] + 1))
    keep = slice(kept[0], kept[-1] + 1) if contiguous else tuple(kept)
    groups = TokenGroups(span("cls"), span("registers"), span("patches"), (grid, grid))
    by_kind = {kind: tuple(i for i in kept if kinds[i] == kind) for kind in _KINDS_KEPT[selection]}
    by_kind = {kind: pos for kind, pos in by_kind.items() if pos}
    if patches_sample is None:
        return TokenSelection(keep, groups, model_positions=by_kind)
    if "patches" not in _KINDS_KEPT[selection] or not 0 < patches_sample < grid**2:
        raise ValueError(
            f"patches_sample={patches_sample} with tokens {selection!r}: sample between 1 and {grid**2 - 1} of the "
            f"model's {grid**2} patches, from a selection that keeps patches (all, patches, no_registers)")
    start = groups.patches[0]
    return TokenSelection(keep, TokenGroups(groups.cls, groups.registers, (start, start + patches_sample),
                                            (grid, grid)), patches_sample, by_kind)
