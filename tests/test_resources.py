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


def test_tracked_run_logs_at_each_rows_step_and_adds_config(tmp_path, monkeypatch):
    import wandb

    calls = []

    class FakeRun:
        class config:  # noqa: N801 - wandb's attribute name
            @staticmethod
            def update(values, allow_val_change=False):
                calls.append(("config", values, allow_val_change))

        def log(self, row, step=None):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(("init", kw["config"], kw["job_type"])) or FakeRun())
    with TrackerResource(mode="offline").run("sae-x", {"k": 8}, DataRoot(tmp_path), job_type="sae") as run:
        run({"step": 3, "loss": 0.5})
        run({"loss": 0.25})
        run.update_config({"lineage": {"store_id": "s"}})
    assert calls == [("init", {"k": 8}, "sae"), ("log", {"step": 3, "loss": 0.5}, 3), ("log", {"loss": 0.25}, None),
                     ("config", {"lineage": {"store_id": "s"}}, True), ("finish",)]


def test_storage_activations_url_moves_only_activation_stores(tmp_path):
    from resources import StorageResource

    root = StorageResource(root=str(tmp_path), activations_url="memory://spectra/acts").data_root()
    assert root.hook_store("s", "blocks.0") == "memory://spectra/acts/s/blocks.0.zarr"
    assert root.model("m") == tmp_path.resolve() / "models" / "m"
    default = StorageResource(root=str(tmp_path)).data_root()
    assert default.hook_store("s", "h") == tmp_path.resolve() / "activations" / "s" / "h.zarr"


def test_storage_unknown_url_scheme_fails_early_with_the_fix(tmp_path):
    from resources import StorageResource

    with pytest.raises(ValueError, match=r"no filesystem for 'nosuchfs'.*pip install s3fs"):
        StorageResource(root=str(tmp_path), activations_url="nosuchfs://b/acts").data_root()


def test_definitions_read_the_activations_url_from_the_environment(tmp_path, monkeypatch):
    from pipelines.definitions import default_resources

    monkeypatch.setenv("SPECTRA_ACTIVATIONS_URL", "memory://env/acts")
    storage = default_resources(str(tmp_path))["storage"]
    assert storage.data_root().hook_store("s", "h") == "memory://env/acts/s/h.zarr"
    monkeypatch.delenv("SPECTRA_ACTIVATIONS_URL")
    assert default_resources(str(tmp_path))["storage"].activations_url is None


def test_a_url_carrying_a_password_is_refused_without_repeating_it(tmp_path):
    from resources import StorageResource
    from resources.storage import check_url

    with pytest.raises(ValueError, match="carries a password") as err:
        StorageResource(root=str(tmp_path), activations_url="s3://key:hunter2@bucket/acts").data_root()
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="publish_url: the URL carries a password"):
        check_url("s3://key:hunter2@bucket/out", "publish_url")


def test_make_run_names_an_unusable_publish_url_before_any_work(tmp_path, monkeypatch, capsys):
    from pipelines.run import main

    monkeypatch.setenv("SPECTRA_PUBLISH_URL", "nosuchfs://bucket/results")
    assert main(["--suite", "tests/suites/tiny.yaml", "--root", str(tmp_path / "root")]) == 2
    assert "publish_url='nosuchfs://bucket/results': no filesystem for 'nosuchfs'" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()
