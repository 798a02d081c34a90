"""The files that hold each extraction shard of a store, with their recorded sizes and crc32c.

A Zarr chunk or shard file that is missing reads as the fill value (zeros), silently, and a
truncated one fails deep inside a read without naming the file (DESIGN.md §3). So before a
shard's completion marker (its `partials` row) is written, extraction reads each of the shard's
files back and records its size and crc32c in the `files` array (one row, one object, per
shard, like `partials`). Opening a store checks every completed shard's files against their
recorded sizes (a stat each); `check_shards(..., full=True)` rereads them against the crc32c.

The Zarr shard index has its own crc32c, but it covers only the index, not the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

FILES = "files"  # array (n_shards, 2 * FILES_PER_SHARD) uint64: [size, crc32c] per file of the shard
ARRAYS = ("acts", "norms", "image_idx")
MAX_FILES_PER_ARRAY = 4  # StoreLayout.images_per_write splits a shard into at most 4 files


@dataclass(frozen=True)
class ShardDamage:
    shard: int
    key: str
    problem: str

    def __str__(self) -> str:
        return f"shard {self.shard}, file {self.key}: {self.problem}"


def files_row_width() -> int:
    return 2 * MAX_FILES_PER_ARRAY * len(ARRAYS)


def create_files_array(group: zarr.Group, n_shards: int) -> None:
    group.create_array(FILES, shape=(n_shards, files_row_width()), chunks=(1, files_row_width()),
                       dtype="uint64", compressors=None, fill_value=0)


def shard_keys(group: zarr.Group, shard: int, start: int, stop: int, arrays: list | None = None) -> list[str]:
    """Store keys of the files holding images [start, stop) of every array, in a fixed order;
    `arrays` (from `file_arrays`) saves re-reading the arrays' metadata for each shard."""
    keys = []
    for array in file_arrays(group) if arrays is None else arrays:
        per_file = array.shards[0] if array.shards else array.chunks[0]
        files = range(start // per_file, math.ceil(stop / per_file))
        if len(files) > MAX_FILES_PER_ARRAY:
            raise ValueError(f"shard {shard} of {array.basename} spans {len(files)} files, more than the "
                             f"{MAX_FILES_PER_ARRAY} a `files` row records")
        for f in files:
            chunk_key = array.metadata.encode_chunk_key((f,) + (0,) * (array.ndim - 1))
            keys.append(_join(array.store_path.path, chunk_key))
    return keys


def file_arrays(group: zarr.Group) -> list[zarr.Array]:
    """The arrays whose files `files` records, opened once (each open parses their metadata)."""
    return [group[name] for name in ARRAYS]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _store(group: zarr.Group):
    return group.store_path.store


def _size(store, key: str) -> int | None:
    """The file's size in bytes, None when it does not exist."""
    if isinstance(store, LocalStore):
        try:
            return (store.root / key).stat().st_size
        except FileNotFoundError:
            return None
    try:
        return int(sync(store.getsize(key)))
    except FileNotFoundError:
        return None


def _crc32c(store, key: str) -> int | None:
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else google_crc32c.value(buffer.to_bytes())


def record_shard_files(group: zarr.Group, shard: int, start: int, stop: int,
                       known: dict[str, tuple[int, int]] | None = None) -> None:
    """Record [size, crc32c] of each of the shard's files: after its data has landed, before its
    completion marker. `known` gives (size, crc32c) of files whose bytes the writer had in memory;
    the others (written through zarr) are read back."""
    store, row = _store(group), np.zeros(files_row_width(), dtype=np.uint64)
    for i, key in enumerate(shard_keys(group, shard, start, stop)):
        size, crc = (known or {}).get(key) or _read_record(store, shard, key)
        landed = _size(store, key)
        if landed != size:  # landed whole: a short write must not be vouched for
            raise OSError(f"shard {shard}'s file {key} holds {landed} bytes, {size} were written (store {store})")
        row[2 * i: 2 * i + 2] = (size, crc)
    group[FILES][shard] = row


def _read_record(store, shard: int, key: str) -> tuple[int, int]:
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        raise FileNotFoundError(f"shard {shard}'s file {key} was not written (store {store})")
    data = buffer.to_bytes()
    return len(data), google_crc32c.value(data)


def check_shards(group: zarr.Group, shards, bounds, *, full: bool = False) -> list[ShardDamage]:
    """Damage in the given completed shards' files: missing, a size other than recorded, or
    (full) a crc32c other than recorded. `bounds(shard)` gives the shard's image range."""
    if FILES not in group:
        return []  # callers check the store format first; nothing recorded, nothing to compare
    store, records, arrays = _store(group), group[FILES], file_arrays(group)
    shards = list(shards)
    rows = records[:] if len(shards) > 1 else {s: records[s] for s in shards}  # one read for many shards
    damage = []
    for shard in shards:
        row = rows[shard]
        for i, key in enumerate(shard_keys(group, shard, *bounds(shard), arrays)):
            size, crc = int(row[2 * i]), int(row[2 * i + 1])
            found = _size(store, key)
            if found is None:
                damage.append(ShardDamage(shard, key, "missing (it would read as zeros)"))
            elif size == 0:
                damage.append(ShardDamage(shard, key, "no size or checksum recorded"))
            elif found != size:
                damage.append(ShardDamage(shard, key, f"{found} bytes, {size} were written (truncated or replaced)"))
            elif full and _crc32c(store, key) != crc:
                damage.append(ShardDamage(shard, key, "content changed: crc32c differs from the one recorded"))
    return damage


def remove_partials(group: zarr.Group, shard: int, start: int, stop: int) -> None:
    """Delete the temporaries (`<file>.<uuid>.partial`, shard_file's) of the shard's files that a
    killed extraction left behind; local stores only (object stores write whole objects)."""
    store = _store(group)
    if not isinstance(store, LocalStore):
        return
    for key in shard_keys(group, shard, start, stop):
        path = store.root / key
        for tmp in path.parent.glob(f"{path.name}.*.partial") if path.parent.is_dir() else []:
            tmp.unlink(missing_ok=True)
