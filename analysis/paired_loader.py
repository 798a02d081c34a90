"""Shuffled loader over two hooks of the same tokens, for transcoders (hook A -> hook B).

The two-store case of `analysis.multi_loader.MultiShuffledLoader`: one shared schedule applied to
both stores, so row i of `x_in` and row i of `x_out` are the same token. The constructor refuses
stores whose structure or lineage differs, naming both.
"""

from __future__ import annotations

import torch

from analysis.loader import ActivationStore
from analysis.multi_loader import LINEAGE_KEYS, MultiShuffledLoader, check_aligned

__all__ = ["LINEAGE_KEYS", "PairedShuffledLoader", "check_paired"]

_ROLES = ("input", "output")


def check_paired(store_in: ActivationStore, store_out: ActivationStore) -> None:
    """Raise ValueError, naming both stores, unless they hold the same tokens in the same layout."""
    check_aligned((store_in, store_out), _ROLES)


class PairedShuffledLoader(MultiShuffledLoader):
    """Infinite shuffled stream of aligned (x_in (B, d_in), x_out (B, d_out)) float32 batches.

    Every token of the selected images appears exactly once per epoch (the final partial
    batch is dropped), deterministic per (seed, epoch); `state()`/`load_state()` resume it.
    """

    def __init__(self, store_in: ActivationStore, store_out: ActivationStore, image_indices, *,
                 batch_size: int, seed: int, buffer_chunks: int = 8, prefetch: int = 2,
                 device: str | torch.device = "cpu"):
        super().__init__((store_in, store_out), image_indices, batch_size=batch_size, seed=seed,
                         buffer_chunks=buffer_chunks, prefetch=prefetch, device=device, roles=_ROLES)
        self.store_in, self.store_out = store_in, store_out

    @property
    def d_in(self) -> int:
        return self.store_in.d_model

    @property
    def d_out(self) -> int:
        return self.store_out.d_model
