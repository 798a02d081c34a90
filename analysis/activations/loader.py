"""The shuffled token loader a trainer reads from.

Random-row reads from Zarr are slow (DESIGN.md §3), so the loader reads whole chunks
in a random order, pools `buffer_chunks` of them, permutes the pooled token rows and yields
batches; rows that do not fill a last batch are carried into the next buffer, so every token
of the selected images appears exactly once per epoch (only the epoch's final partial batch is
dropped when drop_last). A background thread reads the next buffers while the consumer trains.

The order depends only on (seed, epoch), never on thread timing, so a run resumes exactly
from `state()` (epoch, batches consumed).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple

import numpy as np
import torch

from analysis.activations.reader import ActivationStore, check_image_indices, decode


class LoaderState(NamedTuple):
    epoch: int
    """Epoch the stream is in."""
    batches: int
    """Batches of that epoch already handed out."""


class ShuffledLoader:
    """Infinite shuffled stream of (batch_size, d) float32 token batches from a store."""

    def __init__(self, store: ActivationStore, image_indices, *, batch_size: int = 4096,
                 seed: int = 0, buffer_chunks: int = 8, prefetch: int = 2, drop_last: bool = True,
                 device: str | torch.device = "cpu"):
        for name, v in (("batch_size", batch_size), ("buffer_chunks", buffer_chunks), ("prefetch", prefetch)):
            if v < 1:
                raise ValueError(f"{name}={v}: expected a positive int")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.buffer_chunks, self.prefetch, self.drop_last = buffer_chunks, prefetch, drop_last
        self.device = torch.device(device)
        idx = check_image_indices(image_indices, store.n_images)
        ipc = store.chunk_images
        mask = np.zeros(store.n_images, dtype=bool)
        mask[idx] = True
        # Per chunk that holds any selected image: the in-chunk positions of those images.
        self._chunks = np.unique(idx // ipc).tolist()
        self._local = {c: np.flatnonzero(mask[c * ipc : (c + 1) * ipc]) for c in self._chunks}
        self.n_rows = len(idx) * store.n_tokens
        self._acts_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[store.dtype]
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{self.n_rows} tokens make no full batch of {batch_size}: lower batch_size, "
                "select more images or pass drop_last=False"
            )
        self._state = LoaderState(0, 0)

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n_rows, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def state(self) -> LoaderState:
        return self._state

    def load_state(self, state: LoaderState | tuple | dict) -> None:
        """Resume the `__iter__` stream where `state()` was taken."""
        self._state = LoaderState(**state) if isinstance(state, dict) else LoaderState(*state)

    def _rows(self, chunk: int) -> np.ndarray:
        """Selected images' tokens of one chunk, (rows, d) as stored; reads the whole chunk."""
        acts, local = self.store.read_chunk(chunk, raw=True), self._local[chunk]
        if len(local) < len(acts):
            acts = acts[local]
        return acts.reshape(-1, self.store.d_model)

    def _read_buffer(self, chunks: list[int]) -> np.ndarray:
        """A buffer's rows as stored, after `batch_size` spare rows where the carry goes.

        Buffers stay in the stored dtype (half the bytes to permute for 16-bit stores); each
        batch is decoded to float32 after the gather, on the target device.
        """
        parts = [self._rows(c) for c in chunks]
        out = np.empty((self.batch_size + sum(map(len, parts)), self.store.d_model), parts[0].dtype)
        pos = self.batch_size
        for part in parts:
            out[pos : pos + len(part)] = part
            pos += len(part)
        return out

    def _plan(self, epoch: int):
        """Data-free schedule of one epoch: chunk order, row offsets and a lazy buffer plan.

        Rows are numbered in chunk-read order, so a carried-over remainder can be re-read when
        resuming. The plan yields (chunks, carried-in row ids, permutation, full batches) per
        buffer and finally (None, leftover row ids, None, 0).
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = [self._chunks[i] for i in rng.permutation(len(self._chunks))]
        sizes = [len(self._local[c]) * self.store.n_tokens for c in order]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        def buffers():
            carry = np.empty(0, dtype=np.int64)
            for b in range(0, len(order), self.buffer_chunks):
                e = min(b + self.buffer_chunks, len(order))
                ids = np.concatenate([carry, np.arange(offsets[b], offsets[e])])
                perm = rng.permutation(len(ids))
                n_full = len(ids) // self.batch_size
                yield order[b:e], carry, perm, n_full
                carry = ids[perm[n_full * self.batch_size :]]
            yield None, carry, None, 0

        return order, offsets, buffers()

    def _reread(self, ids: np.ndarray, order: list[int], offsets: np.ndarray) -> np.ndarray:
        """Rows for epoch row ids (a carry, on resume), reading the whole chunks that hold them."""
        pos = np.searchsorted(offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.store.d_model), dtype=self._acts_dtype)
        for p in np.unique(pos):
            sel = pos == p
            out[sel] = self._rows(order[p])[ids[sel] - offsets[p]]
        return out

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """One epoch's batches, deterministic for (seed, epoch); skips the first `start_batch`."""
        order, offsets, plan = self._plan(epoch)
        done, skipped = 0, 0
        for chunks, carry_ids, perm, n_full in plan:  # walk the plan without reading data
            if chunks is None or done + n_full > start_batch:
                break
            done, skipped = done + n_full, skipped + 1
        bc = self.buffer_chunks
        rest = [order[b : b + bc] for b in range(skipped * bc, len(order), bc)]
        reader = _Prefetcher(rest, self._read_buffer, self.prefetch)
        bs = self.batch_size
        try:
            carry = self._reread(carry_ids, order, offsets)
            while chunks is not None:
                buf = reader.get()
                data = buf[bs - len(carry) :]  # carry rows first, as in the plan's row ids
                data[: len(carry)] = carry
                for j in range(max(start_batch - done, 0), n_full):  # np.take: fastest gather
                    yield self._to_device(np.take(data, perm[j * bs : (j + 1) * bs], axis=0))
                done += n_full
                carry = np.take(data, perm[n_full * bs :], axis=0)
                chunks, _, perm, n_full = next(plan)
            if not self.drop_last and len(carry) and start_batch <= done:
                yield self._to_device(carry)
        finally:
            reader.close()

    def _to_device(self, rows: np.ndarray) -> torch.Tensor:
        """Stored-dtype rows -> float32 on the device (on GPU: 16-bit rows cross, then widen)."""
        if self.device.type != "cuda":
            return decode(rows, self.store.dtype).to(self.device)
        t = torch.from_numpy(rows)
        if self.store.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.pin_memory().to(self.device, non_blocking=True).float()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            epoch, start = self._state
            for j, batch in enumerate(self.epoch(epoch, start), start=start + 1):
                self._state = LoaderState(epoch, j)  # before yielding: the batch is consumed
                yield batch
            self._state = LoaderState(epoch + 1, 0)


class _Prefetcher:
    """Reads buffers (lists of chunks) in order on a thread, `depth` buffers ahead."""

    def __init__(self, buffers: list[list[int]], read_rows, depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(buffers, read_rows), daemon=True)
        self._thread.start()

    def _run(self, buffers, read_rows):
        for chunks in buffers:
            try:
                item = read_rows(chunks)
            except BaseException as e:  # re-raised in the consumer by get()
                item = e
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def get(self) -> np.ndarray:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"activation loader read failed: {item!r}") from item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()
