"""Building blocks of HookedViT: LayerNorm, attention, MLP, layer scale and the pre-norm block.

Every intermediate a researcher may read or edit passes through a HookPoint. Tensors that
the fast path never materializes (attention scores and pattern, per-head outputs, the
LayerNorm scale) are computed only when a hook asks for them, so an unhooked forward runs
the same fused kernels as the original model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from analysis.models.hooks import HookPoint
from analysis.models.config import ViTConfig


class LayerNorm(nn.Module):
    """LayerNorm whose affine output passes through `hook_normalized`.

    `hook_scale` (B, T, 1) is sqrt(var + eps), the per-token divisor; it is what
    `ActivationCache.apply_ln_to_stack` needs to project components through this norm.
    """

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.has_hooks:
            centered = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            out = centered / scale * self.weight + self.bias
        else:
            out = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return self.hook_normalized(out)


class LayerScale(nn.Module):
    """Per-channel learned scale (timm `LayerScale`, open_clip `ls_1/ls_2`)."""

    def __init__(self, d: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection laid out [q; k; v] by rows."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, dh)
        if self.hook_pattern.has_hooks or self.hook_attn_scores.has_hooks:
            # The fused kernel never materializes scores or pattern; build them only when asked.
            scores = self.hook_attn_scores((q @ k.transpose(-1, -2)) * self.d_head**-0.5)
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        if self.hook_result.has_hooks:
            # Per-head write into the residual stream (before the output bias and any layer
            # scale): (B, T, H, d). Costs H times the projection's memory, hence on demand.
            w = self.proj.weight.view(d, self.n_heads, self.d_head)
            result = self.hook_result(torch.einsum("bthe,dhe->bthd", z, w))
            out = result.sum(2)
            return out if self.proj.bias is None else out + self.proj.bias
        return self.proj(z.reshape(b, t, d))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(ln1(x))), then + ls2(mlp(ln2(.)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # Registered in forward order so hook_names() lists hooks in the order they fire.
        self.hook_resid_pre = HookPoint()
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.d_model) if cfg.layer_scale else None
        self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.ls2 = LayerScale(cfg.d_model) if cfg.layer_scale else None
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(x)
        attn = self.attn(self.ln1(resid_pre))
        if self.ls1 is not None:
            attn = self.ls1(attn)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn))
        mlp = self.mlp(self.ln2(resid_mid))
        if self.ls2 is not None:
            mlp = self.ls2(mlp)
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp))
