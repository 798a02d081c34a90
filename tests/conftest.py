"""Tests run offline, seeded, on the CPU, with wandb off."""

import os
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("SPECTRA_TRACKER", "disabled")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from analysis.stages.activations import materialize_store  # noqa: E402,F401  (tests import it from here)

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny matmuls: threading only adds overhead (and stalls badly on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def module_one_thread():
    """`one_thread` for a whole test module (`pytestmark = pytest.mark.usefixtures("module_one_thread")`),
    so that its module-scoped fixtures, such as a trained model, run on one thread as well."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextmanager
def suite_in_dagster(spec, tmp):
    """The whole graph of `spec` materialized through Dagster under `tmp` (validated first, as
    `make run` does); yields (data root, instance)."""
    import dagster as dg

    from analysis.paths import DataRoot
    from analysis.stages.validate import validate_suite
    from pipelines.run import run_suite

    validate_suite(spec)
    (tmp / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp / "dagster_home"))
    try:
        run_suite(spec, tmp / "data", instance=instance, log=lambda _: None)
        yield DataRoot(tmp / "data"), instance
    finally:
        instance.dispose()


def small_training(batch_size: int, n_train_tokens: int, dead_tokens: int) -> dict:
    """A one-SAE dictionaries section on the last block's residual stream, short enough for tests."""
    return {"hooks": ["blocks.1.hook_resid_post"], "architectures": ["topk"], "expansions": [2], "ks": [8],
            "seeds": [0], "train": {"batch_size": batch_size, "n_train_tokens": n_train_tokens, "warmup_steps": 2,
                                    "dead_tokens": dead_tokens}}
