"""Checkpoint and resume: an interrupted run continues to the same weights bit for bit."""

import numpy as np
import pytest
import torch

from analysis.activations.reader import ActivationStore
from analysis.activations.loader import ShuffledLoader
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae
from test_loader import N, make_store  # the loader tests' real Zarr store


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ActivationStore.open(make_store(tmp_path_factory.mktemp("store")))


def _run(store, arch, checkpoint_dir=None, stop_at=None, rows=None):
    kw = dict(k=2) if arch in ("topk", "batchtopk") else dict(k=None)
    # 10 batches per epoch, 34 steps: the interruption and the resume cross epoch boundaries
    cfg = SAETrainConfig(width=24, architecture=arch, batch_size=50, n_train_tokens=50 * 34, lr=3e-3,
                         warmup_steps=3, dead_tokens=150, aux_k=3, **kw)
    loader = ShuffledLoader(store, np.arange(N), batch_size=50, seed=3, buffer_chunks=2)
    init_batch = next(iter(loader))

    def on_log(row):
        if rows is not None:
            rows.append(row["step"])
        if row["step"] == stop_at:
            raise _Interrupt

    return train_sae(loader, store.d_model, cfg, mean_norm=float(store.stats.mean_norm), init_batch=init_batch,
                     progress=False, log_every=4, on_log=on_log, checkpoint_dir=checkpoint_dir,
                     checkpoint_every=8 if checkpoint_dir else 0)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_resume_reaches_identical_weights(store, arch, tmp_path):
    reference = _run(store, arch)
    with pytest.raises(_Interrupt):
        _run(store, arch, tmp_path, stop_at=20)  # the state saved at step 16 survives
    assert (tmp_path / "resume" / "state.json").exists()
    rows = []
    resumed = _run(store, arch, tmp_path, rows=rows)
    assert rows == [20, 24, 28, 32, 34]  # it went on from step 16, it did not start over
    assert resumed.steps == reference.steps == 34
    ref_sd, got_sd = reference.dictionary.state_dict(), resumed.dictionary.state_dict()
    assert list(ref_sd) == list(got_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], got_sd[name]), name
    assert resumed.log == reference.log


def test_resumable_run_needs_the_loader_itself(store, tmp_path):
    cfg = SAETrainConfig(width=24, k=2, batch_size=50, n_train_tokens=500)
    loader = ShuffledLoader(store, np.arange(N), batch_size=50, seed=3)
    init = next(iter(loader))
    common = dict(mean_norm=1.0, init_batch=init, progress=False, log_every=4)
    with pytest.raises(ValueError, match="state\\(\\)/load_state\\(\\)"):
        train_sae(iter(loader), store.d_model, cfg, checkpoint_dir=tmp_path, checkpoint_every=8, **common)
    with pytest.raises(ValueError, match="checkpoint_every=6 must be a positive multiple of log_every=4"):
        train_sae(loader, store.d_model, cfg, checkpoint_dir=tmp_path, checkpoint_every=6, **common)
    other = ShuffledLoader(store, np.arange(N), batch_size=25, seed=3)
    with pytest.raises(ValueError, match="batch_size=25 != cfg.batch_size=50"):
        train_sae(other, store.d_model, cfg, checkpoint_dir=tmp_path, checkpoint_every=8, **common)
