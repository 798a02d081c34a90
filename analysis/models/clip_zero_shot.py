"""CLIP zero-shot classification head built from class prompts with open_clip's text tower.

logits = logit_scale * normalize(image_embedding) @ normalize(class_embedding).T, where a
class embedding is the renormalized mean of its prompts' normalized text embeddings (the
CLIP paper's prompt ensembling). The head is a plain module over embeddings, so it sits on
top of a converted HookedViT (`forward()` returns the image embedding) and every hook of
the image tower still fires.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from analysis.models.cache import ActivationCache
from analysis.models.hooks import HookFn, NameFilter
from analysis.integrity import atomic_write, write_json

DEFAULT_TEMPLATES = ("a photo of a {}.",)
HEAD_WEIGHTS, HEAD_CONFIG = "zero_shot_head.safetensors", "zero_shot_head.json"


class ZeroShotHead(nn.Module):
    """Image embeddings (B, D) -> class logits (B, C)."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float, class_names: Sequence[str]) -> None:
        super().__init__()
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] != len(class_names):
            raise ValueError(
                f"class_embeddings {tuple(class_embeddings.shape)}: expected ({len(class_names)}, D), one row per class"
            )
        self.register_buffer("class_embeddings", F.normalize(class_embeddings, dim=-1))
        self.logit_scale = float(logit_scale)
        self.class_names = list(class_names)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(image_embeddings, dim=-1) @ self.class_embeddings.T

    def save(self, directory: str | Path) -> None:
        """zero_shot_head.safetensors (class embeddings) + zero_shot_head.json (scale, class names),
        beside the tower's own files (mirror of `load`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"class_embeddings": self.class_embeddings.detach().cpu().contiguous()}
        atomic_write(directory / HEAD_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
        write_json(directory / HEAD_CONFIG, {"logit_scale": self.logit_scale, "class_names": self.class_names})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ZeroShotHead":
        directory = Path(directory)
        meta = json.loads((directory / HEAD_CONFIG).read_text())
        emb = load_file(str(directory / HEAD_WEIGHTS), device=str(device))["class_embeddings"]
        return cls(emb, meta["logit_scale"], meta["class_names"])


@torch.no_grad()
def zero_shot_head(
    clip_model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    progress: bool = False,
) -> ZeroShotHead:
    """Encode every class's prompts with `clip_model.encode_text` (open_clip) into a ZeroShotHead.

    tokenizer: e.g. `open_clip.get_tokenizer(arch)`. templates contain one "{}" each.
    """
    if not class_names:
        raise ValueError("class_names is empty: pass at least one class name")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates {bad or list(templates)}: each needs exactly one '{{}}' for the class name")
    device = next(clip_model.parameters()).device
    rows = []
    for name in tqdm(class_names, desc="class prompts", disable=not progress):
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    scale = float(clip_model.logit_scale.exp())
    return ZeroShotHead(torch.stack(rows), scale, class_names)


class ZeroShotOutput(NamedTuple):
    logits: torch.Tensor
    """(B, C) class logits."""
    image_embeddings: torch.Tensor
    """(B, D) unnormalized image embeddings from the hooked tower."""


class ZeroShotClassifier(nn.Module):
    """A hooked CLIP image tower followed by a ZeroShotHead; hooks go to the tower."""

    def __init__(self, tower: nn.Module, head: ZeroShotHead) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(x))

    def forward_with_embeddings(self, x: torch.Tensor) -> ZeroShotOutput:
        emb = self.tower(x)
        return ZeroShotOutput(self.head(emb), emb)

    def run_with_hooks(self, x: torch.Tensor, *, fwd_hooks: list[tuple[NameFilter, HookFn]]) -> torch.Tensor:
        return self.head(self.tower.run_with_hooks(x, fwd_hooks=fwd_hooks))

    def run_with_cache(self, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        emb, cache = self.tower.run_with_cache(x, **kwargs)
        return self.head(emb), cache
