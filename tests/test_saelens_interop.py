"""SAELens on-disk interop: our SAE → SAELens folder → our SAE, the cfg.json schema, and a
hand-written SAELens folder checked against a naive forward pass computed here."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from analysis.dictionaries import ARCHITECTURES, SAEConfig, build_sae
from analysis.dictionaries.saelens import export_saelens, import_saelens

D, WIDTH, K = 16, 64, 5


def _random_sae(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D, width=WIDTH, k=K if arch in ("topk", "batchtopk") else None, architecture=arch)
    sae = build_sae(cfg)
    with torch.no_grad():  # nonzero biases and thresholds so their handling is exercised
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        if arch == "batchtopk":
            sae.inference_threshold.fill_(0.4)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(WIDTH).uniform_(0.1, 1.0).log())
    sae.lineage = {"hook": "blocks.3.hook_resid_post", "store_lineage": {"model": "vit-tiny"}}
    return sae


def _naive_saelens(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's inference forward from its documented format, dense and unoptimised."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        z = pre.relu()
    elif cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > w["threshold"])
    else:
        raise AssertionError(cfg["architecture"])
    return z @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_gives_identical_outputs(arch, tmp_path):
    sae = _random_sae(arch)
    x = torch.randn(200, D) * 2
    export_saelens(sae, tmp_path)
    back = import_saelens(tmp_path)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    assert back.lineage == sae.lineage
    for name, t in sae.state_dict().items():
        assert_close(back.state_dict()[name], t)
    with torch.no_grad():
        ref, out = sae.dense_latents(x), back.dense_latents(x)
        assert (ref > 0).float().mean() > 0.01  # some latents fire, else the check is empty
        assert_close(out, ref)
        assert_close(back(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_folder_matches_saelens_forward(arch, tmp_path):
    """What SAELens would compute from our files equals our own forward pass."""
    sae = _random_sae(arch, seed=1)
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    x = torch.randn(100, D)
    with torch.no_grad():
        assert_close(_naive_saelens(cfg, w, x), sae(x).x_hat)


def test_cfg_json_has_documented_keys(tmp_path):
    sae = _random_sae("topk")
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # the keys SAELens 6.54's own save_model writes for a TopK SAE (benchmarks/check_saelens_interop.py
    # loads our export with SAELens itself); a sae_lens_version below 6 would make SAELens convert
    # the file as a pre-6.0 one
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "k", "metadata"):
        assert key in cfg, key
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert isinstance(cfg["metadata"]["hook_name"], str)
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, WIDTH, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"] == {"sae_lens_version": "6.0.0", "model_name": "vit-tiny",
                               "hook_name": "blocks.3.hook_resid_post"}
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert w["W_enc"].shape == (D, WIDTH) and w["W_dec"].shape == (WIDTH, D)


@pytest.mark.parametrize("arch,ours", [("relu", "standard"), ("jumprelu", "jumprelu"), ("batchtopk", "jumprelu")])
def test_architecture_names(arch, ours, tmp_path):
    export_saelens(_random_sae(arch), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ours and "k" not in cfg
    assert ("threshold" in load_file(str(tmp_path / "sae_weights.safetensors"))) == (ours == "jumprelu")


def _write_saelens(directory, cfg: dict, tensors: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))


def _handwritten(arch: str, apply_b_dec: bool = True, seed: int = 2) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, WIDTH, generator=g) / D**0.5,
        "W_dec": torch.randn(WIDTH, D, generator=g) / D**0.5,
        "b_enc": torch.randn(WIDTH, generator=g) * 0.3,
        "b_dec": torch.randn(D, generator=g) * 0.3,
    }
    if arch == "jumprelu":
        w["threshold"] = torch.rand(WIDTH, generator=g) * 0.5
    cfg = {"architecture": arch, "d_in": D, "d_sae": WIDTH, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "reshape_activations": "none", "meta": {"model_name": "m", "hook_name": "h"}}
    if arch == "topk":
        cfg["k"] = K
    return cfg, w


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("topk", True), ("jumprelu", True),
                                              ("standard", False), ("jumprelu", False)])
def test_handwritten_saelens_folder_imports(arch, apply_b_dec, tmp_path):
    cfg, w = _handwritten(arch, apply_b_dec)
    _write_saelens(tmp_path, cfg, w)
    sae = import_saelens(tmp_path)
    assert sae.cfg.architecture == {"standard": "relu"}.get(arch, arch)
    assert sae.lineage["model_name"] == "m" and sae.lineage["hook_name"] == "h"
    x = torch.randn(300, D)
    with torch.no_grad():
        ref = _naive_saelens(cfg, w, x)
        assert_close(sae(x).x_hat, ref, atol=1e-5, rtol=1e-5)
        assert_close(sae(x.reshape(3, 100, D)).x_hat, ref.reshape(3, 100, D), atol=1e-5, rtol=1e-5)


def test_legacy_topk_cfg_imports(tmp_path):
    """Pre-6.0 files: a 'standard' SAE with activation_fn_str='topk' and k in activation_fn_kwargs."""
    cfg, w = _handwritten("topk")
    legacy = {**cfg, "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
    del legacy["k"], legacy["meta"]
    _write_saelens(tmp_path, legacy, w)
    sae = import_saelens(tmp_path)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K
    x = torch.randn(50, D)
    with torch.no_grad():
        assert_close(sae(x).x_hat, _naive_saelens(cfg, w, x))


@pytest.mark.parametrize("change,needle", [
    ({"architecture": "gated"}, "gated"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
])
def test_unsupported_concepts_are_refused(change, needle, tmp_path):
    cfg, w = _handwritten("standard")
    _write_saelens(tmp_path, {**cfg, **change}, w)
    with pytest.raises(ValueError, match=needle):
        import_saelens(tmp_path)


def test_missing_folder_and_bad_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        import_saelens(tmp_path / "nothing")
    cfg, w = _handwritten("standard")
    _write_saelens(tmp_path, {**cfg, "d_sae": WIDTH * 2}, w)
    with pytest.raises(ValueError, match=f"d_sae={WIDTH * 2}"):
        import_saelens(tmp_path)
    cfg, w = _handwritten("jumprelu")
    del w["threshold"]
    _write_saelens(tmp_path, cfg, w)
    with pytest.raises(ValueError, match="threshold"):
        import_saelens(tmp_path)
