"""train_sae on synthetic data that truly is sparse, plus its pieces against references."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from analysis.evaluation.metrics import reconstruction_metrics
from analysis.dictionaries.training.schedule import remove_parallel_grad
from analysis.dictionaries import BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAEConfig, TopKSAE
from analysis.dictionaries.objectives import SelectedPre, sparse_decode
from analysis.dictionaries.training.sae import (THRESHOLD_TRAVEL, SAETrainConfig, SAEObjective, geometric_median,
                                                scale_encoder_to_fit, train_sae)

D, WIDTH, N_ATOMS, K_TRUE = 32, 128, 64, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse_data(n: int, seed: int = 0) -> torch.Tensor:
    """x = (K_TRUE-sparse nonnegative codes) @ random unit dictionary, with an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D, generator=torch.Generator().manual_seed(123))
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, N_ATOMS, generator=g).argsort(1)[:, :K_TRUE]
    codes = torch.zeros(n, N_ATOMS).scatter_(1, idx, 0.5 + 2 * torch.rand(n, K_TRUE, generator=g))
    return 3 * codes @ atoms + 1.0 + 0.01 * torch.randn(n, D, generator=g)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return _sparse_data(60_000)


def _cfg(**kw) -> SAETrainConfig:
    base = dict(width=WIDTH, k=4, batch_size=512, n_train_tokens=150_000, lr=3e-3, warmup_steps=10, dead_tokens=20_000)
    return SAETrainConfig(**{**base, **kw})


def _train(data, cfg, **kw):
    mean_norm = float(data.norm(dim=1).mean())
    return train_sae(
        itertools.cycle(data.split(cfg.batch_size)), D, cfg,
        mean_norm=mean_norm, init_batch=data[:2048], progress=False, log_every=25, **kw,
    )


def test_training_recovers_sparse_structure(data):
    rows, steps = [], []
    result = _train(data, _cfg(), on_log=rows.append, on_step=steps.append)
    assert result.steps == 150_000 // 512 and result.tokens == result.steps * 512
    assert rows == result.log and [r["step"] for r in rows][:2] == [25, 50]
    # a tracker's history: one row per step, whose window means are the log rows
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))
    assert steps[-1]["tokens"] == result.tokens and set(steps[0]) == {"step", "tokens", "loss", "sparsity_loss",
                                                                       "aux_loss", "l0"}
    assert np.mean([r["loss"] for r in steps[:25]]) == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert set(rows[0]) == {"step", "tokens", "loss", "sparsity_loss", "aux_loss", "l0", "dead_fraction", "lr",
                            "sparsity_coef"}
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    # the returned SAE works on RAW activations of held-out tokens
    held_out = _sparse_data(20_000, seed=1)
    m = reconstruction_metrics(result.dictionary, held_out.split(4096))
    assert m.fvu < 0.1, m.fvu
    # 64 true atoms for 128 latents leave half the dictionary spare: the least-squares init (TopK's
    # default) leaves 6 % of it unused here (FVU 0.038), W_dec.T 1.6 % (FVU 0.044); a collapse is far above
    assert m.dead_fraction <= 0.1, m.dead_fraction
    assert abs(m.l0 - 4) < 0.05
    assert_close(result.dictionary.W_dec.norm(dim=1), torch.ones(WIDTH))


# Per architecture: settings that reach the sparse structure in a few seconds, and the class.
# relu/jumprelu need a longer run: their L1/L0 penalty warms up and their thresholds move slowly.
ARCH_RUNS = {
    "batchtopk": (dict(architecture="batchtopk", k=4), BatchTopKSAE),
    "relu": (dict(architecture="relu", k=None, sparsity_coef=1.0, n_train_tokens=300_000), ReLUSAE),
    "jumprelu": (dict(architecture="jumprelu", k=None, sparsity_coef=0.3, n_train_tokens=300_000), JumpReLUSAE),
}


@pytest.mark.parametrize("arch", list(ARCH_RUNS))
def test_other_architectures_recover_sparse_structure(data, arch):
    kw, cls = ARCH_RUNS[arch]
    result = _train(data, _cfg(**kw))
    assert type(result.dictionary) is cls and result.dictionary.cfg.architecture == arch
    m = reconstruction_metrics(result.dictionary, _sparse_data(20_000, seed=1).split(4096))
    assert m.fvu < 0.1, m.fvu
    # the data has 2 active atoms per token: a sparse code needs a handful of latents, not dozens
    assert 1.5 < m.l0 < 8, m.l0
    assert m.dead_fraction < 0.25, m.dead_fraction
    if arch == "batchtopk":  # inference uses the estimated threshold (default decay); its L0 stays near k
        assert (result.dictionary.inference_threshold > 0).all() and abs(m.l0 - 4) < 0.5, m.l0
    if arch == "relu":  # the decoder norms are free (the L1 term is weighted by them)
        assert result.dictionary.W_dec.norm(dim=1).std() > 1e-3
    else:
        assert_close(result.dictionary.W_dec.norm(dim=1), torch.ones(WIDTH))
    if arch in ("relu", "jumprelu"):
        coefs = [r["sparsity_coef"] for r in result.log]
        assert coefs[0] < coefs[-1] == kw["sparsity_coef"] and result.log[-1]["sparsity_loss"] > 0


@pytest.mark.parametrize("arch", ["topk", *ARCH_RUNS])
def test_deterministic_for_a_seed(data, arch):
    small = data[:20_000]
    kw = {**ARCH_RUNS.get(arch, ({}, None))[0], "n_train_tokens": 20_480}
    a = _train(small, _cfg(**kw, seed=7))
    b = _train(small, _cfg(**kw, seed=7))
    c = _train(small, _cfg(**kw, seed=8))
    for (name, pa), (_, pb) in zip(a.dictionary.state_dict().items(), b.dictionary.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.dictionary.W_dec, c.dictionary.W_dec)
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]


def test_nan_loss_raises_naming_the_step(data):
    good = list(data[:2048].split(512))
    bad = data[:512].clone()
    bad[3, 5] = math.nan
    batches = good + [bad] + good  # steps 0-3 fine, step 4 poisoned
    cfg = _cfg(n_train_tokens=512 * 9)
    with pytest.raises(RuntimeError, match="at step 4"):
        train_sae(iter(batches), D, cfg, mean_norm=float(data.norm(dim=1).mean()),
                  init_batch=data[:1024], progress=False, log_every=3)


def test_auxk_runs_when_latents_are_dead(data):
    """With a tiny dead window most latents count as dead, so the AuxK loss must be active."""
    result = _train(data[:10_000], _cfg(width=256, n_train_tokens=10_240, dead_tokens=512, aux_k=8))
    assert any(r["aux_loss"] > 0 for r in result.log)
    assert all(0 <= r["dead_fraction"] <= 1 for r in result.log)


def test_uneven_batches_are_rechunked(data):
    cfg = _cfg(n_train_tokens=2000, batch_size=500)
    pieces = torch.split(data[:2100], [300, 700, 150, 950])
    result = train_sae(iter(pieces), D, cfg, mean_norm=5.0, init_batch=data[:500], progress=False)
    assert result.steps == 4 and result.tokens == 2000


def test_wrong_batch_width_is_rejected(data):
    with pytest.raises(ValueError, match=r"d_in=32\), got \(512, 31\)"):
        train_sae(iter([torch.randn(512, 31)]), D, _cfg(n_train_tokens=512), mean_norm=5.0,
                  init_batch=data[:100], progress=False)
    with pytest.raises(ValueError, match=r"width 31 but d_in=32"):
        train_sae(iter([data[:512]]), D, _cfg(n_train_tokens=512), mean_norm=5.0,
                  init_batch=torch.randn(100, 31), progress=False)


def test_sparsity_warmup_schedule():
    cfg = SAETrainConfig(width=64, architecture="relu", batch_size=10, n_train_tokens=2000)
    assert cfg.k is None and cfg.sparsity_coef_at(0, 5.0) == pytest.approx(5.0 / 10)  # 5 % of 200 steps
    assert cfg.sparsity_coef_at(9, 5.0) == cfg.sparsity_coef_at(150, 5.0) == 5.0
    assert SAETrainConfig(width=64).k == 32  # the TopK default is resolved into the config


def test_hand_written_gradients_match_autograd():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=8, width=32, k=4)).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, 8, dtype=torch.double)

    def custom():
        with torch.no_grad():
            xc = x - sae.b_dec
            vals, idx = torch.addmm(sae.b_enc, xc, sae.W_enc).topk(4, sorted=False)
        acts = SelectedPre.apply(xc, sae.W_enc, sae.b_enc, sae.b_dec, idx, vals).relu()
        return (sparse_decode(acts, idx, sae.W_dec) + sae.b_dec - x).pow(2).sum()

    def reference():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = pre.relu().topk(4)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        return (z @ sae.W_dec + sae.b_dec - x).pow(2).sum()

    grads = []
    for f in (custom, reference):
        sae.zero_grad()
        f().backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[1]:
        assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["W_enc"].stride() == sae.W_enc.stride()


def test_bf16_selection_trains_as_well_as_fp32(data):
    """autocast="bfloat16" (bf16 latent choice, fp32 values) reaches the fp32 run's quality."""
    held_out = _sparse_data(20_000, seed=1).split(4096)
    fp32 = reconstruction_metrics(_train(data, _cfg(autocast="off")).dictionary, held_out)
    bf16 = reconstruction_metrics(_train(data, _cfg(autocast="bfloat16")).dictionary, held_out)
    assert bf16.fvu < 0.1 and abs(bf16.fvu - fp32.fvu) < 0.01, (bf16.fvu, fp32.fvu)
    assert bf16.dead_fraction <= 0.05 and abs(bf16.l0 - 4) < 0.05


def test_autocast_resolution():
    assert SAETrainConfig(width=64).low_precision("cpu") is None  # auto: fp32 on CPU
    assert SAETrainConfig(width=64).low_precision("cuda") is torch.bfloat16  # no GPU needed to resolve
    assert SAETrainConfig(width=64, autocast="off").low_precision("cuda") is None
    assert SAETrainConfig(width=64, autocast="bfloat16").low_precision("cpu") is torch.bfloat16


def test_remove_parallel_grad_leaves_the_tangent_part():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(10, 6), dim=1))
    W.grad = torch.randn(10, 6)
    tangent = W.grad - (W.grad * W).sum(1, keepdim=True) * W
    remove_parallel_grad(W)
    assert_close(W.grad, tangent)
    assert_close((W.grad * W).sum(1), torch.zeros(10), atol=1e-6, rtol=0)


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(900, 4) * 0.1 + 2.0, torch.full((100, 4), 1000.0)])
    med = geometric_median(x)
    assert (med - 2.0).abs().max() < 0.1
    assert (x.mean(0) - 2.0).abs().max() > 50  # the mean would have been dragged away


def test_lr_schedule():
    cfg = SAETrainConfig(width=2**16, batch_size=10, n_train_tokens=1000, warmup_steps=10)
    # 4e-4 / sqrt(width / 2**14) for every family, 4x that for TopK, BatchTopK and JumpReLU SAEs (LR_FACTOR)
    assert cfg.base_lr() == pytest.approx(1.6e-3 / 2)
    for arch, knob, factor in (("batchtopk", {"k": 8}, 4), ("relu", {}, 1), ("jumprelu", {}, 4)):
        other = SAETrainConfig(width=2**16, architecture=arch, batch_size=10, n_train_tokens=1000, **knob)
        assert other.base_lr() == pytest.approx(factor * 4e-4 / 2) and other.resolved()["lr"] == other.base_lr()
    assert cfg.lr_at(0) == pytest.approx(cfg.base_lr() / 10)
    assert cfg.lr_at(50) == pytest.approx(cfg.base_lr())
    assert cfg.lr_at(90) == pytest.approx(cfg.base_lr() * 0.5)
    assert cfg.lr_at(99) < cfg.lr_at(90)
    assert SAETrainConfig(width=64, lr_decay=False, batch_size=10, n_train_tokens=100).lr_at(99) > 0
    # unset, the warm-up is 5 % of the run: 25 of 500 steps, and at least one step
    default = SAETrainConfig(width=2**16, batch_size=10, n_train_tokens=5000)
    assert default.warmup() == 25 and default.lr_at(24) == pytest.approx(default.base_lr())
    assert default.lr_at(11) == pytest.approx(default.base_lr() * 12 / 25)
    assert SAETrainConfig(width=64, batch_size=10, n_train_tokens=100).warmup() == 1
    # BatchTopK's threshold mean has a time constant of 5 % of the run too: 25 steps of 500
    batch = SAETrainConfig(width=64, k=4, architecture="batchtopk", batch_size=10, n_train_tokens=5000)
    assert batch.threshold_ema_decay() == pytest.approx(1 - 1 / 25)
    assert batch.resolved()["threshold_decay"] == pytest.approx(1 - 1 / 25)


def test_jumprelu_thresholds_can_travel_over_a_short_run(data):
    """Adam moves a log-threshold by about its learning rate per step, so at the shared rate a
    short run cannot take it far from its initial value; by default its rate is at least
    THRESHOLD_TRAVEL / steps."""
    # 50 steps from the fixed initial threshold (the least-squares init starts them from the data)
    kw = dict(architecture="jumprelu", k=None, sparsity_coef=0.3, n_train_tokens=25_600, encoder_init="transpose")
    cfg = _cfg(**kw)
    assert cfg.threshold_learning_rate() == pytest.approx(THRESHOLD_TRAVEL / 50) and cfg.base_lr() == 3e-3
    assert cfg.resolved()["threshold_lr"] == cfg.threshold_learning_rate()
    assert "threshold_lr" not in _cfg().resolved()  # other architectures' ids do not carry it
    long_run = _cfg(**{**kw, "n_train_tokens": 512 * 10_000})
    assert long_run.threshold_learning_rate() == long_run.base_lr()
    moved = {}
    for lr in (None, 3e-3):
        sae = _train(data[:20_000], _cfg(**kw, threshold_lr=lr)).dictionary
        # back at training scale (inputs scaled to norm sqrt(D)), where log θ started at log(0.5)
        log_theta = sae.log_threshold.detach() + math.log(math.sqrt(D) / float(data.norm(dim=1).mean()))
        moved[lr] = float((log_theta - math.log(0.5)).abs().max())
    budget = sum(cfg.lr_at(step) for step in range(50))  # what Adam can move at the shared rate
    assert moved[3e-3] <= 1.5 * budget, (moved, budget)
    assert moved[None] > 3 * moved[3e-3], moved


@pytest.mark.parametrize("kw, msg", [
    (dict(width=8, k=9), "k=9"),
    (dict(width=64, batch_size=0), "batch_size=0"),
    (dict(width=64, n_train_tokens=10, batch_size=20), "n_train_tokens=10"),
    (dict(width=64, lr=-1.0), "lr=-1.0"),
    (dict(width=64, aux_k=0), "aux_k=0"),
    (dict(width=64, k=0), "k=0"),
    (dict(width=64, architecture="relu", k=8), "k=8 has no meaning for architecture='relu'"),
    (dict(width=64, architecture="jumprelu", sparsity_coef=-1.0), "sparsity_coef=-1.0"),
    (dict(width=64, architecture="topk", sparsity_coef=1.0), "sparsity_coef=1.0 has no meaning"),
    (dict(width=64, sparsity_warmup_steps=-1), "sparsity_warmup_steps=-1"),
    (dict(width=64, threshold_decay=1.0), "threshold_decay=1.0"),
    (dict(width=64, threshold_lr=0.01), "threshold_lr=0.01 has no meaning for architecture='topk'"),
    (dict(width=64, architecture="jumprelu", threshold_lr=0.0), "threshold_lr=0.0 must be > 0"),
    (dict(width=64, autocast="float16"), "autocast='float16'"),
    (dict(width=64, encoder_init="orthogonal"), "encoder_init='orthogonal'"),
    (dict(width=64, architecture="jumprelu", threshold_init=1.0), "thresholds start from the init batch"),
    (dict(width=64, architecture="jumprelu", initial_l0=64), r"initial_l0=64 must be in \(0, width=64\)"),
    (dict(width=64, architecture="jumprelu", initial_l0=0), r"initial_l0=0 must be in"),
    (dict(width=64, initial_l0=8), "initial_l0=8 has no meaning for architecture='topk'"),
    (dict(width=64, architecture="jumprelu", encoder_init="transpose", initial_l0=8), "initial_l0=8 has no meaning"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SAETrainConfig(**kw)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_held_out_fvu_is_logged_and_equals_the_formula_at_the_end(data, arch):
    held_out = _sparse_data(2000, seed=7)
    res = _train(data, _cfg(architecture=arch), eval_tokens=held_out)
    rows = [r for r in res.log if "eval_fvu" in r]
    assert len(rows) == len(res.log) and rows[-1]["eval_fvu"] < rows[0]["eval_fvu"]
    assert all(math.isfinite(r["eval_fvu"]) and r["eval_l0"] > 0 for r in rows)
    if arch == "topk":  # the training-time code IS the inference code: the last row is the metric
        final = reconstruction_metrics(res.dictionary, [held_out]).fvu
        assert rows[-1]["eval_fvu"] == pytest.approx(final, rel=1e-3)
    with pytest.raises(ValueError, match="eval_tokens"):
        _train(data, _cfg(architecture=arch), eval_tokens=held_out[:, :3])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_a_least_squares_encoder_init_fits_the_first_reconstruction_with_the_same_latents(data, arch):
    """`encoder_init='least_squares'`: the first code keeps its latents, and its reconstruction of
    the init batch gets the scale least squares gives it (the residual is orthogonal to the code's
    part, so the first FVU can only fall), where W_enc = W_dec.T overshoots."""
    from analysis.dictionaries.objectives import train_forward

    mean_norm = float(data.norm(dim=1).mean())
    knob = {"k": 4} if arch != "relu" else {"k": None}
    made = {init: SAEObjective(D, _cfg(architecture=arch, encoder_init=init, **knob), mean_norm=mean_norm,
                               init_batch=data[:2048]) for init in ("transpose", "least_squares")}
    x = data[:2048] * made["transpose"].scale
    with torch.no_grad():
        first = {init: train_forward(o.model, x) for init, o in made.items()}
        fitted = made["least_squares"].model
        code_part = first["least_squares"].x_hat - fitted.b_dec
        assert float((code_part * (x - first["least_squares"].x_hat)).sum()) == pytest.approx(
            0, abs=1e-4 * float((code_part * code_part).sum()))
        fvu = {init: float(((f.x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()) for init, f in first.items()}
        assert fvu["least_squares"] < fvu["transpose"]
        chosen = {init: _training_code_latents(o.model, x) for init, o in made.items()}
    assert torch.equal(chosen["least_squares"], chosen["transpose"])
    # an already fitted encoder is left as it is; `transpose` (the one init before the option
    # existed, and still the default but for TopK) leaves the ids of dictionaries trained then
    assert scale_encoder_to_fit(fitted, x) == pytest.approx(1.0, rel=1e-4)
    assert "encoder_init" not in _cfg(architecture=arch, encoder_init="transpose", **knob).resolved()
    assert _cfg(architecture=arch, encoder_init="least_squares", **knob).resolved()["encoder_init"] == "least_squares"
    default = _cfg(architecture=arch, **knob)
    assert default.encoder_init == ("transpose" if arch == "relu" else "least_squares")
    assert ("encoder_init" in default.resolved()) == (arch != "relu")
    assert "initial_l0" not in default.resolved()


def test_a_least_squares_jumprelu_starts_every_latent_on_the_same_number_of_tokens(data):
    """JumpReLU's least-squares init: each threshold is set so that every latent fires on
    round(n x initial_l0 / width) of the init batch's n tokens (none starts dead, the first code
    has initial_l0 latents per token), then encoder and thresholds are scaled together, which
    keeps those latents and gives the first reconstruction its least-squares scale."""
    from analysis.dictionaries.objectives import train_forward
    from analysis.dictionaries.training.sae import JUMPRELU_INITIAL_L0, start_thresholds_at_l0

    mean_norm = float(data.norm(dim=1).mean())
    kw = dict(architecture="jumprelu", k=None, initial_l0=8)
    cfg = _cfg(**kw)
    assert cfg.encoder_init == "least_squares" and cfg.resolved()["initial_l0"] == 8
    assert _cfg(architecture="jumprelu", k=None).resolved()["initial_l0"] == JUMPRELU_INITIAL_L0
    assert "initial_l0" not in _cfg(architecture="jumprelu", k=None, encoder_init="transpose").resolved()
    fitted = SAEObjective(D, cfg, mean_norm=mean_norm, init_batch=data[:2048])
    plain = SAEObjective(D, _cfg(architecture="jumprelu", k=None, encoder_init="transpose"), mean_norm=mean_norm,
                         init_batch=data[:2048])
    x = data[:2048] * fitted.scale
    with torch.no_grad():
        fires = fitted.model.pre_acts(x) > fitted.model.threshold
        assert (fires.sum(0) == round(2048 * 8 / WIDTH)).all()  # 128 tokens per latent
        assert float(fires.sum(1).float().mean()) == pytest.approx(8, rel=0.01)
        # the same thresholds on the unscaled (W_dec.T) encoder choose the same latents
        start_thresholds_at_l0(plain.model, x, 8)
        assert torch.equal(plain.model.pre_acts(x) > plain.model.threshold, fires)
        assert not torch.equal(plain.model.W_enc, fitted.model.W_enc)
        first = train_forward(fitted.model, x)
        code_part = first.x_hat - fitted.model.b_dec
        assert float((code_part * (x - first.x_hat)).sum()) == pytest.approx(
            0, abs=1e-4 * float((code_part * code_part).sum()))
        assert scale_encoder_to_fit(fitted.model, x) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="init_batch has 1 token"):
        SAEObjective(D, cfg, mean_norm=mean_norm, init_batch=data[:1])


def _training_code_latents(sae, x: torch.Tensor) -> torch.Tensor:
    """Which latents the training-time code of each row uses (a boolean (B, width) mask)."""
    if sae.cfg.architecture == "relu":
        return sae.dense_latents(x) > 0
    out = sae.encode_batch(x) if sae.cfg.architecture == "batchtopk" else sae.encode(x)
    mask = torch.zeros(x.shape[0], sae.cfg.width, dtype=torch.bool)
    return mask.scatter_(1, out.top_indices, out.top_acts > 0)
