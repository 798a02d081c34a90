"""Stage 2: train the suite's mouse ViT on its dataset's task, or convert its timm model (or reuse
either)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from analysis.catalog import write_table_partition
from analysis.data.images import open_images, read_labels
from analysis.models.mouse import train_mouse
from analysis.models.clip_zero_shot import ZeroShotClassifier, ZeroShotHead, zero_shot_head
from analysis.models.zoo import create_open_clip, load_model as load_named_model
from analysis.paths import DataRoot
from analysis.stages.suite import SuiteSpec
from analysis.models.vit import HookedViT, ViTConfig

RESULT_FILE = "result.json"  # written last: its presence marks a finished model


def vit_config(spec: SuiteSpec) -> ViTConfig:
    return spec.vit_config()


def ensure_model(spec: SuiteSpec, root: DataRoot, *, device: str = "cpu", progress: bool = True) -> dict:
    directory = root.model(spec.model_id)
    done = directory / RESULT_FILE
    if not done.exists() and spec.model.kind != "mouse":
        _convert(spec, root)
    elif not done.exists():
        images = open_images(root.images(spec.dataset_id))[...]
        labels = read_labels(root.images(spec.dataset_id))
        cfg = spec.model_config()
        result = train_mouse(
            images, labels.column("label").to_numpy(), np.asarray(labels.column("split").to_pylist()),
            cfg, device=device, progress=progress,
        )
        result.model.save(directory)
        history = pa.Table.from_pylist(result.history)
        write_table_partition(root.table("mouse_history"), {"model_id": spec.model_id}, history)
        summary = {
            "model_id": spec.model_id, "dataset_id": spec.dataset_id,
            "train_accuracy": float(result.train_accuracy), "eval_accuracy": float(result.eval_accuracy),
            "steps": int(result.steps), "train_seconds": round(float(result.seconds), 2),
            "weights_hash": result.model.weights_hash(),
            # float reductions depend on these: the same seed on another thread count or device
            # gives (slightly) different weights, so lineage records them.
            "device": device, "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        }
        done.write_text(json.dumps(summary, indent=2))
    return {**json.loads(done.read_text()), "path": str(directory)}


def _convert(spec: SuiteSpec, root: DataRoot) -> None:
    """The timm or open_clip model as a HookedViT taking [0, 1] pixels (its normalisation folded
    in), saved; an open_clip model also gets its zero-shot head over the dataset's classes."""
    m = spec.model
    source = m.model_input()
    directory = root.model(spec.model_id)
    if m.kind == "file":
        model = HookedViT.load(Path(m.name).expanduser())
        model.save(directory)
        summary = {"model_id": spec.model_id, "kind": m.kind, "name": m.name, "weights_hash": model.weights_hash()}
        (directory / RESULT_FILE).write_text(json.dumps(summary, indent=2))
        return
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
    summary = {"model_id": spec.model_id, "kind": m.kind, "name": m.name, "weights": m.weights,
               "kwargs": m.kwargs, "input_mean": list(source.mean), "input_std": list(source.std),
               "preprocessing": source.preprocessing.to_dict(), "weights_hash": model.weights_hash()}
    (directory / RESULT_FILE).write_text(json.dumps(summary, indent=2))


def load_model(spec: SuiteSpec, root: DataRoot, device: str = "cpu") -> HookedViT | ZeroShotClassifier:
    """The model evaluations splice into: the HookedViT, or for open_clip the tower under its
    zero-shot head (logits over the dataset's classes)."""
    tower = load_tower(spec, root, device)
    if spec.model.kind != "open_clip":
        return tower
    return ZeroShotClassifier(tower, ZeroShotHead.load(root.model(spec.model_id), device)).eval()


def load_tower(spec: SuiteSpec, root: DataRoot, device: str = "cpu") -> HookedViT:
    """The HookedViT whose hooks the activation stores read."""
    return HookedViT.load(root.model(spec.model_id), device=device).eval()
