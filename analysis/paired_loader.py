"""Shuffled loader over two hooks of the same tokens, for transcoders (hook A -> hook B).

Two `ShuffledLoader`s over stores with the same images, tokens per image and chunk size
produce the same schedule: their chunk order and every buffer permutation depend only on
(seed, epoch, chunk structure, batch_size), never on the stored values or on thread timing.
Zipping them therefore applies one permutation to both stores' rows, so row i of `x_in` and
row i of `x_out` are the same token, while each store keeps its whole-chunk reads and its own
prefetch thread. The constructor refuses stores whose structure or lineage differs, because
then the rows would silently be different tokens.
"""

from __future__ import annotations

from typing import Iterator

import torch

from analysis.loader import ActivationStore, LoaderState, ShuffledLoader

# Lineage keys that must agree for the two stores to hold the same tokens of the same model.
# A key absent from both lineages (small synthetic stores) is not a mismatch.
LINEAGE_KEYS = ("dataset_id", "dataset_content_hash", "model_id", "model_weights_hash", "tokens",
                "dataset", "model")


def check_paired(store_in: ActivationStore, store_out: ActivationStore) -> None:
    """Raise ValueError, naming both stores, unless they hold the same tokens in the same layout."""
    diffs = [
        f"{name}: {getattr(store_in, name)} vs {getattr(store_out, name)}"
        for name in ("n_images", "n_tokens", "chunk_images")
        if getattr(store_in, name) != getattr(store_out, name)
    ]
    diffs += [
        f"lineage[{key!r}]: {store_in.lineage.get(key)!r} vs {store_out.lineage.get(key)!r}"
        for key in LINEAGE_KEYS
        if store_in.lineage.get(key) != store_out.lineage.get(key)
    ]
    if diffs:
        raise ValueError(
            f"stores {store_in.path} (input) and {store_out.path} (output) do not hold the same "
            f"tokens: {'; '.join(diffs)}. Pair two hooks extracted from the same model and image "
            "dataset with the same layout (one activation store id)"
        )


class PairedShuffledLoader:
    """Infinite shuffled stream of aligned (x_in (B, d_in), x_out (B, d_out)) float32 batches.

    Every token of the selected images appears exactly once per epoch (the final partial
    batch is dropped), deterministic per (seed, epoch); `state()`/`load_state()` resume it.
    """

    def __init__(self, store_in: ActivationStore, store_out: ActivationStore, image_indices, *,
                 batch_size: int, seed: int, buffer_chunks: int = 8, prefetch: int = 2,
                 device: str | torch.device = "cpu"):
        check_paired(store_in, store_out)
        self.store_in, self.store_out = store_in, store_out
        self.batch_size, self.seed = batch_size, seed
        kw = dict(batch_size=batch_size, seed=seed, buffer_chunks=buffer_chunks, prefetch=prefetch,
                  drop_last=True, device=device)
        self._in = ShuffledLoader(store_in, image_indices, **kw)
        self._out = ShuffledLoader(store_out, image_indices, **kw)
        self.n_rows = self._in.n_rows

    @property
    def d_in(self) -> int:
        return self.store_in.d_model

    @property
    def d_out(self) -> int:
        return self.store_out.d_model

    def batches_per_epoch(self) -> int:
        return self._in.batches_per_epoch()

    def state(self) -> LoaderState:
        return self._in.state()

    def load_state(self, state: LoaderState | tuple | dict) -> None:
        self._in.load_state(state)
        self._out.load_state(state)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's aligned batches; skips the first `start_batch`."""
        ins, outs = self._in.epoch(epoch, start_batch), self._out.epoch(epoch, start_batch)
        try:
            yield from zip(ins, outs, strict=True)
        finally:  # stop both prefetch threads even when the consumer breaks early
            ins.close()
            outs.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, start = self._in.state()
            for j, pair in enumerate(self.epoch(epoch, start), start=start + 1):
                self.load_state(LoaderState(epoch, j))  # before yielding: the batch is consumed
                yield pair
            self.load_state(LoaderState(epoch + 1, 0))
