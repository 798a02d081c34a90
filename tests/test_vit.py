import pytest
import torch
import torch.nn.functional as F

from analysis.models.vit import HookedViT, ViTConfig

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


# ---- generalized architecture ---------------------------------------------------------
RGB = dict(image_size=32, patch_size=8, in_chans=3, d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=5)
VARIANTS = {
    "registers_no_cls_fc_norm": dict(class_token=False, n_registers=2, pos_embed_prefix=False, pool="mean", norm="fc_norm"),
    "clip_like": dict(ln_pre=True, patch_bias=False, head="proj", act="quick_gelu", ln_eps=1e-5),
    "layer_scale_no_qkv_bias": dict(layer_scale=True, qkv_bias=False, act="gelu_tanh", n_registers=1),
}


def _random_model(cfg: ViTConfig) -> HookedViT:
    torch.manual_seed(0)
    m = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def test_default_architecture_state_dict_is_unchanged():
    """Checkpoints saved before the new fields existed still load: same tensor names and shapes."""
    torch.manual_seed(0)
    state = HookedViT(CFG).state_dict()
    expected = {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed", "ln_final.weight",
                "ln_final.bias", "head.weight", "head.bias"}
    for i in range(CFG.n_layers):
        expected |= {f"blocks.{i}.{n}" for n in (
            "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "ln2.weight", "ln2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, T, 32)
    old_keys = {"image_size", "patch_size", "in_chans", "d_model", "n_layers", "n_heads", "d_mlp", "n_classes", "pool", "ln_eps"}
    assert ViTConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k in old_keys}) == CFG


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_textbook_reference(variant):
    cfg = ViTConfig(**RGB, **VARIANTS[variant])
    m = _random_model(cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    act = {"gelu": F.gelu, "quick_gelu": lambda v: v * torch.sigmoid(1.702 * v),
           "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[cfg.act]
    ln = lambda v, mod: F.layer_norm(v, (32,), mod.weight, mod.bias, cfg.ln_eps)  # noqa: E731
    patches = F.conv2d(x, m.patch_embed.weight, m.patch_embed.bias, stride=8).flatten(2).transpose(1, 2)
    prefix = ([m.cls_token.expand(2, -1, -1)] if cfg.class_token else []) + (
        [m.reg_token.expand(2, -1, -1)] if cfg.n_registers else [])
    if cfg.pos_embed_prefix:
        resid = torch.cat(prefix + [patches], 1) + m.pos_embed
    else:
        resid = torch.cat(prefix + [patches + m.pos_embed], 1)
    if cfg.ln_pre:
        resid = ln(resid, m.ln_pre)
    for blk in m.blocks:
        h = ln(resid, blk.ln1)
        q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(2, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = blk.attn.proj((torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v).transpose(1, 2).flatten(2))
        resid = resid + (a * blk.ls1.gamma if cfg.layer_scale else a)
        f = blk.mlp.fc2(act(blk.mlp.fc1(ln(resid, blk.ln2))))
        resid = resid + (f * blk.ls2.gamma if cfg.layer_scale else f)
    if cfg.norm == "final":
        resid = ln(resid, m.ln_final)
    pooled = resid[:, 0] if cfg.pool == "cls" else resid[:, cfg.n_prefix:].mean(1)
    if cfg.norm == "fc_norm":
        pooled = ln(pooled, m.fc_norm)
    expected = pooled @ m.head.weight.T + (m.head.bias if cfg.head == "linear" else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected)
        assert m(x).shape == (2, 5)
        _, cache = m.run_with_cache(x)  # every hook, including the on-demand ones, same output
        torch.testing.assert_close(_, expected)
    assert cache["hook_embed"].shape == cache["hook_pos_embed"].shape == (2, cfg.n_tokens, 32)
    if cfg.head == "proj":
        assert "head.bias" not in m.state_dict()


def test_head_results_scores_and_ln_scale_hooks():
    m = _random_model(ViTConfig(**RGB, layer_scale=True))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, cache = m.run_with_cache(x)
        torch.testing.assert_close(out, m(x))
        blk = m.blocks[1]
        result = cache["blocks.1.attn.hook_result"]
        assert result.shape == (2, m.n_tokens, 4, 32)
        torch.testing.assert_close((result.sum(2) + blk.attn.proj.bias) * blk.ls1.gamma, cache["blocks.1.hook_attn_out"])
        torch.testing.assert_close(cache["blocks.1.attn.hook_attn_scores"].softmax(-1), cache["blocks.1.attn.hook_pattern"])
        resid = cache["blocks.1.hook_resid_pre"]
        torch.testing.assert_close(cache["blocks.1.ln1.hook_scale"], (resid.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt())
        # Ablating one head through hook_result changes the output by exactly that head's write.
        def drop_head(a, hook):
            a = a.clone()
            a[:, :, 2] = 0
            return a
        with m.hooks([("blocks.1.attn.hook_result", drop_head)]):
            _, ablated = m.run_with_cache(x, names_filter="blocks.1.hook_resid_mid")
        torch.testing.assert_close(ablated["blocks.1.hook_resid_mid"],
                                   cache["blocks.1.hook_resid_mid"] - result[:, :, 2] * blk.ls1.gamma)
    assert _no_hooks_left(m)


def test_resize_keeps_prefix_and_interpolates_grid():
    m = _random_model(ViTConfig(**RGB, n_registers=1))
    big = m.resize(64)
    assert big.cfg.image_size == 64 and big.pos_embed.shape == (1, 2 + 64, 32)
    torch.testing.assert_close(big.pos_embed[:, :2], m.pos_embed[:, :2])
    same = m.resize(32)
    torch.testing.assert_close(same.pos_embed, m.pos_embed, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert big(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_new_config_fields_are_validated():
    for kwargs, match in [
        (dict(pool="cls", class_token=False), "class_token"),
        (dict(norm="post"), "norm"),
        (dict(head="mlp"), "head"),
        (dict(act="relu"), "act"),
        (dict(n_registers=-1), "n_registers"),
    ]:
        with pytest.raises(ValueError, match=match):
            ViTConfig(**kwargs)


# ---- ActivationCache residual-stream helpers ------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "clip_like", "layer_scale_no_qkv_bias"])
def test_decompose_and_accumulate_add_up(variant):
    cfg = ViTConfig(**RGB, **VARIANTS.get(variant, {}))
    m = _random_model(cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = m.run_with_cache(x)
    acc, labels = cache.accumulated_resid(return_labels=True, incl_mid=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    torch.testing.assert_close(acc[2], cache["blocks.1.hook_resid_pre"])
    assert cache.accumulated_resid(1, return_labels=True)[1] == ["0_pre", "1_pre"]
    for layer in (0, 1, 2):
        parts, names = cache.decompose_resid(layer, return_labels=True)
        target = acc[-1] if layer == 2 else cache[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(parts.sum(0), target, atol=1e-5, rtol=1e-5)
    assert names[-2:] == ["1_attn_out", "1_mlp_out"] and names[0] == "embed"
    # Heads: per layer they add up to the attention output minus its (scaled) bias.
    heads, hl = cache.stack_head_results(return_labels=True)
    assert heads.shape == (8, 2, m.n_tokens, 32) and hl[5] == "L1H1"
    for i, blk in enumerate(m.blocks):
        bias = blk.attn.proj.bias * (blk.ls1.gamma if cfg.layer_scale else 1)
        torch.testing.assert_close(heads[4 * i: 4 * i + 4].sum(0) + bias, cache[f"blocks.{i}.hook_attn_out"], atol=1e-5, rtol=1e-5)
    with_rem = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(with_rem.sum(0), acc[-1], atol=1e-5, rtol=1e-5)
    # Through the final LayerNorm (scale frozen) the components still add up to its output.
    normed = cache.apply_ln_to_stack(cache.decompose_resid(), 2)
    torch.testing.assert_close(normed.sum(0) * m.ln_final.weight + m.ln_final.bias, cache["ln_final.hook_normalized"],
                               atol=1e-4, rtol=1e-4)
    mid = cache.decompose_resid(1, apply_ln=True)
    torch.testing.assert_close(mid.sum(0) * m.blocks[1].ln1.weight + m.blocks[1].ln1.bias,
                               cache["blocks.1.ln1.hook_normalized"], atol=1e-4, rtol=1e-4)


def test_head_results_from_z_when_result_not_cached(model, x):
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, slim = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_z"))
    torch.testing.assert_close(slim.stack_head_results(), full.stack_head_results())
    with pytest.raises(KeyError, match="hook_resid_pre"):
        slim.accumulated_resid()
    with pytest.raises(ValueError, match=r"valid values are 0\.\.2"):
        full.decompose_resid(3)
    with pytest.raises(ValueError, match="fit"):
        full.apply_ln_to_stack(torch.zeros(2, 5, 32), 2)


def test_run_with_cache_moves_cached_tensors_to_device(model, x):
    out, cache = model.run_with_cache(x, names_filter="hook_embed", device="meta")
    assert cache["hook_embed"].device.type == "meta" and out.device.type == "cpu"
