"""Residual-stream directions read through the model's classifier: the class-embedding view.

Vilas et al. (2023, "Analyzing Vision Transformers for Image Classification in Class Embedding
Space") read intermediate tokens through the final norm and the head. A direction (a dictionary's
decoder row) has no position and no scale, so it goes through the linear part of that path: the
norm's centring and per-channel weight (its division by the token's scale is a positive factor per
token and does not reorder classes), then the head's weight without its bias; for a CLIP tower, the
projection and the cosine with each class's text embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.vit import HookedViT


def has_classifier(model) -> bool:
    """Whether `direction_logits` can read directions out as classes."""
    # a "proj" head (CLIP's) maps to an embedding, not classes: only a zero-shot head over it does
    return isinstance(model, ZeroShotClassifier) or (isinstance(model, HookedViT) and model.cfg.head == "linear")


@torch.no_grad()
def direction_logits(model: HookedViT | ZeroShotClassifier, directions: Tensor) -> Tensor:
    """(n, d_model) residual-stream directions -> (n, n_classes) class scores, comparable within a
    direction's row (which classes it promotes), not across rows."""
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    if not has_classifier(model):
        raise ValueError(f"the model has no classifier head (head={tower.cfg.head!r}, not 'linear') and no zero-shot head: "
                         "there are no classes to read directions out as")
    if directions.shape[-1] != tower.cfg.d_model:
        raise ValueError(f"directions of width {directions.shape[-1]}: the residual stream has d_model="
                         f"{tower.cfg.d_model} (only residual-stream hooks can be read through the head)")
    x = directions.to(next(tower.parameters()).dtype)
    norm = {"final": "ln_final", "fc_norm": "fc_norm"}.get(tower.cfg.norm)
    if norm is not None:
        x = (x - x.mean(-1, keepdim=True)) * getattr(tower, norm).weight
    if tower.cfg.head != "none":
        x = x @ tower.head.weight.T
    if isinstance(model, ZeroShotClassifier):
        x = x @ model.head.class_embeddings.T  # rows already unit norm
    return x
