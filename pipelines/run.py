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
from analysis.stages.report import format_summary, suite_evaluations
from analysis.stages.validate import validate_suite
from analysis.stages.suite import SuiteSpec
from resources.storage import check_writable

DAGSTER_YAML = "telemetry:\n  enabled: false\n"
# The terminal shows our progress lines and bars; every event still lands in the instance (the UI).
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def prepare_dagster_home(root: Path) -> Path:
    """A persistent SQLite-backed instance under the data root, telemetry off."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
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
        result = job.execute_in_process(instance=instance, partition_key=partition_key, raise_on_error=True,
                                        run_config=QUIET_CONSOLE)
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

        root = Path(args.root).expanduser().resolve()
        check_writable(root)
        spec = resolve_suite(args.suite)
        validate_suite(spec)
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
    print(format_summary(suite_evaluations(spec, data_root)))
    print(f"\nCatalog: {data_root.catalog}\nPlot:    {data_root.reports / f'{spec.name}_fvu_vs_l0.png'}")
    print(f"Stage seconds: {timings}; total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
