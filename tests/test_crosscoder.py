"""Crosscoders: the model against a naive per-layer loop, the penalty, folding, persistence,
training (resume, feature recovery), metrics, and the N-store aligned loader."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch.testing import assert_close

from analysis.activations.store import StoreLayout, create_store
from analysis.activations.extract import extract_shard
from analysis.dictionaries import Crosscoder, CrosscoderConfig, TopKSAE, SAEConfig, load_dictionary
from analysis.activations.reader import ActivationStore
from analysis.activations.multi_loader import MultiShuffledLoader
from analysis.dictionaries.training.crosscoder import CrosscoderTrainConfig, crosscoder_train_forward, train_crosscoder
from analysis.evaluation.metrics import crosscoder_metrics


# ---- the model -----------------------------------------------------------------------------


def random_cc(arch="topk", d_ins=(5, 3, 4), width=20, seed=0):
    torch.manual_seed(seed)
    cfg = CrosscoderConfig(d_ins=d_ins, n_layers=len(d_ins) if not isinstance(d_ins, int) else 3, width=width,
                           architecture=arch, k=4 if arch == "topk" else None)
    cc = Crosscoder(cfg)
    with torch.no_grad():  # generic weights: unequal per-layer rows, nonzero biases
        for p in cc.parameters():
            p.normal_(0, 0.5)
    return cc


def layer_inputs(cc, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g) * (l + 1) for l, d in enumerate(cc.cfg.d_ins))


@torch.no_grad()
def naive(cc, xs):
    """Per-layer loop of the paper's equations, dense code."""
    d = cc.cfg.d_ins
    starts = np.cumsum([0, *d])
    W_enc = [cc.W_enc[starts[l]:starts[l + 1]] for l in range(len(d))]
    W_dec = [cc.W_dec[:, starts[l]:starts[l + 1]] for l in range(len(d))]
    b_dec = [cc.b_dec[starts[l]:starts[l + 1]] for l in range(len(d))]
    pre = cc.b_enc + sum((x - b) @ W for x, b, W in zip(xs, b_dec, W_enc))
    if cc.cfg.architecture == "topk":
        kth = pre.topk(cc.cfg.k, dim=1).values[:, -1:]
        z = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros(()))
    else:
        z = pre.relu()
    return z, tuple(z @ W + b for W, b in zip(W_dec, b_dec))


@pytest.mark.parametrize("arch", ["topk", "relu"])
@pytest.mark.parametrize("d_ins", [(5, 3, 4), (4, 4, 4)])
def test_forward_matches_per_layer_loop(arch, d_ins):
    cc = random_cc(arch, d_ins)
    xs = layer_inputs(cc)
    z_ref, xhat_ref = naive(cc, xs)
    with torch.no_grad():
        out = cc(xs)
        assert isinstance(out.x_hat, tuple) and len(out.x_hat) == 3
        for got, want in zip(out.x_hat, xhat_ref):
            assert_close(got, want)
        assert_close(cc.dense_latents(xs), z_ref)
        assert (z_ref > 0).sum(1).float().mean() > 1  # a nontrivial code
        if arch == "topk":
            assert out.top_indices.shape == (7, 4)
        if len(set(d_ins)) == 1:  # equal widths: a (B, L, d) tensor in, the same shape out
            stacked = torch.stack(xs, dim=1)
            assert_close(cc(stacked).x_hat, torch.stack(xhat_ref, dim=1))
            enc = cc.encode(stacked)
            assert_close(cc.decode(enc.top_acts, enc.top_indices), torch.stack(xhat_ref, dim=1))
            assert_close(cc(stacked.reshape(1, 7, 3, 4)).x_hat, torch.stack(xhat_ref, dim=1)[None])
        else:
            enc = cc.encode(xs)
            for got, want in zip(cc.decode(enc.top_acts, enc.top_indices), xhat_ref):
                assert_close(got, want)


def test_penalty_is_decoder_norm_sum_weighted():
    cc = random_cc("relu", width=6)
    xs = layer_inputs(cc, n=5)
    z, _ = naive(cc, xs)
    starts = np.cumsum([0, *cc.cfg.d_ins])
    W_dec = cc.W_dec.detach()
    want = 0.0
    for b in range(z.shape[0]):
        for i in range(cc.cfg.width):
            norm_sum = sum(float(W_dec[i, starts[l]:starts[l + 1]].norm()) for l in range(3))
            want += float(z[b, i]) * norm_sum
    fwd = crosscoder_train_forward(cc, torch.cat(xs, dim=1))
    assert_close(float(fwd.penalty.detach()), want, rtol=1e-5, atol=1e-5)
    assert_close(cc.decoder_norms()[2, 1], cc.W_dec[2, 5:8].norm())
    assert want > 0


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_fold_input_scale_per_layer(arch):
    cc = random_cc(arch)
    xs = layer_inputs(cc)
    s = (2.0, 0.5, 3.0)
    folded = cc.fold_input_scale(s)
    c = math.prod(s) ** (1 / 3)
    with torch.no_grad():
        ref = cc(tuple(x * v for x, v in zip(xs, s)))
        got = folded(xs)
        for l, v in enumerate(s):
            assert_close(got.x_hat[l], ref.x_hat[l] / v)
        assert_close(folded.dense_latents(xs), cc.dense_latents(tuple(x * v for x, v in zip(xs, s))) / c)
    # equal scales touch only the biases, as an SAE's fold does
    same = cc.fold_input_scale(2.0)
    assert torch.equal(same.W_dec, cc.W_dec) and torch.equal(same.W_enc, cc.W_enc)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_save_load_round_trip_through_load_dictionary(arch, tmp_path):
    cc = random_cc(arch)
    cc.save(tmp_path / "cc", extra_config={"hooks": ["a", "b", "c"]})
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert config["dictionary"] == "crosscoder" and config["d_ins"] == [5, 3, 4]
    back = load_dictionary(tmp_path / "cc")
    assert type(back) is Crosscoder and back.cfg == cc.cfg and back.lineage == {"hooks": ["a", "b", "c"]}
    for (n, a), (_, b) in zip(cc.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    TopKSAE(SAEConfig(d_in=5, width=8, k=2)).save(tmp_path / "sae")
    with pytest.raises(ValueError, match="'sae' dictionary, not a 'crosscoder'"):
        Crosscoder.load(tmp_path / "sae")
    assert type(load_dictionary(tmp_path / "sae")) is TopKSAE


@pytest.mark.parametrize("kw, msg", [
    (dict(d_ins=(4, 4), n_layers=3), r"2 widths \(4, 4\) but n_layers=3"),
    (dict(k=0), r"k=0 must satisfy 0 < k <= width=8"),
    (dict(k=9), r"k=9 must satisfy 0 < k <= width=8"),
    (dict(k=None), r"k=None must satisfy"),
    (dict(architecture="relu"), r"k=2 has no meaning for a relu crosscoder"),
    (dict(sparsity_coef=1.0), r"sparsity_coef=1.0 has no meaning for a topk"),
    (dict(hooks=("a", "b")), r"expected 3 non-empty hook names \(n_layers=3\)"),
    (dict(width=0), r"width=0"),
    (dict(architecture="gated"), r"'gated'"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CrosscoderConfig(**{**dict(d_ins=4, n_layers=3, width=8, k=2), **kw})


def test_batches_with_wrong_layers_or_widths_are_refused():
    cc = random_cc("topk", d_ins=(4, 4, 4))
    with pytest.raises(ValueError, match=r"got 2 layers but this crosscoder has n_layers=3"):
        cc((torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(ValueError, match=r"layer widths \(4, 5, 4\) do not match .* d_ins=\(4, 4, 4\)"):
        cc((torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 4)))
    with pytest.raises(ValueError, match=r"input shape \(2, 2, 4\) does not match .* n_layers=3"):
        cc(torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"layer widths \(4, 4, 5\) do not match"):
        crosscoder_metrics(cc, [(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 5))])
    with pytest.raises(ValueError, match=r"mean_norms has 2 values but init_batch has n_layers=3"):
        train_crosscoder([], CrosscoderTrainConfig(width=8, k=2, batch_size=4, n_train_tokens=8),
                         mean_norms=[1.0, 1.0], init_batch=torch.randn(4, 3, 4), progress=False)


def test_metrics_match_dense_formulas():
    cc = random_cc("topk")
    xs = layer_inputs(cc, n=50)
    halves = [tuple(x[:20] for x in xs), tuple(x[20:] for x in xs)]
    m = crosscoder_metrics(cc, halves)
    _, xhat = naive(cc, xs)
    err = [float((x.double() - h.double()).pow(2).sum()) for x, h in zip(xs, xhat)]
    var = [float((x.double() - x.double().mean(0)).pow(2).sum()) for x in xs]
    assert m.n_tokens == 50
    assert_close(m.fvu, sum(err) / sum(var))
    assert_close(m.fvu_per_layer, tuple(e / v for e, v in zip(err, var)))
    z, _ = naive(cc, xs)
    assert_close(m.l0, float((z != 0).sum(1).float().mean()))
    fires = (z != 0).sum(0).numpy()
    np.testing.assert_array_equal(m.fire_counts, fires)
    assert m.dead_fraction == float((fires == 0).mean()) and m.dense_fraction == float((fires > 5).mean())


# ---- training on known features ------------------------------------------------------------


def synthetic(seed=0, d=12, n_true=32, active=3, layer_scales=(1.0, 3.0, 0.5)):
    """Tokens made of `active` of `n_true` features; feature i writes a random direction of
    its own into each of 3 layers (layers on different scales)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = [F.normalize(torch.randn(n_true, d, generator=gen), dim=1) * s for s in layer_scales]

    def sample(n):
        c = torch.zeros(n, n_true)
        idx = torch.rand(n, n_true, generator=gen).argsort(dim=1)[:, :active]
        c.scatter_(1, idx, torch.rand(n, active, generator=gen) + 0.5)
        return tuple(c @ D + 0.01 * torch.randn(n, d, generator=gen) for D in dirs)

    return dirs, sample


@pytest.mark.parametrize("arch, extra, steps, max_fvu, min_mmcs", [
    ("topk", dict(k=4), 150, 0.05, 0.98),          # measured: FVU 0.013, MMCS 0.996
    ("relu", dict(sparsity_coef=1.0), 200, 0.15, 0.97),  # measured: FVU 0.079, MMCS 0.989
])
def test_recovers_shared_sparse_features(arch, extra, steps, max_fvu, min_mmcs):
    dirs, sample = synthetic()
    x0 = sample(2048)
    cfg = CrosscoderTrainConfig(width=64, architecture=arch, batch_size=256, n_train_tokens=256 * steps,
                                lr=1e-2, warmup_steps=10, dead_tokens=256 * 20, **extra)
    res = train_crosscoder((sample(256) for _ in range(10_000)), cfg, init_batch=x0, progress=False,
                           mean_norms=[float(x.norm(dim=1).mean()) for x in x0], hooks=("l0", "l1", "l2"))
    assert res.steps == steps and res.dictionary.cfg.hooks == ("l0", "l1", "l2")
    assert len(res.log[-1]["layer_fvu"]) == 3
    m = crosscoder_metrics(res.dictionary, [sample(4096)])
    # raw-space decoder directions (the fold put the layer scales back) vs the true ones
    true = F.normalize(torch.cat(dirs, 1), dim=1)
    mmcs = (true @ F.normalize(res.dictionary.W_dec.detach(), dim=1).T).max(1).values.mean()
    print(f"{arch}: FVU {m.fvu:.4f} per layer {[round(v, 4) for v in m.fvu_per_layer]} L0 {m.l0:.2f} "
          f"MMCS {float(mmcs):.4f}")
    assert m.fvu < max_fvu and max(m.fvu_per_layer) < 2 * max_fvu
    assert float(mmcs) > min_mmcs
    assert 0 < m.l0 <= (4 if arch == "topk" else 12)


def test_stacked_and_tuple_batches_train_alike_with_unit_concatenated_rows():
    _, sample = synthetic(seed=2)
    data = [sample(64) for _ in range(12)]
    cfg = CrosscoderTrainConfig(width=32, k=3, batch_size=64, n_train_tokens=64 * 12, lr=1e-2, warmup_steps=2)
    # one mean norm for every layer: equal scales, so folding leaves W_dec as trained
    kw = dict(mean_norms=[5.0] * 3, progress=False, log_every=4)
    as_tuples = train_crosscoder(iter(data), cfg, init_batch=data[0], **kw).dictionary
    as_stacked = train_crosscoder((torch.stack(xs, 1) for xs in data), cfg, init_batch=torch.stack(data[0], 1),
                                  **kw).dictionary
    for (n, a), (_, b) in zip(as_tuples.state_dict().items(), as_stacked.state_dict().items()):
        assert torch.equal(a, b), n
    # topk: each latent's concatenated decoder row has norm 1, its split over layers is learnt
    norms = as_tuples.decoder_norms().detach()
    assert_close(norms.pow(2).sum(1), torch.ones(32))
    assert float(norms.std(1).mean()) > 0.01


def test_nonfinite_loss_names_the_step():
    _, sample = synthetic()
    x0 = sample(256)

    def batches():
        for i in range(100):
            xs = sample(64)
            if i == 6:
                xs[1][3, 2] = float("nan")
            yield xs

    cfg = CrosscoderTrainConfig(width=16, k=2, batch_size=64, n_train_tokens=64 * 20, lr=1e-3)
    with pytest.raises(RuntimeError, match="not finite at step 6"):
        train_crosscoder(batches(), cfg, init_batch=x0, mean_norms=[1.0, 1.0, 1.0], progress=False, log_every=4)


# ---- real stores: N-store loader and resume ------------------------------------------------

N, H, P, D_A = 40, 8, 4, 6
T = (H // P) ** 2 + 1
IPC = 8


def hook_a(x):
    w = torch.randn(3 * P * P, D_A, generator=torch.Generator().manual_seed(1))
    tok = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, 3 * P * P) @ w
    return torch.cat([tok.mean(1, keepdim=True), tok], dim=1)


LAYERS = {  # hook -> (width, function of hook a): known maps, so alignment is checkable row by row
    "a": (D_A, lambda a: a),
    "b": (4, lambda a: torch.cat([2 * a[..., :3] + 1, a[..., 3:4] ** 2], dim=-1)),
    "c": (D_A, lambda a: -a.flip(-1) + 0.5),
}


def make_stores(root, lineage_c=None, chunk_c=IPC):
    images = zarr.create_array(store=str(root / "images.zarr"), shape=(N, H, H, 3), chunks=(16, H, H, 3),
                               dtype="uint8")
    images[:] = np.random.default_rng(0).integers(0, 256, (N, H, H, 3), dtype=np.uint8)
    stores = []
    for hook, (d, fn) in LAYERS.items():
        lineage = {"model": "syn", "dataset": "d0", "hook": f"blocks.{hook}"}
        if hook == "c" and lineage_c is not None:
            lineage = lineage_c
        ipc = chunk_c if hook == "c" else IPC
        lay = StoreLayout(N, T, d, images_per_shard=16, images_per_chunk=ipc, dtype="float32")
        path = root / f"{hook}.zarr"
        create_store(path, lay, lineage)
        for s in range(lay.n_shards):
            extract_shard(lambda x, h=hook, f=fn: {h: f(hook_a(x))}, images, {hook: path}, s, batch_size=16,
                          progress=False)
        stores.append(ActivationStore.open(path))
    return stores


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("multi"))


def test_multi_loader_aligns_rows_across_stores(stores):
    idx = np.arange(0, N, 3)  # 14 images over every chunk, 70 tokens
    loader = MultiShuffledLoader(stores, idx, batch_size=10, seed=5, buffer_chunks=2)
    assert loader.d_models == (6, 4, 6) and loader.hooks == ("blocks.a", "blocks.b", "blocks.c")
    want = stores[0].read(0, N)[torch.as_tensor(idx)].reshape(-1, D_A)
    for epoch in range(2):
        a, b, c = (torch.cat(xs) for xs in zip(*loader.epoch(epoch)))
        assert a.shape == (70, 6) and b.shape == (70, 4) and c.shape == (70, 6)
        assert_close(b, LAYERS["b"][1](a), rtol=1e-5, atol=1e-5)  # row by row: the same token
        assert_close(c, LAYERS["c"][1](a))
        key = lambda m: m.numpy()[np.lexsort(m.numpy().T[::-1])]
        np.testing.assert_array_equal(key(a), key(want))  # every token once
    it = iter(loader)
    for _ in range(9):  # past the 7-batch epoch boundary
        next(it)
    st, nxt = loader.state(), next(it)
    again = MultiShuffledLoader(stores, idx, batch_size=10, seed=5, buffer_chunks=2)
    again.load_state(st)
    for got, want_b in zip(next(iter(again)), nxt):
        assert torch.equal(got, want_b)


@pytest.mark.parametrize("kw, what", [
    (dict(lineage_c={"model": "other", "dataset": "d0"}), "lineage['model']: 'syn' vs 'other'"),
    (dict(chunk_c=4), "chunk_images: 8 vs 4"),
])
def test_multi_loader_refuses_mismatched_stores(tmp_path, kw, what):
    stores = make_stores(tmp_path, **kw)
    with pytest.raises(ValueError, match="do not hold the same tokens") as e:
        MultiShuffledLoader(stores, np.arange(32), batch_size=8, seed=0)
    assert what in str(e.value)
    assert str(stores[0].path) in str(e.value) and str(stores[2].path) in str(e.value)


class _Interrupt(Exception):
    pass


def _run(stores, arch, checkpoint_dir=None, stop_at=None, rows=None):
    extra = dict(k=2) if arch == "topk" else dict(sparsity_coef=0.5)
    # 10 batches per epoch, 34 steps: the interruption and the resume cross epoch boundaries
    cfg = CrosscoderTrainConfig(width=24, architecture=arch, batch_size=20, n_train_tokens=20 * 34, lr=3e-3,
                                warmup_steps=3, dead_tokens=60, aux_k=3, **extra)
    loader = MultiShuffledLoader(stores, np.arange(N), batch_size=20, seed=3, buffer_chunks=2)
    init_batch = next(iter(loader))
    loader.load_state((0, 0))

    def on_log(row):
        if rows is not None:
            rows.append(row["step"])
        if row["step"] == stop_at:
            raise _Interrupt

    return train_crosscoder(loader, cfg, mean_norms=loader.mean_norms, init_batch=init_batch, progress=False,
                            log_every=4, on_log=on_log, checkpoint_dir=checkpoint_dir,
                            checkpoint_every=8 if checkpoint_dir else 0)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_resume_reaches_identical_weights(stores, arch, tmp_path):
    reference = _run(stores, arch)
    assert reference.dictionary.cfg.hooks == ("blocks.a", "blocks.b", "blocks.c")
    with pytest.raises(_Interrupt):
        _run(stores, arch, tmp_path, stop_at=20)  # the state saved at step 16 survives
    rows = []
    resumed = _run(stores, arch, tmp_path, rows=rows)
    assert rows == [20, 24, 28, 32, 34]  # it went on from step 16, it did not start over
    ref_sd, got_sd = reference.dictionary.state_dict(), resumed.dictionary.state_dict()
    assert list(ref_sd) == list(got_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], got_sd[name]), name
    assert resumed.log == reference.log
    if arch == "topk":
        assert any(r["aux_loss"] > 0 for r in reference.log)  # AuxK took part in the resumed state


def test_resumable_run_needs_the_loader_itself(stores, tmp_path):
    cfg = CrosscoderTrainConfig(width=24, k=2, batch_size=20, n_train_tokens=200)
    loader = MultiShuffledLoader(stores, np.arange(N), batch_size=20, seed=3)
    common = dict(mean_norms=loader.mean_norms, init_batch=next(iter(loader)), progress=False, log_every=4)
    with pytest.raises(ValueError, match=r"state\(\)/load_state\(\)"):
        train_crosscoder(iter(loader), cfg, checkpoint_dir=tmp_path, checkpoint_every=8, **common)
    with pytest.raises(ValueError, match="checkpoint_every=6 must be a positive multiple of log_every=4"):
        train_crosscoder(loader, cfg, checkpoint_dir=tmp_path, checkpoint_every=6, **common)

