"""Stage 1: generate (or reuse) the suite's image dataset."""

from __future__ import annotations

import json

import numpy as np

from analysis.data.images import open_images, read_labels, write_image_dataset
from analysis.paths import DataRoot
from analysis.data.shapes import ShapesConfig, generate_shapes
from analysis.stages.suite import SuiteSpec


def shapes_config(spec: SuiteSpec) -> ShapesConfig:
    return spec.dataset.config()


def ensure_dataset(spec: SuiteSpec, root: DataRoot) -> dict:
    directory = root.images(spec.dataset_id)
    if not (directory / "labels.parquet").exists():
        cfg = shapes_config(spec)
        data = generate_shapes(cfg)
        write_image_dataset(
            directory, data.images, data.labels,
            attrs={"generator": spec.dataset.generator, "config": spec.dataset.params,
                   "class_names": data.class_names},
        )
    images = open_images(directory)
    labels = read_labels(directory)
    split = np.asarray(labels.column("split").to_pylist())
    return {
        "dataset_id": spec.dataset_id,
        "path": str(directory),
        "n_images": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "n_train": int((split == "train").sum()),
        "n_eval": int((split == "eval").sum()),
        "content_hash": images.attrs["content_hash"],
        "class_names": json.dumps(images.attrs["class_names"]),
    }


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


def training_monitor_images(spec, root: DataRoot) -> np.ndarray:
    """The held-out images scored during training: the first EVAL_IMAGES_DURING_TRAINING of them."""
    return evaluation_images(spec, root)[:EVAL_IMAGES_DURING_TRAINING]
