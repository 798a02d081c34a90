"""open_clip ViT image towers -> HookedViT: same image embeddings; zero-shot head from prompts."""

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from analysis.models.clip_zero_shot import ZeroShotClassifier, zero_shot_head  # noqa: E402
from analysis.models.vit import HookedViT  # noqa: E402


def _small_clip(arch: str, seed: int = 0, **vision_overrides):
    """The arch's own config (patch size, QuickGELU flag, ...) shrunk in width, depth and image size."""
    cfg = open_clip.get_model_config(arch)
    vision = dict(cfg["vision_cfg"])
    p = vision["patch_size"]
    vision.update(width=128, layers=2, image_size=2 * p, **vision_overrides)
    text = dict(cfg["text_cfg"], width=64, heads=2, layers=1)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.get("quick_gelu", False))
    return _perturb(model.eval())


def _perturb(model):
    # Fresh CLIP weights have zero biases and unit norms; perturb them so each tensor matters.
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _check(model, size: int, n: int = 2) -> HookedViT:
    h = HookedViT.from_open_clip(model)
    x = _images(size, n)
    with torch.no_grad():
        ours, cache = h.run_with_cache(x, names_filter=lambda name: name.endswith("hook_resid_post"))
        torch.testing.assert_close(ours, model.encode_image(x), atol=1e-4, rtol=1e-4)
        ref = model.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
    for i, (spatial, prefix) in enumerate(zip(ref["image_intermediates"], ref["image_intermediates_prefix"])):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], torch.cat([prefix, spatial], 1), atol=1e-4, rtol=1e-4)
    return h


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"])
def test_small_towers_match_encode_image(arch):
    model = _small_clip(arch)
    h = _check(model, model.visual.image_size[0])
    assert h.cfg.act == ("quick_gelu" if arch.endswith("quickgelu") else "gelu")
    assert h.cfg.patch_size == open_clip.get_model_config(arch)["vision_cfg"]["patch_size"]
    assert (h.cfg.ln_pre, h.cfg.patch_bias, h.cfg.head, h.cfg.ln_eps) == (True, False, "proj", 1e-5)


def test_avg_pool_final_ln_after_pool_and_layer_scale():
    model = _small_clip("ViT-B-32", pool_type="avg", final_ln_after_pool=True, ls_init_value=0.5)
    h = _check(model, 64)
    assert (h.cfg.pool, h.cfg.norm, h.cfg.layer_scale) == ("mean", "fc_norm", True)


def test_full_size_vit_b_32():
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    _perturb(model)
    h = _check(model, 224, n=1)
    assert (h.cfg.d_model, h.cfg.n_layers, h.cfg.n_classes, h.cfg.n_tokens) == (768, 12, 512, 50)


def test_zero_shot_head_matches_clip_logits():
    model = _small_clip("ViT-B-32")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    classes = ["cat", "dog", "rocket"]
    head = zero_shot_head(model, tokenizer, classes)
    clf = ZeroShotClassifier(HookedViT.from_open_clip(model), head)
    x = _images(64, 3)
    with torch.no_grad():
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in classes])), dim=-1)
        expected = model.logit_scale.exp() * img @ txt.T
        torch.testing.assert_close(clf(x), expected, atol=1e-4, rtol=1e-4)
        out = clf.forward_with_embeddings(x)
        torch.testing.assert_close(out.image_embeddings, model.encode_image(x), atol=1e-4, rtol=1e-4)
        # Hooks reach the tower: zeroing the last block's MLP changes the class logits.
        edited = clf.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, hook: a * 0)])
        assert (edited - expected).abs().max() > 1e-3
        logits, cache = clf.run_with_cache(x, names_filter="hook_pooled")
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        assert cache["hook_pooled"].shape == (3, 128)


def test_prompt_ensemble_is_the_renormalized_mean():
    model = _small_clip("ViT-B-16")
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    head = zero_shot_head(model, tokenizer, ["cat", "dog"], templates)
    with torch.no_grad():
        cat = F.normalize(model.encode_text(tokenizer([t.format("cat") for t in templates])), dim=-1).mean(0)
    torch.testing.assert_close(head.class_embeddings[0], F.normalize(cat, dim=-1))
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_head(model, tokenizer, ["cat"], ["a photo"])


def test_non_vit_tower_is_refused():
    with pytest.raises(TypeError, match="open_clip ViT"):
        HookedViT.from_open_clip(torch.nn.Linear(2, 2))
