import numpy as np
import pytest

from analysis.data.shapes import (
    N_ORIENTATIONS,
    N_POSITIONS,
    SHAPES,
    ShapesConfig,
    generate_shapes,
    render_shapes,
)


def _one(shape: int, scale: int = 5, orientation: int = 0, pos: int = 16) -> np.ndarray:
    a = lambda v: np.array([v], dtype=np.int64)  # noqa: E731
    return render_shapes(a(shape), a(scale), a(orientation), a(pos), a(pos))[0, :, :, 0]


def test_deterministic_for_a_seed_and_seed_matters():
    cfg = ShapesConfig(n_images=300, seed=3)
    a, b = generate_shapes(cfg), generate_shapes(cfg)
    np.testing.assert_array_equal(a.images, b.images)
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k])
    c = generate_shapes(ShapesConfig(n_images=300, seed=4))
    assert not np.array_equal(a.images, c.images)


def test_shapes_dtypes_and_binary_pixels():
    d = generate_shapes(ShapesConfig(n_images=50))
    assert d.images.shape == (50, 64, 64, 1) and d.images.dtype == np.uint8
    assert set(np.unique(d.images).tolist()) <= {0, 255}
    assert (d.images.reshape(50, -1).max(1) == 255).all(), "every image shows a sprite"
    assert set(d.labels) == {"label", "shape", "scale", "orientation", "pos_x", "pos_y", "split", "duplicate_of"}
    for k, v in d.labels.items():
        assert len(v) == 50
        if k not in ("split", "duplicate_of"):
            assert v.dtype == np.int64, k
    assert d.class_names == list(SHAPES)


def test_latents_within_allowed_values_and_all_used():
    cfg = ShapesConfig(n_images=2000, scales=(4, 5), orientations=(0, 7, 13))
    d = generate_shapes(cfg)
    assert set(np.unique(d.labels["scale"]).tolist()) == {4, 5}
    assert set(np.unique(d.labels["orientation"]).tolist()) == {0, 7, 13}
    assert set(np.unique(d.labels["shape"]).tolist()) == {0, 1, 2}
    assert d.labels["pos_x"].min() >= 0 and d.labels["pos_x"].max() < N_POSITIONS
    assert d.labels["pos_y"].min() >= 0 and d.labels["pos_y"].max() < N_POSITIONS
    np.testing.assert_array_equal(d.labels["label"], d.labels["shape"])
    all_orient = generate_shapes(ShapesConfig(n_images=2000, orientations=None))
    assert len(np.unique(all_orient.labels["orientation"])) == N_ORIENTATIONS


def test_split_by_image_with_requested_fraction():
    d = generate_shapes(ShapesConfig(n_images=1000, eval_fraction=0.25, split_by="image"))
    split = d.labels["split"]
    assert set(np.unique(split).tolist()) == {"train", "eval"}
    assert (split == "eval").sum() == 250
    # Random per image, not a block at the end.
    assert 0 < (split[:500] == "eval").sum() < 250


def test_split_by_content_holds_out_no_copy_of_a_training_image():
    from analysis.data.images import image_sha256

    cfg = ShapesConfig(n_images=4000, scales=(5,), orientations=(0,))  # few factor combinations: many copies
    shas = np.array([image_sha256(img) for img in generate_shapes(cfg).images])
    by_image = generate_shapes(ShapesConfig(**{**cfg.to_dict(), "split_by": "image"})).labels["split"]
    assert np.isin(shas[by_image == "eval"], shas[by_image == "train"]).sum() > 100  # what it replaces
    d = generate_shapes(cfg)
    split, first = d.labels["split"], d.labels["duplicate_of"].to_pylist()
    assert not np.isin(shas[split == "eval"], shas[split == "train"]).any()
    unique = len(set(shas))
    assert len(set(shas[split == "eval"])) == round(0.2 * unique)  # the fraction is of distinct images
    copies = [i for i, f in enumerate(first) if f is not None]
    assert len(copies) == len(shas) - unique and all(shas[i] == shas[first[i]] for i in copies)
    assert all(split[i] == split[first[i]] for i in copies)


@pytest.mark.parametrize("task,n_classes", [("quadrant", 4), ("shape_quadrant", 12), ("scale", 3)])
def test_other_tasks_label_ranges(task, n_classes):
    d = generate_shapes(ShapesConfig(n_images=600, task=task))
    assert len(d.class_names) == n_classes
    assert set(np.unique(d.labels["label"]).tolist()) == set(range(n_classes))
    if task == "quadrant":
        right = d.labels["pos_x"] >= N_POSITIONS // 2
        np.testing.assert_array_equal(d.labels["label"] % 2, right.astype(np.int64))


def test_shapes_differ_and_scale_grows_pixel_count():
    square, ellipse, heart = (_one(s) for s in range(3))
    assert (square != ellipse).sum() > 30
    assert (square != heart).sum() > 30
    assert (ellipse != heart).sum() > 30
    for s in range(3):
        counts = [int((_one(s, scale=k) > 0).sum()) for k in range(6)]
        assert all(a < b for a, b in zip(counts, counts[1:])), (SHAPES[s], counts)
    # Scale 1 vs 0.5 halves the size, so about 4x the area.
    assert 3.0 < (_one(0, 5) > 0).sum() / (_one(0, 0) > 0).sum() < 5.0


def test_square_rotated_90_degrees_matches_unrotated():
    for pos in (0, 16, 31):
        a, b = _one(0, orientation=0, pos=pos), _one(0, orientation=10, pos=pos)  # 10/40 turn = 90 deg
        assert (a != b).sum() <= 8, "only edge pixels may differ"
        c = _one(0, orientation=5, pos=pos)  # 45 deg: visibly different
        assert (a != c).sum() > 40


def test_heart_is_not_rotation_symmetric():
    assert (_one(2, orientation=0) != _one(2, orientation=20)).sum() > 40  # upside down
    assert (_one(1, orientation=0) != _one(1, orientation=10)).sum() > 40  # ellipse turned


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_images=0), "n_images"),
        (dict(task="colour"), "task"),
        (dict(scales=(6,)), "scales"),
        (dict(scales=()), "scales"),
        (dict(orientations=(40,)), "orientations"),
        (dict(eval_fraction=1.0), "eval_fraction"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kwargs)


def test_config_json_round_trip():
    import json

    cfg = ShapesConfig(n_images=10, scales=(4, 5), orientations=None)
    assert ShapesConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ShapesConfig.from_dict({"colour": 1})
