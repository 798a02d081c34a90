"""Store-wide passes that need no model, as dask.array computations over the Zarr store, for when
one process is not enough: statistics of a hook's activations, and one pass of a dictionary over a
split (FVU, L0, firing counts for dead/dense fractions and the density histogram, each latent's
largest activation for mining's thresholds).

The results equal the in-process ones (`ActivationStore.stats`, `reconstruction_metrics`): counts
exactly, sums to float64 rounding. The in-process path stays the default; these run on whatever
dask scheduler is current, so a `dask.distributed.Client` decides where:

    from dask.distributed import Client, LocalCluster
    with Client(LocalCluster(n_workers=2, threads_per_worker=1)):      # or connect("tcp://host:8786")
        stats = store_statistics(location)
        result = dictionary_pass(location, sae, eval_images)

Every worker must reach the store: a local path on a shared file system, or an fsspec URL
(s3://…; `memory://` lives inside one process and cannot be shared).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np
import torch

from analysis.activations.reader import ActivationStore, check_image_indices, decode
from analysis.activations.stats import StoreStats, chan_merge
from analysis.activations.store import StoreLocation, is_url
from analysis.evaluation.metrics import firing_fractions


def connect(address: str, *, timeout: float = 10.0):
    """A `dask.distributed.Client` on the scheduler at `address`; an unreachable one is a ValueError
    naming it, raised before any work."""
    from dask.distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise ValueError(f"dask scheduler {address!r} is unreachable ({type(err).__name__}: {err}); start one "
                         "(`dask scheduler`, or dask.distributed.LocalCluster) and pass its address, e.g. "
                         "tcp://127.0.0.1:8786") from None


def store_arrays(location: StoreLocation) -> tuple[ActivationStore, da.Array, da.Array]:
    """(the opened store, its activations (N, T, d) as stored, its token norms (N, T)) as dask
    arrays chunked like the Zarr arrays. Opening checks completeness and damage first."""
    store = ActivationStore.open(location)
    path = str(location) if is_url(location) else str(store.path)
    return store, da.from_zarr(path, component="acts"), da.from_zarr(path, component="norms")


def store_statistics(location: StoreLocation) -> StoreStats:
    """Per-dimension mean and population variance over every token, and the mean token norm: one
    read of the store, a (count, mean, M2) partial per chunk merged in chunk order (Chan et al.)."""
    store, acts, norms = store_arrays(location)
    d = store.d_model
    rows = acts.rechunk({1: -1, 2: -1}).map_blocks(
        _moments_block, store.dtype, dtype=np.float64, chunks=((1,) * acts.numblocks[0], (1 + 2 * d,)),
        drop_axis=2).compute()
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for row in rows:
        n, mean, m2 = chan_merge(n, mean, m2, int(row[0]), row[1:1 + d], row[1 + d:])
    norm_sum = float(norms.astype(np.float64).sum().compute())
    return StoreStats(mean, m2 / n, norm_sum / n, n)


def _moments_block(block: np.ndarray, logical_dtype: str) -> np.ndarray:
    """One chunk → [count, mean (d), M2 (d)] in float64."""
    x = decode(block, logical_dtype).reshape(-1, block.shape[-1]).double()
    mean = x.mean(0)
    m2 = (x - mean).pow(2).sum(0)
    return torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64), mean, m2]).numpy()[None, :]


class DictionaryPass(NamedTuple):
    n_tokens: int
    fvu: float
    l0: float
    fire_counts: np.ndarray
    """(width,) int64 tokens each latent fired on."""
    max_acts: np.ndarray
    """(width,) float32 each latent's largest activation (0 where it never fired)."""

    def firing_fractions(self, dense_threshold: float = 0.1) -> tuple[float, float]:
        return firing_fractions(self.fire_counts, self.n_tokens, dense_threshold)


def dictionary_pass(location: StoreLocation, sae, image_indices=None) -> DictionaryPass:
    """Encode and decode every token of the chosen images (all when None) with `sae`, one task per
    store chunk; the dictionary travels to the workers once."""
    store, acts, _ = store_arrays(location)
    if image_indices is not None:
        acts = acts[np.sort(check_image_indices(image_indices, store.n_images))]
    d, width = store.d_model, sae.cfg.width
    packed_width = 2 + 2 * d + 1 + 2 * width
    blocks = acts.rechunk({1: -1, 2: -1}).map_blocks(
        _encode_block, dask.delayed(sae.cpu().eval()), store.dtype, dtype=np.float64,
        chunks=((1,) * acts.numblocks[0], (packed_width,)), drop_axis=2)
    rows = blocks.compute()
    n, mean, m2, sq_err, nnz = 0, np.zeros(d), np.zeros(d), 0.0, 0.0
    fire, max_acts = np.zeros(width, dtype=np.int64), np.zeros(width, dtype=np.float32)
    for row in rows:  # in chunk order, so the merge is the same whatever the scheduler did
        count = int(row[0])
        if count == 0:
            continue
        n, mean, m2 = chan_merge(n, mean, m2, count, row[2:2 + d], row[2 + d:2 + 2 * d])
        sq_err += row[1]
        nnz += row[2 + 2 * d]
        fire += row[3 + 2 * d:3 + 2 * d + width].astype(np.int64)
        np.maximum(max_acts, row[3 + 2 * d + width:].astype(np.float32), out=max_acts)
    if n == 0:
        raise ValueError("dictionary_pass got no tokens: pass at least one image index")
    total_var = float(m2.sum())
    return DictionaryPass(n, sq_err / total_var if total_var > 0 else math.nan, nnz / n, fire, max_acts)


def _encode_block(block: np.ndarray, sae, logical_dtype: str) -> np.ndarray:
    """One chunk → [count, squared error, mean (d), M2 (d), nonzeros, fire counts, max activations]."""
    x = decode(block, logical_dtype).reshape(-1, block.shape[-1])
    with torch.no_grad():
        out = sae(x)
    x64, xh64 = x.double(), out.x_hat.double()
    count = x.shape[0]
    mean = x64.mean(0)
    m2 = (x64 - mean).pow(2).sum(0)
    active = out.top_acts != 0
    idx, acts = out.top_indices[active], out.top_acts[active]
    width = sae.cfg.width
    fire = torch.bincount(idx, minlength=width).double()
    max_acts = torch.zeros(width, dtype=acts.dtype).scatter_reduce_(0, idx, acts, "amax", include_self=True)
    row = torch.cat([torch.tensor([count, float((x64 - xh64).pow(2).sum())], dtype=torch.float64), mean, m2,
                     torch.tensor([float(active.sum())], dtype=torch.float64), fire, max_acts.double()])
    return row.numpy()[None, :]
