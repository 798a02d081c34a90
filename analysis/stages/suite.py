"""A suite: one dataset, one model, one activation store, and a grid of dictionaries on it.

Parsed from YAML (pipelines/suites/*.yaml) into frozen dataclasses and validated before any work
starts: unknown generator, model kind or hook names fail here with the valid names listed.
Ids are derived from content (analysis.ids), so the paths of every artifact follow from the spec.
The dictionary sections and the members they expand into are in `analysis.stages.members`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from analysis.ids import content_id
from analysis.models.mouse import MouseTrainConfig
from analysis.data.shapes import ShapesConfig
from analysis.activations.tokens import TOKEN_SELECTIONS, select_tokens
from analysis.models.vit import ViTConfig
from analysis.stages.members import CrosscoderGrid, DictionaryGrid, Member, TranscoderGrid, check_choice

DATASET_GENERATORS = ("shapes",)
MODEL_KINDS = ("mouse",)
STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class DatasetSpec:
    generator: str = "shapes"
    """Built-in generator name; see DATASET_GENERATORS."""
    params: dict = field(default_factory=dict)
    """Overrides of the generator's config dataclass (e.g. analysis.data.shapes.ShapesConfig fields)."""

    def __post_init__(self):
        check_choice("dataset generator", self.generator, DATASET_GENERATORS)

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
        check_choice("model kind", self.kind, MODEL_KINDS)

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
        check_choice("activation dtype", self.dtype, STORE_DTYPES)
        check_choice("compute dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        check_choice("token selection", self.tokens, TOKEN_SELECTIONS)
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
        check_choice("suite member", key, list(by_key))
        return by_key[key]


def construct(cls, kwargs: dict, where: str):
    """Build a config dataclass from suite overrides; an unknown key names the section and the valid keys."""
    names = [f.name for f in fields(cls)]
    for key in kwargs:
        check_choice(f"key in suite section {where!r}", key, names)
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
        check_choice("suite section", key, ["name", *_SECTIONS])
    parts = {sec: _build(cls, raw.get(sec) or {}, sec) for sec, cls in _SECTIONS.items()}
    return SuiteSpec(name=raw.get("name", name), **parts)


def load_suite(path: str | Path) -> SuiteSpec:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"suite file {path} does not exist: pass a YAML path or a name in pipelines/suites/")
    return parse_suite(yaml.safe_load(path.read_text()) or {}, name=path.stem)
