"""Ingest a source into the stored dataset: decode every image once, preprocess it for the model,
hash its decoded pixels, set aside what cannot be read, and split over unique content.

    <dir>/images.zarr       uint8 (N, size, size, channels), the model's preprocessing applied
    <dir>/labels.parquet    image_idx, label, source, sha256 (of the decoded pixels, before
                            preprocessing), duplicate_of, split, extra label-file columns
    <dir>/rejected.parquet  source, reason: files that are not usable images

Decoding runs on a thread pool (Pillow releases the GIL while it decodes) or, with `processes`,
on spawned processes, in order either way, with a progress bar. Images are written to Zarr one
whole chunk at a time, on writer threads, while decoding goes on. Exact duplicates (same decoded
pixels) are kept, listed by `duplicate_of`, and always land on the same side of the split, so no
image is both trained on and evaluated. The done-marker `dataset.json` is written
last, with every file's size and sha256.
"""

from __future__ import annotations

from collections import deque
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from analysis.data.decode import ImageRejected, decode_pil
from analysis.data.images import IMAGE_WRITE_CONFIG, dataset_content_hash, first_copies, image_sha256, mark_dataset_done, split_unique
from analysis.data.sources import Entry
from analysis.models.inputs import Preprocessing
from analysis.integrity import atomic_write


@dataclass(frozen=True)
class IngestConfig:
    """How a source is ingested (beside what it is: FolderSource, ParquetSource)."""

    eval_fraction: float = 0.1
    """Share of the distinct images held out for evaluation."""
    seed: int = 0
    """Seed of the train/eval draw."""
    workers: int = 8
    """Decoding threads, or processes with `processes` (changes no stored value)."""
    processes: bool = False
    """Decode in `workers` processes rather than threads: no GIL shared between decoders (a
    decoding thread holds it for part of its time: Pillow's buffer copies, numpy glue), but each
    process starts as a fresh interpreter (~1.5 s of CPU) and every image travels to it and back
    by pipe. On 2 cores processes are slower (123 against 199 images/s, benchmarks/README.md);
    whether they overtake threads on many cores is what gpu_check.sh measures. Same stored bytes
    either way."""

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: expected a fraction in (0, 1), e.g. 0.1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: expected at least 1 decoding thread or process")

    def split_dict(self) -> dict:
        """The fields that decide stored values (the split), for ids."""
        return {"eval_fraction": self.eval_fraction, "seed": self.seed}


class IngestReport(NamedTuple):
    n_images: int
    n_rejected: int
    n_duplicates: int
    """Images whose decoded pixels equal an earlier image's."""
    n_train: int
    n_eval: int
    content_hash: str


Decoded = tuple[np.ndarray, str] | str
"""(preprocessed pixels, sha256 of the decoded pixels), or the reason the entry is rejected."""


def _read(entry: Entry) -> bytes | str:
    """The entry's encoded bytes, or the reason it is rejected."""
    try:
        return entry.read()
    except OSError as err:  # the file vanished or cannot be read
        return f"unreadable: {err}"


def _decoded(data: bytes | str, pre: Preprocessing) -> Decoded:
    if isinstance(data, str):
        return data
    try:
        image = decode_pil(data)
    except ImageRejected as err:
        return err.reason
    return pre.apply_pil(image), image_sha256(np.asarray(image))


def _decoded_many(datas: list[bytes | str], pre: Preprocessing) -> list[Decoded]:
    """A decoding process's task."""
    return [_decoded(data, pre) for data in datas]


def _decoded_on_threads(entries: Iterator[Entry], pre: Preprocessing, workers: int,
                        block: int) -> Iterator[tuple[Entry, Decoded]]:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        while batch := list(islice(entries, block)):
            yield from zip(batch, pool.map(lambda e: _decoded(_read(e), pre), batch))


# Images per task of a decoding process (~0.1 s of work: the pipe and the pool's bookkeeping stay
# small beside it) and tasks queued per process (so none waits while the next is read).
PROCESS_TASK_IMAGES, PROCESS_TASKS_AHEAD = 16, 2


def _decoded_in_processes(entries: Iterator[Entry], pre: Preprocessing, workers: int) -> Iterator[tuple[Entry, Decoded]]:
    """The files are read on threads here (a lambda reading a Parquet row cannot be sent to a
    process), decoded by `workers` spawned processes, and yielded in order."""
    with ThreadPoolExecutor(max_workers=min(workers, 8), thread_name_prefix="read") as readers, \
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        queued: deque[tuple[list[Entry], Future]] = deque()

        def submit() -> None:
            if batch := list(islice(entries, PROCESS_TASK_IMAGES)):
                queued.append((batch, pool.submit(_decoded_many, list(readers.map(_read, batch)), pre)))

        for _ in range(PROCESS_TASKS_AHEAD * workers):
            submit()
        while queued:
            batch, future = queued.popleft()
            submit()
            yield from zip(batch, future.result())


def ingest(entries: Iterable[Entry], n_entries: int, pre: Preprocessing, directory: str | Path, *,
           class_names: tuple[str, ...], eval_fraction: float = 0.1, seed: int = 0, workers: int = 8,
           processes: bool = False, images_per_chunk: int = 256, attrs: dict | None = None, progress: bool = True,
           held_out_only: bool = False, allow_empty: bool = False) -> IngestReport:
    """Decode, preprocess and store `entries` (`n_entries` of them) in `directory`; see the module.
    `held_out_only`: every image is in the eval split (images nothing trains on, however few).
    `allow_empty`: when no entry is a usable image, store an empty dataset (every entry in
    rejected.parquet) instead of refusing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (pre.size, pre.size, pre.channels)
    arr = zarr.create_array(store=str(directory / "images.zarr"), shape=(max(n_entries, 1),) + shape,
                            chunks=(images_per_chunk,) + shape, dtype="uint8", overwrite=True,
                            config=IMAGE_WRITE_CONFIG)
    kept: list[dict] = []
    rejected: list[dict] = []
    pending: list[np.ndarray] = []
    index = {name: i for i, name in enumerate(class_names)}
    entries = iter(entries)
    decoded = _decoded_in_processes(entries, pre, workers) if processes else \
        _decoded_on_threads(entries, pre, max(1, workers), 4 * images_per_chunk)
    with closing(decoded), ChunkWriter(arr, max(1, workers // 4)) as writer, \
            tqdm(total=n_entries, desc="decode images", unit="img", disable=not progress) as bar:
        for entry, out in decoded:
            bar.update(1)
            if isinstance(out, str):
                rejected.append({"source": entry.source, "reason": out})
                continue
            pixels, sha = out
            pending.append(pixels)
            kept.append({"label": -1 if entry.label is None else index[entry.label], "source": entry.source,
                         "sha256": sha, **entry.extra})
            if len(pending) == images_per_chunk:  # one whole chunk per write
                writer.write(pending)
                pending = []
        if pending:
            writer.write(pending)
    written = writer.written
    if written == 0 and not allow_empty:
        raise ValueError(f"none of the {n_entries} files could be used as an image (first reasons: "
                         f"{[r['reason'] for r in rejected[:3]]}): point the dataset at image files")
    arr.resize((written,) + shape)
    return _finish(directory, arr, kept, rejected, None if held_out_only else eval_fraction, seed, attrs or {})


class ChunkWriter:
    """Writes consecutive whole chunks of images to `arr` on `threads` threads of its own, at most
    one chunk in flight per thread, so decoding goes on while chunks are compressed (Zarr runs
    zstd on its own thread pool, so parallel writes compress in parallel; whole chunks never share
    a file, so they are safe). An error of a write is raised by a later `write` or at the end of
    the `with` block."""

    def __init__(self, arr: zarr.Array, threads: int = 1):
        self.arr, self.written, self.threads = arr, 0, threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-writer")
        self.in_flight: deque[Future] = deque()

    def write(self, images: list[np.ndarray]) -> None:
        while len(self.in_flight) >= self.threads:
            self.in_flight.popleft().result()
        block = np.stack(images)
        self.in_flight.append(self.pool.submit(self.arr.__setitem__, slice(self.written, self.written + len(block)),
                                               block))
        self.written += len(block)

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self.in_flight and exc[0] is None:
                self.in_flight.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _finish(directory: Path, arr: zarr.Array, kept: list[dict], rejected: list[dict], eval_fraction: float | None,
            seed: int, attrs: dict) -> IngestReport:
    shas = [row["sha256"] for row in kept]
    duplicate_of = first_copies(shas)
    split = np.full(len(shas), "eval") if eval_fraction is None else split_unique(shas, eval_fraction, seed)
    content_hash = dataset_content_hash(shas)
    arr.attrs.update({**attrs, "content_hash": content_hash, "n_images": len(kept)})
    reject_schema = pa.schema([("source", pa.string()), ("reason", pa.string())])
    rejected_table = pa.Table.from_pylist(rejected, schema=reject_schema)
    atomic_write(directory / "rejected.parquet", lambda tmp: pq.write_table(rejected_table, tmp))
    table = pa.Table.from_pylist(kept) if kept else pa.table(  # no images: the columns all the same
        {"label": pa.array([], pa.int64()), "source": pa.array([], pa.string()), "sha256": pa.array([], pa.string())})
    table = table.add_column(0, "image_idx", pa.array(np.arange(len(kept), dtype=np.int64)))
    table = table.append_column("duplicate_of", pa.array(duplicate_of, pa.int64()))
    table = table.append_column("split", pa.array(split))
    atomic_write(directory / "labels.parquet", lambda tmp: pq.write_table(table, tmp))
    mark_dataset_done(directory, content_hash, len(kept))
    n_dup = sum(d is not None for d in duplicate_of)
    return IngestReport(len(kept), len(rejected), n_dup, int((split == "train").sum()), int((split == "eval").sum()),
                        content_hash)
