"""The store-wide passes on a dask.distributed LocalCluster (2 worker processes) equal the
in-process results: a hook's statistics, and a dictionary's FVU, L0, firing counts and largest
activations over the held-out split. An unreachable scheduler is one clear error."""

import time

import numpy as np
import pytest
import torch
from dask.distributed import Client, LocalCluster

from analysis.activations.reader import ActivationStore, iter_images
from analysis.dictionaries import load_dictionary
from analysis.evaluation.dask_passes import connect, dictionary_pass, store_statistics
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.paths import DataRoot
from analysis.stages.dataset import split_indices
from analysis.stages.dictionaries import dictionary_id, ensure_dictionary
from conftest import materialize_store
from test_damage import HOOK, MEMBER, SUITE


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
