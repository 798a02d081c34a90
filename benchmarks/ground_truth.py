"""The ground truth every SAE benchmark trains on: a sparse generative model with known directions.

By default (bench_sae_peers.py) 3072 unit directions in d = 384; bench_frontiers.py,
bench_encoder_init.py and bench_code_oracle.py use 1024 in d = 128. Power-law firing
frequencies, 48 draws per token of which about half fire (~23 distinct active directions) with
magnitudes 0.5 + Exp(1), a dense offset and 5 % isotropic noise. `draws` sets the 48: with 16,
about 8 directions are active per token. `min_magnitude` sets the 0.5: the smallest magnitude an
active direction can have, against the interference its overlap with the token's other active
directions puts on every projection. Fewer true directions than latents is the regime where
a good trainer finds them again (`recovery`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, NamedTuple

import numpy as np
import torch


DRAWS = 48
"""Directions drawn per token by default (about half fire); every result before `draws` existed used it."""

MIN_MAGNITUDE = 0.5
"""Smallest magnitude of an active direction (magnitudes are this + Exp(1)); every result before
`min_magnitude` existed used it."""


def data_seed(seed: int) -> int:
    """The ground truth's generator seed for `--seed`: a hash, shared with no trainer's seed stream."""
    return int.from_bytes(hashlib.sha256(f"spectra ground truth {seed}".encode()).digest()[:8], "little") >> 1


class GroundTruthSample(NamedTuple):
    x: torch.Tensor
    """(n, d) tokens: the active directions times their magnitudes, plus the offset and the noise."""
    directions: torch.Tensor
    """(n_features, d) unit directions."""
    offset: torch.Tensor
    """(d,) the dense offset every token carries."""
    features: torch.Tensor
    """(n, draws) int64: the directions drawn for each token (a direction may be drawn twice)."""
    magnitudes: torch.Tensor
    """(n, draws) float32: their magnitudes, 0 for the draws that do not fire."""


def ground_truth_sample(n: int, d: int, n_features: int, seed: int, draws: int = DRAWS,
                        min_magnitude: float = MIN_MAGNITUDE) -> GroundTruthSample:
    """`make_activations`' tokens with everything they were made from."""
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1 (directions drawn per token; about half fire)")
    if not min_magnitude > 0:
        raise ValueError(f"min_magnitude={min_magnitude} must be > 0 (active magnitudes are min_magnitude + "
                         f"Exp(1); the default is {MIN_MAGNITUDE})")
    g = torch.Generator().manual_seed(data_seed(seed))
    directions = torch.randn(n_features, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    freq = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64) ** 0.7
    freq = (freq / freq.sum()).float()
    offset = 2.0 * torch.randn(d, generator=g) / math.sqrt(d)
    out = torch.empty(n, d)
    chunk = 8192
    features, magnitudes = torch.empty(n, draws, dtype=torch.int64), torch.empty(n, draws)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        idx = torch.multinomial(freq.expand(m, -1), draws, replacement=True, generator=g)
        active = torch.rand(m, draws, generator=g) < 0.5  # about half of the draws fire
        mags = (min_magnitude + torch.empty(m, draws).exponential_(1.0, generator=g)) * active
        x = torch.nn.functional.embedding_bag(idx, directions, per_sample_weights=mags, mode="sum")
        out[start:start + m] = x + offset
        features[start:start + m], magnitudes[start:start + m] = idx, mags
    signal_var = out.var(0).sum()
    out += torch.randn(n, d, generator=g) * torch.sqrt(0.05 * signal_var / d)
    return GroundTruthSample(out, directions, offset, features, magnitudes)


def make_activations(n: int, d: int, n_features: int, seed: int, draws: int = DRAWS,
                     min_magnitude: float = MIN_MAGNITUDE) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 tokens from a sparse feature model (see the module docstring), and the
    (n_features, d) unit directions it drew them from.

    The generator's seed is derived from `seed`, never `seed` itself: a dictionary seeded with
    the same number draws its initial decoder with `torch.randn` from the same stream, and the
    directions drawn here first would be its first rows: until this was found, every trainer of
    ours run at seed 0 started from the true dictionary (100 % recovered at initialisation)."""
    sample = ground_truth_sample(n, d, n_features, seed, draws, min_magnitude)
    return sample.x.numpy(), sample.directions.numpy()


RECOVERY_COSINE = 0.9


def recovery(directions: torch.Tensor, decoder_rows: torch.Tensor) -> dict:
    """Fraction of true directions whose best-matching decoder row has cosine > RECOVERY_COSINE,
    and the mean of those best cosines."""
    true = torch.nn.functional.normalize(directions.float(), dim=1)
    rows = torch.nn.functional.normalize(decoder_rows.detach().float().cpu(), dim=1)
    best = torch.cat([(chunk @ rows.T).max(dim=1).values for chunk in true.split(1024)])
    return {"recovered_fraction": float((best > RECOVERY_COSINE).float().mean()),
            "mean_best_cosine": float(best.mean())}


def train_batches(train: torch.Tensor, batch: int, n_tokens: int) -> Iterator[torch.Tensor]:
    """`n_tokens // batch` consecutive batches, cycling over the pool."""
    starts = (np.arange(n_tokens // batch) * batch) % (len(train) - batch + 1)
    for s in starts:
        yield train[s:s + batch]


def eval_batches(held_out: torch.Tensor) -> Iterator[torch.Tensor]:
    return iter(held_out.split(4096))
