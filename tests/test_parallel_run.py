"""The suite through Dagster's multiprocess executor (steps as processes, two partition runs at once,
the device pool) writes exactly the bytes of the one-process run, and the pool held device steps
to one at a time."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from analysis.paths import DataRoot
from analysis.stages.suite import parse_suite
from pipelines.run import Multiprocess, prepare_step_processes, prepare_dagster_home, run_suite
from test_damage import SUITE_RAW, snapshot
from test_faults import catalog_contents

# Two members (so two partition runs overlap), every stage of the graph, seconds per step.
RAW = {**SUITE_RAW, "name": "parallel",
       "dictionaries": {**SUITE_RAW["dictionaries"], "seeds": [0, 1]},
       "toolkit": {"max_images": 32, "probe_images": 64}}
DEVICE_ASSETS = {"model", "activations", "dictionaries", "evaluations", "features", "toolkit"}


def _run(tmp_path, name: str, multiprocess: Multiprocess | None):
    home = tmp_path / f"{name}_home"
    home.mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    root = DataRoot(tmp_path / name)
    run_suite(parse_suite(RAW), root.root, instance=instance, log=lambda _: None, multiprocess=multiprocess)
    return root, instance


@pytest.fixture(autouse=True)
def restored_environment(monkeypatch):
    """The multiprocess path points SPECTRA_SUITE and SPECTRA_ROOT at its suite for the step
    processes; monkeypatch puts back whatever they were before each test."""
    for name in ("SPECTRA_SUITE", "SPECTRA_ROOT"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("suite") / "parallel.yaml"
    path.write_text(yaml.safe_dump(RAW))
    return path


def test_multiprocess_runs_equal_the_in_process_run_byte_for_byte(tmp_path, suite_file, monkeypatch):
    monkeypatch.setenv("SPECTRA_THREADS", "2")  # the step processes and this one compute alike
    sequential, _ = _run(tmp_path, "sequential", None)
    parallel, instance = _run(tmp_path, "parallel", Multiprocess(str(suite_file), runs=2))
    assert snapshot(parallel) == snapshot(sequential)
    assert catalog_contents(parallel) == catalog_contents(sequential)

    runs = instance.get_run_records()
    assert len(runs) == 1 + 3 + 1 + 2 + 1  # prepare, 3 shards, stats, 2 members, report
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # every step ran as its own process, and the device steps held the pool one at a time
    spans, pids = [], set()
    for record in runs:
        events = instance.get_records_for_run(record.dagster_run.run_id).records
        starts = {e.event_log_entry.step_key: e.event_log_entry for e in events
                  if e.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_START}
        ends = {e.event_log_entry.step_key: e.event_log_entry.timestamp for e in events
                if e.event_log_entry.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS}
        for step, start in starts.items():
            pids.add(start.dagster_event.pid)
            if step in DEVICE_ASSETS:
                spans.append((start.timestamp, ends[step], step))
    assert len(pids) > len(runs), "steps must run in their own processes"
    spans.sort()
    assert len(spans) == 1 + 3 + 2 * 3 + 1  # model, shards, members' 3 steps, toolkit
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        assert start >= end, f"{second} started before {first} released the device pool"


def test_a_suite_the_step_processes_cannot_rebuild_is_refused_before_any_run(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("name: other\n")
    with pytest.raises(ValueError, match="does not resolve to the suite being run"):
        _run(tmp_path, "refused", Multiprocess(str(other)))
    assert not (tmp_path / "refused").exists()


def test_a_pool_limit_set_with_dagsters_cli_is_kept(tmp_path, suite_file, monkeypatch):
    home = prepare_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dagster = Path(sys.executable).with_name("dagster")
    subprocess.run([str(dagster), "instance", "concurrency", "set", "gpu", "2"], check=True,
                   env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True)
    messages = []
    with dg.DagsterInstance.get() as instance:
        prepare_step_processes(Multiprocess(str(suite_file)), parse_suite(RAW), tmp_path, instance, messages.append)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2
    assert messages == []


def test_an_unlimited_pool_is_limited_to_one_and_says_so(tmp_path, suite_file, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(prepare_dagster_home(tmp_path)))
    messages = []
    with dg.DagsterInstance.get() as instance:
        prepare_step_processes(Multiprocess(str(suite_file)), parse_suite(RAW), tmp_path, instance, messages.append)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    assert len(messages) == 1 and "limited to 1" in messages[0]


def test_a_step_that_fails_in_its_process_is_reported_here_with_its_error(tmp_path, suite_file):
    (tmp_path / "failing").mkdir()
    blocker = tmp_path / "failing" / "images"
    blocker.write_text("a file where the images directory goes")  # the images step cannot write
    with pytest.raises(RuntimeError, match=r"prepare_job\s+failed: see the Dagster run [0-9a-f-]+\n  images: "
                                           r"(FileExistsError|NotADirectoryError)"):
        _run(tmp_path, "failing", Multiprocess(str(suite_file)))
    assert blocker.read_text() == "a file where the images directory goes"  # nothing written over it
