"""The whole graph, in-process, on the tiny suite: real Zarr, real DuckDB, a real Dagster instance."""

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from analysis.catalog import connect_catalog
from analysis.activations.reader import ActivationStore
from analysis.paths import DataRoot
from analysis.dictionaries import load_dictionary
from analysis.stages.dataset import split_indices
from analysis.evaluation.stability import matched_cosine
from analysis.stages.dictionaries import dictionary_id, load_member
from analysis.stages.suite import load_suite
from pipelines.run import run_suite

TINY = Path(__file__).parent / "suites" / "tiny.yaml"
UNPARTITIONED = ["images", "model", "activation_layout", "activation_stats", "toolkit", "catalog", "report", "feature_browser"]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    spec = load_suite(TINY)
    (tmp / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp / "dagster_home"))
    timings = run_suite(spec, tmp / "data", instance=instance, log=lambda _: None)
    yield spec, DataRoot(tmp / "data"), instance, timings
    instance.dispose()


def _data_versions(instance) -> dict[str, str]:
    out = {}
    for name in UNPARTITIONED:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        out[name] = event.asset_materialization.tags["dagster/data_version"]
    return out


def test_catalog_holds_one_evaluation_per_member_with_real_numbers(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    rows = con.sql("SELECT * FROM evaluations ORDER BY hook, architecture, k").to_arrow_table().to_pylist()
    views = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert {"evaluations", "top_images", "feature_stats", "train_log", "mouse_history", "stability",
            "density_histogram", "feature_factors"} <= views
    expected = sorted((m.hook, m.architecture, m.k, m.sparsity_coef or 0.0) for m in spec.members())
    assert sorted((r["hook"], r["architecture"], r["k"], r["sparsity_coef"] or 0.0) for r in rows) == expected
    assert {"topk", "jumprelu"} <= {r["architecture"] for r in rows}
    assert {r["kind"] for r in rows} == {"sae", "transcoder", "crosscoder"}
    for r in rows:
        assert 0 < r["fvu"] < 1, r
        assert 0 < r["l0"] <= (r["k"] or r["width"])
        assert r["ce_ablated"] > r["ce_clean"], "zero-ablating the residual stream must hurt"
        assert np.isfinite(r["loss_recovered"])
        # the tiny store keeps every token: the class token, one register and the patches
        assert r["fvu_cls"] > 0 and r["fvu_registers"] > 0 and 0 < r["fvu_patches"] < 1, r
    assert (root.reports / "tiny_fvu_vs_l0.png").stat().st_size > 1000


def test_the_feature_browser_shows_every_member_of_every_kind(suite_run):
    """The feature_browser asset linked a page per member; the SAE's, the transcoder's and the
    crosscoder's each open in Chromium with a card of top images under heatmaps."""
    from test_browser import CHROMIUM, NO_CHROMIUM, Rendered

    spec, root, instance, _ = suite_run
    index = root.reports / "browser" / "index.html"
    event = instance.get_latest_materialization_event(dg.AssetKey("feature_browser"))
    assert event.asset_materialization.metadata["path"].path == str(index)
    ids = {m.kind: dictionary_id(spec, m) for m in spec.members()}
    assert all(f'href="{dictionary_id(spec, m)}/index.html"' in index.read_text() for m in spec.members())
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    for kind, dict_id in ids.items():
        top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}").to_pylist()
        feature = max(top, key=lambda r: r["activation"])["feature"]
        shown = Rendered(index.parent / dict_id / "index.html", f"#feature={feature}")
        shown.assert_clean()
        tiles = shown.tiles()
        assert tiles and all(loaded for loaded, _ in tiles), kind
        assert shown.dom.count("<canvas") == len(tiles), kind


def test_the_ui_shows_curves_lineage_previews_links_and_the_summary(suite_run):
    """What each asset puts in front of a researcher in the Dagster UI, read back from the instance."""
    spec, root, instance, _ = suite_run

    def metadata(asset, partition=None):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
            limit=1).records
        return records[0].asset_materialization.metadata

    member = spec.members()[0]
    dict_id = dictionary_id(spec, member)
    trained = metadata("dictionaries", member.key)
    assert trained["lineage"].data["dict_id"] == dict_id and "train_config" in trained["lineage"].data
    assert 0 < trained["final_l0"].value and 0 < trained["final_eval_fvu"].value < 1.5
    assert "data:image/png;base64," in trained["training_curve"].md_str
    assert (root.reports / "training" / f"{dict_id}.png").stat().st_size > 1000
    assert "data:image/png;base64," in metadata("features", member.key)["preview"].md_str
    link = metadata("evaluations", member.key)["feature_browser"].url
    assert link.startswith("file://") and Path(link.removeprefix("file://")).is_file()
    # mining read every decoder direction through the mouse's head (the class-embedding view)
    stats = pq.read_table(root.table("feature_stats") / f"dict_id={dict_id}").to_pylist()
    assert {r["head_top_class"] for r in stats} <= set(spec.class_names()) and all(len(r["head_top3"]) == 3
                                                                                   for r in stats)
    summary = metadata("report")["summary"]
    assert len(summary.records) == len(spec.members())
    assert {"kind", "hook", "l0", "fvu"} <= {c.name for c in summary.schema.columns}


def test_catalog_fvu_equals_fvu_recomputed_from_saved_weights_and_stored_activations(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    _, eval_idx = split_indices(root, spec.dataset_id)
    eval_idx = eval_idx[: spec.evaluation.max_images]

    def read(hook):
        store = ActivationStore.open(root.hook_store(spec.store_id, hook))
        return torch.cat([store.read(i, i + 1) for i in eval_idx]).reshape(-1, store.d_model).double()

    for member in spec.members():
        dict_id = dictionary_id(spec, member)
        (fvu,) = con.execute("SELECT fvu FROM evaluations WHERE dict_id = ?", [dict_id]).fetchone()
        dictionary = load_dictionary(root.dictionary(dict_id))
        x = read(member.hook)
        with torch.no_grad():
            if member.kind == "transcoder":  # FVU of the predicted hook
                x_hat = dictionary(x.float()).y_hat.double()
                x = read(member.out_hook)
            elif member.kind == "crosscoder":  # FVU pooled over all its hooks
                layers = [read(h) for h in member.hooks]
                x_hat = torch.cat(dictionary([a.float() for a in layers]).x_hat, dim=-1).double()
                x = torch.cat(layers, dim=-1)
            else:
                x_hat = dictionary(x.float()).x_hat.double()
        naive = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        if member.kind == "sae":  # per kind of token, each against its own mean: [CLS, register, 16 patches]
            t = len(x) // len(eval_idx)
            assert t == 18
            for column, positions in (("fvu_cls", [0]), ("fvu_registers", [1]), ("fvu_patches", range(2, 18))):
                (got,) = con.execute(f"SELECT {column} FROM evaluations WHERE dict_id = ?", [dict_id]).fetchone()
                rows = torch.cat([torch.arange(p, len(x), t) for p in positions])
                c, c_hat = x[rows], x_hat[rows]
                naive_kind = ((c - c_hat) ** 2).sum() / ((c - c.mean(0)) ** 2).sum()
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), naive_kind, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(fvu, dtype=torch.float64), naive, rtol=1e-4, atol=1e-6)
    con.close()


def test_dead_fraction_counts_the_whole_eval_split_recomputed_from_weights(suite_run):
    spec, root, _, _ = suite_run
    _, eval_idx = split_indices(root, spec.dataset_id)
    assert len(eval_idx) > spec.evaluation.max_images  # the window is more than the FVU's images
    con = connect_catalog(root.catalog)
    for member in [m for m in spec.members() if m.kind == "sae"]:
        dict_id = dictionary_id(spec, member)
        [(dead, dense, n_tokens)] = con.execute("SELECT dead_fraction, dense_fraction, n_dead_tokens FROM evaluations "
                                                "WHERE dict_id = ?", [dict_id]).fetchall()
        store = ActivationStore.open(root.hook_store(spec.store_id, member.hook))
        x = torch.cat([store.read(i, i + 1) for i in eval_idx]).reshape(-1, store.d_model)
        with torch.no_grad():
            fires = (load_dictionary(root.dictionary(dict_id)).dense_latents(x) > 0).sum(0)
        assert n_tokens == len(x) == len(eval_idx) * store.n_tokens
        assert dead == float((fires == 0).double().mean()) and dense == float((fires > 0.1 * len(x)).double().mean())
    con.close()


def test_seed_spread_equals_the_spread_of_the_evaluation_rows(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    spread = con.execute("SELECT hook, architecture, k, n_seeds, mean, std, min, max, dict_ids FROM seed_spread "
                         "WHERE metric = 'fvu'").fetchall()
    n_groups = len({(m.hook, m.architecture, m.k) for m in spec.members() if m.kind == "sae"})
    assert len(spread) == n_groups  # only the SAEs have several seeds in the tiny suite
    for hook, arch, k, n_seeds, mean, std, lo, hi, dict_ids in spread:
        [(fvus,)] = con.execute("SELECT list(fvu) FROM evaluations WHERE list_contains(?, dict_id)", [dict_ids]).fetchall()
        assert n_seeds == len(fvus) == 2
        np.testing.assert_allclose([mean, std, lo, hi], [np.mean(fvus), np.std(fvus, ddof=1), min(fvus), max(fvus)])
    con.close()


def test_top_images_are_held_out_and_ranked(suite_run):
    spec, root, _, _ = suite_run
    _, eval_idx = split_indices(root, spec.dataset_id)
    con = connect_catalog(root.catalog)
    top = con.sql("SELECT dict_id, feature, rank, image_idx, activation FROM top_images "
                      "ORDER BY dict_id, feature, rank").to_arrow_table().to_pylist()
    con.close()
    assert top and {r["image_idx"] for r in top} <= set(eval_idx[: spec.evaluation.max_images].tolist())
    assert max(r["rank"] for r in top) < spec.evaluation.n_top
    for a, b in zip(top, top[1:]):
        if (a["dict_id"], a["feature"]) == (b["dict_id"], b["feature"]):
            assert a["activation"] >= b["activation"]


@pytest.mark.parametrize("asset, check", [("activation_stats", "activations_are_finite"),
                                          ("catalog", "artifacts_match_their_checksums")])
def test_asset_checks_ran_and_passed(suite_run, asset, check):
    _, _, instance, _ = suite_run
    record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey(asset), check))
    assert record is not None and record.evaluation.passed


def test_second_run_reuses_everything_with_the_same_data_versions(suite_run):
    spec, root, instance, _ = suite_run
    before = _data_versions(instance)
    weights = [root.dictionary(dictionary_id(spec, m)) / "weights.safetensors" for m in spec.members()]
    mtimes = [w.stat().st_mtime_ns for w in weights]
    model_mtime = (root.model(spec.model_id) / "model.safetensors").stat().st_mtime_ns
    run_suite(spec, root.root, instance=instance, log=lambda _: None)
    assert _data_versions(instance) == before
    assert [w.stat().st_mtime_ns for w in weights] == mtimes, "nothing may be retrained"
    assert (root.model(spec.model_id) / "model.safetensors").stat().st_mtime_ns == model_mtime


def test_stability_matches_decoders_across_seeds(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    rows = con.sql("SELECT * FROM stability ORDER BY architecture, k").to_arrow_table().to_pylist()
    con.close()
    groups = {(m.architecture, m.k, m.sparsity_coef) for m in spec.members() if m.kind == "sae"}
    assert len(rows) == len(groups) and all(r["n_seeds"] == 2 for r in rows)
    for r in rows:
        saes = [load_dictionary(root.dictionary(d)) for d in r["dict_ids"]]
        assert saes[0].lineage["seed"] != saes[1].lineage["seed"]
        assert 0 < r["mean_matched_cosine"] < 1  # seeds differ, but match far better than chance
        assert abs(r["mean_matched_cosine"] - matched_cosine(saes[0], saes[1]).mean_cosine) < 1e-12


def test_a_dictionary_from_another_store_is_refused_with_both_lineages(suite_run, tmp_path):
    spec, root, _, _ = suite_run
    other = dataclasses.replace(spec, activations=dataclasses.replace(spec.activations, dtype="float32"))
    member = spec.members()[0]
    shutil.copytree(root.dictionary(dictionary_id(spec, member)), root.dictionary(dictionary_id(other, member)))
    with pytest.raises(ValueError, match=f"trained on store '{spec.store_id}'.*reads store '{other.store_id}'"):
        load_member(other, root, member)


def test_density_histogram_counts_every_latent_once(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    rows = con.sql("SELECT e.dict_id, e.width, e.dead_fraction, SUM(h.n_latents) AS total, "
                   "SUM(h.n_latents) FILTER (WHERE h.log10_lo = '-inf'::DOUBLE) AS dead "
                   "FROM evaluations e JOIN density_histogram h USING (dict_id) "
                   "GROUP BY ALL").to_arrow_table().to_pylist()
    con.close()
    assert len(rows) == len(spec.members())
    for r in rows:
        assert r["total"] == r["width"]
        assert r["dead"] == round(r["dead_fraction"] * r["width"])


def test_transcoder_member_is_trained_evaluated_and_mined_with_its_lineage(suite_run):
    spec, root, _, _ = suite_run
    (member,) = [m for m in spec.members() if m.kind == "transcoder"]
    dict_id = dictionary_id(spec, member)
    tc = load_member(spec, root, member)
    assert (tc.lineage["hook"], tc.lineage["out_hook"], tc.lineage["kind"]) == (member.hook, member.out_hook, "transcoder")
    assert tc.W_skip is not None and float(tc.W_skip.detach().abs().sum()) > 0, "the skip path was trained"
    assert tc.lineage["machine"] == {"device": "cpu", "torch_threads": torch.get_num_threads(),
                                     "torch_version": torch.__version__}  # what makes the floats machine-dependent
    con = connect_catalog(root.catalog)
    row = con.sql("SELECT * FROM evaluations WHERE dict_id = $d", params={"d": dict_id}).to_arrow_table().to_pylist()[0]
    n_top = con.execute("SELECT count(*) FROM top_images WHERE dict_id = ?", [dict_id]).fetchone()[0]
    con.close()
    assert row["out_hook"] == member.out_hook and row["skip"] is True
    assert 0 < row["fvu"] < 1 and 0 < row["l0"] <= member.k
    # the tiny mouse barely uses this MLP, so only the bookkeeping is checked here; the splice
    # itself is checked exactly in tests/test_metrics.py
    assert np.isfinite([row["ce_spliced"], row["ce_ablated"], row["kl_spliced"]]).all()
    assert row["ablation_gap"] == pytest.approx(row["ce_ablated"] - row["ce_clean"])
    assert n_top > 0


def test_crosscoder_member_reconstructs_every_hook_and_reports_each_layer(suite_run):
    spec, root, _, _ = suite_run
    (member,) = [m for m in spec.members() if m.kind == "crosscoder"]
    cc = load_member(spec, root, member)
    assert tuple(cc.lineage["hooks"]) == member.hooks and cc.cfg.n_layers == len(member.hooks)
    con = connect_catalog(root.catalog)
    row = con.sql("SELECT * FROM evaluations WHERE dict_id = $d",
                  params={"d": dictionary_id(spec, member)}).to_arrow_table().to_pylist()[0]
    con.close()
    assert row["hooks"] == list(member.hooks) and len(row["fvu_per_layer"]) == len(member.hooks)
    assert 0 < row["fvu"] < 1 and all(0 < f < 1 for f in row["fvu_per_layer"])
    # pooled FVU lies between the per-layer ones (a variance-weighted mean of them)
    assert min(row["fvu_per_layer"]) - 1e-9 <= row["fvu"] <= max(row["fvu_per_layer"]) + 1e-9
    assert row["ce_ablated"] > row["ce_clean"] and np.isfinite(row["loss_recovered"])
    # each layer alone: its own ablation gap and loss recovered
    assert len(row["loss_recovered_per_layer"]) == len(row["ablation_gap_per_layer"]) == len(member.hooks)
    assert all(gap > 0 for gap in row["ablation_gap_per_layer"])
    with pytest.raises(ValueError, match="hooks"):  # another hook group's checkpoint is refused
        other = dataclasses.replace(member, hooks=tuple(reversed(member.hooks)))
        shutil.copytree(root.dictionary(dictionary_id(spec, member)), root.dictionary(dictionary_id(spec, other)))
        load_member(spec, root, other)


def test_every_dictionary_logs_held_out_fvu_while_training(suite_run):
    spec, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    rows = con.sql("SELECT dict_id, step, eval_fvu, eval_l0 FROM train_log ORDER BY dict_id, step").to_arrow_table().to_pylist()
    con.close()
    assert {r["dict_id"] for r in rows} == {dictionary_id(spec, m) for m in spec.members()}
    assert all(r["eval_fvu"] is not None and 0 < r["eval_fvu"] < 2 and r["eval_l0"] > 0 for r in rows), rows


def test_downstream_by_token_kind_equals_a_direct_splice_of_that_kind(suite_run):
    """loss_recovered_cls / _registers / _patches: only that kind's positions spliced and ablated."""
    from analysis.data.images import open_images, read_labels
    from analysis.evaluation.downstream import downstream_metrics
    from analysis.models.inputs import to_model_input
    from analysis.stages.dataset import evaluation_images
    from analysis.stages.model import load_model

    spec, root, _, _ = suite_run
    member = next(m for m in spec.members() if m.kind == "sae")
    dict_id = dictionary_id(spec, member)
    con = connect_catalog(root.catalog)
    row = con.execute("SELECT loss_recovered_cls, ablation_gap_cls, loss_recovered_registers, loss_recovered_patches, "
                      "ablation_gap_patches, ablation_gap FROM evaluations WHERE dict_id = ?", [dict_id]).fetchone()
    con.close()
    eval_idx = evaluation_images(spec, root)
    x = to_model_input(open_images(root.images(spec.dataset_id)).get_orthogonal_selection((eval_idx,)))
    y = torch.from_numpy(read_labels(root.images(spec.dataset_id)).column("label").to_numpy()[eval_idx].copy())
    model, sae = load_model(spec, root), load_member(spec, root, member)
    direct = {kind: downstream_metrics(model, sae, member.hook, [(x, y)], positions=pos)
              for kind, pos in (("cls", [0]), ("registers", [1]), ("patches", range(2, 18)))}
    assert row[0] == pytest.approx(direct["cls"].loss_recovered, rel=1e-6)
    assert row[1] == pytest.approx(direct["cls"].ablation_gap, rel=1e-6)
    # after the last block only the class token reaches the head: the register and the patches have
    # no ablation gap, so no ratio (NULL), and the all-token gap is the class token's
    assert direct["registers"].ablation_gap == 0 and row[2] is None
    assert direct["patches"].ablation_gap == 0 and row[3] is None and row[4] == 0
    assert row[5] == pytest.approx(row[1], rel=1e-9)


def test_no_catalog_column_is_typed_null(suite_run):
    _, root, _, _ = suite_run
    con = connect_catalog(root.catalog)
    views = [v for (v,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
    untyped = {v: [c for c, t, *_ in con.execute(f'DESCRIBE "{v}"').fetchall() if t == '"NULL"' or t == "NULL"]
               for v in views}
    con.close()
    assert "evaluations" in untyped and {v: c for v, c in untyped.items() if c} == {}


def test_the_images_table_joins_top_images_to_their_labels(suite_run):
    spec, root, _, _ = suite_run
    labels = pq.read_table(root.images(spec.dataset_id) / "labels.parquet")
    con = connect_catalog(root.catalog)
    [(n, n_eval)] = con.execute("SELECT count(*), count(*) FILTER (split = 'eval') FROM images "
                                "WHERE dataset_id = ?", [spec.dataset_id]).fetchall()
    assert n == labels.num_rows and n_eval == labels.column("split").to_pylist().count("eval")
    joined = con.execute("SELECT t.image_idx, i.label, i.split FROM top_images t JOIN images i USING (image_idx) "
                         "LIMIT 50").fetchall()
    con.close()
    label = labels.column("label").to_pylist()
    assert joined and all(label[idx] == lab and split == "eval" for idx, lab, split in joined)


def test_feature_factors_count_the_shapes_latents_over_the_images_a_feature_fires_on(suite_run):
    spec, root, _, _ = suite_run
    member = spec.members()[0]
    dict_id = dictionary_id(spec, member)
    con = connect_catalog(root.catalog)
    rows = con.execute("SELECT feature, factor, top_value, top_share, n_images FROM feature_factors "
                       "WHERE dict_id = ? ORDER BY feature, factor", [dict_id]).fetchall()
    con.close()
    assert {r[1] for r in rows} == {"shape", "scale", "orientation", "pos_x", "pos_y"}
    # recomputed from the top images' own labels: a feature whose top images all share a shape
    # reports at least as many images of it as it has top images
    labels = pq.read_table(root.images(spec.dataset_id) / "labels.parquet").column("shape").to_pylist()
    top = pq.read_table(root.table("top_images") / f"dict_id={dict_id}").to_pylist()
    by_feature = {}
    for t in top:
        by_feature.setdefault(t["feature"], []).append(labels[t["image_idx"]])
    shape = {f: (value, share, n) for f, factor, value, share, n in rows if factor == "shape"}
    for f, shapes in by_feature.items():
        assert shape[f][2] >= len(shapes)  # every top image is an image it fires on
        if len(set(shapes)) == 1 and shape[f][1] == 1.0:
            assert shape[f][0] == str(shapes[0])


def test_a_second_suite_on_the_same_store_keeps_the_first_suites_spread_and_stability(suite_run):
    """The frontiers suite shares the default suite's store: writing its (one-seed, empty) spread
    and stability must not replace the default's rows."""
    from analysis.catalog import refresh_catalog
    from analysis.stages.report import write_seed_spread, write_stability

    spec, root, _, _ = suite_run
    one_seed = dataclasses.replace(spec, name="one_seed",
                                   dictionaries=dataclasses.replace(spec.dictionaries, seeds=(0,)))
    assert one_seed.store_id == spec.store_id

    def counts():
        con = connect_catalog(root.catalog)
        try:
            return {t: dict(con.execute(f"SELECT suite, count(*) FROM {t} GROUP BY suite").fetchall())
                    for t in ("seed_spread", "stability")}
        finally:
            con.close()

    before = counts()
    assert before["seed_spread"][spec.name] > 0 and before["stability"][spec.name] > 0
    try:
        assert write_seed_spread(one_seed, root) == 0 and write_stability(one_seed, root) == 0
        refresh_catalog(root.catalog, root.root / "tables")
        assert counts() == before
    finally:
        for table in ("seed_spread", "stability"):
            (root.table(table) / f"store_id={spec.store_id}" / "one_seed.parquet").unlink()
