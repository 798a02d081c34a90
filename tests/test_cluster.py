"""The cluster path is configuration, checked here by Dagster's own validation: every job of the
suite under dagster-k8s's k8s_job_executor, the GPU request on exactly the device pool's steps
(merged by dagster-k8s itself), and the Kubernetes instance file against Dagster's instance schema
and each configured class's own schema, with every secret read from the environment."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig

from analysis.stages.suite import load_suite
from pipelines.cluster import EXECUTOR_YAML, GPU_REQUEST, INSTANCE_YAML, build_cluster_definitions, device_steps
from pipelines.definitions import JOB_SELECTIONS, default_resources

TINY = Path(__file__).parent / "suites" / "tiny.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_suite(TINY)


def _executor_config(job: dg.JobDefinition) -> dict:
    resolved = job.executor_def.config_schema.resolve_config({})
    assert resolved.success, resolved.errors
    return resolved.value["config"]


def test_every_job_validates_under_the_kubernetes_executor(spec, tmp_path):
    defs = build_cluster_definitions(spec, default_resources(str(tmp_path)))
    for name in JOB_SELECTIONS:
        job = defs.resolve_job_def(name)
        assert job.executor_def.name == "spectra_k8s_executor"
        dg.validate_run_config(job, {})
        config = _executor_config(job)
        assert config["job_namespace"] == "spectra" and config["env_secrets"] == ["spectra-s3"]


def test_the_device_steps_and_only_they_request_a_gpu_beside_the_shared_settings(spec, tmp_path):
    assert device_steps(spec) == ["activations", "dictionaries", "evaluations", "features", "model", "toolkit"]
    job = build_cluster_definitions(spec, default_resources(str(tmp_path))).resolve_job_def("dictionary_job")
    config = _executor_config(job)
    shared = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]))
    all_steps = {node.name for node in job.graph.node_defs} | set(device_steps(spec))
    for step in sorted(all_steps):
        per_step = config["per_step_k8s_config"].get(step)
        merged = shared if per_step is None else shared.merge(
            K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(per_step)))
        resources = merged.run_k8s_config.container_config["resources"]
        assert resources["requests"] == {"cpu": "4", "memory": "16Gi"}, step
        assert resources.get("limits") == (GPU_REQUEST["container_config"]["resources"]["limits"]
                                           if step in device_steps(spec) else None), step
        assert merged.run_k8s_config.container_config["volume_mounts"] == [{"name": "spectra-data",
                                                                          "mount_path": "/data"}]


def test_a_wrong_executor_setting_is_refused_by_dagsters_validation(spec, tmp_path):
    bad = tmp_path / "executor.yaml"
    bad.write_text(EXECUTOR_YAML.read_text() + "max_concurent: 4\n")  # misspelt
    job = build_cluster_definitions(spec, default_resources(str(tmp_path)), config_path=bad) \
        .resolve_job_def("report_job")
    resolved = job.executor_def.config_schema.resolve_config({})
    assert not resolved.success
    assert "max_concurent" in str(resolved.errors)


def test_the_instance_file_fits_dagsters_schema_and_each_classs_config(tmp_path, monkeypatch):
    environment = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_USER": "spectra", "DAGSTER_PG_PASSWORD": "from-a-secret",
                   "SPECTRA_IMAGE": "registry.example/spectra:1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text(INSTANCE_YAML.read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # raises on any key the schema does not know
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    from dagster._core.run_coordinator import QueuedRunCoordinator

    for section, cls in (("run_launcher", K8sRunLauncher), ("run_coordinator", QueuedRunCoordinator)):
        assert config[section]["class"] == cls.__name__
        result = process_config(cls.config_type(), config[section].get("config") or {})
        assert result.success, (section, result.errors)
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success and storage.value["postgres_db"]["password"] == "from-a-secret"
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")  # no default hides a missing secret
    assert not process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"]).success
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_no_secret_is_written_in_the_cluster_files():
    raw = yaml.safe_load(INSTANCE_YAML.read_text())
    postgres = raw["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "username", "password"):
        assert set(postgres[field]) == {"env"}, f"{field} must come from the environment"
    text = INSTANCE_YAML.read_text() + EXECUTOR_YAML.read_text()
    for word in ("AKIA", "aws_secret", "password:"):
        assert word not in text.replace("password: {env:", ""), word
