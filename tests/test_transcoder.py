"""Transcoders: paired loader alignment, TopK transcoder model, training and metrics."""

import dataclasses
import numpy as np
import pytest
import torch
import zarr

from analysis.activations.store import StoreLayout, create_store
from analysis.activations.extract import extract_shard
from analysis.dictionaries.transcoder import TopKTranscoder, TranscoderConfig
from analysis.activations.reader import ActivationStore
from analysis.activations.multi_loader import PairedShuffledLoader
from analysis.dictionaries.training.transcoder import TranscoderTrainConfig, train_transcoder
from analysis.evaluation.metrics import prediction_metrics

N, H, P, D_IN = 40, 8, 4, 6
T = (H // P) ** 2 + 1
IPC = 8


def hook_a(x):
    w = torch.randn(3 * P * P, D_IN, generator=torch.Generator().manual_seed(1))
    b = x.shape[0]
    tok = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * P * P) @ w
    return torch.cat([tok.mean(1, keepdim=True), tok], dim=1)


def f(a):
    """The known map hook a -> hook b (different width)."""
    return torch.cat([2 * a[..., :3] + 1, a[..., 3:4] ** 2], dim=-1)


def make_stores(root, lineage_b=None, n_b=N):
    images = zarr.create_array(store=str(root / "images.zarr"), shape=(N, H, H, 3), chunks=(16, H, H, 3), dtype="uint8")
    images[:] = np.random.default_rng(0).integers(0, 256, (N, H, H, 3), dtype=np.uint8)
    paths = {}
    for hook, d, lin, cap in (("a", D_IN, {"model": "syn", "dataset": "d0"}, lambda x: {"a": hook_a(x)}),
                              ("b", 4, lineage_b or {"model": "syn", "dataset": "d0"}, lambda x: {"b": f(hook_a(x))})):
        lay = StoreLayout(N, T, d, images_per_shard=16, images_per_chunk=IPC, dtype="float32")
        paths[hook] = root / f"{hook}.zarr"
        create_store(paths[hook], lay, lin)
        for s in range(lay.n_shards):
            extract_shard(cap, images, {hook: paths[hook]}, s, batch_size=16, progress=False)
    return ActivationStore.open(paths["a"]), ActivationStore.open(paths["b"])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("paired"))


def test_paired_loader_aligned_and_each_token_once(stores):
    sa, sb = stores
    idx = np.arange(1, N, 2)  # a subset spread over all chunks (20 images, 100 tokens)
    loader = PairedShuffledLoader(sa, sb, idx, batch_size=10, seed=3, buffer_chunks=2)
    want = sa.read(0, N)[torch.as_tensor(idx)].reshape(-1, D_IN)
    for epoch in range(2):
        xs, ys = zip(*loader.epoch(epoch))
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.shape == (len(idx) * T // 10 * 10, D_IN) and y.shape == (x.shape[0], 4)
        torch.testing.assert_close(y, f(x), rtol=1e-5, atol=1e-5)  # row by row: same token
        # each token at most once, and all of them (n_rows is a multiple of 10 here)
        assert len(idx) * T % 10 == 0
        key = lambda m: m.numpy()[np.lexsort(m.numpy().T[::-1])]
        np.testing.assert_array_equal(key(x), key(want))
    a0 = torch.cat([b[0] for b in loader.epoch(0)])
    a1 = torch.cat([b[0] for b in loader.epoch(1)])
    assert not torch.equal(a0, a1)  # epochs reshuffle
    torch.testing.assert_close(a0, torch.cat([b[0] for b in loader.epoch(0)]))  # deterministic
    # the infinite iterator resumes from state()
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    st = loader.state()
    nxt = next(it)
    loader2 = PairedShuffledLoader(sa, sb, idx, batch_size=10, seed=3, buffer_chunks=2)
    loader2.load_state(st)
    again = next(iter(loader2))
    torch.testing.assert_close(again[0], nxt[0])
    torch.testing.assert_close(again[1], nxt[1])
    assert len(first) == 5


def test_paired_loader_refuses_mismatched_stores(tmp_path, stores):
    sa, _ = stores
    _, other = make_stores(tmp_path, lineage_b={"model": "other", "dataset": "d0"})
    with pytest.raises(ValueError, match="model") as e:
        PairedShuffledLoader(sa, other, np.arange(N), batch_size=8, seed=0)
    assert str(sa.path) in str(e.value) and str(other.path) in str(e.value)


def sparse_data(n, gen, d_in=16, d_out=12, n_true=32, active=3):
    D_in = torch.randn(n_true, d_in, generator=gen)
    D_out = torch.randn(n_true, d_out, generator=gen)
    return D_in, D_out


def codes(n, gen, n_true=32, active=3):
    c = torch.zeros(n, n_true)
    idx = torch.rand(n, n_true, generator=gen).argsort(dim=1)[:, :active]
    c.scatter_(1, idx, torch.rand(n, active, generator=gen) + 0.5)
    return c


def test_transcoder_learns_sparse_map():
    gen = torch.Generator().manual_seed(0)
    D_in, D_out = sparse_data(0, gen)

    def pair(n):
        c = codes(n, gen)
        return c @ D_in + 0.01 * torch.randn(n, 16, generator=gen), c @ D_out

    cfg = TranscoderTrainConfig(width=128, k=4, batch_size=256, n_train_tokens=256 * 300, lr=1e-2, warmup_steps=15)
    x0, y0 = pair(1024)
    batches = (pair(256) for _ in range(10_000))
    res = train_transcoder(batches, cfg, mean_norm_in=float(x0.norm(dim=1).mean()),
                           mean_norm_out=float(y0.norm(dim=1).mean()), init_batch=(x0, y0), progress=False)
    assert res.steps == 300 and res.tokens == 256 * 300
    xe, ye = pair(4096)
    m = prediction_metrics(res.dictionary, [(xe[:2000], ye[:2000]), (xe[2000:], ye[2000:])])
    l0, fvu = m.l0, m.fvu
    print("sparse FVU", fvu, "l0", l0)
    assert fvu < 0.2
    assert 0 < l0 <= 4


def test_skip_learns_linear_map():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(16, 12, generator=gen) / 4
    cfg = TranscoderTrainConfig(width=32, k=2, skip=True, batch_size=256, n_train_tokens=256 * 400, lr=3e-3,
                                warmup_steps=20)

    def pair(n):
        x = torch.randn(n, 16, generator=gen) * 3 + 1
        return x, x @ A

    x0, y0 = pair(1024)
    res = train_transcoder((pair(256) for _ in range(10_000)), cfg, mean_norm_in=float(x0.norm(dim=1).mean()),
                           mean_norm_out=float(y0.norm(dim=1).mean()), init_batch=(x0, y0), progress=False)
    xe, ye = pair(4096)
    fvu = prediction_metrics(res.dictionary, [(xe, ye)]).fvu
    print("skip FVU", fvu)
    assert fvu < 0.05
    # without a skip the same budget leaves most of a dense linear map unexplained
    res2 = train_transcoder((pair(256) for _ in range(10_000)), dataclasses.replace(cfg, skip=False),
                            mean_norm_in=float(x0.norm(dim=1).mean()), mean_norm_out=float(y0.norm(dim=1).mean()),
                            init_batch=(x0, y0), progress=False)
    assert prediction_metrics(res2.dictionary, [(xe, ye)]).fvu > fvu


def naive_forward(tc, x):
    pre = (x - tc.b_in) @ tc.W_enc + tc.b_enc
    thr = pre.topk(tc.cfg.k, dim=1).values[:, -1:]
    z = torch.where(pre >= thr, pre.clamp_min(0), torch.zeros(()))
    y = z @ tc.W_dec + tc.b_dec
    return y + (x @ tc.W_skip if tc.W_skip is not None else 0)


@pytest.mark.parametrize("skip", [False, True])
def test_forward_fold_and_save_load(tmp_path, skip):
    torch.manual_seed(0)
    tc = TopKTranscoder(TranscoderConfig(5, 3, 20, 4, skip=skip))
    with torch.no_grad():
        for p in tc.parameters():
            if p.ndim == 1 or p is tc.W_skip:
                p.normal_()
    x = torch.randn(7, 5)
    out = tc(x)
    assert out.top_acts.shape == (7, 4) and out.top_indices.shape == (7, 4)
    torch.testing.assert_close(out.y_hat, naive_forward(tc, x))
    folded = tc.fold_scales(2.0, 0.5)
    torch.testing.assert_close(folded(x).y_hat, tc(2.0 * x).y_hat / 0.5)
    tc.lineage = {"store": "s1"}
    tc.save(tmp_path / "tc")
    back = TopKTranscoder.load(tmp_path / "tc")
    assert back.cfg == tc.cfg and back.lineage == {"store": "s1"}
    torch.testing.assert_close(back(x).y_hat, out.y_hat)
    import json
    assert json.loads((tmp_path / "tc" / "config.json").read_text())["dictionary"] == "transcoder"


def test_bad_inputs(tmp_path):
    for bad in (dict(k=0), dict(k=21), dict(width=0), dict(d_in=-1)):
        with pytest.raises(ValueError):
            TranscoderConfig(**{**dict(d_in=5, d_out=3, width=20, k=4), **bad})
    tc = TopKTranscoder(TranscoderConfig(5, 3, 20, 4))
    with pytest.raises(ValueError, match="d_in=5"):
        tc(torch.randn(2, 6))
    with pytest.raises(ValueError, match="predicts 3 dimensions"):
        prediction_metrics(tc, [(torch.randn(2, 5), torch.randn(2, 4))])
    from analysis.dictionaries import TopKSAE, SAEConfig
    TopKSAE(SAEConfig(d_in=5, width=8, k=2)).save(tmp_path / "sae")
    with pytest.raises(ValueError, match="transcoder"):
        TopKTranscoder.load(tmp_path / "sae")


@pytest.mark.parametrize("skip", [False, True])
def test_training_forward_and_its_sparse_backward_match_dense_autograd(skip):
    """The loop's transcoder forward (the SAE's sparse TopK kernels, centred on b_in) equals the
    model's own forward, and its hand-written gradients equal dense autograd's."""
    from analysis.dictionaries.training.transcoder import TranscoderObjective

    torch.manual_seed(0)
    x0, y0 = torch.randn(64, 6) * 2 + 1, torch.randn(64, 5)
    cfg = TranscoderTrainConfig(width=24, k=3, skip=skip, batch_size=64, n_train_tokens=64)
    obj = TranscoderObjective(cfg, mean_norm_in=1.0, mean_norm_out=1.0, init_batch=(x0, y0))
    tc = obj.model
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.1 * torch.randn_like(p))  # generic biases and skip weights, not the init
    x, y = obj.scaled(obj.flatten((x0, y0)))
    fwd = obj.forward(x, None, None)
    loss, _, _ = obj.loss(fwd, y)
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()
    dense = (tc(x).y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    dense.backward()
    torch.testing.assert_close(loss, dense)
    for n, p in tc.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, msg=n)
