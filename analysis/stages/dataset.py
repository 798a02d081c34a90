"""Stage 1: generate or ingest (or reuse) the suite's image dataset."""

from __future__ import annotations

import json

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.catalog import write_table_partition
from analysis.data.images import DONE_FILE, open_images, read_labels, write_image_dataset
from analysis.data.ingest import ingest
from analysis.data.shapes import generate_shapes
from analysis.evaluation.mining_counts import MAX_FACTOR_VALUES
from analysis.integrity import file_lock, read_done, remove_temporaries
from analysis.paths import DataRoot
from analysis.stages.suite import SuiteSpec

REJECTED_FILE = "rejected.parquet"


def ensure_dataset(spec: SuiteSpec, root: DataRoot, *, progress: bool = True) -> dict:
    directory = root.images(spec.dataset_id)
    images_table = root.table("images") / f"dataset_id={spec.dataset_id}" / "part.parquet"
    with file_lock(root.lock(spec.dataset_id)):  # a second run waits, then reuses
        if read_done(directory / DONE_FILE) is None:  # absent, or damaged (logged): (re)written whole
            remove_temporaries(directory)
            images_table.unlink(missing_ok=True)  # the catalog's copy follows the dataset
            if spec.dataset.source == "shapes":
                data = generate_shapes(spec.dataset.config())
                write_image_dataset(directory, data.images, data.labels,
                                    attrs={"source": "shapes", "config": spec.dataset.params,
                                           "class_names": data.class_names})
            else:
                _ingest(spec, root, progress)
        if not images_table.exists():  # labels, latents, split, sha256 and source per image, for SQL joins
            write_table_partition(root.table("images"), {"dataset_id": spec.dataset_id}, read_labels(directory))
        rejected = directory / REJECTED_FILE
        if rejected.exists():  # the table copy, rewritten from the dataset's own (vouched-for) file
            write_table_partition(root.table("rejected_images"), {"dataset_id": spec.dataset_id},
                                  pq.read_table(rejected))
    summary = describe_dataset(root, spec.dataset_id)
    return {**summary, "class_names": json.dumps(summary["class_names"])}


def describe_dataset(root: DataRoot, dataset_id: str) -> dict:
    """A finished dataset's size, split, content hash, classes and source, from its own files;
    `n_rejected` (ingested sources) and `n_duplicates` only where the dataset records them."""
    directory = root.images(dataset_id)
    images = open_images(directory)
    labels = read_labels(directory)
    split = np.asarray(labels.column("split").to_pylist())
    summary = {
        "dataset_id": dataset_id,
        "path": str(directory),
        "n_images": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "n_train": int((split == "train").sum()),
        "n_eval": int((split == "eval").sum()),
        "content_hash": images.attrs["content_hash"],
        "class_names": list(images.attrs["class_names"]),
        "source": images.attrs.get("source"),
        "config": images.attrs.get("config"),
    }
    if (directory / REJECTED_FILE).exists():  # an ingested source
        summary["n_rejected"] = pq.read_metadata(directory / REJECTED_FILE).num_rows
    if "duplicate_of" in labels.column_names:
        summary["n_duplicates"] = len(labels) - labels.column("duplicate_of").null_count
    summary["n_eval_copies_of_train"] = eval_copies_of_train(labels)
    return summary


def eval_copies_of_train(labels) -> int:
    """Held-out images whose pixels equal a training image's (0 for a split over content)."""
    shas = np.asarray(labels.column("sha256").to_pylist())
    split = np.asarray(labels.column("split").to_pylist())
    return int(np.isin(shas[split == "eval"], shas[split == "train"]).sum())


def _ingest(spec: SuiteSpec, root: DataRoot, progress: bool) -> None:
    """Decode a folder or Parquet source into the stored dataset; unusable files go to the
    `rejected_images` table (dataset_id partition) with their reason."""
    source, cfg = spec.dataset.config()
    listing = spec.dataset.listing()
    directory = root.images(spec.dataset_id)
    pre = spec.preprocessing()
    ingest(source.entries(), listing.n_entries, pre, directory, class_names=listing.class_names,
           eval_fraction=cfg.eval_fraction, seed=cfg.seed, workers=cfg.workers, processes=cfg.processes,
           progress=progress,
           attrs={"source": spec.dataset.source, "config": spec.dataset.params, "listing": listing.digest,
                  "preprocessing": pre.to_dict(), "class_names": list(listing.class_names)})


def split_indices(root: DataRoot, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(train image indices, eval image indices) from the dataset's own per-image split."""
    split = np.asarray(read_labels(root.images(dataset_id)).column("split").to_pylist())
    return np.flatnonzero(split == "train"), np.flatnonzero(split == "eval")


EVAL_IMAGES_DURING_TRAINING = 256
"""Held-out images every dictionary trainer scores at each log row (the eval_fvu column)."""


def evaluation_images(spec, root: DataRoot) -> np.ndarray:
    """The held-out images a suite evaluates and mines on: the first `evaluation.max_images` of
    the eval split (never trained on)."""
    _, eval_idx = split_indices(root, spec.dataset_id)
    return eval_idx[: spec.evaluation.max_images]


def dead_window_images(spec, root: DataRoot, tokens_per_image: int) -> np.ndarray:
    """The held-out images dead and dense fractions are counted on: the whole eval split, or its
    last images holding `evaluation.dead_tokens` tokens when the split is larger."""
    _, eval_idx = split_indices(root, spec.dataset_id)
    keep = -(-spec.evaluation.dead_tokens // tokens_per_image)
    return eval_idx[-keep:]


def training_monitor_images(spec, root: DataRoot) -> np.ndarray:
    """The held-out images scored during training: the first EVAL_IMAGES_DURING_TRAINING of them."""
    return evaluation_images(spec, root)[:EVAL_IMAGES_DURING_TRAINING]


NOT_FACTORS = {"image_idx", "label", "split", "sha256", "source", "duplicate_of"}
"""labels.parquet columns that are bookkeeping, not attributes of an image's content."""


def dataset_labels(spec: SuiteSpec, root: DataRoot) -> np.ndarray | None:
    """Every image's label, by image index (row i of labels.parquet is image i), or None when
    the dataset has no label column."""
    table = read_labels(root.images(spec.dataset_id))
    if "label" not in table.column_names:
        return None
    order = table.column("image_idx").to_numpy()
    if not np.array_equal(order, np.arange(len(order))):
        raise ValueError(f"{root.images(spec.dataset_id)}/labels.parquet is not in image order: ingest it again")
    return table.column("label").to_numpy(zero_copy_only=False)


def dataset_factors(spec: SuiteSpec, root: DataRoot) -> dict[str, np.ndarray]:
    """The categorical per-image columns of labels.parquet beyond the label (the latent factors of
    generated shapes; extra columns of a label file), by image index: integer or text columns with at
    most MAX_FACTOR_VALUES distinct values."""
    table = read_labels(root.images(spec.dataset_id))
    factors = {}
    for name in table.column_names:
        column = table.column(name)
        if name in NOT_FACTORS or not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)):
            continue
        values = column.to_numpy(zero_copy_only=False)
        if len(pc.unique(column)) <= MAX_FACTOR_VALUES:
            factors[name] = values
    return factors
