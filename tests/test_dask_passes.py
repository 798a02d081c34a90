"""The store-wide passes on a dask.distributed LocalCluster (2 worker processes) equal the
in-process results: a hook's statistics, a dictionary's FVU, L0, firing counts and largest
activations over the held-out split, and mining in several tasks; the evaluation and features
stages given the scheduler write what they write in process. An unreachable scheduler is one clear
error, before any work."""

import time

import numpy as np
import pytest
import torch
from dask.distributed import Client, LocalCluster

from analysis.activations.reader import ActivationStore, iter_images
from analysis.dictionaries import load_dictionary
from analysis.evaluation.dask_passes import connect, dictionary_pass, mining_pass, store_statistics
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.paths import DataRoot
from analysis.stages.dataset import split_indices
from analysis.stages.dictionaries import dictionary_id, ensure_dictionary
from conftest import materialize_store
from test_damage import HOOK, MEMBER, SUITE
from test_mining import assert_same_mining


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = DataRoot(tmp_path_factory.mktemp("dask"))
    materialize_store(SUITE, root)
    ensure_dictionary(SUITE, root, MEMBER, progress=False)
    return root


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def test_store_statistics_on_the_cluster_equal_the_recomputed_statistics(finished, client):
    location = finished.hook_store(SUITE.store_id, HOOK)
    store = ActivationStore.open(location)
    stats = store_statistics(location)
    x = store.read(0, store.n_images).reshape(-1, store.d_model).double()
    torch.testing.assert_close(torch.from_numpy(stats.mean), x.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(stats.var), x.var(0, unbiased=False), rtol=1e-10, atol=1e-12)
    assert stats.n_tokens == store.stats.n_tokens
    assert stats.mean_norm == pytest.approx(store.stats.mean_norm, rel=1e-12)
    # the extraction streamed the model's float32 outputs, which the store keeps as float16
    assert store.dtype == "float16"
    np.testing.assert_allclose(stats.var, store.stats.var, rtol=2e-4)
    np.testing.assert_allclose(stats.mean, store.stats.mean, rtol=2e-3, atol=1e-5)


def test_a_dictionary_pass_on_the_cluster_equals_the_in_process_metrics(finished, client):
    location = finished.hook_store(SUITE.store_id, HOOK)
    store = ActivationStore.open(location)
    sae = load_dictionary(finished.dictionary(dictionary_id(SUITE, MEMBER)))
    _, held_out = split_indices(finished, SUITE.dataset_id)
    result = dictionary_pass(location, sae, held_out)
    batches = (x.reshape(-1, store.d_model) for _, x in iter_images(store, held_out))
    reference = reconstruction_metrics(sae, batches)
    assert result.n_tokens == reference.n_tokens
    np.testing.assert_array_equal(result.fire_counts, reference.fire_counts)
    assert result.l0 == pytest.approx(reference.l0, rel=1e-12)
    assert result.fvu == pytest.approx(reference.fvu, rel=1e-9)
    assert result.firing_fractions() == (reference.dead_fraction, reference.dense_fraction)
    with torch.no_grad():
        codes = sae.dense_latents(store.read(0, store.n_images)[np.sort(held_out)].reshape(-1, store.d_model))
    np.testing.assert_array_equal(result.max_acts, codes.max(0).values.clamp_min(0).numpy())


def test_an_unreachable_scheduler_is_named_before_any_work():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"dask scheduler 'tcp://127.0.0.1:9' is unreachable"):
        connect("tcp://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 30


def test_the_stages_on_the_cluster_write_what_they_write_in_process(finished, client, tmp_path, monkeypatch):
    """`dask_scheduler=...`: the SAE's dead-latent window (more images than the other metrics read)
    is counted by `dictionary_pass` and its features mined by `mining_pass` on the cluster; the
    evaluations row, density histogram, feature tables and heatmaps equal the in-process ones."""
    import shutil

    import pyarrow.parquet as pq

    import analysis.evaluation.dask_passes as dask_passes
    from analysis.stages.dataset import dead_window_images, evaluation_images
    from analysis.stages.dictionaries import HEATMAPS_FILE, ensure_evaluation
    from analysis.stages.features import FEATURE_TABLES, ensure_features
    from analysis.stages.activations import token_selection
    from analysis.stages.suite import parse_suite
    from test_damage import SUITE_RAW

    spec = parse_suite({**SUITE_RAW, "evaluation": {**SUITE_RAW["evaluation"], "max_images": 16}})
    member = spec.members()[0]
    assert dictionary_id(spec, member) == dictionary_id(SUITE, MEMBER)  # the same dictionary, fewer images scored
    tokens = token_selection(spec).groups.n_tokens
    window = dead_window_images(spec, finished, tokens)
    assert len(window) > len(evaluation_images(spec, finished))  # so the window is a pass of its own
    passes = []
    monkeypatch.setattr(dask_passes, "dictionary_pass",
                        lambda *a, **kw: passes.append(a[2]) or dictionary_pass(*a, **kw))
    rows, histograms, features = {}, {}, {}
    mined = []
    monkeypatch.setattr(dask_passes, "mining_pass", lambda *a, **kw: mined.append(a[2]) or mining_pass(*a, **kw))
    for way, scheduler in (("in process", None), ("dask", client.scheduler.address)):
        root = DataRoot(tmp_path / way.replace(" ", "_"))
        shutil.copytree(finished.root, root.root)
        rows[way] = ensure_evaluation(spec, root, member, dask_scheduler=scheduler)
        histograms[way] = pq.read_table(root.table("density_histogram")).to_pylist()
        ensure_features(spec, root, member, dask_scheduler=scheduler)
        features[way] = {name: pq.read_table(root.table(name)) for name in FEATURE_TABLES}
        features[way]["heatmaps"] = np.load(root.dictionary(dictionary_id(spec, member)) / HEATMAPS_FILE)
    assert len(passes) == 1 and np.array_equal(passes[0], window)  # only the dask way asked the cluster
    wall = {"seconds", "written_at"}
    assert {k: v for k, v in rows["dask"].items() if k not in wall} == \
        {k: v for k, v in rows["in process"].items() if k not in wall}
    assert histograms["dask"] == histograms["in process"]
    assert len(mined) == 1 and np.array_equal(mined[0], evaluation_images(spec, finished))
    np.testing.assert_array_equal(features["dask"].pop("heatmaps"), features["in process"].pop("heatmaps"))
    for name, table in features["in process"].items():
        assert features["dask"][name].equals(table), name
    assert rows["dask"]["n_dead_tokens"] == len(window) * tokens


def test_make_run_names_an_unreachable_scheduler_before_any_work(tmp_path, monkeypatch, capsys):
    from pipelines.run import main

    monkeypatch.setenv("SPECTRA_DASK_SCHEDULER", "tcp://127.0.0.1:9")
    assert main(["--suite", "tests/suites/tiny.yaml", "--root", str(tmp_path / "root")]) == 2
    assert "dask scheduler 'tcp://127.0.0.1:9' is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()  # nothing written


def test_mining_on_the_cluster_in_several_tasks_equals_one_pass(finished, client):
    from analysis.evaluation.mining import mine_features

    location = finished.hook_store(SUITE.store_id, HOOK)
    store = ActivationStore.open(location)
    sae = load_dictionary(finished.dictionary(dictionary_id(SUITE, MEMBER)))
    _, held_out = split_indices(finished, SUITE.dataset_id)
    labels = np.arange(store.n_images) % 5
    kw = dict(n_top=4, n_samples=8, labels=labels, cls=(0, 1), patches=(1, store.n_tokens))
    whole = mine_features(sae, iter_images(store, held_out, images_per_batch=8), **kw)
    parts = mining_pass(location, sae, held_out[::-1], images_per_batch=8, images_per_task=20, **kw)  # 3 batches a task
    assert len(held_out) > 2 * 24  # several tasks
    assert_same_mining(parts, whole)
