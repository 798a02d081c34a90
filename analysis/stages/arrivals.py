"""Images that arrive after a suite was built: new files in the folder `arrivals.path` become
arrivals, each extracted with the suite's model and mined by every dictionary beside the held-out
images, without retraining or re-mining anything already done.

    <root>/arrivals/<store_id>/<key>/manifest.json  the files of one arrival (path, size, mtime,
                                                    sha256) and its ordinal: written when found
    <root>/arrivals/<store_id>/<key>/arrival.json   done-marker: its images and store are complete
    <root>/images/<arrival dataset id>/             its images, ingested as a folder dataset is
    <root>/activations/<arrival store id>/          its activations, every hook of the suite
    <root>/tables/arrival_images/key=<key>/         its images' global ids, sources, labels, sha256
    <dictionary>/mining_states/<name>.pt            the mining state of the held-out images
                                                    (`base`) and of each arrival, for merging

A key is the content id of the arrival's files, so registering is idempotent: a file whose bytes
were already registered (under any name) is not registered again. Image ids are global: the
suite's own images keep theirs (0..N-1), and arrival number n takes the ids after the files of
every earlier arrival (a file that turns out not to be an image leaves its id unused). So a mined
top image is one integer whatever it came from, and `SuiteImages` reads its pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import zarr

from analysis.catalog import write_table_partition
from analysis.data.decode import ImageRejected
from analysis.data.images import DONE_FILE, open_images, read_labels
from analysis.data.ingest import ingest
from analysis.data.sources import Entry
from analysis.evaluation.mining import MiningResult, MiningState, mining_state
from analysis.ids import content_id
from analysis.integrity import atomic_write, file_lock, read_done, sha256_file, write_done, write_json
from analysis.paths import DataRoot
from analysis.stages.activations import ensure_layout, extract
from analysis.stages.inputs import DatasetSpec
from analysis.stages.suite import SuiteSpec

MANIFEST_FILE = "manifest.json"
ARRIVAL_FILE = "arrival.json"
STATES_DIR = "mining_states"


@dataclass(frozen=True)
class Arrival:
    """One registered batch of new files (its manifest)."""

    key: str
    ordinal: int
    """Registration order: decides the arrival's image ids."""
    folder: str
    files: tuple[dict, ...]
    """path (relative to `folder`), size, mtime_ns, sha256 of each file, in path order."""


def arrivals_dir(spec: SuiteSpec, root: DataRoot) -> Path:
    """Arrivals belong to the suite's store (its images and model): suites sharing it share them."""
    return root.root / "arrivals" / spec.store_id


def watched_folder(spec: SuiteSpec) -> Path:
    if spec.arrivals.path is None:
        raise ValueError(f"suite {spec.name!r} takes no arrivals: set arrivals.path to the folder to watch")
    folder = Path(spec.arrivals.path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"arrivals folder {str(folder)!r} does not exist or is not a directory: create it and "
                         "put new images in it (sub-folders name classes), or unset arrivals.path")
    return folder.resolve()


def registered(spec: SuiteSpec, root: DataRoot) -> list[Arrival]:
    """Every registered arrival, by ordinal."""
    out = []
    for path in sorted(arrivals_dir(spec, root).glob(f"*/{MANIFEST_FILE}")):
        raw = json.loads(path.read_text())
        out.append(Arrival(raw["key"], raw["ordinal"], raw["folder"], tuple(raw["files"])))
    out.sort(key=lambda a: a.ordinal)
    if [a.ordinal for a in out] != list(range(len(out))):
        raise ValueError(f"the arrival manifests under {arrivals_dir(spec, root)} have ordinals "
                         f"{[a.ordinal for a in out]}, not 0..{len(out) - 1}: one was removed or copied in; restore it")
    return out


def arrival_named(spec: SuiteSpec, root: DataRoot, key: str) -> Arrival:
    by_key = {a.key: a for a in registered(spec, root)}
    if key not in by_key:
        raise ValueError(f"arrival {key!r} is not registered under {arrivals_dir(spec, root)} (registered: "
                         f"{sorted(by_key) or 'none'}): the arrivals sensor registers new files before it asks "
                         "for them")
    return by_key[key]


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def register_arrivals(spec: SuiteSpec, root: DataRoot) -> Arrival | None:
    """The watched folder's files not registered yet, as a new arrival (None when there are none).
    A file keeps its registration while its path, size and mtime are unchanged (it is not hashed
    again); a changed or new file is hashed, and skipped when its bytes were registered before."""
    folder = watched_folder(spec)
    with file_lock(root.lock(f"arrivals.{spec.store_id}")):
        earlier = registered(spec, root)
        seen = {(f["path"], f["size"], f["mtime_ns"]) for a in earlier for f in a.files}
        shas = {f["sha256"] for a in earlier for f in a.files}
        new = []
        for path in _files(folder):
            stat = path.stat()
            rel = path.relative_to(folder).as_posix()
            if (rel, stat.st_size, stat.st_mtime_ns) in seen:
                continue
            sha = sha256_file(path)
            if sha not in shas:
                shas.add(sha)
                new.append({"path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha})
        if not new:
            return None
        key = content_id("arrival", sorted(f["sha256"] for f in new))
        arrival = Arrival(key, len(earlier), str(folder), tuple(new))
        write_json(arrivals_dir(spec, root) / arrival.key / MANIFEST_FILE,
                   {"key": arrival.key, "ordinal": arrival.ordinal, "folder": arrival.folder, "files": new})
    return arrival


def first_image(arrival: Arrival, earlier: list[Arrival], n_base: int) -> int:
    """The global id of the arrival's first image: after the suite's images and every file of the
    arrivals registered before it."""
    return n_base + sum(len(a.files) for a in earlier if a.ordinal < arrival.ordinal)


class ArrivalView:
    """The suite as the store stages see it, with one arrival's images and store in place of its
    dataset's (the model, hooks, tokens and layout settings stay the suite's)."""

    def __init__(self, spec: SuiteSpec, dataset_id: str, folder: str | None = None):
        self._spec = spec
        self.dataset_id = dataset_id
        self.model_id = spec.model_id
        self.store_id = spec.activations.store_id(spec.model_id, dataset_id)
        if folder is not None:  # the store's lineage then says how files became pixels
            self.dataset = DatasetSpec(source="folder", params={"path": folder})

    def __getattr__(self, name):
        return getattr(self._spec, name)


def arrival_dataset_id(spec: SuiteSpec, key: str) -> str:
    return content_id("arrival", {"store": spec.store_id, "key": key, "preprocessing": spec.preprocessing().to_dict()})


def arrival_store_id(spec: SuiteSpec, key: str) -> str:
    """The store of arrival `key`: the suite's activation settings and model over its images."""
    return spec.activations.store_id(spec.model_id, arrival_dataset_id(spec, key))


def ensure_arrival(spec: SuiteSpec, root: DataRoot, key: str, *, device: str = "cpu", progress: bool = True) -> dict:
    """Arrival `key`'s images ingested and its activations extracted. Each step reuses what is done
    and intact (the dataset, each shard), so a rerun only checks, and one after `pipelines.verify
    --repair` redoes exactly what was damaged. Files that are not images, or changed since they were
    registered, are set aside (the dataset's rejected.parquet)."""
    arrival = arrival_named(spec, root, key)
    directory = arrivals_dir(spec, root) / key
    with file_lock(root.lock(f"arrival.{key}")):
        dataset_id = arrival_dataset_id(spec, key)
        images_dir = root.images(dataset_id)
        names = tuple(spec.class_names())
        if read_done(images_dir / DONE_FILE) is None:
            pre = spec.preprocessing()
            ingest(_entries(arrival, names), len(arrival.files), pre, images_dir, class_names=names, progress=progress,
                   held_out_only=True, allow_empty=True,  # a batch of only unusable files still arrives
                   attrs={"source": "arrival", "arrival": key, "preprocessing": pre.to_dict(),
                          "class_names": list(names)})
        view = ArrivalView(spec, dataset_id, arrival.folder)
        if open_images(images_dir).shape[0]:  # nothing to extract when every file was set aside
            layout = ensure_layout(view, root)
            for shard in range(layout["n_shards"]):
                extract(view, root, shard, device=device, progress=progress)
        n_base = open_images(root.images(spec.dataset_id)).shape[0]
        first = first_image(arrival, registered(spec, root), n_base)
        labels = read_labels(images_dir)
        table = pa.table({"image_idx": pa.array(first + labels.column("image_idx").to_numpy()),
                          "local_idx": labels.column("image_idx"), "dataset_id": pa.array([dataset_id] * len(labels)),
                          "source": labels.column("source"), "label": labels.column("label"),
                          "sha256": labels.column("sha256")})
        part = write_table_partition(root.table("arrival_images"), {"key": key}, table)
        unlabelled = int((labels.column("label").to_numpy() < 0).sum())
        summary = {"key": key, "ordinal": arrival.ordinal, "dataset_id": dataset_id, "store_id": view.store_id,
                   "first_image": first, "n_files": len(arrival.files), "n_images": len(labels),
                   "n_rejected": len(arrival.files) - len(labels), "n_unlabelled": unlabelled}
        return write_done(directory / ARRIVAL_FILE, summary, [directory / MANIFEST_FILE, part])


def _entries(arrival: Arrival, class_names: tuple[str, ...]) -> Iterator[Entry]:
    folder = Path(arrival.folder)
    for f in arrival.files:
        label = f["path"].split("/")[0] if "/" in f["path"] else None
        yield Entry(f["path"], partial(_registered_bytes, folder / f["path"], f["sha256"]),
                    label if label in class_names else None, {})


def _registered_bytes(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageRejected("changed since it was registered: its new bytes arrive as a new arrival")
    return data


def done_arrivals(spec: SuiteSpec, root: DataRoot) -> list[dict]:
    """The done-markers of every complete arrival, by ordinal: what mining merges."""
    if spec.arrivals.path is None:
        return []
    out = []
    for arrival in registered(spec, root):
        summary = read_done(arrivals_dir(spec, root) / arrival.key / ARRIVAL_FILE)
        if summary is not None:
            out.append({k: summary[k] for k in ("key", "dataset_id", "store_id", "first_image", "n_images")})
    return out


# ---- mining -------------------------------------------------------------------------------


def _extended(values: np.ndarray, n: int) -> np.ndarray:
    """`values` (per image of the suite's dataset) padded to `n` global ids with the null of its
    type, so every part's counters share the dataset's value set (merges line up)."""
    fill = -1 if values.dtype.kind in "iu" else (np.nan if values.dtype.kind == "f" else None)
    out = np.full(n, fill, dtype=values.dtype if values.dtype.kind in "iuf" else object)
    out[:len(values)] = values
    return out


def _end(arrivals: list[dict]) -> int:
    """One past the last global id of `arrivals`."""
    return max(a["first_image"] + a["n_images"] for a in arrivals)


def labels_by_global_id(root: DataRoot, labels: np.ndarray, arrivals: list[dict], *,
                        known_only: bool = False) -> np.ndarray:
    """The dataset's `labels` followed by each arrival's at its global ids (the unused ids of
    set-aside files unlabelled); `known_only`: an arrival label the dataset has no image of
    counts as unlabelled too."""
    known = np.unique(labels)
    out = _extended(labels, _end(arrivals))
    for a in arrivals:
        arrived = read_labels(root.images(a["dataset_id"])).column("label").to_numpy()
        out[a["first_image"]:a["first_image"] + a["n_images"]] = \
            np.where(np.isin(arrived, known), arrived, -1) if known_only else arrived
    return out


def mine_with_arrivals(root: DataRoot, directory: Path, upstream: Path, arrivals: list[dict], miner,
                       batches: Callable[[SuiteSpec | ArrivalView, np.ndarray], Iterator], spec: SuiteSpec,
                       eval_idx: np.ndarray, options: dict) -> MiningResult:
    """The mining result of the held-out images `eval_idx` and every image of `arrivals`, as one
    pass over them all gives it, from states saved in `directory`/mining_states: each part is mined
    once, and again only when its file is damaged, the dictionary's weights (`upstream`) were
    rewritten or the mining settings changed. `batches(spec_or_view, idx)` yields a part's (image
    ids, activations) from the store that `spec_or_view` names; an arrival's ids are made global here,
    and its labels join the dataset's by global id (`options` are `mining_state`'s)."""
    labels, factors = options.get("labels"), options.get("factors") or {}
    if arrivals:
        # a class no image of the dataset has (its files all set aside) would add a value the
        # held-out state's counters lack: such an arrival image counts as unlabelled
        labels = None if labels is None else labels_by_global_id(root, labels, arrivals, known_only=True)
        total = _end(arrivals)
        factors = {name: _extended(values, total) for name, values in factors.items()}
    options = {**options, "labels": labels, "factors": factors}
    settings = {k: v for k, v in options.items() if k in ("n_top", "n_samples", "cls", "patches")}
    state = _saved_state(directory, "base", upstream, {**settings, "eval_idx": _digest(eval_idx)},
                         lambda: mining_state(miner, batches(spec, eval_idx), **options))
    for a in arrivals:
        if not a["n_images"]:  # every file was set aside: nothing to mine
            continue

        def mine(a=a):
            view = ArrivalView(spec, a["dataset_id"])
            parts = batches(view, np.arange(a["n_images"]))
            return mining_state(miner, ((a["first_image"] + np.asarray(i), acts) for i, acts in parts), **options)
        state.merge(_saved_state(directory, a["key"], upstream, {**settings, **a}, mine))
    return state.result()


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def _saved_state(directory: Path, name: str, upstream: Path, settings: dict,
                 compute: Callable[[], MiningState]) -> MiningState:
    """The state `name` from its file when that is intact and was mined with `settings` from the
    current weights; else mined now and saved (the file first, its done-marker last)."""
    marker, path = directory / STATES_DIR / f"{name}.json", directory / STATES_DIR / f"{name}.pt"
    settings = json.loads(json.dumps(settings))  # as the marker reads back (tuples become lists)
    done = read_done(marker, full=True, upstream=upstream)  # hashed: unpickling must never meet damage
    if done is not None and done.get("settings") == settings:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file, vouched for by its marker
    state = compute()
    for attribute in ([state.labels] if state.labels is not None else []) + list(state.factors.values()):
        attribute.codes = None  # per-image codes: only counting needs them, and they grow with the ids
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    write_done(marker, {"name": name, "settings": settings}, [path])
    return torch.load(path, map_location="cpu", weights_only=False) if state.fire.device.type != "cpu" else state


# ---- reading images by global id ------------------------------------------------------------


class SuiteImages:
    """The suite's images and its arrivals' as one read-only array indexed by global image id
    (`get_orthogonal_selection((ids,))`, `shape`, `attrs`: what readers of one dataset use)."""

    def __init__(self, base: zarr.Array, parts: list[tuple[int, zarr.Array]]):
        self.base, self.parts = base, parts
        end = max([first + part.shape[0] for first, part in parts], default=base.shape[0])
        self.shape = (end, *base.shape[1:])
        self.attrs = base.attrs

    def get_orthogonal_selection(self, selection: tuple) -> np.ndarray:
        ids = np.asarray(selection[0], dtype=np.int64)
        out = np.zeros((len(ids), *self.shape[1:]), dtype=np.uint8)
        found = np.zeros(len(ids), dtype=bool)
        for first, part in [(0, self.base), *self.parts]:
            mine = (ids >= first) & (ids < first + part.shape[0])
            if mine.any():
                out[mine] = part.get_orthogonal_selection((ids[mine] - first,))
                found |= mine
        if not found.all():
            raise IndexError(f"image ids {ids[~found][:5].tolist()} are neither the dataset's nor an arrival's")
        return out


def suite_images(root: DataRoot, dataset_id: str, arrivals: list[dict]) -> tuple[SuiteImages | zarr.Array, np.ndarray]:
    """(images, labels) by global image id for a dictionary mined with `arrivals` (its features
    marker's list); the dataset's own array and labels when there are none."""
    base = open_images(root.images(dataset_id))
    labels = read_labels(root.images(dataset_id)).column("label").to_numpy()
    if not arrivals:
        return base, labels
    parts = [(a["first_image"], open_images(root.images(a["dataset_id"]))) for a in arrivals]
    return SuiteImages(base, parts), labels_by_global_id(root, labels, arrivals)
