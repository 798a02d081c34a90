"""The ground truth of benchmarks/ground_truth.py (bench_sae_peers.py, bench_frontiers.py,
bench_encoder_init.py, bench_code_oracle.py) must not hand a trainer its answer: its directions
once came from the same random stream as the initial decoder of a dictionary with the same seed,
so at seed 0 every true direction was a decoder row before the first step."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ground_truth import DRAWS, MIN_MAGNITUDE, ground_truth_sample, make_activations  # noqa: E402

from analysis.dictionaries.training.sae import SAEObjective, SAETrainConfig  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_no_true_direction_is_an_initial_decoder_row(seed):
    x, directions = make_activations(2048, 32, 256, seed)
    x, directions = torch.from_numpy(x), torch.from_numpy(directions)
    cfg = SAETrainConfig(width=512, k=8, seed=seed, batch_size=1024, n_train_tokens=4096)
    sae = SAEObjective(32, cfg, mean_norm=float(x.norm(dim=1).mean()), init_batch=x[:1024]).model
    rows = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    best = (directions @ rows.T).max(dim=1).values
    assert float(best.max()) < 0.9  # random 32-d directions: the best of 512 rows is near 0.6


def test_draws_sets_the_active_directions_per_token():
    """About half of the draws fire: 48 (the default, every published figure) gives ~24 active
    directions per token, 16 gives ~8; the same seed draws the same directions."""
    dense, sparse = ground_truth_sample(4096, 32, 256, 0), ground_truth_sample(4096, 32, 256, 0, draws=16)
    assert dense.features.shape[1] == DRAWS == 48 and sparse.features.shape[1] == 16
    assert 22 < float((dense.magnitudes > 0).sum(1).float().mean()) < 26
    assert 7 < float((sparse.magnitudes > 0).sum(1).float().mean()) < 9
    torch.testing.assert_close(dense.directions, sparse.directions)
    with pytest.raises(ValueError, match="draws=0 must be >= 1"):
        ground_truth_sample(16, 32, 256, 0, draws=0)


def test_min_magnitude_sets_the_smallest_active_magnitude():
    """Active magnitudes are min_magnitude + Exp(1): 0.5 by default (every published figure); the
    same seed draws the same directions and the same active draws."""
    low, high = ground_truth_sample(4096, 32, 256, 0), ground_truth_sample(4096, 32, 256, 0, min_magnitude=2.0)
    assert MIN_MAGNITUDE == 0.5
    low_active, high_active = low.magnitudes[low.magnitudes > 0], high.magnitudes[high.magnitudes > 0]
    assert 0.5 <= float(low_active.min()) < 0.51 and 2.0 <= float(high_active.min()) < 2.01
    torch.testing.assert_close(high_active - low_active, torch.full_like(low_active, 1.5))
    torch.testing.assert_close(low.directions, high.directions)
    with pytest.raises(ValueError, match="min_magnitude=0 must be > 0"):
        ground_truth_sample(16, 32, 256, 0, min_magnitude=0)
