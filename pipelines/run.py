"""Materialize a whole suite headless, in order, recording every run in the persistent Dagster
instance under the data root (so the UI later shows the same history and staleness).

    python -m pipelines.run [--suite default] [--root data] [--executor multiprocess] [--runs 2]

Stages run in dependency order (prepare, extract, stats, arrivals where the suite watches a
folder, dictionaries, report); a partitioned stage runs one Dagster run per partition. Finished
partitions are detected from their content-derived paths and reused, so a second run with
nothing changed only checks.

Two ways to execute, both Dagster's own:
- `multiprocess` (the default of `make run`): every run goes through `dagster.execute_job` with
  the multiprocess executor, so each step is its own process (forked from a forkserver that
  imported `pipelines.definitions` once) and steps of one run that do not depend on each other
  run together. Steps that use the compute device sit in the concurrency
  pool `gpu` (`assets._common.DEVICE_POOL`), limited to 1 unless the instance says otherwise
  (`dagster instance concurrency set gpu N`): they take the device one at a time across every run
  while CPU-only steps run beside them. `--runs N` puts N partition runs of a stage in flight at
  once, each orchestrated by a process of its own (forked from the same forkserver; the N
  processes serve every stage of the suite run). The default is 1: a run whose only ready steps
  wait for a pool slot spins in Dagster's executor loop (no sleep between checks; measured at a
  third of a core per waiting run), so more runs in flight pay only where the pool's limit is
  above 1. The step processes rebuild the suite's definitions from the run's settings
  (`pipelines.definitions.job_named`: SPECTRA_SUITE and SPECTRA_ROOT, which this sets, and the
  other SPECTRA_* knobs), passed with the job rather than inherited.
- `in_process`: one run at a time in this process (`execute_in_process`); what the tests use.
Both write the same bytes (tests/test_parallel_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import dagster as dg

from analysis.stages.activations import store_bytes
from analysis.stages.arrivals import registered, watched_folder
from analysis.stages.browser import browser_dir
from analysis.stages.report import format_summary, missing_members, suite_evaluations
from analysis.stages.validate import validate_suite
from analysis.stages.suite import SuiteSpec
from analysis.catalog import check_sql_path
from assets._common import DEVICE_POOL
from assets.arrivals import ARRIVAL_PARTITIONS
from pipelines.stale_runs import owner_tags, sweep_dead_runs
from resources.storage import check_url, check_writable

# Telemetry off; Spectra's own warnings (a damaged artifact being redone) shown in the runs' logs.
DAGSTER_YAML = "telemetry:\n  enabled: false\npython_logs:\n  managed_python_loggers:\n    - spectra\n"
# The terminal shows our progress lines and bars; every event still lands in the instance (the UI).
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def prepare_dagster_home(root: Path, log=print) -> Path:
    """A persistent SQLite-backed instance under the data root, telemetry off, where runs that a
    killed process left unfinished are marked failed (they would show as running forever)."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        sweep_dead_runs(instance, log=log)
    return home


@dataclass(frozen=True)
class Multiprocess:
    """Run through Dagster's multiprocess executor (see the module docstring)."""

    suite: str
    """The suite's name or YAML path: what the step processes rebuild the definitions from."""
    runs: int = 1
    """Partition runs of one stage in flight at once (see the module docstring for why 1)."""
    max_concurrent: int = 0
    """Step processes per run at once; 0: Dagster's default (the CPU count)."""


def run_suite(spec: SuiteSpec, root: Path, *, instance: dg.DagsterInstance | None = None,
              log=print, multiprocess: Multiprocess | None = None) -> dict[str, float]:
    """Execute every job of the suite in dependency order; returns seconds per stage.
    Without `multiprocess`, every run executes in this process, one after the other."""
    from pipelines.definitions import build_definitions, default_resources, step_settings

    defs = build_definitions(spec, default_resources(str(root)))
    instance = instance or dg.DagsterInstance.get()
    timings: dict[str, float] = {}
    if multiprocess is not None:
        prepare_step_processes(multiprocess, spec, root, instance, log)

    def execute(job_name: str, partition_key: str | None = None, pool: ProcessPoolExecutor | None = None):
        if pool is None:
            log(f"[spectra] {job_name}{'' if partition_key is None else f' [{partition_key}]'}")
        # the owner tags let a later sweep fail this run if its orchestrating process is killed mid-run
        if multiprocess is None:
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance, partition_key=partition_key, raise_on_error=True, run_config=QUIET_CONSOLE,
                tags=owner_tags())
            return check(job_name, partition_key, result.success, result.run_id)
        if pool is None:
            result = execute_multiprocess(job_name, partition_key, instance, multiprocess, step_settings())
            return check(job_name, partition_key, result.success, result.run_id)
        return pool.submit(execute_in_own_process, job_name, partition_key, instance.get_ref(), multiprocess,
                           step_settings())

    def check(job_name: str, partition_key: str | None, success: bool, run_id: str) -> None:
        if not success:
            raise RuntimeError(f"{job_name} {partition_key or ''} failed: see the Dagster run {run_id}"
                               f"{failure_messages(instance, run_id)}")

    stages = [
        ("prepare", "prepare_job", [None]),
        ("extract", "extract_job", defs.resolve_job_def("extract_job").partitions_def.get_partition_keys()),
        ("stats", "stats_job", [None]),
        *([("arrivals", "arrival_job", lambda: arrival_keys(spec, defs, instance))] if spec.arrivals.path else []),
        ("dictionaries", "dictionary_job", [m.key for m in spec.members()]),
        ("report", "report_job", [None]),
    ]
    # Each partition run is orchestrated by a process of its own: Dagster's run setup reconfigures
    # Python logging (dictConfig) and deadlocks against another run's logging in the same process.
    # One pool serves every stage, so each orchestrating process and the forkserver it starts for its
    # steps (an import of pipelines.definitions, ~5 s) start once per suite run, not once per stage.
    pool: ProcessPoolExecutor | None = None
    try:
        for stage, job_name, keys in stages:
            start = time.perf_counter()
            keys = keys() if callable(keys) else keys  # arrivals: the folder is read when the stage starts
            if multiprocess is None or len(keys) == 1:
                for key in keys:
                    execute(job_name, key)
            else:
                log(f"[spectra] {job_name}: {len(keys)} partition runs, {multiprocess.runs} at a time")
                pool = pool or ProcessPoolExecutor(max_workers=multiprocess.runs, mp_context=orchestrator_context())
                futures = {execute(job_name, key, pool): key for key in keys}
                try:
                    for done, future in enumerate(as_completed(futures), 1):
                        check(job_name, futures[future], *future.result())
                        log(f"[spectra] {job_name} [{futures[future]}] done ({done}/{len(keys)})")
                except BaseException:  # a failed run (or ^C): start no more; the running ones finish
                    for future in futures:
                        future.cancel()
                    raise
            timings[stage] = round(time.perf_counter() - start, 1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return timings


def orchestrator_context():
    """The start method of the processes that orchestrate partition runs: forked from the forkserver
    that Dagster's executor starts for this process's own step processes (the same preload), so
    they start with pipelines.definitions imported (a spawned one imports it: ~5 s). What a
    forkserver's child inherits is the environment the server started with, so everything a run
    must see from this process's environment travels as `step_settings()` (`execute_in_own_process`)."""
    from pipelines.definitions import STEP_PRELOAD

    context = get_context("forkserver")
    context.set_forkserver_preload(list(STEP_PRELOAD))  # no effect once the server runs: then it already has it
    return context


def arrival_keys(spec: SuiteSpec, defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """What the arrivals sensor would do on a tick: register the watched folder's new files and add
    every registered arrival's partition; all of them are run (a done one only checks)."""
    from pipelines.arrivals import pending_arrivals

    storage = defs.resources["storage"]
    new = pending_arrivals(spec, storage, instance)
    if new:
        instance.add_dynamic_partitions(ARRIVAL_PARTITIONS.name, new)
    return [a.key for a in registered(spec, storage.data_root())]


def prepare_step_processes(multiprocess: Multiprocess, spec: SuiteSpec, root: Path,
                           instance: dg.DagsterInstance, log) -> None:
    """Point the step processes at this suite and root, and give the device pool its limit."""
    from pipelines.definitions import resolve_suite

    if resolve_suite(multiprocess.suite) != spec:
        raise ValueError(f"suite {multiprocess.suite!r} does not resolve to the suite being run ({spec.name!r}): "
                         "the step processes would build other definitions; pass the suite's own name or path")
    os.environ["SPECTRA_SUITE"] = str(multiprocess.suite)
    os.environ["SPECTRA_ROOT"] = str(root)
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        raise ValueError(f"the Dagster instance at {instance.root_directory} has no concurrency tables, so the "
                         f"'{DEVICE_POOL}' pool cannot hold device steps to one at a time: run "
                         "`dagster instance migrate` with DAGSTER_HOME pointing there")
    info = storage.get_concurrency_info(DEVICE_POOL)
    if info.limit is None and instance.get_concurrency_config().pool_config.default_pool_limit is None:
        storage.set_concurrency_slots(DEVICE_POOL, 1)
        log(f"[spectra] concurrency pool '{DEVICE_POOL}' limited to 1 (change: dagster instance concurrency set "
            f"{DEVICE_POOL} N)")


def execute_multiprocess(job_name: str, partition_key: str | None, instance: dg.DagsterInstance,
                         multiprocess: Multiprocess, settings: tuple[tuple[str, str], ...]) -> dg.JobExecutionResult:
    """One run through Dagster's multiprocess executor; `settings`: the run's `step_settings()`."""
    from pipelines.definitions import STEP_PRELOAD

    job = dg.build_reconstructable_job("pipelines.definitions", "job_named", reconstructable_args=(job_name, settings))
    # forkserver: each step forks from a server that imported pipelines.definitions (torch, dagster,
    # the suite's code) once. Spawned steps paid ~2.5 s of imports each (the default suite took
    # 2.15x the in-process time); Dagster preloads only itself unless told the module.
    executor = {"multiprocess": {"max_concurrent": multiprocess.max_concurrent,
                                 "start_method": {"forkserver": {"preload_modules": list(STEP_PRELOAD)}}}}
    tags = {**owner_tags(), **({"dagster/partition": partition_key} if partition_key is not None else {})}
    return dg.execute_job(job, instance, run_config={**QUIET_CONSOLE, "execution": {"config": executor}},
                          tags=tags)


def execute_in_own_process(job_name: str, partition_key: str | None, instance_ref, multiprocess: Multiprocess,
                           settings: tuple[tuple[str, str], ...]) -> tuple[bool, str]:
    """One run, orchestrated by a worker process of `run_suite`'s pool: (success, run id).
    `settings` are the launching process's `step_settings()`, set here too: this process started
    with its forkserver's environment, which may be older than the launcher's."""
    from pipelines.definitions import apply_step_settings

    apply_step_settings(settings)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = execute_multiprocess(job_name, partition_key, instance, multiprocess, settings)
        return result.success, result.run_id


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> str:
    """The failed steps' errors, so a failure in a step process reads here and not only in the UI."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    lines = []
    for record in records:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        while error is not None and error.cause is not None:  # Dagster's wrapper, then what the stage raised
            error = error.cause
        if error is not None:
            lines.append(f"\n  {event.step_key}: {error.message.strip()}")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=os.environ.get("SPECTRA_SUITE", "default"),
                        help="suite name in pipelines/suites/ or a YAML path")
    parser.add_argument("--root", default=os.environ.get("SPECTRA_ROOT", "data"), help="data root")
    parser.add_argument("--executor", choices=["multiprocess", "in_process"],
                        default=os.environ.get("SPECTRA_EXECUTOR", "multiprocess"),
                        help="Dagster's multiprocess executor (steps as processes, the device pool) or one "
                             "process")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("SPECTRA_PARALLEL_RUNS", "1")),
                        help="multiprocess: partition runs of one stage in flight at once")
    args = parser.parse_args(argv)

    try:  # everything that can be wrong with the input fails here, before any work, in one line
        from pipelines.definitions import resolve_suite

        root = check_sql_path(Path(args.root))  # before anything is written under it
        spec = resolve_suite(args.suite)
        validate_suite(spec)
        if spec.arrivals.path is not None:
            watched_folder(spec)  # a missing watched folder: named before any work
        if "://" in os.environ.get("SPECTRA_ACTIVATIONS_URL", ""):
            check_url(os.environ["SPECTRA_ACTIVATIONS_URL"])  # an unreachable store: named before any work
        if os.environ.get("SPECTRA_PUBLISH_URL"):
            check_url(os.environ["SPECTRA_PUBLISH_URL"], "publish_url")  # likewise where results are published
        if os.environ.get("SPECTRA_DASK_SCHEDULER"):
            from analysis.evaluation.dask_passes import check_scheduler

            check_scheduler(os.environ["SPECTRA_DASK_SCHEDULER"])  # likewise an unreachable dask scheduler
        check_writable(root)  # last: it creates the root, which a bad suite must not leave behind
        if args.runs < 1:
            raise ValueError(f"--runs {args.runs}: at least one run must be in flight; pass --runs 1 or more")
    except (ValueError, PermissionError, FileNotFoundError) as err:
        print(f"spectra: {err}", file=sys.stderr)
        return 2
    prepare_dagster_home(root)
    print(f"spectra: suite {spec.name!r}, activation stores of about {store_bytes(spec) / 1e9:.2f} GB "
          f"(limit activations.max_store_gb={spec.activations.max_store_gb:g})")
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    multiprocess = Multiprocess(args.suite, runs=args.runs) if args.executor == "multiprocess" else None
    timings = run_suite(spec, root.resolve(), multiprocess=multiprocess)
    from analysis.paths import DataRoot

    data_root = DataRoot(root)
    model = json.loads((data_root.model(spec.model_id) / "result.json").read_text())
    print(f"\nSuite {spec.name!r}: dataset {spec.dataset_id}, model {spec.model_id}, store {spec.store_id}")
    if spec.model.kind == "mouse":
        task = f"task {spec.dataset.config().task!r}" if spec.dataset.source == "shapes" else \
            f"{len(spec.dataset.class_names())} {spec.dataset.source} classes"
        print(f"Mouse ViT held-out accuracy {model['eval_accuracy']:.4f} on {task} "
              f"({model['train_seconds']:.0f} s of training)")
    else:
        print(f"Model: {spec.model.kind} {spec.model.name} ({spec.model.weights} weights)")
    evals = suite_evaluations(spec, data_root)
    print(format_summary(evals))
    print(f"\nCatalog: {data_root.catalog}\nPlot:    {data_root.reports / f'{spec.name}_fvu_vs_l0.png'}"
          f"\nBrowser: {(browser_dir(data_root) / 'index.html').as_uri()}")
    print(f"Stage seconds: {timings}; total {time.perf_counter() - start:.1f} s")
    return report_missing(spec, evals)


def report_missing(spec: SuiteSpec, evals) -> int:
    """1, naming them, when members of the suite have no evaluation row at the end of its run: a
    table that silently lacks members reads as a complete result."""
    missing = missing_members(spec, evals)
    if not missing:
        return 0
    print(f"spectra: {len(missing)} of the suite's {len(spec.members())} members have no row in the catalog's "
          f"evaluations table: {', '.join(missing)}; run the suite again (finished members are reused) and, if "
          "they stay missing, look at their dictionary_job runs (make ui)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
