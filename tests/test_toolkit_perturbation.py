"""Attention/context perturbations (Vilas et al. 2023): the masks do exactly what they claim."""

import numpy as np
import pytest
import torch

from analysis.evaluation.toolkit import perturbation as Z
from analysis.models.inputs import to_model_input
from analysis.models.mouse import evaluate_accuracy
from toolkit_models import LAYOUTS, random_model, trained_mouse


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def mouse():
    model, data = trained_mouse()
    eval_ = data.labels["split"] == "eval"
    return model, data.images[eval_], data.labels["label"][eval_]


def _cfg(model):
    return (model.tower if hasattr(model, "tower") else model).cfg


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _patterns(model, x, condition, **kwargs):
    with torch.no_grad():
        _, cache = Z.run_perturbed(model, x, condition, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)
    return [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(_cfg(model).n_layers)]


@pytest.mark.parametrize("name", LAYOUTS)
def test_an_all_object_mask_is_the_unperturbed_model(name):
    model, x = random_model(name), _x()
    mask = torch.ones(3, _cfg(model).grid_size ** 2, dtype=torch.bool)
    with torch.no_grad():
        logits, _ = Z.run_perturbed(model, x, "object_only", object_mask=mask, names_filter=[])
        torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("name", ["cls_final", "mean_final_registers"])
def test_self_only_makes_each_patch_attend_to_itself_and_leaves_the_prefix_alone(name):
    model, x = random_model(name), _x()
    cfg = _cfg(model)
    p, t = cfg.n_prefix, cfg.n_tokens
    normal = _patterns(model, x, "none")
    for pattern in _patterns(model, x, "self_only"):
        torch.testing.assert_close(pattern[:, :, p:], torch.eye(t)[p:].expand_as(pattern[:, :, p:]), rtol=0, atol=0)
    # Layer 0's input is untouched, so its prefix rows are the ordinary attention.
    torch.testing.assert_close(_patterns(model, x, "self_only")[0][:, :, :p], normal[0][:, :, :p])


def test_no_cls_puts_no_attention_from_patches_on_the_class_token():
    model, x = random_model("mean_final_registers"), _x()  # class token + 2 registers
    normal = _patterns(model, x, "none")
    for pattern in _patterns(model, x, "no_cls"):
        assert (pattern[:, :, 3:, 0] == 0).all()
        assert (pattern[:, :, 3:, 1:] > 0).all()  # registers and patches still attended
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    torch.testing.assert_close(_patterns(model, x, "no_cls")[0][:, :, :3], normal[0][:, :, :3])
    # restricted to layer 1, layer 0 is the ordinary one
    only_1 = _patterns(model, x, "no_cls", layers=[1])
    torch.testing.assert_close(only_1[0], normal[0])
    assert (only_1[1][:, :, 3:, 0] == 0).all()


def test_context_conditions_attend_only_to_the_prefix_and_their_patches():
    model, x = random_model("cls_final"), _x(2)
    obj = torch.zeros(2, 16, dtype=torch.bool)
    obj[0, [0, 5]] = True
    obj[1, 9:] = True
    keys = torch.cat([torch.ones(2, 1, dtype=torch.bool), obj], 1)  # class token always allowed
    for condition, allowed in (("object_only", keys), ("background_only", ~keys | (torch.arange(17) == 0))):
        for pattern in _patterns(model, x, condition, object_mask=obj):
            ok = allowed[:, None, None, :].expand_as(pattern)  # every query, every head: same keys
            assert (pattern[~ok] == 0).all() and (pattern[ok] > 0).all()


@pytest.mark.parametrize("name", LAYOUTS)
def test_table_rows_on_every_layout(name):
    model, x = random_model(name), _x(4)
    cfg = _cfg(model)
    masks = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) > 0.5
    masks[:, 0], masks[:, 1] = True, False  # every image has object and background
    rows = Z.perturbation_table(model, x, torch.tensor([0, 1, 2, 3]), object_masks=masks, batch_size=3)
    expected = ["none", *(["no_cls"] if cfg.class_token else []), "self_only", "object_only", "background_only"]
    assert [r["condition"] for r in rows] == expected
    for r in rows:
        assert r["n_images"] == 4
        assert (r["cls_identifiability"] is None) == (not cfg.class_token)


def test_table_on_the_trained_mouse(mouse):
    model, images, labels = mouse
    x = to_model_input(images)
    masks = Z.object_patch_mask(x, model.cfg.patch_size)
    # Shapes are a white sprite on a black background (analysis/data/shapes.py keeps no mask): the
    # object patches are those with a lit pixel; every image has some of each.
    assert masks.any(1).all() and (~masks).any(1).all()
    rows = Z.perturbation_table(model, x, labels, object_masks=masks, batch_size=100)
    assert [r["condition"] for r in rows] == list(Z.CONDITIONS)
    for r in rows:
        assert r["n_images"] == len(images)
        for key in ("accuracy", "identifiability", "cls_identifiability", "patch_identifiability"):
            assert 0.0 <= r[key] <= 1.0, (r, key)
        # the head reads the class token through the final norm: its readout is the output
        assert r["cls_identifiability"] == pytest.approx(r["identifiability"], abs=1e-6)
    none = rows[0]
    assert none["accuracy"] == evaluate_accuracy(model, images, labels, batch_size=100)
    assert none["accuracy"] > 0.6  # trained well above chance (1/3), so the perturbations mean something


def test_object_patch_mask_marks_patches_with_a_non_background_pixel():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 5, 1] = 1.0  # pixel in patch (row 1, col 0) of a 2x2 grid of 4 px patches
    assert Z.object_patch_mask(x, 4).tolist() == [[False, False, True, False]]


def test_bad_inputs_are_refused_with_the_fix():
    model, x = random_model("cls_final"), _x(2)
    with pytest.raises(ValueError, match=r"expected bool \(2, 16\)"):
        Z.run_perturbed(model, x, "object_only", object_mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected bool \(2, 16\)"):
        Z.run_perturbed(model, x, "object_only", object_mask=np.ones((3, 16), dtype=bool))
    with pytest.raises(ValueError, match=r"expected bool"):
        Z.run_perturbed(model, x, "object_only", object_mask=torch.ones(2, 16))
    empty = torch.ones(2, 16, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] have no object patches.*drop those images"):
        Z.run_perturbed(model, x, "object_only", object_mask=empty)
    with pytest.raises(ValueError, match=r"image\(s\) \[0, 1\] have no background patches"):
        Z.perturbation_table(model, x, [0, 1], object_masks=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs object_mask"):
        Z.run_perturbed(model, x, "background_only")
    with pytest.raises(ValueError, match="condition='nope'.*expected one of"):
        Z.run_perturbed(model, x, "nope")
    with pytest.raises(ValueError, match=r"layer 2 out of range.*valid 0\.\.1"):
        Z.run_perturbed(model, x, "self_only", layers=[2])
    with pytest.raises(ValueError, match="needs a class token.*class_token=False"):
        Z.run_perturbed(random_model("mean_fc_norm"), x, "no_cls")
    with pytest.raises(ValueError, match=r"one class id per image \(2,\)"):
        Z.perturbation_table(model, x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels span 0\.\.9 but the head has 5 classes: pass class ids in 0\.\.4"):
        Z.perturbation_table(model, x, [0, 9])
