"""Direct shard-file writes produce exactly zarr's own bytes, and fall back to zarr otherwise."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zarr

from analysis.activations.store import StoreLayout, create_store, open_store_group
from analysis.activations.shard_file import ShardFileWriter, direct_layout

LAYOUT = StoreLayout(n_images=40, n_tokens=5, d_model=6, images_per_shard=40, images_per_chunk=4, dtype="float16")


def _stored_files(array: zarr.Array) -> dict[str, bytes]:
    """Every chunk key of `array` and its bytes, read through the array's own store."""
    store, prefix = array.store_path.store, "/".join(p for p in (array.path, "c") if p)

    async def read():
        keys = [k async for k in store.list_prefix(prefix)]
        return {k: (await store.get(k, zarr.core.buffer.default_buffer_prototype())).to_bytes() for k in keys}

    return zarr.core.sync.sync(read())


def _pair(location_a, location_b, layout=LAYOUT):
    for loc in (location_a, location_b):
        create_store(loc, layout, {"test": True})
    return open_store_group(location_a, "r+"), open_store_group(location_b, "r+")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_direct_files_equal_zarr_bytes(tmp_path, dtype, where):
    layout = StoreLayout(**{**LAYOUT.__dict__, "dtype": dtype})
    if where == "local":
        a_loc, b_loc = tmp_path / "a.zarr", tmp_path / "b.zarr"
    else:
        a_loc, b_loc = (f"memory://{uuid.uuid4().hex}/{n}.zarr" for n in "ab")
    by_zarr, direct = _pair(a_loc, b_loc, layout)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((40, 5, 6)).astype(by_zarr["acts"].dtype) if dtype != "bfloat16" else \
        rng.integers(0, 2**16, size=(40, 5, 6), dtype=np.uint16)  # bfloat16 is stored as its bits
    values = {"acts": acts, "norms": rng.standard_normal((40, 5)).astype(np.float32),
              "image_idx": np.arange(40, dtype=np.int64)}
    for name, data in values.items():
        rows = direct_layout(direct[name])[0]
        assert rows == layout.images_per_write
        writer = ShardFileWriter(direct[name])
        for lo in range(0, 40, rows):
            by_zarr[name][lo:lo + rows] = data[lo:lo + rows]
            writer.write(lo, data[lo:lo + rows])
        np.testing.assert_array_equal(direct[name][...], data)
        files_zarr, files_direct = _stored_files(by_zarr[name]), _stored_files(direct[name])
        assert len(files_direct) == 40 // rows
        assert files_direct == files_zarr


def test_unaligned_and_partial_writes_go_through_zarr(tmp_path):
    # 40 images in files of 14: the last file is partial
    layout = StoreLayout(n_images=40, n_tokens=5, d_model=6, images_per_shard=42, images_per_chunk=2)
    by_zarr, direct = _pair(tmp_path / "a.zarr", tmp_path / "b.zarr", layout)
    assert direct_layout(direct["acts"]) == (14, 2)
    data = np.random.default_rng(1).standard_normal((40, 5, 6)).astype(np.float16)
    writer = ShardFileWriter(direct["acts"])
    spans = [(0, 3), (3, 14), (14, 28), (28, 40)]  # short, unaligned, whole, past the end
    for lo, hi in spans:
        writer.write(lo, data[lo:hi])
        by_zarr["acts"][lo:hi] = data[lo:hi]
    np.testing.assert_array_equal(direct["acts"][...], data)
    assert _stored_files(direct["acts"]) == _stored_files(by_zarr["acts"])


def test_other_codecs_are_written_by_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    compressed = group.create_array("x", shape=(8, 3), chunks=(2, 3), shards=(4, 3), dtype="float32")
    unsharded = group.create_array("y", shape=(8, 3), chunks=(2, 3), dtype="float32", compressors=None)
    split_rows = group.create_array("z", shape=(8, 4), chunks=(2, 2), shards=(4, 4), dtype="float32",
                                    compressors=None)
    data = np.arange(24, dtype=np.float32).reshape(8, 3)
    for array, values in ((compressed, data), (unsharded, data), (split_rows, np.ones((8, 4), np.float32))):
        assert direct_layout(array) is None
        writer = ShardFileWriter(array)
        writer.write(0, values[:4])
        writer.write(4, values[4:])
        np.testing.assert_array_equal(array[...], values)


def test_read_only_store_refuses(tmp_path):
    create_store(tmp_path / "a.zarr", LAYOUT, {"test": True})
    writer = ShardFileWriter(open_store_group(tmp_path / "a.zarr", "r")["norms"])
    with pytest.raises(Exception, match="read.only|read-only"):
        writer.write(0, np.zeros((LAYOUT.images_per_write, 5), np.float32))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_array_at_the_store_root(tmp_path, where):
    """Keys without a group prefix: the file lands where zarr puts it, not at a rooted path."""
    locations = [str(tmp_path / n) for n in ("a.zarr", "b.zarr")] if where == "local" else \
        [f"memory://{uuid.uuid4().hex}/{n}.zarr" for n in "ab"]
    made = [zarr.create_array(store=loc, shape=(8, 3), chunks=(2, 3), shards=(4, 3), dtype="float32",
                              compressors=None, fill_value=0) for loc in locations]
    data = np.arange(24, dtype=np.float32).reshape(8, 3)
    made[0][...] = data
    writer = ShardFileWriter(made[1])
    assert writer.layout == (4, 2)
    writer.write(0, data[:4])
    writer.write(4, data[4:])
    np.testing.assert_array_equal(made[1][...], data)
    assert _stored_files(made[1]) == _stored_files(made[0]) and len(_stored_files(made[1])) == 2
