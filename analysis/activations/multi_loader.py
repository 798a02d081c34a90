"""Shuffled loader over N hooks of the same tokens (crosscoders: N layers; transcoders: N = 2).

N `ShuffledLoader`s over stores with the same images, tokens per image and chunk size produce
the same schedule: their chunk order and every buffer permutation depend only on (seed, epoch,
chunk structure, batch_size), never on the stored values or on thread timing. Zipping them
therefore applies one permutation to every store's rows, so row i of each yielded tensor is the
same token, while each store keeps its whole-chunk reads and its own prefetch thread. The
constructor refuses stores whose structure or lineage differs, naming both stores, because then
the rows would silently be different tokens.

    loader = MultiShuffledLoader([store_0, store_1, store_2], train_images, batch_size=4096, seed=0)
    for xs in loader:            # infinite; xs = (x_0 (B, d_0), x_1 (B, d_1), x_2 (B, d_2))
        ...
    loader.state() / loader.load_state(state)     # resume exactly (epoch, batches consumed)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from analysis.activations.reader import ActivationStore
from analysis.activations.loader import LoaderState, ShuffledLoader

# Lineage keys that must agree for two stores to hold the same tokens of the same model.
# A key absent from both lineages (small synthetic stores) is not a mismatch.
LINEAGE_KEYS = ("dataset_id", "dataset_content_hash", "model_id", "model_weights_hash", "tokens",
                "dataset", "model")


def store_differences(a: ActivationStore, b: ActivationStore) -> list[str]:
    """What keeps two stores from holding the same tokens in the same layout ([] when aligned)."""
    diffs = [
        f"{name}: {getattr(a, name)} vs {getattr(b, name)}"
        for name in ("n_images", "n_tokens", "chunk_images")
        if getattr(a, name) != getattr(b, name)
    ]
    diffs += [
        f"lineage[{key!r}]: {a.lineage.get(key)!r} vs {b.lineage.get(key)!r}"
        for key in LINEAGE_KEYS
        if a.lineage.get(key) != b.lineage.get(key)
    ]
    return diffs


def check_aligned(stores: Sequence[ActivationStore], roles: Sequence[str] | None = None) -> None:
    """Raise ValueError, naming the two stores that differ, unless all hold the same tokens in the
    same layout. `roles` labels each store in the message (e.g. "input", "output")."""
    if len(stores) < 1:
        raise ValueError("no stores given: pass at least one ActivationStore")
    labels = [f" ({r})" for r in roles] if roles is not None else [f" (store {i})" for i in range(len(stores))]
    for i in range(1, len(stores)):
        diffs = store_differences(stores[0], stores[i])
        if diffs:
            raise ValueError(
                f"stores {stores[0].path}{labels[0]} and {stores[i].path}{labels[i]} do not hold the same "
                f"tokens: {'; '.join(diffs)}. Use hooks extracted from the same model and image dataset "
                "with the same layout (one activation store id)")


def hook_name(store: ActivationStore) -> str:
    """The store's hook: its lineage "hook", else the file stem of <store_id>/<hook>.zarr."""
    return store.lineage.get("hook") or store.path.name.removesuffix(".zarr")


class MultiShuffledLoader:
    """Infinite shuffled stream of aligned tuples (x_0 (B, d_0), …, x_{N-1} (B, d_{N-1})), float32.

    Every token of the selected images appears exactly once per epoch (the final partial
    batch is dropped), deterministic per (seed, epoch); `state()`/`load_state()` resume it.
    """

    def __init__(self, stores: Sequence[ActivationStore], image_indices, *, batch_size: int, seed: int,
                 buffer_chunks: int = 8, prefetch: int = 2, device: str | torch.device = "cpu",
                 roles: Sequence[str] | None = None):
        self.stores = tuple(stores)
        if roles is not None and len(roles) != len(self.stores):
            raise ValueError(f"roles has {len(roles)} labels for {len(self.stores)} stores: pass one per store")
        check_aligned(self.stores, roles)
        self.batch_size, self.seed = batch_size, seed
        kw = dict(batch_size=batch_size, seed=seed, buffer_chunks=buffer_chunks, prefetch=prefetch,
                  drop_last=True, device=device)
        self._loaders = [ShuffledLoader(s, image_indices, **kw) for s in self.stores]
        self.n_rows = self._loaders[0].n_rows

    @property
    def d_models(self) -> tuple[int, ...]:
        return tuple(s.d_model for s in self.stores)

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(hook_name(s) for s in self.stores)

    @property
    def mean_norms(self) -> tuple[float, ...]:
        """Each store's mean token norm (its stats), what the trainers scale by."""
        return tuple(float(s.stats.mean_norm) for s in self.stores)

    def batches_per_epoch(self) -> int:
        return self._loaders[0].batches_per_epoch()

    def state(self) -> LoaderState:
        return self._loaders[0].state()

    def load_state(self, state: LoaderState | tuple | dict) -> None:
        for loader in self._loaders:
            loader.load_state(state)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch's aligned batches; skips the first `start_batch`."""
        streams = [loader.epoch(epoch, start_batch) for loader in self._loaders]
        try:
            yield from zip(*streams, strict=True)
        finally:  # stop every prefetch thread even when the consumer breaks early
            for s in streams:
                s.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            epoch, start = self.state()
            for j, batch in enumerate(self.epoch(epoch, start), start=start + 1):
                self.load_state(LoaderState(epoch, j))  # before yielding: the batch is consumed
                yield batch
            self.load_state(LoaderState(epoch + 1, 0))


_PAIR_ROLES = ("input", "output")


def check_paired(store_in: ActivationStore, store_out: ActivationStore) -> None:
    """Raise ValueError, naming both stores, unless they hold the same tokens in the same layout."""
    check_aligned((store_in, store_out), _PAIR_ROLES)


class PairedShuffledLoader(MultiShuffledLoader):
    """Infinite shuffled stream of aligned (x_in (B, d_in), x_out (B, d_out)) float32 batches.

    Every token of the selected images appears exactly once per epoch (the final partial
    batch is dropped), deterministic per (seed, epoch); `state()`/`load_state()` resume it.
    """

    def __init__(self, store_in: ActivationStore, store_out: ActivationStore, image_indices, *,
                 batch_size: int, seed: int, buffer_chunks: int = 8, prefetch: int = 2,
                 device: str | torch.device = "cpu"):
        super().__init__((store_in, store_out), image_indices, batch_size=batch_size, seed=seed,
                         buffer_chunks=buffer_chunks, prefetch=prefetch, device=device, roles=_PAIR_ROLES)
        self.store_in, self.store_out = store_in, store_out

    @property
    def d_in(self) -> int:
        return self.store_in.d_model

    @property
    def d_out(self) -> int:
        return self.store_out.d_model
