"""Activation patching: identities that must hold exactly, and sweeps checked against hand-written hooks."""

import pytest
import torch

from analysis.evaluation.toolkit import patching as P
from analysis.models.vit import ViTConfig
from toolkit_models import LAYOUTS, layer_scale_model, random_model


pytestmark = pytest.mark.usefixtures("module_one_thread")


def _setup(name):
    model = random_model(name)
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        labels = model(clean).argmax(-1)
    return model, clean, corrupted, P.true_class_logit(labels)


def _values(model, clean, corrupted, metric):
    with torch.no_grad():
        return metric(model(clean)), metric(model(corrupted))


def _cfg(model):
    return (model.tower if hasattr(model, "tower") else model).cfg


@pytest.mark.parametrize("name", LAYOUTS)
def test_patching_a_whole_residual_stream_restores_the_clean_metric(name):
    model, clean, corrupted, metric = _setup(name)
    cfg = _cfg(model)
    clean_v, corrupted_v = _values(model, clean, corrupted, metric)
    assert abs(float(clean_v - corrupted_v)) > 1e-3  # the pair is distinguishable
    every = list(range(cfg.n_tokens))
    torch.testing.assert_close(P.patch(model, clean, corrupted, P.resid(0, every), metric), clean_v)
    for layer in range(cfg.n_layers):
        for where in P.WHERE:
            got = P.patch(model, clean, corrupted, [P.resid(layer, None, where)], metric)
            torch.testing.assert_close(got, clean_v)


@pytest.mark.parametrize("name", ["cls_final", "clip"])
def test_patching_no_position_leaves_the_corrupted_metric(name):
    model, clean, corrupted, metric = _setup(name)
    _, corrupted_v = _values(model, clean, corrupted, metric)
    for setter in (P.resid(0, []), P.attn_head(1, 2, []), P.mlp_out(0, torch.tensor([], dtype=torch.long)),
                   P.attn_out(1, [])):
        torch.testing.assert_close(P.patch(model, clean, corrupted, setter, metric), corrupted_v)




@pytest.mark.parametrize("name", ["cls_final", "layer_scale", "clip"])
def test_every_head_of_a_layer_together_is_the_attention_output(name):
    # z -> attention output is a fixed per-token map (projection, then any layer scale), so patching
    # every head's z at some tokens must equal patching hook_attn_out at those tokens.
    if name == "layer_scale":
        model = layer_scale_model(0)
        _, clean, corrupted, _ = _setup("cls_final")
        metric = P.logit_diff_metric(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0]))
    else:
        model, clean, corrupted, metric = _setup(name)
    cfg = _cfg(model)
    for layer in range(cfg.n_layers):
        for positions in (None, [0, 3, 7]):
            heads = [P.attn_head(layer, h, positions) for h in range(cfg.n_heads)]
            torch.testing.assert_close(P.patch(model, clean, corrupted, heads, metric),
                                       P.patch(model, clean, corrupted, P.attn_out(layer, positions), metric))


def test_sweeps_have_their_shapes_and_are_one_where_the_patch_is_complete():
    model, clean, corrupted, metric = _setup("cls_final")
    cfg = _cfg(model)
    post = P.sweep_resid(model, clean, corrupted, metric, where="post")
    assert post.shape == (cfg.n_layers, cfg.n_tokens)
    # The head reads only the class token of the last stream: patching it is the whole clean run,
    # patching any other token of that stream changes nothing.
    torch.testing.assert_close(post[-1, 0], torch.tensor(1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(post[-1, 1:], torch.zeros(cfg.n_tokens - 1), atol=1e-4, rtol=0)
    assert P.sweep_heads(model, clean, corrupted, metric).shape == (cfg.n_layers, cfg.n_heads)
    assert P.sweep_mlp(model, clean, corrupted, metric).shape == (cfg.n_layers, cfg.n_tokens)


def _by_hand(model, clean, corrupted, metric, name, index):
    """The patch written out directly: cache the clean activation, overwrite one slice, normalise."""
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=[name])
        source = cache[name]

        def hook(act, *, hook):
            act = act.clone()
            act[index] = source[index]
            return act

        value = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
        clean_v, corrupted_v = metric(clean_logits), metric(model(corrupted))
    return (value - corrupted_v) / (clean_v - corrupted_v)


@pytest.mark.parametrize("name", ["cls_final", "mean_final_registers", "clip"])
def test_a_sweep_cell_is_the_hand_written_patch(name):
    model, clean, corrupted, metric = _setup(name)
    # The random CLIP tower barely sees its input (clean and corrupted metrics differ by ~0.02 on ~48),
    # so float32 rounding, which depends on the batch size, is magnified by the normalisation.
    tol = dict(atol=2e-3 if name == "clip" else 1e-4, rtol=1e-4)
    # max_batch=6 stacks two patched copies of the 3-image batch per forward pass, so replicas of
    # different layers share a pass.
    resid = P.sweep_resid(model, clean, corrupted, metric, where="mid", max_batch=6)
    torch.testing.assert_close(resid[1, 5], _by_hand(model, clean, corrupted, metric, "blocks.1.hook_resid_mid",
                                                     (slice(None), 5)), **tol)
    heads = P.sweep_heads(model, clean, corrupted, metric, max_batch=6)
    torch.testing.assert_close(heads[0, 2], _by_hand(model, clean, corrupted, metric, "blocks.0.attn.hook_z",
                                                     (slice(None), slice(None), 2)), **tol)
    mlp = P.sweep_mlp(model, clean, corrupted, metric)
    torch.testing.assert_close(mlp[0, 3], _by_hand(model, clean, corrupted, metric, "blocks.0.hook_mlp_out",
                                                   (slice(None), 3)), **tol)
    # one forward per setter gives the same table as the stacked passes
    torch.testing.assert_close(P.sweep_mlp(model, clean, corrupted, metric, max_batch=1), mlp, **tol)


def test_metrics_and_normalisation():
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, 3.0]])
    torch.testing.assert_close(P.logit_diff_metric([1, 2], [0, 1])(logits), torch.tensor((4.0 + 4.0) / 2))
    torch.testing.assert_close(P.true_class_logit(torch.tensor([2, 0]))(logits), torch.tensor(1.0))
    torch.testing.assert_close(P.normalised(torch.tensor([2.0, 3.0]), 3.0, 1.0), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="cannot tell the two inputs apart.*choose another"):
        P.normalised(1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="built for 3 images"):
        P.true_class_logit([0, 1, 2])(logits)
    with pytest.raises(ValueError, match="one of each per image"):
        P.logit_diff_metric([0, 1], [1])


def test_bad_setters_are_refused_with_the_range_and_fix():
    model, clean, corrupted, metric = _setup("cls_final")  # 2 layers, 4 heads, 1 + 16 tokens
    cases = [
        (P.resid(2), r"layer=2 out of range.*2 layers, valid 0\.\.1"),
        (P.resid(-1), r"layer=-1 out of range.*valid 0\.\.1"),
        (P.attn_head(0, 4), r"head=4 out of range.*4 attention heads per layer, valid 0\.\.3"),
        (P.mlp_out(0, [3, 17]), r"positions \[17\] out of range.*17 tokens, valid 0\.\.16.*pass token indices"),
    ]
    for setter, message in cases:
        with pytest.raises(ValueError, match=message):
            P.patch(model, clean, corrupted, setter, metric)
    with pytest.raises(ValueError, match="where='out'.*expected one of"):
        P.resid(0, where="out")
    with pytest.raises(ValueError, match="integer token indices"):
        P.attn_out(0, [0.5])
    with pytest.raises(ValueError, match="layer='1'"):
        P.mlp_out("1")
    with pytest.raises(ValueError, match="same shape"):
        P.patch(model, clean, corrupted[:2], P.resid(0), metric)
    with pytest.raises(ValueError, match="cannot tell"):  # identical inputs: no gap to normalise
        P.sweep_heads(model, clean, clean, metric)


def test_token_blocks_cover_every_token_once_within_the_budget():
    from analysis.evaluation.toolkit.patching import token_blocks

    vit_b = ViTConfig(image_size=224, patch_size=16, d_model=64, n_layers=1, n_heads=1, d_mlp=64, n_registers=2)
    groups, labels = token_blocks(vit_b, 64)
    assert len(groups) == len(labels) == 3 + 49 and labels[:4] == ["cls", "reg0", "reg1", "p0+"]
    assert sorted(t for g in groups for t in g) == list(range(vit_b.n_tokens))
    assert {len(g) for g in groups[3:]} == {4}  # 2 x 2 blocks of the 14 x 14 grid
    small, small_labels = token_blocks(random_model("cls_final").cfg, 64)  # 17 tokens: each alone
    assert small == [[t] for t in range(17)] and small_labels[1] == "p0"


def test_a_sweep_over_groups_patches_each_group_together():
    from analysis.evaluation.toolkit.patching import logit_diff_metric, patch, resid, sweep_resid, token_blocks

    model = random_model("cls_final")
    torch.manual_seed(1)
    clean, corrupt = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    metric = logit_diff_metric(torch.tensor([0]), torch.tensor([1]))
    groups, _ = token_blocks(model.cfg, 5)  # 1 + 4 blocks of 2 x 2 patches
    swept = sweep_resid(model, clean, corrupt, metric, positions=groups)
    assert swept.shape == (2, 5)
    with torch.no_grad():
        clean_v, corrupt_v = metric(model(clean)), metric(model(corrupt))
    for layer in range(2):
        for j, group in enumerate(groups):
            value = patch(model, clean, corrupt, resid(layer, group), metric)
            torch.testing.assert_close(swept[layer, j], (value - corrupt_v) / (clean_v - corrupt_v))
