"""Reading a finished activation store: random access, ordered iteration over chosen images, and
the held-out tokens a trainer scores while it runs.

Reads go by whole chunks: random-row reads from Zarr are slow (DESIGN.md §3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from analysis.activations.stats import StoreStats, merge_partials, read_stats
from analysis.activations.store import StoreLocation, completed, damaged_shards, is_url, open_layout
from analysis.activations.tokens import TokenGroups
from analysis.integrity import DamagedArtifact

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
        damage = damaged_shards(group, self.layout)  # a stat per file: a missing file would read as zeros
        if damage:
            shards = sorted({d.shard for d in damage})
            raise DamagedArtifact(
                f"activation store {self.path} is damaged: {'; '.join(map(str, damage))}; materialize the "
                f"activations partitions {shards} again (make run does), which re-extracts exactly those shards")
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


def check_image_indices(image_indices, n_images: int) -> np.ndarray:
    idx = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("image_indices is empty: pass at least one image index")
    if idx.min() < 0 or idx.max() >= n_images:
        raise ValueError(f"image_indices must lie in [0, {n_images}), got {idx.min()}..{idx.max()}")
    uniq = np.unique(idx)
    if len(uniq) != len(idx):
        raise ValueError("image_indices has duplicates: each image must appear once (np.unique it)")
    return uniq



def iter_images(store: ActivationStore, image_indices, *,
                images_per_batch: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(image_idx (n,), acts (n, T, d) float32) in ascending image order, reading whole chunks."""
    idx = check_image_indices(image_indices, store.n_images)
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
