"""TopKSAE against a naive dense implementation; config validation; persistence; scale folding."""

import json

import pytest
import torch
from torch.testing import assert_close

from analysis.dictionaries import SAEConfig, TopKSAE


def _random_sae(d=16, width=64, k=5, seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d, width=width, k=k))
    with torch.no_grad():  # nonzero biases so their handling is exercised
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
    return sae


def _naive_dense(sae: TopKSAE, x: torch.Tensor):
    """relu(pre) -> keep the k largest per row (dense mask) -> dense decode."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = pre.relu()
    kth = z.topk(sae.cfg.k, dim=-1).values[:, -1:]
    z = torch.where(z >= kth, z, torch.zeros_like(z))
    return z, z @ sae.W_dec + sae.b_dec


def test_encode_decode_match_dense_reference():
    sae = _random_sae()
    x = torch.randn(200, 16)
    z_ref, x_hat_ref = _naive_dense(sae, x)
    with torch.no_grad():
        out = sae(x)
        dense = sae.dense_latents(x)
    assert out.top_acts.shape == (200, 5) and out.top_indices.dtype == torch.int64
    assert_close(dense, z_ref.detach())
    assert_close(out.x_hat, x_hat_ref.detach())
    # the (values, indices) pairs scatter into the same dense code
    rebuilt = torch.zeros(200, 64).scatter_(1, out.top_indices, out.top_acts)
    assert_close(rebuilt, z_ref.detach())
    assert_close(sae.decode(out.top_acts, out.top_indices), x_hat_ref.detach())


def test_leading_dims_are_preserved():
    sae = _random_sae()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert_close(sae(x).x_hat, sae(x.reshape(21, 16)).x_hat.reshape(3, 7, 16))


def test_decoder_rows_unit_norm_and_encoder_is_transpose_at_init():
    sae = TopKSAE(SAEConfig(d_in=8, width=32, k=4))
    assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.shape == (8, 32)


@pytest.mark.parametrize("k, width", [(0, 8), (9, 8), (-1, 8)])
def test_k_bounds(k, width):
    with pytest.raises(ValueError, match=f"k={k}"):
        SAEConfig(d_in=4, width=width, k=k)


def test_bad_d_in_and_architecture():
    with pytest.raises(ValueError, match="d_in=0"):
        SAEConfig(d_in=0, width=8, k=2)
    with pytest.raises(ValueError, match="'relu'"):
        SAEConfig(d_in=4, width=8, k=2, architecture="relu")


def test_shape_mismatch_names_both_widths():
    sae = _random_sae()
    with pytest.raises(ValueError, match=r"last dim is 12 .*d_in=16"):
        sae(torch.randn(4, 12))


def test_save_load_round_trip(tmp_path):
    sae = _random_sae()
    lineage = {"hook": "blocks.1.hook_resid_post", "seed": 3}
    sae.save(tmp_path / "ckpt", extra_config=lineage)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "weights.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["lineage"] == lineage and config["width"] == 64
    loaded = TopKSAE.load(tmp_path / "ckpt")
    assert loaded.cfg == sae.cfg and loaded.lineage == lineage
    for (n, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert_close(a, b, rtol=0, atol=0, msg=n)
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_load_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE checkpoint"):
        TopKSAE.load(tmp_path)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = SAEConfig(d_in=4, width=8, k=2)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="widht"):
        SAEConfig.from_dict({**cfg.to_dict(), "widht": 3})


def test_scale_folding():
    """Folded SAE on raw x == unfolded SAE on s*x, divided by s; same latents chosen."""
    sae = _random_sae()
    s = 3.7
    folded = sae.fold_input_scale(s)
    x = torch.randn(100, 16) * 5
    with torch.no_grad():
        ref, got = sae(x * s), folded(x)
    assert_close(got.x_hat, ref.x_hat / s)
    assert_close(got.top_acts, ref.top_acts / s)
    assert torch.equal(got.top_indices, ref.top_indices)
    assert_close(folded.W_dec.norm(dim=1), torch.ones(64))
