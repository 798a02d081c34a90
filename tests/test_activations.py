"""Activation extraction: values, dtypes, token selection, resume, failures, stats."""

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from analysis.activations.extract import ShardWriteError, extract_shard
from analysis.activations.store import StoreLayout, create_store, is_complete, missing_shards
from analysis.activations.stats import finalize_stats
from analysis.activations.threads import spare_core
from analysis.models.inputs import to_model_input

N, H, P, D = 150, 8, 4, 12  # images, image side, patch side, width
T = (H // P) ** 2 + 1  # patches + a CLS-like token
BATCH = 20  # deliberately not a divisor of the chunk size


def make_images(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, H, H, 3), dtype=np.uint8)


class SyntheticCapture:
    """A fixed random patch embedding: pixels -> (B, T, d) for two hooks."""

    def __init__(self, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * P * P, D, generator=g) * scale
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        b = x.shape[0]
        patches = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * P * P)
        tok = patches @ self.w
        tok = torch.cat([tok.mean(1, keepdim=True), tok], dim=1)
        return {"blocks.0": tok, "blocks.1": torch.tanh(tok) * 3 - 1}


def reference(capture, images, hook, batch=BATCH):
    """The capture run on the same batches extraction uses, in fp32."""
    outs = [capture(to_model_input(images[i : i + batch]))[hook] for i in range(0, len(images), batch)]
    return torch.cat(outs).float()


@pytest.fixture(autouse=True, params=["worker thread", "inline"])
def worker_mode(request, monkeypatch):
    """Every test runs both ways extraction does its non-forward work: on a worker thread (a core
    is spare) and on the caller's thread (torch's threads fill every core)."""
    from analysis.activations import extract as activation_extract

    monkeypatch.setattr(activation_extract, "spare_core", lambda device: request.param == "worker thread")
    return request.param


@pytest.fixture
def image_array(tmp_path):
    arr = zarr.create_array(store=str(tmp_path / "images.zarr"), shape=(N, H, H, 3),
                            chunks=(64, H, H, 3), dtype="uint8")
    arr[:] = make_images()
    return arr


def layout(**kw):
    base = dict(n_images=N, n_tokens=T, d_model=D, images_per_shard=64, images_per_chunk=16)
    return StoreLayout(**{**base, **kw})


def build(root: Path, images, lay, capture=None, shards=None, tokens=slice(None), lineage=None):
    stores = {h: root / f"{h}.zarr" for h in ("blocks.0", "blocks.1")}
    for p in stores.values():
        create_store(p, lay, lineage or {"model": "m", "images": "i"})
    capture = capture or SyntheticCapture()
    reports = [
        extract_shard(capture, images, stores, s, batch_size=BATCH, tokens=tokens, progress=False)
        for s in (range(lay.n_shards) if shards is None else shards)
    ]
    return stores, reports


def test_layout_validation_and_bounds():
    lay = layout()
    assert lay.n_shards == 3
    assert lay.shard_bounds(0) == (0, 64) and lay.shard_bounds(2) == (128, 150)
    with pytest.raises(ValueError, match="valid shards are 0..2"):
        lay.shard_bounds(3)
    with pytest.raises(ValueError, match="not a multiple of images_per_chunk"):
        layout(images_per_shard=40)
    with pytest.raises(ValueError, match="expected one of"):
        layout(dtype="float64")
    with pytest.raises(ValueError, match="n_tokens=0"):
        layout(n_tokens=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_values_norms_and_dtypes(tmp_path, image_array, dtype):
    stores, reports = build(tmp_path, image_array, layout(dtype=dtype))
    assert [r.skipped for r in reports] == [False] * 3
    assert sum(r.n_images for r in reports) == N
    cap = SyntheticCapture()
    for hook, path in stores.items():
        g = zarr.open_group(str(path), mode="r")
        ref = reference(cap, make_images(), hook)
        raw = g["acts"][:]
        if dtype == "bfloat16":
            assert raw.dtype == np.uint16 and g.attrs["logical_dtype"] == "bfloat16"
            got = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
            torch.testing.assert_close(got, ref.to(torch.bfloat16).float(), rtol=0, atol=0)
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
        elif dtype == "float16":
            got = torch.from_numpy(raw).float()
            torch.testing.assert_close(got, ref.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(torch.from_numpy(raw), ref, rtol=0, atol=0)
        # Norms are of the fp32 activations, before any cast.
        norms = torch.from_numpy(g["norms"][:])
        torch.testing.assert_close(norms, torch.linalg.vector_norm(ref, dim=-1))
        np.testing.assert_array_equal(g["image_idx"][:], np.arange(N))
        # a 64-image extraction shard is written as four 16-image Zarr shard files, each as it fills
        assert g["acts"].chunks == (16, T, D) and g["acts"].shards == (16, T, D)


@pytest.mark.parametrize("tokens,n_tok,sl", [
    (slice(0, 1), 1, [0]),                 # the first token
    (slice(1, None), T - 1, list(range(1, T))),  # all but the first
    ((0, 2, 3), 3, [0, 2, 3]),             # not contiguous: one dropped between kept ones
])
def test_token_selection(tmp_path, image_array, tokens, n_tok, sl):
    stores, _ = build(tmp_path, image_array, layout(n_tokens=n_tok, dtype="float32"), tokens=tokens)
    got = zarr.open_group(str(stores["blocks.0"]), mode="r")["acts"][:]
    ref = reference(SyntheticCapture(), make_images(), "blocks.0")[:, sl]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=0)


def test_wrong_token_count_is_a_clear_error(tmp_path, image_array):
    with pytest.raises(ValueError, match=r"gave \(20, 5, 12\) after keeping tokens all"):
        build(tmp_path, image_array, layout(n_tokens=4))
    with pytest.raises(ValueError, match=r"tokens='cls': expected a slice or a sequence.*select_tokens"):
        build(tmp_path / "b", image_array, layout(), tokens="cls")


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    out = {k: g[k][:] for k in ("acts", "norms", "image_idx", "mean", "var")}
    out["partials"] = g["partials"][:]
    return out


def test_resume_skips_done_shards_and_is_bit_identical(tmp_path, image_array):
    lay = layout()
    cap = SyntheticCapture()
    stores, _ = build(tmp_path / "a", image_array, lay, capture=cap, shards=[0, 2])
    assert missing_shards(stores["blocks.0"]) == [1] and not is_complete(stores["blocks.1"])
    calls = cap.calls
    _, reports = build(tmp_path / "a", image_array, lay, capture=cap)
    assert [r.skipped for r in reports] == [True, False, True]
    assert cap.calls - calls == -(-64 // BATCH)  # only shard 1's batches ran
    fresh, _ = build(tmp_path / "b", image_array, lay)
    for hook in stores:
        finalize_stats(stores[hook]), finalize_stats(fresh[hook])
        a, b = _arrays(stores[hook]), _arrays(fresh[hook])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shard_done_in_one_store_only_runs_for_the_other(tmp_path, image_array):
    lay = layout()
    stores, _ = build(tmp_path, image_array, lay, shards=[0])
    zarr.open_group(str(stores["blocks.1"]), mode="r+")["partials"][0] = 0  # as if never marked
    rep = extract_shard(SyntheticCapture(), image_array, stores, 0, batch_size=BATCH, progress=False)
    assert not rep.skipped and missing_shards(stores["blocks.1"]) == [1, 2]


def _no_writer_thread():
    """No extraction thread outlives its shard (worker, writer or reader)."""
    return not any(t.name.startswith(("activation-worker", "activation-writer", "activation-reader"))
                   for t in threading.enumerate())


def test_capture_error_mid_shard_leaves_no_marker(tmp_path, image_array):
    class Failing(SyntheticCapture):
        def __call__(self, x):
            if self.calls == 2:
                raise RuntimeError("boom")
            return super().__call__(x)

    with pytest.raises(RuntimeError, match="boom"):
        build(tmp_path, image_array, layout(), capture=Failing(), shards=[0])
    assert missing_shards(tmp_path / "blocks.0.zarr") == [0, 1, 2]
    assert _no_writer_thread()
    # A clean rerun then completes the shard.
    build(tmp_path, image_array, layout(), shards=[0])
    assert missing_shards(tmp_path / "blocks.0.zarr") == [1, 2]


class OutOfMemoryAbove(SyntheticCapture):
    """A device with room for `limit` images a batch: larger batches fail as CUDA's allocator does."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.sizes = limit, []

    def __call__(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch of {x.shape[0]})")
        return super().__call__(x)


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_shard_is_unchanged(tmp_path, image_array, caplog):
    lay = layout()
    fitting = OutOfMemoryAbove(limit=7)
    with caplog.at_level(logging.WARNING, logger="spectra.extract"):
        stores, reports = build(tmp_path / "a", image_array, lay, capture=fitting)
    assert [r.batch_size for r in reports] == [5, 5, 5] and max(s for s in fitting.sizes if s <= 7) == 5  # 20, 10, 5
    assert "ran out of memory" in caplog.text
    fresh, _ = build(tmp_path / "b", image_array, lay)  # batches of 20, no failure
    for hook in stores:
        finalize_stats(stores[hook]), finalize_stats(fresh[hook])
        a, b = _arrays(stores[hook]), _arrays(fresh[hook])
        for k in ("acts", "norms", "image_idx"):  # the stored activations: byte-identical
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        for k in ("mean", "var"):  # summed batch by batch: other batches, other roundings
            np.testing.assert_allclose(a[k], b[k], rtol=1e-7, err_msg=k)


def test_one_image_that_does_not_fit_fails_and_marks_nothing(tmp_path, image_array):
    with pytest.raises(torch.cuda.OutOfMemoryError, match="one image's forward does not fit"):
        build(tmp_path, image_array, layout(), capture=OutOfMemoryAbove(limit=0), shards=[0])
    assert missing_shards(tmp_path / "blocks.0.zarr") == [0, 1, 2]
    assert _no_writer_thread()


def test_writer_error_propagates_and_leaves_no_marker(tmp_path, image_array):
    lay = layout()
    stores = {h: tmp_path / f"{h}.zarr" for h in ("blocks.0", "blocks.1")}
    for p in stores.values():
        create_store(p, lay, {})
    (stores["blocks.1"] / "acts" / "c").write_text("not a directory")  # chunk writes must fail
    with pytest.raises(ShardWriteError, match=r"writing shard 1 of .*blocks\.1\.zarr failed"):
        extract_shard(SyntheticCapture(), image_array, stores, 1, batch_size=BATCH, progress=False)
    assert missing_shards(stores["blocks.1"]) == [0, 1, 2]
    assert missing_shards(stores["blocks.0"]) == [0, 1, 2]
    assert _no_writer_thread()


def test_a_failed_write_mid_shard_then_a_rerun_equals_an_uninterrupted_run(tmp_path, image_array, monkeypatch):
    """The third file of shard 1 fails in the writer while later batches go on: the shard gets no
    marker, and rerunning it (the failure gone) gives exactly the store of a clean run."""
    from analysis.activations import shard_file as zarr_shard_file

    lay = layout()  # shard 1 = images 64..127, four 16-image files
    stores, _ = build(tmp_path / "a", image_array, lay, shards=[0])
    real_write, failed = zarr_shard_file.ShardFileWriter.write, []

    def flaky(self, start, data):
        if start == 96 and self.array.path == "acts" and not failed:
            failed.append(start)
            raise OSError("disk full")
        real_write(self, start, data)

    monkeypatch.setattr(zarr_shard_file.ShardFileWriter, "write", flaky)
    with pytest.raises(ShardWriteError, match="disk full"):
        extract_shard(SyntheticCapture(), image_array, stores, 1, batch_size=BATCH, progress=False)
    assert failed and all(missing_shards(p) == [1, 2] for p in stores.values())
    assert _no_writer_thread()
    build(tmp_path / "a", image_array, lay)  # shards 1 and 2; the write works now
    fresh, _ = build(tmp_path / "b", image_array, lay)
    for hook in stores:
        a, b = _arrays_before_stats(stores[hook]), _arrays_before_stats(fresh[hook])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_nonfinite_raises_with_counts_per_hook(tmp_path, image_array):
    class WithNaN(SyntheticCapture):
        def __call__(self, x):
            out = super().__call__(x)
            out["blocks.1"][0, 1, :3] = float("nan")
            out["blocks.1"][1, 0, 0] = float("inf")
            return out

    with pytest.raises(ValueError, match=r"counts per hook: \{'blocks.0': 0, 'blocks.1': 4\}"):
        build(tmp_path, image_array, layout(), capture=WithNaN(), shards=[0])
    assert missing_shards(tmp_path / "blocks.1.zarr") == [0, 1, 2]


def test_float16_overflow_suggests_bfloat16(tmp_path, image_array):
    big = SyntheticCapture(scale=1e5)
    with pytest.raises(ValueError, match="bfloat16"):
        build(tmp_path / "a", image_array, layout(), capture=big, shards=[0])
    assert missing_shards(tmp_path / "a" / "blocks.0.zarr") == [0, 1, 2]
    build(tmp_path / "b", image_array, layout(dtype="bfloat16"), capture=big, shards=[0])


def test_create_store_idempotent_and_mismatch(tmp_path, image_array):
    lay = layout()
    stores, _ = build(tmp_path, image_array, lay, shards=[0], lineage={"model": "m", "ids": (1, 2)})
    path = stores["blocks.0"]
    create_store(path, lay, {"model": "m", "ids": (1, 2)})  # same: keeps the completed shard
    assert missing_shards(path) == [1, 2]
    with pytest.raises(ValueError, match="different layout/lineage"):
        create_store(path, lay, {"model": "other"})
    with pytest.raises(ValueError, match="images_per_chunk': 32"):
        create_store(path, layout(images_per_chunk=32), {"model": "m", "ids": [1, 2]})
    create_store(path, lay, {"model": "other"}, overwrite=True)
    assert missing_shards(path) == [0, 1, 2]
    assert zarr.open_group(str(path), mode="r").attrs["lineage"] == {"model": "other"}
    with pytest.raises(ValueError, match="JSON-serializable"):
        create_store(tmp_path / "x.zarr", lay, {"bad": object()})


def test_finalize_stats_matches_numpy(tmp_path, image_array):
    stores, _ = build(tmp_path, image_array, layout())
    cap = SyntheticCapture()
    for hook, path in stores.items():
        ref = reference(cap, make_images(), hook).reshape(-1, D).double().numpy()
        stats = finalize_stats(path)
        torch.testing.assert_close(torch.from_numpy(stats.mean), torch.from_numpy(ref.mean(0)))
        torch.testing.assert_close(torch.from_numpy(stats.var), torch.from_numpy(ref.var(0)))
        assert stats.n_tokens == N * T
        assert stats.mean_norm == pytest.approx(np.linalg.norm(ref, axis=1).mean(), rel=1e-6)
        g = zarr.open_group(str(path), mode="r")
        np.testing.assert_array_equal(g["mean"][:], stats.mean)
        assert g.attrs["n_tokens_total"] == N * T


def test_finalize_requires_all_shards(tmp_path, image_array):
    stores, _ = build(tmp_path, image_array, layout(), shards=[1])
    with pytest.raises(ValueError, match=r"shards \[0, 2\] not extracted"):
        finalize_stats(stores["blocks.0"])


class Constant(SyntheticCapture):
    """Every activation set to `value` (plus the synthetic values times `noise`)."""

    def __init__(self, value, noise=0.0):
        super().__init__()
        self.value, self.noise = value, noise

    def __call__(self, x):
        return {h: v * self.noise + self.value for h, v in super().__call__(x).items()}


def test_stats_match_numpy_with_a_large_offset(tmp_path, image_array):
    # mean >> std: the regime where float32 batch moments would lose digits without the
    # two-pass / residual-corrected formulation; still within assert_close's float64 defaults.
    cap = Constant(1000.0, noise=1.0)
    stores, _ = build(tmp_path, image_array, layout(dtype="float32"), capture=cap)
    for hook, path in stores.items():
        ref = reference(cap, make_images(), hook).reshape(-1, D).double().numpy()
        stats = finalize_stats(path)
        torch.testing.assert_close(torch.from_numpy(stats.mean), torch.from_numpy(ref.mean(0)))
        torch.testing.assert_close(torch.from_numpy(stats.var), torch.from_numpy(ref.var(0)))


def test_float16_check_is_exact_when_only_the_norm_exceeds_the_range(tmp_path, image_array):
    # Every element 40000 fits float16 though each token's norm (~1.4e5) does not: no error.
    stores, _ = build(tmp_path, image_array, layout(), capture=Constant(40000.0), shards=[0])
    acts = zarr.open_group(str(stores["blocks.0"]), mode="r")["acts"][:64]
    assert acts.dtype == np.float16 and np.all(acts == 40000)
    assert missing_shards(stores["blocks.0"]) == [1, 2]


def test_norm_overflow_alone_is_not_reported_as_nonfinite(tmp_path, image_array):
    # Finite 1e20 values overflow the float32 norm to inf; the exact count finds none.
    stores, _ = build(tmp_path, image_array, layout(dtype="float32"), capture=Constant(1e20), shards=[0])
    assert np.all(zarr.open_group(str(stores["blocks.1"]), mode="r")["acts"][:64] == np.float32(1e20))
    with pytest.raises(ValueError, match="float16 max"):
        build(tmp_path / "h", image_array, layout(), capture=Constant(1e20), shards=[0])


class FailingImages:
    """The images array, failing on reads that reach row `fail_at` (exercises the prefetch)."""

    def __init__(self, arr, fail_at):
        self.arr, self.fail_at, self.shape = arr, fail_at, arr.shape

    def __getitem__(self, key):
        if key.stop > self.fail_at:
            raise OSError("read failed")
        return self.arr[key]


def test_prefetched_read_error_propagates_and_leaves_no_marker(tmp_path, image_array):
    lay = layout()
    stores = {h: tmp_path / f"{h}.zarr" for h in ("blocks.0", "blocks.1")}
    for p in stores.values():
        create_store(p, lay, {})
    with pytest.raises(OSError, match="read failed"):
        extract_shard(SyntheticCapture(), FailingImages(image_array, 50), stores, 0,
                      batch_size=BATCH, progress=False)
    assert missing_shards(stores["blocks.0"]) == [0, 1, 2]
    assert _no_writer_thread()
    assert not any(t.name.startswith("activation-reader") for t in threading.enumerate())


def test_store_of_another_format_is_a_clear_error(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, layout(), {"model": "m"})
    zarr.open_group(str(path), mode="r+").attrs["format"] = "spectra.activations/1"
    with pytest.raises(ValueError, match=r"format 'spectra.activations/1'.*overwrite=True"):
        missing_shards(path)
    create_store(path, layout(), {"model": "m"})  # an older format of ours is made again, empty
    assert missing_shards(path) == [0, 1, 2]
    zarr.open_group(str(path), mode="r+").attrs["format"] = "someone-else/1"
    with pytest.raises(ValueError, match="format"):  # a store that is not ours is never replaced unasked
        create_store(path, layout(), {"model": "m"})
    create_store(path, layout(), {"model": "m"}, overwrite=True)
    assert missing_shards(path) == [0, 1, 2]


@pytest.mark.parametrize("batches_per_read,in_flight", [(1, 1), (2, 1), (1, 3)])
def test_image_reads_in_blocks_give_the_same_store(tmp_path, image_array, monkeypatch, batches_per_read, in_flight):
    """Blocks of whole batches, read one or several at a time (as on an accelerator), store the
    same bytes as one batch per read."""
    import analysis.activations.extract as extraction

    reads = []

    class Recording(FailingImages):
        def __getitem__(self, key):
            reads.append((key.start, key.stop))
            return super().__getitem__(key)

    whole, _ = build(tmp_path / "whole", image_array, layout())
    monkeypatch.setattr(extraction, "_READ_BYTES", batches_per_read * BATCH * H * H * 3)
    monkeypatch.setattr(extraction, "image_reads", lambda device: in_flight)
    blocks, _ = build(tmp_path / "blocks", Recording(image_array, N + 1), layout())
    step = batches_per_read * BATCH
    # Whole batches per read, never across a shard boundary.
    assert sorted(reads) == sorted({(lo, min(lo + step, hi)) for s0, hi in ((0, 64), (64, 128), (128, N))
                                    for lo in range(s0, hi, step)})
    for hook in whole:
        a, b = _arrays_before_stats(whole[hook]), _arrays_before_stats(blocks[hook])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _arrays_before_stats(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("acts", "norms", "image_idx", "partials")}


def test_each_zarr_shard_file_is_written_once_whole_as_soon_as_it_fills(tmp_path, image_array, monkeypatch):
    from analysis.activations import extract as activation_extract

    calls, flushes = [], []
    real_put, real_flush = activation_extract._HookShard._put, activation_extract._HookShard._flush

    def recording_put(self, name, data, offset):
        calls.append((Path(str(self.location)).name, name, self.start + offset, len(data)))
        real_put(self, name, data, offset)

    def recording_flush(self):  # when a file's write is handed over: rows seen of the shard so far
        flushes.append((self.shard, self.written + self.buffered))
        real_flush(self)

    monkeypatch.setattr(activation_extract._HookShard, "_put", recording_put)
    monkeypatch.setattr(activation_extract._HookShard, "_flush", recording_flush)
    lay = layout()  # 64-image extraction shards of four 16-image files; the last shard holds 22
    stores, _ = build(tmp_path, image_array, lay)
    acts = [c for c in calls if c[0] == "blocks.0.zarr" and c[1] == "acts"]
    assert [(lo, n) for _, _, lo, n in acts] == [(lo, 16) for lo in range(0, 128, 16)] + [(128, 16), (144, 6)]
    # each file of a shard is handed to the writer as soon as it is full, while later batches
    # are still to come (two hooks: each file twice)
    assert flushes[:8] == [(0, n) for n in (16, 16, 32, 32, 48, 48, 64, 64)]
    ref = reference(SyntheticCapture(), image_array[:], "blocks.0")
    got = torch.from_numpy(zarr.open_group(str(stores["blocks.0"]), mode="r")["acts"][:].astype("float32"))
    torch.testing.assert_close(got, ref.half().float(), rtol=0, atol=0)


def test_the_worker_thread_runs_only_where_a_core_is_spare(monkeypatch):
    # spare_core is the real function: imported before the autouse fixture patches the module
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for threads, spare in ((1, True), (2, False), (4, False)):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert spare_core(torch.device("cpu")) is spare
        assert spare_core(torch.device("cuda")) is True  # the forward runs on the accelerator


def test_image_reads_in_flight_grow_with_the_cores_only_beside_an_accelerator(monkeypatch):
    from analysis.activations.threads import image_reads

    for cores, on_gpu in ((1, 2), (2, 2), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert image_reads(torch.device("cpu")) == 1  # one read ahead hides it beside a CPU forward
        assert image_reads(torch.device("cuda")) == on_gpu
