"""Which tokens an activation store keeps, and where each kind of token sits in it.

A hooked ViT's token axis is: the class token (if the model has one), then its register tokens
(if any), then the patch grid row by row (analysis.vit). A store keeps a selection of them:

    all           every token
    cls           the class token only
    patches       the patch tokens only
    no_registers  the class token and the patches: registers dropped (they carry global,
                  high-norm "scratch" activations, Darcet et al. 2024, "Vision Transformers
                  Need Registers"), so dictionaries and statistics see only the image's tokens

`TokenGroups` records, for the store's own token axis, the [start, stop) range of each kind, so
per-kind metrics, mining heatmaps and notebooks never assume "CLS at 0, patches after it".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from analysis.vit_config import ViTConfig

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

    name: str
    keep: slice | tuple[int, ...]
    """Positions along the model's token axis: a slice when contiguous, else explicit indices."""
    groups: TokenGroups


def select_tokens(vit: ViTConfig, selection: str) -> TokenSelection:
    """The positions `selection` keeps from `vit`'s tokens, and the groups of the kept axis."""
    if selection not in TOKEN_SELECTIONS:
        raise ValueError(f"token selection {selection!r}: expected one of {', '.join(TOKEN_SELECTIONS)}")
    n_cls, n_reg = int(vit.class_token), vit.n_registers
    grid = vit.image_size // vit.patch_size
    n_patches = grid * grid
    first_patch = n_cls + n_reg
    if selection == "cls" and not n_cls:
        raise ValueError(
            "token selection 'cls' but the model has no class token (class_token=False, "
            f"pool={vit.pool!r}): keep 'patches' or 'all' instead"
        )
    if selection == "all":
        keep: slice | tuple[int, ...] = slice(0, first_patch + n_patches)
        groups = ((0, n_cls), (n_cls, first_patch), (first_patch, first_patch + n_patches))
    elif selection == "cls":
        keep, groups = slice(0, 1), ((0, 1), (0, 0), (0, 0))
    elif selection == "patches":
        keep, groups = slice(first_patch, first_patch + n_patches), ((0, 0), (0, 0), (0, n_patches))
    else:  # no_registers
        patches = range(first_patch, first_patch + n_patches)
        keep = slice(first_patch, first_patch + n_patches) if not n_cls else \
            (slice(0, first_patch + n_patches) if not n_reg else (0, *patches))
        groups = ((0, n_cls), (n_cls, n_cls), (n_cls, n_cls + n_patches))
    cls_span, reg_span, patch_span = groups
    return TokenSelection(selection, keep, TokenGroups(cls_span, reg_span, patch_span, (grid, grid)))
