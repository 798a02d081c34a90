"""A store that keeps a seeded sample of each image's patches, end to end through Dagster: the
stored tokens are the model's at the sampled positions, dictionaries train and splice on it."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pathlib import Path

from analysis.activations.reader import ActivationStore
from analysis.catalog import connect_catalog
from analysis.data.images import open_images
from analysis.models.inputs import to_model_input
from analysis.stages.activations import store_bytes, token_selection
from analysis.stages.model import load_tower
from analysis.stages.suite import load_suite, parse_suite
from conftest import suite_in_dagster

TINY = Path(__file__).parent / "suites" / "tiny.yaml"
HOOK = "blocks.1.hook_resid_post"


def _tiny(**activations):
    raw = yaml.safe_load(TINY.read_text())
    raw["activations"] = {**raw["activations"], **activations}
    raw["transcoders"], raw["crosscoders"] = {}, {}
    raw["dictionaries"] = {**raw["dictionaries"], "architectures": ["topk"], "ks": [4], "seeds": [0]}
    return parse_suite(raw)


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    spec = _tiny(patches_sample=5)
    with suite_in_dagster(spec, tmp_path_factory.mktemp("sampled")) as (root, _):
        yield spec, root


def test_the_store_holds_the_model_tokens_at_each_images_sampled_positions(sampled_run):
    spec, root = sampled_run
    store = ActivationStore.open(root.hook_store(spec.store_id, HOOK))
    assert store.n_tokens == 1 + 1 + 5 and store.token_groups.patches == (2, 7)  # CLS, register, 5 patches
    images = open_images(root.images(spec.dataset_id))
    idx = [0, 319, 320, 799]  # both sides of a shard boundary
    with torch.no_grad():
        _, cache = load_tower(spec, root).run_with_cache(to_model_input(images.get_orthogonal_selection((idx,))),
                                                        names_filter=[HOOK])
    positions = token_selection(spec).positions_for(idx)
    expected = cache[HOOK].gather(1, positions.unsqueeze(-1).expand(-1, -1, cache[HOOK].shape[-1]))
    got = torch.cat([store.read(i, i + 1) for i in idx])
    torch.testing.assert_close(got, expected.half().float())
    assert store.lineage["patches_sample"]["n"] == 5


def test_a_sampled_suite_trains_evaluates_and_costs_less(sampled_run):
    spec, root = sampled_run
    full = _tiny()
    assert full.store_id != spec.store_id
    # an unset sample leaves ids as they were: the default suite's store keeps its id
    default = load_suite(Path(__file__).parents[1] / "pipelines" / "suites" / "default.yaml")
    assert default.store_id == "acts-f8a78b43b392"  # (its dataset changed when shapes split over content)
    assert store_bytes(spec) * 18 == store_bytes(full) * 7  # 7 of the 18 tokens kept
    rows = connect_catalog(root.catalog).execute("SELECT fvu, fvu_patches, loss_recovered FROM evaluations").fetchall()
    assert len(rows) == 1 and all(0 < fvu < 1 and 0 < p < 1 for fvu, p, _ in rows)  # one SAE on one hook


def test_a_one_seed_suite_still_has_empty_stability_and_seed_spread_views(sampled_run):
    spec, root = sampled_run
    assert len({m.seed for m in spec.members()}) == 1
    con = connect_catalog(root.catalog)
    for view in ("stability", "seed_spread"):  # the README queries both
        [(n,)] = con.execute(f"SELECT count(*) FROM {view}").fetchall()
        assert n == 0
    [(kind,)] = con.execute("SELECT data_type FROM duckdb_columns() WHERE table_name = 'seed_spread' "
                            "AND column_name = 'mean'").fetchall()
    assert kind == "DOUBLE"
    con.close()


def test_cards_place_each_images_sampled_patches_on_the_grid(sampled_run):
    """A top image's heatmap holds its stored patch tokens at the grid cells they were sampled
    from, zeros elsewhere: the card and the browser draw them where they are in the image."""
    from analysis.stages.dictionaries import HEATMAPS_FILE, dictionary_id
    from analysis.stages.notebook import feature_card

    spec, root = sampled_run
    dict_id = dictionary_id(spec, spec.members()[0])
    top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}").to_pylist()
    feature = top[0]["feature"]
    card = feature_card(root, dict_id, feature)
    heat = np.load(root.dictionary(dict_id) / HEATMAPS_FILE)[feature]  # (n_top, T) per stored token
    selection = token_selection(spec)
    rows, cols = selection.groups.patch_grid
    for rank, image in enumerate(card.image_idx):
        cells = selection.positions_for([image])[0, 2:].numpy() - selection.patch_start  # CLS, register, 5 patches
        expected = np.zeros(rows * cols, np.float32)
        expected[cells] = heat[rank, 2:]
        np.testing.assert_array_equal(card.heatmaps[rank].reshape(-1), expected)
        assert (card.heatmaps[rank] != 0).sum() <= 5
