"""A suite: one dataset, one model, one activation store, and a grid of dictionaries on it.

Parsed from YAML (pipelines/suites/*.yaml) into frozen dataclasses and validated before any work
starts: unknown dataset source, model kind or hook names fail here with the valid names listed.
Ids are derived from content (analysis.ids), so the paths of every artifact follow from the spec.
The dataset and model sections are in `analysis.stages.inputs`, the dictionary sections and the
members they expand into in `analysis.stages.members`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from analysis.activations.tokens import TOKEN_SELECTIONS, select_tokens
from analysis.ids import content_id
from analysis.models.inputs import Preprocessing
from analysis.models.mouse import MouseTrainConfig
from analysis.models.vit import ViTConfig
from analysis.stages.inputs import ArrivalsSpec, DatasetSpec, ModelSpec
from analysis.stages.members import CrosscoderGrid, DictionaryGrid, Member, TranscoderGrid
from analysis.stages.parsing import check_choice, construct, describe_value

STORE_DTYPES = ("float16", "bfloat16", "float32")
# A suite's name becomes part of paths (reports/<name>_fvu_vs_l0.png) and of table rows: one plain
# path component, so no name can reach outside the data root.
SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
        _check_positive("activations", self, ("images_per_shard", "images_per_chunk", "batch_size",
                                              "patches_sample", "max_store_gb"))

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
    dead_tokens: int = 10_000_000
    """Dead and dense fractions count firing over the whole evaluation split, or over its last
    images holding this many tokens when it is larger (DESIGN.md §4): a latent silent on the
    `max_images` subset may fire elsewhere in the split."""

    def __post_init__(self):
        _check_positive("evaluation", self, ("max_images", "n_top", "batch_images", "dead_tokens"))


def _check_positive(section: str, spec, names: tuple[str, ...]) -> None:
    for name in names:
        value, default = getattr(spec, name), getattr(type(spec), name)
        if value is not None and not value > 0:
            example = f"; e.g. {name}: {default} (the default)" if default is not None else ", or leave it unset"
            raise ValueError(f"{section}.{name}={value!r}: expected a positive number{example}")


@dataclass(frozen=True)
class ToolkitSpec:
    """The classic analyses of the suite's model (`analysis.stages.toolkit`)."""

    max_images: int = 512
    """Held-out images read by the lens, attribution, perturbations and memories (the first of
    the evaluation split), and the probe's held-out set."""
    probe_images: int = 2048
    """Training-split images the per-layer linear probe is fitted on."""
    patch_pair: tuple[int, int] | None = None
    """(clean, corrupted) dataset image indices of the patching sweep; None: the first held-out
    image the model classifies right and the first held-out image of another class."""
    attention_image: int | None = None
    """Dataset image index drawn in the attention views; None: the clean image of the patching pair."""
    patch_positions: int = 64
    """Cells per layer of the patching sweeps: every token alone when the model has at most this
    many, else the prefix tokens alone and the patches in square blocks (`token_blocks`): each cell
    costs a forward pass per layer (a ViT-B/16's 197 single tokens: ~8 min on 2 CPU cores)."""

    def __post_init__(self):
        _check_positive("toolkit", self, ("max_images", "probe_images", "patch_positions"))
        if self.patch_pair is not None and (len(self.patch_pair) != 2 or len(set(self.patch_pair)) != 2):
            raise ValueError(f"toolkit.patch_pair={self.patch_pair!r}: expected two different dataset image "
                             "indices [clean, corrupted], e.g. patch_pair: [12, 40], or leave it unset")


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
    toolkit: ToolkitSpec = ToolkitSpec()
    arrivals: ArrivalsSpec = ArrivalsSpec()

    def __post_init__(self):
        check_suite_name(self.name)
        if self.model.kind != "mouse" and self.dataset.source == "shapes":
            raise ValueError(f"the shapes generator makes the mouse's 64x64 grayscale images; a {self.model.kind} "
                             "model reads a folder or parquet dataset source (dataset.source)")
        # e.g. 'cls' on a model without one, or a patch sample larger than the patch grid
        select_tokens(self.vit_config(), self.activations.tokens, self.activations.patches_sample)
        if self.arrivals.path is not None and self.activations.patches_sample:
            # a sampled store keeps patches drawn from the image index; an arrival's images are
            # indexed in its own store, so mined heatmaps would be placed at the wrong patches
            raise ValueError(f"arrivals.path={self.arrivals.path!r} with activations.patches_sample="
                             f"{self.activations.patches_sample}: arrivals need every patch kept; unset one of them")

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
    "toolkit": ToolkitSpec,
    "arrivals": ArrivalsSpec,
}


def check_suite_name(name) -> None:
    """Refuse a name that is not one plain path component (`../x`, `a/b`, spaces, 200 chars)."""
    if not isinstance(name, str) or not SUITE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"suite name {name!r} is not allowed: it names files under the data root, so it must "
                         f"match {SUITE_NAME.pattern} without '..' (letters, digits, _ . -, at most 64); "
                         "set `name:` in the suite YAML, e.g. name: my_suite")


def parse_suite(raw: dict, name: str = "suite") -> SuiteSpec:
    """A suite from its YAML mapping; `name` when the mapping has no `name:` (the file's stem)."""
    if not isinstance(raw, dict):
        raise ValueError(f"the top level of a suite must be a mapping of sections (name, {', '.join(_SECTIONS)}), "
                         f"got {describe_value(raw)}: write one `section: {{key: value}}` per line, e.g. "
                         "`dictionaries: {ks: [8, 32]}`")
    for key in raw:
        check_choice("suite section", key, ["name", *_SECTIONS])
    # an empty section (`dictionaries:` with nothing under it) keeps the defaults; any other
    # non-mapping is refused by construct, never read as empty
    parts = {sec: construct(cls, {} if raw.get(sec) is None else raw[sec], sec) for sec, cls in _SECTIONS.items()}
    return SuiteSpec(name=raw.get("name", name), **parts)


def load_suite(path: str | Path) -> SuiteSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} does not exist: pass a YAML path or a name in pipelines/suites/")
    raw = read_suite_yaml(path)
    try:
        return parse_suite(raw, name=path.stem)
    except ValueError as err:
        raise ValueError(f"suite file {path}: {err}") from err


def read_suite_yaml(path: Path):
    """The file's top-level value; a syntax error, a duplicated key or an empty file is one
    ValueError naming the file (and line and column), never a traceback or an all-defaults suite."""
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"suite file {path} is not valid YAML{_position(err)}: {_yaml_problem(err)}; "
                         "fix the syntax there") from None
    if raw is None:
        raise ValueError(f"suite file {path} is empty: a suite needs at least a `name:` and the sections it "
                         f"changes ({', '.join(_SECTIONS)}); see pipelines/suites/default.yaml")
    return raw  # any other non-mapping is refused by parse_suite, naming what it is


def _position(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"  # 0-based in yaml


def _yaml_problem(err: yaml.YAMLError) -> str:
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return ", ".join(p for p in parts if p) or str(err).splitlines()[0]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys, silently dropping the first section."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (each key once per mapping)",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
