"""Spectra on a Kubernetes cluster, as configuration: the suite's definitions (the same assets,
jobs, schedules and sensor as `pipelines.definitions`) with dagster-k8s's `k8s_job_executor`, so
every step of every run is its own Kubernetes Job, and the steps of the `gpu` concurrency pool
(model, activations, dictionaries, evaluations, features, toolkit) request a GPU.

    pip install -e '.[cluster]'      # dagster-k8s and dagster-postgres, pinned to our Dagster
    dagster api grpc -m pipelines.cluster -h 0.0.0.0 -p 4000    # the code location's server

- the executor's settings: `pipelines/k8s/executor.yaml` (namespace, the data volume every step
  mounts at SPECTRA_ROOT, credentials from Kubernetes secrets as environment variables);
- the instance (Postgres storage, `K8sRunLauncher`, the run queue, the pool limit):
  `pipelines/k8s/dagster.yaml`, mounted as `$DAGSTER_HOME/dagster.yaml`.
The image is this repository with `pip install -e '.[cluster]'`. Tables, checkpoints and the
catalog are files under SPECTRA_ROOT, so that volume must be shared by every step's pod
(ReadWriteMany); activation stores may instead live at SPECTRA_ACTIVATIONS_URL (e.g. s3://…).
Both files are checked by tests/test_cluster.py with Dagster's own config validation.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from analysis.stages.suite import SuiteSpec
from assets import build_assets
from assets._common import DEVICE_POOL
from pipelines.definitions import build_definitions, resolve_suite

K8S_DIR = Path(__file__).parent / "k8s"
EXECUTOR_YAML = K8S_DIR / "executor.yaml"
INSTANCE_YAML = K8S_DIR / "dagster.yaml"
GPU_REQUEST = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}
"""What a step of the device pool adds to `step_k8s_config` (dagster-k8s merges the two)."""


def device_steps(spec: SuiteSpec) -> list[str]:
    """The step (op) names of the suite's assets in the device pool."""
    return sorted(a.node_def.name for a in build_assets(spec) if a.node_def.pool == DEVICE_POOL)


def cluster_executor(spec: SuiteSpec, config_path: Path = EXECUTOR_YAML) -> dg.ExecutorDefinition:
    """`k8s_job_executor` configured from `config_path`, with GPU_REQUEST on every device step (a
    step the file configures under `per_step_k8s_config` keeps the file's setting)."""
    from dagster_k8s import k8s_job_executor

    config = yaml.safe_load(config_path.read_text()) or {}
    per_step = {step: GPU_REQUEST for step in device_steps(spec)}
    per_step.update(config.get("per_step_k8s_config") or {})
    return k8s_job_executor.configured({**config, "per_step_k8s_config": per_step}, name="spectra_k8s_executor")


def build_cluster_definitions(spec: SuiteSpec, resources: dict | None = None,
                              config_path: Path = EXECUTOR_YAML) -> dg.Definitions:
    return build_definitions(spec, resources, executor=cluster_executor(spec, config_path))


defs = build_cluster_definitions(resolve_suite(os.environ.get("SPECTRA_SUITE", "default")))
