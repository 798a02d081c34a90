"""Runs left unfinished by a process that died: found and marked failed before the next run starts.

`pipelines.run` orchestrates every run from a process of its own (itself, or a worker of its pool
for partition runs in flight together) against the persistent instance under the data root, with
`execute_in_process` or `execute_job`: killed (SIGKILL, out of memory, a lost terminal), that
process leaves the run STARTED forever. Dagster's run monitoring cannot see this: it
asks the run launcher for the worker's health, and the default launcher cannot answer (nor did it
launch these runs). So each run carries its owner as tags (host, pid and, on Linux, the pid's
boot and start time), and the sweep fails only runs whose owner is verifiably gone: on this host,
and the pid no longer running, a zombie, or now another process. A concurrent live run is never
touched; runs from another host, or without the tags, are left alone (nothing here can verify them).

    python -m pipelines.stale_runs      # sweep the instance at $DAGSTER_HOME (e.g. before `make ui`)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import dagster as dg

HOST_TAG = "spectra/host"
PID_TAG = "spectra/pid"
PID_START_TAG = "spectra/pid_start"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
              dg.DagsterRunStatus.CANCELING]


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the run's owner (pass to `execute_in_process(tags=…)`)."""
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    identity = _proc_identity(pid)
    if identity:  # Linux only
        tags[PID_START_TAG] = identity[1]
    return tags


def _proc_identity(pid: int) -> tuple[str, str] | None:
    """(state, '<boot id>:<start ticks>') from Linux's /proc; None where there is no such entry.

    The start time defeats pid reuse: a new process with the same pid starts later (or in
    another boot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in (…) may hold spaces
    return fields[0], f"{boot}:{fields[19]}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owner_gone(tags: dict[str, str]) -> str | None:
    """Why the run's owning process is certainly gone, or None while it may still run."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return None  # another host's process, or no owner recorded: unverifiable
    if int(pid) == os.getpid():
        return None
    if not _pid_exists(int(pid)):
        return f"process {pid}, which is no longer running"
    identity = _proc_identity(int(pid))
    if identity is None:
        return None  # no /proc (macOS) or it exited just now: the next sweep decides
    state, start = identity
    if state == "Z":
        return f"process {pid}, which has exited"
    if tags.get(PID_START_TAG) and start != tags[PID_START_TAG]:
        return f"process {pid}, which is no longer running (the pid now belongs to another process)"
    return None


def sweep_dead_runs(instance: dg.DagsterInstance, log=print) -> list[str]:
    """Mark failed every unfinished run of this host whose owner is gone; returns their run ids."""
    failed = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        reason = owner_gone(dict(run.tags))
        current = instance.get_run_by_id(run.run_id) if reason else None
        if current is None or current.status not in UNFINISHED:
            continue  # alive, or finished since the query
        message = (f"run {run.run_id} ({run.job_name}) was left {current.status.value} by {reason}: "
                   "marked failed")
        instance.report_run_failed(current, message)
        log(f"spectra: {message}")
        failed.append(run.run_id)
    return failed


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        sweep_dead_runs(instance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
