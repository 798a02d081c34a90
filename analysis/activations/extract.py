"""Extraction of one shard: model forward on the caller's thread, everything else overlapped.

Four threads per shard, so the forward pass is the only work on the critical path:

    reader   uint8 Zarr reads of the next blocks of batches (up to 64 MiB each): one read ahead
             on the CPU, several with the forward on an accelerator (image_reads)
    caller   to_model_input + capture (the forward pass with hooks)
    worker   token selection, checks, norms, statistics, and the cast into a buffer of one Zarr
             shard file per hook (on a GPU: the cast runs there, into page-locked buffers); when
             the forward leaves no core spare, the caller does this share itself
             (threads.spare_core has the measurements)
    writer   each Zarr shard file's write as soon as its images are in (always a whole file: a
             partial write rewrites the file, 5-10x the cost; analysis.activations.shard_file builds
             the file without zarr's per-chunk pipeline, which held the GIL); on a local store
             with no core spare, the caller writes too, while a URL store always gets the
             thread (its writes wait on the network)

Memory is bounded: two file buffers per hook, three batches of capture outputs (the worker's
queue holds one) and 1 + image_reads image blocks. A batch the accelerator has no memory for is
halved and run again (the shard's report says the batch size it ended with); the stored values
are the same.
Any error — in the worker, a write or the caller — is re-raised in the caller, and the
completion markers (the statistics rows) are written by the caller only after every data write
of every hook has landed without error.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence, Union

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from analysis.activations.stats import Moments, write_partial
from analysis.activations.store import (ZARR_DTYPE, StoreLayout, StoreLocation, completed, damaged_shards, is_url,
                                        open_layout, reset_shard)
from analysis.activations.store_files import record_shard_files, remove_partials
from analysis.data.images import read_images
from analysis.models.inputs import to_model_input
from analysis.activations.shard_file import ShardFileWriter
from analysis.activations.threads import CallerExecutor, Worker, image_reads, spare_core

log = logging.getLogger("spectra.integrity")
perf_log = logging.getLogger("spectra.extract")

Capture = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""Model input (B, C, H, W) float32 in [0, 1] -> {hook: (B, T, d) activations}.

The returned tensors are read on a worker thread after the call returns: return fresh tensors
(as `run_with_cache` does), never a buffer that the next call overwrites.
"""

FLOAT16_MAX = 65504.0
# Every stored chunk holds activations, so zarr's scan for all-fill-value chunks (to skip
# writing them) is pure cost: ~30% of a whole-shard write (measured 15.7 vs 10.7 ms, 8.9 MB).
_WRITE_CONFIG = {"write_empty_chunks": True}
# Images come in reads of whole batches up to this size (uint8), prefetched a read ahead: one
# Zarr read per batch kept the reader's Python (asyncio) contending with the forward pass for
# the GIL; block reads measured +5% images/s on the mouse ViT (0.948 vs 0.90 of bare).
_READ_BYTES = 64 * 2**20


class ShardReport(NamedTuple):
    shard: int
    n_images: int
    seconds: float
    skipped: bool
    """True when every store already had this shard, so nothing was computed."""
    nonfinite: int
    """Non-finite values seen (always 0 on return: any non-finite value raises)."""
    batch_size: int | None = None
    """The batch size the shard ended with: smaller than asked when the device ran out of memory."""


class ShardWriteError(RuntimeError):
    """A Zarr write of extracted activations failed; no shard was marked complete."""


class _HookShard:
    """One hook's part of one shard: statistics, and two Zarr shard file buffers in the stored dtype.

    Rows go into one buffer as batches arrive; when it holds a whole file, the file's write goes
    to the writer thread and the other buffer fills meanwhile (waiting first for that buffer's
    previous write). Two file buffers instead of the whole extraction shard: half the memory,
    and pages that stay warm instead of ~2,200 fresh page faults per 8.9 MB shard.
    """

    def __init__(self, group: zarr.Group, location: StoreLocation, layout: StoreLayout, shard: int,
                 acc_dtype: torch.dtype, writes: ThreadPoolExecutor, pinned: bool = False):
        self.group, self.location, self.dtype, self.shard = group, location, layout.dtype, shard
        self.start, stop = layout.shard_bounds(shard)
        self.n = stop - self.start
        # Files are written whole, each as soon as its images are in (the file size is read from
        # the array: a store made with another file size is still written file by file).
        per_file = group["acts"].shards[0] if group["acts"].shards else self.n
        rows = min(per_file, self.n)
        self.buffers = [(_host_buffer((rows, layout.n_tokens, layout.d_model), ZARR_DTYPE[layout.dtype], pinned),
                         _host_buffer((rows, layout.n_tokens), "float32", pinned)) for _ in range(2)]
        self.pending: list[Future | None] = [None, None]  # each buffer's write in flight
        self.current = 0
        self.written = 0  # rows of the shard handed to the writer
        self.buffered = 0  # rows in the current buffer after those
        self.writes = writes
        self.index_write: Future | None = None
        self.moments = Moments(acc_dtype)
        # Opened once: each group[name] reads and parses the array's metadata again (0.3 ms).
        self.writers = {name: ShardFileWriter(group[name].with_config(_WRITE_CONFIG))
                        for name in ("acts", "norms", "image_idx")}

    def add(self, x: torch.Tensor, norms: torch.Tensor) -> None:
        self.moments.add(x, norms)
        done = 0
        while done < len(x):  # a batch may end one file and start the next
            acts, norm_rows = self.buffers[self.current]
            if self.buffered == 0 and self.pending[self.current] is not None:
                self.pending[self.current].result()  # this buffer's last write has landed (or raises)
                self.pending[self.current] = None
            take = min(len(x) - done, len(acts) - self.buffered)
            rows = slice(self.buffered, self.buffered + take)
            dst = torch.from_numpy(acts[rows])
            if self.dtype == "bfloat16":
                dst = dst.view(torch.bfloat16)
            src = x[done : done + take]
            if src.device.type != "cpu":  # cast on the device: half the bytes cross the bus (same rounding)
                src = src.to(dst.dtype)
            dst.copy_(src)  # into page-locked memory from an accelerator: a DMA at full bus speed
            torch.from_numpy(norm_rows[rows]).copy_(norms[done : done + take])
            self.buffered += take
            done += take
            if self.buffered == len(acts):  # a whole file is in: write it, fill the other buffer
                self._flush()

    def _flush(self) -> None:
        lo, n = self.written, self.buffered
        acts, norms = self.buffers[self.current]

        def arrays():
            self._put("acts", acts[:n], lo)
            self._put("norms", norms[:n], lo)

        self.pending[self.current] = self.writes.submit(self._write, arrays)
        self.current ^= 1
        self.written, self.buffered = lo + n, 0

    def write_index(self) -> None:
        """image_idx is known before any batch: written while the first batches compute."""
        index = np.arange(self.start, self.start + self.n, dtype=np.int64)
        self.index_write = self.writes.submit(self._write, lambda: self._put("image_idx", index, 0))

    def write(self) -> None:
        """What is left of the shard's data (a last, short file), then wait for every write."""
        if self.written + self.buffered != self.n:
            raise AssertionError(f"shard got {self.written + self.buffered} of {self.n} images")
        if self.buffered:
            self._flush()
        for future in (self.index_write, *self.pending):
            if future is not None:
                future.result()  # re-raises a write's ShardWriteError here

    def mark_complete(self) -> None:
        """The files' sizes and checksums, then the statistics row, which doubles as the completion
        marker: only after all data."""
        known = {k: v for w in self.writers.values() for k, v in w.written.items()}
        self._write(lambda: record_shard_files(self.group, self.shard, self.start, self.start + self.n, known))
        self._write(lambda: write_partial(self.group, self.shard, self.moments.partial()))

    def _put(self, name: str, data: np.ndarray, offset: int) -> None:
        self.writers[name].write(self.start + offset, data)

    def _write(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            raise ShardWriteError(f"writing shard {self.shard} of {self.location} failed: {e!r}") from e


def _host_buffer(shape: tuple[int, ...], dtype: str, pinned: bool) -> np.ndarray:
    """An uninitialised host array; page-locked when an accelerator copies into it. Pageable
    memory makes every device-to-host copy go through a driver bounce buffer; torch's pinned
    allocator caches the blocks, so only the first shard of a process pays for pinning them."""
    if not pinned:
        return np.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=getattr(torch, dtype), pin_memory=True).numpy()


def _read_blocks(start: int, stop: int, batch_size: int, image_bytes: int) -> list[tuple[int, int]]:
    """Image ranges of whole batches, up to _READ_BYTES each, one Zarr read per range."""
    per = batch_size * max(1, _READ_BYTES // max(1, batch_size * image_bytes))
    return [(lo, min(lo + per, stop)) for lo in range(start, stop, per)]


PerImage = Callable[[np.ndarray], torch.Tensor]
"""Image indices (n,) -> (n, T) positions to keep for each image (TokenSelection.positions_for)."""
TokenPositions = Union[slice, Sequence[int], PerImage]
"""Positions along the capture's token axis to keep (analysis.activations.tokens.select_tokens, per model):
the same for every image, or per image (a patch sample)."""


def _token_positions(tokens: TokenPositions) -> slice | torch.Tensor | PerImage:
    if isinstance(tokens, slice) or callable(tokens):
        return tokens
    if isinstance(tokens, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in tokens):
        raise ValueError(
            f"tokens={tokens!r}: expected a slice or a sequence of token positions; "
            "analysis.activations.tokens.select_tokens(vit_config, 'cls' | 'patches' | ...).keep gives them"
        )
    return torch.as_tensor(list(tokens), dtype=torch.int64)


def _select_tokens(x: torch.Tensor, keep: slice | torch.Tensor) -> torch.Tensor:
    """Tokens at `keep`: a slice or 1-D positions for every image, or (n, T) positions per image."""
    if isinstance(keep, slice):
        return x[:, keep]
    keep = keep.to(x.device)
    if keep.ndim == 2:
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x.index_select(1, keep)


def _open_todo(stores: dict[str, StoreLocation], shard: int,
               images: zarr.Array) -> tuple[StoreLayout, dict[str, zarr.Group]]:
    """The shared layout and, for each store still missing `shard`, its group opened for writing."""
    if not stores:
        raise ValueError("stores is empty: pass {hook: store_location} for at least one hook")
    opened = {hook: open_layout(loc, "r+") for hook, loc in stores.items()}
    layouts = {hook: layout for hook, (_, layout) in opened.items()}
    layout = next(iter(layouts.values()))
    if any(lay != layout for lay in layouts.values()):
        raise ValueError(f"stores of one extraction must share a layout, got {layouts}")
    layout.shard_bounds(shard)  # range check before anything else
    if images.shape[0] != layout.n_images:
        raise ValueError(f"images has {images.shape[0]} rows but the stores expect n_images={layout.n_images}: "
                         "create the stores from this image dataset")
    todo = {}
    for hook, (group, _) in opened.items():
        damage = damaged_shards(group, layout, [shard])
        if damage:  # redone from the images, never reused: a missing file would read as zeros
            log.warning("activation store %s: %s; extracting shard %d again", stores[hook],
                        "; ".join(map(str, damage)), shard)
            reset_shard(group, shard)
        if not completed(group)[shard]:
            remove_partials(group, shard, *layout.shard_bounds(shard))  # a killed attempt's leftovers
            todo[hook] = group
    return layout, todo


def extract_shard(
    capture: Capture,
    images: zarr.Array,
    stores: dict[str, StoreLocation],
    shard: int,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tokens: TokenPositions = slice(None),
    progress: bool = True,
) -> ShardReport:
    """Compute one shard's activations for every hook in `stores` and write them.

    `stores` maps hook -> store location (local path or fsspec URL). `tokens` are the positions of
    the capture's token axis the stores keep (all by default). Skips quickly when every
    store already has the shard. Marks a store's shard complete only after all of its data and
    statistics partials are written; any error leaves no marker.
    """
    t0 = time.perf_counter()
    keep = _token_positions(tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive int, e.g. 256")
    layout, groups = _open_todo(stores, shard, images)
    start, stop = layout.shard_bounds(shard)
    if not groups:
        return ShardReport(shard, stop - start, time.perf_counter() - t0, True, 0, batch_size)

    acc_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    spare = spare_core(torch.device(device))
    # Every hook's file writes, in order, on one thread (parallel writes were slower, measured):
    # its own where a core is spare or a write waits on the network, else the caller's.
    overlap_writes = spare or any(is_url(loc) for loc in stores.values())
    writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-writer") if overlap_writes \
        else CallerExecutor()
    pinned = torch.device(device).type == "cuda"
    parts = {h: _HookShard(g, stores[h], layout, shard, acc_dtype, writes, pinned) for h, g in groups.items()}

    def process(out: dict[str, torch.Tensor], span: tuple[int, int]) -> None:
        for hook, (x, norms) in _checked(out, list(parts), layout, keep, span).items():
            parts[hook].add(x, norms)

    # One batch queued, one in the worker, one in the forward: at most three batches of capture
    # outputs alive (fp32, every hook), against one without the worker. The worker's share of a
    # batch is ~10x shorter than the forward, so a deeper queue would only hold more memory.
    worker = Worker(maxsize=1, threaded=spare)
    reads = image_reads(torch.device(device))
    reader = ThreadPoolExecutor(max_workers=reads, thread_name_prefix="activation-reader")
    try:
        for part in parts.values():
            part.write_index()
        blocks = _read_blocks(start, stop, batch_size, int(np.prod(images.shape[1:])))
        # One buffer per read in flight and one for the block the forward reads: the block j uses
        # is refilled by read j + reads + 1, submitted only after block j's last batch went in.
        ring = [_host_buffer((max(hi - lo for lo, hi in blocks),) + tuple(images.shape[1:]), "uint8", pinned)
                for _ in range(min(reads + 1, len(blocks)))]

        def read(j: int) -> np.ndarray:
            return read_images(images, *blocks[j], out=ring[j % len(ring)])

        pending = deque(reader.submit(read, j) for j in range(min(reads, len(blocks))))
        with tqdm(total=stop - start, desc=f"shard {shard}", unit="img", disable=not progress) as bar:
            for j, (b_lo, b_hi) in enumerate(blocks):
                block = pending.popleft().result()
                if j + reads < len(blocks):  # the next blocks' reads run while this one computes
                    pending.append(reader.submit(read, j + reads))
                lo = b_lo
                while lo < b_hi:
                    span = (lo, min(lo + batch_size, b_hi))
                    try:
                        with torch.inference_mode():
                            # Converted here, not in the reader: float32 batches made in the reader
                            # thread (its own malloc arena) grew RSS by ~50 MB over 4 shards (measured).
                            out = capture(to_model_input(block[lo - b_lo : span[1] - b_lo], device))
                    except torch.cuda.OutOfMemoryError:
                        batch_size = _smaller_batch(span, shard, device)  # the same images again, fewer at once
                        continue
                    worker.submit(lambda out=out, span=span: process(out, span))
                    bar.update(span[1] - lo)
                    lo = span[1]
        for part in parts.values():  # the last files, then wait for every write
            worker.submit(lambda part=part: part.write())
        worker.close()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        worker.stop()  # after an exception above: finish or skip the queue, keep the first error
        writes.shutdown(wait=True, cancel_futures=True)

    for part in parts.values():
        part.mark_complete()  # last: every write above has landed
    return ShardReport(shard, stop - start, time.perf_counter() - t0, False, 0, batch_size)


def _smaller_batch(span: tuple[int, int], shard: int, device) -> int:
    """Half the batch that did not fit in the accelerator's memory (nothing of it was kept), or
    the error again when a single image does not fit."""
    n = span[1] - span[0]
    if n == 1:
        raise torch.cuda.OutOfMemoryError(f"shard {shard}: one image's forward does not fit in {device}'s memory: "
                                           "extract on a larger device, or fewer hooks at once")
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the failed attempt's blocks, so the smaller batch can use them
    perf_log.warning("shard %d: a batch of %d images ran out of memory on %s; going on with %d", shard, n, device,
                     n // 2)
    return n // 2


def _checked(out, hooks, layout, keep, span) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Select tokens, validate shape, finiteness and the float16 range: {hook: (x, norms)}.

    The token norms (stored anyway) carry both checks at 1/d of the cost of full passes over
    x: a NaN or inf element makes its token's norm non-finite, and |x_i| <= ||x||, so a norm
    within the float16 range proves every element is. Full passes over x run only when a
    norm fails, to count non-finite values or to confirm an overflow exactly.
    """
    res, bad = {}, {}
    where = f"images {span[0]}..{span[1] - 1}"
    batch_keep = keep(np.arange(*span)) if callable(keep) else keep  # a patch sample: once for every hook
    for hook in hooks:
        if hook not in out:
            raise ValueError(f"capture returned hooks {sorted(out)}, missing {hook!r}")
        x = _select_tokens(out[hook], batch_keep).float()
        expected = (span[1] - span[0], layout.n_tokens, layout.d_model)
        if tuple(x.shape) != expected:
            raise ValueError(
                f"hook {hook!r} gave {tuple(x.shape)} after keeping tokens {_describe(keep)}, the store expects "
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


def _describe(keep: slice | torch.Tensor | PerImage) -> str:
    if callable(keep):
        return "sampled per image"
    if isinstance(keep, slice):
        return "all" if keep == slice(None) else f"{keep.start}..{keep.stop}"
    return str(keep.tolist())
