"""A linear probe per layer, set beside the class projection it is compared with.

Vilas et al. (NeurIPS 2023, §6) compare reading a layer through the model's own classifier (the
class projection, `Readout.token_logits`) with a linear classifier trained on that layer. Here both
read the same vectors of the same held-out images.

Layer numbering: layer l is the residual stream after l blocks. Layer 0 is `blocks.0.hook_resid_pre`
(the embeddings, after ln_pre when the model has one); layer l >= 1 is
`blocks.{l-1}.hook_resid_post`; layer n_layers is the stream the head reads.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.evaluation.toolkit.lens import stream_hooks
from analysis.evaluation.toolkit.readout import Readout, check_classes, tower_of
from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.inputs import to_model_input
from analysis.models.vit import HookedViT

TOKEN_KINDS = ("cls", "patches")


class LinearProbe(NamedTuple):
    """A multinomial logistic regression on standardised features (float64, on the CPU)."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    """(d, C)"""
    bias: Tensor
    """(C,)"""

    def logits(self, features: Tensor) -> Tensor:
        z = (features.detach().cpu().double() - self.mean) / self.std
        return z @ self.weight + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(-1)


def fit_probe(features: Tensor, labels: Tensor, n_classes: int, *, epochs: int = 100, seed: int = 0,
              l2: float = 1e-3) -> LinearProbe:
    """Fit a (d -> n_classes) softmax regression to (n, d) `features` by full-batch L-BFGS.

    Features are standardised with their own mean and std (pass the training split only). `epochs`
    caps the L-BFGS iterations; `l2` (on the weights, not the bias) keeps a separable problem's
    weights finite. Full batch, float64, a seeded start: the same inputs give the same probe."""
    x = features.detach().cpu().double()
    y = torch.as_tensor(labels).cpu().long()
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fit_probe: features {tuple(x.shape)} and labels {tuple(y.shape)}: expected (n, d) "
                         "and (n,) with n >= 1")
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-8)  # a constant feature carries nothing; avoid 0/0
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], n_classes, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def _check_inputs(images_x, labels, split_is_train, n_classes: int) -> tuple[Tensor, Tensor, np.ndarray]:
    if isinstance(images_x, np.ndarray):
        images_x = to_model_input(images_x)  # uint8 (N, H, W, C), checked there
    if not isinstance(images_x, Tensor) or images_x.ndim != 4:
        raise ValueError(f"images_x: expected a float tensor (N, C, H, W) or uint8 images (N, H, W, C), got "
                         f"{type(images_x).__name__} {tuple(getattr(images_x, 'shape', ()))}")
    n = len(images_x)
    y = check_classes(labels, n, n_classes)
    split = np.asarray(split_is_train)
    if split.dtype != bool or split.shape != (n,):
        raise ValueError(f"split_is_train {split.dtype} {split.shape}: expected a bool array of shape ({n},), "
                         "True for training images (e.g. data.labels['split'] == 'train')")
    if not split.any():
        raise ValueError(f"split_is_train has no True entries among {n} images: the probe needs training images")
    if split.all():
        raise ValueError(f"split_is_train is True for all {n} images: keep some (False) to evaluate on")
    return images_x, y, split


@torch.no_grad()
def probe_layers(model: HookedViT | ZeroShotClassifier, images_x, labels, split_is_train, *,
                 tokens=TOKEN_KINDS, layers=None, epochs: int = 100, seed: int = 0, l2: float = 1e-3,
                 batch_size: int = 256) -> list[dict]:
    """Per layer and token kind, a linear probe's and the class projection's held-out accuracy.

    tokens: "cls" (the class token; skipped when the model has none) and/or "patches" (the mean of
    the patch tokens, prefix tokens excluded). layers: stream indices 0..n_layers (see the module
    docstring), default all. The probe (`fit_probe`) trains on the images where split_is_train is
    True, standardised with their statistics, and is scored on the others. projection_accuracy: on
    the same eval images, the argmax of `Readout.token_logits` of the class token, or for "patches"
    the argmax of the mean of the per-patch logits (each patch read alone, then averaged, as the
    class-embedding lens reads tokens; not the logits of the mean patch). chance: the share of the
    most common class among the eval images (the best any constant guess scores there, >= 1/C).

    Rows: layer, hook, token, probe_accuracy, projection_accuracy, chance, n_train, n_eval."""
    readout = Readout(model)
    tower = tower_of(model)
    cfg = tower.cfg
    x, y, split = _check_inputs(images_x, labels, split_is_train, readout.n_classes)
    tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    bad = [t for t in tokens if t not in TOKEN_KINDS]
    if bad or not tokens:
        raise ValueError(f"tokens={tokens!r}: expected a non-empty subset of {TOKEN_KINDS}")
    kinds = [t for t in tokens if t != "cls" or cfg.class_token]
    if not kinds:
        raise ValueError("tokens=('cls',) but the model has no class token: probe 'patches' instead")
    layers = list(range(cfg.n_layers + 1)) if layers is None else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer <= cfg.n_layers:
            raise ValueError(f"layers contains {layer!r}: expected stream indices 0..{cfg.n_layers} (0 = embeddings, "
                             f"{cfg.n_layers} = after the last block), or layers=None for all")
    if not layers:
        raise ValueError("layers is empty: pass stream indices, or None for all")

    # one forward pass per batch collects every requested layer; the tower's own hooks, stopped
    # after the deepest block needed (block 0 must run for its resid_pre hook to fire)
    names = sorted({stream_hooks(cfg.n_layers)[layer] for layer in layers})
    device = next(tower.parameters()).device
    feats = {(layer, k): [] for layer in layers for k in kinds}
    projected = {(layer, k): [] for layer in layers for k in kinds}
    for lo in range(0, len(x), batch_size):
        _, cache = tower.run_with_cache(x[lo:lo + batch_size].to(device), names_filter=names,
                                        stop_at_layer=max(max(layers), 1))
        for layer in layers:
            resid = cache[stream_hooks(cfg.n_layers)[layer]]
            for k in kinds:
                if k == "cls":
                    vec, logits = resid[:, 0], readout.token_logits(resid[:, 0])
                else:
                    patches = resid[:, cfg.n_prefix:]
                    vec, logits = patches.mean(1), readout.token_logits(patches).mean(1)
                feats[layer, k].append(vec.cpu())
                projected[layer, k].append(logits.argmax(-1).cpu())

    train, held = torch.from_numpy(split), torch.from_numpy(~split)
    y_eval = y[held]
    chance = float(torch.bincount(y_eval, minlength=readout.n_classes).max()) / len(y_eval)
    # the probe's classes are those its training images carry (it could never predict another): a
    # 1000-class head scored on its predictions over a few hundred images fits far fewer weights
    seen, train_codes = torch.unique(y[train], return_inverse=True)
    rows = []
    for layer in layers:
        for k in kinds:
            f = torch.cat(feats[layer, k])
            probe = fit_probe(f[train], train_codes, len(seen), epochs=epochs, seed=seed, l2=l2)
            probe_acc = float((seen[probe.predict(f[held])] == y_eval).double().mean())
            proj_acc = float((torch.cat(projected[layer, k])[held] == y_eval).double().mean())
            rows.append({"layer": layer, "hook": stream_hooks(cfg.n_layers)[layer], "token": k, "probe_accuracy": probe_acc,
                         "projection_accuracy": proj_acc, "chance": chance, "n_train": int(train.sum()),
                         "n_eval": int(held.sum())})
    return rows
