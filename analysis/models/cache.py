"""The activation cache of `run_with_cache` and its residual-stream views from a HookedViT (TransformerLens semantics).

Every helper returns a stack (components, B, T, d) of terms read from the cache, with labels
on request. The identities the tests check:

    decompose_resid(layer).sum(0)      == residual stream entering block `layer`
    stack_head_results(layer).sum over a layer's heads + ls * b_O == that layer's hook_attn_out
    apply_ln_to_stack(stack, layer) summed over components, times the LayerNorm weight, plus
        its bias == that LayerNorm's output (the norm is linear once its scale is frozen)

`layer` counts blocks: components written before block `layer`; None or n_layers means the
whole model (the final residual stream).
"""

from __future__ import annotations

import difflib
from typing import Iterator

import torch
from torch import nn

Stack = torch.Tensor


def _model(cache: "ActivationCache"):
    if cache.model is None or not hasattr(cache.model, "cfg"):
        raise ValueError("this ActivationCache has no model: build it with HookedViT.run_with_cache")
    return cache.model


def _layer(cache: "ActivationCache", layer: int | None) -> int:
    n = _model(cache).cfg.n_layers
    if layer is None:
        return n
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer={layer!r} out of range: valid values are 0..{n} (or None for {n}, the end)")
    return layer


def _get(cache: "ActivationCache", name: str) -> torch.Tensor:
    if name not in cache:
        raise KeyError(
            f"{name!r} is not in the cache; run run_with_cache with names_filter=None or one that keeps {name!r}"
        )
    return cache[name]


def _out(stack: list[torch.Tensor], labels: list[str], return_labels: bool):
    out = torch.stack(stack)
    return (out, labels) if return_labels else out


def accumulated_resid(
    cache: "ActivationCache", layer: int | None = None, *, incl_mid: bool = False, apply_ln: bool = False,
    return_labels: bool = False,
):
    """Residual streams up to `layer`: "{i}_pre" for i <= layer (and "{i}_mid" for i < layer with
    incl_mid); at the end of the model the last entry is "final_post" (what the final norm reads)."""
    n_layers, layer = _model(cache).cfg.n_layers, _layer(cache, layer)
    stack, labels = [], []
    for i in range(min(layer + 1, n_layers)):
        stack.append(_get(cache, f"blocks.{i}.hook_resid_pre"))
        labels.append(f"{i}_pre")
        if incl_mid and i < layer:
            stack.append(_get(cache, f"blocks.{i}.hook_resid_mid"))
            labels.append(f"{i}_mid")
    if layer == n_layers:
        stack.append(_get(cache, f"blocks.{n_layers - 1}.hook_resid_post"))
        labels.append("final_post")
    out = torch.stack(stack)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer)
    return (out, labels) if return_labels else out


def decompose_resid(
    cache: "ActivationCache", layer: int | None = None, *, mode: str = "all", incl_embeds: bool = True,
    apply_ln: bool = False, return_labels: bool = False,
):
    """The additive terms of the residual stream entering `layer`: embeddings, then attn/mlp outputs.

    With ln_pre the embeddings are not additive through the norm, so they appear as one
    "embed" term (the normalized embedding = blocks.0.hook_resid_pre).
    """
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode={mode!r}: expected 'all', 'attn' or 'mlp'")
    cfg, layer = _model(cache).cfg, _layer(cache, layer)
    stack, labels = [], []
    if incl_embeds:
        if cfg.ln_pre:
            stack.append(_get(cache, "blocks.0.hook_resid_pre"))
            labels.append("embed")
        else:
            stack += [_get(cache, "hook_embed"), _get(cache, "hook_pos_embed")]
            labels += ["embed", "pos_embed"]
    for i in range(layer):
        for kind in ("attn", "mlp"):
            if mode in ("all", kind):
                stack.append(_get(cache, f"blocks.{i}.hook_{kind}_out"))
                labels.append(f"{i}_{kind}_out")
    if not stack:
        raise ValueError("nothing to decompose: use layer > 0 or incl_embeds=True")
    out = torch.stack(stack)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer)
    return (out, labels) if return_labels else out


def stack_head_results(
    cache: "ActivationCache", layer: int | None = None, *, incl_remainder: bool = False, apply_ln: bool = False,
    return_labels: bool = False,
):
    """Each head's write into the residual stream (layer scale applied), for blocks < layer: (L*H, B, T, d).

    Uses cached `attn.hook_result` when present, else computes it from `attn.hook_z` and the
    output projection. incl_remainder adds "remainder" = residual stream - sum of heads.
    """
    model, layer = _model(cache), _layer(cache, layer)
    stack, labels = [], []
    for i in range(layer):
        stack += list(head_results(cache, i))
        labels += [f"L{i}H{h}" for h in range(model.cfg.n_heads)]
    if incl_remainder:
        resid = accumulated_resid(cache, layer)[-1]
        heads = torch.stack(stack).sum(0) if stack else torch.zeros_like(resid)
        stack.append(resid - heads)
        labels.append("remainder")
    if not stack:
        raise ValueError("no heads before layer 0: use layer >= 1 or incl_remainder=True")
    out = torch.stack(stack).detach()
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer)
    return (out, labels) if return_labels else out


def head_results(cache: "ActivationCache", layer: int) -> Stack:
    """Each head of block `layer`'s write into the residual stream, layer scale applied: (H, B, T, d).

    Uses cached `attn.hook_result` when present, else computes it from `attn.hook_z` and the
    output projection (without its bias, which no head owns)."""
    model = _model(cache)
    cfg = model.cfg
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer={layer!r} out of range: blocks are 0..{cfg.n_layers - 1}")
    blk = model.blocks[layer]
    name = f"blocks.{layer}.attn.hook_result"
    if name in cache:
        result = cache[name]
    else:
        z = _get(cache, f"blocks.{layer}.attn.hook_z")
        w = blk.attn.proj.weight.detach().view(cfg.d_model, cfg.n_heads, cfg.d_head).to(z)
        result = torch.einsum("bthe,dhe->bthd", z, w)
    if blk.ls1 is not None:
        result = result * blk.ls1.gamma.to(result)
    return result.permute(2, 0, 1, 3).detach()


def apply_ln_to_stack(
    cache: "ActivationCache", stack: Stack, layer: int | None = None, *, mlp_input: bool = False,
) -> Stack:
    """Push every component through the LayerNorm that reads the stream at `layer`, its scale frozen.

    layer < n_layers: block `layer`'s ln1 (ln2 with mlp_input); layer = n_layers: the final
    norm (for fc_norm models, pass pooled (…, B, d) components). Returns (x - mean) / scale
    per component: no affine weight or bias, so the components still add up.
    """
    model, layer = _model(cache), _layer(cache, layer)
    cfg = model.cfg
    if layer < cfg.n_layers:
        ln = f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}"
    elif cfg.norm == "none":
        raise ValueError("this model has no final LayerNorm (norm='none'): there is nothing to apply")
    else:
        ln = "ln_final" if cfg.norm == "final" else "fc_norm"
    scale = _get(cache, f"{ln}.hook_scale")
    if tuple(stack.shape[1:-1]) != tuple(scale.shape[:-1]):
        raise ValueError(
            f"stack {tuple(stack.shape)} does not fit {ln}'s cached scale {tuple(scale.shape)}: expected "
            f"(components, {', '.join(map(str, scale.shape[:-1]))}, d)"
            + ("; fc_norm reads the pooled vector: pool the components first" if ln == "fc_norm" else "")
        )
    centered = stack - stack.mean(-1, keepdim=True)
    return centered / scale.to(stack)


class ActivationCache:
    """Read-only mapping hook name -> detached activation, in forward order.

    `model` (set by `run_with_cache`) lets the residual-stream helpers below read the
    model's config and weights (layer scale, LayerNorm parameters).
    """

    def __init__(self, acts: dict[str, torch.Tensor], model: nn.Module | None = None) -> None:
        self._acts = acts
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._acts:
            close = difflib.get_close_matches(name, list(self._acts), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"{name!r} is not in the cache (cached: {list(self._acts)}){hint}")
        return self._acts[name]

    def __contains__(self, name: object) -> bool:
        return name in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def keys(self):
        return self._acts.keys()

    def values(self):
        return self._acts.values()

    def items(self):
        return self._acts.items()

    def __repr__(self) -> str:
        return f"ActivationCache({list(self._acts)})"

    # Residual-stream helpers (TransformerLens semantics), defined above.
    def accumulated_resid(self, layer: int | None = None, **kwargs):
        """Residual stream before each block < layer; see the module function accumulated_resid."""
        return accumulated_resid(self, layer, **kwargs)

    def decompose_resid(self, layer: int | None = None, **kwargs):
        """Additive terms of the stream entering `layer`; see the module function decompose_resid."""
        return decompose_resid(self, layer, **kwargs)

    def stack_head_results(self, layer: int | None = None, **kwargs):
        """Per-head writes into the stream; see the module function stack_head_results."""
        return stack_head_results(self, layer, **kwargs)

    def apply_ln_to_stack(self, stack: torch.Tensor, layer: int | None = None, **kwargs) -> torch.Tensor:
        """Components through the (frozen-scale) LayerNorm at `layer`; see the module function apply_ln_to_stack."""
        return apply_ln_to_stack(self, stack, layer, **kwargs)
