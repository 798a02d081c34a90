"""load_model / list_models: local weight files, saved directories, offline and unknown-name errors."""

import time

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from analysis.models.zoo import _timm_convertible, list_models, load_model, read_state_dict  # noqa: E402
from analysis.models.vit import HookedViT, ViTConfig  # noqa: E402

TINY = dict(img_size=32, depth=2)


def _timm_tiny(seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _x(size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_timm_weights_from_safetensors_and_wrapped_pth(tmp_path):
    ref = _timm_tiny()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pth")
    with torch.no_grad():
        expected = ref(_x())
        for f in ("w.safetensors", "w.pth"):
            h = load_model("timm:vit_tiny_patch16_224", weights=tmp_path / f, **TINY)
            assert isinstance(h, HookedViT) and not h.training
            torch.testing.assert_close(h(_x()), expected, atol=1e-4, rtol=1e-4)
        # Different weights give different outputs: the file really was read.
        rand = load_model("timm:vit_tiny_patch16_224", weights="random", **TINY)
        assert (rand(_x()) - expected).abs().max() > 1e-2


def test_open_clip_weights_from_file(tmp_path):
    small = dict(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=32, width=64, layers=2),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, **small).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.visual.state_dict().items()}, str(tmp_path / "visual.safetensors"))
    with torch.no_grad():
        for f in ("clip.safetensors", "visual.safetensors"):
            h = load_model("open_clip:ViT-B-32", weights=tmp_path / f, **small)
            torch.testing.assert_close(h(_x(64)), ref.encode_image(_x(64)), atol=1e-4, rtol=1e-4)


def test_local_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    m = HookedViT(ViTConfig(image_size=32, patch_size=8, d_model=32, n_heads=4, d_mlp=64)).eval()
    m.save(tmp_path / "ours")
    loaded = load_model(str(tmp_path / "ours"))
    assert loaded.weights_hash() == m.weights_hash()
    with pytest.raises(ValueError, match="holds its own weights"):
        load_model(str(tmp_path / "ours"), weights="x.pt")


def test_offline_without_weights_fails_at_once_and_says_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("timm:vit_tiny_patch16_224", "open_clip:ViT-B-32"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"weights='/path/to/weights.safetensors'"):
            load_model(name)
        assert time.perf_counter() - start < 5, "must not wait on the hub"


def test_unknown_names_suggest_close_matches(tmp_path):
    with pytest.raises(ValueError, match="timm:vit_tiny_patch16_224"):
        load_model("timm:vit_tiny_patch16_22", weights="random")
    with pytest.raises(ValueError, match="open_clip:ViT-B-32"):
        load_model("open_clip:ViT-B-33", weights="random")
    with pytest.raises(ValueError, match="timm:vit_base_patch16_224"):
        load_model("vit_base_patch16_224")
    with pytest.raises(ValueError, match="source="):
        list_models("hf")


def test_weight_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors, .pt"):
        read_state_dict(tmp_path / "w.npz")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_list_models_names_convertible_architectures():
    names = list_models()
    for expected in ("timm:vit_base_patch16_224", "timm:deit3_small_patch16_224", "timm:vit_base_patch16_reg4_gap_256",
                     "timm:vit_base_patch32_clip_quickgelu_224", "open_clip:ViT-B-32", "open_clip:ViT-L-14-quickgelu"):
        assert expected in names
    for excluded in ("timm:vit_base_patch16_siglip_224", "open_clip:RN50", "open_clip:coca_ViT-B-32"):
        assert excluded not in names
    # The name filter agrees with the module-tree check on a spread of listed timm models.
    timm_names = [n.removeprefix("timm:") for n in names if n.startswith("timm:")]
    sample = timm_names[:: max(1, len(timm_names) // 8)]
    assert [n for n in sample if not _timm_convertible(n)] == []


def test_library_imports_do_not_pull_in_timm_or_open_clip():
    """A notebook that never converts must not pay timm/open_clip import time."""
    import subprocess
    import sys

    code = ("import sys, analysis.models.vit, analysis.models.zoo, analysis.models.cache, analysis.models.clip_zero_shot, "
            "analysis.models.convert; print(sorted(m for m in ('timm', 'open_clip', 'dagster') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_clip_pretrained_tag_offline_fails_at_once_with_the_fix():
    import time

    from analysis.models.zoo import load_model

    start = time.monotonic()
    with pytest.raises(ValueError, match="weights="):
        load_model("open_clip:ViT-B-32", weights="laion2b_s34b_b79k")
    assert time.monotonic() - start < 5
