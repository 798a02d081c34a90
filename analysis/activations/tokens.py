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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    """Positions along the model's token axis: a slice when contiguous, else explicit indices."""
    groups: TokenGroups


_KINDS_KEPT = {"all": ("cls", "registers", "patches"), "cls": ("cls",), "patches": ("patches",),
               "no_registers": ("cls", "patches")}


def select_tokens(vit: ViTConfig, selection: str) -> TokenSelection:
    """The positions `selection` keeps from `vit`'s tokens, and the groups of the kept axis."""
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
    return TokenSelection(keep, TokenGroups(span("cls"), span("registers"), span("patches"), (grid, grid)))
