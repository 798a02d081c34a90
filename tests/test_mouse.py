import numpy as np
import pytest
import torch

from analysis.models.mouse import MouseTrainConfig, evaluate_accuracy, train_mouse
from analysis.data.shapes import ShapesConfig, generate_shapes
from analysis.models.vit import ViTConfig

TINY_VIT = ViTConfig(image_size=64, patch_size=16, d_model=32, n_layers=1, n_heads=2, d_mlp=64, n_classes=3)
TINY = MouseTrainConfig(vit=TINY_VIT, epochs=3, batch_size=32, lr=3e-3, warmup_steps=10, max_seconds=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from threads, and on a busy 2-core machine
    # oversubscribed torch threads make these runs ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    # 640 training images of the shape task; chance is 1/3.
    return generate_shapes(ShapesConfig(n_images=800, seed=1))


@pytest.fixture(scope="module")
def result(data):
    return train_mouse(data.images, data.labels["label"], data.labels["split"], TINY, progress=False)


def test_trains_above_chance(result, data):
    assert result.eval_accuracy > 0.5, result.history
    assert result.steps == 3 * int(np.ceil((data.labels["split"] == "train").sum() / 32))
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert set(result.history[0]) == {"epoch", "step", "train_loss", "eval_accuracy", "seconds"}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 0.0 <= result.train_accuracy <= 1.0 and result.seconds > 0
    assert not result.model.training


def test_evaluate_accuracy_matches_reported(result, data):
    ev = data.labels["split"] == "eval"
    acc = evaluate_accuracy(result.model, data.images[ev], data.labels["label"][ev], batch_size=37)
    assert acc == pytest.approx(result.eval_accuracy)


def test_deterministic_weights_and_a_tracker_sees_every_step(result, data):
    steps, epochs = [], []
    again = train_mouse(data.images, data.labels["label"], data.labels["split"], TINY, progress=False,
                        on_step=steps.append, on_epoch=epochs.append)
    assert again.model.weights_hash() == result.model.weights_hash()  # reporting changes nothing
    assert again.history[-1]["train_loss"] == result.history[-1]["train_loss"]
    assert epochs == again.history
    assert [r["step"] for r in steps] == list(range(1, again.steps + 1))
    assert set(steps[0]) == {"step", "epoch", "loss", "lr"} and steps[0]["lr"] > 0
    per_epoch = len(steps) // 3
    assert np.mean([r["loss"] for r in steps[:per_epoch]]) == pytest.approx(again.history[0]["train_loss"])


def test_max_seconds_caps_training(data):
    cfg = MouseTrainConfig(vit=TINY_VIT, epochs=50, batch_size=32, max_seconds=0.5)
    with pytest.warns(UserWarning, match="max_seconds"):
        r = train_mouse(data.images, data.labels["label"], data.labels["split"], cfg, progress=False)
    assert r.steps < 50 * 20 and len(r.history) < 50


def test_input_validation(data):
    imgs, labels, split = data.images, data.labels["label"], data.labels["split"]
    with pytest.raises(ValueError, match="n_classes"):
        train_mouse(imgs, labels, split, MouseTrainConfig(vit=ViTConfig(n_classes=2)), progress=False)
    with pytest.raises(ValueError, match="'eval' split is empty"):
        train_mouse(imgs, labels, np.full(len(imgs), "train"), TINY, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        train_mouse(imgs.astype(np.float32), labels, split, TINY, progress=False)
    with pytest.raises(ValueError, match="lr"):
        MouseTrainConfig(lr=0.0)
    assert MouseTrainConfig.from_dict(TINY.to_dict()) == TINY


def test_defaults_are_consistent():
    """ShapesConfig() + MouseTrainConfig() is the default suite: class counts must agree."""
    assert MouseTrainConfig().vit.n_classes == len(ShapesConfig().class_names)
    assert MouseTrainConfig().vit.image_size == 64
