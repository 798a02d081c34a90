"""Every SAE architecture against a naive dense implementation: codes, reconstructions,
straight-through gradients, batch-level selection, scale folding, persistence, metrics, mining."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from analysis.dictionaries import (
    ARCHITECTURES,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    TopKSAE,
    batch_topk,
    build_sae,
    load_dictionary,
)
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.evaluation.mining import mine_features

D, WIDTH, K = 16, 64, 5


def _cfg(arch: str) -> SAEConfig:
    return SAEConfig(d_in=D, width=WIDTH, k=K if arch in ("topk", "batchtopk") else None, architecture=arch)


def _random_sae(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(_cfg(arch))
    with torch.no_grad():  # nonzero biases and thresholds so their handling is exercised
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        if arch == "batchtopk":
            sae.inference_threshold.uniform_(0.2, 1.0)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(WIDTH).uniform_(0.2, 1.0).log())
    return sae


def _naive_code(sae, x):
    """Dense reference code per architecture, written from the papers' formulas."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    arch = sae.cfg.architecture
    if arch == "topk":
        z = pre.relu()
        kth = z.topk(sae.cfg.k, dim=-1).values[:, -1:]
        return torch.where(z >= kth, z, torch.zeros_like(z))
    if arch == "relu":
        return pre.relu()
    theta = sae.inference_threshold if arch == "batchtopk" else sae.log_threshold.exp()
    return torch.where(pre > theta, pre, torch.zeros_like(pre)).relu()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_codes_and_reconstruction_match_dense_reference(arch):
    sae = _random_sae(arch)
    x = torch.randn(300, D)
    with torch.no_grad():
        z_ref = _naive_code(sae, x)
        out = sae(x)
        dense = sae.dense_latents(x)
    assert type(sae).__name__.lower().startswith(arch)
    assert_close(dense, z_ref)
    assert_close(out.x_hat, z_ref @ sae.W_dec + sae.b_dec)
    # padded pairs: unique ids per row, and they scatter into the same dense code
    assert out.top_acts.shape == out.top_indices.shape and out.top_indices.dtype == torch.int64
    assert (out.top_indices.sort(1).values.diff(dim=1) > 0).all()
    rebuilt = torch.zeros(300, WIDTH).scatter_(1, out.top_indices, out.top_acts)
    assert_close(rebuilt, z_ref)
    assert (z_ref > 0).sum(1).max() == out.top_acts.shape[1] or arch == "topk"
    assert 0 < (z_ref > 0).sum(1).float().mean() < WIDTH  # the test is not vacuous


@pytest.mark.parametrize("loud_rows", [0, 3])
def test_batch_topk_matches_flat_topk_in_row_then_value_order(loud_rows):
    torch.manual_seed(0)
    pre = torch.randn(40, 200)
    pre[:loud_rows] *= 50  # rows holding far more than their 2k candidates of the batch's winners
    k = 3
    rows, latents, vals = batch_topk(pre, k)
    got = torch.zeros_like(pre).index_put_((rows, latents), vals)
    flat = pre.relu().reshape(-1)
    ref = torch.zeros_like(flat).scatter_(0, flat.topk(k * 40).indices, flat.topk(k * 40).values).view_as(pre)
    assert_close(got, ref)
    assert len(rows) == k * 40 and (rows < loud_rows).sum() >= (2 * k * loud_rows)
    assert bool((rows.diff() >= 0).all())  # grouped by row,
    assert bool(((rows.diff() > 0) | (vals.diff() <= 0)).all())  # each row by decreasing value
    # every kept value beats every value left out
    assert got[got > 0].min() >= pre.masked_fill(got > 0, -1e9).max()


def test_batch_topk_keeps_only_positive_entries():
    pre = -torch.rand(6, 10)
    pre[2, 4], pre[5, 1] = 0.5, 0.25  # two positives where k·B = 12 would be kept
    rows, latents, vals = batch_topk(pre, 2)
    assert rows.tolist() == [2, 5] and latents.tolist() == [4, 1] and vals.tolist() == [0.5, 0.25]


def test_batchtopk_training_code_selects_k_per_token_on_average():
    sae = _random_sae("batchtopk")
    with torch.no_grad():
        enc = sae.encode_batch(torch.randn(128, D))
    assert int((enc.top_acts > 0).sum()) == K * 128


def test_jumprelu_straight_through_gradients():
    """Pseudo-gradients of Rajamanoharan et al. (2024), eqs. 11-12, written out densely."""
    sae = _random_sae("jumprelu").double()
    eps = sae.cfg.bandwidth
    x = torch.randn(500, D, dtype=torch.double)
    pre = sae.pre_acts(x).detach().requires_grad_(True)
    w_out = torch.randn(500, WIDTH, dtype=torch.double)
    z, counts = sae.train_forward(pre)
    ((z * w_out).sum() + 0.7 * counts.sum()).backward()

    theta = sae.log_threshold.exp().detach()
    assert_close(counts, (pre.detach() > theta).sum(0).double())  # each latent's firing count
    assert_close(z.detach(), pre.detach() * (pre.detach() > theta))
    kernel = ((pre.detach() - theta).abs() < eps / 2).double() / eps
    d_theta = (-(theta * kernel * w_out) - 0.7 * kernel).sum(0)
    assert kernel.sum() > 0  # some pre-activations fall inside the band
    assert_close(pre.grad, w_out * (pre.detach() > theta))
    assert_close(sae.log_threshold.grad, d_theta * theta)  # chain rule through exp


def test_threshold_is_fp32_whatever_the_weight_dtype():
    sae = JumpReLUSAE(_cfg("jumprelu"), dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.log_threshold.dtype == torch.float32
    assert BatchTopKSAE(_cfg("batchtopk"), dtype=torch.bfloat16).inference_threshold.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scale_folding(arch):
    """Folded SAE on raw x == unfolded SAE on s*x, divided by s; same latents fire."""
    sae = _random_sae(arch)
    s = 3.7
    folded = sae.fold_input_scale(s)
    x = torch.randn(100, D) * 5
    with torch.no_grad():
        ref, got = sae.dense_latents(x * s), folded.dense_latents(x)
        assert_close(got, ref / s)
        assert_close(folded(x).x_hat, sae(x * s).x_hat / s)
    assert (ref > 0).any() and type(folded) is type(sae)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_through_load_dictionary(arch, tmp_path):
    sae = _random_sae(arch)
    sae.save(tmp_path / arch, extra_config={"hook": "blocks.0.hook_resid_post"})
    config = json.loads((tmp_path / arch / "config.json").read_text())
    assert config["architecture"] == arch and config["dictionary"] == "sae"
    loaded = load_dictionary(tmp_path / arch)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.lineage == {"hook": "blocks.0.hook_resid_post"}
    for (n, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert type(sae).load(tmp_path / arch).cfg == sae.cfg


def test_class_loader_refuses_another_architecture(tmp_path):
    _random_sae("relu").save(tmp_path)
    with pytest.raises(ValueError, match=r"'relu' SAE, not 'topk'.*load_dictionary"):
        TopKSAE.load(tmp_path)


def test_checkpoint_without_dictionary_key_loads_as_sae(tmp_path):
    sae = _random_sae("topk")
    sae.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dictionary"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert isinstance(load_dictionary(tmp_path), TopKSAE)


@pytest.mark.parametrize("kw, msg", [
    (dict(architecture="relu", k=4), r"k=4 has no meaning for architecture='relu'"),
    (dict(architecture="batchtopk"), r"k=None must satisfy"),
    (dict(architecture="topk", k=4, sparsity_coef=1.0), r"sparsity_coef=1.0 has no meaning"),
    (dict(architecture="jumprelu", bandwidth=-0.1), r"bandwidth=-0.1 must be > 0"),
    (dict(architecture="jumprelu", threshold_init=0.0), r"threshold_init=0.0 must be > 0"),
    (dict(architecture="gated", k=4), r"architecture='gated' is not supported"),
    (dict(architecture="batchtopk", k=WIDTH + 1), rf"k={WIDTH + 1} must satisfy 0 < k <= width={WIDTH}"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SAEConfig(d_in=D, width=WIDTH, **kw)


def test_defaults_are_resolved_into_the_config():
    cfg = SAEConfig(d_in=D, width=WIDTH, architecture="jumprelu")
    assert cfg.sparsity_coef > 0 and cfg.threshold_init > 0 and cfg.bandwidth > 0
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert ReLUSAE(SAEConfig(d_in=D, width=WIDTH, architecture="relu")).W_dec.norm(dim=1).max() < 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_metrics_and_mining_work_for_every_architecture(arch):
    sae = _random_sae(arch)
    x = torch.randn(6, 10, D)
    with torch.no_grad():
        z = _naive_code(sae, x.reshape(-1, D))
    m = reconstruction_metrics(sae, list(x.reshape(-1, D).split(17)))
    assert m.l0 == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-9)
    np.testing.assert_array_equal(m.fire_counts, (z > 0).sum(0).numpy())
    mined = mine_features(sae, [(np.arange(3), x[:3]), (np.arange(3, 6), x[3:])], n_top=2)
    np.testing.assert_array_equal(mined.feature_stats.column("fire_count").to_numpy(), (z > 0).sum(0).numpy())
    per_image = z.reshape(6, 10, WIDTH).amax(1)
    best = per_image.amax(0)
    top = mined.top_images.to_pydict()
    got = {f: a for f, r, a in zip(top["feature"], top["rank"], top["activation"]) if r == 0}
    assert got and all(got[f] == pytest.approx(float(best[f]), rel=1e-6) for f in got)
    assert set(got) == set(torch.nonzero(best > 0).flatten().tolist())
