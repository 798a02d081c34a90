"""Resumable ingestion: a journal of the chunks an interrupted `ingest` already stored.

Ingesting a folder of ImageNet's size takes hours on a few cores, and a kill, a crash or a
preempted node must not throw that away. Once Zarr has written a chunk of images and its file is
flushed to disk, the chunk gets a part file in `<dataset>/ingest_journal/`: the rows of the
images it holds (label, source, sha256, extra label-file columns), the files set aside since the
previous chunk, the source of every entry consumed for it, in order, and the size of its file.

A rerun with the same plan (entries, preprocessing, chunking, class names, attrs) keeps the
longest run of parts 0..m-1 whose chunk files are still there at their recorded size, checks
that the entries they consumed are the ones it is given (source by source), and decodes from
the next entry on, so the finished dataset is byte-identical to an uninterrupted run's. A chunk
file that is missing or has another size is damage: it is named in the log, and it and every
part after it are written again. The journal is removed once the dataset is marked done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.integrity import atomic_write, remove_temporaries, write_json

log = logging.getLogger("spectra.integrity")

JOURNAL_DIR = "ingest_journal"
_PLAN = "plan.json"
_META_KEY = b"spectra.ingest_part"


@dataclass
class Part:
    """What one stored chunk of images consumed and holds."""

    chunk: int
    kept: list[dict]
    """Rows of the images in the chunk, in order (label, source, sha256, extra columns)."""
    rejected: list[dict]
    """Files set aside (source, reason) among the entries consumed for this chunk."""
    sources: list[str]
    """Source of every entry consumed for this chunk, kept or not, in order."""
    chunk_bytes: int = -1
    """Size of the chunk's file once written."""


class IngestJournal:
    def __init__(self, directory: Path, plan: dict):
        self.path = Path(directory) / JOURNAL_DIR
        self.plan = json.loads(json.dumps(plan))  # as it reads back from the file

    def stored_parts(self, chunk_file) -> list[Part]:
        """The parts a rerun can keep (see the module): none when the journal's plan is another's
        (the caller then `start`s a new one). `chunk_file(chunk)` is the path of a chunk's file."""
        if not (self.path / _PLAN).exists() or json.loads((self.path / _PLAN).read_text()) != self.plan:
            return []
        remove_temporaries(self.path)  # part files whose write was killed before its rename
        parts = []
        while (file := self._file(len(parts))).exists():
            part = _read_part(file)
            stored = chunk_file(part.chunk)
            size = stored.stat().st_size if stored.exists() else None
            if size != part.chunk_bytes:
                log.warning("ingestion journal: chunk %d's file %s is %s, not %d bytes as written; "
                            "storing it and the chunks after it again", part.chunk, stored,
                            "missing" if size is None else f"{size} bytes", part.chunk_bytes)
                break
            parts.append(part)
        for stale in sorted(self.path.glob("part-*.parquet"))[len(parts):]:  # after a gap, or damage
            stale.unlink()
        return parts

    def start(self) -> None:
        """An empty journal for this plan."""
        self.clear()
        write_json(self.path / _PLAN, self.plan)

    def record(self, part: Part, chunk_file: Path) -> None:
        """Journal `part` once its chunk's file is written (called after the write, on the writer's
        thread). The chunk's file is flushed to disk first, so that after a power loss a journaled
        chunk is never a file of the right size whose pages never reached the disk."""
        with open(chunk_file, "rb+") as f:
            os.fsync(f.fileno())
        part.chunk_bytes = chunk_file.stat().st_size
        table = pa.Table.from_pylist(part.kept) if part.kept else pa.table({})
        meta = {"chunk": part.chunk, "rejected": part.rejected, "sources": part.sources,
                "chunk_bytes": part.chunk_bytes}
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        atomic_write(self._file(part.chunk), lambda tmp: pq.write_table(table, tmp))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _file(self, chunk: int) -> Path:
        return self.path / f"part-{chunk:08d}.parquet"


def _read_part(file: Path) -> Part:
    table = pq.read_table(file)
    meta = json.loads(table.schema.metadata[_META_KEY])
    return Part(meta["chunk"], table.to_pylist(), meta["rejected"], meta["sources"], meta["chunk_bytes"])
