"""The notebook helpers on a real tiny run: catalog, dictionary by id, feature cards."""

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.catalog import refresh_catalog
from analysis.data.images import open_images
from analysis.stages.notebook import (FeatureCard, dictionary_ids, feature_card, load_dictionary,
                                      open_catalog, top_images_grid)
from analysis.paths import DataRoot
from analysis.stages.dictionaries import dictionary_id, load_member
from test_damage import MEMBER, SUITE, run_all


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> DataRoot:
    root = DataRoot(tmp_path_factory.mktemp("notebook"))
    run_all(root)
    refresh_catalog(root.catalog, root.root / "tables")
    return root


def test_open_catalog_and_load_dictionary_by_id(root):
    dict_id = dictionary_id(SUITE, MEMBER)
    assert dictionary_ids(root) == [dict_id]
    con = open_catalog(root.root)
    width = con.execute("SELECT count(*) FROM feature_stats WHERE dict_id = ?", [dict_id]).fetchone()[0]
    sae = load_dictionary(root.root, dict_id)
    assert width == sae.cfg.width
    ref = load_member(SUITE, root, MEMBER)
    for (name, a), (_, b) in zip(sae.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_card_holds_the_mined_rows_images_and_patch_heatmaps(root, tmp_path):
    dict_id = dictionary_id(SUITE, MEMBER)
    con = open_catalog(root.root)
    feature, fires = con.execute("""SELECT feature, fire_count FROM feature_stats WHERE dict_id = ?
                                    ORDER BY fire_count DESC, feature LIMIT 1""", [dict_id]).fetchone()
    top = con.execute("""SELECT image_idx, activation, token FROM top_images WHERE dict_id = ? AND feature = ?
                         ORDER BY rank""", [dict_id, feature]).fetchall()
    card = feature_card(root.root, dict_id, feature)
    assert isinstance(card, FeatureCard) and card.stats["fire_count"] == fires > 0
    assert card.image_idx.tolist() == [r[0] for r in top]
    np.testing.assert_allclose(card.activations, [r[1] for r in top])
    # the images are the dataset's own pixels
    pixels = open_images(root.images(SUITE.dataset_id))
    assert np.array_equal(card.images, pixels.get_orthogonal_selection((card.image_idx,)))
    # the heatmap's largest patch is the token each image was ranked by (the class token sits at 0)
    heat = np.load(root.dictionary(dict_id) / "heatmaps.npy")[feature]
    rows, cols = card.heatmaps.shape[1:]
    for i, token in enumerate(card.tokens):
        if token >= 1:  # a patch: row-major in the grid after the class token
            assert card.heatmaps[i].reshape(-1)[token - 1] == pytest.approx(float(heat[i, token]), rel=1e-3)
            assert card.heatmaps[i].max() == pytest.approx(card.activations[i], rel=1e-2)
    assert rows * cols == heat.shape[-1] - 1
    path = card.save_png(tmp_path / "card.png")
    with Image.open(path) as png:
        assert png.size[0] == len(card.image_idx) * 128
    assert "data:image/png;base64," in card._repr_html_()
    grid = top_images_grid(root.root, dict_id, [feature, feature], path=tmp_path / "grid.png")
    assert grid.size[1] == 2 * png.size[1]


def test_unknown_ids_and_features_name_the_near_matches(root):
    dict_id = dictionary_id(SUITE, MEMBER)
    with pytest.raises(KeyError, match=f"did you mean \\['{dict_id}'\\]"):
        load_dictionary(root.root, dict_id[:-1] + ("0" if dict_id[-1] != "0" else "1"))
    width = load_dictionary(root.root, dict_id).cfg.width
    with pytest.raises(IndexError, match=f"width {width}: 0..{width - 1}.*nearest first"):
        feature_card(root.root, dict_id, width + 3)
    with pytest.raises(FileNotFoundError, match="no catalog"):
        open_catalog(root.root / "elsewhere")
