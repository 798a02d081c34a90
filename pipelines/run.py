"""Materialize a whole suite headless, in order, recording every run in the persistent Dagster
instance under the data root (so the UI later shows the same history and staleness).

    python -m pipelines.run [--suite default] [--root data]

Partitioned stages run one Dagster run per partition; finished partitions are detected from
their content-derived paths and reused, so a second run with nothing changed only checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import dagster as dg

from analysis.stages.activations import store_bytes
from analysis.stages.browser import browser_dir
from analysis.stages.report import format_summary, missing_members, suite_evaluations
from analysis.stages.validate import validate_suite
from analysis.stages.suite import SuiteSpec
from analysis.catalog import check_sql_path
from pipelines.stale_runs import owner_tags, sweep_dead_runs
from resources.storage import check_writable

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


def run_suite(spec: SuiteSpec, root: Path, *, instance: dg.DagsterInstance | None = None,
              log=print) -> dict[str, float]:
    """Execute every job of the suite in dependency order; returns seconds per stage."""
    from pipelines.definitions import build_definitions, default_resources

    defs = build_definitions(spec, default_resources(str(root)))
    instance = instance or dg.DagsterInstance.get()
    timings: dict[str, float] = {}

    def execute(job_name: str, partition_key: str | None = None) -> None:
        job = defs.resolve_job_def(job_name)
        # the owner tags let a later sweep fail this run if this process is killed mid-run
        result = job.execute_in_process(instance=instance, partition_key=partition_key, raise_on_error=True,
                                        run_config=QUIET_CONSOLE, tags=owner_tags())
        if not result.success:
            raise RuntimeError(f"{job_name} {partition_key or ''} failed: see the Dagster run {result.run_id}")

    stages = [
        ("prepare", "prepare_job", [None]),
        ("extract", "extract_job", defs.resolve_job_def("extract_job").partitions_def.get_partition_keys()),
        ("stats", "stats_job", [None]),
        ("dictionaries", "dictionary_job", [m.key for m in spec.members()]),
        ("report", "report_job", [None]),
    ]
    for stage, job_name, keys in stages:
        start = time.perf_counter()
        for key in keys:
            log(f"[spectra] {stage}{'' if key is None else f' [{key}]'}")
            execute(job_name, key)
        timings[stage] = round(time.perf_counter() - start, 1)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=os.environ.get("SPECTRA_SUITE", "default"),
                        help="suite name in pipelines/suites/ or a YAML path")
    parser.add_argument("--root", default=os.environ.get("SPECTRA_ROOT", "data"), help="data root")
    args = parser.parse_args(argv)

    try:  # everything that can be wrong with the input fails here, before any work, in one line
        from pipelines.definitions import resolve_suite

        root = check_sql_path(Path(args.root))  # before anything is written under it
        spec = resolve_suite(args.suite)
        validate_suite(spec)
        check_writable(root)  # last: it creates the root, which a bad suite must not leave behind
    except (ValueError, PermissionError, FileNotFoundError) as err:
        print(f"spectra: {err}", file=sys.stderr)
        return 2
    prepare_dagster_home(root)
    print(f"spectra: suite {spec.name!r}, activation stores of about {store_bytes(spec) / 1e9:.2f} GB "
          f"(limit activations.max_store_gb={spec.activations.max_store_gb:g})")
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    timings = run_suite(spec, root)
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
