"""Faults with a real SIGKILL in a subprocess, and two processes on one root: a rerun after a
kill, or two runs at once, end on exactly the bytes of one uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.catalog import connect_catalog, refresh_catalog
from analysis.paths import DataRoot
from analysis.stages.dictionaries import ensure_dictionary, ensure_evaluation
from analysis.stages.features import ensure_features
from analysis.stages.suite import parse_suite
from conftest import materialize_store
from test_damage import SUITE_RAW, snapshot

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "fault_worker.py"

# The damage suite with a member long enough to save a resumable state (every 200 steps).
FAULT_SUITE = parse_suite({**SUITE_RAW, "name": "faults", "dictionaries": {
    **SUITE_RAW["dictionaries"],
    "train": {**SUITE_RAW["dictionaries"]["train"], "batch_size": 256, "n_train_tokens": 256 * 320}}})


def run_fault_suite(root: DataRoot) -> None:
    materialize_store(FAULT_SUITE, root)
    for member in FAULT_SUITE.members():
        ensure_dictionary(FAULT_SUITE, root, member, progress=False)
        ensure_evaluation(FAULT_SUITE, root, member)
        ensure_features(FAULT_SUITE, root, member)
    refresh_catalog(root.catalog, root.root / "tables")


def catalog_contents(root: DataRoot) -> dict[str, list]:
    """Every view's rows, sorted: what a rebuilt catalog must equal (DuckDB's file bytes need not)."""
    con = connect_catalog(root.catalog)
    try:
        views = [v for (v,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        # wall times (`seconds`, `train_seconds`, `tokens_per_second`) are compared as columns, not values
        timed = con.execute("SELECT table_name, list(column_name) FROM duckdb_columns() WHERE NOT internal AND "
                            "(column_name LIKE '%seconds' OR column_name LIKE '%per_second') "
                            "GROUP BY table_name").fetchall()
        exclude = {view: ", ".join(f'"{c}"' for c in columns) for view, columns in timed}
        return {v: con.execute(f'SELECT * {f"EXCLUDE ({exclude[v]}) " if v in exclude else ""}FROM "{v}" '
                               "ORDER BY ALL").fetchall() for v in sorted(views)}
    finally:
        con.close()


def _worker(root: Path, kill_point: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKER.parent)])}
    return subprocess.Popen([sys.executable, str(WORKER), str(root), *([kill_point] if kill_point else [])],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted run, in a subprocess like the faulty ones."""
    root = tmp_path_factory.mktemp("clean")
    worker = _worker(root)
    out, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, out
    return snapshot(DataRoot(root)), catalog_contents(DataRoot(root))


@pytest.mark.parametrize("kill_point", ["extraction", "training", "weights_rename", "catalog"])
def test_a_rerun_after_sigkill_equals_an_uninterrupted_run(clean, tmp_path, kill_point):
    files, catalog = clean
    killed = _worker(tmp_path, kill_point)
    out, _ = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, out
    if kill_point == "catalog":  # the kill landed before the end
        assert len(catalog_contents(DataRoot(tmp_path))) < len(catalog)
    else:
        assert snapshot(DataRoot(tmp_path)) != files
    rerun = _worker(tmp_path)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert snapshot(DataRoot(tmp_path)) == files
    assert catalog_contents(DataRoot(tmp_path)) == catalog
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix in (".tmp", ".partial")]
    assert not leftovers, "a killed write's temporary must not outlive the rerun"


def test_two_processes_on_one_root_both_finish_with_the_bytes_of_one(clean, tmp_path):
    workers = [_worker(tmp_path) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    assert (snapshot(DataRoot(tmp_path)), catalog_contents(DataRoot(tmp_path))) == clean
