"""Store-wide passes that need no model, as dask computations over the Zarr store, for when one
process is not enough: statistics of a hook's activations, one pass of a dictionary over a split
(FVU, L0, firing counts for dead/dense fractions and the density histogram, each latent's largest
activation), and mining (`mining_pass`: parts of the split mined on the workers, their states
merged).

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

import copy
import math
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np
import torch

from analysis.activations.reader import ActivationStore, check_image_indices, decode, iter_images
from analysis.activations.stats import StoreStats, chan_merge
from analysis.activations.store import StoreLocation, is_url
from analysis.evaluation.metrics import firing_fractions
from analysis.evaluation.mining import MiningResult, mining_state


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


def check_scheduler(address: str, *, timeout: float = 10.0) -> None:
    """Connect to the scheduler at `address` and leave: `connect`'s error when it is unreachable."""
    connect(address, timeout=timeout).close()


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
    rows = _per_chunk(acts, _moments_block, 1 + 2 * store.d_model, store.dtype)
    n, mean, m2 = _merge_moments(rows, store.d_model)
    norm_sum = float(norms.astype(np.float64).sum().compute())
    return StoreStats(mean, m2 / n, norm_sum / n, n)


def _per_chunk(acts: da.Array, fn, width: int, *args) -> np.ndarray:
    """(chunks, width) float64: `fn(chunk, *args)` on every chunk of images (all tokens, all dims),
    in chunk order."""
    return acts.rechunk({1: -1, 2: -1}).map_blocks(
        fn, *args, dtype=np.float64, chunks=((1,) * acts.numblocks[0], (width,)), drop_axis=2).compute()


def _moments(x: torch.Tensor) -> torch.Tensor:
    """[count, mean (d), M2 (d)] of the rows of `x`, in float64."""
    x64 = x.double()
    mean = x64.mean(0)
    return torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64), mean, (x64 - mean).pow(2).sum(0)])


def _merge_moments(rows: np.ndarray, d: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan's merge of the rows' leading [count, mean, M2] blocks, in row order."""
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for row in rows:
        if row[0] > 0:
            n, mean, m2 = chan_merge(n, mean, m2, int(row[0]), row[1:1 + d], row[1 + d:1 + 2 * d])
    return n, mean, m2


def _moments_block(block: np.ndarray, logical_dtype: str) -> np.ndarray:
    return _moments(decode(block, logical_dtype).reshape(-1, block.shape[-1])).numpy()[None, :]


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
    on_cpu = copy.deepcopy(sae).cpu().eval()  # the workers' copy; the caller's stays on its device and mode
    rows = _per_chunk(acts, _encode_block, 1 + 2 * d + 2 + 2 * width, dask.delayed(on_cpu), store.dtype)
    n, _, m2 = _merge_moments(rows, d)
    if n == 0:
        raise ValueError("dictionary_pass got no tokens: pass at least one image index")
    rest = rows[:, 1 + 2 * d:]  # [squared error, nonzeros, fire counts (width), max activations (width)]
    total_var = float(m2.sum())
    fire = rest[:, 2:2 + width].sum(0).astype(np.int64)
    max_acts = rest[:, 2 + width:].max(0).astype(np.float32)
    return DictionaryPass(n, float(rest[:, 0].sum()) / total_var if total_var > 0 else math.nan,
                          float(rest[:, 1].sum()) / n, fire, max_acts)


def _encode_block(block: np.ndarray, sae, logical_dtype: str) -> np.ndarray:
    """One chunk → [count, mean (d), M2 (d), squared error, nonzeros, fire counts, max activations]."""
    x = decode(block, logical_dtype).reshape(-1, block.shape[-1])
    with torch.no_grad():
        out = sae(x)
    active = out.top_acts != 0
    idx, acts = out.top_indices[active], out.top_acts[active]
    width = sae.cfg.width
    fire = torch.bincount(idx, minlength=width).double()
    max_acts = torch.zeros(width, dtype=acts.dtype).scatter_reduce_(0, idx, acts, "amax", include_self=True)
    sq_err = float((x.double() - out.x_hat.double()).pow(2).sum())
    row = torch.cat([_moments(x), torch.tensor([sq_err, float(active.sum())], dtype=torch.float64), fire,
                     max_acts.double()])
    return row.numpy()[None, :]


def mining_pass(location: StoreLocation, sae, image_indices, *, images_per_batch: int = 64,
                images_per_task: int = 512, labels: np.ndarray | None = None,
                factors: dict[str, np.ndarray] | None = None, **mine_options) -> MiningResult:
    """`mine_features` over the chosen images, one dask task per `images_per_task` of them (in
    ascending order), each read in batches of `images_per_batch` as the in-process pass reads them,
    the tasks' states merged in order (`MiningState.merge`). The dictionary, labels and factors
    travel to the workers once; `mine_options` are mine_features' (n_top, cls, patches, ...)."""
    store = ActivationStore.open(location)
    idx = np.sort(check_image_indices(image_indices, store.n_images))
    if not len(idx):
        raise ValueError("mining_pass got no images: pass at least one image index")
    step = max(1, images_per_task // images_per_batch) * images_per_batch  # whole batches, as in process
    on_cpu = dask.delayed(copy.deepcopy(sae).cpu().eval())
    shared = dask.delayed(labels), dask.delayed(factors)
    states = dask.compute(*[dask.delayed(_mine_part)(location, on_cpu, idx[s:s + step], images_per_batch, *shared,
                                                     mine_options) for s in range(0, len(idx), step)])
    merged = states[0]
    for state in states[1:]:
        merged.merge(state)
    return merged.result()


def _mine_part(location: StoreLocation, sae, images: np.ndarray, images_per_batch: int, labels, factors,
               mine_options: dict):
    store = ActivationStore.open(location)
    return mining_state(sae, iter_images(store, images, images_per_batch=images_per_batch), labels=labels,
                        factors=factors, **mine_options)
