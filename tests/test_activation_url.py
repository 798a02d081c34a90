"""Activation stores at an fsspec URL (memory://) behave exactly like stores on a local path."""

import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr

import analysis.activations.extract as extraction
from analysis.activations.store import StoreLayout, create_store, is_complete, missing_shards
from analysis.activations.extract import extract_shard
from analysis.activations.stats import finalize_stats
from analysis.activations.reader import ActivationStore, iter_images
from analysis.activations.loader import ShuffledLoader
from analysis.paths import DataRoot

N, H, P, D = 90, 8, 4, 5
T = (H // P) ** 2 + 1
HOOKS = ("blocks.0", "blocks.1")


class Capture:
    """Fixed random patch embedding for two hooks; counts calls."""

    def __init__(self):
        self.w = torch.randn(3 * P * P, D, generator=torch.Generator().manual_seed(3))
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        b = x.shape[0]
        tok = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * P * P) @ self.w
        tok = torch.cat([tok.mean(1, keepdim=True), tok], dim=1)
        return {"blocks.0": tok, "blocks.1": torch.sin(tok) + 2}


@pytest.fixture
def images(tmp_path):
    arr = zarr.create_array(store=str(tmp_path / "images.zarr"), shape=(N, H, H, 3),
                            chunks=(32, H, H, 3), dtype="uint8")
    arr[:] = np.random.default_rng(0).integers(0, 256, (N, H, H, 3), dtype=np.uint8)
    return arr


@pytest.fixture
def url():
    """A fresh memory:// prefix (the memory filesystem is process-global), removed afterwards."""
    prefix = f"/spectra-test-{uuid.uuid4().hex}"
    yield f"memory://{prefix}"
    fs = fsspec.filesystem("memory")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


LAYOUT = StoreLayout(N, T, D, images_per_shard=32, images_per_chunk=8, dtype="float16")


def stores_at(base) -> dict:
    return {h: (f"{base}/{h}.zarr" if isinstance(base, str) else base / f"{h}.zarr") for h in HOOKS}


def extract(base, images, capture=None, shards=None) -> dict:
    stores = stores_at(base)
    for h, loc in stores.items():
        create_store(loc, LAYOUT, {"model": "synthetic", "hook": h})
    capture = capture or Capture()
    for s in range(LAYOUT.n_shards) if shards is None else shards:
        extract_shard(capture, images, stores, s, batch_size=12, progress=False)
    return stores


def test_url_round_trip_equals_local(tmp_path, images, url):
    local, remote = extract(tmp_path / "local", images), extract(url, images)
    # Markers and partials are objects under the URL, not files beside it on local disk.
    keys = fsspec.filesystem("memory").find(url.removeprefix("memory://"))
    for part in ("partials/c/2/0", "norms/c/0/0", "acts/c/0/0/0"):
        assert any(k.endswith(f"blocks.1.zarr/{part}") for k in keys), part
    for hook in HOOKS:
        stats_l, stats_r = finalize_stats(local[hook]), finalize_stats(remote[hook])
        for a, b in zip(stats_l, stats_r):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)
        sl, sr = ActivationStore.open(local[hook]), ActivationStore.open(remote[hook])
        assert sr.path == remote[hook] and isinstance(sr.path, str)
        assert sr.lineage == sl.lineage == {"model": "synthetic", "hook": hook}
        torch.testing.assert_close(sr.read(0, N), sl.read(0, N), rtol=0, atol=0)
        torch.testing.assert_close(sr.read_norms(0, N), sl.read_norms(0, N), rtol=0, atol=0)
        for a, b in zip(sr.stats, sl.stats):  # read back from the store, not recomputed
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)
        # The reference: the capture itself, in float16 as stored.
        ref = torch.cat([Capture()(torch.from_numpy(images[i:i + 12]).permute(0, 3, 1, 2).float() / 255)[hook]
                         for i in range(0, N, 12)])
        torch.testing.assert_close(sr.read(0, N), ref.half().float(), rtol=0, atol=0)

        idx = np.arange(3, N, 2)
        loaders = [ShuffledLoader(s, idx, batch_size=50, seed=4, buffer_chunks=3) for s in (sl, sr)]
        for _, (a, b) in zip(range(6), zip(*loaders)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        for (ia, xa), (ib, xb) in zip(iter_images(sl, idx, images_per_batch=7),
                                      iter_images(sr, idx, images_per_batch=7), strict=True):
            np.testing.assert_array_equal(ib, ia)
            torch.testing.assert_close(xb, xa, rtol=0, atol=0)


def test_partial_run_on_a_url_resumes_only_missing_shards(tmp_path, images, url):
    class KilledMidShard(Capture):
        def __call__(self, x):
            if self.calls == 1:
                raise KeyboardInterrupt  # as a killed run: after one batch of shard 1
            return super().__call__(x)

    with pytest.raises(KeyboardInterrupt):
        extract(url, images, capture=KilledMidShard(), shards=[1])
    cap = Capture()
    stores = extract(url, images, capture=cap, shards=[0, 2])
    assert missing_shards(stores["blocks.0"]) == [1] and not is_complete(stores["blocks.1"])
    with pytest.raises(ValueError, match=r"shards \[1\] are missing"):
        ActivationStore.open(stores["blocks.0"])
    calls = cap.calls
    extract(url, images, capture=cap)  # create_store keeps the store; shards 0 and 2 are skipped
    assert cap.calls - calls == -(-32 // 12)  # only shard 1's batches ran
    fresh = extract(tmp_path, images)
    for hook in HOOKS:
        finalize_stats(stores[hook]), finalize_stats(fresh[hook])
        a = zarr.open_group(stores[hook], mode="r")
        b = zarr.open_group(str(fresh[hook]), mode="r")
        for name in ("acts", "norms", "image_idx", "mean", "var", "partials"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_write_failure_on_a_url_marks_no_shard_of_any_hook(images, url, monkeypatch):
    """The norms write of the second hook fails after the first hook's writes landed."""
    real_put = extraction._HookShard._put

    def failing_put(self, name, data, offset):
        if name == "norms" and str(self.location).endswith("blocks.1.zarr"):
            raise OSError("injected write failure")
        real_put(self, name, data, offset)

    monkeypatch.setattr(extraction._HookShard, "_put", failing_put)
    with pytest.raises(extraction.ShardWriteError, match="injected write failure"):
        extract(url, images, shards=[1])
    stores = stores_at(url)
    assert missing_shards(stores["blocks.0"]) == missing_shards(stores["blocks.1"]) == [0, 1, 2]
    monkeypatch.setattr(extraction._HookShard, "_put", real_put)
    extract(url, images, shards=[1])  # a rerun completes it
    assert missing_shards(stores["blocks.0"]) == [0, 2]


def test_partials_failure_marks_no_shard(tmp_path, images, monkeypatch):
    """Data written, statistics partial not: still no marker, so the shard reruns."""
    def failing(group, shard, partial):
        raise OSError("partials failed")

    monkeypatch.setattr(extraction, "write_partial", failing)
    with pytest.raises(extraction.ShardWriteError, match="partials failed"):
        extract(tmp_path, images, shards=[0])
    assert missing_shards(stores_at(tmp_path)["blocks.0"]) == [0, 1, 2]


def test_data_root_places_hook_stores_under_the_url(tmp_path):
    local = DataRoot(tmp_path)
    assert local.hook_store("s1", "blocks.0.hook_resid_post") == tmp_path.resolve() / "activations" / "s1" / "blocks.0.hook_resid_post.zarr"
    remote = DataRoot(tmp_path, activations_url="s3://bucket/acts/")
    assert remote.hook_store("s1", "blocks.0") == "s3://bucket/acts/s1/blocks.0.zarr"
    assert remote.dictionary("d") == tmp_path.resolve() / "dictionaries" / "d"  # only activations move
    moved = DataRoot(tmp_path, activations_url=str(tmp_path / "elsewhere"))
    assert moved.hook_store("s1", "h") == tmp_path.resolve() / "elsewhere" / "s1" / "h.zarr"
    with pytest.raises(ValueError, match="activations_url=''"):
        DataRoot(tmp_path, activations_url="")
