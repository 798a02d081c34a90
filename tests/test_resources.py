from pathlib import Path

import pytest

from analysis.paths import DataRoot
from resources import TrackerResource


def test_tracker_disabled_is_a_no_op(tmp_path):
    with TrackerResource(mode="disabled").run("x", {"a": 1}, DataRoot(tmp_path)) as log:
        log({"loss": 1.0})
    assert not (tmp_path / "wandb").exists()


def test_tracker_offline_writes_a_local_wandb_run_and_finishes_on_error(tmp_path):
    tracker = TrackerResource(mode="offline", project="spectra-test")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("sae-test", {"k": 8}, DataRoot(tmp_path)) as log:
            log({"loss": 0.5, "step": 1})
            raise RuntimeError("boom")
    runs = list(Path(tmp_path / "wandb").rglob("offline-run-*"))
    assert runs, "wandb offline run folder missing"
    # a second run in the same process works: the first was finished despite the exception
    with tracker.run("sae-test-2", {"k": 8}, DataRoot(tmp_path)) as log:
        log({"loss": 0.25})
    assert len(list(Path(tmp_path / "wandb").rglob("offline-run-*"))) == 2
