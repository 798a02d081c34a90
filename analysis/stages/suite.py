"""A suite: one dataset, one model, one activation store, and a grid of dictionaries on it.

Parsed from YAML (pipelines/suites/*.yaml) into frozen dataclasses and validated before any work
starts: unknown dataset source, model kind or hook names fail here with the valid names listed.
Ids are derived from content (analysis.ids), so the paths of every artifact follow from the spec.
The dictionary sections and the members they expand into are in `analysis.stages.members`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import yaml

from analysis.ids import content_id
from analysis.models.mouse import MouseTrainConfig
from analysis.data.ingest import IngestConfig
from analysis.data.shapes import ShapesConfig
from analysis.data.sources import FolderSource, Listing, ParquetSource
from analysis.models.inputs import Preprocessing
from analysis.activations.tokens import TOKEN_SELECTIONS, select_tokens
from analysis.models.vit import ViTConfig
from analysis.models.clip_zero_shot import DEFAULT_TEMPLATES
from analysis.models.zoo import ModelInput, open_clip_input, timm_input
from analysis.stages.members import CrosscoderGrid, DictionaryGrid, Member, TranscoderGrid, check_choice

DATASET_SOURCES = ("shapes", "folder", "parquet")
MODEL_KINDS = ("mouse", "timm", "open_clip")
STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class DatasetSpec:
    source: str = "shapes"
    """Where the images come from; see DATASET_SOURCES: `shapes` (generated here), `folder` (a
    directory of images, analysis.data.sources.FolderSource), `parquet` (ParquetSource)."""
    params: dict = field(default_factory=dict)
    """Overrides of the source's config (ShapesConfig fields; FolderSource or ParquetSource fields
    plus IngestConfig's eval_fraction, seed and workers)."""

    def __post_init__(self):
        check_choice("dataset source", self.source, DATASET_SOURCES)

    def config(self) -> ShapesConfig | tuple[FolderSource | ParquetSource, IngestConfig]:
        """The source's full config: code defaults with this spec's overrides."""
        if self.source == "shapes":
            return construct(ShapesConfig, self.params, "dataset.params")
        cls = FolderSource if self.source == "folder" else ParquetSource
        ingest_keys = {f.name for f in fields(IngestConfig)}
        valid = [f.name for f in fields(cls)] + sorted(ingest_keys)
        for key in self.params:
            check_choice("key in suite section 'dataset.params'", key, valid)
        try:
            source = cls(**{k: v for k, v in self.params.items() if k not in ingest_keys})
        except TypeError as err:  # a required field (path, paths) is missing
            raise ValueError(f"dataset.params for source {self.source!r}: {err}") from err
        return source, IngestConfig(**{k: v for k, v in self.params.items() if k in ingest_keys})

    def listing(self) -> Listing:
        """What a folder or Parquet source holds, read without decoding (cached per process)."""
        return _listing(self.config()[0])

    def class_names(self) -> list[str]:
        if self.source == "shapes":
            return self.config().class_names
        return list(self.listing().class_names)

    def planned_images(self) -> int:
        """Images the dataset will hold: exact for generated data, an upper bound for a source
        (files that cannot be decoded are set aside when it is ingested)."""
        return self.config().n_images if self.source == "shapes" else self.listing().n_entries

    def dataset_id(self, preprocessing: Preprocessing) -> str:
        """Generated data is made at the model's size, so its id is its config; a source's id
        hashes its config, its listing (every file's path, size and mtime) and the preprocessing
        its stored images went through."""
        if self.source == "shapes":
            # Hash the resolved config, not the overrides: a changed code default must change the id.
            return content_id(self.source, self.config().to_dict())
        source, ingest = self.config()
        return content_id(self.source, {"source": asdict(source), "split": ingest.split_dict(),
                                        "listing": self.listing().digest, "preprocessing": preprocessing.to_dict()})


@lru_cache(maxsize=8)
def _listing(source: FolderSource | ParquetSource) -> Listing:
    return source.listing()


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mouse"
    """`mouse`: a small ViT trained in the pipeline on the dataset's labels; `timm`: a timm
    VisionTransformer; `open_clip`: a CLIP image tower with a zero-shot head over the dataset's
    classes (both `name`, `weights`, `kwargs`; converted to a HookedViT)."""
    vit: dict = field(default_factory=dict)
    """mouse: overrides of analysis.models.vit.ViTConfig."""
    train: dict = field(default_factory=dict)
    """mouse: overrides of analysis.models.mouse.MouseTrainConfig (except `vit`)."""
    name: str | None = None
    """timm/open_clip: the model name, e.g. vit_base_patch16_224 or ViT-B-32
    (analysis.models.zoo.list_models)."""
    weights: str = "random"
    """A local .safetensors/.pt/.pth file, `random` (initialised from seed 0: for tests and
    baselines), or from the hub (online only): `pretrained` (timm) or a pretrained tag (open_clip)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of timm.create_model / open_clip.create_model (e.g. img_size)."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """open_clip: prompt templates of the zero-shot head, one "{}" each for the class name."""

    def __post_init__(self):
        check_choice("model kind", self.kind, MODEL_KINDS)
        if self.kind == "mouse" and (self.name or self.kwargs or self.weights != "random"):
            raise ValueError("model.name, model.weights and model.kwargs are for kind timm; the mouse is trained "
                             "here (configure it with model.vit and model.train)")
        if self.kind != "mouse" and (not self.name or self.vit or self.train):
            raise ValueError(f"a {self.kind} model needs model.name (e.g. vit_base_patch16_224, ViT-B-32) and takes "
                             "no model.vit or model.train: its architecture and weights are the library's")
        if self.kind != "open_clip" and self.templates != DEFAULT_TEMPLATES:
            raise ValueError("model.templates are the zero-shot prompts of an open_clip model")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad or not self.templates:
            raise ValueError(f"model.templates {bad or list(self.templates)}: each needs exactly one '{{}}' "
                             "where the class name goes")

    def config(self, n_classes: int) -> MouseTrainConfig:
        """The mouse's full training config; the architecture starts from the mouse defaults."""
        vit_defaults = MouseTrainConfig().vit.to_dict()
        vit = construct(ViTConfig, {**vit_defaults, **self.vit, "n_classes": n_classes}, "model.vit")
        return construct(MouseTrainConfig, {**self.train, "vit": vit}, "model.train")

    def model_input(self) -> ModelInput:
        """What the timm or open_clip model expects (config, preprocessing, normalisation)."""
        return _model_input(self.kind, self.name, json.dumps(self.kwargs, sort_keys=True))

    def weights_source(self) -> str:
        """`random`, `hub` (timm's `pretrained`, an open_clip pretrained tag) or `file`."""
        if self.weights == "random":
            return "random"
        if self.kind == "timm":
            return "hub" if self.weights == "pretrained" else "file"
        import open_clip

        return "hub" if self.weights in open_clip.list_pretrained_tags_by_model(self.name) else "file"

    def model_id(self, dataset_id: str, class_names: list[str]) -> str:
        if self.kind == "mouse":  # trained on the dataset, so its id chains from it
            return content_id(self.kind, {"config": self.config(len(class_names)).to_dict(), "dataset": dataset_id})
        weights = _file_sha256(self.weights) if self.weights_source() == "file" else self.weights
        payload = {"name": self.name, "kwargs": self.kwargs, "weights": weights}
        if self.kind == "open_clip":  # its head is built from the dataset's class names
            payload |= {"templates": list(self.templates), "class_names": list(class_names)}
        return content_id(self.kind, payload)


@lru_cache(maxsize=8)
def _model_input(kind: str, name: str, kwargs_json: str) -> ModelInput:
    return (timm_input if kind == "timm" else open_clip_input)(name, **json.loads(kwargs_json))


@lru_cache(maxsize=8)
def _file_sha256(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.weights {path!r} is not a file: pass a .safetensors/.pt/.pth file, 'pretrained' or "
                         "'random'")
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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
        if self.model.kind != "mouse" and self.dataset.source == "shapes":
            raise ValueError(f"the shapes generator makes the mouse's 64x64 grayscale images; a {self.model.kind} "
                             "model reads a folder or parquet dataset source (dataset.source)")
        select_tokens(self.vit_config(), self.activations.tokens)  # e.g. 'cls' on a model without one

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
        distribution: a timm head's classes are not the dataset's)."""
        return "kl" if self.model.kind == "timm" else "labels"

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
