"""MLP and attention values read as key–value memories in class space (Vilas et al. 2023)."""

import math

import numpy as np
import pytest
import torch

from analysis.evaluation.toolkit.memories import (attention_value_logits, key_value_agreement, memories_table,
                                                  mlp_value_logits)
from analysis.evaluation.toolkit.readout import Readout
from analysis.models.class_projection import direction_logits
from analysis.models.clip_zero_shot import ZeroShotClassifier
from analysis.models.inputs import to_model_input
from analysis.models.vit import HookedViT, ViTConfig
from toolkit_models import LAYOUTS, SMALL, layer_scale_model, random_model, trained_mouse


pytestmark = pytest.mark.usefixtures("module_one_thread")




MODELS = {**{name: (lambda name=name: random_model(name)) for name in LAYOUTS}, "layer_scale": lambda: layer_scale_model(1)}


def _naive(model, columns: torch.Tensor) -> torch.Tensor:
    """(d, k) columns of a matrix writing into the stream -> (k, C), written out by hand."""
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    out = []
    for j in range(columns.shape[1]):
        v = columns[:, j].clone()
        if tower.cfg.norm in ("final", "fc_norm"):
            norm = tower.ln_final if tower.cfg.norm == "final" else tower.fc_norm
            v = (v - v.mean()) * norm.weight
        v = tower.head.weight @ v
        if isinstance(model, ZeroShotClassifier):
            v = model.head.class_embeddings @ v
        out.append(v)
    return torch.stack(out)


@pytest.mark.parametrize("name", list(MODELS))
def test_value_logits_equal_a_naive_computation(name):
    model = MODELS[name]()
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    h, dh = tower.cfg.n_heads, tower.cfg.d_head
    with torch.no_grad():
        for layer in range(tower.cfg.n_layers):
            block = tower.blocks[layer]
            fc2, proj = block.mlp.fc2.weight, block.attn.proj.weight
            if block.ls2 is not None:
                fc2, proj = fc2 * block.ls2.gamma[:, None], proj * block.ls1.gamma[:, None]
            mlp = mlp_value_logits(model, layer)
            assert mlp.shape == (tower.cfg.d_mlp, Readout(model).n_classes)
            torch.testing.assert_close(mlp, _naive(model, fc2))
            attn = attention_value_logits(model, layer)
            assert attn.shape == (h, dh, Readout(model).n_classes)
            for head in range(h):
                torch.testing.assert_close(attn[head], _naive(model, proj[:, head * dh:(head + 1) * dh]))


def test_a_value_written_along_a_class_direction_promotes_that_class():
    torch.manual_seed(0)
    model = HookedViT(ViTConfig(**SMALL, n_classes=5)).eval()  # final norm weight 1: a clean readout
    with torch.no_grad():
        # orthogonal, zero-mean class rows: the centring keeps a class direction, the head separates it
        a = torch.randn(32, 5)
        q, _ = torch.linalg.qr(a - a.mean(0))  # columns span centred vectors: zero-mean, orthonormal
        model.head.weight.copy_(q.T)
        dirs = Readout(model).residual_directions(torch.arange(5))
        model.blocks[1].mlp.fc2.weight[:, 7] = 3 * dirs[2]
        model.blocks[0].mlp.fc2.weight[:, 0] = dirs[4]
        model.blocks[1].attn.proj.weight[:, 1 * 8 + 3] = dirs[1]  # head 1, column 3 (d_head 8)
    assert int(mlp_value_logits(model, 1)[7].argmax()) == 2
    assert int(mlp_value_logits(model, 0)[0].argmax()) == 4
    assert int(attention_value_logits(model, 1)[1, 3].argmax()) == 1
    table = memories_table(model)
    row = next(r for r in table if (r["layer"], r["kind"], r["memory"]) == (1, "mlp", 7))
    assert row["top_class"] == 2 and row["class_name"] == "2" and row["margin"] > 0 and row["head"] is None
    row = next(r for r in table if (r["layer"], r["kind"], r["head"], r["column"]) == (1, "attn", 1, 3))
    assert row["top_class"] == 1 and row["memory"] == 11


@pytest.mark.parametrize("name", ["cls_final", "mean_fc_norm", "clip"])
def test_memories_table_covers_every_memory(name):
    model = random_model(name)
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    table = memories_table(model)
    per_layer = tower.cfg.d_mlp + tower.cfg.d_model
    assert len(table) == tower.cfg.n_layers * per_layer
    assert all(r["margin"] >= 0 and 0 <= r["top_class"] < Readout(model).n_classes for r in table)
    first = table[0]
    assert first["score"] == pytest.approx(float(mlp_value_logits(model, 0)[0].max()), rel=1e-5)


@pytest.mark.parametrize("name", ["cls_final", "mean_final_registers", "mean_fc_norm", "clip"])
def test_agreement_rows_are_in_range_and_all_memories_give_the_mlp_output(name):
    model = random_model(name)
    tower = model.tower if isinstance(model, ZeroShotClassifier) else model
    x, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    result = key_value_agreement(model, x, labels, 1, top=3, batch_size=4)
    kinds = ["cls", "patches"] if tower.cfg.class_token else ["patches"]
    assert [s["token"] for s in result.summary] == kinds and len(result.rows) == 6 * len(kinds)
    n_classes = Readout(model).n_classes
    for r in result.rows:
        assert 0 <= r["top_class"] < n_classes and 0 <= r["identifiability"] <= 1
        assert r["agrees_prediction"] == (r["top_class"] == r["prediction"])
        assert r["agrees_label"] == (r["top_class"] == r["label"])
    for s in result.summary:
        mine = [r for r in result.rows if r["token"] == s["token"]]
        assert s["agreement_prediction"] == pytest.approx(np.mean([r["agrees_prediction"] for r in mine]))
        assert s["identifiability"] == pytest.approx(np.mean([r["identifiability"] for r in mine]))
    # every memory, weighted by its coefficient, sums to the block's MLP output (bias aside)
    full = key_value_agreement(model, x, labels, 1, top=tower.cfg.d_mlp)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_mlp_out")
        out = cache["blocks.1.hook_mlp_out"] - tower.blocks[1].mlp.fc2.bias
        pooled = out[:, tower.cfg.n_prefix:].mean(1)
        want = direction_logits(model, pooled).argmax(-1)
    got = [r["top_class"] for r in full.rows if r["token"] == "patches"]
    assert got == want.tolist()
    if tower.cfg.class_token:
        with torch.no_grad():
            want = direction_logits(model, out[:, 0]).argmax(-1)
        assert [r["top_class"] for r in full.rows if r["token"] == "cls"] == want.tolist()


def test_agreement_on_the_trained_mouse_at_the_last_layer():
    model, data = trained_mouse()
    eval_ = data.labels["split"] == "eval"
    images, labels = data.images[eval_], data.labels["label"][eval_]
    last = model.cfg.n_layers - 1
    result = key_value_agreement(model, to_model_input(images), labels, last, top=5)
    for s in result.summary:
        print(f"mouse layer {last} {s['token']}: agreement with prediction {s['agreement_prediction']:.3f}, "
              f"with label {s['agreement_label']:.3f}, identifiability {s['identifiability']:.3f}")
        assert s["n_images"] == len(images)
        assert 0 <= s["agreement_prediction"] <= 1 and 0 <= s["agreement_label"] <= 1
        assert 0 <= s["identifiability"] <= 1
    # the uint8 images are converted the same way
    again = key_value_agreement(model, images[:20], labels[:20], last, top=5)
    assert again.rows == [r for r in result.rows if r["image"] < 20]


@pytest.mark.parametrize("layer", [2, -1, 1.0, True])
def test_a_bad_layer_names_the_value_the_range_and_the_fix(layer):
    model = random_model("cls_final")
    for fn in (lambda: mlp_value_logits(model, layer), lambda: attention_value_logits(model, layer),
               lambda: key_value_agreement(model, torch.zeros(1, 3, 32, 32), [0], layer)):
        with pytest.raises(ValueError, match=rf"layer={layer!r}.*0\.\.1.*pass e\.g\. layer=1"):
            fn()


def test_bad_labels_and_top_are_refused():
    model = random_model("cls_final")
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"one class id per image \(2,\)"):
        key_value_agreement(model, x, [0], 0)
    with pytest.raises(ValueError, match="5 classes"):
        key_value_agreement(model, x, [0, 7], 0)
    with pytest.raises(ValueError, match=r"top=0.*1\.\.64"):
        key_value_agreement(model, x, [0, 1], 0, top=0)
    assert math.isfinite(key_value_agreement(model, x, [0, 1], 0).summary[0]["identifiability"])
