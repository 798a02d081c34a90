"""A suite: one dataset, one model, one activation store, and a grid of dictionaries on it.

Parsed from YAML (pipelines/suites/*.yaml) into frozen dataclasses and validated before any work
starts: unknown dataset source, model kind or hook names fail here with the valid names listed.
Ids are derived from content (analysis.ids), so the paths of every artifact follow from the spec.
The dataset and model sections are in `analysis.stages.inputs`, the dictionary sections and the
members they expand into in `analysis.stages.members`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from analysis.activations.tokens import TOKEN_SELECTIONS, select_tokens
from analysis.ids import content_id
from analysis.models.inputs import Preprocessing
from analysis.models.mouse import MouseTrainConfig
from analysis.models.vit import ViTConfig
from analysis.stages.inputs import DatasetSpec, ModelSpec
from analysis.stages.members import CrosscoderGrid, DictionaryGrid, Member, TranscoderGrid
from analysis.stages.parsing import check_choice, construct

STORE_DTYPES = ("float16", "bfloat16", "float32")


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
    patches_sample: int | None = None
    """Keep only this many patch tokens of each image (a sample seeded by the image's index,
    analysis.activations.tokens); None keeps them all. Splicing still replaces every patch."""
    max_store_gb: float = 200.0
    """A suite whose stores (images x tokens x d x bytes x hooks) would exceed this is refused
    before any work; raise it deliberately for a larger run."""

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
        # neither the batch size nor the size limit changes a stored value; an unset patch sample
        # is left out so that stores made before the option keep their ids
        payload = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "max_store_gb")
                   and not (k == "patches_sample" and v is None)}
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
        if self.model.kind != "mouse" and self.dataset.source == "shapes":
            raise ValueError(f"the shapes generator makes the mouse's 64x64 grayscale images; a {self.model.kind} "
                             "model reads a folder or parquet dataset source (dataset.source)")
        # e.g. 'cls' on a model without one, or a patch sample larger than the patch grid
        select_tokens(self.vit_config(), self.activations.tokens, self.activations.patches_sample)

    @property
    def dataset_id(self) -> str:
        return self.dataset.dataset_id(self.preprocessing())

    @property
    def model_id(self) -> str:
        return self.model.model_id(self.dataset_id, self.class_names())

    def model_config(self) -> MouseTrainConfig:
        return self.model.config(len(self.class_names()))

    def vit_config(self) -> ViTConfig:
        """The architecture of the suite's model (the mouse's, or the timm model's)."""
        return self.model_config().vit if self.model.kind == "mouse" else self.model.model_input().vit

    @property
    def downstream(self) -> str:
        """What evaluations splice against: `labels` (CE and accuracy on the dataset's labels, which
        the mouse's head and open_clip's zero-shot head predict) or `kl` (the clean output
        distribution: a timm or saved model's head classes are not the dataset's)."""
        return "labels" if self.model.kind in ("mouse", "open_clip") else "kl"

    def class_names(self) -> list[str]:
        """The dataset's classes; where evaluations score labels, every image must have one."""
        names = self.dataset.class_names()
        if self.dataset.source != "shapes" and self.downstream == "labels":
            listing = self.dataset.listing()  # a missing folder, label file or column fails here
            if listing.n_unlabelled or len(names) < 2:
                raise ValueError(
                    f"a {self.model.kind} model is scored on the dataset's labels, but this {self.dataset.source} "
                    f"source has {len(names)} classes and {listing.n_unlabelled} unlabelled images: give every "
                    "image a label (sub-folders or a label file), with at least two classes")
        return names

    def preprocessing(self) -> Preprocessing:
        """How a source's decoded images become the model's input: timm's eval transform, or the
        mouse's size and channels."""
        if self.model.kind != "mouse":
            return self.model.model_input().preprocessing
        vit = self.model.config(1).vit  # the class count changes no input
        return Preprocessing(size=vit.image_size, channels=vit.in_chans)

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
