"""The data root every asset writes under, and where activation stores live."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import dagster as dg

from analysis.catalog import check_sql_path
from analysis.paths import DataRoot


class StorageResource(dg.ConfigurableResource):
    """A local data root (default `./data`, or $SPECTRA_ROOT); activation stores optionally elsewhere."""

    root: str = "data"
    activations_url: str | None = None
    """Where activation stores live: None for <root>/activations, else an fsspec URL such as
    s3://bucket/spectra/activations ($SPECTRA_ACTIVATIONS_URL; s3:// needs `pip install s3fs`)."""

    publish_url: str | None = None
    """Where the `published` asset copies the tables, checkpoints, models and catalog after each
    run (`analysis.stages.published`; $SPECTRA_PUBLISH_URL); None: nothing is published."""

    def data_root(self) -> DataRoot:
        root = check_sql_path(self.root)  # fail at the first asset, not at the catalog after all the work
        check_writable(root)
        url = self.activations_url or None
        if url is not None and "://" in url:
            check_url(url)
        elif url is not None:
            check_writable(Path(url).expanduser().resolve())
        return DataRoot(root, activations_url=url)


def check_url(url: str, setting: str = "activations_url") -> None:
    """Fail early, naming the URL (the `setting` it came from), when it carries credentials, when
    no fsspec filesystem serves its scheme (e.g. s3fs not installed) or when a test object cannot be
    written and removed there (no server, no bucket, no permission): before any work, not deep
    inside an asset."""
    import fsspec
    from urllib.parse import urlsplit

    if urlsplit(url).password is not None:  # it would be logged and recorded wherever the URL is
        raise ValueError(f"{setting}: the URL carries a password; remove it from the URL and give the credentials "
                         "through the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"{setting}={url!r}: no filesystem for {protocol!r}:// ({err}); install its fsspec "
            "backend (s3:// needs `pip install s3fs`, gs:// `pip install gcsfs`) or unset "
            f"SPECTRA_{setting.upper()} (activation stores then stay under <root>/activations; nothing is published)"
        ) from err
    probe = f"{url.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.url_to_fs(probe)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as err:  # each backend raises its own (OSError, botocore's, PermissionError, …)
        raise ValueError(
            f"{setting}={url!r} is not writable: writing {probe} failed ({type(err).__name__}: {err}); "
            "check that the server is reachable, the bucket exists and the credentials in the environment "
            "(e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) may write there"
        ) from None


def check_writable(root: Path) -> None:
    """Fail early, naming the path, instead of deep inside an asset after work was done."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"data root {root} is not writable ({err.strerror}): set SPECTRA_ROOT to a directory "
            f"you can write, e.g. SPECTRA_ROOT=$HOME/spectra-data"
        ) from err
    if not os.access(root, os.W_OK):
        raise PermissionError(f"data root {root} is not writable: set SPECTRA_ROOT to a writable directory")
