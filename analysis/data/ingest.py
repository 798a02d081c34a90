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
image is both trained on and evaluated. Each chunk, once written, is journaled
(analysis.data.ingest_journal), so an interrupted ingest resumes after its last stored chunk and
ends byte-identical to an uninterrupted one. The done-marker `dataset.json` is written last, with
every file's size and sha256.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from analysis.data.decode import ImageRejected, decode_pil
from analysis.data.ingest_journal import IngestJournal, Part
from analysis.data.images import IMAGE_WRITE_CONFIG, dataset_content_hash, first_copies, image_sha256, mark_dataset_done, split_unique
from analysis.data.sources import Entry
from analysis.models.inputs import Preprocessing
from analysis.integrity import atomic_write

log = logging.getLogger("spectra.ingest")


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
    An ingest that was interrupted resumes after its last stored chunk (analysis.data.ingest_journal).
    `held_out_only`: every image is in the eval split (images nothing trains on, however few).
    `allow_empty`: when no entry is a usable image, store an empty dataset (every entry in
    rejected.parquet) instead of refusing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (pre.size, pre.size, pre.channels)
    plan = {"n_entries": n_entries, "preprocessing": pre.to_dict(), "images_per_chunk": images_per_chunk,
            "class_names": list(class_names), "attrs": attrs or {}}
    journal = IngestJournal(directory, plan)
    entries = iter(entries)
    arr, parts, entries = _resume(directory, journal, entries, (max(n_entries, 1),) + shape,
                                  (images_per_chunk,) + shape)
    kept = [row for part in parts for row in part.kept]
    rejected = [row for part in parts for row in part.rejected]
    consumed = sum(len(part.sources) for part in parts)
    part = Part(len(parts), [], [], [])
    pending: list[np.ndarray] = []
    index = {name: i for i, name in enumerate(class_names)}
    decoded = _decoded_in_processes(entries, pre, workers) if processes else \
        _decoded_on_threads(entries, pre, max(1, workers), 4 * images_per_chunk)
    with closing(decoded), ChunkWriter(arr, max(1, workers // 4), written=len(kept)) as writer, \
            tqdm(total=n_entries, initial=consumed, desc="decode images", unit="img", disable=not progress) as bar:
        for entry, out in decoded:
            bar.update(1)
            part.sources.append(entry.source)
            if isinstance(out, str):
                part.rejected.append({"source": entry.source, "reason": out})
                continue
            pixels, sha = out
            pending.append(pixels)
            part.kept.append({"label": -1 if entry.label is None else index[entry.label], "source": entry.source,
                              "sha256": sha, **entry.extra})
            if len(pending) == images_per_chunk:  # one whole chunk per write
                part = _write_chunk(writer, pending, part, journal, kept, rejected)
                pending = []
        if pending:
            _write_chunk(writer, pending, part, journal, kept, rejected)
        else:  # files set aside after the last image: journaled by no chunk, decoded again by a rerun
            rejected += part.rejected
    written = writer.written
    if written == 0 and not allow_empty:
        raise ValueError(f"none of the {n_entries} files could be used as an image (first reasons: "
                         f"{[r['reason'] for r in rejected[:3]]}): point the dataset at image files")
    arr.resize((written,) + shape)
    report = _finish(directory, arr, kept, rejected, None if held_out_only else eval_fraction, seed, attrs or {})
    journal.clear()  # after the done-marker: a kill in between leaves a finished dataset and a stale journal
    return report


def _resume(directory: Path, journal: IngestJournal, entries: Iterator[Entry], shape: tuple, chunks: tuple
            ) -> tuple[zarr.Array, list[Part], Iterator[Entry]]:
    """The image array to write into, the journal's parts to keep, and the entries still to decode."""
    path = directory / "images.zarr"
    arr = None
    if path.exists():
        try:
            arr = zarr.open_array(str(path), mode="r+")
        except (FileNotFoundError, ValueError, KeyError):  # a kill before its metadata was written
            arr = None
    chunk_file = (lambda c: path / arr.metadata.encode_chunk_key((c,) + (0,) * (len(shape) - 1))) \
        if arr is not None and arr.chunks == chunks and arr.shape[1:] == shape[1:] and arr.dtype == np.uint8 else None
    parts = journal.stored_parts(chunk_file) if chunk_file else []
    if parts:
        skipped = list(islice(entries, sum(len(p.sources) for p in parts)))
        if [e.source for e in skipped] == [s for p in parts for s in p.sources]:
            log.info("ingestion: resuming %s after %d stored chunks (%d entries)", directory, len(parts), len(skipped))
            arr.resize(shape)  # back to every entry's row, should a finished run have shrunk it
            return arr, parts, entries
        log.warning("ingestion journal of %s names other files than the entries given; ingesting from the start",
                    directory)
        entries = chain(skipped, entries)
    journal.start()
    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype="uint8", overwrite=True,
                            config=IMAGE_WRITE_CONFIG)
    return arr, [], entries


def _write_chunk(writer: "ChunkWriter", images: list[np.ndarray], part: Part, journal: IngestJournal,
                 kept: list[dict], rejected: list[dict]) -> Part:
    """Write one chunk, journal it once written, and start the next chunk's part."""
    path = Path(str(writer.arr.store_path.store.root)) / writer.arr.metadata.encode_chunk_key(
        (part.chunk,) + (0,) * (writer.arr.ndim - 1))
    writer.write(images, then=lambda: journal.record(part, path))
    kept += part.kept
    rejected += part.rejected
    return Part(part.chunk + 1, [], [], [])


class ChunkWriter:
    """Writes consecutive whole chunks of images to `arr` (from row `written` on) on `threads`
    threads of its own, at most one chunk in flight per thread, so decoding goes on while chunks
    are compressed (Zarr runs zstd on its own thread pool, so parallel writes compress in
    parallel; whole chunks never share a file, so they are safe). An error of a write is raised
    by a later `write` or at the end of the `with` block."""

    def __init__(self, arr: zarr.Array, threads: int = 1, written: int = 0):
        self.arr, self.written, self.threads = arr, written, threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-writer")
        self.in_flight: deque[Future] = deque()

    def write(self, images: list[np.ndarray], then: Callable[[], None] | None = None) -> None:
        """Write `images` next; `then()` runs on the writer thread once they are written."""
        while len(self.in_flight) >= self.threads:
            self.in_flight.popleft().result()
        block = np.stack(images)
        rows = slice(self.written, self.written + len(block))

        def store() -> None:
            self.arr[rows] = block
            if then is not None:
                then()

        self.in_flight.append(self.pool.submit(store))
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
