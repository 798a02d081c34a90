"""HookedViT: a small pre-norm Vision Transformer with a hook point at every stage.

Token layout: index 0 is the class token, then the (image_size/patch_size)^2
patches in row-major order. Hook points (see `hook_names()`):

    hook_embed, hook_pos_embed                        (B, T, d)
    blocks.{i}.hook_resid_pre / hook_resid_mid / hook_resid_post
    blocks.{i}.hook_attn_out / hook_mlp_out           (B, T, d)
    blocks.{i}.ln1.hook_normalized, ln2.hook_normalized
    blocks.{i}.attn.hook_q / hook_k / hook_v / hook_z (B, T, n_heads, d_head)
    blocks.{i}.attn.hook_pattern                      (B, n_heads, T, T), only when hooked
    blocks.{i}.mlp.hook_pre / hook_post               (B, T, d_mlp)
    ln_final.hook_normalized                          (B, T, d)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from analysis.hooks import ActivationCache, HookedRootModule, HookFn, HookPoint, NameFilter

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a HookedViT (the run config lives elsewhere, e.g. MouseTrainConfig)."""

    image_size: int = 64
    """Input height and width in pixels (square images)."""
    patch_size: int = 8
    """Patch height and width; must divide image_size."""
    in_chans: int = 1
    """Input channels (1 for dSprites-style shapes, 3 for RGB)."""
    d_model: int = 64
    """Residual stream width."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    d_mlp: int = 256
    """Hidden width of each MLP."""
    n_classes: int = 3
    """Output classes of the linear head."""
    pool: Literal["cls", "mean"] = "cls"
    """What the head reads: the class token, or the mean over patch tokens."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "d_model", "n_layers", "n_heads", "d_mlp", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                f"pick a divisor such as {[p for p in (4, 8, 16, 32) if self.image_size % p == 0]}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                "pick n_heads so each head gets d_model // n_heads dimensions"
            )
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool={self.pool!r}: expected 'cls' or 'mean'")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps={self.ln_eps}: expected a small positive float, e.g. 1e-6")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


class LayerNorm(nn.Module):
    """LayerNorm whose affine output passes through `hook_normalized`."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps))


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, dh)
        if self.hook_pattern.has_hooks:
            # The fused kernel never materializes the pattern; build it only when asked.
            scores = (q @ k.transpose(-1, -2)) * self.d_head**-0.5
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        return self.proj(z.reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hook_post(F.gelu(self.hook_pre(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # Registered in forward order so hook_names() lists hooks in the order they fire.
        self.hook_resid_pre = HookPoint()
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(x)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.attn(self.ln1(resid_pre))))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self.mlp(self.ln2(resid_mid))))


class HookedViT(HookedRootModule):
    """Class token + learned position embedding, pre-norm blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_tokens = cfg.n_tokens
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_model))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self._init_weights()
        self.setup()

    def _init_weights(self) -> None:
        # ViT-style small init (uses the global torch RNG: seed it for reproducible models).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ---- forward -----------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) -> residual stream before block 0, (B, T, d)."""
        c, s = self.cfg.in_chans, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"expected float input (B, {c}, {s}, {s}), got {tuple(x.shape)}; "
                "convert uint8 (B, H, W, C) images with analysis.images.to_model_input"
            )
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, d), row-major patches
        tokens = self.hook_embed(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1))
        return tokens + self.hook_pos_embed(self.pos_embed.expand(x.shape[0], -1, -1))

    def _check_layer(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.cfg.n_layers:
            raise ValueError(
                f"stop_at_layer={n!r} out of range: valid values are 0..{self.cfg.n_layers} "
                f"(0 = embeddings only, {self.cfg.n_layers} = after the last block), or None for logits"
            )
        return n

    def forward_features(self, x: torch.Tensor, *, stop_at_layer: int | None = None) -> torch.Tensor:
        """Residual stream (B, T, d) after blocks 0..stop_at_layer-1 (all blocks when None)."""
        n = self.cfg.n_layers if stop_at_layer is None else self._check_layer(stop_at_layer)
        resid = self.embed(x)
        for block in self.blocks[:n]:
            resid = block(resid)
        return resid

    def forward_head(self, resid: torch.Tensor) -> torch.Tensor:
        """Final residual stream (B, T, d) -> logits (B, n_classes)."""
        normed = self.ln_final(resid)
        pooled = normed[:, 0] if self.cfg.pool == "cls" else normed[:, 1:].mean(dim=1)
        return self.head(pooled)

    def forward(self, x: torch.Tensor, *, stop_at_layer: int | None = None) -> torch.Tensor:
        """Logits (B, n_classes), or with stop_at_layer=n the residual stream (B, T, d) after n blocks."""
        if stop_at_layer is not None:
            return self.forward_features(x, stop_at_layer=stop_at_layer)
        return self.forward_head(self.forward_features(x))

    # ---- hooks -------------------------------------------------------------------
    def run_with_hooks(
        self,
        x: torch.Tensor,
        *,
        fwd_hooks: list[tuple[NameFilter, HookFn]],
        stop_at_layer: int | None = None,
    ) -> torch.Tensor:
        with self.hooks(fwd_hooks):
            return self(x, stop_at_layer=stop_at_layer)

    def run_with_cache(
        self,
        x: torch.Tensor,
        *,
        names_filter: None | str | list[str] | Callable[[str], bool] = None,
        stop_at_layer: int | None = None,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass that also returns the detached activations at the selected hooks.

        names_filter: None (every hook), one name, a list of names, or name -> bool.
        Hooks past `stop_at_layer` never fire, so they are absent from the cache.
        """
        if names_filter is None:
            names = self.hook_names()
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            names = [n for n in self.hook_names() if names_filter(n)]
        else:
            names = list(names_filter)
        self.check_hook_names(names)
        acts: dict[str, torch.Tensor] = {}

        def save(act: torch.Tensor, *, hook: HookPoint) -> None:
            acts[hook.name] = act.detach()

        out = self.run_with_hooks(x, fwd_hooks=[(n, save) for n in names], stop_at_layer=stop_at_layer)
        return out, ActivationCache(acts)

    # ---- persistence -------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write model.safetensors + config.json (mirror of `load`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {"model": "HookedViT", "config": self.cfg.to_dict(), "weights_hash": self.weights_hash()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "HookedViT":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"no HookedViT at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(ViTConfig.from_dict(meta["config"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.to(device).eval()

    def weights_hash(self) -> str:
        """sha256 over sorted parameter names, dtypes, shapes and raw bytes."""
        h = hashlib.sha256()
        state = self.state_dict()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
