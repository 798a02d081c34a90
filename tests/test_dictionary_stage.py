"""The dictionary stage without Dagster: a diverging run stops, names the step, keeps its last good state."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import analysis.stages.dictionaries as stage
import analysis.stages.saes as saes
from analysis.activations.loader import ShuffledLoader
from analysis.paths import DataRoot
from analysis.stages.suite import load_suite
from conftest import materialize_store

TINY = Path(__file__).parent / "suites" / "tiny.yaml"


class _PoisonedLoader(ShuffledLoader):
    """Yields NaN activations from batch `poison_at` on (as a corrupted store would)."""

    poison_at = 120

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            yield batch * float("nan") if i >= self.poison_at else batch


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    spec = load_suite(TINY)
    grid = dataclasses.replace(spec.dictionaries, architectures=("topk",), ks=(4,), seeds=(0,),
                               train={"batch_size": 256, "n_train_tokens": 256 * 160, "warmup_steps": 5})
    spec = dataclasses.replace(spec, dictionaries=grid, transcoders=dataclasses.replace(spec.transcoders, pairs=()),
                               crosscoders=dataclasses.replace(spec.crosscoders, hook_groups=()))
    root = DataRoot(tmp_path)
    materialize_store(spec, root)
    (member,) = spec.members()
    monkeypatch.setattr(saes, "ShuffledLoader", _PoisonedLoader)
    monkeypatch.setattr(stage, "CHECKPOINT_EVERY", 50)  # states at steps 50 and 100; NaN from step 119 on

    with pytest.raises(RuntimeError, match=r"b1_resid_post-topk-x4-k4-s0.*not finite at step 1[12]\d.*step 100") as err:
        stage.ensure_dictionary(spec, root, member, progress=False)
    directory = root.dictionary(stage.dictionary_id(spec, member))
    state = directory / "resume" / "state.json"
    assert str(state.parent) in str(err.value)
    assert json.loads(state.read_text())["step"] == 100
    assert not (directory / stage.SUMMARY_FILE).exists(), "a diverged member must not look finished"
    assert not (directory / "weights.safetensors").exists()
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(directory / "resume" / "state.safetensors")).values())
