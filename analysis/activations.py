"""Activation store: chunked, resumable Zarr extraction of hooked activations.

One store per hook at <root>/activations/<store_id>/<hook>.zarr (DESIGN.md §2), a Zarr group:

    acts       (N, T, d)  float16 | float32 | uint16 (bfloat16 bits, attr logical_dtype)
    norms      (N, T)     float32 token L2 norms, taken in fp32 before the cast
    image_idx  (N,)       int64
    partials/  per-shard Welford partials (count, mean, M2, norm_sum), one chunk per shard
    mean, var  (d,)       float64, written by `finalize_stats` (population variance)
    _complete/<shard>     empty marker file, created only after the shard's data is written

Arrays are chunked along N only (`images_per_chunk` images) and Zarr-sharded with
`images_per_shard` images per shard file: one extraction shard (a Dagster partition) writes
whole shard files and never shares one with another partition. Completion is one marker file
per shard rather than a shared attrs JSON, so concurrent partitions never race on it.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from analysis.images import to_model_input

Capture = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""Model input (B, C, H, W) float32 in [0, 1] -> {hook: (B, T, d) activations}."""

FORMAT = "spectra.activations/1"
FLOAT16_MAX = 65504.0
_ZARR_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
_MARKERS = "_complete"


@dataclass(frozen=True)
class StoreLayout:
    """Shape and on-disk layout of one activation store (shared by all hooks of a store id)."""

    n_images: int
    """Images in the store (N); equals the image dataset's length."""
    n_tokens: int
    """Tokens kept per image (T) after token selection ("cls" keeps 1)."""
    d_model: int
    """Width of the hooked activation (d)."""
    images_per_shard: int = 1024
    """Images per extraction shard / Zarr shard file; a multiple of images_per_chunk."""
    images_per_chunk: int = 128
    """Images per Zarr chunk: the unit of every read, so the loader's shuffle granularity."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Stored dtype; bfloat16 is kept as uint16 bits because Zarr has no bfloat16."""

    def __post_init__(self):
        for name in ("n_images", "n_tokens", "d_model", "images_per_shard", "images_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StoreLayout.{name}={value!r}: expected a positive int")
        if self.images_per_shard % self.images_per_chunk:
            raise ValueError(
                f"StoreLayout.images_per_shard={self.images_per_shard} is not a multiple of "
                f"images_per_chunk={self.images_per_chunk}: pick e.g. images_per_shard="
                f"{math.ceil(self.images_per_shard / self.images_per_chunk) * self.images_per_chunk}"
            )
        if self.dtype not in _ZARR_DTYPE:
            raise ValueError(
                f"StoreLayout.dtype={self.dtype!r}: expected one of {sorted(_ZARR_DTYPE)}"
            )

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.images_per_shard)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Image range [start, stop) of `shard`; the last shard may be short."""
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} out of range: valid shards are 0..{self.n_shards - 1}")
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)


class ShardReport(NamedTuple):
    shard: int
    n_images: int
    seconds: float
    skipped: bool
    """True when every store already had this shard, so nothing was computed."""
    nonfinite: int
    """Non-finite values seen (always 0 on return: any non-finite value raises)."""


class StoreStats(NamedTuple):
    mean: np.ndarray
    """(d,) float64 per-dimension mean over all tokens."""
    var: np.ndarray
    """(d,) float64 population variance (divide by n), the FVU denominator's per-dim term."""
    mean_norm: float
    """Mean token L2 norm."""
    n_tokens: int
    """Tokens the statistics cover (N * T)."""


def _jsonable(obj: dict, what: str) -> dict:
    try:  # a JSON round trip so tuples/lists compare equal after reading back
        return json.loads(json.dumps(obj, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"{what} must be JSON-serializable (str/int/float/list/dict): {e}") from e


def read_layout(path: str | Path) -> StoreLayout:
    """The layout recorded in an existing store."""
    attrs = zarr.open_group(str(path), mode="r").attrs
    if "layout" not in attrs:
        raise FileNotFoundError(f"no complete activation store at {path}: run create_store first")
    return StoreLayout(**attrs["layout"])


def create_store(path: str | Path, layout: StoreLayout, lineage: dict, *, overwrite: bool = False) -> None:
    """Create an empty store, or keep an existing identical one (and its completed shards).

    Raises ValueError when a store with a different layout or lineage is already there: paths
    are content-derived, so that means a bug upstream; pass overwrite=True to replace it.
    """
    path = Path(path)
    lineage = _jsonable(lineage, "lineage")
    wanted = {"layout": asdict(layout), "lineage": lineage}
    if (path / "zarr.json").exists() and not overwrite:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        if "layout" in attrs:  # attrs are written last, so without them creation was cut short
            found = {"layout": attrs["layout"], "lineage": attrs.get("lineage")}
            if found == wanted:
                return
            raise ValueError(
                f"activation store {path} exists with a different layout/lineage:\n"
                f"  existing: {found}\n  requested: {wanted}\n"
                "store paths are content-derived, so this points at an id bug; pass "
                "overwrite=True only if replacing the store is intended"
            )
    group = zarr.open_group(str(path), mode="w")
    n, t, d = layout.n_images, layout.n_tokens, layout.d_model
    ipc, ips = layout.images_per_chunk, layout.images_per_shard
    common = dict(compressors=None, fill_value=0)
    group.create_array("acts", shape=(n, t, d), chunks=(ipc, t, d), shards=(ips, t, d),
                       dtype=_ZARR_DTYPE[layout.dtype], **common)
    group.create_array("norms", shape=(n, t), chunks=(ipc, t), shards=(ips, t), dtype="float32", **common)
    group.create_array("image_idx", shape=(n,), chunks=(ipc,), shards=(ips,), dtype="int64", **common)
    # One chunk per shard: each partition writes its own partial files, never a shared one.
    s = layout.n_shards
    partials = group.create_group("partials")
    partials.create_array("count", shape=(s,), chunks=(1,), dtype="int64", **common)
    partials.create_array("norm_sum", shape=(s,), chunks=(1,), dtype="float64", **common)
    partials.create_array("mean", shape=(s, d), chunks=(1, d), dtype="float64", **common)
    partials.create_array("m2", shape=(s, d), chunks=(1, d), dtype="float64", **common)
    group.create_group(_MARKERS)  # a group, so listing the store does not warn about it
    group.attrs.update({**wanted, "format": FORMAT, "logical_dtype": layout.dtype})


def missing_shards(path: str | Path) -> list[int]:
    """Shards without a completion marker, ascending."""
    layout = read_layout(path)
    done = {p.name for p in (Path(path) / _MARKERS).iterdir()}
    return [s for s in range(layout.n_shards) if str(s) not in done]


def is_complete(path: str | Path) -> bool:
    return not missing_shards(path)


class _Writer:
    """Background thread(s) writing whole shards, so writes overlap compute.

    One thread by default: a second did not shorten the end-of-shard write tail (measured),
    as Zarr runs its I/O on one event loop anyway. After a failure they keep draining the queue (the producer must never block on a full
    queue) and the first error is re-raised in the producer by `check`/`close`.
    """

    def __init__(self, maxsize: int, n_threads: int = 1):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name="activation-writer", daemon=True)
                        for _ in range(n_threads)]
        for t in self.threads:
            t.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                array, start, data = item
                try:
                    array[start : start + len(data)] = data
                except BaseException as e:  # handed to the producer thread, not swallowed
                    self.error = self.error or e

    def put(self, array: zarr.Array, start: int, data: np.ndarray):
        self.check()
        self.queue.put((array, start, data))

    def check(self):
        if self.error is not None:
            raise RuntimeError(f"activation writer failed: {self.error!r}") from self.error

    def stop(self):
        """Stop and join the threads (idempotent); queued writes finish first."""
        for t in self.threads:
            if t.is_alive():
                self.queue.put(None)
        for t in self.threads:
            t.join()

    def close(self):
        self.stop()
        self.check()


class _ShardAccumulator:
    """Per-hook state for one shard: a whole-shard buffer for the writer and Welford partials.

    The shard is written in ONE call: Zarr rewrites a shard file on every partial write, so
    chunk-by-chunk writes cost 5-7x (measured: 8.9 MB shard 0.02-0.05 s whole vs 0.14-0.17 s in
    16 chunk writes; 102 MB: 0.15 s vs 0.77 s). Memory per hook is one shard: size
    `images_per_shard` for the model at hand.
    """

    def __init__(self, group: zarr.Group, layout: StoreLayout, start: int, stat_dtype: torch.dtype):
        self.acts, self.norms = group["acts"], group["norms"]
        self.layout, self.start, self.stat_dtype = layout, start, stat_dtype
        self.buf_acts: np.ndarray | None = None
        self.buf_norms: np.ndarray | None = None
        self.filled = 0
        self.count, self.mean, self.m2, self.norm_sum = 0, None, None, 0.0

    def add_stats(self, x: torch.Tensor, norms: torch.Tensor):
        """Fold one batch in: per-batch moments in float32, merged across batches in float64.

        A float64 copy of the batch cost ~4x this (measured 14.5 ms vs 3.8 ms for a
        (16640, 192) batch). Two passes about the float32 batch mean keep M2 free of
        cancellation; the residual sum corrects the float32 mean's rounding (corrected
        two-pass), so the result matches a float64 reference to ~1e-7 relative.
        """
        flat = x.reshape(-1, x.shape[-1])
        nb = flat.shape[0]
        mean32 = flat.mean(0)
        dev = flat - mean32
        resid = dev.sum(0).to(self.stat_dtype)
        mean_b = mean32.to(self.stat_dtype) + resid / nb
        m2_b = dev.square_().sum(0).to(self.stat_dtype) - resid.square() / nb
        self.norm_sum += float(norms.sum(dtype=self.stat_dtype))
        if self.mean is None:
            self.count, self.mean, self.m2 = nb, mean_b, m2_b
        else:
            self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, nb, mean_b, m2_b)

    def add_rows(self, x: torch.Tensor, norms: torch.Tensor, writer: "_Writer", final: bool):
        """Cast rows straight into the shard buffer; hand the full shard to the writer at the end."""
        if self.buf_acts is None:
            n = self.layout.shard_bounds(self.start // self.layout.images_per_shard)[1] - self.start
            self.buf_acts = np.empty((n, *x.shape[1:]), dtype=_ZARR_DTYPE[self.layout.dtype])
            self.buf_norms = np.empty((n, *norms.shape[1:]), dtype=np.float32)
        rows = slice(self.filled, self.filled + len(x))
        dst = torch.from_numpy(self.buf_acts[rows])
        if self.layout.dtype == "bfloat16":
            dst = dst.view(torch.bfloat16)
        dst.copy_(x)  # one fused cast + device-to-host copy into the buffer
        torch.from_numpy(self.buf_norms[rows]).copy_(norms)
        self.filled += len(x)
        if final:
            writer.put(self.acts, self.start, self.buf_acts[: self.filled])
            writer.put(self.norms, self.start, self.buf_norms[: self.filled])


def chan_merge(n_a: int, mean_a, m2_a, n_b: int, mean_b, m2_b):
    """Merge two (count, mean, M2) partials (Chan et al.); numpy arrays or torch tensors."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def _select_tokens(x: torch.Tensor, tokens: str) -> torch.Tensor:
    if tokens == "cls":
        return x[:, :1]
    if tokens == "patches":
        return x[:, 1:]
    return x


def extract_shard(
    capture: Capture,
    images: zarr.Array,
    stores: dict[str, str | Path],
    shard: int,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tokens: Literal["all", "cls", "patches"] = "all",
    progress: bool = True,
) -> ShardReport:
    """Compute one shard's activations for every hook in `stores` and write them.

    Skips quickly when every store already has the shard. Marks a store's shard complete only
    after all of its data and stats partials are written; any error leaves no marker.
    """
    t0 = time.perf_counter()
    if tokens not in ("all", "cls", "patches"):
        raise ValueError(f"tokens={tokens!r}: expected 'all', 'cls' or 'patches'")
    if not stores:
        raise ValueError("stores is empty: pass {hook: store_path} for at least one hook")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive int, e.g. 256")
    layouts = {hook: read_layout(p) for hook, p in stores.items()}
    layout = next(iter(layouts.values()))
    if any(lay != layout for lay in layouts.values()):
        raise ValueError(f"stores of one extraction must share a layout, got {layouts}")
    if images.shape[0] != layout.n_images:
        raise ValueError(
            f"images has {images.shape[0]} rows but the stores expect n_images={layout.n_images}: "
            "create the stores from this image dataset"
        )
    start, stop = layout.shard_bounds(shard)
    todo = {h: Path(p) for h, p in stores.items() if shard in missing_shards(p)}
    if not todo:
        return ShardReport(shard, stop - start, time.perf_counter() - t0, True, 0)

    groups = {h: zarr.open_group(str(p), mode="r+") for h, p in todo.items()}
    stat_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    accs = {h: _ShardAccumulator(g, layout, start, stat_dtype) for h, g in groups.items()}
    writer = _Writer(maxsize=4 * len(todo))
    for group in groups.values():  # known up front: written while the shard computes
        writer.put(group["image_idx"], start, np.arange(start, stop, dtype=np.int64))
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-reader")
    try:
        spans = [(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)]
        # The next batch's uint8 Zarr read runs in a thread while this batch computes.
        pending = reader.submit(images.__getitem__, slice(*spans[0]))
        for i, (lo, hi) in enumerate(tqdm(spans, desc=f"shard {shard}", disable=not progress)):
            batch = pending.result()
            if i + 1 < len(spans):
                pending = reader.submit(images.__getitem__, slice(*spans[i + 1]))
            with torch.inference_mode():
                out = capture(to_model_input(batch, device))
                for hook, (x, norms) in _checked(out, list(accs), layout, tokens, (lo, hi)).items():
                    accs[hook].add_stats(x, norms)
                    accs[hook].add_rows(x, norms, writer, hi == stop)
        writer.close()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.stop()  # after an exception above: stop the threads, keep the first error

    for hook, group in groups.items():
        acc = accs[hook]
        p = group["partials"]
        p["count"][shard] = acc.count
        p["norm_sum"][shard] = acc.norm_sum
        p["mean"][shard] = acc.mean.cpu().numpy()
        p["m2"][shard] = acc.m2.cpu().numpy()
        (todo[hook] / _MARKERS / str(shard)).touch()  # last: the marker means "all written"
    return ShardReport(shard, stop - start, time.perf_counter() - t0, False, 0)


def _checked(out, hooks, layout, tokens, span) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Select tokens, validate shape, finiteness and the float16 range: {hook: (x, norms)}.

    The token norms (stored anyway) carry both checks at 1/d of the cost of full passes over
    x: a NaN or inf element makes its token's norm non-finite, and |x_i| <= ||x||, so a norm
    within the float16 range proves every element is. Full passes over x run only when a
    norm fails, to count non-finite values or to confirm an overflow exactly.
    """
    res, bad = {}, {}
    where = f"images {span[0]}..{span[1] - 1}"
    for hook in hooks:
        if hook not in out:
            raise ValueError(f"capture returned hooks {sorted(out)}, missing {hook!r}")
        x = _select_tokens(out[hook], tokens).float()
        expected = (span[1] - span[0], layout.n_tokens, layout.d_model)
        if tuple(x.shape) != expected:
            raise ValueError(
                f"hook {hook!r} gave {tuple(x.shape)} after tokens={tokens!r}, the store expects "
                f"{expected}: create the store with this hook's n_tokens/d_model"
            )
        norms = torch.linalg.vector_norm(x, dim=-1)  # fp32, before the cast to the store dtype
        res[hook] = (x, norms)
        bad[hook] = float(norms.amax())  # NaN/inf here if any element is (or the norm overflows)
    if not all(math.isfinite(v) for v in bad.values()):
        counts = {h: int((~torch.isfinite(x)).sum()) for h, (x, _) in res.items()}
        if any(counts.values()):
            raise ValueError(
                f"non-finite activations in {where}, counts per hook: {counts}; nothing was marked "
                "complete (check the model and inputs, e.g. overflow of a half-precision model)"
            )
    if layout.dtype == "float16":
        for hook, (x, _) in res.items():
            if not bad[hook] <= FLOAT16_MAX and (peak := float(x.abs().amax())) > FLOAT16_MAX:
                raise ValueError(
                    f"hook {hook!r} has |x| up to {peak:.4g} in {where}, above the float16 max "
                    f"{FLOAT16_MAX}: create the store with dtype='bfloat16' (or 'float32')"
                )
    return res


def merge_partials(path: str | Path) -> StoreStats:
    """Merge the per-shard Welford partials (Chan's parallel formula), in shard order."""
    missing = missing_shards(path)
    if missing:
        raise ValueError(
            f"store {path} has shards {missing} not extracted: run extraction for them "
            "(every shard must be complete before statistics are final)"
        )
    p = zarr.open_group(str(path), mode="r")["partials"]
    counts, norm_sums = p["count"][:], p["norm_sum"][:]
    means, m2s = p["mean"][:], p["m2"][:]
    n, mean, m2 = 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for nb, mean_b, m2_b in zip(counts.tolist(), means, m2s):
        n, mean, m2 = chan_merge(n, mean, m2, nb, mean_b, m2_b)
    return StoreStats(mean, m2 / n, float(norm_sums.sum() / n), n)


def finalize_stats(path: str | Path) -> StoreStats:
    """Merge the partials and record `mean`, `var` (d,) float64 and attrs in the store."""
    stats = merge_partials(path)
    group = zarr.open_group(str(path), mode="r+")
    for name in ("mean", "var"):
        arr = group.create_array(name, shape=(len(stats.mean),), dtype="float64",
                                 compressors=None, fill_value=0, overwrite=True)
        arr[:] = getattr(stats, name)
    group.attrs.update({"mean_norm": stats.mean_norm, "n_tokens_total": stats.n_tokens})
    return stats
