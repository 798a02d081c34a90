"""The two least-squares readings of benchmarks/bench_threshold_values.py against a naive solve:
per-token values on a fixed selection (`refit_values`), and per-latent affine values (`affine_values`),
the latter also folded back into a JumpReLU, whose code must then be exactly those values."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_threshold_values import affine_values, refit_values  # noqa: E402

from analysis.dictionaries.config import SAEConfig  # noqa: E402
from analysis.dictionaries.models import build_sae  # noqa: E402


def _jumprelu(seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=6, width=10, architecture="jumprelu", threshold_init=0.3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(6, 10))
        sae.b_enc.copy_(0.1 * torch.randn(10))
        sae.b_dec.copy_(0.1 * torch.randn(6))
        sae.log_threshold.copy_((0.3 + 0.2 * torch.rand(10)).log())
    return sae.eval()


def test_refit_values_solve_each_tokens_least_squares():
    sae, x = _jumprelu(), torch.randn(50, 6)
    with torch.no_grad():
        mask = sae.pre_acts(x) > sae.threshold
        got = refit_values(sae.W_dec, sae.b_dec, mask, x)
        for t in range(len(x)):
            rows = sae.W_dec[mask[t]].double()  # ridge regression with the function's ridge of 1e-4
            gram = rows @ rows.T + 1e-4 * torch.eye(len(rows), dtype=torch.float64)
            want = torch.linalg.solve(gram, rows @ (x[t] - sae.b_dec).double())
            torch.testing.assert_close(got[t, mask[t]].double(), want, atol=1e-5, rtol=1e-5)
            assert bool((got[t, ~mask[t]] == 0).all())


def test_affine_values_solve_the_joint_least_squares_and_fold_into_a_jumprelu():
    sae, x = _jumprelu(1), torch.randn(400, 6)
    with torch.no_grad():
        select = lambda pre: pre > sae.threshold  # noqa: E731
        alpha, beta = affine_values(sae, x, select, chunk=128, ridge=0.0)
        # naive: one row per (token, coordinate), one column per alpha_i and per beta_i
        pre = sae.pre_acts(x).double()
        gate = select(pre.float()).double()
        D = sae.W_dec.double()
        design = torch.cat([(pre * gate)[:, :, None] * D[None], gate[:, :, None] * D[None]], dim=1)  # (n, 2w, d)
        design = design.permute(0, 2, 1).reshape(-1, 20)
        want = torch.linalg.lstsq(design, (x - sae.b_dec).double().reshape(-1, 1)).solution.squeeze(1)
        torch.testing.assert_close(torch.cat([alpha, beta]).double(), want, atol=1e-4, rtol=1e-4)

        # Folded into the encoder, the JumpReLU's own code is alpha * pre + beta on the same gates.
        alpha, beta = alpha.abs() + 0.5, (beta - beta.min()).clamp_max(0.2)  # inside the bounds
        theta = sae.threshold
        assert bool((alpha * theta + beta > 0).all())
        folded = build_sae(sae.cfg)
        folded.load_state_dict(sae.state_dict())
        folded.W_enc.mul_(alpha)
        folded.b_enc.copy_(alpha * sae.b_enc + beta)
        folded.log_threshold.copy_((alpha * theta + beta).log())
        expected = torch.where(select(sae.pre_acts(x)), alpha * sae.pre_acts(x) + beta, 0.0)
        torch.testing.assert_close(folded.dense_latents(x), expected, atol=1e-5, rtol=1e-5)
