"""Read instantiated timm and open_clip ViTs as a HookedViT config and state dict.

Each converter reads the architecture off the module tree (not off a model name), refuses
anything HookedViT cannot reproduce with an error that names the feature, and returns the
renamed tensors; `HookedViT.from_timm` / `from_open_clip` load them with `strict=True`, so a
missed or extra tensor fails loudly instead of leaving a silently random weight. This module
knows no HookedViT (no import circle); timm and open_clip are imported here only, lazily.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from analysis.models.config import ViTConfig


def _unsupported(source: str, what: str) -> ValueError:
    return ValueError(
        f"cannot convert this {source} model: {what}. HookedViT reproduces plain pre-norm ViTs "
        "(class/register tokens, learned absolute position embedding, CLS or mean pooling); "
        "pick a model without that feature"
    )


def _is_identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _act_name(act: nn.Module, source: str) -> str:
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or (name == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_tanh"
    if name == "GELU":
        return "gelu"
    raise _unsupported(source, f"MLP activation {name} (supported: GELU, tanh-GELU, QuickGELU)")


def _norm_eps(norms: list[nn.Module], source: str) -> float:
    eps = set()
    for m in norms:
        if not isinstance(m, nn.LayerNorm) or not m.elementwise_affine or m.bias is None:
            raise _unsupported(source, f"normalization layer {type(m).__name__} (only affine LayerNorm)")
        eps.add(float(m.eps))
    if len(eps) != 1:
        raise _unsupported(source, f"LayerNorms with different eps {sorted(eps)}")
    return eps.pop()


def _linear(prefix: str, lin: nn.Linear, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"] = lin.weight
    # HookedViT's attention/MLP projections always carry a bias; a bias-free source gets zeros.
    out[f"{prefix}.bias"] = lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0])


def _ln(prefix: str, ln: nn.LayerNorm, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = ln.weight, ln.bias


# ---- timm ---------------------------------------------------------------------------
def _timm_checks(model: Any) -> None:
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    src = "timm"
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    if model.pos_embed is None:
        raise _unsupported(src, "no learned position embedding (pos_embed='none')")
    if getattr(model, "dynamic_img_size", False):
        raise _unsupported(src, "dynamic_img_size=True (use HookedViT.resize for other sizes)")
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise _unsupported(src, f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
    if model.global_pool == "avg" and model.pool_include_prefix:
        raise _unsupported(src, "pool_include_prefix=True")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not _is_identity(pe.norm) or not pe.flatten:
        raise _unsupported(src, f"patch embedding {type(pe).__name__} with a norm or custom layout")
    if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise _unsupported(src, f"non-square image {pe.img_size} or patch {pe.patch_size}")
    for i, blk in enumerate(model.blocks):
        a = getattr(blk, "attn", None)
        if type(blk) is not Block or type(a).__name__ != "Attention":
            raise _unsupported(src, f"block {i} is {type(blk).__name__}/{type(a).__name__}, not a plain pre-norm Block")
        if not (_is_identity(a.q_norm) and _is_identity(a.k_norm) and _is_identity(a.norm)):
            raise _unsupported(src, f"block {i} uses qk_norm or scale_norm")
        if getattr(a, "gate", None) is not None or a.attn_dim != model.embed_dim:
            raise _unsupported(src, f"block {i} uses gated attention or a custom head width")
        if not _is_identity(getattr(blk.mlp, "norm", None)) or type(blk.mlp).__name__ != "Mlp":
            raise _unsupported(src, f"block {i} MLP is {type(blk.mlp).__name__} (only timm Mlp without norm)")


def timm_config(model: Any) -> ViTConfig:
    """The ViTConfig of a timm VisionTransformer (works on meta-device models: no weights read)."""
    _timm_checks(model)
    blocks = list(model.blocks)
    b0 = blocks[0]
    final = "final" if not _is_identity(model.norm) else "fc_norm" if not _is_identity(model.fc_norm) else "none"
    norms = [m for blk in blocks for m in (blk.norm1, blk.norm2)]
    norms += [m for m in (model.norm_pre, model.norm, model.fc_norm) if not _is_identity(m)]
    layer_scale = not _is_identity(b0.ls1)
    cfg = ViTConfig(
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        d_model=model.embed_dim,
        n_layers=len(blocks),
        n_heads=b0.attn.num_heads,
        d_mlp=b0.mlp.fc1.out_features,
        n_classes=model.num_classes if model.num_classes > 0 else 1,
        pool="cls" if model.global_pool == "token" else "mean",
        ln_eps=_norm_eps(norms, "timm"),
        class_token=model.cls_token is not None,
        n_registers=int(model.num_reg_tokens),
        pos_embed_prefix=not model.no_embed_class,
        patch_bias=model.patch_embed.proj.bias is not None,
        qkv_bias=b0.attn.qkv.bias is not None,
        layer_scale=layer_scale,
        ln_pre=not _is_identity(model.norm_pre),
        norm=final,
        head="linear" if isinstance(model.head, nn.Linear) else "none",
        act=_act_name(b0.mlp.act, "timm"),
    )
    for i, blk in enumerate(blocks):
        if _is_identity(blk.ls1) == layer_scale:
            raise _unsupported("timm", f"layer scale on some blocks only (block {i})")
    return cfg


def timm_weights(model: Any) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """timm `VisionTransformer` -> (config, state dict) of a HookedViT with identical logits and
    residual streams (the tensors are the source's own parameters, not copies)."""
    cfg = timm_config(model)
    blocks, final, layer_scale = list(model.blocks), cfg.norm, cfg.layer_scale
    s: dict[str, torch.Tensor] = {"patch_embed.weight": model.patch_embed.proj.weight, "pos_embed": model.pos_embed}
    if cfg.patch_bias:
        s["patch_embed.bias"] = model.patch_embed.proj.bias
    if cfg.class_token:
        s["cls_token"] = model.cls_token
    if cfg.n_registers:
        s["reg_token"] = model.reg_token
    if cfg.ln_pre:
        _ln("ln_pre", model.norm_pre, s)
    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        _ln(f"{p}.ln1", blk.norm1, s)
        s[f"{p}.attn.qkv.weight"] = blk.attn.qkv.weight
        if cfg.qkv_bias:
            s[f"{p}.attn.qkv.bias"] = blk.attn.qkv.bias
        _linear(f"{p}.attn.proj", blk.attn.proj, s)
        _ln(f"{p}.ln2", blk.norm2, s)
        _linear(f"{p}.mlp.fc1", blk.mlp.fc1, s)
        _linear(f"{p}.mlp.fc2", blk.mlp.fc2, s)
        if layer_scale:
            s[f"{p}.ls1.gamma"], s[f"{p}.ls2.gamma"] = blk.ls1.gamma, blk.ls2.gamma
    if final == "final":
        _ln("ln_final", model.norm, s)
    elif final == "fc_norm":
        _ln("fc_norm", model.fc_norm, s)
    if cfg.head == "linear":
        s["head.weight"], s["head.bias"] = model.head.weight, model.head.bias
    return cfg, s


# ---- open_clip -------------------------------------------------------------------------
def open_clip_weights(model: Any) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """open_clip CLIP (or its `.visual`) -> (config, state dict) of a HookedViT whose forward()
    equals `encode_image`."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    src = "open_clip"
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"from_open_clip expects an open_clip ViT image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise _unsupported(src, f"attentional pooling or pool_type={visual.pool_type!r}")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise _unsupported(src, f"non-square image {visual.image_size} or patch {visual.patch_size}")
    if visual.positional_embedding.ndim != 2:
        raise _unsupported(src, "a position embedding that is not (T, d)")
    blocks = list(visual.transformer.resblocks)
    for i, blk in enumerate(blocks):
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            raise _unsupported(src, f"block {i} is {type(blk).__name__} (only the standard ResidualAttentionBlock)")
    b0 = blocks[0]
    layer_scale = not _is_identity(b0.ls_1)
    has_ln_pre = not _is_identity(visual.ln_pre)
    norms = [m for blk in blocks for m in (blk.ln_1, blk.ln_2)] + [visual.ln_post]
    norms += [visual.ln_pre] if has_ln_pre else []
    proj = visual.proj
    cfg = ViTConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        in_chans=visual.conv1.in_channels,
        d_model=visual.conv1.out_channels,
        n_layers=len(blocks),
        n_heads=b0.attn.num_heads,
        d_mlp=b0.mlp.c_fc.out_features,
        n_classes=proj.shape[1] if proj is not None else 1,
        pool="cls" if visual.pool_type == "tok" else "mean",
        ln_eps=_norm_eps(norms, src),
        class_token=True,
        patch_bias=visual.conv1.bias is not None,
        qkv_bias=b0.attn.in_proj_bias is not None,
        layer_scale=layer_scale,
        ln_pre=has_ln_pre,
        norm="fc_norm" if visual.final_ln_after_pool else "final",
        head="proj" if proj is not None else "none",
        act=_act_name(b0.mlp.gelu, src),
    )
    s: dict[str, torch.Tensor] = {
        "patch_embed.weight": visual.conv1.weight,
        "cls_token": visual.class_embedding.reshape(1, 1, -1),
        "pos_embed": visual.positional_embedding.unsqueeze(0),
    }
    if cfg.patch_bias:
        s["patch_embed.bias"] = visual.conv1.bias
    if has_ln_pre:
        _ln("ln_pre", visual.ln_pre, s)
    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        _ln(f"{p}.ln1", blk.ln_1, s)
        # nn.MultiheadAttention stacks [q; k; v] by rows, the layout of our fused qkv.
        s[f"{p}.attn.qkv.weight"] = blk.attn.in_proj_weight
        if cfg.qkv_bias:
            s[f"{p}.attn.qkv.bias"] = blk.attn.in_proj_bias
        _linear(f"{p}.attn.proj", blk.attn.out_proj, s)
        _ln(f"{p}.ln2", blk.ln_2, s)
        _linear(f"{p}.mlp.fc1", blk.mlp.c_fc, s)
        _linear(f"{p}.mlp.fc2", blk.mlp.c_proj, s)
        if layer_scale:
            s[f"{p}.ls1.gamma"], s[f"{p}.ls2.gamma"] = blk.ls_1.gamma, blk.ls_2.gamma
    _ln("ln_final" if cfg.norm == "final" else "fc_norm", visual.ln_post, s)
    if proj is not None:
        s["head.weight"] = proj.T  # CLIP computes pooled @ proj; nn.Linear computes pooled @ W.T
    return cfg, s


def fold_input_normalization(cfg: ViTConfig, state: dict[str, torch.Tensor], mean, std
                             ) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(config, state) of the same ViT taking pixels in [0, 1] instead of (x − mean) / std.

    The patch embedding is a stride-`patch` convolution without padding, so per-channel
    normalisation folds into it exactly: W'[:, c] = W[:, c] / std[c] and
    b' = b − Σ_c W'[:, c] · mean[c] (summed over the kernel). The stored images then stay the
    plain uint8 pixels every model reads, and no path can forget to normalise."""
    w = state["patch_embed.weight"].detach()
    mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    if mean_t.shape[1] != w.shape[1] or std_t.shape[1] != w.shape[1] or bool((std_t <= 0).any()):
        raise ValueError(f"input normalisation mean={mean}, std={std} must give one value per input channel "
                         f"({w.shape[1]}), std > 0")
    w_new = w.double() / std_t
    bias = state.get("patch_embed.bias")
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    b_new = b - (w_new * mean_t).sum((1, 2, 3))
    out = dict(state)
    out["patch_embed.weight"] = w_new.to(w.dtype)
    out["patch_embed.bias"] = b_new.to(w.dtype)
    return dataclasses.replace(cfg, patch_bias=True), out
