"""Attention and context perturbations of Vilas et al. (NeurIPS 2023, "Analyzing Vision Transformers
for Image Classification in Class Embedding Space"), as masks on the attention scores.

A perturbation says, for every query token q and key token k, whether q may attend to k. The
forbidden scores are set to -inf at `blocks.{i}.attn.hook_attn_scores`, before the softmax, at
every layer (or the `layers` given), so a forbidden key gets exactly zero attention and the allowed
keys share all of it. Conditions ("image tokens" = patch tokens; prefix = class token + registers):

- "none": no mask.
- "no_cls": image tokens may attend to every token except the class token. The class token and
  registers attend to everything, as usual. Needs a class token.
- "self_only": each image token attends only to itself. The class token and registers attend to
  everything, as usual.
- "object_only": given a per-image object mask over patches, every token (prefix and patch alike)
  may attend only to the prefix tokens and the object patches.
- "background_only": the same with the background (non-object) patches.

Masking only changes who attends to whom: every token is still computed, and the head still pools
what it always pools (mean pooling still averages every patch token).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from analysis.evaluation.toolkit.readout import Readout, check_classes, identifiability, tower_of
from analysis.models.config import ViTConfig

ATTENTION = ("no_cls", "self_only")
CONTEXT = ("object_only", "background_only")
CONDITIONS = ("none", *ATTENTION, *CONTEXT)



def _check_object_mask(cfg: ViTConfig, object_mask, batch: int | None) -> Tensor:
    n = cfg.grid_size**2
    mask = torch.as_tensor(object_mask)
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != n or (batch is not None and mask.shape[0] != batch):
        b = "B" if batch is None else batch
        raise ValueError(f"object mask {mask.dtype} {tuple(mask.shape)}: expected bool ({b}, {n}), one row per image "
                         f"and one entry per patch ({cfg.grid_size}x{cfg.grid_size}, row-major), True on the object")
    return mask


def attention_mask(cfg: ViTConfig, condition: str, object_mask=None) -> Tensor | None:
    """Bool (1 or B, 1, T, T) allowed[b, 0, query, key] for `condition` (None for "none")."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition={condition!r}: expected one of {CONDITIONS}")
    if condition == "none":
        return None
    t, p = cfg.n_tokens, cfg.n_prefix
    if condition in ATTENTION:
        allowed = torch.ones(t, t, dtype=torch.bool)
        if condition == "no_cls":
            if not cfg.class_token:
                raise ValueError("condition 'no_cls' needs a class token, and this model has none "
                                 "(class_token=False); use 'self_only' or the context conditions")
            allowed[p:, 0] = False
        else:
            allowed[p:] = torch.eye(t, dtype=torch.bool)[p:]
        return allowed[None, None]
    if object_mask is None:
        raise ValueError(f"condition {condition!r} needs object_mask, a bool (B, {cfg.grid_size**2}) patch mask")
    obj = _check_object_mask(cfg, object_mask, None)
    keep = obj if condition == "object_only" else ~obj
    empty = (~keep.any(1)).nonzero()[:, 0].tolist()
    if empty:
        part = "object" if condition == "object_only" else "background"
        raise ValueError(f"condition {condition!r}: image(s) {empty[:10]} have no {part} patches left to attend to; "
                         f"drop those images or give each at least one {part} patch in the mask")
    key_ok = torch.cat([torch.ones(len(keep), p, dtype=torch.bool), keep.cpu()], dim=1)  # (B, T)
    return key_ok[:, None, None, :].expand(-1, 1, t, t)


def perturbation_hooks(model, condition: str, *, object_mask=None, layers: Sequence[int] | None = None):
    """fwd_hooks for `condition` at `layers` (None: every layer); [] for "none"."""
    cfg = tower_of(model).cfg
    allowed = attention_mask(cfg, condition, object_mask)
    layers = range(cfg.n_layers) if layers is None else list(layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.n_layers:
            raise ValueError(f"layer {i!r} out of range: this model has {cfg.n_layers} layers, valid "
                             f"0..{cfg.n_layers - 1}; pass layer indices in that range, or None for all")
    if allowed is None:
        return []

    def mask_scores(scores: Tensor, *, hook) -> Tensor:
        a = allowed.to(scores.device)
        if a.shape[0] not in (1, scores.shape[0]):
            raise ValueError(f"object mask has {a.shape[0]} rows but the batch has {scores.shape[0]} images; "
                             "pass one mask row per image")
        return scores.masked_fill(~a, float("-inf"))

    return [(f"blocks.{i}.attn.hook_attn_scores", mask_scores) for i in layers]


def run_perturbed(model, x: Tensor, condition: str, *, object_mask=None, layers=None, names_filter=None):
    """(logits, ActivationCache) of `x` under `condition`; the cache holds `names_filter` (None: every
    hook) as computed under the perturbation (hook_attn_scores shows the -inf of the mask)."""
    if object_mask is not None:
        _check_object_mask(tower_of(model).cfg, object_mask, x.shape[0])
    hooks = perturbation_hooks(model, condition, object_mask=object_mask, layers=layers)
    # Outer hooks run first at a hook point, so the cache records the masked scores.
    with tower_of(model).hooks(hooks):
        return model.run_with_cache(x, names_filter=names_filter)


@torch.no_grad()
def perturbation_table(model, images_x: Tensor, labels, *, object_masks=None, layers=None,
                       batch_size: int = 256) -> list[dict]:
    """One row per condition: "none", "no_cls" (only with a class token), "self_only", and with
    `object_masks` (bool (N, n_patches)) "object_only" and "background_only". Each row holds:

    accuracy; identifiability (readout.identifiability of the true class in the logits, image mean);
    cls_identifiability and patch_identifiability (the last layer's class token, and each patch token,
    read alone through `Readout.token_logits`; patch values averaged over patches, then images;
    cls is None without a class token); n_images."""
    tower = tower_of(model)
    cfg, readout = tower.cfg, Readout(model)
    n = len(images_x)
    if n == 0:
        raise ValueError("no images given: pass at least one")
    labels = check_classes(labels, n, readout.n_classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    conditions = ["none", *(["no_cls"] if cfg.class_token else []), "self_only"]
    if object_masks is not None:
        object_masks = _check_object_mask(cfg, object_masks, n)
        conditions += list(CONTEXT)
        for c in CONTEXT:  # fail before any forward pass, naming every empty image
            attention_mask(cfg, c, object_masks)
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    rows = []
    for condition in conditions:
        sums = torch.zeros(4, dtype=torch.float64)  # correct, output, cls, patch
        for lo in range(0, n, batch_size):
            x, y = images_x[lo:lo + batch_size], labels[lo:lo + batch_size].to(images_x.device)
            mask = None if object_masks is None else object_masks[lo:lo + batch_size]
            logits, cache = run_perturbed(model, x, condition, object_mask=mask if condition in CONTEXT else None,
                                          layers=layers, names_filter=final)
            resid = cache[final]
            cls = identifiability(readout.token_logits(resid[:, 0]), y).sum() if cfg.class_token else 0.0
            patches = identifiability(readout.token_logits(resid[:, cfg.n_prefix:]), y[:, None]).mean(1)
            sums += torch.tensor([float((logits.argmax(-1) == y).sum()), float(identifiability(logits, y).sum()),
                                  float(cls), float(patches.sum())], dtype=torch.float64)
        acc, ident, cls_id, patch_id = (sums / n).tolist()
        rows.append({"condition": condition, "accuracy": acc, "identifiability": ident,
                     "cls_identifiability": cls_id if cfg.class_token else None,
                     "patch_identifiability": patch_id, "n_images": n})
    return rows


def object_patch_mask(x: Tensor, patch_size: int, *, background: float = 0.0) -> Tensor:
    """Bool (B, n_patches): a patch is "object" if any of its pixels differs from `background`. For
    synthetic images drawn on a uniform background (e.g. the shapes data: white sprite on 0)."""
    if x.ndim != 4 or x.shape[-1] % patch_size or x.shape[-2] % patch_size:
        raise ValueError(f"x {tuple(x.shape)}: expected (B, C, H, W) with H and W divisible by patch_size={patch_size}")
    b, c, h, w = x.shape
    tiles = (x != background).reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return tiles.any(dim=(1, 3, 5)).reshape(b, -1)  # row-major over the patch grid, like the tokens
