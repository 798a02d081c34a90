"""Content-derived ids: the same inputs land on the same paths, a changed input lands elsewhere.

An id is `<prefix>-<12 hex>` of the SHA-256 of a canonical JSON payload (the config plus the ids of
everything upstream). Never a timestamp.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path


def canonical_json(payload) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot hash {type(value).__name__} {value!r} into an id: use plain JSON values")


def content_id(prefix: str, payload) -> str:
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus the git commit when run from a checkout (lineage, not ids)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("spectra")
    except PackageNotFoundError:
        v = "0+unknown"
    sha = _git("rev-parse", "--short=12", "HEAD")
    return v if sha is None else f"{v}+g{sha.strip()}"


@lru_cache(maxsize=1)
def code_modified() -> bool | None:
    """Whether tracked files differ from the commit `code_version` names (lineage, not ids): the
    commit alone then does not say what code ran. Untracked files are not counted, as in
    `git describe --dirty`. None when that cannot be told (no git, or not run from a checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def _git(*args: str) -> str | None:
    """The output of a git command run in the package's folder, or None when it fails."""
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
