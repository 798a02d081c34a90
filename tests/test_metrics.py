"""Metric definitions against naive numpy/torch computations (DESIGN.md §4)."""

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from analysis.evaluation.downstream import downstream_metrics
from analysis.evaluation.metrics import reconstruction_metrics
from analysis.dictionaries import SAEConfig, TopKSAE


class _Out(NamedTuple):
    x_hat: torch.Tensor
    top_acts: torch.Tensor
    top_indices: torch.Tensor


class _StubSAE:
    """x_hat = f(x); one latent (id 0) fires on every token."""

    def __init__(self, f, width=4):
        self.f, self.cfg = f, SimpleNamespace(width=width)

    def __call__(self, x):
        n = x.shape[0]
        return _Out(self.f(x), torch.ones(n, 1), torch.zeros(n, 1, dtype=torch.int64))


def _batches(seed=0, n=1000, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 5.0  # far from zero on purpose
    return list(x.split(137))  # uneven last batch


def _random_sae(d=8, width=32, k=3):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=d, width=width, k=k))
    with torch.no_grad():
        sae.b_dec.fill_(5.0)
        sae.b_enc.fill_(0.5)  # every pre-activation is comfortably positive for some latents
    return sae


def test_fvu_and_friends_match_naive_numpy():
    batches = _batches()
    sae = _random_sae()
    m = reconstruction_metrics(sae, batches)
    x = torch.cat(batches).double().numpy()
    with torch.no_grad():
        x_hat = sae(torch.cat(batches)).x_hat.double().numpy()
    err = ((x - x_hat) ** 2).sum()
    fvu = err / ((x - x.mean(0)) ** 2).sum()
    assert m.n_tokens == 1000
    assert m.fvu == pytest.approx(fvu, rel=1e-9)
    assert m.explained_variance == pytest.approx(1 - fvu, rel=1e-9)
    assert m.mse == pytest.approx(err / x.size, rel=1e-9)
    norms, hat_norms = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    assert m.cosine == pytest.approx(((x * x_hat).sum(1) / (norms * hat_norms)).mean(), rel=1e-9)
    assert m.shrinkage == pytest.approx((hat_norms / norms).mean(), rel=1e-9)


def test_perfect_reconstruction_gives_fvu_zero():
    m = reconstruction_metrics(_StubSAE(lambda x: x.clone()), _batches())
    assert m.fvu == 0.0 and m.explained_variance == 1.0 and m.mse == 0.0
    assert m.cosine == pytest.approx(1.0) and m.shrinkage == pytest.approx(1.0)


def test_predicting_the_mean_gives_fvu_one_not_variance_from_zero():
    batches = _batches()
    mu = torch.cat(batches).double().mean(0)
    m = reconstruction_metrics(_StubSAE(lambda x: mu.expand(x.shape[0], -1).clone()), batches)
    assert m.fvu == pytest.approx(1.0, rel=1e-9)
    # predicting zero is far worse than 1 because the data sit around 5, not 0
    m0 = reconstruction_metrics(_StubSAE(torch.zeros_like), batches)
    assert m0.fvu > 5


def test_l0_equals_k_for_topk_with_positive_activations():
    sae = _random_sae(k=3)
    m = reconstruction_metrics(sae, _batches())
    with torch.no_grad():
        assert (sae.encode(torch.cat(_batches())).top_acts > 0).all()
    assert m.l0 == pytest.approx(3.0)
    assert m.fire_counts.sum() == 3 * 1000


def test_dead_and_dense_counts_on_a_constructed_example():
    # 10 tokens, width 6: latent 0 fires on all, latent 1 on one token, latent 2 on two, 3-5 never.
    acts = torch.tensor([[1.0, 0.0]] * 10)
    idx = torch.zeros(10, 2, dtype=torch.int64)
    acts[0, 1], idx[0, 1] = 2.0, 1
    acts[1, 1], idx[1, 1] = 2.0, 2
    acts[2, 1], idx[2, 1] = 2.0, 2
    idx[3:, 1] = 5  # selected but zero activation: not a firing

    class Fixed:
        cfg = SimpleNamespace(width=6)

        def __call__(self, x):
            return _Out(x, acts, idx)

    m = reconstruction_metrics(Fixed(), [torch.randn(10, 3)], dense_threshold=0.15)
    assert m.fire_counts.tolist() == [10, 1, 2, 0, 0, 0]
    assert m.dead_fraction == pytest.approx(3 / 6)
    assert m.dense_fraction == pytest.approx(2 / 6)  # latent 0 (100 %) and latent 2 (20 %) > 15 %
    assert m.l0 == pytest.approx(13 / 10)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(_StubSAE(lambda x: x), [])


# ---- downstream -------------------------------------------------------------------------


class TinyHookedModel(nn.Module):
    """Pixels -> tokens (linear) -> hook "mid" -> MLP -> mean-pool -> logits; same hook protocol as HookedViT."""

    def __init__(self, d=8, n_classes=5, tokens=4):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(12, d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, n_classes)
        self._hooks = None

    def _mid(self, x):
        return self.embed(x.reshape(x.shape[0], self.tokens, -1)) + 1.0

    def _rest(self, mid):
        return self.head((mid + self.mlp(mid)).mean(1))

    def forward(self, x):
        return self._rest(self._mid(x))

    def run_with_hooks(self, x, *, fwd_hooks):
        mid = self._mid(x)
        for name, fn in fwd_hooks:
            assert name == "mid"
            out = fn(mid, hook=SimpleNamespace(name=name))
            mid = mid if out is None else out
        return self._rest(mid)


def _image_batches(n=40, bs=16):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 2, 8, generator=g)  # (B, C, H, W); 48 numbers = 4 tokens of 12
    y = torch.randint(0, 5, (n,), generator=g)
    return list(zip(x.split(bs), y.split(bs)))


def test_exact_splice_recovers_all_loss():
    torch.manual_seed(0)
    model = TinyHookedModel()
    m = downstream_metrics(model, _StubSAE(lambda x: x.clone()), "mid", _image_batches())
    assert m.n_images == 40
    assert m.ce_spliced == pytest.approx(m.ce_clean, abs=1e-6)
    assert m.kl_spliced == pytest.approx(0.0, abs=1e-7)
    assert m.acc_spliced == m.acc_clean
    assert m.ablation_gap == pytest.approx(m.ce_ablated - m.ce_clean)
    assert m.loss_recovered == pytest.approx(1.0, abs=1e-4)


def test_ablation_numbers_equal_a_direct_computation():
    torch.manual_seed(0)
    model = TinyHookedModel()
    sae = _random_sae(d=8, width=32, k=3)
    batches = _image_batches()
    m = downstream_metrics(model, sae, "mid", batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        mid = model._mid(x)
        clean = model._rest(mid).double()
        ablated = model._rest(torch.zeros_like(mid)).double()
        spliced = model._rest(sae(mid.reshape(-1, 8)).x_hat.reshape(mid.shape)).double()
    logp = clean.log_softmax(-1)
    for name, logits in [("ablated", ablated), ("spliced", spliced)]:
        ce = F.cross_entropy(logits, y).item()
        kl = (logp.exp() * (logp - logits.log_softmax(-1))).sum(-1).mean().item()
        assert getattr(m, f"ce_{name}") == pytest.approx(ce, rel=1e-6)
        assert getattr(m, f"kl_{name}") == pytest.approx(kl, rel=1e-6, abs=1e-9)
        assert getattr(m, f"acc_{name}") == (logits.argmax(-1) == y).double().mean().item()
    ce_clean = F.cross_entropy(clean, y).item()
    assert m.ce_clean == pytest.approx(ce_clean, rel=1e-6)
    assert m.ablation_gap == pytest.approx(m.ce_ablated - ce_clean, rel=1e-6)
    assert m.loss_recovered == pytest.approx((m.ce_ablated - m.ce_spliced) / (m.ce_ablated - ce_clean), rel=1e-9)


def test_downstream_with_the_real_hooked_vit():
    from analysis.models.vit import HookedViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, in_chans=1, d_model=16, n_layers=1, n_heads=2, d_mlp=32, n_classes=3)
    model = HookedViT(cfg).eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(6, 1, 16, 16, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    hook = "blocks.0.hook_resid_post"
    exact = downstream_metrics(model, _StubSAE(lambda x: x.clone()), hook, batches)
    assert exact.kl_spliced == pytest.approx(0.0, abs=1e-9)
    assert exact.ce_spliced == pytest.approx(exact.ce_clean, abs=1e-9)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        zeroed = model.run_with_hooks(x, fwd_hooks=[(hook, lambda a, *, hook: torch.zeros_like(a))])
        assert_close(exact.ce_ablated, F.cross_entropy(zeroed.double(), y).item(), rtol=1e-6, atol=1e-9)
    sae = TopKSAE(SAEConfig(d_in=16, width=64, k=4))
    m = downstream_metrics(model, sae, hook, batches)
    assert m.n_images == 12 and m.kl_spliced > 0


class _ExactMLPTranscoder(nn.Module):
    """A stand-in transcoder whose prediction IS the block's MLP output (y_hat = MLP(LN2(x)))."""

    def __init__(self, block, width=8):
        super().__init__()
        self.block, self.cfg = block, SimpleNamespace(width=width)

    def forward(self, x):
        y = self.block.mlp(self.block.ln2(x))
        idx = torch.arange(2).expand(x.shape[0], 2)
        return SimpleNamespace(y_hat=y, top_acts=torch.ones(x.shape[0], 2), top_indices=idx)


def test_transcoder_splice_of_the_exact_mlp_equals_clean_and_of_zero_equals_ablated():
    from analysis.evaluation.metrics import prediction_metrics
    from analysis.evaluation.downstream import spliced_downstream_metrics, transcoder_splice_hooks
    from analysis.models.vit import HookedViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, in_chans=1, d_model=16, n_layers=2, n_heads=2, d_mlp=32, n_classes=3)
    model = HookedViT(cfg).eval()
    x = torch.randn(12, 1, 16, 16)
    batches = [(x[:6], torch.tensor([0, 1, 2, 0, 1, 2])), (x[6:], torch.tensor([2, 2, 1, 0, 0, 1]))]
    exact = _ExactMLPTranscoder(model.blocks[1])
    hooks = transcoder_splice_hooks(exact, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    m = spliced_downstream_metrics(model, hooks, "blocks.1.hook_mlp_out", batches)
    assert m.ce_spliced == pytest.approx(m.ce_clean, abs=1e-6) and m.kl_spliced == pytest.approx(0.0, abs=1e-7)
    assert m.ce_ablated != pytest.approx(m.ce_clean)  # the MLP matters, so the check above can fail

    zero = _ExactMLPTranscoder(model.blocks[1])
    zero.forward = lambda x: SimpleNamespace(y_hat=torch.zeros(x.shape[0], 16), top_acts=torch.zeros(x.shape[0], 1),
                                             top_indices=torch.zeros(x.shape[0], 1, dtype=torch.long))
    hooks = transcoder_splice_hooks(zero, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    m0 = spliced_downstream_metrics(model, hooks, "blocks.1.hook_mlp_out", batches)
    assert m0.ce_spliced == pytest.approx(m0.ce_ablated, abs=1e-9) and m0.loss_recovered == pytest.approx(0.0, abs=1e-9)

    # reading a hook that runs AFTER the replaced one is an error, not a silent stale value
    backwards = transcoder_splice_hooks(exact, "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid")
    with pytest.raises(RuntimeError, match="ran before"):
        spliced_downstream_metrics(model, backwards, "blocks.1.hook_resid_mid", batches)

    # prediction metrics of the exact transcoder: FVU 0 against the true MLP output
    cache = {}
    with torch.no_grad():
        model.run_with_hooks(x, fwd_hooks=[(n, lambda a, hook, n=n: cache.__setitem__(n, a.clone()))
                                           for n in ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")])
    pm = prediction_metrics(exact, [(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_mlp_out"])])
    assert pm.fvu == pytest.approx(0.0, abs=1e-10) and pm.l0 == 2.0


@pytest.mark.parametrize("positions", [slice(1, None), (0, 2, 3)])
def test_splice_and_ablation_touch_only_the_dictionarys_token_positions(positions):
    """A dictionary trained on some tokens (patches only, registers dropped) replaces only those:
    the other tokens keep their clean values in the spliced and the ablated pass alike."""
    from analysis.evaluation.downstream import (
        crosscoder_splice_hooks,
        spliced_downstream_metrics,
        transcoder_splice_hooks,
    )
    from analysis.models.vit import HookedViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, in_chans=1, d_model=16, n_layers=2, n_heads=2, d_mlp=32,
                    n_classes=3, n_registers=1)  # tokens: CLS, register, 4 patches
    model = HookedViT(cfg).eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(6, 1, 16, 16, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    kept = list(range(6))[positions] if isinstance(positions, slice) else list(positions)
    hook = "blocks.0.hook_resid_post"
    sae = TopKSAE(SAEConfig(d_in=16, width=64, k=4))

    def naive(replace):  # the hook's tokens at `kept` replaced by replace(clean tokens there)
        def fn(a, *, hook):
            out = a.clone()
            out[:, kept] = replace(a[:, kept].reshape(-1, 16)).reshape(a.shape[0], len(kept), 16)
            return out
        with torch.no_grad():
            return F.cross_entropy(model.run_with_hooks(x, fwd_hooks=[(hook, fn)]).double(), y).item()

    m = downstream_metrics(model, sae, hook, batches, positions=positions)
    assert m.ce_spliced == pytest.approx(naive(lambda t: sae(t).x_hat), rel=1e-6)
    assert m.ce_ablated == pytest.approx(naive(torch.zeros_like), rel=1e-6)
    everywhere = downstream_metrics(model, sae, hook, batches)
    assert m.ce_ablated != pytest.approx(everywhere.ce_ablated)  # the restriction is real

    # a transcoder and a crosscoder that reproduce their targets exactly recover all the loss
    exact = _ExactMLPTranscoder(model.blocks[1])
    hooks = transcoder_splice_hooks(exact, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", positions=positions)
    mt = spliced_downstream_metrics(model, hooks, "blocks.1.hook_mlp_out", batches, positions=positions)
    assert mt.ce_spliced == pytest.approx(mt.ce_clean, abs=1e-6)
    layers = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    identity = lambda acts: SimpleNamespace(x_hat=[a.clone() for a in acts])  # noqa: E731
    mc = spliced_downstream_metrics(model, crosscoder_splice_hooks(model, identity, layers, positions=positions),
                                    layers, batches, positions=positions)
    assert mc.ce_spliced == pytest.approx(mc.ce_clean, abs=1e-6) and mc.ablation_gap > 0
    # one layer alone: a crosscoder that reconstructs zeros, spliced into layer 0 only, is the
    # ablation of layer 0 only (layer 1 then sees what the edit caused, instead of being overwritten)
    zeros = lambda acts: SimpleNamespace(x_hat=[torch.zeros_like(a) for a in acts])  # noqa: E731
    only0 = spliced_downstream_metrics(
        model, crosscoder_splice_hooks(model, zeros, layers, positions=positions, splice=layers[:1]), layers[:1],
        batches, positions=positions)
    assert only0.ce_spliced == pytest.approx(only0.ce_ablated, rel=1e-9) and only0.loss_recovered == pytest.approx(0)
    assert only0.ce_ablated == pytest.approx(naive(torch.zeros_like), rel=1e-6)  # hook is layer 0
    with pytest.raises(ValueError, match="reconstructs only"):
        crosscoder_splice_hooks(model, zeros, layers, splice=["blocks.0.hook_mlp_out"])


def test_embedding_cosine_against_a_direct_computation():
    """cos_spliced / cos_ablated: the mean cosine of hook_pooled (what the head reads) between the
    clean pass and the spliced / zero-ablated one, per image."""
    from analysis.models.vit import HookedViT, ViTConfig

    torch.manual_seed(0)
    model = HookedViT(ViTConfig(image_size=16, patch_size=8, in_chans=3, d_model=16, n_layers=2, n_heads=2,
                                d_mlp=32, n_classes=4)).eval()
    x, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    hook = "blocks.0.hook_resid_post"
    identity = downstream_metrics(model, _StubSAE(lambda a: a), hook, [(x, labels)])
    assert identity.cos_spliced == pytest.approx(1.0) and identity.loss_recovered == pytest.approx(1.0)
    halved = downstream_metrics(model, _StubSAE(lambda a: a / 2), hook, [(x[:4], labels[:4]), (x[4:], labels[4:])])
    seen = {}
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=["hook_pooled"])
        model.run_with_hooks(x, fwd_hooks=[(hook, lambda a, hook: a / 2),  # the spliced pass, read directly
                                           ("hook_pooled", lambda a, hook: seen.setdefault("p", a.detach()))])
    want = F.cosine_similarity(clean["hook_pooled"].double(), seen["p"].double(), dim=-1).mean()
    assert halved.cos_spliced == pytest.approx(float(want), rel=1e-6) and -1 <= halved.cos_ablated <= 1
    no_pooled_hook = downstream_metrics(TinyHookedModel(), _StubSAE(lambda a: a), "mid", _image_batches())
    assert np.isnan(no_pooled_hook.cos_spliced)  # a model without hook_pooled: NaN, stored as NULL
