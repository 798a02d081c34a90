"""Hungarian-matched decoder stability against a brute-force reference and known cases."""

from itertools import permutations

import pytest
import torch
from torch.testing import assert_close

from analysis.dictionaries import SAEConfig, build_sae
from analysis.evaluation.stability import matched_cosine, suite_stability

WIDTH, D = 48, 32


def _dec(seed: int, width: int = WIDTH, d: int = D) -> torch.Tensor:
    return torch.randn(width, d, generator=torch.Generator().manual_seed(seed))


def test_permuted_copy_is_perfectly_stable_and_recovers_permutation():
    a = _dec(0)
    perm = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(1))
    b = a[perm] * (torch.rand(WIDTH, 1) * 3 + 0.1)  # row norms must not matter
    res = matched_cosine(a, b)
    assert res.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert_close(res.cosines, torch.ones(WIDTH))
    # b[j] = a[perm[j]] so a[i] sits at j = perm^{-1}[i]
    assert torch.equal(res.assignment, torch.argsort(perm))
    assert_close(torch.nn.functional.normalize(b[res.assignment], dim=1), torch.nn.functional.normalize(a, dim=1))


def test_flipped_sign_counts_as_a_different_direction():
    a = _dec(0)
    res = matched_cosine(a, -a)
    assert res.mean_cosine < 0.5  # -a_i has cosine -1 with a_i: the matching avoids it
    assert not bool((res.assignment == torch.arange(WIDTH)).all())
    flip = a.clone()
    flip[:4] *= -1  # a few flipped rows lower the score, the rest still match themselves
    res = matched_cosine(a, flip)
    assert 0.5 < res.mean_cosine < 1.0
    assert_close(res.cosines[4:], torch.ones(WIDTH - 4))


def test_noise_lowers_stability_monotonically():
    a = _dec(0)
    noise = _dec(5)
    scores = [matched_cosine(a, a + s * noise).mean_cosine for s in (0.0, 0.1, 0.3, 1.0)]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(x > y for x, y in zip(scores, scores[1:])), scores


def test_random_dictionaries_score_low_compared_with_perturbed_copy():
    a, b = _dec(0), _dec(1)
    random_score = matched_cosine(a, b).mean_cosine
    perturbed = matched_cosine(a, a + 0.2 * _dec(2)).mean_cosine
    assert random_score < 0.5 < 0.9 < perturbed, (random_score, perturbed)


def test_matches_brute_force_on_small_case():
    a, b = _dec(3, width=6, d=4), _dec(4, width=6, d=4)
    na = torch.nn.functional.normalize(a.double(), dim=1)
    nb = torch.nn.functional.normalize(b.double(), dim=1)
    cos = na @ nb.T
    best = max(permutations(range(6)), key=lambda p: sum(cos[i, p[i]] for i in range(6)))
    res = matched_cosine(a, b)
    assert res.assignment.tolist() == list(best)
    assert res.mean_cosine == pytest.approx(float(sum(cos[i, best[i]] for i in range(6)) / 6), abs=1e-9)
    assert_close(res.cosines, torch.tensor([cos[i, best[i]] for i in range(6)]).float())


def test_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match=r"48 vs 40"):
        matched_cosine(_dec(0), _dec(1, width=40))
    with pytest.raises(ValueError, match=r"32 vs 16"):
        matched_cosine(_dec(0), _dec(1, d=16))


def test_suite_stability_averages_pairs_and_accepts_saes():
    a = _dec(0)
    copies = [a, a[torch.randperm(WIDTH)], a.flip(0)]
    assert suite_stability(copies) == pytest.approx(1.0, abs=1e-6)
    mixed = [a, a, _dec(1)]
    pairs = [1.0, matched_cosine(a, _dec(1)).mean_cosine, matched_cosine(a, _dec(1)).mean_cosine]
    assert suite_stability(mixed) == pytest.approx(sum(pairs) / 3, abs=1e-6)
    saes = [build_sae(SAEConfig(d_in=D, width=WIDTH, k=4)) for _ in range(2)]
    assert suite_stability(saes) == pytest.approx(matched_cosine(saes[0].W_dec, saes[1].W_dec).mean_cosine)
    with pytest.raises(ValueError, match="at least 2"):
        suite_stability([a])
