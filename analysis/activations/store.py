"""Activation store layout: creation, lineage, and per-shard completion, on a path or a URL.

A store location is a local path (`Path`, or a `str` without a scheme) or any fsspec URL
(`memory://…`, `s3://…` with s3fs installed, `gs://…`); Zarr opens both, wrapping synchronous
fsspec filesystems such as memory:// itself. Everything a store records lives inside it as Zarr
nodes or attributes — layout and lineage in the group attrs, completion in the `partials`
array, each shard file's size and crc32c in the `files` array (`store_files`) — so no side
files on local disk are needed and object storage behaves like a directory.

`partials` has one row, and one chunk, per shard: [count, norm_sum, mean (d), m2 (d)] of the
shard's tokens. The row is written after all of the shard's data, in one object write (atomic
on object stores; zarr writes local files through a rename), so a nonzero count is the shard's
completion marker, and concurrent partitions never write the same object.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import zarr

from analysis.activations.store_files import FILES, ShardDamage, check_shards, create_files_array
from analysis.activations.tokens import TokenGroups

StoreLocation = Union[str, Path]
"""A local directory (Path or plain str) or an fsspec URL such as memory://… or s3://…."""

FORMAT = "spectra.activations/4"  # 4: recorded file sizes and crc32c; 3: token_groups; 2: completion markers
ZARR_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
PARTIALS = "partials"
log = logging.getLogger("spectra.integrity")


def is_url(location: StoreLocation) -> bool:
    """True for fsspec URLs (a scheme before ://); plain strings and Paths are local."""
    return isinstance(location, str) and "://" in location


def zarr_location(location: StoreLocation) -> str:
    """What zarr.open_group takes: the URL unchanged, or a local path as a string."""
    if is_url(location):
        return location
    return str(Path(location).expanduser())


def open_store_group(location: StoreLocation, mode: Literal["r", "r+", "w"] = "r") -> zarr.Group:
    return zarr.open_group(zarr_location(location), mode=mode)


@dataclass(frozen=True)
class StoreLayout:
    """Shape and on-disk layout of one activation store (shared by all hooks of a store id)."""

    n_images: int
    """Images in the store (N); equals the image dataset's length."""
    n_tokens: int
    """Tokens kept per image (T) after token selection ("cls" keeps 1)."""
    d_model: int
    """Width of the hooked activation (d)."""
    images_per_shard: int = 1024
    """Images per extraction shard / Zarr shard file; a multiple of images_per_chunk."""
    images_per_chunk: int = 128
    """Images per Zarr chunk: the unit of every read, so the loader's shuffle granularity."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Stored dtype; bfloat16 is kept as uint16 bits because Zarr has no bfloat16."""

    def __post_init__(self):
        for name in ("n_images", "n_tokens", "d_model", "images_per_shard", "images_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StoreLayout.{name}={value!r}: expected a positive int")
        if self.images_per_shard % self.images_per_chunk:
            raise ValueError(
                f"StoreLayout.images_per_shard={self.images_per_shard} is not a multiple of "
                f"images_per_chunk={self.images_per_chunk}: pick e.g. images_per_shard="
                f"{math.ceil(self.images_per_shard / self.images_per_chunk) * self.images_per_chunk}"
            )
        if self.dtype not in ZARR_DTYPE:
            raise ValueError(
                f"StoreLayout.dtype={self.dtype!r}: expected one of {sorted(ZARR_DTYPE)}"
            )

    @property
    def images_per_write(self) -> int:
        """Images per Zarr shard file: about a quarter of an extraction shard, whole chunks, dividing
        it. Extraction writes each file as soon as its images are computed, so only the last
        quarter's write is not hidden behind the forward pass (a file is always written whole:
        rewriting part of one costs 3-10x)."""
        n_chunks = self.images_per_shard // self.images_per_chunk
        per_write = next(m for m in range(math.ceil(n_chunks / 4), n_chunks + 1) if n_chunks % m == 0)
        return per_write * self.images_per_chunk

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.images_per_shard)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Image range [start, stop) of `shard`; the last shard may be short."""
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} out of range: valid shards are 0..{self.n_shards - 1}")
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)


def _jsonable(obj: dict, what: str) -> dict:
    try:  # a JSON round trip so tuples/lists compare equal after reading back
        return json.loads(json.dumps(obj, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"{what} must be JSON-serializable (str/int/float/list/dict): {e}") from e


def _existing_attrs(location: StoreLocation) -> dict | None:
    """The group attrs of a store at `location`, or None when there is no group there."""
    try:
        return dict(open_store_group(location, "r").attrs)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one, for local paths and URLs
        return None


def _check_format(attrs: dict, location: StoreLocation) -> None:
    if attrs.get("format") != FORMAT:
        raise ValueError(
            f"activation store {location} has format {attrs.get('format')!r}, this code reads "
            f"{FORMAT!r} (the store now records each file's size and checksum): delete the store, or "
            "re-create it with create_store(..., overwrite=True), and extract again"
        )


def open_layout(location: StoreLocation, mode: Literal["r", "r+"] = "r") -> tuple[zarr.Group, StoreLayout]:
    """An existing store's group and the layout recorded in it (one open, for callers that need both)."""
    try:
        group = open_store_group(location, mode)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one, for local paths and URLs
        group = None
    attrs = {} if group is None else dict(group.attrs)
    if "layout" not in attrs:
        raise FileNotFoundError(f"no complete activation store at {location}: run create_store first")
    _check_format(attrs, location)
    return group, StoreLayout(**attrs["layout"])


def read_layout(location: StoreLocation) -> StoreLayout:
    """The layout recorded in an existing store."""
    return open_layout(location)[1]


def create_store(location: StoreLocation, layout: StoreLayout, lineage: dict, *,
                 token_groups: TokenGroups | None = None, overwrite: bool = False) -> None:
    """Create an empty store, or keep an existing identical one (and its completed shards).

    `token_groups` says where the class token, registers and patches sit along the token axis;
    None when the tokens are not a ViT's (then `ActivationStore.token_groups` is None too).
    Raises ValueError when a store with a different layout, token groups or lineage is already
    there: paths are content-derived, so that means a bug upstream; pass overwrite=True to
    replace it.
    """
    lineage = _jsonable(lineage, "lineage")
    groups = None if token_groups is None else token_groups.to_dict()
    if token_groups is not None and token_groups.n_tokens != layout.n_tokens:
        raise ValueError(
            f"token_groups cover {token_groups.n_tokens} tokens ({groups}) but the layout has "
            f"n_tokens={layout.n_tokens}: derive both from the same analysis.activations.tokens.select_tokens"
        )
    wanted = {"layout": asdict(layout), "token_groups": groups, "lineage": lineage}
    attrs = None if overwrite else _existing_attrs(location)
    if attrs and "layout" in attrs and str(attrs.get("format", "")).startswith("spectra.activations/") \
            and attrs.get("format") != FORMAT:  # an older format of ours: content-derived, so made again
        log.warning("activation store %s has format %s, not %s (no file checksums to verify it against): "
                    "creating it again and extracting every shard", location, attrs.get("format"), FORMAT)
        attrs = None
    if attrs and "layout" in attrs:  # attrs are written last, so without them creation was cut short
        _check_format(attrs, location)
        found = {"layout": attrs["layout"], "token_groups": attrs.get("token_groups"), "lineage": attrs.get("lineage")}
        if found != wanted:
            raise ValueError(
                f"activation store {location} exists with a different layout/lineage:\n"
                f"  existing: {found}\n  requested: {wanted}\n"
                "store paths are content-derived, so this points at an id bug; pass "
                "overwrite=True only if replacing the store is intended"
            )
        return
    group = open_store_group(location, "w")
    n, t, d = layout.n_images, layout.n_tokens, layout.d_model
    ipc, ips = layout.images_per_chunk, layout.images_per_write  # ips: images per Zarr shard file
    common = dict(compressors=None, fill_value=0)
    group.create_array("acts", shape=(n, t, d), chunks=(ipc, t, d), shards=(ips, t, d),
                       dtype=ZARR_DTYPE[layout.dtype], **common)
    group.create_array("norms", shape=(n, t), chunks=(ipc, t), shards=(ips, t), dtype="float32", **common)
    group.create_array("image_idx", shape=(n,), chunks=(ipc,), shards=(ips,), dtype="int64", **common)
    # One chunk per shard: each partition writes its own row object, never a shared one.
    group.create_array(PARTIALS, shape=(layout.n_shards, 2 + 2 * d), chunks=(1, 2 + 2 * d),
                       dtype="float64", **common)
    create_files_array(group, layout.n_shards)
    group.attrs.update({**wanted, "format": FORMAT, "logical_dtype": layout.dtype})


def completed(group: zarr.Group) -> np.ndarray:
    """(n_shards,) bool: which shards have their data and statistics row written."""
    return group[PARTIALS][:, 0] > 0  # the row's count; fill value 0 until the row is written


def missing_shards(location: StoreLocation) -> list[int]:
    """Shards without a completion marker, ascending."""
    group, _ = open_layout(location)  # a clear error for a missing store or an old format
    return np.flatnonzero(~completed(group)).tolist()


def damaged_shards(group: zarr.Group, layout: StoreLayout, shards=None, *, full: bool = False) -> list[ShardDamage]:
    """Damage in the files of completed shards (all of them, or those in `shards`): missing,
    truncated, or (full) changed since extraction recorded them."""
    if shards is None:
        wanted = np.flatnonzero(completed(group)).tolist()
    else:  # only these shards' rows: reading every shard's is the cost of a whole-store check
        wanted = [s for s in shards if group[PARTIALS][s, 0] > 0]
    return check_shards(group, wanted, layout.shard_bounds, full=full)


def shard_intact(location: StoreLocation, shard: int) -> bool:
    """The shard is marked complete and its files pass the cheap check (presence and size)."""
    group, layout = open_layout(location)
    return bool(group[PARTIALS][shard, 0] > 0) and not damaged_shards(group, layout, [shard])


def reset_shard(group: zarr.Group, shard: int) -> None:
    """Take back a shard's completion marker (and its file records), so it is extracted again."""
    group[PARTIALS][shard] = 0
    group[FILES][shard] = 0


def is_complete(location: StoreLocation) -> bool:
    return not missing_shards(location)
