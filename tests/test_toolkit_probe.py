"""Per-layer linear probes beside the class projection (Vilas et al. 2023, §6)."""

import numpy as np
import pytest
import torch

from analysis.evaluation.toolkit.probe import fit_probe, probe_layers
from analysis.models.inputs import to_model_input
from analysis.models.mouse import evaluate_accuracy
from toolkit_models import LAYOUTS, random_model, trained_mouse


pytestmark = pytest.mark.usefixtures("module_one_thread")


def _templated_images(n_per_class: int, n_classes: int = 5, noise: float = 0.05, seed: int = 0):
    """Each class a fixed random image plus a little noise: linearly separable in pixels, hence in
    the (linear) patch embedding."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(n_classes, 3, 32, 32, generator=g)
    labels = torch.arange(n_classes).repeat(n_per_class)
    return templates[labels] + noise * torch.randn(len(labels), 3, 32, 32, generator=g), labels


def test_fit_probe_separates_separable_blobs():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 10, generator=g)
    y = torch.arange(4).repeat(50)
    x = centres[y] + torch.randn(len(y), 10, generator=g) + 100  # an offset the standardisation removes
    probe = fit_probe(x[:120], y[:120], 4)
    assert float((probe.predict(x[120:]) == y[120:]).double().mean()) == 1.0


def test_the_probe_reads_separable_classes_at_the_embeddings():
    model = random_model("mean_fc_norm")  # no class token: "cls" is skipped
    x, y = _templated_images(12)
    split = np.arange(len(y)) < 40
    rows = probe_layers(model, x, y.numpy(), split, layers=[0, 2])
    assert [(r["layer"], r["token"]) for r in rows] == [(0, "patches"), (2, "patches")]
    assert rows[0]["hook"] == "blocks.0.hook_resid_pre" and rows[1]["hook"] == "blocks.1.hook_resid_post"
    assert rows[0]["probe_accuracy"] >= 0.95
    assert rows[0]["n_train"] == 40 and rows[0]["n_eval"] == 20 and rows[0]["chance"] == pytest.approx(0.2)
    for r in rows:
        assert 0 <= r["projection_accuracy"] <= 1


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_probes_and_a_class_token_readout_is_the_model(name):
    model = random_model(name)
    tower = model.tower if hasattr(model, "tower") else model
    x, y = _templated_images(4, n_classes=5, noise=0.5)
    split = np.arange(len(y)) < 12
    rows = probe_layers(model, x, y, split, epochs=20)
    kinds = ["cls", "patches"] if tower.cfg.class_token else ["patches"]
    assert [(r["layer"], r["token"]) for r in rows] == [(lay, k) for lay in range(3) for k in kinds]
    assert all(0 <= r["probe_accuracy"] <= 1 and 0 <= r["projection_accuracy"] <= 1 for r in rows)
    if tower.cfg.pool == "cls":
        with torch.no_grad():
            own = float((model(x[~torch.from_numpy(split)]).argmax(-1) == y[~torch.from_numpy(split)]).double().mean())
        assert rows[-2]["token"] == "cls" and rows[-2]["projection_accuracy"] == pytest.approx(own)


def test_the_same_seed_gives_identical_numbers():
    model = random_model("cls_final")
    x, y = _templated_images(6, noise=1.0, seed=3)
    split = np.arange(len(y)) % 3 != 0
    first = probe_layers(model, x, y, split, epochs=30, seed=4)
    second = probe_layers(model, x, y, split, epochs=30, seed=4)
    assert first == second and len(first) == 3 * 2


def test_on_the_trained_mouse_the_probe_reads_the_class_token_and_the_projection_is_the_model():
    model, data = trained_mouse()
    labels, split = data.labels["label"], data.labels["split"] == "train"
    rows = probe_layers(model, to_model_input(data.images), labels, split)
    for r in rows:
        print(f"mouse layer {r['layer']} {r['token']:>7}: probe {r['probe_accuracy']:.3f}, "
              f"projection {r['projection_accuracy']:.3f}, chance {r['chance']:.3f} (n_eval {r['n_eval']})")
    n = model.cfg.n_layers
    last = next(r for r in rows if (r["layer"], r["token"]) == (n, "cls"))
    assert last["probe_accuracy"] > last["chance"] + 0.15
    assert model.cfg.pool == "cls"
    held = ~split
    assert last["projection_accuracy"] == pytest.approx(evaluate_accuracy(model, data.images[held], labels[held]))
    assert last["n_eval"] == int(held.sum()) and last["n_train"] == int(split.sum())


def test_bad_inputs_are_refused_with_the_fix():
    model = random_model("cls_final")
    x, y = _templated_images(2)
    split = np.arange(10) < 5
    with pytest.raises(ValueError, match=r"labels has shape \(9,\): pass one class id per image \(10,\)"):
        probe_layers(model, x, y[:9], split)
    with pytest.raises(ValueError, match="needs training images"):
        probe_layers(model, x, y, np.zeros(10, dtype=bool))
    with pytest.raises(ValueError, match="keep some"):
        probe_layers(model, x, y, np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="bool array of shape"):
        probe_layers(model, x, y, split.astype(int))
    with pytest.raises(ValueError, match=r"layers contains 3.*0\.\.2"):
        probe_layers(model, x, y, split, layers=[3])
    with pytest.raises(ValueError, match="subset of"):
        probe_layers(model, x, y, split, tokens=("registers",))
    with pytest.raises(ValueError, match="5 classes"):
        probe_layers(model, x, y + 5, split)
    with pytest.raises(ValueError, match="no class token"):
        probe_layers(random_model("mean_fc_norm"), x, y, split, tokens=("cls",))
