"""A suite: one dataset, one model, one activation store, and a grid of dictionaries on it.

Parsed from YAML (pipelines/suites/*.yaml) into frozen dataclasses and validated before any work
starts: unknown generator, model kind or hook names fail here with the valid names listed.
Ids are derived from content (analysis.ids), so the paths of every artifact follow from the spec.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Union

import yaml

from analysis.ids import content_id
from analysis.models.mouse import MouseTrainConfig
from analysis.data.shapes import ShapesConfig
from analysis.activations.tokens import TOKEN_SELECTIONS, select_tokens
from analysis.models.vit import ViTConfig

DATASET_GENERATORS = ("shapes",)
MODEL_KINDS = ("mouse",)
K_ARCHITECTURES = ("topk", "batchtopk")  # sparsity set by k
PENALTY_ARCHITECTURES = ("relu", "jumprelu")  # sparsity set by a penalty coefficient
ARCHITECTURES = K_ARCHITECTURES + PENALTY_ARCHITECTURES
CROSSCODER_ARCHITECTURES = ("topk", "relu")
STORE_DTYPES = ("float16", "bfloat16", "float32")


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class DatasetSpec:
    generator: str = "shapes"
    """Built-in generator name; see DATASET_GENERATORS."""
    params: dict = field(default_factory=dict)
    """Overrides of the generator's config dataclass (e.g. analysis.data.shapes.ShapesConfig fields)."""

    def __post_init__(self):
        _choice("dataset generator", self.generator, DATASET_GENERATORS)

    def config(self) -> ShapesConfig:
        """The generator's full config: code defaults with this spec's overrides."""
        return construct(ShapesConfig, self.params, "dataset.params")

    @property
    def dataset_id(self) -> str:
        # Hash the resolved config, not the overrides: a changed code default must change the id.
        return content_id(self.generator, self.config().to_dict())


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mouse"
    """`mouse`: a small ViT trained in the pipeline on the dataset's task."""
    vit: dict = field(default_factory=dict)
    """Overrides of analysis.models.vit.ViTConfig."""
    train: dict = field(default_factory=dict)
    """Overrides of analysis.models.mouse.MouseTrainConfig (except `vit`)."""

    def __post_init__(self):
        _choice("model kind", self.kind, MODEL_KINDS)

    def config(self, n_classes: int) -> MouseTrainConfig:
        """Full training config; the architecture starts from the mouse defaults, then overrides."""
        vit_defaults = MouseTrainConfig().vit.to_dict()
        vit = construct(ViTConfig, {**vit_defaults, **self.vit, "n_classes": n_classes}, "model.vit")
        return construct(MouseTrainConfig, {**self.train, "vit": vit}, "model.train")

    def model_id(self, dataset: DatasetSpec) -> str:
        cfg = self.config(len(dataset.config().class_names))
        return content_id(self.kind, {"config": cfg.to_dict(), "dataset": dataset.dataset_id})


@dataclass(frozen=True)
class ActivationSpec:
    hooks: tuple[str, ...] = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    """Hook points captured in one forward pass; `resid_post:all` expands to every layer."""
    images_per_shard: int = 4096
    """Images per Dagster partition; one partition writes whole Zarr shards."""
    images_per_chunk: int = 256
    """Images per Zarr chunk: the unit the shuffled loader reads."""
    dtype: str = "float16"
    """Store dtype: float16, bfloat16 (kept as uint16 bits) or float32."""
    tokens: str = "all"
    """Which tokens to keep: all, cls, patches, or no_registers (class token and patches);
    see analysis.activations.tokens."""
    batch_size: int = 256
    """Images per forward pass during extraction."""
    compute_dtype: str = "float32"
    """Forward-pass precision: float32, or bfloat16/float16 autocast. It changes the stored values,
    so it is part of the suite (and of the store id), not of the compute resource."""

    def __post_init__(self):
        _choice("activation dtype", self.dtype, STORE_DTYPES)
        _choice("compute dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        _choice("token selection", self.tokens, TOKEN_SELECTIONS)
        if self.images_per_shard % self.images_per_chunk:
            raise ValueError(
                f"images_per_shard={self.images_per_shard} is not a multiple of "
                f"images_per_chunk={self.images_per_chunk}: pick a shard size that holds whole chunks"
            )
        if not self.hooks:
            raise ValueError("activations.hooks is empty: list at least one hook point")

    def store_id(self, model_id: str, dataset_id: str) -> str:
        payload = {k: v for k, v in asdict(self).items() if k != "batch_size"}  # batch size changes no value
        return content_id("acts", {"spec": payload, "model": model_id, "dataset": dataset_id})


def short_hook(hook: str) -> str:
    """`blocks.1.hook_resid_post` -> `b1_resid_post` (partition keys stay short and readable)."""
    return hook.replace("blocks.", "b").replace(".hook_", "_").replace(".", "_")


@dataclass(frozen=True)
class DictionaryMember:
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
            _choice("dictionary architecture", arch, ARCHITECTURES)
        for k in self.ks:
            if k <= 0:
                raise ValueError(f"k={k} must be positive: TopK keeps the k largest latents")
        if any(a in PENALTY_ARCHITECTURES for a in self.architectures) and not self.sparsity_coefs:
            raise ValueError(
                f"architectures {self.architectures} include a penalty architecture but "
                "dictionaries.sparsity_coefs is empty: list at least one coefficient, e.g. [1.0, 5.0]"
            )

    def members(self, store_hooks: tuple[str, ...]) -> list[DictionaryMember]:
        hooks = self.hooks or store_hooks
        for hook in hooks:
            _choice("dictionary hook (it must be one of activations.hooks)", hook, store_hooks)
        members = []
        for hook, arch, expansion, seed in itertools.product(hooks, self.architectures, self.expansions, self.seeds):
            if arch in K_ARCHITECTURES:
                members += [DictionaryMember(hook, arch, expansion, k, seed) for k in self.ks]
            else:
                members += [DictionaryMember(hook, arch, expansion, None, seed, float(c)) for c in self.sparsity_coefs]
        return members


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
            _choice("crosscoder architecture", arch, CROSSCODER_ARCHITECTURES)
        for k in self.ks:
            if k <= 0:
                raise ValueError(f"crosscoders.ks holds k={k}: k must be positive")
        if "relu" in self.architectures and not self.sparsity_coefs:
            raise ValueError("crosscoders.architectures includes relu but crosscoders.sparsity_coefs is empty: "
                             "list at least one coefficient, e.g. [5.0]")

    def members(self, store_hooks: tuple[str, ...]) -> list[CrosscoderMember]:
        for group in self.hook_groups:
            for hook in group:
                _choice("crosscoder hook (it must be one of activations.hooks)", hook, store_hooks)
        members = []
        for group, arch, expansion, seed in itertools.product(self.hook_groups, self.architectures,
                                                              self.expansions, self.seeds):
            if arch == "topk":
                members += [CrosscoderMember(group, arch, expansion, k, None, seed) for k in self.ks]
            else:
                members += [CrosscoderMember(group, arch, expansion, None, float(c), seed) for c in self.sparsity_coefs]
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
        for k in self.ks:
            if k <= 0:
                raise ValueError(f"transcoders.ks holds k={k}: k must be positive")
        for skip in self.skip:
            if not isinstance(skip, bool):
                raise ValueError(f"transcoders.skip holds {skip!r}: expected true or false")

    def members(self, store_hooks: tuple[str, ...]) -> list[TranscoderMember]:
        for pair in self.pairs:
            for hook in pair:
                _choice("transcoder hook (it must be one of activations.hooks)", hook, store_hooks)
        return [TranscoderMember(a, b, e, k, skip, seed) for (a, b), e, k, skip, seed
                in itertools.product(self.pairs, self.expansions, self.ks, self.skip, self.seeds)]


@dataclass(frozen=True)
class EvaluationSpec:
    max_images: int = 2048
    """Held-out images used for reconstruction and downstream metrics (and mining)."""
    n_top: int = 16
    """Max-activating images kept per feature."""
    batch_images: int = 128


Member = Union[DictionaryMember, TranscoderMember, CrosscoderMember]


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    activations: ActivationSpec = ActivationSpec()
    dictionaries: DictionaryGrid = DictionaryGrid()
    transcoders: TranscoderGrid = TranscoderGrid()
    crosscoders: CrosscoderGrid = CrosscoderGrid()
    evaluation: EvaluationSpec = EvaluationSpec()

    def __post_init__(self):
        select_tokens(self.model_config().vit, self.activations.tokens)  # e.g. 'cls' on a model without one

    @property
    def dataset_id(self) -> str:
        return self.dataset.dataset_id

    @property
    def model_id(self) -> str:
        return self.model.model_id(self.dataset)

    def model_config(self) -> MouseTrainConfig:
        return self.model.config(len(self.dataset.config().class_names))

    @property
    def store_id(self) -> str:
        return self.activations.store_id(self.model_id, self.dataset_id)

    def members(self) -> list[Member]:
        """Every checkpoint of the suite: SAEs, transcoders, crosscoders; keys are unique."""
        hooks = self.activations.hooks
        return [*self.dictionaries.members(hooks), *self.transcoders.members(hooks),
                *self.crosscoders.members(hooks)]

    def member(self, key: str) -> Member:
        by_key = {m.key: m for m in self.members()}
        _choice("suite member", key, list(by_key))
        return by_key[key]


def construct(cls, kwargs: dict, where: str):
    """Build a config dataclass from suite overrides; an unknown key names the section and the valid keys."""
    names = [f.name for f in fields(cls)]
    for key in kwargs:
        _choice(f"key in suite section {where!r}", key, names)
    # YAML lists become tuples so the specs stay hashable and immutable.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


_SECTIONS = {
    "dataset": DatasetSpec,
    "model": ModelSpec,
    "activations": ActivationSpec,
    "dictionaries": DictionaryGrid,
    "transcoders": TranscoderGrid,
    "crosscoders": CrosscoderGrid,
    "evaluation": EvaluationSpec,
}


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"suite section {where!r} must be a mapping, got {type(raw).__name__}")
    return construct(cls, raw, where)


def parse_suite(raw: dict, name: str = "suite") -> SuiteSpec:
    for key in raw:
        _choice("suite section", key, ["name", *_SECTIONS])
    parts = {sec: _build(cls, raw.get(sec) or {}, sec) for sec, cls in _SECTIONS.items()}
    return SuiteSpec(name=raw.get("name", name), **parts)


def load_suite(path: str | Path) -> SuiteSpec:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"suite file {path} does not exist: pass a YAML path or a name in pipelines/suites/")
    return parse_suite(yaml.safe_load(path.read_text()) or {}, name=path.stem)
