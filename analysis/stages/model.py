"""Stage 2: train the suite's mouse ViT on its dataset's task, or convert its timm model (or reuse
either)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from analysis.catalog import write_table_partition
from analysis.data.images import open_images, read_labels
from analysis.models.mouse import train_mouse
from analysis.integrity import file_lock, read_done, remove_temporaries, require_done, write_done
from analysis.models.clip_zero_shot import HEAD_CONFIG, HEAD_WEIGHTS, ZeroShotClassifier, ZeroShotHead, zero_shot_head
from analysis.models.zoo import create_open_clip, load_model as load_named_model
from analysis.paths import DataRoot
from analysis.stages.machine import machine, note_reuse
from analysis.stages.suite import SuiteSpec
from analysis.models.vit import CONFIG_FILE, WEIGHTS_FILE, HookedViT, ViTConfig

RESULT_FILE = "result.json"  # written last: its presence marks a finished model


def vit_config(spec: SuiteSpec) -> ViTConfig:
    return spec.vit_config()


def ensure_model(spec: SuiteSpec, root: DataRoot, *, device: str = "cpu", progress: bool = True,
                 on_step: Callable[[dict], None] | None = None, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """The suite's model, made unless it is done: the mouse trained (`on_step` and `on_epoch` get
    its training rows; see train_mouse), or the timm/open_clip/file model converted."""
    directory = root.model(spec.model_id)
    done = directory / RESULT_FILE
    with file_lock(root.lock(spec.model_id)):  # a second run waits, then reuses
        summary = read_done(done)  # None when absent, or damaged (logged): then made again
        if summary is None:
            remove_temporaries(directory, root.table("mouse_history") / f"model_id={spec.model_id}")
            summary, tables = _convert(spec, root) if spec.model.kind != "mouse" else \
                _train_mouse(spec, root, device, progress, on_step, on_epoch)
            write_done(done, summary, [directory / name for name in _MODEL_FILES if (directory / name).exists()]
                       + tables)
        elif spec.model.kind == "mouse":  # trained here: its weights depend on the machine
            summary.update(note_reuse(f"model {spec.model_id}", summary, device))
    return {**summary, "path": str(directory)}


_MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, HEAD_WEIGHTS, HEAD_CONFIG)


def _train_mouse(spec: SuiteSpec, root: DataRoot, device: str, progress: bool,
                 on_step: Callable[[dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> tuple[dict, list[Path]]:
    """The mouse trained on the dataset's task and saved; (summary, table files written)."""
    images = open_images(root.images(spec.dataset_id))[...]
    labels = read_labels(root.images(spec.dataset_id))
    result = train_mouse(
        images, labels.column("label").to_numpy(), np.asarray(labels.column("split").to_pylist()),
        spec.model_config(), device=device, progress=progress, on_step=on_step, on_epoch=on_epoch,
    )
    result.model.save(root.model(spec.model_id))
    history = write_table_partition(root.table("mouse_history"), {"model_id": spec.model_id},
                                    pa.Table.from_pylist(result.history))
    summary = {
        "model_id": spec.model_id, "dataset_id": spec.dataset_id,
        "train_accuracy": float(result.train_accuracy), "eval_accuracy": float(result.eval_accuracy),
        "steps": int(result.steps), "train_seconds": round(float(result.seconds), 2),
        "weights_hash": result.model.weights_hash(), **machine(device),
    }
    return summary, [history]


def _convert(spec: SuiteSpec, root: DataRoot) -> tuple[dict, list[Path]]:
    """The timm or open_clip model as a HookedViT taking [0, 1] pixels (its normalisation folded
    in), saved; an open_clip model also gets its zero-shot head over the dataset's classes.
    (summary, table files written: none)"""
    m = spec.model
    source = m.model_input()
    directory = root.model(spec.model_id)
    if m.kind == "file":
        model = HookedViT.load(Path(m.name).expanduser())
        model.save(directory)
        return {"model_id": spec.model_id, "kind": m.kind, "name": m.name, "weights_hash": model.weights_hash()}, []
    weights = None if m.weights_source() == "hub" and m.kind == "timm" else m.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights="random" is reproducible
        if m.kind == "timm":
            model, head = load_named_model(f"timm:{m.name}", weights, **m.kwargs), None
        else:
            import open_clip

            clip = create_open_clip(m.name, weights, m.kwargs)
            model = HookedViT.from_open_clip(clip)
            head = zero_shot_head(clip, open_clip.get_tokenizer(m.name), spec.class_names(), m.templates)
    model = model.with_input_normalization(source.mean, source.std)
    model.save(directory)
    if head is not None:
        head.save(directory)
    return {"model_id": spec.model_id, "kind": m.kind, "name": m.name, "weights": m.weights,
            "kwargs": m.kwargs, "input_mean": list(source.mean), "input_std": list(source.std),
            "preprocessing": source.preprocessing.to_dict(), "weights_hash": model.weights_hash()}, []


def load_model(spec: SuiteSpec, root: DataRoot, device: str = "cpu") -> HookedViT | ZeroShotClassifier:
    """The model evaluations splice into: the HookedViT, or for open_clip the tower under its
    zero-shot head (logits over the dataset's classes)."""
    tower = load_tower(spec, root, device)
    if spec.model.kind != "open_clip":
        return tower
    return ZeroShotClassifier(tower, ZeroShotHead.load(root.model(spec.model_id), device)).eval()


def load_tower(spec: SuiteSpec, root: DataRoot, device: str = "cpu") -> HookedViT:
    """The HookedViT whose hooks the activation stores read, refused when a file its done-marker
    vouches for is missing or truncated."""
    directory = root.model(spec.model_id)
    require_done(directory / RESULT_FILE, "model", "materialize the model asset again (make run does)")
    return HookedViT.load(directory, device=device).eval()
