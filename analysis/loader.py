"""Reading activation stores: random access, ordered iteration and a shuffled token loader.

Random-row reads from Zarr are slow (DESIGN.md §3), so the shuffled loader reads whole chunks
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
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from analysis.activation_stats import StoreStats, merge_partials, read_stats
from analysis.activation_store import StoreLocation, completed, is_url, open_layout
from analysis.tokens import TokenGroups


def decode(raw: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Stored values -> float32 tensor (bfloat16 is stored as its uint16 bits).

    Done in numpy: on CPU it widens 16-bit floats 2-3x faster than torch's `.float()`.
    """
    if logical_dtype == "bfloat16":  # bfloat16 is the top half of a float32
        return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
    return torch.from_numpy(raw.astype(np.float32, copy=False))


class ActivationStore:
    """A complete store opened read-only (use `ActivationStore.open`).

    `path` is a local directory or an fsspec URL (memory://, s3://, …); `self.path` keeps a URL
    as the string it was given and turns anything else into a Path.
    """

    def __init__(self, path: StoreLocation):
        self.path: StoreLocation = path if is_url(path) else Path(path)
        group, self.layout = open_layout(self.path)
        missing = np.flatnonzero(~completed(group)).tolist()
        if missing:
            raise ValueError(
                f"activation store {self.path} is incomplete: shards {missing} are missing; "
                "materialize the activations for those partitions first"
            )
        self._group, self._acts = group, group["acts"]
        self.n_images, self.n_tokens = self.layout.n_images, self.layout.n_tokens
        self.d_model, self.dtype = self.layout.d_model, self.layout.dtype
        self.chunk_images = self.layout.images_per_chunk
        self.lineage: dict = dict(group.attrs.get("lineage", {}))
        groups = group.attrs.get("token_groups")
        self.token_groups: TokenGroups | None = None if groups is None else TokenGroups.from_dict(groups)
        """Where the class token, registers and patches sit along the token axis (None: not recorded)."""
        self._stats: StoreStats | None = None

    @classmethod
    def open(cls, path: StoreLocation) -> "ActivationStore":
        return cls(path)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_images)

    @property
    def stats(self) -> StoreStats:
        """Finalized statistics, or merged in memory from the shard partials if not finalized."""
        if self._stats is None:
            self._stats = read_stats(self._group) or merge_partials(self.path)
        return self._stats

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Images [start, stop) as (n, T, d) float32."""
        return decode(self.read_raw(start, stop), self.dtype)

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        """Images [start, stop) as stored (float16/float32, or uint16 bfloat16 bits)."""
        if not 0 <= start <= stop <= self.n_images:
            raise ValueError(f"read({start}, {stop}): expected 0 <= start <= stop <= {self.n_images}")
        return self._acts[start:stop]

    def read_norms(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(self._group["norms"][start:stop])

    def read_chunk(self, chunk: int, raw: bool = False) -> torch.Tensor | np.ndarray:
        """One whole chunk (the unit of every loader read): (n, T, d) float32, or as stored."""
        start = chunk * self.chunk_images
        stop = min(start + self.chunk_images, self.n_images)
        return self.read_raw(start, stop) if raw else self.read(start, stop)


def split_images(n_images: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, eval) image indices; eval gets round(eval_fraction * n) images."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction}: expected a fraction in (0, 1), e.g. 0.1")
    n_eval = round(eval_fraction * n_images)
    if not 0 < n_eval < n_images:
        raise ValueError(
            f"eval_fraction={eval_fraction} of {n_images} images leaves an empty split: "
            "use more images or a different fraction"
        )
    perm = np.random.default_rng(seed).permutation(n_images)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _check_indices(image_indices, n_images: int) -> np.ndarray:
    idx = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("image_indices is empty: pass at least one image index")
    if idx.min() < 0 or idx.max() >= n_images:
        raise ValueError(f"image_indices must lie in [0, {n_images}), got {idx.min()}..{idx.max()}")
    uniq = np.unique(idx)
    if len(uniq) != len(idx):
        raise ValueError("image_indices has duplicates: each image must appear once (np.unique it)")
    return uniq


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
        idx = _check_indices(image_indices, store.n_images)
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


def iter_images(store: ActivationStore, image_indices, *,
                images_per_batch: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(image_idx (n,), acts (n, T, d) float32) in ascending image order, reading whole chunks."""
    idx = _check_indices(image_indices, store.n_images)
    ipc = store.chunk_images
    pend_idx: list[np.ndarray] = []
    pend_acts: list[torch.Tensor] = []
    have = 0
    for c in np.unique(idx // ipc):
        sel = idx[(idx >= c * ipc) & (idx < (c + 1) * ipc)]
        chunk = store.read_chunk(int(c))
        pend_idx.append(sel)
        pend_acts.append(chunk[torch.from_numpy(sel - c * ipc)])
        have += len(sel)
        while have >= images_per_batch:
            all_idx, all_acts = np.concatenate(pend_idx), torch.cat(pend_acts)
            yield all_idx[:images_per_batch], all_acts[:images_per_batch]
            pend_idx, pend_acts = [all_idx[images_per_batch:]], [all_acts[images_per_batch:]]
            have -= images_per_batch
    if have:
        yield np.concatenate(pend_idx), torch.cat(pend_acts)


def read_tokens(store: ActivationStore, image_indices, device: str | torch.device = "cpu") -> torch.Tensor:
    """Every token of the given images as one (n_images * T, d) float32 tensor (small sets only:
    the held-out images a trainer scores while it runs)."""
    acts = torch.cat([a for _, a in iter_images(store, image_indices)])
    return acts.reshape(-1, store.d_model).to(device)
