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
from typing import Literal

import yaml

from analysis.ids import content_id
from analysis.mouse import MouseTrainConfig
from analysis.shapes import ShapesConfig
from analysis.vit import ViTConfig

DATASET_GENERATORS = ("shapes",)
MODEL_KINDS = ("mouse",)
K_ARCHITECTURES = ("topk", "batchtopk")  # sparsity set by k
PENALTY_ARCHITECTURES = ("relu", "jumprelu")  # sparsity set by a penalty coefficient
ARCHITECTURES = K_ARCHITECTURES + PENALTY_ARCHITECTURES
STORE_DTYPES = ("float16", "bfloat16", "float32")
TOKEN_SELECTIONS = ("all", "cls", "patches")


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
    """Overrides of the generator's config dataclass (e.g. analysis.shapes.ShapesConfig fields)."""

    def __post_init__(self):
        _choice("dataset generator", self.generator, DATASET_GENERATORS)

    def config(self) -> ShapesConfig:
        """The generator's full config: code defaults with this spec's overrides."""
        return _construct(ShapesConfig, self.params, "dataset.params")

    @property
    def dataset_id(self) -> str:
        # Hash the resolved config, not the overrides: a changed code default must change the id.
        return content_id(self.generator, self.config().to_dict())


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mouse"
    """`mouse`: a small ViT trained in the pipeline on the dataset's task."""
    vit: dict = field(default_factory=dict)
    """Overrides of analysis.vit.ViTConfig."""
    train: dict = field(default_factory=dict)
    """Overrides of analysis.mouse.MouseTrainConfig (except `vit`)."""

    def __post_init__(self):
        _choice("model kind", self.kind, MODEL_KINDS)

    def config(self, n_classes: int) -> MouseTrainConfig:
        """Full training config; the architecture starts from the mouse defaults, then overrides."""
        vit_defaults = MouseTrainConfig().vit.to_dict()
        vit = _construct(ViTConfig, {**vit_defaults, **self.vit, "n_classes": n_classes}, "model.vit")
        return _construct(MouseTrainConfig, {**self.train, "vit": vit}, "model.train")

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
    """Which tokens to keep: all, cls, or patches."""
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


@dataclass(frozen=True)
class DictionaryMember:
    """One checkpoint of the suite: one Dagster partition."""

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
        hook = self.hook.replace("blocks.", "b").replace(".hook_", "_").replace(".", "_")
        sparsity = f"k{self.k}" if self.k is not None else f"l{self.sparsity_coef:g}"
        return f"{hook}-{self.architecture}-x{self.expansion}-{sparsity}-s{self.seed}"


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
    """Overrides of analysis.train_sae.SAETrainConfig (width and k come from the grid)."""

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
class EvaluationSpec:
    max_images: int = 2048
    """Held-out images used for reconstruction and downstream metrics (and mining)."""
    n_top: int = 16
    """Max-activating images kept per feature."""
    batch_images: int = 128


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    activations: ActivationSpec = ActivationSpec()
    dictionaries: DictionaryGrid = DictionaryGrid()
    evaluation: EvaluationSpec = EvaluationSpec()

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

    def members(self) -> list[DictionaryMember]:
        return self.dictionaries.members(self.activations.hooks)

    def member(self, key: str) -> DictionaryMember:
        by_key = {m.key: m for m in self.members()}
        _choice("suite member", key, list(by_key))
        return by_key[key]


def _construct(cls, kwargs: dict, where: str):
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
    "evaluation": EvaluationSpec,
}


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"suite section {where!r} must be a mapping, got {type(raw).__name__}")
    return _construct(cls, raw, where)


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
