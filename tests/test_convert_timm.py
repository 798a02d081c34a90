"""timm VisionTransformer -> HookedViT: same logits, same residual stream after every block."""

import pytest
import torch

timm = pytest.importorskip("timm")

from analysis.models.vit import HookedViT  # noqa: E402

SMALL = dict(embed_dim=64, num_heads=4, depth=2)
# (timm name, overrides, what the case covers). Small configs keep the code path of the full model.
CASES = [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2), "class token, final norm"),
    ("deit_tiny_patch16_224", dict(img_size=32, depth=2), "DeiT (plain ViT)"),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, **SMALL), "registers + layer scale"),
    ("vit_medium_patch16_reg4_gap_256", dict(img_size=32, **SMALL), "registers, no class token, gap, fc_norm"),
    ("vit_base_patch16_gap_224", dict(img_size=32, **SMALL), "no class token, avg pool, final norm"),
    ("vit_medium_patch16_gap_256", dict(img_size=32, **SMALL), "no qkv bias, layer scale, avg pool"),
    ("deit3_small_patch16_224", dict(img_size=32, **SMALL), "layer scale, no_embed_class"),
    ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64, **SMALL), "pre_norm, QuickGELU, bias-free patch"),
    ("vit_base_patch16_clip_224", dict(img_size=32, **SMALL), "pre_norm, GELU"),
    ("vit_small_patch16_224", dict(img_size=32, global_pool="avg", **SMALL), "fc_norm after avg pooling"),
    ("vit_small_patch16_224", dict(img_size=32, num_classes=0, act_layer="gelu_tanh", **SMALL), "no head, tanh-GELU"),
]


def _timm_model(name: str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # timm's own init leaves layer scales at 1e-6 and heads at zero (and is slow at full size);
    # draw every tensor at random instead so each one matters and a mis-copied one shows.
    m = timm.create_model(name, pretrained=False, weight_init="skip", **overrides).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(1.0)
    return m


def _images(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _timm_residuals(m, x) -> list[torch.Tensor]:
    """Every block's full residual stream (prefix tokens first) from timm's forward_intermediates."""
    inter = m.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    return [torch.cat([y[1], y[0]], dim=1) if isinstance(y, tuple) else y for y in inter]


def _check_matches(m, h, x) -> None:
    with torch.no_grad():
        out, cache = h.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
        torch.testing.assert_close(out, m(x), atol=1e-4, rtol=1e-4)
        ref = _timm_residuals(m, x)
    assert len(ref) == h.cfg.n_layers
    for i, r in enumerate(ref):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,overrides,covers", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_logits_and_residuals_match_timm(name, overrides, covers):
    m = _timm_model(name, overrides)
    assert m.blocks[0].attn.fused_attn, "timm should run its fused attention path here"
    h = HookedViT.from_timm(m)
    x = _images(overrides["img_size"])
    _check_matches(m, h, x)
    # The manual attention path (taken when a pattern is hooked) computes the same thing.
    with torch.no_grad():
        out, cache = h.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
        torch.testing.assert_close(out, m(x), atol=1e-4, rtol=1e-4)
    t = h.cfg.n_tokens
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, h.cfg.n_heads, t, t)


def test_config_read_from_the_module_tree():
    cfg = HookedViT.from_timm(_timm_model("vit_medium_patch16_reg4_gap_256", dict(img_size=32, **SMALL))).cfg
    assert (cfg.class_token, cfg.n_registers, cfg.pos_embed_prefix, cfg.pool, cfg.norm, cfg.layer_scale) == (
        False, 4, False, "mean", "fc_norm", True)
    cfg = HookedViT.from_timm(_timm_model("vit_base_patch32_clip_quickgelu_224", dict(img_size=64, **SMALL))).cfg
    assert (cfg.ln_pre, cfg.act, cfg.patch_bias, cfg.ln_eps) == (True, "quick_gelu", False, 1e-5)
    cfg = HookedViT.from_timm(_timm_model("vit_medium_patch16_gap_256", dict(img_size=32, **SMALL))).cfg
    assert not cfg.qkv_bias and cfg.layer_scale


def test_full_size_vit_base_fp32():
    m = _timm_model("vit_base_patch16_224", {})
    h = HookedViT.from_timm(m)
    assert h.cfg.d_model == 768 and h.cfg.n_layers == 12 and h.cfg.n_tokens == 197
    _check_matches(m, h, _images(224, n=1))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_resize_matches_timm_set_input_size(name):
    """Position-embedding resampling (with and without prefix rows) equals timm's."""
    over = dict(img_size=32, **SMALL)
    m = _timm_model(name, over)
    h = HookedViT.from_timm(m).resize(48)
    assert h.cfg.image_size == 48 and h.cfg.n_tokens == h.cfg.n_prefix + 9
    m.set_input_size(img_size=(48, 48))
    _check_matches(m, h, _images(48))


def test_converted_model_saves_and_loads(tmp_path):
    m = _timm_model("vit_small_patch14_reg4_dinov2", dict(img_size=28, **SMALL))
    h = HookedViT.from_timm(m)
    h.save(tmp_path / "dino")
    loaded = HookedViT.load(tmp_path / "dino")
    assert loaded.cfg == h.cfg and loaded.weights_hash() == h.weights_hash()
    x = _images(28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), atol=1e-4, rtol=1e-4)


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="qk_norm"):
        HookedViT.from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, qk_norm=True))
    with pytest.raises(ValueError, match="global_pool='map'"):
        HookedViT.from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, global_pool="map"))
    with pytest.raises(TypeError, match="VisionTransformer"):
        HookedViT.from_timm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name, overrides", [("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
                                             ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64, **SMALL))])
def test_input_normalization_folds_into_the_patch_embedding(name, overrides):
    """[0, 1] pixels into the folded model = normalised pixels into timm's, with or without a patch bias."""
    m = _timm_model(name, overrides)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    h = HookedViT.from_timm(m).with_input_normalization(mean, std)
    assert h.cfg.patch_bias
    x = torch.rand(3, 3, h.cfg.image_size, h.cfg.image_size)
    normalized = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(h(x), m(normalized), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one value per input channel"):
        HookedViT.from_timm(m).with_input_normalization((0.5,), (0.5,))
