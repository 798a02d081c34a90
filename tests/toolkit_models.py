"""Models the toolkit tests share: a tiny trained mouse (where answers mean something) and small
random HookedViTs of every head layout (where only identities can be checked)."""

from __future__ import annotations

from functools import lru_cache

import torch

from analysis.data.shapes import ShapesConfig, generate_shapes
from analysis.models.clip_zero_shot import ZeroShotClassifier, ZeroShotHead
from analysis.models.mouse import MouseTrainConfig, train_mouse
from analysis.models.vit import HookedViT, ViTConfig

SMALL = dict(image_size=32, patch_size=8, in_chans=3, d_model=32, n_layers=2, n_heads=4, d_mlp=64)
VARIANTS = {
    "cls_final": ViTConfig(**SMALL, n_classes=5),
    "mean_fc_norm": ViTConfig(**SMALL, n_classes=5, pool="mean", norm="fc_norm", class_token=False),
    "mean_final_registers": ViTConfig(**SMALL, n_classes=5, pool="mean", n_registers=2),
    "no_norm": ViTConfig(**SMALL, n_classes=5, norm="none"),
}
LAYOUTS = (*VARIANTS, "clip")
"""Every readout path: class token + final norm, mean pool + fc_norm, registers, no norm, and
a CLIP tower (ln_pre, projection head) under a zero-shot head."""


def random_model(name: str) -> HookedViT | ZeroShotClassifier:
    """A seeded random classifier of layout `name` (see LAYOUTS) for 3-channel 32 px images, its
    norms and biases perturbed so a dropped term would show."""
    torch.manual_seed(0)
    if name == "clip":
        tower = HookedViT(ViTConfig(**SMALL, n_classes=16, head="proj", ln_pre=True)).eval()
        head = ZeroShotHead(torch.randn(6, 16), 100.0, [f"c{i}" for i in range(6)])
        return ZeroShotClassifier(tower, head).eval()
    model = HookedViT(VARIANTS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def layer_scale_model(seed: int = 0) -> HookedViT:
    """A seeded random classifier whose blocks scale their writes (LayerScale), perturbed like `random_model`."""
    torch.manual_seed(seed)
    model = HookedViT(ViTConfig(**SMALL, n_classes=5, layer_scale=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


MOUSE_VIT = ViTConfig(image_size=64, patch_size=16, in_chans=1, d_model=32, n_layers=2, n_heads=2, d_mlp=64,
                      n_classes=3)


@lru_cache(maxsize=1)
def trained_mouse():
    """(model, shapes data) for a 2-layer mouse trained a few epochs on the shape task (chance 1/3).

    One torch thread: a tiny model gains nothing from more, and they oversubscribe a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = generate_shapes(ShapesConfig(n_images=1200, seed=1))
        cfg = MouseTrainConfig(vit=MOUSE_VIT, epochs=4, batch_size=32, lr=3e-3, warmup_steps=10, max_seconds=None)
        torch.manual_seed(0)
        result = train_mouse(data.images, data.labels["label"], data.labels["split"], cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    return result.model, data
