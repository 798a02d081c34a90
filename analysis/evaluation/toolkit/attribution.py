"""Direct logit attribution: how much each component writes straight into a class's score.

The final residual stream is a sum of components (the embeddings, each attention layer's output
or each head's, each MLP's output). With the final norm's scale frozen from the clean pass (and,
for a CLIP zero-shot head, the image embedding's length), the readout is linear, so each
component maps to a logit contribution and the contributions plus a constant (the norm's bias
and the head's bias through the head) sum to the clean logit exactly. The frozen scale is the
usual convention (TransformerLens, Vilas et al.): a component's *direct* effect, not what the
logit would be without it (that is patching's question).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from analysis.models.cache import head_results
from analysis.evaluation.toolkit.readout import Readout, check_classes


class Attribution(NamedTuple):
    components: list[str]
    """Component names: "embed" (and "pos_embed" without ln_pre), then per layer "L{i}_attn" or
    per head "L{i}H{h}" plus "L{i}_attn_bias", and "L{i}_mlp"."""
    contributions: Tensor
    """(n_components, N): each component's direct contribution to the target score."""
    constant: Tensor
    """(N,) the part of the target no component carries."""
    target: Tensor
    """(N,) the clean target score: logit[target] (− logit[versus]); = contributions.sum(0) + constant."""


@torch.no_grad()
def direct_logit_attribution(model, images: Tensor, target, versus=None, *, heads: bool = False,
                             batch_size: int = 64) -> Attribution:
    """Attribute `target` class logits (N,) of `model` on `images` (N, C, H, W) to the components
    of the final residual stream; with `versus` (N,), the logit difference target − versus.
    `heads` splits each attention layer into its heads and its output bias."""
    readout = Readout(model)
    n = len(images)
    if n == 0:
        raise ValueError("no images given: pass at least one")
    target = check_classes(target, n, readout.n_classes, "target")
    versus = None if versus is None else check_classes(versus, n, readout.n_classes, "versus")
    cfg = readout.cfg
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"

    def wanted(name: str) -> bool:
        return (name in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", last)
                or name.endswith(("hook_attn_out", "hook_mlp_out")) or (heads and name.endswith("attn.hook_z")))

    names, chunks, consts, totals = None, [], [], []
    for lo in range(0, n, batch_size):
        x, t = images[lo:lo + batch_size], target[lo:lo + batch_size]
        _, cache = readout.tower.run_with_cache(x, names_filter=wanted)
        frozen = readout.freeze(cache[last])
        names, parts = [], []
        for group, stack in _component_groups(cache, cfg, heads):  # one layer at a time: (n, B, T, d) stays small
            names += group
            parts.append(_pick(readout.linear_logits(stack, frozen), t, versus, lo))
        chunks.append(torch.cat(parts))
        consts.append(_pick(frozen.constant, t, versus, lo))
        totals.append(_pick(readout.stream_logits(cache[last]), t, versus, lo))
    return Attribution(names, torch.cat(chunks, -1), torch.cat(consts), torch.cat(totals))



def _pick(scores: Tensor, target: Tensor, versus: Tensor | None, lo: int) -> Tensor:
    """(…, B, C) -> (…, B): the target class's score, minus the versus class's when given."""
    idx = target.to(scores.device).expand(*scores.shape[:-1]).unsqueeze(-1)
    out = scores.gather(-1, idx).squeeze(-1)
    if versus is not None:
        v = versus[lo:lo + scores.shape[-2]].to(scores.device).expand(*scores.shape[:-1]).unsqueeze(-1)
        out = out - scores.gather(-1, v).squeeze(-1)
    return out


def _component_groups(cache, cfg, heads: bool):
    """(names, (n, B, T, d) stack) of the final stream's additive terms, group by group: the
    embeddings, then per block its attention (each head and the output bias, or the whole output)
    and its MLP, so a ViT-B's 170 per-head terms are never held at once."""
    if cfg.ln_pre:
        yield ["embed"], cache["blocks.0.hook_resid_pre"][None]
    else:
        yield ["embed", "pos_embed"], torch.stack([cache["hook_embed"], cache["hook_pos_embed"]])
    for layer in range(cfg.n_layers):
        attn = cache[f"blocks.{layer}.hook_attn_out"]
        if heads:
            per_head = head_results(cache, layer)
            # the output projection's bias (times layer scale): what no head owns
            yield ([f"L{layer}H{h}" for h in range(cfg.n_heads)] + [f"L{layer}_attn_bias"],
                   torch.cat([per_head, (attn - per_head.sum(0))[None]]))
        else:
            yield [f"L{layer}_attn"], attn[None]
        yield [f"L{layer}_mlp"], cache[f"blocks.{layer}.hook_mlp_out"][None]


def merge_heads(attribution: Attribution) -> Attribution:
    """Per-head attributions summed back into one "L{i}_attn" term per layer (heads and bias)."""
    names, rows = [], []
    for name, row in zip(attribution.components, attribution.contributions):
        head_of = re.fullmatch(r"L(\d+)(?:H\d+|_attn_bias)", name)
        merged = f"L{head_of.group(1)}_attn" if head_of else name
        if head_of and names and names[-1] == merged:
            rows[-1] = rows[-1] + row
        else:
            names.append(merged)
            rows.append(row.clone())
    return attribution._replace(components=names, contributions=torch.stack(rows))


def mean_by_class(attribution: Attribution, labels, classes) -> dict[int, np.ndarray]:
    """For each class in `classes`, the mean contribution of every component over its images."""
    labels = np.asarray(labels)
    out = {}
    for c in classes:
        mask = torch.as_tensor(labels == c)
        if not bool(mask.any()):
            raise ValueError(f"no image has label {c}: choose classes present among the {len(labels)} images")
        out[int(c)] = attribution.contributions[:, mask].mean(1).numpy()
    return out
