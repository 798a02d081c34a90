"""HookedViT: a pre-norm Vision Transformer with a hook point at every stage.

Token layout: the class token (if `class_token`), then `n_registers` register tokens,
then the (image_size/patch_size)^2 patches in row-major order. Hook points (see
`hook_names()`; optional modules only exist when the config enables them):

    hook_embed, hook_pos_embed                        (B, T, d)  tokens; position term (0 on
                                                                 prefix tokens if not pos_embed_prefix)
    ln_pre.hook_scale / hook_normalized               (B, T, 1) / (B, T, d), when ln_pre
    blocks.{i}.hook_resid_pre / hook_resid_mid / hook_resid_post
    blocks.{i}.hook_attn_out / hook_mlp_out           (B, T, d), after layer scale
    blocks.{i}.ln1.hook_scale / hook_normalized, ln2.*
    blocks.{i}.attn.hook_q / hook_k / hook_v / hook_z (B, T, n_heads, d_head)
    blocks.{i}.attn.hook_attn_scores / hook_pattern   (B, n_heads, T, T), only when hooked
    blocks.{i}.attn.hook_result                       (B, T, n_heads, d), only when hooked
    blocks.{i}.mlp.hook_pre / hook_post               (B, T, d_mlp)
    ln_final.hook_scale / hook_normalized             (B, T, d), when norm == "final"
    hook_pooled                                       (B, d) what the head reads
    fc_norm.hook_normalized                           (B, d), when norm == "fc_norm"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from analysis.models.cache import ActivationCache
from analysis.models.hooks import HookedRootModule, HookFn, HookPoint, NameFilter
from analysis.models.blocks import Block, LayerNorm
from analysis.models.config import ViTConfig
from analysis.integrity import atomic_write, write_json
from analysis.models.convert import fold_input_normalization, open_clip_weights, timm_weights

__all__ = ["HookedViT", "ViTConfig", "resample_pos_embed", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, n_prefix: int) -> torch.Tensor:
    """(1, n_prefix + g*g, d) -> (1, n_prefix + new_grid^2, d): bicubic, antialiased, prefix rows kept.

    Same recipe as timm's `resample_abs_pos_embed`, so a resized model matches timm's.
    """
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    old = int(round(grid.shape[1] ** 0.5))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} patch rows: expected a square grid")
    d = grid.shape[-1]
    img = grid.float().reshape(1, old, old, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class HookedViT(HookedRootModule):
    """Patch embedding + prefix tokens + position embedding, pre-norm blocks, norm, pooling, head."""

    def __init__(self, cfg: ViTConfig, *, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_tokens = cfg.n_tokens
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.n_registers:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_registers, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_pos, d))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        if cfg.ln_pre:
            self.ln_pre = LayerNorm(d, cfg.ln_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.norm == "final":
            self.ln_final = LayerNorm(d, cfg.ln_eps)
        self.hook_pooled = HookPoint()
        if cfg.norm == "fc_norm":
            self.fc_norm = LayerNorm(d, cfg.ln_eps)
        if cfg.head != "none":
            self.head = nn.Linear(d, cfg.n_classes, bias=cfg.head == "linear")
        if init:
            self._init_weights()
        self.setup()

    def _init_weights(self) -> None:
        # ViT-style small init (uses the global torch RNG: seed it for reproducible models).
        # The order of draws is fixed so a seed gives the same mouse model as before.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.class_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.cfg.n_registers:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- forward -----------------------------------------------------------------
    def _full_pos_embed(self) -> torch.Tensor:
        """(1, T, d) position term; zeros on prefix tokens when they have no position."""
        if self.cfg.pos_embed_prefix or not self.cfg.n_prefix:
            return self.pos_embed
        pad = self.pos_embed.new_zeros(1, self.cfg.n_prefix, self.cfg.d_model)
        return torch.cat([pad, self.pos_embed], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) -> residual stream before block 0, (B, T, d)."""
        c, s = self.cfg.in_chans, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"expected float input (B, {c}, {s}, {s}), got {tuple(x.shape)}; "
                "convert uint8 (B, H, W, C) images with analysis.models.inputs.to_model_input, "
                "or build a model for another size with model.resize(image_size)"
            )
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, d), row-major patches
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.cfg.n_registers:
            prefix.append(self.reg_token.expand(b, -1, -1))
        tokens = self.hook_embed(torch.cat([*prefix, patches], dim=1) if prefix else patches)
        resid = tokens + self.hook_pos_embed(self._full_pos_embed().expand(b, -1, -1))
        return self.ln_pre(resid) if self.cfg.ln_pre else resid

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

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, d): class token, or mean over patch tokens (prefix tokens excluded)."""
        return tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, self.cfg.n_prefix :].mean(dim=1)

    def forward_head(self, resid: torch.Tensor) -> torch.Tensor:
        """Final residual stream (B, T, d) -> output (B, d_out): logits or embedding."""
        if self.cfg.norm == "final":
            resid = self.ln_final(resid)
        pooled = self.hook_pooled(self.pool(resid))
        if self.cfg.norm == "fc_norm":
            pooled = self.fc_norm(pooled)
        return pooled if self.cfg.head == "none" else self.head(pooled)

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
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass that also returns the detached activations at the selected hooks.

        names_filter: None (every hook), one name, a list of names, or name -> bool.
        device: where cached tensors go (None = where they were computed).
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
            act = act.detach()
            acts[hook.name] = act if device is None else act.to(device)

        out = self.run_with_hooks(x, fwd_hooks=[(n, save) for n in names], stop_at_layer=stop_at_layer)
        return out, ActivationCache(acts, model=self)

    # ---- other sizes and other libraries ------------------------------------------
    def resize(self, image_size: int) -> "HookedViT":
        """A copy for `image_size` inputs, the position embedding resampled bicubically (as timm does)."""
        cfg = dataclasses.replace(self.cfg, image_size=image_size)
        new = HookedViT(cfg, init=False).to(self.pos_embed.device, self.pos_embed.dtype)
        state = {k: v for k, v in self.state_dict().items() if k != "pos_embed"}
        n_prefix = cfg.n_prefix if cfg.pos_embed_prefix else 0
        state["pos_embed"] = resample_pos_embed(self.pos_embed.detach(), cfg.grid_size, n_prefix)
        new.load_state_dict(state, strict=True)
        return new.train(self.training)

    @classmethod
    def from_timm(cls, model: Any) -> "HookedViT":
        """Convert an instantiated timm `VisionTransformer` (weights copied; outputs match)."""
        return cls._from_state(*timm_weights(model))

    @classmethod
    def from_open_clip(cls, model: Any) -> "HookedViT":
        """Convert an open_clip CLIP model (or its `.visual` ViT); forward() = `encode_image`."""
        return cls._from_state(*open_clip_weights(model))

    def with_input_normalization(self, mean, std) -> "HookedViT":
        """A copy taking pixels in [0, 1] where this model takes (x − mean) / std per channel (the
        normalisation folded exactly into the patch embedding; `fold_input_normalization`)."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        return HookedViT._from_state(*fold_input_normalization(self.cfg, state, mean, std)).train(self.training)

    @classmethod
    def _from_state(cls, cfg: ViTConfig, state: dict[str, torch.Tensor]) -> "HookedViT":
        """A model holding copies of `state`, on the device and in the dtype of its tensors."""
        like = state["pos_embed"]
        model = cls(cfg, init=False).to(device=like.device, dtype=like.dtype)
        model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
        return model.eval()

    # ---- persistence -------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write model.safetensors + config.json (mirror of `load`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        meta = {"model": "HookedViT", "config": self.cfg.to_dict(), "weights_hash": self.weights_hash()}
        write_json(directory / CONFIG_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "HookedViT":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"no HookedViT at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(ViTConfig.from_dict(meta["config"]), init=False)
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
