import os
import stat

import pytest

from resources.storage import StorageResource


def test_definitions_load_with_every_asset_job_and_schedule():
    from pipelines.definitions import JOB_SELECTIONS, defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"images", "model", "activation_layout", "activations", "activation_stats",
                    "dictionaries", "evaluations", "features", "toolkit", "catalog", "report", "feature_browser",
                    "published"}
    for name in JOB_SELECTIONS:
        assert defs.resolve_job_def(name) is not None
    assert {s.name for s in defs.schedules} == {"nightly_evaluation", "weekly_full"}  # tests/test_automation.py
    assert [s.name for s in defs.sensors] == ["spectra_automation"]
    parts = defs.resolve_assets_def("dictionaries").partitions_def.get_partition_keys()
    assert len(parts) == 16 and "b1_resid_post-topk-x4-k32-s2" in parts  # 4 SAEs x 3 seeds, 3 transcoder seeds, 1 crosscoder
    assert "cc-b0_resid_post+b1_resid_post-topk-x4-k32-s0" in parts
    assert "tc-b1_resid_mid-b1_mlp_out-x4-k32-skip-s0" in parts
    for assets_def in defs.resolve_all_asset_specs():
        assert assets_def.code_version, assets_def.key


def test_the_definitions_import_no_plotting_optimiser_or_model_library():
    """Every Dagster step process and the UI's code server import pipelines.definitions; matplotlib
    (~0.6 s), scipy.optimize (~0.6 s), timm and open_clip are imported by the code that uses them."""
    import subprocess
    import sys

    code = ("import sys, pipelines.definitions; "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'timm', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not bind")
def test_unwritable_root_names_the_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IREAD | stat.S_IEXEC)
    with pytest.raises(PermissionError, match=str(locked)):
        StorageResource(root=str(locked / "data")).data_root()


def test_root_under_a_file_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="SPECTRA_ROOT"):
        StorageResource(root=str(blocker / "data")).data_root()


def test_compute_resource_resolves_a_device():
    from resources.compute import ComputeResource

    assert ComputeResource(device="cpu").apply() == "cpu"
    assert ComputeResource().resolved_device() in ("cpu", "cuda", "mps")


def _run_cli(*args, env=None):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "pipelines.run", *args], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_rejects_bad_input_before_any_work_in_one_line(tmp_path, capsys):
    from pipelines.run import main

    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("name: bad\nactivations:\n  hooks: [blocks.7.hook_resid_post]\n")
    (tmp_path / "file").write_text("not a directory")
    proc = _run_cli("--suite", "nope", "--root", str(tmp_path / "a"))  # the command itself, once
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown suite 'nope'; valid: clip_folder, default, dinov2_parquet" in proc.stderr
    assert "Traceback" not in proc.stderr
    for args, message in [  # the same entry point in this process (each command costs ~8 s of imports)
        (["--suite", str(bad_suite), "--root", str(tmp_path / "b")], "blocks.0.hook_resid_post"),
        (["--root", str(tmp_path / "file" / "data")], str(tmp_path / "file")),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir()), "nothing may be written"
