"""The sparse training pieces of analysis.dictionaries.objectives against dense references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from analysis.dictionaries import SAEConfig, build_sae
from analysis.dictionaries.objectives import (
    auxk_loss,
    sae_weights,
    exact_selected,
    gathered_dot,
    scatter_rows,
    sparse_decode,
    train_forward,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(arch="topk", d=12, width=40, k=5, seed=0, dtype=torch.double, **kw):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d, width=width, k=k if arch in ("topk", "batchtopk") else None,
                              architecture=arch, **kw)).to(dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _grads(sae, loss_fn):
    sae.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def test_gathered_dot_matches_gather_then_dot():
    g = torch.Generator().manual_seed(0)
    table, vecs = torch.randn(30, 7, generator=g, dtype=torch.double), torch.randn(9, 7, generator=g, dtype=torch.double)
    idx = torch.randint(0, 30, (9, 4), generator=g)
    assert_close(gathered_dot(table, idx, vecs), torch.einsum("bjd,bd->bj", table[idx], vecs))
    with torch.no_grad():  # used inside no-grad selection code: still computes
        assert_close(gathered_dot(table.T.contiguous().T, idx, vecs), torch.einsum("bjd,bd->bj", table[idx], vecs))


def test_scatter_rows_matches_index_add_with_shared_and_unused_rows():
    g = torch.Generator().manual_seed(1)
    n, B, m, d = 25, 11, 3, 6
    idx = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(B)])
    idx[:4, 0] = 7  # several tokens share a row; most of the 25 rows get no pair at all
    weights, vecs = torch.randn(B, m, generator=g, dtype=torch.double), torch.randn(B, d, generator=g, dtype=torch.double)
    ref = torch.zeros(n, d, dtype=torch.double).index_add_(
        0, idx.reshape(-1), (weights.unsqueeze(-1) * vecs.unsqueeze(1)).reshape(-1, d))
    got = scatter_rows(idx, weights, vecs, n)
    assert_close(got, ref)
    unused = torch.ones(n, dtype=torch.bool).index_fill_(0, idx.reshape(-1), False)
    assert unused.any() and (got[unused] == 0).all()


def test_sparse_decode_gradients_match_dense_autograd():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(20, 6, generator=g, dtype=torch.double, requires_grad=True)
    acts = torch.rand(8, 3, generator=g, dtype=torch.double).requires_grad_()
    idx = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(8)])
    target = torch.randn(8, 6, generator=g, dtype=torch.double)
    got = torch.autograd.grad((sparse_decode(acts, idx, W) - target).pow(2).sum(), (acts, W))
    dense = torch.zeros(8, 20, dtype=torch.double).scatter(1, idx, acts)
    ref = torch.autograd.grad((dense @ W - target).pow(2).sum(), (acts, W))
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])


def _dense_reference(sae, x, idx):
    """Autograd through the dense (B, width) code with the latents `idx` kept (ReLU on them)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    return z @ sae.W_dec + sae.b_dec


def test_bf16_selection_keeps_fp32_values_and_gradients():
    """Choosing latents from a bf16 matmul must leave the chosen values and every gradient
    exactly those of the fp32 model with that choice, and pick (nearly) the fp32 set."""
    sae = _sae(d=64, width=256, k=8, dtype=torch.float32)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    fwd = train_forward(sae, x, low_precision=torch.bfloat16)
    assert fwd.pre.dtype == torch.bfloat16 and fwd.x_hat.dtype == torch.float32
    idx = fwd.pre.topk(8, dim=-1, sorted=False).indices
    fp32_pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).detach()
    assert_close(exact_selected(x - sae.b_dec, sae.W_enc, sae.b_enc, idx).detach(), fp32_pre.gather(1, idx))
    got = _grads(sae, lambda: (train_forward(sae, x, low_precision=torch.bfloat16).x_hat - x).pow(2).sum())
    ref = _grads(sae, lambda: (_dense_reference(sae, x, idx) - x).pow(2).sum())
    for name in ref:
        assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)
    fp32_idx = fp32_pre.topk(8, dim=-1).indices
    same = (idx.sort(1).values.unsqueeze(2) == fp32_idx.unsqueeze(1)).any(2).float().mean()
    assert same > 0.9, same  # only near-ties at the k-th place may differ


def test_batchtopk_training_forward_matches_dense_autograd_on_the_batch_selection():
    """BatchTopK's pairs are ragged (tokens keep 0 to many latents): its reconstruction, L0,
    firing counts, threshold estimate and every gradient equal autograd through the dense code
    that keeps the batch's k·B largest positive pre-activations."""
    sae = _sae("batchtopk", d=12, width=40, k=3)
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(8), dtype=torch.double)
    x[:5] *= 4  # a few loud tokens take many of the batch's winners, some quiet ones none
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        flat = pre.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, flat.topk(3 * 30).indices, True)
        keep = (keep & (flat > 0)).view_as(pre)
    per_token = keep.sum(1)
    assert per_token.max() > 3 * 2 and (per_token == 0).any()  # the layout really is ragged

    def dense():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        return (pre * keep) @ sae.W_dec + sae.b_dec

    fwd = train_forward(sae, x)
    assert_close(fwd.x_hat, dense())
    assert float(fwd.l0) == pytest.approx(float(per_token.double().mean()))
    assert_close(fwd.fire_counts, keep.sum(0).float())
    assert float(fwd.min_kept) == float(pre[keep].min())
    got = _grads(sae, lambda: (train_forward(sae, x).x_hat - x).pow(2).sum())
    ref = _grads(sae, lambda: (dense() - x).pow(2).sum())
    assert set(got) == set(ref)
    for name in ref:
        assert_close(got[name], ref[name], msg=name)


@pytest.mark.parametrize("threshold", [1.0, 0.05])  # a sparse code (forced onto the sparse path) / a dense one
def test_jumprelu_training_forward_matches_the_dense_path(threshold, monkeypatch):
    """The sparse JumpReLU forward (firing pairs only, θ's pseudo-gradient from the band pairs)
    against `_dense_forward`: reconstruction, penalty, counts, L0, and every gradient, the
    log-thresholds' included, under a loss that weights reconstruction and L0 alike."""
    from analysis.dictionaries import objectives

    sae = _sae("jumprelu", d=12, width=40, bandwidth=0.5)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.full((40,), threshold).log() + 0.3 * torch.randn(40))
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(9), dtype=torch.double)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        fill = float((pre > sae.threshold).double().mean())
        in_band = ((pre - sae.threshold).abs() < 0.25).sum()
    sparse = objectives.jumprelu_forward(sae, x)
    if threshold == 0.05:
        assert fill > objectives.SPARSE_JUMPRELU_MAX_FILL and sparse is None
        assert train_forward(sae, x).pre is None  # train_forward fell back to the dense path
        return
    assert 0 < fill < 0.5 and in_band > 50  # the test is not vacuous
    monkeypatch.setattr(objectives, "SPARSE_JUMPRELU_MAX_FILL", 1.0)  # the sparse path at this small width
    dense = objectives._dense_forward(sae, x)
    sparse = train_forward(sae, x)
    assert sparse.pre is not None
    assert_close(sparse.x_hat, dense.x_hat)  # both fp32, as TrainForward promises
    assert_close(sparse.penalty, dense.penalty)
    assert_close(sparse.fire_counts, dense.fire_counts.double())
    assert float(sparse.l0) == pytest.approx(float(dense.l0))

    def loss(fwd):
        return lambda: (fwd().x_hat - x).pow(2).sum() + 0.7 * fwd().penalty

    got = _grads(sae, loss(lambda: train_forward(sae, x)))
    ref = _grads(sae, loss(lambda: objectives._dense_forward(sae, x)))
    assert set(got) == set(ref) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    assert float(ref["log_threshold"].abs().sum()) > 0
    for name in ref:  # the loss is fp32 on both paths
        assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batchtopk_bf16_selection_threshold_is_an_fp32_value():
    sae = _sae("batchtopk", d=32, width=128, k=4, dtype=torch.float32)
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(4))
    fwd = train_forward(sae, x, low_precision=torch.bfloat16)
    pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).detach()
    # the estimate is one of the exact fp32 pre-activations, not its bf16 rounding
    assert (pre - fwd.min_kept).abs().min() < 1e-6
    assert fwd.min_kept.dtype == torch.float32


def test_reused_pre_buffer_is_overwritten_not_reallocated():
    sae = _sae(dtype=torch.float32)
    x1, x2 = torch.randn(2, 30, 12, generator=torch.Generator().manual_seed(5))
    buf = train_forward(sae, x1).pre
    ptr = buf.data_ptr()
    got = train_forward(sae, x2, reuse=buf)
    assert got.pre.data_ptr() == ptr
    assert_close(got.x_hat, train_forward(sae, x2).x_hat)
    # a buffer of the wrong dtype (fp32 run switched to bf16 selection) is not reused
    assert train_forward(sae, x2, reuse=buf, low_precision=torch.bfloat16).pre.data_ptr() != ptr


@pytest.mark.parametrize("n_dead", [3, 40])  # some latents dead / all of them
def test_auxk_matches_masked_dense_reference(n_dead):
    sae = _sae(width=40, k=5)
    x = torch.randn(25, 12, generator=torch.Generator().manual_seed(6), dtype=torch.double)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(7))[:n_dead]] = True
    aux_k = 6

    def ours():
        return auxk_loss(sae_weights(sae), train_forward(sae, x), x, dead, aux_k)

    def reference():
        with torch.no_grad():
            x_hat = _dense_reference(sae, x, train_forward(sae, x).pre.topk(5, dim=-1).indices)
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            idx = pre.masked_fill(~dead, -math.inf).topk(min(aux_k, n_dead), dim=-1).indices
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
        residual = x - x_hat
        return (z @ sae.W_dec - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()

    assert_close(ours(), reference())
    got, ref = _grads(sae, ours), _grads(sae, reference)
    for name in ref:
        assert_close(got[name], ref[name], msg=name)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_dense_architectures_under_cpu_bf16_autocast(arch):
    """The autocast path: bf16 matmuls, fp32 outputs and parameters, gradients near fp32."""
    sae = _sae(arch, d=32, width=96, dtype=torch.float32, threshold_init=0.1 if arch == "jumprelu" else None)
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(8))

    def loss(low):
        fwd = train_forward(sae, x, low_precision=low)
        assert fwd.x_hat.dtype == fwd.penalty.dtype == torch.float32
        return (fwd.x_hat - x).pow(2).sum() / 1000 + 0.01 * fwd.penalty

    ref, got = _grads(sae, lambda: loss(None)), _grads(sae, lambda: loss(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    for name in ref:
        assert got[name].dtype == torch.float32
        rel = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert rel < 0.05, (name, float(rel))
    with torch.no_grad():
        assert_close(train_forward(sae, x, low_precision=torch.bfloat16).x_hat,
                     train_forward(sae, x).x_hat, rtol=0.05, atol=0.05)


def test_embedding_bag_reference_semantics():
    """scatter_rows relies on embedding_bag returning zeros for empty bags (offsets repeat)."""
    vecs = torch.arange(6.0).reshape(3, 2)
    out = F.embedding_bag(torch.tensor([0, 2]), vecs, torch.tensor([0, 1, 1, 2]),
                          per_sample_weights=torch.tensor([1.0, 2.0]), mode="sum")
    assert_close(out, torch.tensor([[0.0, 1.0], [0.0, 0.0], [8.0, 10.0], [0.0, 0.0]]))
