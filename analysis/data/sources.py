"""Where images come from: a folder of files, Parquet files of encoded images, or a Hugging Face
dataset saved to disk.

A source is listed cheaply first (paths, sizes, labels), so the suite can name its classes and
derive the dataset id before any image is decoded; `entries` then yields one `Entry` per image
in a deterministic order (relative path for folders; file, then row for Parquet). Parquet is read
one row group at a time, never whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


class Entry(NamedTuple):
    source: str
    """Relative path (folders) or `<file>#<row>` (Parquet): where the image came from."""
    read: Callable[[], bytes]
    """The encoded bytes (read lazily, on a decoding thread)."""
    label: str | None
    """Class name, or None for an unlabelled source."""
    extra: dict
    """Further columns of a label file, kept beside the image."""


@dataclass(frozen=True)
class Listing:
    """A source as seen without decoding: what the id, the class names and the progress bar need."""

    n_entries: int
    class_names: tuple[str, ...]
    """Sorted distinct labels; empty for an unlabelled source."""
    n_unlabelled: int
    """Entries without a label."""
    digest: str
    """sha256 over every file's (relative path, size, mtime): changes when any file does."""


def _digest(rows: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ---- folders -------------------------------------------------------------------------------


def _image_files(root: Path, skip: set[Path]) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} does not exist or is not a directory: "
                         "set dataset.params.path to a folder of images")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p not in skip
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"dataset folder {str(root)!r} holds no files: put images in it (sub-folders name classes)")
    return files


def _label_table(path: Path, path_column: str, label_column: str) -> pa.Table:
    if not path.is_file():
        raise ValueError(f"label file {str(path)!r} does not exist: pass a CSV or Parquet file, or omit labels_file "
                         "to take labels from sub-folder names")
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    for col in (path_column, label_column):
        if col not in table.column_names:
            raise ValueError(f"label file {str(path)!r} has no column {col!r} (columns: {table.column_names}): "
                             "set path_column / label_column")
    return table


def folder_labels(root: Path, files: list[Path], labels_file: Path | None, path_column: str,
                  label_column: str) -> dict[str, tuple[str | None, dict]]:
    """relative path -> (label, extra columns): from the label file, else the first sub-folder
    (the ImageFolder convention; files at the top level are unlabelled)."""
    rel = [f.relative_to(root).as_posix() for f in files]
    if labels_file is None:
        return {r: (r.split("/")[0] if "/" in r else None, {}) for r in rel}
    rows = _label_table(labels_file, path_column, label_column).to_pylist()
    by_path = {str(row[path_column]).lstrip("./"): row for row in rows}
    absent = sorted(set(by_path) - set(rel))
    if absent:
        raise ValueError(f"label file {str(labels_file)!r} names {len(absent)} images not in {str(root)!r}, "
                         f"e.g. {absent[:3]}: fix the paths (relative to the folder, '/'-separated)")
    missing = [r for r in rel if r not in by_path]
    if missing:
        raise ValueError(f"{len(missing)} files in {str(root)!r} have no row in {str(labels_file)!r}, "
                         f"e.g. {missing[:3]}: add them, or move them out of the folder")
    out = {}
    for r in rel:
        row = by_path[r]
        label = row[label_column]
        out[r] = (None if label is None else str(label),
                  {k: v for k, v in row.items() if k not in (path_column, label_column)})
    return out


@dataclass(frozen=True)
class FolderSource:
    """A directory of images, recursive (hidden files skipped), in order of relative path; labels
    from the first sub-folder (the ImageFolder convention) or from a CSV/Parquet label file."""

    path: str
    """The folder."""
    labels_file: str | None = None
    """CSV or Parquet mapping `path_column` (relative, '/'-separated) to `label_column`; its other
    columns are kept beside each image. None: sub-folder names are the labels."""
    path_column: str = "path"
    label_column: str = "label"

    def _scan(self) -> tuple[Path, list[Path], dict[str, tuple[str | None, dict]]]:
        root = Path(self.path)
        labels_file = Path(self.labels_file) if self.labels_file else None
        files = _image_files(root, {labels_file.resolve()} if labels_file else set())
        return root, files, folder_labels(root, files, labels_file, self.path_column, self.label_column)

    def listing(self) -> Listing:
        root, files, labels = self._scan()
        stats = [(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        if self.labels_file:
            lf = Path(self.labels_file)
            stats.append((str(lf), lf.stat().st_size, lf.stat().st_mtime_ns))
        names = sorted({label for label, _ in labels.values() if label is not None})
        unlabelled = sum(label is None for label, _ in labels.values())
        return Listing(len(files), tuple(names), unlabelled, _digest(stats))

    def entries(self) -> Iterator[Entry]:
        root, files, labels = self._scan()
        for f in files:
            rel = f.relative_to(root).as_posix()
            label, extra = labels[rel]
            yield Entry(rel, f.read_bytes, label, extra)


# ---- Parquet -------------------------------------------------------------------------------


def _parquet_files(paths: tuple[str, ...]) -> list[Path]:
    files = []
    for p in paths:
        path = Path(p)
        found = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        for f in found:
            if not f.is_file():
                raise ValueError(f"Parquet file {str(f)!r} does not exist: list existing files or folders in "
                                 "dataset.params.paths")
        files += found
    if not files:
        raise ValueError(f"no Parquet files in {list(paths)}: list .parquet files or folders holding them")
    return files


def _open_parquet(path: Path, image_column: str, label_column: str | None) -> pq.ParquetFile:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read Parquet file {str(path)!r}: {err}") from err
    names = f.schema_arrow.names
    for col in (image_column, label_column):
        if col is not None and col not in names:
            raise ValueError(f"Parquet file {str(path)!r} has no column {col!r} (columns: {names}): "
                             "set image_column / label_column")
    return f


def _hf_class_names(f: pq.ParquetFile, label_column: str) -> list[str] | None:
    """ClassLabel names that `datasets` keeps in the schema metadata, if any."""
    meta = (f.schema_arrow.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(label_column, {})
    return feature.get("names")




def _image_bytes(value) -> bytes | None:
    """A cell of the image column: raw bytes, or the Hugging Face {bytes, path} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


@dataclass(frozen=True)
class ParquetSource:
    """Parquet files (or folders of them) with encoded images in `image_column` (bytes, or the
    Hugging Face `{bytes, path}` struct) and labels in `label_column` (strings, or integers named
    by the `datasets` ClassLabel metadata when present). Read one row group at a time."""

    paths: tuple[str, ...]
    image_column: str = "image"
    label_column: str | None = "label"
    """None: an unlabelled source."""

    def __post_init__(self) -> None:
        if not isinstance(self.paths, tuple):  # one path without a list, or a YAML list
            object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))

    def listing(self) -> Listing:
        n, unlabelled, names, stats = 0, 0, set(), []
        for path in _parquet_files(self.paths):
            f = _open_parquet(path, self.image_column, self.label_column)
            n += f.metadata.num_rows
            stats.append((str(path), path.stat().st_size, path.stat().st_mtime_ns))
            if self.label_column is not None:
                hf = _hf_class_names(f, self.label_column)
                col = f.read(columns=[self.label_column]).column(0)  # the labels only, never the images
                names |= set(hf) if hf else {str(v) for v in col.to_pylist() if v is not None}
                unlabelled += col.null_count
            else:
                unlabelled += f.metadata.num_rows
        return Listing(n, tuple(sorted(names)), unlabelled, _digest(stats))

    def entries(self) -> Iterator[Entry]:
        image_col, label_col = self.image_column, self.label_column
        for path in _parquet_files(self.paths):
            f = _open_parquet(path, image_col, label_col)
            hf = _hf_class_names(f, label_col) if label_col else None
            columns = [image_col] + ([label_col] if label_col else [])
            row = 0
            for group in range(f.num_row_groups):
                for cell in f.read_row_group(group, columns=columns).to_pylist():
                    data = _image_bytes(cell[image_col]) or b""
                    label = cell.get(label_col) if label_col else None
                    if label is not None:
                        label = hf[label] if hf and isinstance(label, int) else str(label)
                    yield Entry(f"{path.name}#{row}", lambda data=data: data, label, {})
                    row += 1


# ---- Hugging Face datasets -----------------------------------------------------------------


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset: a folder written by `datasets.save_to_disk` (`path`; a DatasetDict's
    folder with `split`), read with pyarrow from its Arrow files, memory-mapped, batch by batch
    (the `datasets` package is not needed); or a hub dataset (`name`), one split's Parquet files
    (`analysis.data.hub`). Images are the `{bytes, path}` struct of the datasets Image feature;
    integer labels are named by its ClassLabel."""

    path: str | None = None
    """The save_to_disk folder (or `name`)."""
    split: str | None = None
    """A DatasetDict's split (its sub-folder), or the hub split; None for a single saved Dataset, or a
    hub dataset with one split."""
    image_column: str = "image"
    label_column: str | None = "label"
    name: str | None = None
    """A hub dataset, `owner/name` (or `path`)."""
    subset: str | None = None
    """A hub dataset's subset (configuration): the first-level folder of its Parquet files."""
    revision: str | None = None
    """A hub branch, tag or commit; None: main. `refs/convert/parquet`: the hub's Parquet export."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.name is None):
            raise ValueError(f"dataset.params: set exactly one of path (a save_to_disk folder, got {self.path!r}) and "
                             f"name (a hub dataset, got {self.name!r})")
        if self.path is not None and (self.subset, self.revision) != (None, None):
            raise ValueError("dataset.params: subset and revision choose files of a hub dataset: set name, not path")

    def _hub(self) -> tuple[ParquetSource, str]:
        """The hub split as a ParquetSource over its cached files, and the digest of what they are
        (name, commit and files: the same on every machine, wherever the cache is)."""
        from analysis.data.hub import hub_split

        folder, commit, files = hub_split(self.name, self.split, self.subset, self.revision)
        source = ParquetSource(tuple(str(folder / f) for f in files), self.image_column, self.label_column)
        return source, _digest([self.name, commit, [(f, (folder / f).stat().st_size) for f in files]])

    def _folder(self) -> Path:
        folder = Path(self.path).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"{self.path!r} is not a dataset folder: set dataset.params.path to a folder written by "
                "`save_to_disk`, or dataset.params.name to a hub dataset's name")
        if (folder / "dataset_dict.json").exists():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            if self.split not in splits:
                raise ValueError(f"{self.path} is a DatasetDict with splits {splits}: set dataset.params.split "
                                 f"(got {self.split!r})")
            folder = folder / self.split
        if not (folder / "state.json").exists():
            raise ValueError(f"{folder} has no state.json: expected a folder written by datasets' save_to_disk")
        return folder

    def _files(self) -> tuple[list[Path], dict]:
        folder = self._folder()
        state = json.loads((folder / "state.json").read_text())
        features = json.loads((folder / "dataset_info.json").read_text()).get("features", {})
        for col in (self.image_column, self.label_column):
            if col is not None and col not in features:
                raise ValueError(f"dataset {folder} has no column {col!r} (columns: {sorted(features)}): set "
                                 "image_column / label_column")
        return [folder / f["filename"] for f in state["_data_files"]], features

    def _names(self, features: dict) -> list[str] | None:
        return features.get(self.label_column, {}).get("names") if self.label_column else None

    def listing(self) -> Listing:
        if self.name is not None:
            source, digest = self._hub()
            return replace(source.listing(), digest=digest)
        files, features = self._files()
        n, unlabelled, labels = 0, 0, set()
        for path in files:
            for batch in pa.ipc.open_stream(pa.memory_map(str(path))):  # headers only: no image is read
                n += batch.num_rows
                if self.label_column is None:
                    unlabelled += batch.num_rows
                    continue
                col = batch.column(self.label_column)
                unlabelled += col.null_count
                labels |= {str(v) for v in col.to_pylist() if v is not None}
        names = self._names(features)
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return Listing(n, tuple(sorted(names if names else labels)), unlabelled, _digest(stats))

    def entries(self) -> Iterator[Entry]:
        if self.name is not None:
            yield from self._hub()[0].entries()
            return
        files, features = self._files()
        names = self._names(features)
        row = 0
        for path in files:
            for batch in pa.ipc.open_stream(pa.memory_map(str(path))):
                images = batch.column(self.image_column).to_pylist()
                labels = batch.column(self.label_column).to_pylist() if self.label_column else [None] * len(images)
                for cell, label in zip(images, labels):
                    data = _image_bytes(cell) or b""
                    if label is not None:
                        label = names[label] if names and isinstance(label, int) else str(label)
                    yield Entry(f"{path.parent.name}#{row}", lambda data=data: data, label, {})
                    row += 1
