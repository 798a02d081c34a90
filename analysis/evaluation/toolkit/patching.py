"""Activation patching: run a corrupted input with chosen slices of activations set to their values
on a clean input, and measure how much of the clean behaviour comes back.

One generic patcher, `patch`, takes a list of *setters*. A setter names one hook point and the part
of its activation it replaces: token positions of the residual stream (`resid`), of the attention
or MLP output (`attn_out`, `mlp_out`), or one head's slice of `attn.hook_z` (`attn_head`; z is
exactly that head's output before the shared output projection). Sweeps patch one setter at a time
and report `normalised` values: 0 = the corrupted metric, 1 = the clean metric.

Clean and corrupted inputs are paired image by image (same batch size); a metric maps the logits of
one such batch to a scalar (the helpers average over the batch).
"""

from __future__ import annotations

import math

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from analysis.evaluation.toolkit.readout import tower_of
from analysis.models.config import ViTConfig

Metric = Callable[[Tensor], Tensor]
WHERE = ("pre", "mid", "post")


@dataclass(frozen=True)
class Setter:
    """Replace `positions` (None: every token) of hook `blocks.{layer}.{hook}`, and only `head`'s
    slice when given, with the clean activation. Build one with resid/attn_head/mlp_out/attn_out."""

    layer: int
    hook: str
    positions: tuple[int, ...] | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.hook}"

    def check(self, cfg: ViTConfig) -> None:
        """Ranges depend on the model, so they are checked when the setter meets one."""
        _check_index("layer", self.layer, cfg.n_layers, "layers")
        if self.head is not None:
            _check_index("head", self.head, cfg.n_heads, "attention heads per layer")
        if self.positions is not None:
            bad = [p for p in self.positions if not 0 <= p < cfg.n_tokens]
            if bad:
                raise ValueError(
                    f"positions {bad} out of range: this model has {cfg.n_tokens} tokens, valid 0..{cfg.n_tokens - 1} "
                    f"({cfg.n_prefix} prefix token(s) first, then the {cfg.grid_size}x{cfg.grid_size} patches row-major); "
                    "pass token indices in that range")

    def write(self, dst: Tensor, clean: Tensor) -> None:
        """Copy the clean slice into `dst` in place (dst and clean are (B, T, ...) of one batch)."""
        if self.positions is None and self.head is None:
            dst.copy_(clean)
            return
        pos = slice(None) if self.positions is None else torch.tensor(self.positions, dtype=torch.long,
                                                                        device=dst.device)
        if self.head is None:
            dst[:, pos] = clean[:, pos]
        else:
            dst[:, pos, self.head] = clean[:, pos, self.head]


def _check_index(what: str, value: int, n: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{what}={value!r} out of range: this model has {n} {unit}, valid 0..{n - 1}; "
                         f"pass a {what} index in that range")


def _positions(positions) -> tuple[int, ...] | None:
    if positions is None:
        return None
    t = torch.as_tensor(positions)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or (t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())):
        raise ValueError(f"positions={positions!r}: expected None (all tokens) or a 1-D list/tensor of integer "
                         "token indices, e.g. [0] for the class token")
    return tuple(int(p) for p in t.tolist())


def _layer(layer) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer={layer!r}: expected an int block index")
    return layer


def resid(layer: int, positions=None, where: str = "pre") -> Setter:
    """The residual stream entering (`pre`), between attention and MLP (`mid`) or leaving (`post`) a block."""
    if where not in WHERE:
        raise ValueError(f"where={where!r}: expected one of {WHERE} (hook_resid_pre/mid/post)")
    return Setter(_layer(layer), f"hook_resid_{where}", _positions(positions))


def attn_head(layer: int, head: int, positions=None) -> Setter:
    """One head's output z (before the output projection) at `positions`."""
    if isinstance(head, bool) or not isinstance(head, int):
        raise ValueError(f"head={head!r}: expected an int head index")
    return Setter(_layer(layer), "attn.hook_z", _positions(positions), head)


def mlp_out(layer: int, positions=None) -> Setter:
    """The MLP's write into the residual stream (after any layer scale)."""
    return Setter(_layer(layer), "hook_mlp_out", _positions(positions))


def attn_out(layer: int, positions=None) -> Setter:
    """The attention's write into the residual stream (all heads, after any layer scale)."""
    return Setter(_layer(layer), "hook_attn_out", _positions(positions))


# ---- metrics ------------------------------------------------------------------------------------

def _label_tensor(labels, name: str) -> Tensor:
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer tensor of class indices (B,), got {t.dtype} {tuple(t.shape)}")
    return t.long()


def _gather(logits: Tensor, idx: Tensor, name: str) -> Tensor:
    if logits.ndim != 2 or logits.shape[0] != len(idx):
        raise ValueError(f"the metric was built for {len(idx)} images but got logits {tuple(logits.shape)}; "
                         "build it with one class index per image of the batch you patch")
    if len(idx) and (idx.min() < 0 or idx.max() >= logits.shape[1]):
        raise ValueError(f"{name} classes span [{int(idx.min())}, {int(idx.max())}]: valid 0..{logits.shape[1] - 1}")
    return logits.gather(1, idx.to(logits.device)[:, None])[:, 0]


def logit_diff_metric(good, bad) -> Metric:
    """logits (B, C) -> mean over images of logit[good] − logit[bad]."""
    good, bad = _label_tensor(good, "good"), _label_tensor(bad, "bad")
    if good.shape != bad.shape:
        raise ValueError(f"good {tuple(good.shape)} and bad {tuple(bad.shape)}: expected one of each per image")
    return lambda logits: (_gather(logits, good, "good") - _gather(logits, bad, "bad")).mean()


def true_class_logit(labels) -> Metric:
    """logits (B, C) -> mean over images of the true class's logit."""
    labels = _label_tensor(labels, "labels")
    return lambda logits: _gather(logits, labels, "labels").mean()


def normalised(value, clean, corrupted) -> Tensor:
    """(value − corrupted) / (clean − corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
    value, clean, corrupted = (torch.as_tensor(v, dtype=torch.float32) for v in (value, clean, corrupted))
    gap = float(clean - corrupted)
    # A gap within float32 noise would turn rounding errors into large normalised values.
    if abs(gap) <= 1e-6 * max(1.0, abs(float(clean)), abs(float(corrupted))):
        raise ValueError(f"clean metric {float(clean):.6g} equals corrupted metric {float(corrupted):.6g}: the "
                         "metric cannot tell the two inputs apart, so nothing can be normalised; choose another "
                         "clean/corrupted pair or another metric")
    return (value - corrupted) / gap


# ---- patching -----------------------------------------------------------------------------------


def _scalar(value) -> Tensor:
    t = torch.as_tensor(value).detach()
    if t.numel() != 1:
        raise ValueError(f"the metric returned shape {tuple(t.shape)}: expected a scalar; average over the batch")
    return t.reshape(()).float().cpu()


def _prepare(model, clean_x: Tensor, corrupted_x: Tensor, setters: Sequence[Setter]):
    """Check everything, then cache the clean activations of just the hooks the setters touch."""
    cfg = tower_of(model).cfg
    if clean_x.shape != corrupted_x.shape:
        raise ValueError(f"clean_x {tuple(clean_x.shape)} and corrupted_x {tuple(corrupted_x.shape)}: expected "
                         "the same shape, one corrupted image per clean image")
    for s in setters:
        if not isinstance(s, Setter):
            raise TypeError(f"expected setters built by resid/attn_head/mlp_out/attn_out, got {s!r}")
        s.check(cfg)
    names = sorted({s.name for s in setters})
    return model.run_with_cache(clean_x, names_filter=names)


def _hook(items: list[tuple[int, Setter]], clean: Tensor, b: int):
    """Hook for a batch of stacked replicas: replica j (rows j*b..(j+1)*b) gets its setter's patch."""
    def fn(act: Tensor, *, hook) -> Tensor:
        out = act.clone()
        for j, s in items:
            s.write(out[j * b:(j + 1) * b], clean)
        return out
    return fn


@torch.no_grad()
def patch(model, clean_x: Tensor, corrupted_x: Tensor, setters: Setter | Sequence[Setter], metric: Metric) -> Tensor:
    """metric(logits) of `corrupted_x` run with every setter's slice set to its value on `clean_x`."""
    setters = [setters] if isinstance(setters, Setter) else list(setters)
    _, clean = _prepare(model, clean_x, corrupted_x, setters)
    b = clean_x.shape[0]
    hooks = [(s.name, _hook([(0, s)], clean[s.name], b)) for s in setters]
    return _scalar(metric(model.run_with_hooks(corrupted_x, fwd_hooks=hooks)))


@torch.no_grad()
def _sweep(model, clean_x, corrupted_x, metric, setters: list[Setter], max_batch: int) -> Tensor:
    """Normalised metric of each setter applied alone. Several setters share one forward pass: the
    corrupted batch is stacked once per setter, each replica patched by its own setter."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: expected a positive number of images per forward pass")
    clean_logits, clean = _prepare(model, clean_x, corrupted_x, setters)
    clean_value, corrupted_value = _scalar(metric(clean_logits)), _scalar(metric(model(corrupted_x)))
    b = clean_x.shape[0]
    per = max(1, max_batch // b)
    values = []
    for lo in range(0, len(setters), per):
        group = setters[lo:lo + per]
        by_name: dict[str, list[tuple[int, Setter]]] = defaultdict(list)
        for j, s in enumerate(group):
            by_name[s.name].append((j, s))
        hooks = [(name, _hook(items, clean[name], b)) for name, items in by_name.items()]
        logits = model.run_with_hooks(corrupted_x.repeat(len(group), *[1] * (corrupted_x.ndim - 1)),
                                      fwd_hooks=hooks)
        values += [_scalar(metric(logits[j * b:(j + 1) * b])) for j in range(len(group))]
    return normalised(torch.stack(values), clean_value, corrupted_value)


def sweep_resid(model, clean_x: Tensor, corrupted_x: Tensor, metric: Metric, *, where: str = "pre",
                positions: Sequence[Sequence[int]] | None = None, max_batch: int = 256) -> Tensor:
    """(n_layers, T) normalised metric, each (layer, token) of the residual stream patched alone; with
    `positions` (groups of token indices, e.g. `token_blocks`), (n_layers, len(positions)), each
    group patched together."""
    cfg = tower_of(model).cfg
    groups = _groups(cfg, positions)
    setters = [resid(l, g, where) for l in range(cfg.n_layers) for g in groups]
    return _sweep(model, clean_x, corrupted_x, metric, setters, max_batch).view(cfg.n_layers, len(groups))


def sweep_heads(model, clean_x: Tensor, corrupted_x: Tensor, metric: Metric, *, max_batch: int = 256) -> Tensor:
    """(n_layers, n_heads) normalised metric, each head's output patched alone at every position."""
    cfg = tower_of(model).cfg
    setters = [attn_head(l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    return _sweep(model, clean_x, corrupted_x, metric, setters, max_batch).view(cfg.n_layers, cfg.n_heads)


def sweep_mlp(model, clean_x: Tensor, corrupted_x: Tensor, metric: Metric, *,
              positions: Sequence[Sequence[int]] | None = None, max_batch: int = 256) -> Tensor:
    """(n_layers, T) normalised metric, each (layer, token) of the MLP output patched alone (with
    `positions`, each group together, as in `sweep_resid`)."""
    cfg = tower_of(model).cfg
    groups = _groups(cfg, positions)
    setters = [mlp_out(l, g) for l in range(cfg.n_layers) for g in groups]
    return _sweep(model, clean_x, corrupted_x, metric, setters, max_batch).view(cfg.n_layers, len(groups))


def _groups(cfg, positions) -> list[list[int]]:
    if positions is None:
        return [[t] for t in range(cfg.n_tokens)]
    groups = [list(g) for g in positions]
    if not groups or not all(groups):
        raise ValueError(f"positions={positions!r}: expected non-empty groups of token indices, e.g. "
                         "token_blocks(cfg, 64), or None for every token alone")
    return groups


def token_blocks(cfg, max_groups: int) -> tuple[list[list[int]], list[str]]:
    """Token groups for a sweep of at most about `max_groups` cells per layer, and their labels: every
    prefix token alone ("cls", "reg0", …), then the patches alone ("p12") if they fit, else in square
    b x b blocks of the patch grid ("p0+" names a block by its first patch) with the smallest b that
    fits. A ViT-B/16's 197 tokens become 1 + 49 groups at max_groups=64: a sweep patching every token
    alone costs n_layers x T forward passes (2,364 for ViT-B, ~8 min on 2 CPU cores)."""
    g, n_prefix = cfg.grid_size, cfg.n_prefix
    prefix = [[t] for t in range(n_prefix)]
    labels = ["cls"] * bool(cfg.class_token) + [f"reg{i}" for i in range(cfg.n_registers)]
    b = 1
    while len(prefix) + math.ceil(g / b) ** 2 > max(max_groups, len(prefix) + 1) and b < g:
        b += 1
    blocks, block_labels = [], []
    for r0 in range(0, g, b):
        for c0 in range(0, g, b):
            cells = [r * g + c for r in range(r0, min(r0 + b, g)) for c in range(c0, min(c0 + b, g))]
            blocks.append([n_prefix + p for p in cells])
            block_labels.append(f"p{cells[0]}" + ("+" if len(cells) > 1 else ""))
    return prefix + blocks, labels + block_labels
