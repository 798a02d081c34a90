"""The activation stage with stores at a URL: same bytes and statistics as under the data root."""

import uuid
from pathlib import Path

import fsspec
import numpy as np
import torch

from analysis.activations.reader import ActivationStore
from analysis.paths import DataRoot
from analysis.stages.activations import ensure_layout, ensure_stats, extract, nonfinite_counts
from analysis.stages.dataset import ensure_dataset
from analysis.stages.model import ensure_model
from analysis.stages.suite import load_suite

TINY = Path(__file__).parent / "suites" / "tiny.yaml"


def test_stage_writes_stores_at_the_activations_url(tmp_path):
    spec = load_suite(TINY)
    local = DataRoot(tmp_path)
    prefix = f"/spectra-stage-{uuid.uuid4().hex}"
    remote = DataRoot(tmp_path, activations_url=f"memory://{prefix}/activations")
    ensure_dataset(spec, local)
    ensure_model(spec, local, progress=False)
    try:
        for root in (local, remote):
            summary = ensure_layout(spec, root)
            for shard in range(summary["n_shards"]):
                extract(spec, root, shard, progress=False)
            ensure_stats(spec, root)
            assert nonfinite_counts(spec, root) == {h: 0 for h in spec.activations.hooks}
        assert not (tmp_path / "memory:").exists()
        for hook in spec.activations.hooks:
            where = remote.hook_store(spec.store_id, hook)
            assert where == f"memory://{prefix}/activations/{spec.store_id}/{hook}.zarr"
            a, b = ActivationStore.open(local.hook_store(spec.store_id, hook)), ActivationStore.open(where)
            assert b.lineage == a.lineage and b.lineage["store_id"] == spec.store_id
            torch.testing.assert_close(b.read(0, b.n_images), a.read(0, a.n_images), rtol=0, atol=0)
            for x, y in zip(b.stats, a.stats):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    finally:
        fsspec.filesystem("memory").rm(prefix, recursive=True)
