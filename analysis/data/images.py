"""Image datasets on disk: uint8 (N, H, W, C) Zarr plus a labels Parquet table.

Layout (DESIGN.md §2): <root>/images/<dataset_id>/images.zarr and labels.parquet.
Everything that feeds these images to a model goes through
`analysis.models.inputs.to_model_input`, so training, extraction and evaluation see identical
pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from analysis.integrity import atomic_write, require_done, write_done

DONE_FILE = "dataset.json"  # written last: vouches for images.zarr and the tables
# Every chunk of an image array holds images, so zarr's scan for all-fill-value chunks (to skip
# writing them) is pure cost, and a slow one: 0.95 of the 1.29 s a 256-image 224 px chunk took to
# write (zstd) before it was turned off.
IMAGE_WRITE_CONFIG = {"write_empty_chunks": True}


def image_sha256(image: np.ndarray) -> str:
    """Content hash of one image (shape and dtype included, so a reshape changes it)."""
    h = hashlib.sha256()
    h.update(f"{image.dtype}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def dataset_content_hash(per_image_sha: list[str]) -> str:
    """One hash for the whole dataset, order-sensitive."""
    h = hashlib.sha256()
    for s in per_image_sha:
        h.update(bytes.fromhex(s))
    return h.hexdigest()


def split_unique(shas: list[str], eval_fraction: float, seed: int) -> np.ndarray:
    """"train"/"eval" per image, drawn over distinct contents: copies share their first's side."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction}: expected a fraction in (0, 1), e.g. 0.1")
    unique = list(dict.fromkeys(shas))
    n_eval = round(eval_fraction * len(unique))
    if not 0 < n_eval < len(unique):
        raise ValueError(f"eval_fraction={eval_fraction} of {len(unique)} distinct images leaves an empty split: "
                         "use more images or a different fraction")
    order = np.random.default_rng(seed).permutation(len(unique))
    held_out = {unique[i] for i in order[:n_eval]}
    return np.array(["eval" if s in held_out else "train" for s in shas])


def first_copies(shas: list[str]) -> list[int | None]:
    """Per image, the index of the first image with the same content (None for that first one)."""
    first: dict[str, int] = {}
    return [None if (d := first.setdefault(s, i)) == i else d for i, s in enumerate(shas)]


def write_image_dataset(
    directory: str | Path,
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    *,
    images_per_chunk: int = 256,
    attrs: dict | None = None,
) -> str:
    """Write images.zarr + labels.parquet into `directory`; returns the content hash.

    `labels` columns must each have N rows; `image_idx` and `sha256` are added here.
    The done-marker (`dataset.json`, with every file's size and sha256) is written last.
    """
    directory = Path(directory)
    n = images.shape[0]
    for name, col in labels.items():
        if len(col) != n:
            raise ValueError(f"label column {name!r} has {len(col)} rows, expected {n} (one per image)")
    directory.mkdir(parents=True, exist_ok=True)
    arr = zarr.create_array(
        store=str(directory / "images.zarr"),
        shape=images.shape,
        chunks=(min(images_per_chunk, n),) + images.shape[1:],
        dtype="uint8",
        overwrite=True,
        config=IMAGE_WRITE_CONFIG,
    )
    arr[...] = images
    shas = [image_sha256(img) for img in images]
    content_hash = dataset_content_hash(shas)
    arr.attrs.update({**(attrs or {}), "content_hash": content_hash, "n_images": int(n)})
    table = pa.table({"image_idx": np.arange(n, dtype=np.int64), **labels, "sha256": shas})
    atomic_write(directory / "labels.parquet", lambda tmp: pq.write_table(table, tmp))
    mark_dataset_done(directory, content_hash, n)
    return content_hash


def mark_dataset_done(directory: Path, content_hash: str, n_images: int) -> None:
    """The dataset's done-marker, last: it vouches for every file of the images and tables."""
    files = [directory / name for name in ("images.zarr", "labels.parquet", "rejected.parquet")
             if (directory / name).exists()]
    write_done(directory / DONE_FILE, {"content_hash": content_hash, "n_images": int(n_images)}, files)


def open_images(directory: str | Path) -> zarr.Array:
    """The images array of a finished dataset (read-only), refused when a file its done-marker
    vouches for is missing or truncated (a missing chunk would read as black images)."""
    require_done(Path(directory) / DONE_FILE, "image dataset",
                 "materialize the images asset again (make run does), which rewrites it")
    return zarr.open_array(str(Path(directory) / "images.zarr"), mode="r")


def read_images(images, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """`images[start:stop]`, into `out[:stop - start]` when given (a buffer reused block after
    block, page-locked for an accelerator).

    Whole chunks of a local, unsharded Zarr v3 array compressed with zstd alone (every image array
    this project writes) are decompressed straight from their files into `out`. Zarr's own read
    decompresses into a fresh buffer and copies that into another fresh one: 2,380 against 5,050
    224 px photos/s on the 2-core machine (benchmarks/results/image_reads.json). Numcodecs' zstd
    releases the GIL, so reads on several threads run in parallel.
    Anything else (a partial chunk, another codec, a URL store, an object with `__getitem__`)
    goes through `images[...]`. A chunk file that is missing is left to Zarr too (its fill value),
    as a damaged dataset is refused when opened (`open_images`)."""
    n = stop - start
    if out is None:
        out = np.empty((n,) + tuple(images.shape[1:]), dtype=images.dtype)
    dst = out[:n]
    direct = _direct_chunks(images) if dst.flags.c_contiguous and dst.dtype == np.uint8 else None
    if direct is None:
        dst[...] = images[start:stop]
        return dst
    root, per = direct
    lo = start
    while lo < stop:
        c = lo // per
        hi = min((c + 1) * per, stop)
        target = dst[lo - start:hi - start]
        path = root / images.metadata.encode_chunk_key((c,) + (0,) * (images.ndim - 1))
        # a chunk past the array's end is stored whole (padded), so it is read through Zarr
        if (lo, hi) != (c * per, (c + 1) * per) or not path.exists():
            target[...] = images[lo:hi]
        else:
            _ZSTD.decode(path.read_bytes(), out=target.reshape(-1))
        lo = hi
    return dst


def _direct_chunks(images) -> tuple[Path, int] | None:
    """(the array's directory, images per chunk) when its chunks can be decompressed directly."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    if not isinstance(images, zarr.Array) or images.metadata.zarr_format != 3 or images.shards is not None:
        return None
    codecs = images.metadata.codecs
    if not (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)
            and images.dtype.itemsize == 1 and images.chunks[1:] == images.shape[1:]):
        return None
    store = images.store_path.store
    if not isinstance(store, LocalStore):
        return None
    return Path(store.root) / images.store_path.path, images.chunks[0]


_ZSTD = numcodecs.Zstd()  # decoding needs no level; the frame says how it was written


def read_labels(directory: str | Path) -> pa.Table:
    return pq.read_table(Path(directory) / "labels.parquet")
