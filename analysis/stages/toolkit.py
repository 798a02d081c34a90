"""Stage: the classic toolkit on the suite's model over its held-out images.

    from analysis.stages.toolkit import ensure_toolkit
    summary = ensure_toolkit(spec, DataRoot("data"))   # tables toolkit_*, PNGs under reports/toolkit/<id>/

Each analysis writes one catalog table (partitioned by `toolkit_id`, with the suite, model and
dataset ids as columns) and, where a picture says more, a PNG under `reports/toolkit/<toolkit_id>/`:

    toolkit_identifiability  class-embedding lens: per layer and reading (cls, patches, stream)
    toolkit_attribution      direct logit attribution: per class and component, the mean contribution
    toolkit_attention        per layer and head: attention to the class token, mean attention distance
                             (also attention.png, one image's patterns, and attention.html to explore them)
    toolkit_patching         activation patching of one (clean, corrupted) pair: the residual stream per
                             layer x token (or block of patches: `toolkit.patch_positions`), the MLP
                             output likewise, each head; 1 = clean restored
    toolkit_perturbation     Vilas et al.'s attention perturbations (and, on generated shapes, context
                             perturbations with the sprite's patches as the object): accuracy, identifiability
    toolkit_memories         every MLP and attention-output column read as a class (top class, margin)
    toolkit_key_value        per block: do the MLP memories an image activates most promote its class?
    toolkit_probe            per layer: a linear probe's held-out accuracy beside the class projection's

The class an image is scored on (`target`) is its label where the model's head predicts the
dataset's classes (the mouse, a CLIP zero-shot head); a timm head's classes are not the
dataset's, so there the target is the model's own prediction, and the `target` column says so.
The summary records each analysis's seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from analysis.catalog import write_table_partition
from analysis.data.images import open_images
from analysis.evaluation.toolkit import plots
from analysis.evaluation.toolkit.attention import (attention_distance, attention_grid_png, attention_html,
                                                   attention_patterns, attention_to_cls)
from analysis.evaluation.toolkit.attribution import direct_logit_attribution, mean_by_class, merge_heads
from analysis.evaluation.toolkit.lens import class_embedding_lens, identifiability_table, patch_class_maps
from analysis.evaluation.toolkit.memories import key_value_agreement, memories_table
from analysis.evaluation.toolkit.patching import logit_diff_metric, sweep_heads, sweep_mlp, sweep_resid, token_blocks
from analysis.evaluation.toolkit.perturbation import object_patch_mask, perturbation_table
from analysis.evaluation.toolkit.probe import probe_layers
from analysis.evaluation.toolkit.readout import Readout
from analysis.ids import content_id
from analysis.integrity import file_lock, read_done, write_done
from analysis.models.inputs import to_model_input
from analysis.paths import DataRoot
from analysis.stages.dataset import split_indices
from analysis.stages.dataset import dataset_labels
from analysis.stages.model import load_model
from analysis.stages.suite import SuiteSpec

MARKER = "toolkit.done.json"
VERSION = 1
"""Part of the toolkit id: raise it when an analysis changes what it writes."""
BATCH = 16
"""Images per forward: a ViT-B/16's lens keeps (layers, images, tokens, classes) logits and its
attribution a block's per-head writes, ~0.2 GB at 16 images (1000 classes)."""
MAP_IMAGES = 6
"""Images drawn beside their per-patch top-class maps."""


def toolkit_id(spec: SuiteSpec) -> str:
    return content_id("toolkit", {"model_id": spec.model_id, "dataset_id": spec.dataset_id,
                                  "toolkit": asdict(spec.toolkit), "version": VERSION})


def toolkit_dir(spec: SuiteSpec, root: DataRoot) -> Path:
    return root.reports / "toolkit" / toolkit_id(spec)


def ensure_toolkit(spec: SuiteSpec, root: DataRoot, *, device: str = "cpu", progress: bool = True) -> dict:
    """The toolkit's summary, computed once per (model, dataset, toolkit settings) and reused after
    (redone when a file its marker vouches for is damaged)."""
    tid = toolkit_id(spec)
    directory = toolkit_dir(spec, root)
    with file_lock(root.lock(f"{tid}.toolkit")):
        done = read_done(directory / MARKER)
        if done is not None:
            return done
        summary, files = _Toolkit(spec, root, device, progress).run()
        return write_done(directory / MARKER, summary, files)


class _Toolkit:
    """One run: the model, the held-out images and their targets, then each analysis in turn."""

    def __init__(self, spec: SuiteSpec, root: DataRoot, device: str, progress: bool):
        self.spec, self.root, self.device, self.progress = spec, root, device, progress
        self.tid = toolkit_id(spec)
        self.dir = toolkit_dir(spec, root)
        self.files: list[Path] = []
        self.seconds: dict[str, float] = {}

    def run(self) -> tuple[dict, list[Path]]:
        spec = self.spec
        self.model = load_model(spec, self.root, self.device)
        base = {"toolkit_id": self.tid, "model_id": spec.model_id, "dataset_id": spec.dataset_id}
        try:
            self.readout = Readout(self.model)
        except ValueError as err:  # e.g. a DINOv2 tower: no classes to read
            return {**base, "skipped": str(err)}, []
        self.images = open_images(self.root.images(spec.dataset_id))
        self.class_names = self.readout.class_names if spec.downstream == "kl" else spec.class_names()
        self.train_idx, eval_idx = split_indices(self.root, spec.dataset_id)
        self.eval_idx = eval_idx[: spec.toolkit.max_images]
        self.x = self._inputs(self.eval_idx)
        self.predicted = self._predict(self.x)
        self.target_kind = "label" if spec.downstream == "labels" else "prediction"
        self.labels = dataset_labels(spec, self.root) if self.target_kind == "label" else None
        self.target = self.predicted if self.labels is None else self._targets(self.eval_idx, self.x)
        analyses = [("lens", self.lens), ("attribution", self.attribution), ("attention", self.attention),
                    ("patching", self.patching), ("perturbation", self.perturbation), ("memories", self.memories),
                    ("probe", self.probe)]
        counts = {}
        for name, fn in tqdm(analyses, desc="toolkit", disable=not self.progress):
            t0 = time.perf_counter()
            counts[name] = fn()
            self.seconds[name] = round(time.perf_counter() - t0, 3)
        summary = {**base, "suite": spec.name, "target": self.target_kind, "n_images": len(self.eval_idx),
                   "accuracy": float(np.mean(self.predicted == self.target)), "seconds": self.seconds,
                   "rows": counts, "plots": {p.stem: str(p) for p in self.files if p.suffix == ".png"}}
        return summary, self.files

    # ---- helpers -------------------------------------------------------------------------------

    def _targets(self, idx: np.ndarray, x: torch.Tensor) -> np.ndarray:
        """The classes images are scored on: labels, or the model's predictions (see the module docstring)."""
        return self._predict(x) if self.labels is None else self.labels[idx].astype(np.int64)

    def _predict(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([self.model(x[i:i + BATCH]).argmax(-1) for i in range(0, len(x), BATCH)]).cpu().numpy()

    def _inputs(self, idx: np.ndarray) -> torch.Tensor:
        return to_model_input(self.images.get_orthogonal_selection((np.asarray(idx),)), self.device)

    def _write(self, table: str, rows: list[dict]) -> int:
        ids = {"suite": self.spec.name, "model_id": self.spec.model_id, "dataset_id": self.spec.dataset_id,
               "target": self.target_kind}
        path = write_table_partition(self.root.table(table), {"toolkit_id": self.tid},
                                     pa.Table.from_pylist([{**ids, **r} for r in rows]))
        self.files.append(path)
        return len(rows)

    def _png(self, path: Path) -> Path:
        self.files.append(path)
        return path

    # ---- analyses ------------------------------------------------------------------------------

    def lens(self) -> int:
        lens = class_embedding_lens(self.model, self.x, self.target, batch_size=BATCH)
        rows = identifiability_table(lens, self.target)
        self._png(plots.plot_identifiability(rows, self.dir / "identifiability.png",
                                             f"Class-embedding lens, {len(self.x)} held-out images ({self.target_kind})"))
        last = lens.patch_top.shape[0] - 1
        top, _ = patch_class_maps(lens, last)
        shown = np.arange(min(MAP_IMAGES, len(self.x)))
        self._png(plots.plot_patch_class_maps(self.images.get_orthogonal_selection((self.eval_idx[shown],)),
                                              top[shown].numpy(), self.class_names, self.dir / "patch_classes.png",
                                              f"Top class of each patch at layer {last}"))
        return self._write("toolkit_identifiability", rows)

    def attribution(self) -> int:
        attr = direct_logit_attribution(self.model, self.x, self.target, heads=True, batch_size=BATCH)
        classes = [int(c) for c in np.unique(self.target)]
        by_class = mean_by_class(attr, self.target, classes)
        counts = {c: int(np.sum(self.target == c)) for c in classes}
        rows = [{"class": c, "class_name": self.class_names[c], "component": name, "mean_contribution": float(v),
                 "n_images": counts[c]} for c, values in by_class.items() for name, v in zip(attr.components, values)]
        # the chart shows layers, not heads, and the most frequent classes
        layer_level = merge_heads(attr)
        shown = sorted(classes, key=lambda c: -counts[c])[:6]
        by_layer = mean_by_class(layer_level, self.target, shown)
        self._png(plots.plot_attribution(layer_level.components, {self.class_names[c]: by_layer[c] for c in shown},
                                         self.dir / "attribution.png"))
        return self._write("toolkit_attribution", rows)

    def attention(self) -> int:
        cfg = self.readout.cfg
        # patterns are (L, B, H, T, T): 1.4 GB per 64 images for ViT-B/16, so summarise a few images at a time
        sums, n = None, 0
        for lo in range(0, len(self.x), BATCH):
            patterns = attention_patterns(self.model, self.x[lo:lo + BATCH])
            b = patterns.shape[1]
            parts = [attention_distance(patterns, cfg), attention_distance(patterns, cfg, pixels=False)]
            if cfg.class_token:
                parts.append(attention_to_cls(patterns, cfg))
            sums = [p * b for p in parts] if sums is None else [s + p * b for s, p in zip(sums, parts)]
            n += b
        pixels, patches, *rest = [(s / n).numpy() for s in sums]
        to_cls = rest[0] if rest else None
        rows = [{"layer": layer, "head": h, "attention_to_cls": None if to_cls is None else float(to_cls[layer, h]),
                 "distance_px": float(pixels[layer, h]), "distance_patches": float(patches[layer, h])}
                for layer in range(pixels.shape[0]) for h in range(pixels.shape[1])]
        shown = self.spec.toolkit.attention_image
        shown = self.patch_pair()[0] if shown is None else int(shown)
        image = self.images[shown]
        one = attention_patterns(self.model, self._inputs(np.array([shown])))[:, 0]
        query = "cls" if cfg.class_token else cfg.grid_size ** 2 // 2
        self._png(attention_grid_png(image, one, cfg, query, self.dir / "attention.png"))
        self.files.append(attention_html(image, one, cfg, self.dir / "attention.html",
                                         title=f"{self.spec.name}: image {shown}"))
        return self._write("toolkit_attention", rows)

    def patch_pair(self) -> tuple[int, int]:
        """(clean, corrupted) dataset image indices: the configured pair, or the first held-out image
        the model gets right and the first held-out image of another class."""
        if self.spec.toolkit.patch_pair is not None:
            pair = tuple(int(i) for i in self.spec.toolkit.patch_pair)
            n = len(self.images)
            if not all(0 <= i < n for i in pair):
                raise ValueError(f"toolkit.patch_pair={list(pair)}: the dataset has images 0..{n - 1}; "
                                 "choose two indices in that range")
            return pair
        right = np.flatnonzero(self.predicted == self.target)
        if not len(right):
            raise ValueError("the model classifies none of the held-out images right: no clean image to patch "
                             "from; set toolkit.patch_pair to two dataset image indices")
        clean = int(right[0])
        other = np.flatnonzero(self.target != self.target[clean])
        if not len(other):
            raise ValueError("every held-out image has the same class: no corrupted image of another class; set "
                             "toolkit.patch_pair to two dataset image indices")
        return int(self.eval_idx[clean]), int(self.eval_idx[other[0]])

    def patching(self) -> int:
        clean_i, corrupt_i = self.patch_pair()
        clean, corrupt = self._inputs(np.array([clean_i])), self._inputs(np.array([corrupt_i]))
        good, bad = self._targets(np.array([clean_i]), clean), self._targets(np.array([corrupt_i]), corrupt)
        if good[0] == bad[0]:
            raise ValueError(f"toolkit.patch_pair images {clean_i} and {corrupt_i} have the same class "
                             f"{self.class_names[good[0]]!r}: the logit difference between them is 0; pick images "
                             "of two classes")
        metric = logit_diff_metric(torch.as_tensor(good), torch.as_tensor(bad))
        groups, tokens = token_blocks(self.readout.cfg, self.spec.toolkit.patch_positions)
        base = {"clean_image": clean_i, "corrupted_image": corrupt_i, "clean_class": self.class_names[good[0]],
                "corrupted_class": self.class_names[bad[0]]}
        rows = []
        resid = sweep_resid(self.model, clean, corrupt, metric, where="pre", positions=groups).numpy()
        mlp = sweep_mlp(self.model, clean, corrupt, metric, positions=groups).numpy()
        for sweep, values in (("resid_pre", resid), ("mlp_out", mlp)):
            rows += [{**base, "sweep": sweep, "layer": layer, "position": groups[pos][0], "token": tokens[pos],
                      "n_tokens": len(groups[pos]), "head": None, "restored": float(values[layer, pos])}
                     for layer in range(values.shape[0]) for pos in range(values.shape[1])]
        heads = sweep_heads(self.model, clean, corrupt, metric).numpy()
        rows += [{**base, "sweep": "heads", "layer": layer, "position": None, "token": None, "n_tokens": None,
                  "head": h, "restored": float(heads[layer, h])} for layer in range(heads.shape[0]) for h in range(heads.shape[1])]
        self._png(plots.plot_patching(resid, [f"L{i}" for i in range(len(resid))], tokens, self.dir / "patching.png",
                                      f"Patching the residual stream (block input) of image {clean_i} "
                                      f"({base['clean_class']}) into {corrupt_i} ({base['corrupted_class']})"))
        return self._write("toolkit_patching", rows)

    def perturbation(self) -> int:
        # only generated shapes say where the object is: a sprite drawn on a black background
        masks = object_patch_mask(self.x, self.readout.cfg.patch_size) if self.spec.dataset.source == "shapes" else None
        rows = perturbation_table(self.model, self.x, self.target, object_masks=masks, batch_size=BATCH)
        self._png(plots.plot_perturbation(rows, self.dir / "perturbation.png"))
        return self._write("toolkit_perturbation", rows)

    def memories(self) -> int:
        n_layers = self.readout.cfg.n_layers
        agreement = [row for layer in range(n_layers)
                     for row in key_value_agreement(self.model, self.x, self.target, layer, batch_size=BATCH).summary]
        self._write("toolkit_key_value", agreement)
        return self._write("toolkit_memories", memories_table(self.model))

    def probe(self) -> int:
        train = self.train_idx[: self.spec.toolkit.probe_images]
        x_train = self._inputs(train)
        x = torch.cat([x_train, self.x])
        labels = np.concatenate([self._targets(train, x_train), self.target])
        is_train = np.arange(len(x)) < len(train)
        return self._write("toolkit_probe", probe_layers(self.model, x, labels, is_train, batch_size=BATCH))
