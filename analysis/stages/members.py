"""Suite members: one frozen dataclass per dictionary kind (SAE, transcoder, crosscoder) and the
grid section of the suite that expands into them.

A member's fields are its identity: `asdict(member)` feeds the dictionary's content id, so a
field added, removed or renamed here changes every id of that kind.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import ClassVar, Union

from analysis.dictionaries.config import ARCHITECTURES, K_ARCHITECTURES, PENALTY_ARCHITECTURES
from analysis.dictionaries.crosscoder import CROSSCODER_ARCHITECTURES
from analysis.stages.parsing import check_choice, check_each, check_not_empty


def short_hook(hook: str) -> str:
    """`blocks.1.hook_resid_post` -> `b1_resid_post` (partition keys stay short and readable)."""
    return hook.replace("blocks.", "b").replace(".hook_", "_").replace(".", "_")


@dataclass(frozen=True)
class SAEMember:
    """One SAE checkpoint of the suite: one Dagster partition."""

    kind: ClassVar[str] = "sae"

    hook: str
    architecture: str
    expansion: int
    k: int | None
    """Active latents per token (topk, batchtopk); None for penalty architectures."""
    seed: int
    sparsity_coef: float | None = None
    """Sparsity penalty coefficient (relu, jumprelu); None for k architectures."""

    @property
    def key(self) -> str:
        """Stable, readable partition key, e.g. `b1_resid_post-topk-x8-k16-s0`, `b0_resid_post-relu-x4-l5-s0`."""
        sparsity = f"k{self.k}" if self.k is not None else f"l{self.sparsity_coef:g}"
        return f"{short_hook(self.hook)}-{self.architecture}-x{self.expansion}-{sparsity}-s{self.seed}"


@dataclass(frozen=True)
class TranscoderMember:
    """One TopK transcoder checkpoint of the suite (reads `hook`, predicts `out_hook`)."""

    kind: ClassVar[str] = "transcoder"
    architecture: ClassVar[str] = "topk"
    sparsity_coef: ClassVar[None] = None

    hook: str
    """Input hook, e.g. blocks.1.hook_resid_mid."""
    out_hook: str
    """Predicted hook, e.g. blocks.1.hook_mlp_out."""
    expansion: int
    """Width as a multiple of the input hook's width."""
    k: int
    skip: bool
    """With a dense linear skip connection (zero at init)."""
    seed: int

    @property
    def key(self) -> str:
        """E.g. `tc-b1_resid_mid-b1_mlp_out-x4-k8-skip-s0`."""
        skip = "-skip" if self.skip else ""
        return f"tc-{short_hook(self.hook)}-{short_hook(self.out_hook)}-x{self.expansion}-k{self.k}{skip}-s{self.seed}"


@dataclass(frozen=True)
class CrosscoderMember:
    """One acausal crosscoder checkpoint of the suite: one code over several hooks at once."""

    kind: ClassVar[str] = "crosscoder"

    hooks: tuple[str, ...]
    """The hooks read and reconstructed, in model order."""
    architecture: str
    """topk or relu (decoder-norm-weighted L1 penalty)."""
    expansion: int
    """Width as a multiple of ONE hook's width."""
    k: int | None
    sparsity_coef: float | None
    seed: int

    @property
    def hook(self) -> str:
        """The first hook (where summaries that name one hook list this member)."""
        return self.hooks[0]

    @property
    def key(self) -> str:
        """E.g. `cc-b0_resid_post+b1_resid_post-topk-x4-k32-s0`."""
        sparsity = f"k{self.k}" if self.k is not None else f"l{self.sparsity_coef:g}"
        hooks = "+".join(short_hook(h) for h in self.hooks)
        return f"cc-{hooks}-{self.architecture}-x{self.expansion}-{sparsity}-s{self.seed}"


Member = Union[SAEMember, TranscoderMember, CrosscoderMember]
MEMBER_CLASSES: dict[str, type] = {"sae": SAEMember, "transcoder": TranscoderMember, "crosscoder": CrosscoderMember}


def member_from_lineage(lineage: dict) -> Member:
    """The member a dictionary was trained as, from the lineage in its config.json (which holds
    `kind` and the member's fields): how an error about one dictionary names its partition key."""
    cls = MEMBER_CLASSES[lineage["kind"]]
    values = {f.name: lineage[f.name] for f in fields(cls)}
    if "hooks" in values:  # JSON turned the tuple into a list
        values["hooks"] = tuple(values["hooks"])
    return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is an int to Python


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The numeric axes the grids share: name -> (valid item, what a valid item is, an example axis)
_AXES = {
    "expansions": (lambda v: _is_int(v) and v > 0, "a positive int (the width is expansion x the hook's width)", "[4]"),
    "ks": (lambda v: _is_int(v) and v > 0, "a positive int (TopK keeps the k largest latents)", "[32]"),
    "seeds": (lambda v: _is_int(v) and v >= 0, "an int >= 0", "[0]"),
    "sparsity_coefs": (lambda v: _is_number(v) and v > 0, "a positive penalty coefficient", "[1.0, 5.0]"),
    "skip": (lambda v: isinstance(v, bool), "true or false", "[true]"),
}


def check_axes(section: str, grid) -> None:
    """Check a grid's numeric axes as the user wrote them (an expansion of -8 is named as
    `expansions[0]=-8`, not as the width it would make). The axis that says which dictionaries
    exist (architectures, pairs, hook_groups) may be empty: none of that kind. A parameter axis
    may not: it would expand to no members, silently (sparsity_coefs and ks are needed only by
    the architectures that use them)."""
    architectures = getattr(grid, "architectures", ("topk",))  # a transcoder is always topk
    optional = {"sparsity_coefs"} | (set() if set(architectures) & set(K_ARCHITECTURES) else {"ks"})
    for name, (ok, expected, example) in _AXES.items():
        if not hasattr(grid, name):
            continue
        values = getattr(grid, name)
        if name not in optional:
            check_not_empty(f"{section}.{name}", values, example)
        check_each(f"{section}.{name}", values, ok, f"{expected}; e.g. {name}: {example}")


@dataclass(frozen=True)
class DictionaryGrid:
    hooks: tuple[str, ...] | None = None
    """Hooks to train on; None = every hook in the activation store."""
    architectures: tuple[str, ...] = ("topk",)
    expansions: tuple[int, ...] = (16,)
    """Dictionary width as a multiple of the hook's width d."""
    ks: tuple[int, ...] = (8, 32)
    """k values for the k architectures (topk, batchtopk)."""
    sparsity_coefs: tuple[float, ...] = ()
    """Penalty coefficients for relu and jumprelu members."""
    seeds: tuple[int, ...] = (0,)
    train: dict = field(default_factory=dict)
    """Overrides of analysis.dictionaries.training.sae.SAETrainConfig (width and k come from the grid)."""

    def __post_init__(self):
        for arch in self.architectures:
            check_choice("dictionary architecture", arch, ARCHITECTURES)
        check_axes("dictionaries", self)
        if any(a in PENALTY_ARCHITECTURES for a in self.architectures) and not self.sparsity_coefs:
            raise ValueError(
                f"architectures {self.architectures} include a penalty architecture but "
                "dictionaries.sparsity_coefs is empty: list at least one coefficient, e.g. [1.0, 5.0]"
            )

    def members(self, store_hooks: tuple[str, ...]) -> list[SAEMember]:
        hooks = self.hooks or store_hooks
        for hook in hooks:
            check_choice("dictionary hook (it must be one of activations.hooks)", hook, store_hooks)
        members = []
        for hook, arch, expansion, seed in itertools.product(hooks, self.architectures, self.expansions, self.seeds):
            if arch in K_ARCHITECTURES:
                members += [SAEMember(hook, arch, expansion, k, seed) for k in self.ks]
            else:
                members += [SAEMember(hook, arch, expansion, None, seed, float(c)) for c in self.sparsity_coefs]
        return members


@dataclass(frozen=True)
class TranscoderGrid:
    """Transcoders hook A -> hook B (both must be in activations.hooks), e.g. MLP in -> MLP out."""

    pairs: tuple[tuple[str, str], ...] = ()
    """(input hook, output hook) pairs; empty = no transcoders."""
    expansions: tuple[int, ...] = (4,)
    ks: tuple[int, ...] = (32,)
    skip: tuple[bool, ...] = (True,)
    """Train with and/or without the linear skip connection."""
    seeds: tuple[int, ...] = (0,)
    train: dict = field(default_factory=dict)
    """Overrides of analysis.dictionaries.training.transcoder.TranscoderTrainConfig (width, k, skip, seed come from the grid)."""

    def __post_init__(self):
        pairs = tuple(tuple(p) for p in self.pairs)
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(
                    f"transcoders.pairs entry {list(pair)} must be two different hooks [input, output], "
                    "e.g. [blocks.1.hook_resid_mid, blocks.1.hook_mlp_out]"
                )
        object.__setattr__(self, "pairs", pairs)
        check_axes("transcoders", self)

    def members(self, store_hooks: tuple[str, ...]) -> list[TranscoderMember]:
        for pair in self.pairs:
            for hook in pair:
                check_choice("transcoder hook (it must be one of activations.hooks)", hook, store_hooks)
        return [TranscoderMember(a, b, e, k, skip, seed) for (a, b), e, k, skip, seed
                in itertools.product(self.pairs, self.expansions, self.ks, self.skip, self.seeds)]


@dataclass(frozen=True)
class CrosscoderGrid:
    """Acausal crosscoders, each over one group of hooks (all in activations.hooks)."""

    hook_groups: tuple[tuple[str, ...], ...] = ()
    """Groups of >= 2 hooks, e.g. [[blocks.0.hook_resid_post, blocks.1.hook_resid_post]]; empty = none."""
    architectures: tuple[str, ...] = ("topk",)
    """topk and/or relu."""
    expansions: tuple[int, ...] = (4,)
    ks: tuple[int, ...] = (32,)
    """k values for topk members."""
    sparsity_coefs: tuple[float, ...] = ()
    """Penalty coefficients for relu members."""
    seeds: tuple[int, ...] = (0,)
    train: dict = field(default_factory=dict)
    """Overrides of analysis.dictionaries.training.crosscoder.CrosscoderTrainConfig (width, architecture, k,
    sparsity_coef and seed come from the grid)."""

    def __post_init__(self):
        groups = tuple(tuple(g) for g in self.hook_groups)
        for group in groups:
            if len(group) < 2 or len(set(group)) != len(group):
                raise ValueError(
                    f"crosscoders.hook_groups entry {list(group)} must list at least two different hooks, "
                    "e.g. [blocks.0.hook_resid_post, blocks.1.hook_resid_post]"
                )
        object.__setattr__(self, "hook_groups", groups)
        for arch in self.architectures:
            check_choice("crosscoder architecture", arch, CROSSCODER_ARCHITECTURES)
        check_axes("crosscoders", self)
        penalty = [a for a in self.architectures if a in PENALTY_ARCHITECTURES]
        if penalty and not self.sparsity_coefs:
            raise ValueError(f"crosscoders.architectures includes {penalty[0]} but crosscoders.sparsity_coefs is "
                             "empty: list at least one coefficient, e.g. [5.0]")

    def members(self, store_hooks: tuple[str, ...]) -> list[CrosscoderMember]:
        for group in self.hook_groups:
            for hook in group:
                check_choice("crosscoder hook (it must be one of activations.hooks)", hook, store_hooks)
        members = []
        for group, arch, expansion, seed in itertools.product(self.hook_groups, self.architectures,
                                                              self.expansions, self.seeds):
            if arch in K_ARCHITECTURES:
                members += [CrosscoderMember(group, arch, expansion, k, None, seed) for k in self.ks]
            else:
                members += [CrosscoderMember(group, arch, expansion, None, float(c), seed) for c in self.sparsity_coefs]
        return members

