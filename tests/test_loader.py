"""Reading stores: ActivationStore, split_images, ShuffledLoader, iter_images."""

import threading

import numpy as np
import pytest
import torch
import zarr

from analysis.activations.store import StoreLayout, create_store
from analysis.activations.extract import extract_shard
from analysis.activations.stats import finalize_stats
from analysis.activations.reader import ActivationStore, iter_images, split_images
from analysis.activations.loader import LoaderState, ShuffledLoader

N, H, P, D = 100, 8, 4, 6
T = (H // P) ** 2 + 1
IPC = 8  # images per chunk


def capture(x):
    """Fixed random patch embedding plus a CLS-like mean token: unique float rows."""
    w = torch.randn(3 * P * P, D, generator=torch.Generator().manual_seed(1))
    b = x.shape[0]
    tok = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * P * P) @ w
    return {"h": torch.cat([tok.mean(1, keepdim=True), tok], dim=1)}


def make_store(root, dtype="float32", shards=None):
    images = zarr.create_array(store=str(root / "images.zarr"), shape=(N, H, H, 3),
                               chunks=(32, H, H, 3), dtype="uint8")
    images[:] = np.random.default_rng(0).integers(0, 256, (N, H, H, 3), dtype=np.uint8)
    lay = StoreLayout(N, T, D, images_per_shard=32, images_per_chunk=IPC, dtype=dtype)
    path = root / "h.zarr"
    create_store(path, lay, {"model": "synthetic", "seed": 1})
    for s in range(lay.n_shards) if shards is None else shards:
        extract_shard(capture, images, {"h": path}, s, batch_size=16, progress=False)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ActivationStore.open(make_store(tmp_path_factory.mktemp("store")))


def rows_of(store, images):
    return store.read(0, store.n_images)[torch.as_tensor(np.sort(images))].reshape(-1, D)


def sort_rows(x):
    x = x.numpy()
    return x[np.lexsort(x.T[::-1])]


class CountingStore(ActivationStore):
    """Records every read so tests can check that only whole chunks are read."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = []

    def read_raw(self, start, stop):
        self.reads.append((start, stop))
        return super().read_raw(start, stop)


def test_open_read_and_metadata(tmp_path):
    path = make_store(tmp_path, dtype="bfloat16")
    s = ActivationStore.open(path)
    assert (s.n_images, s.n_tokens, s.d_model, s.dtype, s.chunk_images) == (N, T, D, "bfloat16", IPC)
    assert s.lineage == {"model": "synthetic", "seed": 1}
    x = s.read(10, 13)
    assert x.dtype == torch.float32 and x.shape == (3, T, D)
    raw = zarr.open_group(str(path), mode="r")["acts"][10:13]
    torch.testing.assert_close(x, torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float())
    with pytest.raises(ValueError, match="expected 0 <= start"):
        s.read(0, N + 1)
    merged = s.stats  # not finalized yet: merged from the partials in memory
    final = finalize_stats(path)
    torch.testing.assert_close(torch.from_numpy(merged.mean), torch.from_numpy(final.mean))
    assert ActivationStore.open(path).stats.n_tokens == N * T


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loader_decodes_16bit_stores(tmp_path, dtype):
    s = ActivationStore.open(make_store(tmp_path, dtype=dtype))
    picked = np.arange(5, 60)
    got = torch.cat(list(ShuffledLoader(s, picked, batch_size=16, drop_last=False).epoch(0)))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(sort_rows(got), sort_rows(rows_of(s, picked)))
    f32 = ActivationStore.open(make_store(tmp_path / "f32", dtype="float32")).read(0, N)
    tol = {"float16": 1e-3, "bfloat16": 1e-2}[dtype]
    torch.testing.assert_close(s.read(0, N), f32, rtol=tol, atol=tol)


def test_open_incomplete_names_missing_shards(tmp_path):
    path = make_store(tmp_path, shards=[0, 3])
    with pytest.raises(ValueError, match=r"shards \[1, 2\] are missing"):
        ActivationStore.open(path)


def test_split_images():
    train, ev = split_images(N, 0.2, seed=3)
    assert len(ev) == 20 and len(np.intersect1d(train, ev)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, ev])), np.arange(N))
    np.testing.assert_array_equal(split_images(N, 0.2, seed=3)[1], ev)
    assert not np.array_equal(split_images(N, 0.2, seed=4)[1], ev)
    with pytest.raises(ValueError, match="fraction in"):
        split_images(N, 1.5, 0)


@pytest.mark.parametrize("batch_size,buffer_chunks", [(32, 3), (50, 2), (7, 1)])
def test_every_token_once_per_epoch(store, batch_size, buffer_chunks):
    train, _ = split_images(N, 0.3, seed=0)
    loader = ShuffledLoader(store, train, batch_size=batch_size, buffer_chunks=buffer_chunks,
                            drop_last=False, seed=5)
    batches = list(loader.epoch(0))
    assert all(len(b) == batch_size for b in batches[:-1]) and len(batches) == loader.batches_per_epoch()
    np.testing.assert_array_equal(sort_rows(torch.cat(batches)), sort_rows(rows_of(store, train)))


def test_drop_last_drops_only_the_final_partial_batch(store):
    train, _ = split_images(N, 0.3, seed=0)
    loader = ShuffledLoader(store, train, batch_size=32, buffer_chunks=2)
    got = torch.cat(list(loader.epoch(1)))
    n_rows = len(train) * T
    assert len(got) == (n_rows // 32) * 32 and n_rows % 32
    everything = {tuple(r) for r in rows_of(store, train).tolist()}
    got_rows = [tuple(r) for r in got.tolist()]
    assert len(set(got_rows)) == len(got_rows) and set(got_rows) <= everything


def test_only_requested_images_appear(store):
    train, ev = split_images(N, 0.3, seed=0)
    got = torch.cat(list(ShuffledLoader(store, ev, batch_size=16, drop_last=False).epoch(0)))
    np.testing.assert_array_equal(sort_rows(got), sort_rows(rows_of(store, ev)))
    train_rows = {tuple(r) for r in rows_of(store, train).tolist()}
    assert not any(tuple(r) in train_rows for r in got.tolist())


def test_deterministic_per_seed_and_epoch(store):
    idx = np.arange(N)
    a = torch.cat(list(ShuffledLoader(store, idx, batch_size=64, seed=1, prefetch=1).epoch(0)))
    b = torch.cat(list(ShuffledLoader(store, idx, batch_size=64, seed=1, prefetch=3).epoch(0)))
    c = torch.cat(list(ShuffledLoader(store, idx, batch_size=64, seed=1).epoch(1)))
    d = torch.cat(list(ShuffledLoader(store, idx, batch_size=64, seed=2).epoch(0)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == c.shape == d.shape
    assert not torch.equal(a, c) and not torch.equal(a, d)
    full = lambda e: torch.cat(list(ShuffledLoader(store, idx, batch_size=64, seed=1, drop_last=False).epoch(e)))
    e0, e1 = full(0), full(1)
    assert not torch.equal(e0, e1)
    np.testing.assert_array_equal(sort_rows(e0), sort_rows(e1))  # same tokens, new order


def test_reads_are_whole_chunks_of_selected_images_only(store):
    counting = CountingStore(store.path)
    picked = np.array([0, 1, 17, 18, 19, 60, 99])  # chunks 0, 2, 7, 12
    loader = ShuffledLoader(counting, picked, batch_size=5, buffer_chunks=2, drop_last=False)
    n = sum(len(b) for b in loader.epoch(0))
    assert n == len(picked) * T
    assert sorted(counting.reads) == [(0, 8), (16, 24), (56, 64), (96, 100)]


def test_resume_from_state_matches_uninterrupted_stream(store):
    train, _ = split_images(N, 0.3, seed=0)
    make = lambda: ShuffledLoader(store, train, batch_size=24, buffer_chunks=2, seed=9)
    per_epoch = make().batches_per_epoch()
    stream = iter(make())
    reference = [next(stream) for _ in range(2 * per_epoch + 3)]
    for cut in (1, 5, per_epoch - 1, per_epoch, per_epoch + 2):  # mid-buffer carries included
        first = make()
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state()
        epoch, within = divmod(cut, per_epoch)
        expected = LoaderState(epoch, within) if within else LoaderState(epoch - 1, per_epoch)
        assert state == expected
        resumed = make()
        resumed.load_state(tuple(state))
        it2 = iter(resumed)
        for k in range(cut, cut + per_epoch + 1):
            torch.testing.assert_close(next(it2), reference[k], rtol=0, atol=0, msg=f"cut {cut} batch {k}")


def test_stopping_early_ends_the_prefetch_thread(store):
    before = threading.active_count()
    gen = ShuffledLoader(store, np.arange(N), batch_size=8, buffer_chunks=1).epoch(0)
    next(gen)
    gen.close()
    assert threading.active_count() == before


def test_loader_validation(store):
    with pytest.raises(ValueError, match="duplicates"):
        ShuffledLoader(store, [1, 1, 2])
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\)"):
        ShuffledLoader(store, [5, 100])
    with pytest.raises(ValueError, match="no full batch"):
        ShuffledLoader(store, [1], batch_size=4096)


def test_iter_images_order_and_values(store):
    picked = np.array([97, 3, 4, 40, 12, 13, 14, 15, 16, 80])
    got = list(iter_images(store, picked, images_per_batch=4))
    assert [len(i) for i, _ in got] == [4, 4, 2]
    idx = np.concatenate([i for i, _ in got])
    np.testing.assert_array_equal(idx, np.sort(picked))
    acts = torch.cat([a for _, a in got])
    torch.testing.assert_close(acts, store.read(0, N)[torch.as_tensor(idx)], rtol=0, atol=0)
