"""The lineage tables: which images, model weights, activations, code and training config made
each dictionary, as SQL: `datasets`, `models`, `activation_stores` and `dictionaries`, joined by
their ids (dictionaries.store_id + hook -> activation_stores -> model_id / dataset_id).

They are written by the catalog stage, for the suite's own artifacts, from each artifact's own
files (done-markers, configs, store attributes), not by the stages that make the artifacts: a run
that reuses an artifact, or a root made before these tables existed, still gets its rows, and a
row always describes what is on disk now, including an artifact another suite made or remade.
Every partition is keyed by a content id and holds nothing suite-specific (no `suite` column:
suites sharing a root share the artifact, so they write the same row to it). An artifact whose
done-marker is missing or fails its check is not finished: its partition is removed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from analysis.activations.stats import read_stats
from analysis.activations.store import completed, open_layout
from analysis.catalog import write_table_partition
from analysis.data.images import DONE_FILE
from analysis.dictionaries.base import CONFIG_FILE as DICTIONARY_CONFIG
from analysis.dictionaries.base import WEIGHTS_FILE as DICTIONARY_WEIGHTS
from analysis.ids import canonical_json
from analysis.integrity import FILES_KEY, marker_damage
from analysis.models.vit import CONFIG_FILE as MODEL_CONFIG
from analysis.models.vit import WEIGHTS_FILE as MODEL_WEIGHTS
from analysis.paths import DataRoot
from analysis.stages.dataset import describe_dataset
from analysis.stages.dictionaries import SUMMARY_FILE, dictionary_id
from analysis.stages.members import Member
from analysis.stages.model import RESULT_FILE
from analysis.stages.suite import SuiteSpec

_str, _int, _float, _bool = pa.string(), pa.int64(), pa.float64(), pa.bool_()
_machine = [("device", _str), ("torch_threads", _int), ("torch_version", _str)]

DATASETS_SCHEMA = pa.schema([
    ("dataset_id", _str), ("source", _str), ("n_images", _int), ("image_shape", pa.list_(_int)),
    ("n_train", _int), ("n_eval", _int), ("n_duplicates", _int), ("n_eval_copies_of_train", _int),
    ("n_rejected", _int), ("content_hash", _str), ("class_names", pa.list_(_str)), ("config", _str),
    ("path", _str)])
MODELS_SCHEMA = pa.schema([
    ("model_id", _str), ("kind", _str), ("name", _str), ("weights", _str), ("dataset_id", _str),
    ("weights_hash", _str), ("weights_sha256", _str),
    ("image_size", _int), ("patch_size", _int), ("in_chans", _int), ("d_model", _int), ("n_layers", _int),
    ("n_heads", _int), ("d_mlp", _int), ("n_classes", _int), ("n_registers", _int), ("class_token", _bool),
    ("pool", _str), ("config", _str), ("train_accuracy", _float), ("eval_accuracy", _float), ("steps", _int),
    *_machine, ("path", _str)])
ACTIVATION_STORES_SCHEMA = pa.schema([
    ("store_id", _str), ("hook", _str), ("model_id", _str), ("dataset_id", _str), ("model_weights_hash", _str),
    ("dataset_content_hash", _str), ("dtype", _str), ("compute_dtype", _str), ("tokens", _str),
    ("patches_sample", _int), ("preprocessing", _str), ("d_model", _int), ("n_images", _int),
    ("tokens_per_image", _int), ("images_per_shard", _int), ("complete", _bool), ("n_tokens_total", _int),
    ("mean_norm", _float), ("code_version", _str), ("code_modified", _bool), ("path", _str)])
DICTIONARIES_SCHEMA = pa.schema([
    ("dict_id", _str), ("kind", _str), ("hook", _str), ("out_hook", _str), ("hooks", pa.list_(_str)),
    ("architecture", _str), ("expansion", _int), ("width", _int), ("k", _int), ("sparsity_coef", _float),
    ("skip", _bool), ("seed", _int), ("store_id", _str), ("model_id", _str), ("dataset_id", _str),
    ("dataset_content_hash", _str), ("model_weights_hash", _str), ("code_version", _str),
    ("code_modified", _bool), ("weights_sha256", _str), *_machine, ("train_config", _str), ("lr", _float),
    ("warmup_steps", _int), ("n_train_tokens", _int), ("batch_size", _int), ("steps", _int),
    ("train_tokens", _int), ("train_seconds", _float), ("path", _str)])


def write_lineage_tables(spec: SuiteSpec, root: DataRoot) -> dict[str, int]:
    """Rewrite the suite's partitions of the four lineage tables from its artifacts on disk;
    returns the rows written per table."""
    written = {
        "datasets": _write("datasets", {"dataset_id": spec.dataset_id}, _dataset_rows(root, spec.dataset_id),
                           DATASETS_SCHEMA, root),
        "models": _write("models", {"model_id": spec.model_id}, _model_rows(root, spec.model_id, spec.model.kind),
                         MODELS_SCHEMA, root),
        "activation_stores": _write("activation_stores", {"store_id": spec.store_id},
                                    _store_rows(root, spec.store_id, spec.activations.hooks),
                                    ACTIVATION_STORES_SCHEMA, root),
        "dictionaries": 0,
    }
    for member in spec.members():
        dict_id = dictionary_id(spec, member)
        written["dictionaries"] += _write("dictionaries", {"dict_id": dict_id},
                                          _dictionary_rows(root, dict_id, member), DICTIONARIES_SCHEMA, root)
    return written


def _write(table: str, partition: dict[str, str], rows: list[dict], schema: pa.Schema, root: DataRoot) -> int:
    """Replace the partition with `rows`, typed by `schema` (so no column is ever SQL type NULL);
    remove it when there are none (the artifact is not finished)."""
    if not rows:
        shutil.rmtree(root.table(table).joinpath(*(f"{k}={v}" for k, v in partition.items())), ignore_errors=True)
        return 0
    for row in rows:  # a key the schema lacks would be dropped silently, a missing one read as NULL
        if set(row) != set(schema.names):
            raise ValueError(f"{table} row columns differ from {table}'s schema: extra "
                             f"{sorted(set(row) - set(schema.names))}, missing {sorted(set(schema.names) - set(row))}; "
                             f"add them to the schema in {__name__} or drop them from the row")
    write_table_partition(root.table(table), partition, pa.Table.from_pylist(rows, schema=schema))
    return len(rows)


def _finished(marker: Path) -> dict | None:
    """A done-marker's content (file records included) when its stage finished and the files it
    vouches for pass the cheap check (present, right size); else None. Read-only: unlike
    `read_done` it never removes a damaged marker (the stage's own rerun redoes the work)."""
    damage = marker_damage(marker)  # None: no marker
    if damage is None or damage:
        return None
    return json.loads(marker.read_text())


def _picked(source: dict, *names: str) -> dict:
    """`names` from `source`, None where it has no such key (a record written before it existed)."""
    return {name: source.get(name) for name in names}


def _where(root: DataRoot, location: Path | str) -> str:
    """An artifact's place as the tables record it: relative to the data root, so a copied or
    moved root's rows name its own files (as its views read its own tables); a store kept
    elsewhere (`activations_url`) by its URL or absolute path."""
    if isinstance(location, Path) and location.is_relative_to(root.root):
        return location.relative_to(root.root).as_posix()
    return str(location)


def _json_text(value) -> str | None:
    """A nested value as canonical JSON (queryable with DuckDB's json functions); text stays text."""
    return value if value is None or isinstance(value, str) else canonical_json(value)


def _dataset_rows(root: DataRoot, dataset_id: str) -> list[dict]:
    if _finished(root.images(dataset_id) / DONE_FILE) is None:
        return []
    row = describe_dataset(root, dataset_id)
    return [{"n_duplicates": None, "n_rejected": None, **row, "config": _json_text(row["config"]),
             "path": _where(root, root.images(dataset_id))}]


def _model_rows(root: DataRoot, model_id: str, kind: str) -> list[dict]:
    """The model's row; `kind` is the suite's, the one input of the content id `model_id` that
    the model's files do not record."""
    directory = root.model(model_id)
    result = _finished(directory / RESULT_FILE)
    if result is None:
        return []
    vit = json.loads((directory / MODEL_CONFIG).read_text())["config"]
    architecture = ("image_size", "patch_size", "in_chans", "d_model", "n_layers", "n_heads", "d_mlp",
                    "n_classes", "n_registers", "class_token", "pool")
    return [{
        "model_id": model_id, "kind": kind, "name": result.get("name"), "weights": result.get("weights"),
        "dataset_id": result.get("dataset_id"),  # the mouse's training set; a converted model has none
        "weights_hash": result["weights_hash"], "weights_sha256": result[FILES_KEY][MODEL_WEIGHTS]["sha256"],
        **_picked(vit, *architecture), "config": _json_text(vit),
        **_picked(result, "train_accuracy", "eval_accuracy", "steps", "device", "torch_threads", "torch_version"),
        "path": _where(root, directory)}]


def _store_rows(root: DataRoot, store_id: str, hooks) -> list[dict]:
    """One row per hook whose store exists (a store id fixes its hooks, so every suite that
    shares the id writes the same rows)."""
    rows = []
    for hook in hooks:
        location = root.hook_store(store_id, hook)
        try:
            group, layout = open_layout(location)
        except FileNotFoundError:  # not created yet
            continue
        lineage, stats = dict(group.attrs["lineage"]), read_stats(group)
        rows.append({
            "store_id": store_id, "hook": hook,
            **_picked(lineage, "model_id", "dataset_id", "model_weights_hash", "dataset_content_hash", "dtype",
                      "compute_dtype", "tokens"),
            "patches_sample": (lineage.get("patches_sample") or {}).get("n"),
            "preprocessing": _json_text(lineage.get("preprocessing")),
            "d_model": layout.d_model, "n_images": layout.n_images, "tokens_per_image": layout.n_tokens,
            "images_per_shard": layout.images_per_shard, "complete": bool(completed(group).all()),
            "n_tokens_total": None if stats is None else stats.n_tokens,
            "mean_norm": None if stats is None else stats.mean_norm,
            **_picked(dict(group.attrs), "code_version", "code_modified"), "path": _where(root, location)})
    return rows


def _dictionary_rows(root: DataRoot, dict_id: str, member: Member) -> list[dict]:
    """The dictionary's row: the member's fields as the evaluations table has them (its id is
    their content hash), the rest from the files its training wrote."""
    directory = root.dictionary(dict_id)
    summary = _finished(directory / SUMMARY_FILE)
    if summary is None:
        return []
    config = json.loads((directory / DICTIONARY_CONFIG).read_text())
    lineage = config.get("lineage", {})
    train = lineage.get("train_config", {})
    return [{
        "dict_id": dict_id, **_member_fields(member), "width": config.get("width"),
        "store_id": lineage.get("store_id"),
        **_picked(lineage.get("store_lineage", {}), "model_id", "dataset_id", "dataset_content_hash",
                  "model_weights_hash"),
        # code_modified is NULL (unknown) in lineage written before it was recorded
        **_picked(lineage, "code_version", "code_modified"),
        "weights_sha256": summary[FILES_KEY][DICTIONARY_WEIGHTS]["sha256"],
        **_picked(lineage.get("machine", {}), "device", "torch_threads", "torch_version"),
        "train_config": _json_text(train), **_picked(train, "lr", "warmup_steps", "n_train_tokens", "batch_size"),
        **_picked(summary, "steps", "train_tokens", "train_seconds"), "path": _where(root, directory)}]


def _member_fields(member: Member) -> dict:
    """kind, hook(s), architecture and grid values of any member kind (None where a kind has none).
    `hook` is the input hook (a crosscoder's first, as in evaluations); `hooks` every hook the
    dictionary reads or predicts, so `list_contains(hooks, …)` finds it by any of them."""
    fields = asdict(member)
    out_hook = fields.get("out_hook")
    hooks = list(fields.get("hooks") or [h for h in (member.hook, out_hook) if h is not None])
    return {"kind": member.kind, "hook": member.hook, "out_hook": out_hook, "hooks": hooks,
            "architecture": member.architecture, "expansion": member.expansion, "k": member.k,
            "sparsity_coef": getattr(member, "sparsity_coef", None), "skip": fields.get("skip"),
            "seed": member.seed}
