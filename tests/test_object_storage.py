"""Object storage end to end against a real S3 API: moto's server on 127.0.0.1, reached through
s3fs exactly as AWS would be (credentials and endpoint from the environment only).

- the suite runs through Dagster with its activation stores at s3://, and its numbers recompute
  from the store there;
- the data root's tables, checkpoints, models and catalog are published to s3://; the catalog's
  views read the tables there through DuckDB (a registered fsspec filesystem: DuckDB's own httpfs
  extension cannot be downloaded offline), checkpoints load checked against their checksums;
- an unreachable endpoint is named before any work;
- the secret never lands in a file of the data root or the Dagster instance.
"""

import subprocess
import sys
from pathlib import Path

import dagster as dg
import fsspec
import pytest
import torch

from analysis.activations.reader import ActivationStore, iter_images
from analysis.catalog import connect_catalog
from analysis.dictionaries import load_dictionary
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.integrity import DamagedArtifact
from analysis.paths import DataRoot
from analysis.stages.published import connect_published_catalog, load_published_dictionary, publish
from analysis.stages.dataset import split_indices
from analysis.stages.dictionaries import dictionary_id
from analysis.stages.suite import parse_suite
from pipelines.run import run_suite
from test_damage import SUITE_RAW

SECRET = "spectra-test-secret-3f9a1c"
BUCKET = "spectra-test"
REPO = Path(__file__).resolve().parents[1]
RAW = {**SUITE_RAW, "name": "s3", "toolkit": {"max_images": 32, "probe_images": 64}}


def _fresh_filesystems():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the endpoint it was made with


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "spectra-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        _fresh_filesystems()
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield endpoint
        _fresh_filesystems()
    server.stop()


@pytest.fixture(scope="module")
def suite_on_s3(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3")
    url = f"s3://{BUCKET}/activations"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRA_ACTIVATIONS_URL", url)
        mp.setenv("SPECTRA_PUBLISH_URL", f"s3://{BUCKET}/published/{RAW['name']}")  # the `published` asset
        home = tmp / "dagster_home"
        home.mkdir()
        instance = dg.DagsterInstance.local_temp(tempdir=str(home))
        spec = parse_suite(RAW)
        run_suite(spec, tmp / "data", instance=instance, log=lambda _: None)
        instance.dispose()
    return spec, DataRoot(tmp / "data", activations_url=url), home


def test_stores_live_at_the_url_and_the_catalog_recomputes_from_them(suite_on_s3):
    spec, root, _ = suite_on_s3
    hook = spec.activations.hooks[0]
    location = root.hook_store(spec.store_id, hook)
    assert location == f"s3://{BUCKET}/activations/{spec.store_id}/{hook}.zarr"
    assert fsspec.filesystem("s3").exists(f"{BUCKET}/activations/{spec.store_id}/{hook}.zarr/zarr.json")
    assert not (root.root / "activations").exists()
    con = connect_catalog(root.catalog)
    rows = con.sql("SELECT dict_id, fvu FROM evaluations ORDER BY dict_id").fetchall()
    con.close()
    assert len(rows) == len(spec.members())
    store = ActivationStore.open(location)
    _, held_out = split_indices(root, spec.dataset_id)
    held_out = held_out[: spec.evaluation.max_images]  # what the evaluation scores
    for dict_id, fvu in rows:
        sae = load_dictionary(root.dictionary(dict_id))
        held = reconstruction_metrics(sae, (x.reshape(-1, store.d_model) for _, x in iter_images(store, held_out)))
        assert held.fvu == pytest.approx(fvu, rel=1e-6)


def test_a_published_root_is_queried_and_loaded_from_the_url(suite_on_s3, tmp_path):
    spec, root, _ = suite_on_s3
    url = f"s3://{BUCKET}/published/{spec.name}"
    # the run's `published` asset put everything there: publishing again copies nothing
    assert publish(root, url)["files"] == 0
    local = connect_catalog(root.catalog)
    remote = connect_published_catalog(url, cache_dir=tmp_path / "cache")
    try:
        for view in ("evaluations", "feature_stats", "top_images", "dictionaries"):
            query = f"SELECT * FROM {view} ORDER BY ALL"
            assert remote.sql(query).fetchall() == local.sql(query).fetchall(), view
        # the views read the URL, not a local copy: a table removed there is gone from the view
        fs = fsspec.filesystem("s3")
        fs.rm(f"{BUCKET}/published/{spec.name}/tables/top_images", recursive=True)
        with pytest.raises(Exception, match="No files found|no files"):
            remote.sql("SELECT count(*) FROM top_images").fetchall()
    finally:
        local.close()
        remote.close()
    dict_id = dictionary_id(spec, spec.members()[0])
    fetched = load_published_dictionary(url, dict_id, cache_dir=tmp_path / "weights")
    original = load_dictionary(root.dictionary(dict_id))
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(fetched.state_dict()[name], tensor, rtol=0, atol=0)
    # a replaced weights file is named, never loaded
    fsspec.filesystem("s3").pipe(f"{BUCKET}/published/{spec.name}/dictionaries/{dict_id}/weights.safetensors",
                                 b"not the weights")
    with pytest.raises(DamagedArtifact, match=r"weights.safetensors has sha256"):
        load_published_dictionary(url, dict_id, cache_dir=tmp_path / "again")


def test_a_same_size_rewrite_is_published_and_an_unchanged_file_is_not(suite_on_s3, tmp_path):
    """Publishing compares checksums, not sizes: re-mined heatmaps keep their size."""
    import shutil

    spec, root, _ = suite_on_s3
    copy = DataRoot(tmp_path / "copy")
    shutil.copytree(root.root, copy.root)
    url = f"s3://{BUCKET}/published/same-size"
    assert publish(copy, url)["files"] > 0
    heatmaps = copy.dictionary(dictionary_id(spec, spec.members()[0])) / "heatmaps.npy"
    data = bytearray(heatmaps.read_bytes())
    data[-1] ^= 0xFF
    heatmaps.write_bytes(bytes(data))
    again = publish(copy, url)
    assert (again["files"], again["bytes"]) == (1, len(data))
    assert fsspec.filesystem("s3").cat_file(f"{BUCKET}/published/same-size/{heatmaps.relative_to(copy.root)}") == data


def test_an_unreachable_endpoint_is_named_before_any_work(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("SPECTRA_ACTIVATIONS_URL", f"s3://{BUCKET}/activations")
    _fresh_filesystems()
    try:
        proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--suite", "default",
                               "--root", str(tmp_path / "root")], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    finally:
        _fresh_filesystems()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"activations_url='s3://{BUCKET}/activations' is not writable" in proc.stderr
    assert not (tmp_path / "root").exists(), "nothing is written before the check"


def test_the_secret_is_written_nowhere(suite_on_s3):
    _, root, home = suite_on_s3
    for folder in (root.root, home):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
