"""Training state on disk, so an interrupted run resumes to bit-identical final weights.

    <dir>/resume/state.safetensors   SAE weights (training scale), Adam moments and steps,
                                     dead-latent counters, BatchTopK threshold estimate
    <dir>/resume/state.json          step, tokens, log rows, loader position, Adam hyperparameters

The directory is written beside and renamed over the previous one, so a crash mid-write leaves
the last good state. Nothing random happens inside the loop (the loader's order depends only on
(seed, epoch)), so weights + optimizer + counters + loader position is the whole state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.integrity import atomic_write, write_json

RESUME_DIR = "resume"


def save_train_state(directory: str | Path, *, sae, opt: torch.optim.Optimizer, tensors: dict,
                     meta: dict) -> Path:
    target = Path(directory) / RESUME_DIR
    tmp = target.with_name(RESUME_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = {f"sae.{n}": t.detach().contiguous().cpu() for n, t in sae.state_dict().items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for key, value in st.items():
            out[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    out.update({f"loop.{n}": t.detach().contiguous().cpu() for n, t in tensors.items()})
    atomic_write(tmp / "state.safetensors", lambda path: save_file(out, str(path)))
    write_json(tmp / "state.json", {**meta, "param_groups": opt_state["param_groups"]})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_train_state(directory: str | Path, *, sae, opt: torch.optim.Optimizer, device) -> tuple[dict, dict] | None:
    """Restore `sae` and `opt` in place; returns (loop tensors, meta), or None when no state exists."""
    source = Path(directory) / RESUME_DIR
    if not (source / "state.json").exists():
        return None
    meta = json.loads((source / "state.json").read_text())
    flat = load_file(str(source / "state.safetensors"), device=str(device))
    sae.load_state_dict({n[4:]: t for n, t in flat.items() if n.startswith("sae.")}, strict=True)
    state: dict[int, dict] = {}
    for name, t in flat.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = t.cpu() if key == "step" else t
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    loop = {n[5:]: t for n, t in flat.items() if n.startswith("loop.")}
    return loop, meta
