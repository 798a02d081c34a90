"""The matrices that write into the residual stream, read as key–value memories in class space.

Geva et al. (2021) read an MLP as key–value memories: memory j has a key (row j of fc1), matched
against the token, whose match after the nonlinearity (`mlp.hook_post[..., j]`) is the memory's
coefficient, and a value (column j of fc2, times the block's layer scale), which the token adds to
the residual stream scaled by that coefficient. The attention output projection is read the same
way: its column h*d_head + e is what value channel e of head h (`attn.hook_z[..., h, e]`) writes.

Vilas et al. (NeurIPS 2023, "Analyzing Vision Transformers for Image Classification in Class
Embedding Space") project these values on the class embeddings. Here a value goes through
`direction_logits`: a direction, so the final norm's centring and weight and the head's weight (for
a CLIP tower the projection and the class text embeddings), no bias and no per-token scale. The
output-layer biases (fc2's, proj's) are not memories: no key gates them.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from analysis.evaluation.toolkit.readout import Readout, check_classes, identifiability, tower_of
from analysis.models.class_projection import direction_logits
from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.inputs import to_model_input
from analysis.models.vit import HookedViT

TOKEN_KINDS = ("cls", "patches")



def _block(model, layer):
    n = tower_of(model).cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < n:
        raise ValueError(f"layer={layer!r}: expected a block index in 0..{n - 1} (this model has {n} blocks); "
                         f"pass e.g. layer={n - 1} for the last block (negative indices are not accepted)")
    return tower_of(model).blocks[int(layer)]


def _columns(weight: Tensor, layer_scale) -> Tensor:
    """(d, k) weight writing into the stream -> (k, d) value vectors, as the stream receives them."""
    # layer scale multiplies the block's output channel-wise, so it scales every value's rows
    return (weight if layer_scale is None else weight * layer_scale.gamma[:, None]).T


@torch.no_grad()
def mlp_value_logits(model: HookedViT | ZeroShotClassifier, layer: int) -> Tensor:
    """(d_mlp, C): the class scores of each MLP value (fc2.weight[:, j], times ls2.gamma) of block
    `layer`, read as a residual direction (`direction_logits`). Comparable within a row."""
    block = _block(model, layer)
    return direction_logits(model, _columns(block.mlp.fc2.weight, block.ls2))


@torch.no_grad()
def attention_value_logits(model: HookedViT | ZeroShotClassifier, layer: int) -> Tensor:
    """(n_heads, d_head, C): the class scores of each column of block `layer`'s attention output
    projection (times ls1.gamma), grouped by head as `hook_z` is: [h, e] is column h*d_head + e."""
    block, cfg = _block(model, layer), tower_of(model).cfg
    logits = direction_logits(model, _columns(block.attn.proj.weight, block.ls1))
    return logits.view(cfg.n_heads, cfg.d_head, -1)


class KeyValueAgreement(NamedTuple):
    rows: list[dict]
    """One per (image, token kind): image, token, top_class, prediction, label, agrees_prediction,
    agrees_label, identifiability."""
    summary: list[dict]
    """One per token kind: layer, token, top, n_images, agreement_prediction, agreement_label,
    identifiability (the means of the rows)."""


def _as_input(images_x) -> Tensor:
    if isinstance(images_x, np.ndarray):
        return to_model_input(images_x)  # uint8 (N, H, W, C), checked there
    if not isinstance(images_x, Tensor) or images_x.ndim != 4:
        raise ValueError(f"images_x: expected a float tensor (N, C, H, W) or uint8 images (N, H, W, C), got "
                         f"{type(images_x).__name__} {tuple(getattr(images_x, 'shape', ()))}")
    return images_x



@torch.no_grad()
def key_value_agreement(model: HookedViT | ZeroShotClassifier, images_x, labels, layer: int, *, top: int = 5,
                        batch_size: int = 256) -> KeyValueAgreement:
    """Do the MLP memories an image activates most promote the class the model predicts?

    For each image and token kind, at block `layer`:
    - "cls": the key coefficients a_j = `mlp.hook_post[b, 0, j]` of the class token;
      "patches": their mean over the patch tokens (prefix tokens excluded). Summed over all memories,
      Σ_j a_j v_j is then exactly the class token's MLP output (resp. the mean patch token's), bias
      aside, so the patches' memories are read as one pooled write, not per patch.
    - the `top` memories with the largest a_j (signed: GELU's small negative outputs rank last);
    - s = Σ_{j in top} a_j · value_logits[j] (`mlp_value_logits`), a (C,) class score vector.
    Each row: top_class = argmax s; agrees_prediction = (top_class == the model's own predicted
    class on the image); agrees_label = (top_class == labels[b]); identifiability of labels[b]
    under s (`readout.identifiability`: 1 = the true class scores highest, 0.5 = chance).

    What Vilas et al. measured (their key–value agreement rate, as their public code computes it):
    per token (the class token alone, or every token), whether any of its 5 most activated memories,
    unweighted, is among the 5 memories whose values promote the image's true class most, with the
    values projected through the head's weight alone; the rate is the share of tokens agreeing. A
    second analysis asks whether the token's top-1 class at that layer is among the top classes of
    those 5 memories. They score MLP and attention memories (attention's coefficients being the
    attention-weighted values, `hook_z`). Here instead the values are weighted by their
    coefficients and summed, read through the final norm's centring and weight as well; the
    comparison is with the model's final prediction and the label; patch tokens are pooled into
    one reading per image; and only MLP memories are scored per image.
    """
    tower = tower_of(model)
    _block(model, layer)
    readout = Readout(model)
    x = _as_input(images_x)
    labels = check_classes(labels, len(x), readout.n_classes)
    cfg = tower.cfg
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or not 1 <= top <= cfg.d_mlp:
        raise ValueError(f"top={top!r}: expected the number of memories to sum, 1..{cfg.d_mlp} (d_mlp)")
    if len(x) == 0:
        raise ValueError("key_value_agreement got no images: pass at least one")
    kinds = [k for k in TOKEN_KINDS if k != "cls" or cfg.class_token]
    values = mlp_value_logits(model, layer)  # (d_mlp, C)
    hook = f"blocks.{layer}.mlp.hook_post"
    device = next(tower.parameters()).device
    preds, scores = [], {k: [] for k in kinds}
    for lo in range(0, len(x), batch_size):
        logits, cache = model.run_with_cache(x[lo:lo + batch_size].to(device), names_filter=hook)
        preds.append(logits.argmax(-1).cpu())
        coef = cache[hook]  # (B, T, d_mlp)
        for kind in kinds:
            a = coef[:, 0] if kind == "cls" else coef[:, cfg.n_prefix:].mean(1)
            idx = a.topk(top, dim=-1).indices
            kept = torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx))
            scores[kind].append((kept @ values.to(a.dtype)).cpu())
    pred = torch.cat(preds)
    rows, summary = [], []
    for kind in kinds:
        s = torch.cat(scores[kind])
        top_class = s.argmax(-1)
        ident = identifiability(s, labels)
        agree_p, agree_l = top_class == pred, top_class == labels
        rows += [{"image": i, "token": kind, "top_class": int(top_class[i]), "prediction": int(pred[i]),
                  "label": int(labels[i]), "agrees_prediction": bool(agree_p[i]), "agrees_label": bool(agree_l[i]),
                  "identifiability": float(ident[i])} for i in range(len(s))]
        summary.append({"layer": int(layer), "token": kind, "top": int(top), "n_images": len(s),
                        "agreement_prediction": float(agree_p.float().mean()),
                        "agreement_label": float(agree_l.float().mean()),
                        "identifiability": float(ident.mean())})
    return KeyValueAgreement(rows, summary)


@torch.no_grad()
def memories_table(model: HookedViT | ZeroShotClassifier) -> list[dict]:
    """Every memory's class reading, for the catalog: one row per (layer, kind, memory).

    kind "mlp": memory = j (fc2 column), head and column None; kind "attn": memory = h*d_head + e
    (proj column), head = h, column = e. top_class / class_name: the class its value promotes most;
    score: that class's `direction_logits` score; margin: score minus the second class's (NaN with
    one class). Scores are comparable within a row only (values differ in norm)."""
    names = Readout(model).class_names
    tower = tower_of(model)
    d_head = tower.cfg.d_head
    rows = []
    for layer in range(tower.cfg.n_layers):
        per_kind = (("mlp", mlp_value_logits(model, layer)),
                    ("attn", attention_value_logits(model, layer).flatten(0, 1)))
        for kind, logits in per_kind:
            best = logits.float().topk(min(2, logits.shape[-1]), dim=-1)
            for j in range(logits.shape[0]):
                score = float(best.values[j, 0])
                margin = score - float(best.values[j, 1]) if best.values.shape[-1] > 1 else float("nan")
                top_class = int(best.indices[j, 0])
                rows.append({"layer": layer, "kind": kind, "memory": j,
                             "head": j // d_head if kind == "attn" else None,
                             "column": j % d_head if kind == "attn" else None,
                             "top_class": top_class, "class_name": names[top_class],
                             "score": score, "margin": margin})
    return rows
