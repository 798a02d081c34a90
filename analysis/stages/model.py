"""Stage 2: train the suite's mouse ViT on its dataset's task, or convert its timm model (or reuse
either)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from analysis.catalog import write_table_partition
from analysis.data.images import open_images, read_labels
from analysis.models.mouse import train_mouse
from analysis.models.zoo import load_model as load_named_model
from analysis.paths import DataRoot
from analysis.stages.suite import SuiteSpec
from analysis.models.vit import HookedViT, ViTConfig

RESULT_FILE = "result.json"  # written last: its presence marks a finished model


def vit_config(spec: SuiteSpec) -> ViTConfig:
    return spec.vit_config()


def ensure_model(spec: SuiteSpec, root: DataRoot, *, device: str = "cpu", progress: bool = True) -> dict:
    directory = root.model(spec.model_id)
    done = directory / RESULT_FILE
    if not done.exists() and spec.model.kind == "timm":
        _convert_timm(spec, root)
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


def load_model(spec: SuiteSpec, root: DataRoot, device: str = "cpu") -> HookedViT:
    return HookedViT.load(root.model(spec.model_id), device=device).eval()


def _convert_timm(spec: SuiteSpec, root: DataRoot) -> None:
    """The timm model as a HookedViT taking [0, 1] pixels (its normalisation folded in), saved."""
    m = spec.model
    source = m.timm_input()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights="random" is reproducible
        model = load_named_model(f"timm:{m.name}", None if m.weights == "pretrained" else m.weights, **m.kwargs)
    model = model.with_input_normalization(source.mean, source.std)
    directory = root.model(spec.model_id)
    model.save(directory)
    summary = {"model_id": spec.model_id, "kind": m.kind, "name": m.name, "weights": m.weights,
               "kwargs": m.kwargs, "input_mean": list(source.mean), "input_std": list(source.std),
               "preprocessing": source.preprocessing.to_dict(), "weights_hash": model.weights_hash()}
    (directory / RESULT_FILE).write_text(json.dumps(summary, indent=2))
