"""Tests run offline, seeded, on the CPU, with wandb off."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("SPECTRA_TRACKER", "disabled")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny matmuls: threading only adds overhead (and stalls badly on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def materialize_store(spec, root) -> None:
    """Stages 1–3 of `spec` without Dagster: dataset, mouse model, every shard, statistics."""
    from analysis.stages.activations import ensure_layout, ensure_stats, extract, store_layout
    from analysis.stages.dataset import ensure_dataset
    from analysis.stages.model import ensure_model

    ensure_dataset(spec, root)
    ensure_model(spec, root, progress=False)
    ensure_layout(spec, root)
    for shard in range(store_layout(spec).n_shards):
        extract(spec, root, shard, progress=False)
    ensure_stats(spec, root)
