"""The class-embedding lens (Vilas et al., NeurIPS 2023): every token of every layer read as classes.

Layer l is the residual stream after l blocks (l = 0: the embeddings entering block 0, l =
n_layers: the final stream). Each token is read alone through the final norm and the head
(`Readout.token_logits`); the stream as a whole through the model's own pooling and head
(`Readout.stream_logits`), which at the last layer is the model's output. Only per-token
summaries are kept (the identifiability of the true class and the top class), so the memory
is (layers, images, tokens) whatever the number of classes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from analysis.evaluation.toolkit.readout import Readout, check_classes, identifiability


class Lens(NamedTuple):
    """Per layer (n_layers + 1), image and token: the true class's identifiability and the top class."""

    stream_r: Tensor
    """(L+1, N) identifiability under the model's own head applied to the stream at that layer."""
    stream_top: Tensor
    """(L+1, N) top class of the same."""
    cls_r: Tensor | None
    """(L+1, N) the class token read alone; None without a class token."""
    cls_top: Tensor | None
    patch_r: Tensor
    """(L+1, N, P) each patch token read alone."""
    patch_top: Tensor
    grid: int
    """Patches per side (patch p sits at row p // grid, column p % grid)."""


def stream_hooks(n_layers: int) -> list[str]:
    """The hook holding the stream after l blocks, for l = 0..n_layers."""
    return ["blocks.0.hook_resid_pre", *(f"blocks.{i}.hook_resid_post" for i in range(n_layers))]


@torch.no_grad()
def class_embedding_lens(model, images: Tensor, labels, *, batch_size: int = 64) -> Lens:
    """Run `model` (HookedViT with a linear head, or ZeroShotClassifier) on model inputs `images`
    (N, C, H, W) and read every layer's tokens as classes against `labels` (N,)."""
    readout = Readout(model)
    cfg = readout.cfg
    labels = check_classes(labels, len(images), readout.n_classes)
    hooks = stream_hooks(cfg.n_layers)
    parts: dict[str, list[Tensor]] = {k: [] for k in Lens._fields if k != "grid"}
    for lo in range(0, len(images), batch_size):
        x, y = images[lo:lo + batch_size], labels[lo:lo + batch_size]
        _, cache = readout.tower.run_with_cache(x, names_filter=hooks)
        streams = torch.stack([cache[h] for h in hooks])  # (L+1, B, T, d)
        stream = torch.stack([readout.stream_logits(s) for s in streams])
        parts["stream_r"].append(identifiability(stream, y))
        parts["stream_top"].append(stream.argmax(-1))
        patches = readout.token_logits(streams[:, :, cfg.n_prefix:])  # (L+1, B, P, C)
        parts["patch_r"].append(identifiability(patches, y[:, None]))
        parts["patch_top"].append(patches.argmax(-1))
        if cfg.class_token:
            cls = readout.token_logits(streams[:, :, 0])
            parts["cls_r"].append(identifiability(cls, y))
            parts["cls_top"].append(cls.argmax(-1))
    out = {k: torch.cat(v, dim=1).cpu() if v else None for k, v in parts.items()}
    return Lens(**out, grid=cfg.grid_size)


def identifiability_table(lens: Lens, labels) -> list[dict]:
    """One row per layer and reading ("stream", "cls", "patches"): mean identifiability and top-1
    (the share of readings whose top class is the true one; for patches over every patch token);
    `n_tokens` counts what was averaged."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    rows = []
    for layer in range(lens.stream_r.shape[0]):
        readings = [("stream", lens.stream_r[layer], lens.stream_top[layer], labels)]
        if lens.cls_r is not None:
            readings.append(("cls", lens.cls_r[layer], lens.cls_top[layer], labels))
        readings.append(("patches", lens.patch_r[layer], lens.patch_top[layer], labels[:, None]))
        for token, r, top, y in readings:
            rows.append({"layer": layer, "token": token, "identifiability": float(r.float().mean()),
                         "top1": float((top == y).float().mean()), "n_tokens": int(r.numel())})
    return rows


def patch_class_maps(lens: Lens, layer: int) -> tuple[Tensor, Tensor]:
    """(N, grid, grid) top class and (N, grid, grid) true-class identifiability of each patch at `layer`."""
    n_points = lens.patch_top.shape[0]
    if not 0 <= layer < n_points:
        raise ValueError(f"layer={layer} out of range: the lens holds layers 0..{n_points - 1} "
                         "(0 = embeddings, l = the stream after l blocks)")
    g = lens.grid
    return (lens.patch_top[layer].reshape(-1, g, g), lens.patch_r[layer].reshape(-1, g, g))
