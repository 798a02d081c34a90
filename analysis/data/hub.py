"""Datasets on the Hugging Face hub, named `owner/name`: one split's Parquet files, downloaded
into the hub cache when the hub answers, read from that cache when it does not.

The hub keeps a dataset as Parquet files whose paths name their split (`data/train-00000-of-00002.parquet`,
`train.parquet`, or `<subset>/train/0000.parquet` on the `refs/convert/parquet` revision, the
hub's Parquet export of every public dataset). Only the chosen split's files are downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from analysis.models.zoo import hub_reachable

PARQUET_EXPORT = "refs/convert/parquet"
"""The revision holding the hub's Parquet export of a dataset kept in another form."""

_SHARDED = re.compile(r"(.+?)-\d+-of-\d+$")


def split_of(path: str, subset: str | None = None) -> str:
    """The split a Parquet file's path names: `train-00000-of-00002` → train; `train/0000` → the
    folder; `train.parquet` → its stem."""
    p = PurePosixPath(path)
    sharded = _SHARDED.match(p.stem)
    if sharded:
        return sharded.group(1)
    folder = p.parent.name
    return folder if folder not in ("", "data", subset) else p.stem


def split_files(paths: list[str], name: str, split: str | None, subset: str | None) -> list[str]:
    """The Parquet files among a snapshot's `paths` that hold `split` (of `subset`, a first-level
    folder, when given), sorted; a clear error when there are none or the split is ambiguous."""
    parquet = sorted(p for p in paths if p.endswith(".parquet"))
    if subset is not None:
        subsets = sorted({p.split("/")[0] for p in parquet if "/" in p})
        parquet = [p for p in parquet if p.split("/")[0] == subset]
        if not parquet:
            raise ValueError(f"hub dataset {name!r} has no subset {subset!r} (subsets: {subsets}): set "
                             "dataset.params.subset to one of them")
    if not parquet:
        raise ValueError(f"hub dataset {name!r} has no Parquet files at this revision: set dataset.params.revision "
                         f"to {PARQUET_EXPORT!r} (the hub's Parquet export of every public dataset)")
    splits = sorted({split_of(p, subset) for p in parquet})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"hub dataset {name!r} has splits {splits}: set dataset.params.split")
        split = splits[0]
    chosen = [p for p in parquet if split_of(p, subset) == split]
    if not chosen:
        raise ValueError(f"hub dataset {name!r} has no split {split!r} (splits: {splits}): set dataset.params.split "
                         "to one of them")
    return chosen


def hub_split(name: str, split: str | None, subset: str | None = None,
              revision: str | None = None) -> tuple[Path, str, list[str]]:
    """(snapshot folder, its commit, the split's files relative to it). Online: the files are
    downloaded (only those); offline (HF_HUB_OFFLINE or no answer within seconds): the cached
    snapshot of `revision` is read, or an error says how to get one."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if hub_reachable():
        try:
            info = HfApi().dataset_info(name, revision=revision)
        except (RepositoryNotFoundError, GatedRepoError) as err:
            raise ValueError(f"no hub dataset {name!r} readable here ({type(err).__name__}): check dataset.params.name, "
                             "or log in (`hf auth login`) for a gated or private one") from err
        files = split_files([s.rfilename for s in info.siblings or []], name, split, subset)
        folder = Path(snapshot_download(name, repo_type="dataset", revision=info.sha, allow_patterns=files))
        return folder, info.sha, files
    try:
        folder = Path(snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise ValueError(
            f"hub dataset {name!r} (revision {revision or 'main'}) is not in the hub cache, and the hub is unreachable "
            "(offline or HF_HUB_OFFLINE=1): run once where the hub answers (the files are cached for later), or "
            f"save it there with `datasets.load_dataset({name!r}, split=...).save_to_disk(folder)` and set "
            "dataset.params.path to that folder instead of name") from err
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    try:
        return folder, folder.name, split_files(present, name, split, subset)
    except ValueError as err:
        raise ValueError(f"{err} (the hub is unreachable, so only its cached files in {folder} were read)") from err
