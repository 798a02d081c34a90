"""Load a ViT by name: `timm:<name>`, `open_clip:<arch>`, or a local HookedViT directory.

    load_model("timm:vit_base_patch16_224", weights="~/ckpt/vit_b16.safetensors")
    load_model("open_clip:ViT-B-32", weights="open_clip_vit_b32.pt")
    load_model("/data/spectra/models/abc123")            # saved by HookedViT.save
    load_model("timm:vit_tiny_patch16_224", weights="random")   # random init, for tests

Weights come from a local `.safetensors` or `.pt/.pth/.bin` file (read with
`torch.load(weights_only=True)`: nothing pickled is executed), or from the hub when
`weights=None` and the machine is online. Offline, `weights=None` fails at once with a
message saying how to pass a file, instead of the hub client's ~46 s hang.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from analysis.models.config import ViTConfig
from analysis.models.inputs import Preprocessing
from analysis.models.vit import CONFIG_FILE, HookedViT

SOURCES = ("timm", "open_clip")
# timm VisionTransformer names whose architecture HookedViT cannot reproduce (attention-pool
# "map" heads, hybrid CNN stems, parallel/diff/xpos/rope blocks, SwiGLU MLPs, qk-norm,
# dynamic sizes); `list_models(verify=True)` checks every model's module tree instead.
_TIMM_EXCLUDE = re.compile(
    r"siglip|_map_|aimv2|beit3|_xp_|rpn|intern|dwee|dpwee|dlittle|pwee|giant_patch14_(reg\d_)?dinov2|distilled"
    r"|_\d+x\d+_|^test_vit|tipsv2|parallel|rope|relpos|sam_|so150m2"
)
# open_clip vision_cfg keys that HookedViT reproduces; a config using any other key is skipped.
_OPEN_CLIP_VISION_KEYS = {
    "image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "ls_init_value",
    "patch_dropout", "no_ln_pre", "pool_type", "final_ln_after_pool", "output_tokens", "pos_embed_type",
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 1.5) -> bool:
    """False when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set or huggingface.co does not answer fast."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_candidates() -> list[str]:
    import timm

    names = timm.list_models(module="vision_transformer") + timm.list_models(module="deit")
    return [n for n in names if not _TIMM_EXCLUDE.search(n)]


def _open_clip_candidates() -> list[str]:
    import open_clip

    out = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        # ResNet towers list their layers; CoCa adds attention pooling; hf text towers need downloads.
        plain_vit = vision and isinstance(vision.get("layers"), int) and set(vision) <= _OPEN_CLIP_VISION_KEYS
        if plain_vit and not name.startswith("coca") and "hf_model_name" not in text:
            out.append(name)
    return out


def _timm_convertible(name: str) -> bool:
    import timm

    from analysis.models.convert import timm_config

    try:
        with torch.device("meta"):  # module tree only: no memory, no init
            timm_config(timm.create_model(name, pretrained=False))
        return True
    except (ValueError, TypeError, AttributeError):
        return False


def list_models(source: str | None = None, *, verify: bool = False, progress: bool = True) -> list[str]:
    """Names `load_model` accepts, as "timm:<name>" and "open_clip:<arch>" (sorted).

    source: "timm", "open_clip" or None for both. verify=True builds every timm candidate on
    the meta device and keeps only those whose module tree converts (~40 s for all of timm).
    """
    if source not in (None, *SOURCES):
        raise ValueError(f"source={source!r}: expected one of {list(SOURCES)} or None for all")
    names = []
    if source in (None, "timm"):
        timm_names = _timm_candidates()
        if verify:
            timm_names = [n for n in tqdm(timm_names, desc="verify timm", disable=not progress) if _timm_convertible(n)]
        names += [f"timm:{n}" for n in timm_names]
    if source in (None, "open_clip"):
        names += [f"open_clip:{n}" for n in _open_clip_candidates()]
    return sorted(names)


def _unknown(name: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    return ValueError(
        f"unknown model {name!r}.{hint} Use 'timm:<name>', 'open_clip:<arch>' or a directory saved by "
        "HookedViT.save; list_models() shows the names"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or .pt/.pth/.bin via torch.load(weights_only=True); wrappers removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass the path of a .safetensors or .pt/.pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"weights file {path.name}: expected a .safetensors, .pt, .pth or .bin file")
    for key in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat name -> tensor state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _no_weights_offline(spec: str) -> ValueError:
    return ValueError(
        f"{spec}: no weights given and the hub is unreachable (offline or HF_HUB_OFFLINE=1). Pass a local "
        f"file: load_model({spec!r}, weights='/path/to/weights.safetensors' or '.pth'), or weights='random' "
        "for a randomly initialized model"
    )


def _load_timm(arch: str, weights: str | Path | None, kwargs: dict) -> HookedViT:
    import timm

    if arch not in timm.list_models():
        raise _unknown(f"timm:{arch}", list_models("timm"))
    if weights is None:
        if not hub_reachable():
            raise _no_weights_offline(f"timm:{arch}")
        return HookedViT.from_timm(timm.create_model(arch, pretrained=True, **kwargs).eval())
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    if str(weights) != "random":
        from timm.models.vision_transformer import checkpoint_filter_fn

        # timm's filter maps original (JAX/OpenAI/DINOv2) layouts onto timm names and resizes pos_embed.
        model.load_state_dict(checkpoint_filter_fn(read_state_dict(weights), model), strict=True)
    return HookedViT.from_timm(model)


def create_open_clip(arch: str, weights: str | Path | None, kwargs: dict):
    """The whole open_clip model (image and text towers): from a pretrained tag (online), a local
    file (the whole model, or its image tower only), or "random"."""
    import open_clip

    if arch not in open_clip.list_models():
        raise _unknown(f"open_clip:{arch}", list_models("open_clip"))
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights is None or (str(weights) in tags and not Path(str(weights)).exists()):
        # A pretrained tag (e.g. "laion2b_s34b_b79k") downloads when online; a bare name needs one.
        if not hub_reachable():
            raise _no_weights_offline(f"open_clip:{arch}")
        if weights is None:
            raise ValueError(f"open_clip:{arch}: name a pretrained tag ({', '.join(tags) or 'none known'}) "
                             "or a local file: weights='/path/to/open_clip_model.safetensors'")
        return open_clip.create_model(arch, pretrained=str(weights), **kwargs).eval()
    model = open_clip.create_model(arch, pretrained=None, **kwargs).eval()
    if str(weights) != "random":
        state = read_state_dict(weights)
        if any(k.startswith("visual.") for k in state):
            model.load_state_dict(state, strict=True)
        else:  # an image-tower-only checkpoint
            model.visual.load_state_dict(state, strict=True)
    return model


def _load_open_clip(arch: str, weights: str | Path | None, kwargs: dict) -> HookedViT:
    return HookedViT.from_open_clip(create_open_clip(arch, weights, kwargs))


def load_model(
    name: str, weights: str | Path | None = None, *, device: str | torch.device = "cpu", **model_kwargs: Any
) -> HookedViT:
    """A HookedViT from "timm:<name>", "open_clip:<arch>" or a local directory saved by HookedViT.save.

    weights: a local .safetensors/.pt/.pth file, "random" (random init), or None (hub download
    when online; an immediate ValueError offline). model_kwargs go to timm/open_clip create_model.
    """
    source, sep, arch = name.partition(":")
    if sep and source in SOURCES:
        loader = _load_timm if source == "timm" else _load_open_clip
        return loader(arch, weights, model_kwargs).to(device).eval()
    path = Path(name).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).exists():
        if weights is not None:
            raise ValueError(f"{name} is a saved HookedViT directory: it holds its own weights; drop weights=")
        return HookedViT.load(path, device=device)
    if sep or path.exists():
        raise ValueError(
            f"{name!r}: expected 'timm:<name>', 'open_clip:<arch>' or a directory holding {CONFIG_FILE} "
            "and model.safetensors (written by HookedViT.save)"
        )
    raise _unknown(name, list_models())


class ModelInput(NamedTuple):
    """What a timm or open_clip model expects, read from its module tree and configs (no weights)."""

    vit: ViTConfig
    """The HookedViT config it converts to (before normalisation is folded in)."""
    preprocessing: Preprocessing
    """The library's eval transform: shorter side resized, centre crop, its filter."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


def timm_input(arch: str, **model_kwargs: Any) -> ModelInput:
    import timm
    from timm.data import resolve_data_config

    from analysis.models.convert import timm_config

    if arch not in timm.list_models():
        raise _unknown(f"timm:{arch}", list_models("timm"))
    with torch.device("meta"):  # module tree only: no memory, no init
        model = timm.create_model(arch, pretrained=False, **model_kwargs)
    vit = timm_config(model)
    # the pretrained config knows the crop ratio, filter and normalisation; the size is the
    # model's own (an img_size override changes it)
    data = resolve_data_config({}, model=model)
    pre = Preprocessing(size=vit.image_size, resize=math.floor(vit.image_size / data.get("crop_pct", 1.0)),
                        interpolation=data.get("interpolation", "bicubic"))
    return ModelInput(vit, pre, tuple(data["mean"]), tuple(data["std"]))


def check_weights(source: str, arch: str, weights: str | Path, **model_kwargs: Any) -> None:
    """Raise ValueError, naming missing, unexpected and mis-shaped tensors, unless the weights file
    fits `source` ("timm" or "open_clip") `arch` built with `model_kwargs` (checked on the meta
    device: nothing is loaded into a model, so a suite fails here, before any work)."""
    state = read_state_dict(weights)
    if source == "timm":
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **model_kwargs)
        state = checkpoint_filter_fn(state, model)
    else:
        import open_clip

        model = open_clip.create_model(arch, pretrained=None, device="meta", **model_kwargs)
        if not any(k.startswith("visual.") for k in state):  # an image-tower-only checkpoint
            model = model.visual
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights file {weights} does not fit {source}:{arch} {model_kwargs or ''}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} of another shape (e.g. {[(k, got[k], want[k]) for k in shapes[:2]]}): pass the "
            "weights of this architecture, or set model.name / model.kwargs to the checkpoint's")


def open_clip_input(arch: str, **model_kwargs: Any) -> ModelInput:
    import open_clip

    from analysis.models.convert import open_clip_weights

    if arch not in open_clip.list_models():
        raise _unknown(f"open_clip:{arch}", list_models("open_clip"))
    model = open_clip.create_model(arch, pretrained=None, device="meta", **model_kwargs)  # no weights
    vit, _ = open_clip_weights(model)
    cfg = open_clip.get_model_preprocess_cfg(model)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"open_clip:{arch} resizes with mode {cfg['resize_mode']!r}: only 'shortest' (resize the "
                         "shorter side, centre crop) is supported")
    pre = Preprocessing(size=vit.image_size, interpolation=cfg.get("interpolation", "bicubic"))
    return ModelInput(vit, pre, tuple(cfg["mean"]), tuple(cfg["std"]))
