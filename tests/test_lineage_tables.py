"""The lineage tables (datasets, models, activation_stores, dictionaries) of a tiny suite run
through Dagster: typed, joined end to end from every evaluation, true to the files on disk,
unchanged by a rerun that reuses everything or by a second suite sharing the root."""

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import small_training, suite_in_dagster

from analysis.catalog import connect_catalog, read_table
from analysis.ids import code_modified, code_version
from analysis.integrity import sha256_file
from analysis.paths import DataRoot
from analysis.stages.dictionaries import SUMMARY_FILE, dictionary_id
from analysis.stages.lineage import write_lineage_tables
from analysis.stages.suite import parse_suite

TINY = Path(__file__).parent / "suites" / "tiny.yaml"
TABLES = ("datasets", "models", "activation_stores", "dictionaries")
HOOKS = ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
# lr given, so its typed column holds it whatever the default resolves to
TRAIN = {"batch_size": 512, "n_train_tokens": 4096, "warmup_steps": 2, "dead_tokens": 2048, "lr": 1e-3}
# the join a researcher writes: evaluation -> dictionary -> its input hook's store -> model, images
LINEAGE_SQL = """
SELECT e.dict_id, d.kind, d.weights_sha256, d.code_version, d.train_config, d.lr, d.device,
       a.hook, a.dtype, a.tokens_per_image, m.model_id, m.weights_sha256 AS model_sha256, m.d_model,
       ds.dataset_id, ds.content_hash, ds.n_images, ds.class_names
FROM evaluations e
JOIN dictionaries d USING (dict_id)
JOIN activation_stores a ON a.store_id = d.store_id AND a.hook = d.hook
JOIN models m ON m.model_id = a.model_id AND m.weights_hash = d.model_weights_hash
JOIN datasets ds ON ds.dataset_id = a.dataset_id AND ds.content_hash = d.dataset_content_hash
ORDER BY e.dict_id
"""


def _suite(name: str, *, saes_only: bool = False) -> dict:
    """One SAE, one transcoder and one crosscoder over two hooks of the tiny mouse, trained briefly."""
    raw = yaml.safe_load(TINY.read_text())
    others = {"transcoders": {}, "crosscoders": {}} if saes_only else {
        "transcoders": {"pairs": [HOOKS], "expansions": [2], "ks": [4], "skip": [True], "seeds": [0],
                        "train": TRAIN},
        "crosscoders": {"hook_groups": [HOOKS], "architectures": ["topk"], "expansions": [2], "ks": [4],
                        "seeds": [0], "train": TRAIN}}
    return {**raw, "name": name, "dataset": {"params": {"n_images": 320, "seed": 0}},
            "model": {**raw["model"], "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}},
            "activations": {**raw["activations"], "hooks": HOOKS, "images_per_shard": 320},
            "dictionaries": {**small_training(batch_size=512, n_train_tokens=4096, dead_tokens=2048), "train": TRAIN},
            **others, "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 64}}


def _rows(root: DataRoot) -> dict[str, list[dict]]:
    """Every lineage table's rows, in a fixed order."""
    return {name: sorted(read_table(root.table(name)).to_pylist(), key=repr) for name in TABLES}


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """(spec, root, rows after the first run, rows after a second run that reused everything)."""
    from pipelines.run import run_suite

    spec = parse_suite(_suite("lineage"))
    with suite_in_dagster(spec, tmp_path_factory.mktemp("lineage")) as (root, instance):
        first = _rows(root)
        run_suite(spec, root.root, instance=instance, log=lambda _: None)
        yield spec, root, first, _rows(root)


def _query(root: DataRoot, sql: str) -> list[dict]:
    con = connect_catalog(root.catalog)
    try:
        return con.sql(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def test_each_view_exists_with_typed_columns(suite_run):
    _, root, _, _ = suite_run
    expected = {
        "datasets": {"dataset_id": "VARCHAR", "source": "VARCHAR", "n_images": "BIGINT", "n_train": "BIGINT",
                     "n_eval": "BIGINT", "n_duplicates": "BIGINT", "n_rejected": "BIGINT",
                     "content_hash": "VARCHAR", "class_names": "VARCHAR[]", "path": "VARCHAR"},
        "models": {"model_id": "VARCHAR", "kind": "VARCHAR", "dataset_id": "VARCHAR", "weights_sha256": "VARCHAR",
                   "weights_hash": "VARCHAR", "d_model": "BIGINT", "n_layers": "BIGINT", "patch_size": "BIGINT",
                   "image_size": "BIGINT", "eval_accuracy": "DOUBLE", "weights": "VARCHAR", "path": "VARCHAR"},
        "activation_stores": {"store_id": "VARCHAR", "hook": "VARCHAR", "model_id": "VARCHAR",
                              "dataset_id": "VARCHAR", "dtype": "VARCHAR", "tokens": "VARCHAR",
                              "compute_dtype": "VARCHAR", "d_model": "BIGINT", "n_images": "BIGINT",
                              "tokens_per_image": "BIGINT", "patches_sample": "BIGINT", "path": "VARCHAR"},
        "dictionaries": {"dict_id": "VARCHAR", "kind": "VARCHAR", "hook": "VARCHAR", "out_hook": "VARCHAR",
                         "hooks": "VARCHAR[]", "architecture": "VARCHAR", "expansion": "BIGINT", "width": "BIGINT",
                         "k": "BIGINT", "sparsity_coef": "DOUBLE", "seed": "BIGINT", "store_id": "VARCHAR",
                         "model_id": "VARCHAR", "dataset_id": "VARCHAR", "dataset_content_hash": "VARCHAR",
                         "model_weights_hash": "VARCHAR", "code_version": "VARCHAR", "code_modified": "BOOLEAN",
                         "weights_sha256": "VARCHAR", "device": "VARCHAR", "torch_threads": "BIGINT",
                         "torch_version": "VARCHAR", "train_config": "VARCHAR", "lr": "DOUBLE",
                         "warmup_steps": "BIGINT", "n_train_tokens": "BIGINT", "batch_size": "BIGINT",
                         "path": "VARCHAR"},
    }
    for table, columns in expected.items():
        described = {r["column_name"]: r["column_type"] for r in _query(root, f"DESCRIBE {table}")}
        assert {c: described.get(c) for c in columns} == columns, table
        assert "NULL" not in described.values(), (table, described)  # an all-None column kept its type


def test_every_evaluated_dictionary_joins_to_its_store_model_and_images(suite_run):
    spec, root, _, _ = suite_run
    rows = _query(root, LINEAGE_SQL)
    assert sorted(r["dict_id"] for r in rows) == sorted(dictionary_id(spec, m) for m in spec.members())
    assert {r["kind"] for r in rows} == {"sae", "transcoder", "crosscoder"}
    for r in rows:
        assert all(v is not None for v in r.values()), r  # a full lineage row, no gap
        assert (r["model_id"], r["dataset_id"], r["n_images"], r["d_model"]) == \
            (spec.model_id, spec.dataset_id, 320, spec.vit_config().d_model)
        assert r["code_version"] == code_version() and r["device"] == "cpu"
        assert r["class_names"] and r["lr"] == 1e-3 and '"n_train_tokens":4096' in r["train_config"]


def test_dictionary_rows_record_hooks_and_whether_the_code_was_modified(suite_run):
    _, root, _, _ = suite_run
    rows = {r["kind"]: r for r in read_table(root.table("dictionaries")).to_pylist()}
    assert rows["sae"]["hooks"] == ["blocks.1.hook_resid_post"] and rows["sae"]["out_hook"] is None
    assert rows["transcoder"]["hooks"] == HOOKS and rows["transcoder"]["out_hook"] == HOOKS[1]
    assert rows["crosscoder"]["hooks"] == HOOKS and rows["crosscoder"]["hook"] == HOOKS[0]
    assert {r["code_modified"] for r in rows.values()} == {code_modified()}
    stores = read_table(root.table("activation_stores")).to_pylist()
    assert {r["code_modified"] for r in stores} == {code_modified()}
    assert all(r["n_train_tokens"] == 4096 and r["batch_size"] == 512 for r in rows.values())


def test_weights_sha256_is_the_sha256_of_the_weights_on_disk(suite_run):
    _, root, _, _ = suite_run
    for r in read_table(root.table("dictionaries")).to_pylist():
        assert r["weights_sha256"] == sha256_file(root.root / r["path"] / "weights.safetensors"), r["dict_id"]
    [model] = read_table(root.table("models")).to_pylist()
    assert model["weights_sha256"] == sha256_file(root.root / model["path"] / "model.safetensors")


def test_a_rerun_that_reuses_everything_leaves_the_same_rows(suite_run):
    spec, _, first, again = suite_run
    assert again == first
    assert [len(first[t]) for t in TABLES] == [1, 1, len(HOOKS), len(spec.members())]


def test_a_second_suite_sharing_the_root_keeps_every_row_once(suite_run):
    spec, root, first, _ = suite_run
    other = parse_suite(_suite("lineage_saes", saes_only=True))  # its one member is the first suite's SAE
    assert (other.store_id, *(dictionary_id(other, m) for m in other.members())) == \
        (spec.store_id, *(dictionary_id(spec, m) for m in spec.members() if m.kind == "sae"))
    assert write_lineage_tables(other, root) == {"datasets": 1, "models": 1, "activation_stores": 2,
                                                 "dictionaries": 1}
    assert _rows(root) == first  # no suite column: the shared rows are the same rows


def test_a_copied_root_lists_its_own_files_and_not_an_unfinished_dictionary(suite_run, tmp_path):
    spec, root, _, _ = suite_run
    copy = DataRoot(shutil.copytree(root.root, tmp_path / "data"))
    unfinished = dictionary_id(spec, spec.members()[0])
    (copy.dictionary(unfinished) / SUMMARY_FILE).unlink()  # as a killed training leaves it
    written = write_lineage_tables(spec, copy)
    assert written["dictionaries"] == len(spec.members()) - 1
    expected = _rows(root)
    expected["dictionaries"] = [r for r in expected["dictionaries"] if r["dict_id"] != unfinished]
    assert _rows(copy) == expected  # paths are relative to the root: the copy's rows name its own files


def test_code_modified_is_unknown_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git to ask
    assert code_modified.__wrapped__() is None
    assert "+g" not in code_version.__wrapped__()
