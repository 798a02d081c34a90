"""The data root every asset writes under."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import dagster as dg

from analysis.paths import DataRoot


class StorageResource(dg.ConfigurableResource):
    """A local data root (default `./data`, or $SPECTRA_ROOT)."""

    root: str = "data"

    def data_root(self) -> DataRoot:
        root = Path(self.root).expanduser().resolve()
        check_writable(root)
        return DataRoot(root)


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
