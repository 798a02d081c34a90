"""Atomic writes, and done-markers that vouch for the files they mark finished.

A stage's done-marker (`train_summary.json`, `evaluation.json`, `result.json`, …) is written
last, through a temporary file and a rename. Besides the stage's summary it records, for every
file the stage wrote, the size and the sha256 (paths relative to the marker's folder, so a
copied data root checks its own files). Reuse always runs the cheap check (presence and size);
`full=True` rereads every file against its sha256. A marker whose files fail the check is
reported with every damaged path, then removed, so the stage redoes the work from its inputs:
a damaged artifact is never reused, and never silently.

Why sizes and checksums rather than trusting the marker: a truncated or deleted file under a
marker used to be reused as if finished (a truncated weights file failed only at load, without
a path; a truncated Parquet part broke the catalog on every rerun).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger("spectra.integrity")

FILES_KEY = "files"  # the marker's record of what it vouches for: relative path -> {size, sha256}

# The process umask, read once: reading it means setting it, which must not race file creation
# in other threads. Files are created with the permissions the umask gives plain files (0644 by
# default), whatever the writing library chose (safetensors writes 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class DamagedArtifact(Exception):
    """Files a done-marker vouches for are missing, truncated or changed."""


@dataclass(frozen=True)
class Damage:
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the file at a temporary name beside `path`; it is then flushed to disk
    and renamed over `path`, so a reader (or a rerun after a kill) sees the old file or the whole
    new one, never part of one. Concurrent writers of one path each use their own temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def remove_temporaries(*directories: Path) -> None:
    """Delete the temporaries of writes killed before their rename (atomic_write's `.<name>.*.tmp`)
    in these folders. Only for a caller holding the lock of everything written there: another
    process's write in flight would lose its temporary."""
    for directory in directories:
        for tmp in Path(directory).glob(".*.tmp") if Path(directory).is_dir() else []:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _expand(paths: Iterable[Path]) -> Iterator[Path]:
    """Files, with folders (a Zarr array or group) expanded to every file under them."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        else:
            yield p


def file_records(base: Path, paths: Iterable[Path]) -> dict[str, dict]:
    """{path relative to `base` (may climb with ..): {size, sha256}} for files and folders' files."""
    return {os.path.relpath(p, base): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _expand(paths)}


def check_files(base: Path, records: dict[str, dict], *, full: bool = False) -> list[Damage]:
    """Every recorded file present with its size; with `full`, its sha256 too."""
    damage = []
    for rel, rec in records.items():
        path = Path(os.path.normpath(base / rel))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            damage.append(Damage(path, "missing"))
            continue
        if size != rec["size"]:
            damage.append(Damage(path, f"{size} bytes, {rec['size']} were written (truncated or replaced)"))
        elif full and sha256_file(path) != rec["sha256"]:
            damage.append(Damage(path, f"content changed: sha256 differs from the {rec['sha256'][:12]}… written"))
    return damage


def write_done(marker: str | Path, summary: dict, files: Iterable[Path]) -> dict:
    """Write the done-marker last: `summary` plus the records of `files` (folders expanded);
    returns the summary as `read_done` will."""
    marker = Path(marker)
    if FILES_KEY in summary:
        raise ValueError(f"a done-marker summary may not have a {FILES_KEY!r} key: it is the marker's own")
    write_json(marker, {**summary, FILES_KEY: file_records(marker.parent, files)})
    return json.loads(json.dumps(summary))  # as a later read_done returns it (tuples become lists)


def marker_damage(marker: str | Path, *, full: bool = False) -> list[Damage] | None:
    """None when there is no marker; else what is wrong with it or the files it vouches for."""
    marker = Path(marker)
    try:
        content = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [Damage(marker, f"not readable JSON ({err})")]
    if not isinstance(content, dict) or not isinstance(content.get(FILES_KEY), dict):
        return [Damage(marker, "records no files (written by an older version): its work is redone")]
    return check_files(marker.parent, content[FILES_KEY], full=full)


def _records(marker: Path) -> dict[Path, dict]:
    """A marker's file records by normalized absolute path ({} when it has none)."""
    try:
        files = json.loads(marker.read_text()).get(FILES_KEY) or {}
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return {Path(os.path.normpath(marker.parent / rel)): rec for rel, rec in files.items()}


def stale_inputs(marker: Path, upstream: Path) -> list[Damage]:
    """Files both markers vouch for whose sha256 differ: `marker`'s work read a version of its
    input (e.g. a dictionary's weights) that `upstream`'s stage has since replaced."""
    mine, theirs = _records(marker), _records(upstream)
    return [Damage(path, f"changed since {marker.name} was computed from it (now recorded by {upstream.name})")
            for path, rec in mine.items() if path in theirs and theirs[path]["sha256"] != rec["sha256"]]


def read_done(marker: str | Path, *, full: bool = False, upstream: str | Path | None = None) -> dict | None:
    """The summary of a finished stage, or None when it must be (re)done: no marker, a marker
    whose files are damaged, or (with `upstream`, the done-marker of this stage's input) one
    computed from files the upstream stage has since rewritten. Damage is logged with every path
    and the marker removed, so the stage's rerun replaces the files instead of reusing them."""
    marker = Path(marker)
    damage = marker_damage(marker, full=full)
    if damage is None:
        return None
    if not damage and upstream is not None:
        damage = stale_inputs(marker, Path(upstream))
    if damage:
        log.warning("damaged artifact, redoing it: %s", "; ".join(map(str, damage)))
        marker.unlink(missing_ok=True)
        return None
    content = json.loads(marker.read_text())
    content.pop(FILES_KEY)
    return content


def require_done(marker: str | Path, what: str, fix: str) -> dict:
    """The summary of a finished stage whose files pass the cheap check; raises naming the damage
    (or the absence) and `fix` otherwise. For readers, which must not redo the work themselves."""
    marker = Path(marker)
    damage = marker_damage(marker)
    if damage is None:
        raise FileNotFoundError(f"no finished {what} at {marker.parent} ({marker.name} is missing): {fix}")
    if damage:
        raise DamagedArtifact(f"{what} at {marker.parent} is damaged: {'; '.join(map(str, damage))}; {fix}")
    content = json.loads(marker.read_text())
    content.pop(FILES_KEY)
    return content


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path` for the block: a second process on the same
    machine waits here until the first leaves, then sees its finished work. The lock dies with
    its process, so a killed holder never leaves it stuck."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
