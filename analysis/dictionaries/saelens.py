"""Export to and import from SAELens's on-disk format, without depending on SAELens.

A SAELens SAE is a folder holding

    cfg.json                  {"architecture", "d_in", "d_sae", "dtype", "device",
                               "apply_b_dec_to_input", "normalize_activations",
                               "reshape_activations", "k" (topk only), "metadata":
                               {"sae_lens_version", "model_name", "hook_name", ...}}
    sae_weights.safetensors   W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,),
                               b_dec (d_in,), threshold (d_sae,) for jumprelu

and computes pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc, then
standard: ReLU(pre); topk: ReLU of the k largest of pre; jumprelu: ReLU(pre)·[pre > threshold];
x̂ = z @ W_dec + b_dec. SAELens reads a file as the 6.x layout only when
`metadata.sae_lens_version` >= 6.0 (else it converts it as a pre-6.0 file, and fails on a missing
hook name), so the export writes that layout with version "6.0.0" (the format, not a claim that
SAELens wrote it) and a hook name of "" when the lineage has none. Older (<= 5.x) files keep
`model_name`/`hook_name` at the top level and name the activation in `activation_fn_str` with k
in `activation_fn_kwargs`; the import reads both layouts. Checked against SAELens 6.54.12 by
benchmarks/check_saelens_interop.py (its own load_from_disk/encode/decode/save_model).

Architecture map (ours ↔ SAELens):
    relu ↔ standard, topk ↔ topk, jumprelu ↔ jumprelu (threshold = exp(log_threshold)),
    batchtopk → jumprelu with its inference threshold: that is how SAELens itself stores a
    trained BatchTopK SAE. Our own config goes under the extra key `spectra_config`, so a
    round trip gives back the same class, k and training knobs; a folder written by SAELens
    gets the defaults of `SAEConfig` for knobs SAELens does not record.
Refused with ValueError (no exact equivalent here): gated and other architectures,
normalize_activations other than "none", reshape_activations "hook_z", training configs whose
activations are rescaled by decoder norms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.dictionaries.base import SparseAutoencoder
from analysis.dictionaries.config import SAEConfig
from analysis.dictionaries.models import build_sae
from analysis.integrity import atomic_write, write_bytes

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPECTRA_KEY = "spectra_config"
"""Extra cfg.json key holding our SAEConfig and lineage; SAELens drops unknown keys on load."""

_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written (SAELens 6.x)

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lineage_names(lineage: dict | None) -> tuple[str | None, str | None]:
    """(model_name, hook_name) recorded by the suite, when present."""
    lineage = lineage or {}
    store = lineage.get("store_lineage") if isinstance(lineage.get("store_lineage"), dict) else {}
    model = lineage.get("model_name") or lineage.get("model") or store.get("model_name") or store.get("model")
    hook = lineage.get("hook_name") or lineage.get("hook") or store.get("hook")
    return (str(model) if model is not None else None, str(hook) if hook is not None else None)


@torch.no_grad()
def export_saelens(sae: SparseAutoencoder, directory: str | Path, *, model_name: str | None = None,
                   hook_name: str | None = None) -> Path:
    """Write `sae` as a SAELens folder (cfg.json + sae_weights.safetensors); returns the folder.

    model_name / hook_name default to the names in the SAE's lineage (None when unknown).
    """
    cfg = sae.cfg
    arch = _TO_SAELENS.get(cfg.architecture)
    if arch is None:
        raise ValueError(
            f"architecture={cfg.architecture!r} has no SAELens equivalent: export one of {sorted(_TO_SAELENS)}"
        )
    default_model, default_hook = _lineage_names(sae.lineage)
    model_name = model_name if model_name is not None else default_model
    hook_name = hook_name if hook_name is not None else default_hook
    dtype = sae.W_dec.dtype
    tensors = {
        "W_enc": sae.W_enc.detach().to(dtype).contiguous().cpu(),  # (d_in, d_sae), as SAELens
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    if arch == "jumprelu":
        # SAELens keeps the threshold in the module dtype; ours is fp32. Writing fp32 keeps it exact.
        tensors["threshold"] = sae.threshold.detach().float().contiguous().cpu()
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": model_name, "hook_name": hook_name or ""}
    out = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": _dtype_name(dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,  # our encoder always subtracts b_dec
        "normalize_activations": "none",  # input scaling is folded into the weights at save
        "reshape_activations": "none",
        "metadata": meta,
        SPECTRA_KEY: {"config": cfg.to_dict(), "lineage": sae.lineage or {}},
    }
    if arch == "topk":
        out["k"] = cfg.k
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / SAELENS_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    write_bytes(directory / SAELENS_CFG_FILE, json.dumps(out, indent=2, sort_keys=True).encode())
    return directory


def _refuse_unsupported(cfg: dict, directory: Path) -> None:
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ValueError(
            f"{directory}: normalize_activations={norm!r} has no equivalent here (our SAEs read raw "
            "activations): fold the scaling into the weights in SAELens first, or use 'none'"
        )
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise ValueError(
            f"{directory}: reshape_activations={reshape!r} is not supported: only flat (..., d_in) "
            "inputs are; use an SAE with reshape_activations='none'"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(
            f"{directory}: rescale_acts_by_decoder_norm=True (a SAELens training config) is not "
            "supported: save the inference model from SAELens, which folds the decoder norms"
        )


def _architecture(cfg: dict, directory: Path) -> str:
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch = "topk"  # pre-6.0 files spelled TopK as a standard SAE with a topk activation
    if arch not in _FROM_SAELENS:
        raise ValueError(
            f"{directory}: SAELens architecture={arch!r} has no equivalent here: supported are "
            f"{sorted(_FROM_SAELENS)}"
        )
    if arch == "standard" and cfg.get("activation_fn_str", "relu") != "relu":
        raise ValueError(
            f"{directory}: activation_fn_str={cfg['activation_fn_str']!r} is not supported for a "
            "standard SAE: only 'relu' (or 'topk') is"
        )
    return _FROM_SAELENS[arch]


def _k(cfg: dict, directory: Path) -> int:
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError(f"{directory}: a {cfg.get('architecture')!r} SAE needs 'k' in {SAELENS_CFG_FILE}")
    if float(k) != int(k):
        raise ValueError(f"{directory}: k={k} is fractional; our SAEs need an integer k")
    return int(k)


@torch.no_grad()
def import_saelens(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read a SAELens folder (cfg.json + sae_weights.safetensors) as one of our SAEs."""
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG_FILE, directory / SAELENS_WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"no SAELens SAE at {directory}: expected {SAELENS_CFG_FILE} and {SAELENS_WEIGHTS_FILE}"
        )
    cfg = json.loads(cfg_path.read_text())
    _refuse_unsupported(cfg, directory)
    arch = _architecture(cfg, directory)
    tensors = load_file(str(weights_path), device=str(device))
    need = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    missing = need - set(tensors)
    if arch == "batchtopk" and not {"threshold", "topk_threshold"} & set(tensors):
        missing.add("threshold")
    if missing:
        raise ValueError(f"{directory}: {SAELENS_WEIGHTS_FILE} lacks tensors {sorted(missing)}")
    d_in, width = int(cfg["d_in"]), int(cfg["d_sae"])
    if tuple(tensors["W_enc"].shape) != (d_in, width) or tuple(tensors["W_dec"].shape) != (width, d_in):
        raise ValueError(
            f"{directory}: W_enc {tuple(tensors['W_enc'].shape)} / W_dec {tuple(tensors['W_dec'].shape)} "
            f"do not match d_in={d_in}, d_sae={width} (expected ({d_in}, {width}) and ({width}, {d_in}))"
        )

    ours = (cfg.get(SPECTRA_KEY) or {}).get("config")
    lineage = (cfg.get(SPECTRA_KEY) or {}).get("lineage") or {}
    if ours and ours.get("d_in") == d_in and ours.get("width") == width and (
        _TO_SAELENS.get(ours.get("architecture")) == cfg.get("architecture")
    ):
        sae_cfg = SAEConfig.from_dict(ours)  # our own export: same class and knobs back
    else:
        k = _k(cfg, directory) if arch in ("topk", "batchtopk") else None
        sae_cfg = SAEConfig(d_in=d_in, width=width, k=k, architecture=arch)
    if not lineage:
        meta = cfg.get("metadata") or cfg.get("meta") or {}
        lineage = {"source": "saelens", "model_name": meta.get("model_name", cfg.get("model_name")),
                   "hook_name": meta.get("hook_name", cfg.get("hook_name")) or None}

    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."), tensors["W_dec"].dtype)
    sae = build_sae(sae_cfg, device=device, dtype=dtype)
    sae.W_enc.copy_(tensors["W_enc"])
    sae.W_dec.copy_(tensors["W_dec"])
    sae.b_enc.copy_(tensors["b_enc"])
    sae.b_dec.copy_(tensors["b_dec"])
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens skips the b_dec subtraction; ours always does it, so move b_dec·W_enc into b_enc:
        # (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc) = x @ W_enc + b_enc (exact up to rounding).
        shift = tensors["b_dec"].to(torch.float64) @ tensors["W_enc"].to(torch.float64)
        sae.b_enc.add_(shift.to(sae.b_enc.dtype))
    if sae_cfg.architecture in ("jumprelu", "batchtopk"):
        theta = tensors["threshold"] if "threshold" in tensors else tensors["topk_threshold"]
        # A threshold <= 0 acts as plain ReLU in both codes (activations must be > 0 too).
        theta = theta.to(torch.float32).clamp_min(0).expand(width)
        if sae_cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(theta.log())  # log(0) = -inf, exp(-inf) = 0: still ReLU
        else:
            sae.inference_threshold.copy_(theta)
    sae.lineage = lineage
    return sae


__all__ = ["SAELENS_CFG_FILE", "SAELENS_WEIGHTS_FILE", "SPECTRA_KEY", "export_saelens", "import_saelens"]
