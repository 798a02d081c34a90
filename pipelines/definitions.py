"""Dagster definitions for one suite: assets, resources, jobs, and the schedules and automation
sensor of `pipelines.automation`.

`workspace.yaml` loads `pipelines.definitions:defs`. Which suite and data root come from the
environment: SPECTRA_SUITE (a name in pipelines/suites/ or a YAML path; default `default`) and
SPECTRA_ROOT (default `./data`); SPECTRA_ACTIVATIONS_URL moves activation stores to an fsspec URL
(e.g. s3://bucket/activations; default <root>/activations); SPECTRA_PUBLISH_URL is where the
`published` asset copies the tables, checkpoints, models and catalog. SPECTRA_TRACKER picks
wandb's mode (offline, online, disabled). SPECTRA_DASK_SCHEDULER (an address) runs the store-wide
passes that need no model on that dask cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from analysis.stages.validate import validate_suite
from analysis.stages.suite import SuiteSpec, load_suite
from assets import build_asset_checks, build_assets
from pipelines.arrivals import arrival_job, arrivals_sensor
from pipelines.automation import automation_sensor, schedules, with_automation
from resources import CatalogResource, ComputeResource, StorageResource, TrackerResource

SUITES_DIR = Path(__file__).parent / "suites"


def resolve_suite(name_or_path: str) -> SuiteSpec:
    """A suite by name (pipelines/suites/<name>.yaml) or by YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
            raise ValueError(f"unknown suite {name_or_path!r}; valid: {', '.join(names)} (or a path to a YAML file)")
    return load_suite(path)


def default_resources(root: str | None = None) -> dict:
    return {
        "storage": StorageResource(root=root or os.environ.get("SPECTRA_ROOT", "data"),
                                   activations_url=os.environ.get("SPECTRA_ACTIVATIONS_URL") or None,
                                   publish_url=os.environ.get("SPECTRA_PUBLISH_URL") or None),
        "compute": ComputeResource(device=os.environ.get("SPECTRA_DEVICE", "auto"),
                                   threads=int(os.environ.get("SPECTRA_THREADS", "0")),
                                   dask_scheduler=os.environ.get("SPECTRA_DASK_SCHEDULER") or None),
        "tracker": TrackerResource(mode=os.environ.get("SPECTRA_TRACKER", "offline")),
        "catalog": CatalogResource(),
    }


JOB_SELECTIONS = {
    "prepare_job": ["images", "model", "activation_layout"],
    "extract_job": ["activations"],
    "stats_job": ["activation_stats"],
    "dictionary_job": ["dictionaries", "evaluations", "features"],
    "evaluation_job": ["evaluations", "features"],
    "report_job": ["toolkit", "catalog", "report", "feature_browser", "published"],
}


def build_definitions(spec: SuiteSpec, resources: dict | None = None,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """`executor`: None keeps Dagster's default (multiprocess, or in-process by run config);
    `pipelines.cluster` passes Kubernetes'."""
    validate_suite(spec)  # bad names fail here, before any asset runs
    jobs = {name: dg.define_asset_job(name, selection=sel, description=f"{spec.name}: {', '.join(sel)}")
            for name, sel in JOB_SELECTIONS.items()}
    sensors = [automation_sensor()]
    if spec.arrivals.path is not None:  # a watched folder: its sensor and the job it launches
        jobs["arrival_job"] = arrival_job()
        sensors.append(arrivals_sensor(spec, jobs["arrival_job"]))
    return dg.Definitions(assets=with_automation(build_assets(spec)), asset_checks=build_asset_checks(spec),
                          jobs=list(jobs.values()), schedules=schedules(spec, jobs), sensors=sensors,
                          resources=resources or default_resources(), executor=executor)


defs = build_definitions(resolve_suite(os.environ.get("SPECTRA_SUITE", "default")))


STEP_SETTINGS = ("SPECTRA_SUITE", "SPECTRA_ROOT", "SPECTRA_ACTIVATIONS_URL", "SPECTRA_PUBLISH_URL", "SPECTRA_DEVICE",
                 "SPECTRA_THREADS", "SPECTRA_DASK_SCHEDULER", "SPECTRA_TRACKER", "WANDB_MODE", "HF_HUB_OFFLINE")
"""The environment a step process must share with the run that launched it. Never a secret: these
travel inside the run's record (its reconstructable job); credentials stay in the environment."""
STEP_PRELOAD = ("pipelines.definitions", "torch._dynamo")
"""What the forkserver of a run's step processes imports once, before forking each step. torch's
optimizers import torch._dynamo when a process builds its first one (to switch dynamo off around
`add_param_group`): ~1.7 s that every training step (each dictionary, the mouse, the toolkit's
probes) would otherwise pay."""
_jobs_by_settings: dict[tuple, dg.Definitions] = {}


def step_settings() -> tuple[tuple[str, str], ...]:
    """This process's STEP_SETTINGS, as `job_named` takes them."""
    return tuple((name, os.environ[name]) for name in STEP_SETTINGS if name in os.environ)


def job_named(name: str, settings: tuple[tuple[str, str], ...] = ()) -> dg.JobDefinition:
    """A job of the suite `settings` name (SPECTRA_SUITE, SPECTRA_ROOT, …), rebuilt here: what the
    step processes of Dagster's multiprocess executor call (`dg.build_reconstructable_job(
    "pipelines.definitions", "job_named", reconstructable_args=(name, step_settings()))`). The
    settings are passed, not inherited: a forkserver's children carry the environment the server
    started with, which a long-lived process (a test session) may since have changed."""
    if not settings:
        return defs.resolve_job_def(name)
    apply_step_settings(settings)  # what default_resources() and the stages read in this step process
    if settings not in _jobs_by_settings:
        _jobs_by_settings[settings] = build_definitions(resolve_suite(dict(settings).get("SPECTRA_SUITE", "default")))
    return _jobs_by_settings[settings].resolve_job_def(name)


def apply_step_settings(settings: tuple[tuple[str, str], ...]) -> None:
    """This process's environment made to hold exactly `settings` of the STEP_SETTINGS: each set,
    the others unset, even where the forkserver this process came from started with them."""
    env = dict(settings)
    for key in STEP_SETTINGS:
        if key in env:
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)
