"""Extraction partitions run at once, each in its own process under Dagster's multiprocess
executor, write exactly the bytes of a sequential run."""

import os
import threading

import dagster as dg
import yaml

from analysis.paths import DataRoot
from analysis.stages.suite import load_suite
from conftest import materialize_store
from pipelines.definitions import build_definitions, default_resources
from test_damage import SUITE_RAW, snapshot


def _stores(root: DataRoot) -> dict[str, str]:
    return {k: v for k, v in snapshot(root).items() if k.startswith("activations/")}


def test_parallel_partitions_in_separate_processes_equal_a_sequential_run(tmp_path, monkeypatch):
    suite = tmp_path / "parallel.yaml"
    suite.write_text(yaml.safe_dump({**SUITE_RAW, "name": "parallel"}))
    spec = load_suite(suite)
    sequential = DataRoot(tmp_path / "sequential")
    materialize_store(spec, sequential)

    monkeypatch.setenv("SPECTRA_SUITE", str(suite))
    monkeypatch.setenv("SPECTRA_ROOT", str(tmp_path / "parallel"))
    monkeypatch.setenv("SPECTRA_THREADS", "2")  # as this process (tests/conftest.py): floats depend on it
    monkeypatch.setenv("SPECTRA_DEVICE", "cpu")
    # step processes rebuild the job from pipelines.definitions, which reads the environment
    job = dg.build_reconstructable_job("pipelines.definitions", "job_named", reconstructable_args=("extract_job",))
    keys = build_definitions(spec, default_resources()).resolve_job_def("extract_job").partitions_def.get_partition_keys()
    assert len(keys) == 3
    (tmp_path / "dagster_home").mkdir()
    with dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home")) as instance:
        defs = build_definitions(spec, default_resources())
        assert defs.resolve_job_def("prepare_job").execute_in_process(instance=instance).success
        results, pids = {}, {}

        def run(key: str) -> None:
            with dg.execute_job(job, instance=instance,
                                tags={"dagster/partition": key}) as result:
                results[key] = result.success
                events = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)
                pids[key] = {e.dagster_event.pid for e in events}

        threads = [threading.Thread(target=run, args=(key,)) for key in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {key: True for key in keys}
        assert defs.resolve_job_def("stats_job").execute_in_process(instance=instance).success
    assert len(set().union(*pids.values()) - {os.getpid()}) == len(keys), "each partition ran in a process of its own"
    assert _stores(DataRoot(tmp_path / "parallel")) == _stores(sequential)
