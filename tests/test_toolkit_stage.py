"""The toolkit stage on a tiny mouse suite: real images, the trained model, catalog tables, PNGs,
reuse, damage, and the Dagster asset."""

import json

import dagster as dg
import numpy as np
import pytest

from analysis.catalog import connect_catalog, refresh_catalog
from analysis.paths import DataRoot
from analysis.stages.dataset import ensure_dataset, split_indices
from analysis.stages.model import ensure_model
from analysis.stages.suite import parse_suite
from analysis.stages.toolkit import MARKER, ensure_toolkit, toolkit_dir
from assets.toolkit import toolkit_asset
from resources import ComputeResource, StorageResource

SUITE = parse_suite({
    "name": "toolkit",
    "dataset": {"params": {"n_images": 600, "seed": 0}},
    "model": {"vit": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 64, "n_registers": 1},
              "train": {"epochs": 3, "batch_size": 64, "warmup_steps": 5}},
    "toolkit": {"max_images": 48, "probe_images": 128},
})


@pytest.fixture(scope="module")
def built(tmp_path_factory, module_one_thread):
    root = DataRoot(tmp_path_factory.mktemp("toolkit"))
    ensure_dataset(SUITE, root, progress=False)
    ensure_model(SUITE, root, progress=False)
    summary = ensure_toolkit(SUITE, root, progress=False)
    return root, summary


def test_every_analysis_writes_a_queryable_table(built):
    root, summary = built
    assert summary["target"] == "label" and summary["n_images"] == 48
    refresh_catalog(root.catalog, root.root / "tables")
    con = connect_catalog(root.catalog)
    try:
        for table, n in summary["rows"].items():
            assert n > 0, table
        rows = con.execute("SELECT layer, token, identifiability, top1, n_tokens FROM toolkit_identifiability "
                           "WHERE toolkit_id = ? ORDER BY layer, token", [summary["toolkit_id"]]).fetchall()
        total = con.execute("SELECT class, sum(mean_contribution) FROM toolkit_attribution GROUP BY class").fetchall()
    finally:
        con.close()
    layers = {r[0] for r in rows}
    assert layers == {0, 1, 2} and {r[1] for r in rows} == {"stream", "cls", "patches"}
    assert all(0 <= r[2] <= 1 and 0 <= r[3] <= 1 for r in rows)
    assert {r[4] for r in rows if r[1] == "patches"} == {48 * 16}
    assert len(total) >= 2
    assert set(summary["plots"]) == {"identifiability", "patch_classes", "attribution", "attention", "patching",
                                     "perturbation"}
    for name, path in summary["plots"].items():
        assert path.endswith(".png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name


def test_a_second_call_reuses_and_a_damaged_plot_is_redone(built):
    root, summary = built
    again = ensure_toolkit(SUITE, root, progress=False)
    assert again == summary  # the marker's summary, seconds included: nothing recomputed
    plot = toolkit_dir(SUITE, root) / "identifiability.png"
    plot.write_bytes(plot.read_bytes()[:100])
    redone = ensure_toolkit(SUITE, root, progress=False)
    assert plot.stat().st_size > 100 and json.loads((toolkit_dir(SUITE, root) / MARKER).read_text())
    for table in summary["rows"]:
        assert redone["rows"][table] == summary["rows"][table]


def test_the_asset_shows_the_plots(built, tmp_path):
    root, summary = built
    result = dg.materialize([toolkit_asset(SUITE)], resources={"storage": StorageResource(root=str(root.root)),
                                                               "compute": ComputeResource(threads=1)},
                            instance=dg.DagsterInstance.ephemeral(), selection=["toolkit"],
                            raise_on_error=True)
    [event] = result.asset_materializations_for_node("toolkit")
    meta = event.metadata
    assert meta["toolkit_id"].value == summary["toolkit_id"]
    assert "data:image/png;base64," in meta["identifiability"].value
    assert set(meta["seconds"].value) == set(summary["seconds"])


def test_the_held_out_split_is_what_the_toolkit_reads(built):
    root, summary = built
    _, eval_idx = split_indices(root, SUITE.dataset_id)
    assert summary["n_images"] == min(48, len(eval_idx))
    assert 0 <= summary["accuracy"] <= 1 and np.isfinite(summary["accuracy"])
