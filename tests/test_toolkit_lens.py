"""The class-embedding lens and direct logit attribution against the model's own outputs."""

import numpy as np
import pytest
import torch

from analysis.evaluation.toolkit.attribution import direct_logit_attribution, mean_by_class, merge_heads
from analysis.evaluation.toolkit.lens import class_embedding_lens, identifiability_table, patch_class_maps
from analysis.evaluation.toolkit.readout import Readout, identifiability
from analysis.models.inputs import to_model_input
from toolkit_models import LAYOUTS, random_model, trained_mouse


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_lens_at_the_last_layer_is_the_model(name):
    model = random_model(name)
    x = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4])
    lens = class_embedding_lens(model, x, labels, batch_size=2)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(lens.stream_r[-1], identifiability(logits, labels))
    assert torch.equal(lens.stream_top[-1], logits.argmax(-1))
    tower = model.tower if name == "clip" else model
    if tower.cfg.pool == "cls":  # the class token read alone is what the head reads
        torch.testing.assert_close(lens.cls_r[-1], identifiability(logits, labels))
    assert lens.patch_r.shape == (tower.cfg.n_layers + 1, 5, tower.cfg.grid_size ** 2)
    assert (lens.cls_r is None) == (not tower.cfg.class_token)


def test_every_patch_is_read_alone_through_norm_and_head():
    model = random_model("cls_final")
    x = torch.randn(2, 3, 32, 32)
    lens = class_embedding_lens(model, x, [1, 3])
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
        resid = cache["blocks.0.hook_resid_post"][:, 1:]  # layer 1: the stream after one block
        naive = model.head(torch.nn.functional.layer_norm(resid, (32,), model.ln_final.weight, model.ln_final.bias,
                                                          model.cfg.ln_eps))
    torch.testing.assert_close(lens.patch_r[1], identifiability(naive, torch.tensor([1, 3])[:, None]))
    top, r = patch_class_maps(lens, 1)
    assert top.shape == (2, 4, 4) and torch.equal(top.flatten(1), naive.argmax(-1))
    with pytest.raises(ValueError, match="0..2"):
        patch_class_maps(lens, 3)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("heads", [False, True])
def test_attributions_sum_to_the_logit(name, heads):
    model = random_model(name)
    x = torch.randn(4, 3, 32, 32)
    n_classes = Readout(model).n_classes
    target, versus = torch.tensor([0, 1, 2, 3]) % n_classes, torch.tensor([4, 4, 0, 1]) % n_classes
    attr = direct_logit_attribution(model, x, target, versus, heads=heads, batch_size=3)
    with torch.no_grad():
        logits = model(x)
    expected = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, versus[:, None]).squeeze(1)
    torch.testing.assert_close(attr.target, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attr.contributions.sum(0) + attr.constant, expected, rtol=1e-4, atol=1e-4)
    tower = model.tower if name == "clip" else model
    n_embed = 1 if tower.cfg.ln_pre else 2
    per_layer = tower.cfg.n_heads + 2 if heads else 2
    assert len(attr.components) == n_embed + tower.cfg.n_layers * per_layer == len(attr.contributions)
    assert ("L1H3" in attr.components) == heads and ("L1_mlp" in attr.components)


def test_head_attributions_split_their_layer_exactly():
    model = random_model("cls_final")
    x = torch.randn(3, 3, 32, 32)
    whole = direct_logit_attribution(model, x, 2)
    split = direct_logit_attribution(model, x, 2, heads=True)
    merged = merge_heads(split)
    assert merged.components == whole.components
    torch.testing.assert_close(merged.contributions, whole.contributions, rtol=1e-4, atol=1e-5)
    for layer in range(2):
        mine = [i for i, c in enumerate(split.components) if c.startswith(f"L{layer}H") or c == f"L{layer}_attn_bias"]
        torch.testing.assert_close(split.contributions[mine].sum(0),
                                   whole.contributions[whole.components.index(f"L{layer}_attn")], rtol=1e-4, atol=1e-5)


def test_bad_classes_say_what_to_pass():
    model = random_model("cls_final")
    with pytest.raises(ValueError, match="0..4"):
        direct_logit_attribution(model, torch.randn(2, 3, 32, 32), [0, 7])
    with pytest.raises(ValueError, match="one class id per image"):
        class_embedding_lens(model, torch.randn(2, 3, 32, 32), [0, 1, 2])


def test_the_trained_mouse_identifies_classes_late_and_attributes_its_logits():
    model, data = trained_mouse()
    ev = np.flatnonzero(data.labels["split"] == "eval")[:128]
    x, y = to_model_input(data.images[ev]), data.labels["label"][ev]
    lens = class_embedding_lens(model, x, y)
    rows = {(r["layer"], r["token"]): r for r in identifiability_table(lens, y)}
    last = model.cfg.n_layers
    # the class token at layer 0 is the same learned vector for every image: it cannot know the class
    first = lens.cls_top[0]
    assert bool((first == first[0]).all())
    assert rows[(0, "cls")]["top1"] == pytest.approx(float(np.mean(y == int(first[0]))))
    assert rows[(last, "cls")]["identifiability"] > 0.75 and rows[(last, "stream")]["top1"] > 0.6
    attr = direct_logit_attribution(model, x, y)
    by_class = mean_by_class(attr, y, [0, 1, 2])
    assert all(v.shape == (len(attr.components),) for v in by_class.values())
