"""Runs left STARTED by a killed `execute_in_process` owner are marked failed; live ones never are.

Real processes, a real persistent Dagster instance in a tmp dir, a real SIGKILL."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from pipelines.run import prepare_dagster_home
from pipelines.stale_runs import HOST_TAG, PID_START_TAG, PID_TAG, _proc_identity, owner_gone, sweep_dead_runs

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("stale_run_worker.py")


def _start_owner(tmp_path: Path, name: str, home: Path) -> tuple[subprocess.Popen, str, Path]:
    """A worker process holding one STARTED run; returns it, the run id and its release file."""
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(started), str(release)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180  # a bound on a hung start, not a timing assertion
    while not started.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the worker's run did not start in 180 s"
        time.sleep(0.1)
    return proc, started.read_text(), release


def test_killed_owners_run_is_marked_failed_and_a_concurrent_live_run_finishes(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))  # prepare_dagster_home sets it; restored after
    home = prepare_dagster_home(root)
    killed, killed_run, _ = _start_owner(tmp_path, "killed", home)
    live, live_run, release = _start_owner(tmp_path, "live", home)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()

    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.STARTED  # the fault, before
    messages = []
    prepare_dagster_home(root, log=messages.append)  # what the next `pipelines.run` does first

    expected = f"run {killed_run} (hold) was left STARTED by process {killed.pid}, which is no longer running: marked failed"
    assert messages == [f"spectra: {expected}"]
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
        failures = instance.all_logs(killed_run, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert [e.dagster_event.message for e in failures] == [expected]
        assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED  # its owner is alive
        release.touch()
        assert live.wait(timeout=180) == 0, live.stdout.read().decode()[-3000:]
        assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.SUCCESS
        assert sweep_dead_runs(instance, log=messages.append) == []  # nothing left to sweep


def _tags(pid: int, start: str) -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: start}


def test_owner_gone_only_when_verifiable():
    proc = subprocess.Popen(["sleep", "600"])
    try:
        identity = _proc_identity(proc.pid)
        start = identity[1] if identity else ""
        assert owner_gone(_tags(proc.pid, start)) is None  # alive
        assert owner_gone({**_tags(proc.pid, start), HOST_TAG: "another-host"}) is None
        assert owner_gone({}) is None  # a run launched elsewhere (the UI): no owner recorded
        for pid in ("0", "-1", "x"):  # never a process group, never a guess
            assert owner_gone({**_tags(proc.pid, start), PID_TAG: pid}) is None
        if identity:  # Linux: a reused pid is another process
            assert "another process" in owner_gone(_tags(proc.pid, "another-boot:1"))
            os.kill(proc.pid, signal.SIGKILL)
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
            assert owner_gone(_tags(proc.pid, start)) == f"process {proc.pid}, which has exited"
    finally:
        proc.kill()
        proc.wait()
    assert owner_gone(_tags(proc.pid, start)) == f"process {proc.pid}, which is no longer running"
