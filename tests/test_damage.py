"""Damaged artifacts are detected, named and redone from their inputs, never reused.

One small suite is run once through the stage functions; each test copies its data root,
damages one thing the way a crash, a full disk or a careless `rm` would, and reruns the stages.
"""

import dataclasses
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from analysis.activations.reader import ActivationStore
from analysis.activations.store_files import shard_keys
from analysis.catalog import read_table
from analysis.data.images import DONE_FILE, open_images
from analysis.integrity import DamagedArtifact, FILE_MODE, sha256_file
from analysis.paths import DataRoot
from analysis.stages.activations import extract
from analysis.stages.dataset import ensure_dataset
from analysis.stages.dictionaries import (EVALUATION_FILE, SUMMARY_FILE, dictionary_id, ensure_dictionary,
                                          ensure_evaluation, load_member)
from analysis.stages.features import ensure_features
from analysis.stages.model import RESULT_FILE, ensure_model, load_tower
from analysis.stages.suite import parse_suite
from analysis.stages.verify import verify_suite
from conftest import materialize_store

SUITE_RAW = {
    "name": "damage",
    "dataset": {"params": {"n_images": 640, "seed": 0}},
    "model": {"vit": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 64},
              "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}},
    "activations": {"hooks": ["blocks.1.hook_resid_post"], "images_per_shard": 256, "images_per_chunk": 64,
                    "batch_size": 128},
    "dictionaries": {"hooks": ["blocks.1.hook_resid_post"], "architectures": ["topk"], "expansions": [2],
                     "ks": [4], "seeds": [0],
                     "train": {"batch_size": 512, "n_train_tokens": 8192, "warmup_steps": 2, "dead_tokens": 4096}},
    "evaluation": {"max_images": 64, "n_top": 2, "batch_images": 64},
}
SUITE = parse_suite(SUITE_RAW)
MEMBER = SUITE.members()[0]
HOOK = SUITE.activations.hooks[0]


def run_all(root: DataRoot) -> None:
    materialize_store(SUITE, root)
    ensure_dictionary(SUITE, root, MEMBER, progress=False)
    ensure_evaluation(SUITE, root, MEMBER)
    ensure_features(SUITE, root, MEMBER)


# What a rerun cannot reproduce byte for byte: wall times (the mouse's per-epoch history, the
# two markers holding training seconds, the toolkit's marker and the dictionaries' lineage table),
# the lock files and DuckDB's own file (the tables are compared by content, wall times aside).
VOLATILE = {RESULT_FILE, SUMMARY_FILE, "mouse_history", "toolkit.done.json", ".locks", "catalog.duckdb",
            "catalog.duckdb.wal"}
VOLATILE_TABLES = {"dictionaries"}


def snapshot(root: DataRoot) -> dict[str, str]:
    """sha256 of every file under the root a rerun must reproduce."""
    files = {p.relative_to(root.root): p for p in sorted(root.root.rglob("*")) if p.is_file()}
    return {str(rel): sha256_file(p) for rel, p in files.items()
            if not VOLATILE & set(rel.parts) and not (rel.parts[0] == "tables" and rel.parts[1] in VOLATILE_TABLES)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = DataRoot(tmp_path_factory.mktemp("clean"))
    run_all(root)
    return root, snapshot(root)


@pytest.fixture
def copy(clean, tmp_path):
    """A private copy of the finished root, and the clean one's file hashes."""
    root, files = clean
    shutil.copytree(root.root, tmp_path / "root")
    return DataRoot(tmp_path / "root"), files


def _store_file(root: DataRoot, array: str, shard: int) -> Path:
    import zarr

    location = root.hook_store(SUITE.store_id, HOOK)
    group = zarr.open_group(str(location), mode="r")
    key = [k for k in shard_keys(group, shard, 256 * shard, min(256 * (shard + 1), 640)) if k.startswith(array)][0]
    return Path(location) / key


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _dict_dir(root: DataRoot) -> Path:
    return root.dictionary(dictionary_id(SUITE, MEMBER))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_store_file_is_refused_by_readers_then_reextracted_identically(copy, damage, caplog):
    root, clean = copy
    path = _store_file(root, "acts", 1)
    path.unlink() if damage == "deleted" else _truncate(path)
    with pytest.raises(DamagedArtifact, match=rf"shard 1, file .*{path.name}.*(missing|truncated)") as err:
        ActivationStore.open(root.hook_store(SUITE.store_id, HOOK))  # never read as zeros
    assert "activations partitions [1]" in str(err.value)
    with pytest.raises(DamagedArtifact):  # nor trained on: a fresh member fails the same way
        ensure_dictionary(SUITE, root, MEMBER, dict_id="fresh-member", progress=False)
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        assert extract(SUITE, root, 0, progress=False)["skipped"]  # an intact shard stays
        assert not extract(SUITE, root, 1, progress=False)["skipped"]
    assert "extracting shard 1 again" in caplog.text and path.name in caplog.text
    assert snapshot(root) == clean


def test_a_truncated_weights_file_is_named_then_retrained_to_the_same_bytes(copy, caplog):
    root, clean = copy
    weights = _dict_dir(root) / "weights.safetensors"
    _truncate(weights)
    with pytest.raises(DamagedArtifact, match=rf"{weights}: 100 bytes, \d+ were written"):
        load_member(SUITE, root, MEMBER)
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        ensure_dictionary(SUITE, root, MEMBER, progress=False)
    assert str(weights) in caplog.text
    ensure_evaluation(SUITE, root, MEMBER)  # same weights: the evaluation stays valid and is reused
    assert snapshot(root) == clean


def test_a_truncated_table_part_is_redone_and_the_catalog_reads(copy, caplog):
    root, clean = copy
    part = root.table("evaluations") / f"dict_id={dictionary_id(SUITE, MEMBER)}" / "part.parquet"
    _truncate(part, keep=len(part.read_bytes()) - 10)
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        row = ensure_evaluation(SUITE, root, MEMBER)
    assert str(part) in caplog.text and "truncated" in caplog.text
    assert read_table(root.table("evaluations")).column("fvu").to_pylist() == [row["fvu"]]
    assert snapshot(root) == clean


def test_deleted_image_chunks_and_model_weights_are_refused_then_rewritten(copy):
    root, clean = copy
    chunk = next(p for p in (root.images(SUITE.dataset_id) / "images.zarr" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    with pytest.raises(DamagedArtifact, match=rf"{chunk}: missing"):
        open_images(root.images(SUITE.dataset_id))
    model_weights = root.model(SUITE.model_id) / "model.safetensors"
    _truncate(model_weights)
    with pytest.raises(DamagedArtifact, match="materialize the model asset again"):
        load_tower(SUITE, root)
    ensure_dataset(SUITE, root, progress=False)
    ensure_model(SUITE, root, progress=False)
    assert snapshot(root) == clean


def test_an_evaluation_of_replaced_weights_is_stale_and_redone(copy, caplog):
    root, _ = copy
    directory = _dict_dir(root)
    first = json.loads((directory / EVALUATION_FILE).read_text())
    # Weights retrained elsewhere (another seed stands in for another thread count): same size,
    # a new train marker vouching for them; the old evaluation scored the old weights.
    other = root.dictionary("other")
    ensure_dictionary(SUITE, root, dataclasses.replace(MEMBER, seed=1), dict_id="other", progress=False)
    for name in ("weights.safetensors", "config.json", SUMMARY_FILE):
        shutil.copy(other / name, directory / name)
    config = json.loads((directory / SUMMARY_FILE).read_text())
    assert config["files"]["weights.safetensors"]["sha256"] != first["files"]["weights.safetensors"]["sha256"]
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        ensure_evaluation(SUITE, root, MEMBER)
    assert "changed since evaluation.json was computed" in caplog.text


def test_a_marker_that_records_no_files_is_not_trusted(copy, caplog):
    root, clean = copy
    marker = root.model(SUITE.model_id) / RESULT_FILE
    legacy = json.loads(marker.read_text())
    legacy.pop("files")
    marker.write_text(json.dumps(legacy))
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        ensure_model(SUITE, root, progress=False)
    assert "records no files" in caplog.text
    assert snapshot(root) == clean


def test_full_verification_finds_a_same_size_change_the_cheap_check_cannot(copy):
    root, clean = copy
    weights = _dict_dir(root) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    store_file = _store_file(root, "acts", 2)
    data = bytearray(store_file.read_bytes())
    data[10] ^= 0xFF
    store_file.write_bytes(bytes(data))
    assert verify_suite(SUITE, root, full=False) == []
    found = verify_suite(SUITE, root, full=True)
    assert {str(d).split(":")[0] for d in found} >= {str(weights)}
    assert any(f"shard 2, file {store_file.relative_to(Path(root.hook_store(SUITE.store_id, HOOK)))}" in str(d)
               for d in found)
    repaired = verify_suite(SUITE, root, full=True, repair=True)
    assert repaired == found
    run_all(root)  # the repair took back the markers: the rerun redoes exactly those artifacts
    assert snapshot(root) == clean
    assert verify_suite(SUITE, root, full=True) == []


def test_every_written_file_has_the_trees_permissions(clean):
    root, _ = clean
    modes = {str(p.relative_to(root.root)): stat.S_IMODE(p.stat().st_mode)
             for p in root.root.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert FILE_MODE == 0o666 & ~_umask()
    assert {p: m for p, m in modes.items() if m != FILE_MODE} == {}
    assert any(p.endswith("weights.safetensors") for p in modes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_dataset_marker_vouches_for_images_and_labels(clean):
    root, _ = clean
    files = json.loads((root.images(SUITE.dataset_id) / DONE_FILE).read_text())["files"]
    assert "labels.parquet" in files and any(k.startswith("images.zarr/") for k in files)
    assert pq.read_metadata(root.images(SUITE.dataset_id) / "labels.parquet").num_rows == 640


def test_the_verify_command_names_damage_repairs_it_and_then_passes(copy, tmp_path, capsys):
    import yaml

    from pipelines.verify import main

    root, clean = copy
    suite = tmp_path / "damage.yaml"
    suite.write_text(yaml.safe_dump(SUITE_RAW))
    args = ["--suite", str(suite), "--root", str(root.root)]
    assert main(args) == 0 and "all intact" in capsys.readouterr().out
    heatmaps = _dict_dir(root) / "heatmaps.npy"
    data = bytearray(heatmaps.read_bytes())
    data[-1] ^= 0xFF
    heatmaps.write_bytes(bytes(data))
    assert main([*args, "--cheap"]) == 0  # same size: only the checksum sees it
    assert main(args) == 1 and f"damaged: {heatmaps}: content changed" in capsys.readouterr().out
    assert main([*args, "--repair"]) == 1
    assert not (_dict_dir(root) / "features.json").exists()
    run_all(root)
    assert main(args) == 0 and snapshot(root) == clean
    assert main(["--suite", str(suite), "--root", str(tmp_path / "nowhere")]) == 2


def test_a_repair_inside_a_dagster_run_is_logged_in_that_run(copy, tmp_path, monkeypatch):
    import dagster as dg

    from pipelines.definitions import build_definitions, default_resources
    from pipelines.run import QUIET_CONSOLE, prepare_dagster_home

    root, clean = copy
    monkeypatch.setenv("DAGSTER_HOME", "")  # prepare_dagster_home points it at the root's own
    prepare_dagster_home(root.root, log=lambda _: None)
    part = root.table("top_images") / f"dict_id={dictionary_id(SUITE, MEMBER)}" / "part.parquet"
    part.unlink()
    job = build_definitions(SUITE, default_resources(str(root.root))).resolve_job_def("dictionary_job")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, partition_key=MEMBER.key, run_config=QUIET_CONSOLE)
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success
    assert any("damaged artifact, redoing it" in m and str(part) in m for m in logs)
    # beside the run's own records, only the pictures the assets put in the UI are new
    ui = ("dagster_home", "reports/training/", "reports/features/")
    assert snapshot(root) == {**clean, **{k: v for k, v in snapshot(root).items() if k.startswith(ui)}}


def test_a_store_of_an_older_format_is_made_again_not_trusted(copy, caplog):
    import zarr

    root, clean = copy
    location = root.hook_store(SUITE.store_id, HOOK)
    group = zarr.open_group(str(location), mode="r+")
    group.attrs["format"] = "spectra.activations/3"  # written before shard files had checksums
    with pytest.raises(ValueError, match="has format 'spectra.activations/3'"):
        ActivationStore.open(location)  # readers refuse it, naming the fix
    with caplog.at_level(logging.WARNING, logger="spectra.integrity"):
        materialize_store(SUITE, root)
    assert "creating it again and extracting every shard" in caplog.text
    assert snapshot(root) == clean


def test_reusing_weights_trained_under_other_thread_counts_says_so(copy, caplog):
    import torch

    root, clean = copy
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING, logger="spectra.machine"):
            summary = ensure_dictionary(SUITE, root, MEMBER, progress=False)
            model = ensure_model(SUITE, root, progress=False)
    finally:
        torch.set_num_threads(threads)
    differs = f"torch_threads {threads} (now {threads + 1})"
    assert summary["machine_differs"] == differs and model["machine_differs"] == differs
    assert caplog.text.count("kept as it is") == 2
    assert snapshot(root) == clean  # reused, not retrained
    assert "machine_differs" not in ensure_dictionary(SUITE, root, MEMBER, progress=False)
