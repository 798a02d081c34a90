"""Stability of a dictionary across training seeds: Hungarian matching of decoder directions.

For decoders A and B (width, d), rows are unit-normalized and C[i, j] = <a_i, b_j>. The
one-to-one assignment π maximizing Σ_i C[i, π(i)] is found by the Hungarian algorithm, and
stability is the mean matched cosine (1/width) Σ_i C[i, π(i)]. Signs are kept: a latent reads
a direction with a nonnegative activation, so a flipped direction is a different feature
(cosine −1), not the same one.
"""

from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class StabilityResult(NamedTuple):
    mean_cosine: float
    """Mean over latents of A of the cosine with its matched latent of B."""
    cosines: Tensor
    """(width,) float32 matched cosine per latent of A."""
    assignment: Tensor
    """(width,) int64: latent i of A is matched to latent assignment[i] of B."""


def _decoder(d) -> Tensor:
    """A (width, d) decoder from a tensor, an array or anything with a `W_dec` (our SAEs)."""
    w = d.W_dec if hasattr(d, "W_dec") else d
    w = torch.as_tensor(w).detach()
    if w.ndim != 2:
        raise ValueError(f"decoder must be 2-D (width, d_in), got shape {tuple(w.shape)}")
    return w


def _unit_rows(w: Tensor) -> Tensor:
    # float64: the cost matrix feeds an exact assignment, where rounding could reorder near-ties
    w = w.to(torch.float64)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row gets cosine 0 with all


def matched_cosine(W_dec_a, W_dec_b) -> StabilityResult:
    """Hungarian-matched mean cosine between the decoder rows of two dictionaries.

    Accepts (width, d_in) tensors/arrays or SAEs (their `W_dec`). Both must have the same width
    and d_in; a mismatch raises ValueError naming both.
    """
    a, b = _decoder(W_dec_a), _decoder(W_dec_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"dictionary widths differ: {a.shape[0]} vs {b.shape[0]}; matching needs equal widths, "
            "compare seeds of the same suite member"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"decoder input widths (d_in) differ: {a.shape[1]} vs {b.shape[1]}; the dictionaries "
            "read different hooks or models"
        )
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes ~0.6 s to import

    cos = (_unit_rows(a) @ _unit_rows(b).T).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched = cos[rows, cols]
    assignment = np.empty(a.shape[0], dtype=np.int64)
    assignment[rows] = cols
    cosines = np.empty(a.shape[0], dtype=np.float64)
    cosines[rows] = matched
    return StabilityResult(float(cosines.mean()), torch.from_numpy(cosines).float(),
                           torch.from_numpy(assignment))


def suite_stability(dictionaries: list) -> float:
    """Mean matched cosine over all unordered pairs of dictionaries (e.g. one per seed).

    Needs at least two dictionaries of equal width.
    """
    if len(dictionaries) < 2:
        raise ValueError(
            f"stability needs at least 2 dictionaries (seeds), got {len(dictionaries)}: "
            "train the member with more seeds"
        )
    values = [matched_cosine(a, b).mean_cosine for a, b in combinations(dictionaries, 2)]
    return float(np.mean(values))


__all__ = ["StabilityResult", "matched_cosine", "suite_stability"]
