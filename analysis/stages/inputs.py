"""The suite's inputs: which images (`dataset:`) and which model (`model:`).

A dataset is generated here (shapes) or ingested from a source (an image folder, Parquet files);
a model is the mouse trained here, or a timm or open_clip ViT converted to a HookedViT. Listings
and model configs are read without decoding an image or loading a weight (and cached per
process), so ids and validation cost little.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from analysis.data.ingest import IngestConfig
from analysis.data.shapes import ShapesConfig
from analysis.data.sources import FolderSource, HFSource, Listing, ParquetSource
from analysis.ids import content_id
from analysis.models.clip_zero_shot import DEFAULT_TEMPLATES
from analysis.models.inputs import Preprocessing
from analysis.models.mouse import MouseTrainConfig
from analysis.models.vit import CONFIG_FILE, ViTConfig
from analysis.models.zoo import ModelInput, open_clip_input, timm_input
from analysis.stages.parsing import check_choice, construct

DATASET_SOURCES = ("shapes", "folder", "parquet", "hf")
MODEL_KINDS = ("mouse", "timm", "open_clip", "file")


@dataclass(frozen=True)
class DatasetSpec:
    source: str = "shapes"
    """Where the images come from; see DATASET_SOURCES: `shapes` (generated here), `folder` (a
    directory of images, analysis.data.sources.FolderSource), `parquet` (ParquetSource), `hf` (a
    Hugging Face dataset saved to disk, or on the hub by name: HFSource)."""
    params: dict = field(default_factory=dict)
    """Overrides of the source's config (ShapesConfig fields; the source class's fields plus
    IngestConfig's eval_fraction, seed and workers)."""

    def __post_init__(self):
        check_choice("dataset source", self.source, DATASET_SOURCES)

    def config(self) -> ShapesConfig | tuple[FolderSource | ParquetSource | HFSource, IngestConfig]:
        """The source's full config: code defaults with this spec's overrides."""
        if self.source == "shapes":
            return construct(ShapesConfig, self.params, "dataset.params")
        cls = {"folder": FolderSource, "parquet": ParquetSource, "hf": HFSource}[self.source]
        ingest_keys = {f.name for f in fields(IngestConfig)}
        valid = [f.name for f in fields(cls)] + sorted(ingest_keys)
        for key in self.params:
            check_choice("key in suite section 'dataset.params'", key, valid)
        source = construct(cls, {k: v for k, v in self.params.items() if k not in ingest_keys}, "dataset.params")
        return source, construct(IngestConfig, {k: v for k, v in self.params.items() if k in ingest_keys},
                                 "dataset.params")

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


@dataclass(frozen=True)
class ArrivalsSpec:
    """Images added after the suite was built (`analysis.stages.arrivals`): a folder the `arrivals`
    sensor watches. Each batch of new files becomes an arrival, extracted with the suite's model
    and mined by every dictionary beside the held-out images; nothing trains on them."""

    path: str | None = None
    """The watched folder (sub-folders name classes, as in a folder dataset; a name the suite's
    dataset does not have leaves the image unlabelled). None: the suite takes no arrivals."""

    def __post_init__(self):
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ValueError(f"arrivals.path={self.path!r}: expected a folder path, e.g. path: data/inbox, "
                             "or leave it unset")


@lru_cache(maxsize=8)
def _listing(source: FolderSource | ParquetSource | HFSource) -> Listing:
    return source.listing()


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mouse"
    """`mouse`: a small ViT trained in the pipeline on the dataset's labels; `timm`: a timm
    VisionTransformer; `open_clip`: a CLIP image tower with a zero-shot head over the dataset's
    classes (both `name`, `weights`, `kwargs`; converted to a HookedViT); `file`: a HookedViT
    directory (`name`: its path, as written by HookedViT.save; it takes [0, 1] pixels)."""
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
        if self.kind == "file" and (self.kwargs or self.weights != "random"):
            raise ValueError("a file model is a HookedViT directory holding its own weights: set model.name to "
                             "its path and drop model.weights and model.kwargs")
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
        if self.kind == "file":
            return content_id(self.kind, {"weights_hash": _saved_model(self.name)["weights_hash"]})
        weights = _file_sha256(self.weights) if self.weights_source() == "file" else self.weights
        payload = {"name": self.name, "kwargs": self.kwargs, "weights": weights}
        if self.kind == "open_clip":  # its head is built from the dataset's class names
            payload |= {"templates": list(self.templates), "class_names": list(class_names)}
        return content_id(self.kind, payload)


@lru_cache(maxsize=8)
def _model_input(kind: str, name: str, kwargs_json: str) -> ModelInput:
    if kind == "file":  # our own HookedViT: it takes [0, 1] pixels at its size, normalisation inside
        vit = ViTConfig.from_dict(_saved_model(name)["config"])
        pre = Preprocessing(size=vit.image_size, channels=vit.in_chans)
        return ModelInput(vit, pre, (0.0,) * vit.in_chans, (1.0,) * vit.in_chans)
    return (timm_input if kind == "timm" else open_clip_input)(name, **json.loads(kwargs_json))


@lru_cache(maxsize=8)
def _saved_model(path: str) -> dict:
    config = Path(path).expanduser() / CONFIG_FILE
    if not config.is_file():
        raise ValueError(f"model.name {path!r} is not a HookedViT directory (no {CONFIG_FILE}): pass a directory "
                         "written by HookedViT.save, e.g. <data root>/models/<model_id>")
    return json.loads(config.read_text())


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
