"""Whole shard files of an uncompressed, row-sharded Zarr v3 array, written in one store call.

Extraction writes each Zarr shard file of its arrays whole. Through `array[lo:hi] = data`, zarr
encodes the file chunk by chunk in its generic codec pipeline: 2.1 ms of CPU for a 2.2 MB file
and 1.1 ms for a 70 kB one (measured, zarr 3.1.6), mostly Python that holds the GIL while the
forward pass on the caller's thread waits for it. For the arrays the store creates (no
compressor, shards spanning whole rows) the file is simple enough to build directly, as the
Zarr v3 sharding spec lays it out:

    the inner chunks' raw little-endian C-order bytes, one after another, then the index:
    (offset, nbytes) as little-endian uint64 per inner chunk, followed by the crc32c of those
    index bytes as little-endian uint32 (index codecs `bytes` + `crc32c`, index at the end)

Because a shard spans whole rows and inner chunks split only the first axis, that payload is the
rows' bytes as they are in memory plus a small index: 1.0 ms and 0.45 ms of CPU for the same two
files through the store, 0.69 and 0.17 ms written straight to a local file. The bytes are
identical to zarr's own (tests/test_zarr_shard_file.py compares them), and anything else —
another codec chain, a partial last shard, an unaligned range — goes through zarr unchanged.
"""

from __future__ import annotations

import os
import uuid

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore


def _is_little_bytes(codec) -> bool:
    return isinstance(codec, BytesCodec) and getattr(codec.endian, "value", codec.endian) in (None, "little")


def direct_layout(array: zarr.Array) -> tuple[int, int] | None:
    """(rows per shard file, rows per inner chunk) when `array`'s shard files can be written
    directly, else None."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
        return None
    sharding = meta.codecs[0]
    if not isinstance(sharding, ShardingCodec):
        return None
    index_codecs = tuple(sharding.index_codecs)
    if (
        len(sharding.codecs) != 1 or not _is_little_bytes(sharding.codecs[0])
        or len(index_codecs) != 2 or not _is_little_bytes(index_codecs[0])
        or not isinstance(index_codecs[1], Crc32cCodec)
        or str(getattr(sharding.index_location, "value", sharding.index_location)) != "end"
    ):
        return None
    shard_shape, chunk_shape = tuple(array.shards), tuple(sharding.chunk_shape)
    whole_rows = tuple(array.shape[1:])
    if shard_shape[1:] != whole_rows or chunk_shape[1:] != whole_rows or shard_shape[0] % chunk_shape[0]:
        return None
    return shard_shape[0], chunk_shape[0]


class ShardFileWriter:
    """Writes row ranges of one array: whole aligned shard files directly, the rest through zarr."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.layout = direct_layout(array)
        self.dtype = np.dtype(array.dtype).newbyteorder("<") if np.dtype(array.dtype).itemsize > 1 \
            else np.dtype(array.dtype)
        self._prototype = default_buffer_prototype()
        self.written: dict[str, tuple[int, int]] = {}
        """store key -> (size, crc32c) of each file written directly, taken from the bytes in
        memory (the store's file records then need no read-back of these)."""

    def write(self, start: int, data: np.ndarray) -> None:
        """`array[start : start + len(data)] = data`."""
        stop = start + len(data)
        if self.layout is None or start % self.layout[0] or len(data) != self.layout[0] \
                or stop > self.array.shape[0] or data.shape[1:] != self.array.shape[1:]:
            self.array[start:stop] = data
            return
        body = np.ascontiguousarray(data, dtype=self.dtype).view(np.uint8).reshape(-1)
        index = self._index(body.size)
        coords = (start // self.layout[0],) + (0,) * (self.array.ndim - 1)
        key = "/".join(p for p in (self.array.store_path.path, self.array.metadata.encode_chunk_key(coords)) if p)
        store = self.array.store_path.store
        if isinstance(store, LocalStore):
            _write_local(store, key, body, index)
        else:
            payload = np.concatenate([body, np.frombuffer(index, dtype=np.uint8)])
            sync(store.set(key, self._prototype.buffer.from_array_like(payload)))
        self.written[key] = (body.size + len(index), google_crc32c.extend(google_crc32c.value(body), index))

    def _index(self, body_bytes: int) -> bytes:
        """The shard index: (offset, nbytes) per inner chunk, then its crc32c."""
        n_chunks = self.layout[0] // self.layout[1]
        chunk_bytes = body_bytes // n_chunks
        index = np.empty((n_chunks, 2), dtype="<u8")
        index[:, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
        index[:, 1] = chunk_bytes
        index_bytes = index.tobytes()
        return index_bytes + np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()


def _write_local(store: LocalStore, key: str, body: np.ndarray, index: bytes) -> None:
    """The file written from this thread, through a temporary file and a rename as zarr's
    LocalStore does (a reader never sees half a file): without zarr's event loop and I/O thread,
    0.69 instead of 1.14 ms of CPU for a 2.2 MB file, 0.17 instead of 0.45 ms for 70 kB (measured)."""
    if store.read_only:
        raise ValueError(f"store {store} is read-only: open it with mode='r+' to write")
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(memoryview(body))
            f.write(index)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
