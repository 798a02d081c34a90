"""How a classifier reads class scores off its residual stream.

Two model kinds carry classes: a HookedViT with a linear head, and a `ZeroShotClassifier` (a CLIP
tower whose "proj" head feeds cosine scores against class text embeddings). `Readout` gives every
toolkit analysis the same three views of that path:

- `stream_logits(resid)`: what the model would output if its residual stream (B, T, d) stopped
  here, exactly the model's own head (pooling, norm, head); at the last block it *is* the output.
- `token_logits(vectors)`: each (…, d) vector read alone through the norm and the head, as if
  it were the pooled vector (the class-embedding lens of Vilas et al. reads every token this way).
- `linear_logits(components, frozen)`: additive components of the final stream mapped to
  additive logit contributions, with the norm's scale (and a CLIP embedding's length) frozen
  from a clean pass, so the components plus `frozen.constant` sum to the logits exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.vit import HookedViT


def tower_of(model) -> HookedViT:
    """The HookedViT whose hooks fire: the model itself, or a ZeroShotClassifier's tower."""
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    if not isinstance(tower, HookedViT):
        raise TypeError(f"expected a HookedViT or a ZeroShotClassifier over one, got {type(model).__name__}")
    return tower


def check_classes(values, n: int, n_classes: int, name: str = "labels") -> Tensor:
    """`values` as a (n,) long tensor of class ids in 0..n_classes-1 (a scalar is broadcast), or a
    ValueError naming the shape or the range and the fix."""
    t = torch.as_tensor(np.asarray(values))
    if t.is_floating_point():
        raise ValueError(f"{name} has dtype {t.dtype}: pass integer class ids")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}: pass one class id per image ({n},), or one for all")
    if n and not (0 <= int(t.min()) and int(t.max()) < n_classes):
        raise ValueError(f"{name} span {int(t.min())}..{int(t.max())} but the head has {n_classes} classes: "
                         f"pass class ids in 0..{n_classes - 1} (map labels to the model's classes first)")
    return t


class Frozen(NamedTuple):
    """The nonlinear factors of one clean pass, held fixed so the readout becomes linear."""

    norm_scale: Tensor | None
    """final norm: (B, T, 1) per-token divisor; fc_norm: (B, 1) of the pooled vector; None: no norm."""
    embedding_factor: Tensor | None
    """zero-shot: (B, 1) logit_scale / ‖image embedding‖; None for a linear head."""
    constant: Tensor
    """(B, C) the part of the logits no component carries: the norm's bias through the head, the head's bias."""


class Readout:
    """The classes of `model` (HookedViT with head='linear', or ZeroShotClassifier) and the path to them."""

    def __init__(self, model: HookedViT | ZeroShotClassifier):
        zero_shot = isinstance(model, ZeroShotClassifier)
        tower = tower_of(model)
        if not zero_shot and tower.cfg.head != "linear":
            raise ValueError(
                f"the model's head is {tower.cfg.head!r}, which outputs an embedding, not classes: wrap a CLIP "
                "tower in a ZeroShotClassifier (analysis.models.clip_zero_shot.zero_shot_head) to read classes")
        self.model, self.tower = model, tower
        self.cfg = tower.cfg
        self.zero_shot = model.head if zero_shot else None
        self.norm = {"final": getattr(tower, "ln_final", None), "fc_norm": getattr(tower, "fc_norm", None)}.get(
            self.cfg.norm)

    @property
    def n_classes(self) -> int:
        return len(self.zero_shot.class_names) if self.zero_shot is not None else self.cfg.n_classes

    @property
    def class_names(self) -> list[str]:
        """The zero-shot head's names; a linear head's classes are their indices."""
        return list(self.zero_shot.class_names) if self.zero_shot is not None else [str(i) for i in range(self.n_classes)]

    def _head(self, pooled: Tensor) -> Tensor:
        out = self.tower.head(pooled)
        return self.zero_shot(out) if self.zero_shot is not None else out

    def stream_logits(self, resid: Tensor) -> Tensor:
        """(B, T, d) residual stream -> (B, C): the model's own head applied to it."""
        emb = self.tower.forward_head(resid)
        return self.zero_shot(emb) if self.zero_shot is not None else emb

    def token_logits(self, vectors: Tensor) -> Tensor:
        """(…, d) residual vectors -> (…, C), each read alone through the norm and the head."""
        x = self.norm(vectors) if self.norm is not None else vectors
        return self._head(x)

    # ---- the linearised readout (direct attribution) -------------------------------------------

    def freeze(self, final_resid: Tensor) -> Frozen:
        """The clean pass's norm scale and embedding length, and the constant part of its logits."""
        cfg, x = self.cfg, final_resid
        scale = None
        if cfg.norm == "final":
            scale = _norm_scale(x, self.norm.eps)
        elif cfg.norm == "fc_norm":
            scale = _norm_scale(self.tower.pool(x), self.norm.eps)
        factor = None
        if self.zero_shot is not None:
            emb = self.tower.forward_head(x)
            factor = self.zero_shot.logit_scale / emb.norm(dim=-1, keepdim=True)
        b = x.shape[0]
        bias = self.norm.bias if self.norm is not None else x.new_zeros(cfg.d_model)
        const = self._linear_head(bias.expand(b, -1), factor)
        if self.zero_shot is None and self.tower.head.bias is not None:
            const = const + self.tower.head.bias
        return Frozen(scale, factor, const)

    def linear_logits(self, components: Tensor, frozen: Frozen) -> Tensor:
        """(n, B, T, d) additive components of the final stream -> (n, B, C) contributions.

        Each component is centred and divided by the frozen scale of the norm that reads it
        (per token for a final norm, after pooling for fc_norm), weighted by the norm, pooled
        and sent through the head's weight (and, zero-shot, the frozen 1/‖embedding‖ and the
        class embeddings). Σ contributions + frozen.constant = the clean logits."""
        cfg = self.cfg
        x = components
        if cfg.norm == "final":
            x = _centre(x) / frozen.norm_scale * self.norm.weight
        x = self.tower.pool(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        if cfg.norm == "fc_norm":
            x = _centre(x) / frozen.norm_scale * self.norm.weight
        return self._linear_head(x, frozen.embedding_factor)

    def _linear_head(self, pooled: Tensor, factor: Tensor | None) -> Tensor:
        out = F.linear(pooled, self.tower.head.weight)
        if self.zero_shot is not None:
            out = factor * (out @ self.zero_shot.class_embeddings.T)
        return out

    def residual_directions(self, classes: Tensor) -> Tensor:
        """(n,) class ids -> (n, d): the residual-stream direction of each class's score through the
        norm's weight and the head (the norm's centring and scale not applied), for memories and
        probes; a zero-shot class's direction goes through the projection."""
        w = self.tower.head.weight  # (C, d) linear, (D, d) proj
        if self.zero_shot is not None:
            w = self.zero_shot.class_embeddings @ w  # (C, d)
        rows = w[classes]
        if self.norm is not None:
            rows = rows * self.norm.weight
        return rows


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def _norm_scale(x: Tensor, eps: float) -> Tensor:
    return (_centre(x).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def identifiability(scores: Tensor, labels: Tensor) -> Tensor:
    """Class identifiability r = 1 − rank / (C − 1) of the true class among (…, C) scores
    (Vilas et al. 2023): 1 when the true class scores highest, 0 when lowest, 0.5 in expectation
    for scores unrelated to the label whatever C is (rank = number of classes scoring strictly
    higher). Vilas et al. divide by C; with their 1000 classes the two differ by < 0.001.
    `labels` broadcasts against scores' leading dims."""
    n = scores.shape[-1]
    if n < 2:
        raise ValueError(f"identifiability needs at least 2 classes, got scores of shape {tuple(scores.shape)}")
    labels = torch.as_tensor(labels, device=scores.device).long()
    labels = labels.expand(scores.shape[:-1])
    true = scores.gather(-1, labels.unsqueeze(-1))
    rank = (scores > true).sum(-1)
    return 1 - rank.float() / (n - 1)
