"""A data root's results on object storage (any fsspec URL: s3://, gs://, …), for readers on other
machines: `publish` copies the tables, the checkpoints, the models and the catalog there;
`connect_published_catalog` opens that catalog with its views reading the Parquet tables at the
URL; `load_published_dictionary` fetches one checkpoint, checked against its recorded checksums.

DuckDB reads the URL through the fsspec filesystem registered on the connection: its own
httpfs/aws extensions are downloaded on first use, which an offline machine cannot do, while
fsspec's backend (s3fs for s3://) is a Python package. Credentials come only from the
environment (the backend's own variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for an S3-compatible server, …); nothing here writes them anywhere.

Activation stores need no publishing: they can live at a URL from the start
(SPECTRA_ACTIVATIONS_URL).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import duckdb
import fsspec

from analysis.catalog import ROOT_VARIABLE, connect_catalog
from analysis.dictionaries import CONFIG_FILE, WEIGHTS_FILE, load_dictionary
from analysis.integrity import DamagedArtifact, sha256_file
from analysis.paths import DataRoot
from analysis.stages.dictionaries import SUMMARY_FILE

PUBLISHED = ("tables", "dictionaries", "models", "catalog.duckdb")
"""What `publish` copies from a data root (images, activations and the Dagster instance stay)."""
CATALOG_FILE = "catalog.duckdb"
SKIPPED_SUFFIXES = (".tmp", ".partial", ".lock")


MANIFEST_FILE = "published.json"
"""At the URL: relative path -> size and sha256 of every file published there, written last."""


def publish(root: DataRoot, url: str) -> dict:
    """Copy PUBLISHED from `root` to `url` (files under the same relative paths); returns the
    number of files and bytes copied. A file is copied unless the URL's manifest records the same
    sha256 for it and the file is there: a rewrite of the same size (re-mined heatmaps, a marker
    with new checksums) is copied, an unchanged file is not."""
    fs, base = fsspec.url_to_fs(url)
    base = base.rstrip("/")
    manifest_path = f"{base}/{MANIFEST_FILE}"
    before = json.loads(fs.cat_file(manifest_path)) if fs.exists(manifest_path) else {}
    after, files, nbytes = {}, 0, 0
    for name in PUBLISHED:
        source = root.root / name
        paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()) \
            if source.is_dir() else []
        for path in paths:
            if path.name.endswith(SKIPPED_SUFFIXES) or path.name.startswith(".write-check-"):
                continue
            rel = path.relative_to(root.root).as_posix()
            record = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            after[rel] = record
            target = f"{base}/{rel}"
            if before.get(rel) == record and fs.exists(target):
                continue
            fs.put_file(str(path), target)
            files, nbytes = files + 1, nbytes + record["size"]
    manifest = json.dumps({**before, **after}, sort_keys=True, indent=0).encode()
    fs.pipe_file(manifest_path, manifest)
    return {"url": url, "files": files, "bytes": nbytes, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def _download(url: str, cache: Path) -> Path:
    fs, path = fsspec.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"nothing at {url}: publish the data root there first "
                                "(analysis.stages.published.publish(DataRoot(...), url))")
    local = cache / path.rsplit("/", 1)[-1]
    fs.get_file(path, str(local))
    return local


def connect_published_catalog(url: str, cache_dir: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """The catalog published at `url`, read-only: the file is fetched into `cache_dir` (a fresh
    temporary folder by default); its views read the tables at `url` itself."""
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="spectra-catalog-"))
    cache.mkdir(parents=True, exist_ok=True)
    local = _download(f"{url.rstrip('/')}/{CATALOG_FILE}", cache)
    con = connect_catalog(local)
    fs, _ = fsspec.url_to_fs(url)
    con.register_filesystem(fs)
    con.execute(f"SET VARIABLE {ROOT_VARIABLE} = ?", [url.rstrip("/")])
    return con


def load_published_dictionary(url: str, dict_id: str, cache_dir: str | Path | None = None,
                              device: str = "cpu"):
    """One checkpoint published at `url`, fetched and checked against the sha256 its training
    recorded (a damaged or replaced file is named, never loaded)."""
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="spectra-dictionary-"))
    local_dir = cache / dict_id
    local_dir.mkdir(parents=True, exist_ok=True)
    remote_dir = f"{url.rstrip('/')}/dictionaries/{dict_id}"
    summary = json.loads(_download(f"{remote_dir}/{SUMMARY_FILE}", local_dir).read_text())
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # the checkpoint (the summary also covers its table rows)
        record = summary["files"][name]
        path = _download(f"{remote_dir}/{name}", local_dir)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != record["sha256"]:
            raise DamagedArtifact(f"{remote_dir}/{name} has sha256 {digest[:12]}…, but its training recorded "
                                  f"{record['sha256'][:12]}…: publish the data root again")
    return load_dictionary(local_dir, device=device)
