"""Decoder directions read through the head (analysis.models.class_projection) against the formula
written out by hand, for a classifier and a CLIP tower under a zero-shot head."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from analysis.models.class_projection import direction_logits, has_classifier
from analysis.models.clip_zero_shot import ZeroShotClassifier, ZeroShotHead
from analysis.models.vit import HookedViT, ViTConfig

CFG = dict(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=4, d_mlp=64)


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def test_a_classifier_reads_centred_scaled_directions_through_its_head_weight():
    torch.manual_seed(0)
    model = _randomised(HookedViT(ViTConfig(**CFG, n_classes=5)))
    d = torch.randn(7, 32)
    expected = ((d - d.mean(1, keepdim=True)) * model.ln_final.weight) @ model.head.weight.T
    assert_close(direction_logits(model, d), expected)

    # the real forward: from a token whose centred part is orthogonal to d's, the final norm's
    # Jacobian along d is its weight times d centred over the token's scale, so a small step along
    # d changes the logits by (step / scale) times direction_logits
    model = model.double()
    d = d[:1].double()
    dc = d - d.mean()
    x = torch.randn(1, 32, dtype=torch.double)
    xc = x - x.mean()
    xc = xc - (xc @ dc.T) / (dc @ dc.T) * dc  # centred, and orthogonal to d centred
    scale = (xc.pow(2).mean() + model.cfg.ln_eps).sqrt()
    step = 1e-6
    with torch.no_grad():
        change = model.head(model.ln_final(xc + step * d)) - model.head(model.ln_final(xc))
    assert_close(change * scale / step, direction_logits(model, d), rtol=1e-4, atol=1e-6)


def test_a_clip_tower_reads_directions_through_its_projection_and_the_class_embeddings():
    torch.manual_seed(1)
    tower = _randomised(HookedViT(ViTConfig(**CFG, n_classes=16, head="proj", norm="final")))
    head = ZeroShotHead(torch.randn(4, 16), logit_scale=100.0, class_names=["a", "b", "c", "d"])
    model = ZeroShotClassifier(tower, head)
    d = torch.randn(6, 32)
    centred = (d - d.mean(1, keepdim=True)) * tower.ln_final.weight
    assert_close(direction_logits(model, d), centred @ tower.head.weight.T @ F.normalize(head.class_embeddings, dim=1).T)
    assert has_classifier(model) and not has_classifier(tower)  # a bare projection has no classes


def test_no_classifier_or_a_wrong_width_is_refused():
    tower = HookedViT(ViTConfig(**CFG, n_classes=16, head="proj"))
    with pytest.raises(ValueError, match="no classifier head"):
        direction_logits(tower, torch.randn(2, 32))
    with pytest.raises(ValueError, match="d_model=32"):
        direction_logits(HookedViT(ViTConfig(**CFG, n_classes=3)), torch.randn(2, 64))
