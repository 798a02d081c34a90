import pytest
import torch
import torch.nn.functional as F

from analysis.vit import HookedViT, ViTConfig

CFG = ViTConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=3)
T = 1 + (32 // 8) ** 2


@pytest.fixture
def model() -> HookedViT:
    torch.manual_seed(0)
    m = HookedViT(CFG).eval()
    # The 0.02-std init makes every attention pattern nearly uniform and every edit
    # nearly invisible; larger weights give a model whose internals matter.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def _no_hooks_left(m: HookedViT) -> bool:
    return all(not hp.has_hooks for hp in m.hook_dict.values())


def test_required_hook_names_and_shapes(model, x):
    names = model.hook_names()
    required = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"]
    for i in range(CFG.n_layers):
        required += [f"blocks.{i}.{h}" for h in (
            "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
            "attn.hook_pattern", "mlp.hook_post")]
    assert set(required) <= set(names)
    assert model.n_tokens == T
    logits, cache = model.run_with_cache(x)
    assert logits.shape == (3, 3)
    assert list(cache.keys()) == names, "every hook fires once, in registration order"
    for name, act in cache.items():
        assert not act.requires_grad, name
    assert cache["blocks.0.hook_resid_post"].shape == (3, T, 32)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 4, T, T)
    assert cache["blocks.1.attn.hook_z"].shape == (3, T, 4, 8)
    assert cache["blocks.0.mlp.hook_post"].shape == (3, T, 64)
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(3, 4, T))


def test_hooks_fire_with_their_names(model, x):
    seen = []
    model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("resid_post"), lambda a, hook: seen.append((hook.name, a.shape)))])
    assert seen == [("blocks.0.hook_resid_post", (3, T, 32)), ("blocks.1.hook_resid_post", (3, T, 32))]


def test_residual_stream_matches_reference(model, x):
    """The hooked blocks compute the textbook pre-norm ViT."""
    _, cache = model.run_with_cache(x)
    resid = cache["hook_embed"] + cache["hook_pos_embed"]
    for i, blk in enumerate(model.blocks):
        torch.testing.assert_close(resid, cache[f"blocks.{i}.hook_resid_pre"])
        h = F.layer_norm(resid, (32,), blk.ln1.weight, blk.ln1.bias, CFG.ln_eps)
        q, k, v = blk.attn.qkv(h).view(3, T, 3, 4, 8).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        resid = resid + blk.attn.proj((att @ v).transpose(1, 2).reshape(3, T, 32))
        h = F.layer_norm(resid, (32,), blk.ln2.weight, blk.ln2.bias, CFG.ln_eps)
        resid = resid + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
        torch.testing.assert_close(resid, cache[f"blocks.{i}.hook_resid_post"])
    logits = model.head(F.layer_norm(resid, (32,), model.ln_final.weight, model.ln_final.bias, CFG.ln_eps)[:, 0])
    torch.testing.assert_close(logits, model(x))


def test_replacing_changes_output_and_identity_does_not(model, x):
    clean = model(x)
    same = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a)])
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    kept = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: None)])
    torch.testing.assert_close(kept, clean, rtol=0, atol=0)
    # A new tensor (as an SAE splice returns) must replace the activation.
    noise = torch.randn(3, T, 32, generator=torch.Generator().manual_seed(4))
    spliced = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a + noise)])
    assert (spliced - clean).abs().max() > 1e-2
    # ...and the replacement is exactly what downstream sees.
    replacement = torch.randn(3, T, 32, generator=torch.Generator().manual_seed(5))
    out = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: replacement)])
    torch.testing.assert_close(out, model.forward_head(replacement))
    assert _no_hooks_left(model)


def test_nested_contexts_compose_and_unwind(model, x):
    calls = []
    outer = lambda a, hook: calls.append("outer") or a * 2  # noqa: E731
    inner = lambda a, hook: calls.append("inner") or a + 1  # noqa: E731
    name = "blocks.0.hook_attn_out"
    with model.hooks([(name, outer)]):
        with model.hooks([(name, inner)]):
            both = model(x)
        assert calls == ["outer", "inner"]
        only_outer = model(x)
        assert model.hook_dict[name].has_hooks
    assert _no_hooks_left(model)
    expected = model.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: a * 2 + 1)])
    torch.testing.assert_close(both, expected)
    torch.testing.assert_close(only_outer, model.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: a * 2)]))


def test_hooks_removed_after_exception(model, x):
    def boom(a, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([("blocks.0.hook_resid_mid", lambda a, hook: a * 0), ("blocks.1.hook_mlp_out", boom)]):
            model(x)
    assert _no_hooks_left(model)
    with pytest.raises(ZeroDivisionError):
        with model.hooks([("hook_embed", lambda a, hook: a * 0)]):
            1 / 0
    assert _no_hooks_left(model)


def test_names_filter_forms(model, x):
    _, c = model.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    assert list(c.keys()) == ["blocks.0.hook_resid_post"]
    _, c = model.run_with_cache(x, names_filter=["blocks.1.hook_mlp_out", "hook_embed"])
    assert set(c.keys()) == {"blocks.1.hook_mlp_out", "hook_embed"}
    _, c = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    assert list(c.keys()) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    with pytest.raises(KeyError, match="did you mean"):
        c["blocks.0.attn.hook_patern"]


def test_stop_at_layer_equals_cached_resid_post(model, x):
    _, cache = model.run_with_cache(x, names_filter=lambda n: "resid" in n)
    for n in range(1, CFG.n_layers + 1):
        torch.testing.assert_close(model(x, stop_at_layer=n), cache[f"blocks.{n - 1}.hook_resid_post"])
    torch.testing.assert_close(model(x, stop_at_layer=0), cache["blocks.0.hook_resid_pre"])
    _, partial = model.run_with_cache(x, stop_at_layer=1)
    assert "blocks.0.hook_resid_post" in partial and "blocks.1.hook_resid_pre" not in partial
    for bad in (-1, CFG.n_layers + 1):
        with pytest.raises(ValueError, match=r"valid values are 0\.\.2"):
            model(x, stop_at_layer=bad)


def test_pattern_path_matches_fused_path(model, x):
    fused = model(x)
    assert _no_hooks_left(model)
    manual, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(manual, fused)
    # Editing the pattern only has an effect because the manual path uses it.
    uniform = lambda a, hook: torch.full_like(a, 1.0 / a.shape[-1])  # noqa: E731
    ablated = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert (ablated - fused).abs().max() > 1e-2


def test_save_load_round_trip(model, x, tmp_path):
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = HookedViT.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert loaded.weights_hash() == model.weights_hash()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.manual_seed(1)
    assert HookedViT(CFG).weights_hash() != model.weights_hash()


def test_bad_hook_name_lists_valid_names(model, x):
    with pytest.raises(ValueError) as err:
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pots", lambda a, hook: a)])
    msg = str(err.value)
    assert "blocks.0.hook_resid_post" in msg and "did you mean" in msg and "hook_embed" in msg
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="Valid names"):
        model.run_with_cache(x, names_filter=["nope"])


def test_config_validation_and_round_trip():
    assert ViTConfig.from_dict(CFG.to_dict()) == CFG
    for kwargs, match in [
        (dict(image_size=64, patch_size=7), "patch_size"),
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(pool="max"), "pool"),
        (dict(n_layers=0), "n_layers"),
        (dict(ln_eps=0.0), "ln_eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            ViTConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        ViTConfig.from_dict({**CFG.to_dict(), "dropout": 0.1})


def test_mean_pool_and_bad_input_shape(x):
    torch.manual_seed(0)
    m = HookedViT(ViTConfig(image_size=32, patch_size=16, d_model=16, n_heads=2, d_mlp=32, pool="mean")).eval()
    out, cache = m.run_with_cache(x, names_filter="ln_final.hook_normalized")
    torch.testing.assert_close(out, m.head(cache["ln_final.hook_normalized"][:, 1:].mean(1)))
    with pytest.raises(ValueError, match="to_model_input"):
        m(torch.rand(2, 32, 32, 1))
