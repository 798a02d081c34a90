"""Transcoder training resumes from its saved state to the same weights, and a diverged suite
member keeps its last good state and names the step."""

import json

import numpy as np
import pytest
import torch

from analysis.activations.multi_loader import PairedShuffledLoader
from analysis.dictionaries.training.transcoder import TranscoderTrainConfig, train_transcoder
from test_transcoder import N, make_stores  # two real Zarr stores of the same tokens


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("pair"))


def _run(stores, checkpoint_dir=None, stop_at=None, rows=None, eval_batch=None):
    sa, sb = stores
    loader = PairedShuffledLoader(sa, sb, np.arange(N), batch_size=20, seed=5, buffer_chunks=2)
    init = next(iter(PairedShuffledLoader(sa, sb, np.arange(N), batch_size=20, seed=5, buffer_chunks=2)))

    def on_log(row):
        if rows is not None:
            rows.append(row["step"])
        if row["step"] == stop_at:
            raise _Interrupt

    # 10 batches per epoch, 26 steps: interruption and resume cross epoch boundaries
    cfg = TranscoderTrainConfig(width=12, k=2, skip=True, batch_size=20, n_train_tokens=20 * 26, lr=3e-3, seed=1,
                                warmup_steps=2, dead_tokens=40)  # latents die within the run: AuxK is exercised
    return train_transcoder(loader, cfg, mean_norm_in=float(sa.stats.mean_norm), mean_norm_out=float(sb.stats.mean_norm),
                            init_batch=init, progress=False, log_every=4, on_log=on_log,
                            checkpoint_dir=checkpoint_dir, eval_batch=eval_batch,
                            checkpoint_every=8 if checkpoint_dir else 0)


def test_resume_reaches_identical_weights(stores, tmp_path):
    reference = _run(stores)
    with pytest.raises(_Interrupt):
        _run(stores, tmp_path, stop_at=20)  # the state saved at step 16 survives
    assert json.loads((tmp_path / "resume" / "state.json").read_text())["step"] == 16
    rows = []
    resumed = _run(stores, tmp_path, rows=rows)
    assert rows == [20, 24, 26]  # it went on from step 16
    assert resumed.steps == reference.steps == 26
    ref, got = reference.dictionary.state_dict(), resumed.dictionary.state_dict()
    assert list(ref) == list(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert resumed.log == reference.log
    assert any(r["aux_loss"] > 0 for r in reference.log)  # AuxK acted on latents dead for 40 tokens


def test_resumable_run_needs_the_loader_itself(stores, tmp_path):
    sa, sb = stores
    loader = PairedShuffledLoader(sa, sb, np.arange(N), batch_size=20, seed=5)
    with pytest.raises(ValueError, match="the loader itself"):
        train_transcoder(iter(loader), TranscoderTrainConfig(width=12, k=2, batch_size=20, n_train_tokens=100),
                         mean_norm_in=1.0, mean_norm_out=1.0, init_batch=next(iter(loader)),
                         checkpoint_dir=tmp_path, checkpoint_every=50)


@pytest.mark.parametrize("bad, message", [
    ({"batch_size": 0}, "batch_size=0"),
    ({"n_train_tokens": 10, "batch_size": 20}, "at least one full batch"),
    ({"lr": -1.0}, "lr=-1.0"),
])
def test_train_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        TranscoderTrainConfig(**{"width": 12, "k": 2, **bad})


def test_held_out_fvu_in_the_log_equals_the_metric_at_the_end(stores):
    from analysis.evaluation.metrics import prediction_metrics

    sa, sb = stores
    held_out = (sa.read(0, 10).reshape(-1, sa.d_model), sb.read(0, 10).reshape(-1, sb.d_model))
    res = _run(stores, eval_batch=held_out)
    assert all("eval_fvu" in r for r in res.log) and res.log[-1]["eval_fvu"] < res.log[0]["eval_fvu"]
    fvu = prediction_metrics(res.dictionary, [held_out]).fvu
    assert res.log[-1]["eval_fvu"] == pytest.approx(fvu, rel=1e-3)
