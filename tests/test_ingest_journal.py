"""Interrupted ingestion resumes after its last stored chunk (analysis.data.ingest_journal): a
raised error, a real SIGKILL, a damaged chunk and a journal of other files."""

import json
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from analysis.data.sources import FolderSource
from test_ingest import _ingest, make_photo_folder


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


class Interrupted(Exception):
    pass


def _interrupt_at(monkeypatch, file=None):
    """Make ingestion die (as a kill would, mid-run) when it comes to decode `file`; the list of
    decoded entries it returns grows with every decode."""
    import analysis.data.ingest as ingestion

    real, calls, fatal = ingestion._decoded, [], None if file is None else file.read_bytes()

    def decoded(data, pre):
        calls.append(1)
        if data == fatal:
            raise Interrupted(f"killed at {file}")
        return real(data, pre)

    monkeypatch.setattr(ingestion, "_decoded", decoded)
    return calls


def _assert_same_dataset(a, b):
    """Byte for byte: the done-markers list every file's size and sha256."""
    assert json.loads((a / "dataset.json").read_text()) == json.loads((b / "dataset.json").read_text())
    assert pq.read_table(a / "labels.parquet").equals(pq.read_table(b / "labels.parquet"))
    assert not (b / "ingest_journal").exists()


def test_an_interrupted_ingest_resumes_after_its_last_stored_chunk_byte_identical(photo_folder, tmp_path,
                                                                                  monkeypatch):
    source = FolderSource(str(photo_folder))
    _, whole = _ingest(source, tmp_path / "whole")
    with monkeypatch.context() as patch:  # chunk 0 (entries 0-4: 4 images) is stored, then the run dies
        _interrupt_at(patch, photo_folder / "misc" / "sixteen.png")  # entry 8
        with pytest.raises(Interrupted):
            _ingest(source, tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / "ingest_journal").iterdir()) == \
        ["part-00000000.parquet", "plan.json"]
    with monkeypatch.context() as patch:
        decodes = _interrupt_at(patch)
        listing, resumed = _ingest(source, tmp_path / "resumed")
    # chunk 0 consumed 5 entries (its 4 images and the empty file): only the other 7 are decoded
    assert len(decodes) == listing.n_entries - 5 == 7
    assert resumed == whole
    _assert_same_dataset(tmp_path / "whole", tmp_path / "resumed")


def test_a_sigkilled_ingest_resumes_byte_identical(photo_folder, tmp_path, monkeypatch):
    """A real SIGKILL right after chunk 1 is journaled, while the next writes may be in flight."""
    script = f"""
import os, signal
from analysis.data import ingest_journal
from analysis.data.ingest import ingest
from analysis.data.sources import FolderSource
from analysis.models.inputs import Preprocessing

record = ingest_journal.IngestJournal.record

def record_then_die(self, part, path):
    record(self, part, path)
    if part.chunk == 1:
        os.kill(os.getpid(), signal.SIGKILL)

ingest_journal.IngestJournal.record = record_then_die
source = FolderSource({str(photo_folder)!r})
listing = source.listing()
ingest(source.entries(), listing.n_entries, Preprocessing(size=32, resize=40), {str(tmp_path / "killed")!r},
       class_names=listing.class_names, eval_fraction=0.25, seed=0, workers=4, images_per_chunk=4, progress=False)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed" / "dataset.json").exists()
    assert {"part-00000000.parquet", "part-00000001.parquet"} <= {p.name for p in
                                                                 (tmp_path / "killed" / "ingest_journal").iterdir()}
    source = FolderSource(str(photo_folder))
    _, whole = _ingest(source, tmp_path / "whole")
    decodes = _interrupt_at(monkeypatch)
    _, resumed = _ingest(source, tmp_path / "killed")
    assert len(decodes) == 1  # chunks 0 and 1 consumed entries 0-10
    assert resumed == whole
    _assert_same_dataset(tmp_path / "whole", tmp_path / "killed")


def test_a_damaged_chunk_or_other_files_restart_what_the_journal_cannot_vouch_for(photo_folder, tmp_path,
                                                                                  monkeypatch, caplog):
    source = FolderSource(str(photo_folder))
    _, whole = _ingest(source, tmp_path / "whole")

    def interrupted(directory):
        with monkeypatch.context() as patch:  # chunks 0 and 1 stored (entries 0-10)
            _interrupt_at(patch, photo_folder / "space" / "rocket.webp")  # entry 11
            with pytest.raises(Interrupted):
                _ingest(source, directory)

    interrupted(tmp_path / "ds")
    (tmp_path / "ds" / "images.zarr" / "c" / "1" / "0" / "0" / "0").write_bytes(b"cut")  # chunk 1 damaged
    with monkeypatch.context() as patch:
        decodes = _interrupt_at(patch)
        _, report = _ingest(source, tmp_path / "ds")
    assert "chunk 1's file" in caplog.text and "3 bytes" in caplog.text
    assert len(decodes) == 12 - 5  # from the end of chunk 0, the last part the journal vouches for
    assert report == whole
    _assert_same_dataset(tmp_path / "whole", tmp_path / "ds")

    # The same plan (as many files, the same classes) over other files: everything decoded again.
    renamed = tmp_path / "renamed"
    shutil.copytree(photo_folder, renamed)
    interrupted(tmp_path / "other")
    (renamed / "cat" / "chelsea.jpg").rename(renamed / "cat" / "chelsea2.jpg")
    caplog.clear()
    _, fresh = _ingest(FolderSource(str(renamed)), tmp_path / "fresh")
    with monkeypatch.context() as patch:
        decodes = _interrupt_at(patch)
        _, report = _ingest(FolderSource(str(renamed)), tmp_path / "other")
    assert "names other files than the entries given" in caplog.text
    assert len(decodes) == 12 and report == fresh
    _assert_same_dataset(tmp_path / "fresh", tmp_path / "other")
