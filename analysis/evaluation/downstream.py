"""Downstream metrics: splice a dictionary's output into a model's forward pass (DESIGN.md §4).

`downstream_metrics` replaces one hook with an SAE's reconstruction, `spliced_downstream_metrics`
any set of replacement hooks (`transcoder_splice_hooks`, `crosscoder_splice_hooks`), and both
report clean, spliced and zero-ablated CE, KL and accuracy with the loss recovered.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class DownstreamMetrics(NamedTuple):
    n_images: int
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    kl_spliced: float
    """KL(clean ‖ spliced) of the output distributions, mean over images."""
    kl_ablated: float
    """KL(clean ‖ zero-ablated), mean over images."""
    acc_clean: float
    acc_spliced: float
    acc_ablated: float
    loss_recovered: float
    """(ce_ablated − ce_spliced) / (ce_ablated − ce_clean); without labels (a pretrained head whose
    classes are not the dataset's), (kl_ablated − kl_spliced) / kl_ablated against the clean output
    distribution. NaN when the gap is 0."""
    ablation_gap: float
    """ce_ablated − ce_clean (without labels: kl_ablated): when tiny, loss_recovered is meaningless."""
    cos_spliced: float = math.nan
    """Mean cosine between the clean and the spliced image embedding (`hook_pooled`, what the head
    reads); NaN for a model without that hook."""
    cos_ablated: float = math.nan
    """The same with the hook(s) zero-ablated."""


def _kl_sum(clean_logp: Tensor, other_logits: Tensor) -> float:
    # kl_div(input=log q, target=log p) = Σ p (log p − log q); log_target keeps p = 0 terms at 0
    other_logp = other_logits.double().log_softmax(-1)
    return float(F.kl_div(other_logp, clean_logp, reduction="sum", log_target=True))


Positions = Union[slice, Sequence[int]]
"""Token positions along the model's token axis that a dictionary covers: those its activation
store keeps (`analysis.activations.tokens.select_tokens(...).keep`). Splicing and ablation touch only these;
a dictionary trained on patches never sees, so never replaces, the class token."""


def _index(positions: Positions) -> slice | list[int]:
    return positions if isinstance(positions, slice) else list(positions)


def _replaced(act: Tensor, positions: Positions, new: Tensor) -> Tensor:
    """`act` with the tokens at `positions` replaced by `new` (the rest untouched)."""
    idx = _index(positions)
    if idx == slice(None):
        return new.to(act.dtype)
    out = act.clone()
    out[:, idx] = new.to(act.dtype)
    return out


def _apply(fn: Callable[[Tensor], Tensor], act: Tensor, positions: Positions) -> Tensor:
    """`fn` (rows, d) -> (rows, d) applied to the tokens at `positions` of act (B, T, d)."""
    sel = act[:, _index(positions)]
    return fn(sel.reshape(-1, sel.shape[-1])).reshape(sel.shape)


def downstream_metrics(model, sae, hook_name: str, batches: Iterable[tuple[Tensor, Tensor]], *,
                       positions: Positions = slice(None)) -> DownstreamMetrics:
    """Clean vs SAE-spliced vs zero-ablated forward passes at `hook_name`, at `positions`.

    `model(x)` gives logits; `model.run_with_hooks(x, fwd_hooks=[(name, fn)])` calls
    `fn(act, *, hook)` with act (B, T, d) and uses its return value as the replacement.
    """

    return spliced_downstream_metrics(model, sae_splice_hooks(sae, hook_name, positions=positions), hook_name,
                                      batches, positions=positions)


def sae_splice_hooks(sae, hook_name: str, *, positions: Positions = slice(None)) -> list[tuple[str, Callable]]:
    """The forward hook replacing `hook_name` at `positions` by the SAE's reconstruction."""

    def splice(act: Tensor, *, hook) -> Tensor:
        return _replaced(act, positions, _apply(lambda rows: sae(rows).x_hat, act, positions))

    return [(hook_name, splice)]


def transcoder_splice_hooks(transcoder, in_hook: str, out_hook: str, *,
                            positions: Positions = slice(None)) -> list[tuple[str, Callable]]:
    """Forward hooks replacing `out_hook` at `positions` by the transcoder's prediction from
    `in_hook` of the same forward pass (`in_hook` must run first, e.g. resid_mid -> mlp_out)."""
    held: dict[str, Tensor] = {}

    def read(act: Tensor, *, hook) -> None:
        held["x"] = act

    def write(act: Tensor, *, hook) -> Tensor:
        if "x" not in held:
            raise RuntimeError(f"{out_hook} ran before {in_hook}: a transcoder must read an earlier hook")
        x = held.pop("x")
        return _replaced(act, positions, _apply(lambda rows: transcoder(rows).y_hat, x, positions))

    return [(in_hook, read), (out_hook, write)]


def crosscoder_splice_hooks(model, crosscoder, hooks: Sequence[str], *, positions: Positions = slice(None),
                            splice: Sequence[str] | None = None) -> Callable[[Tensor], list]:
    """Per batch: the hooks in `splice` (default: every hook of the acausal crosscoder) replaced at
    `positions` by their reconstruction; the model runs on from there.

    The crosscoder reads all its layers at once (later ones included), so the clean activations
    come from a first forward pass and the reconstructions are spliced into a second. Splicing one
    layer alone tests that layer: with every layer spliced, the later ones overwrite whatever the
    earlier reconstructions caused."""
    splice = list(hooks) if splice is None else list(splice)
    unknown = sorted(set(splice) - set(hooks))
    if unknown:
        raise ValueError(f"splice={unknown}: the crosscoder reconstructs only {list(hooks)}")

    def make(x: Tensor) -> list[tuple[str, Callable]]:
        _, cache = model.run_with_cache(x, names_filter=list(hooks))
        acts = [cache[h] for h in hooks]
        sel = [a[:, _index(positions)] for a in acts]
        x_hat = crosscoder([s.reshape(-1, s.shape[-1]) for s in sel]).x_hat
        x_hat = x_hat.unbind(1) if isinstance(x_hat, Tensor) else x_hat
        recon = {h: _replaced(a, positions, r.reshape(s.shape)) for h, r, a, s in zip(hooks, x_hat, acts, sel)}
        return [(h, lambda act, *, hook, h=h: recon[h]) for h in splice]

    return make


@torch.no_grad()
def spliced_downstream_metrics(model, splice_hooks: list[tuple[str, Callable]] | Callable[[Tensor], list],
                               ablate_hooks: str | Sequence[str],
                               batches: Iterable[tuple[Tensor, Tensor]], *,
                               positions: Positions = slice(None)) -> DownstreamMetrics:
    """Clean vs spliced vs zero-ablated passes. `splice_hooks` are forward hooks, or a function
    of the batch returning them (e.g. `crosscoder_splice_hooks`); `ablate_hooks` are zeroed at
    `positions` (the tokens the dictionary replaces, so both sides of loss recovered match)."""
    ablate_hooks = [ablate_hooks] if isinstance(ablate_hooks, str) else list(ablate_hooks)

    def ablate(act: Tensor, *, hook) -> Tensor:
        return _replaced(act, positions, torch.zeros_like(act[:, _index(positions)]))

    n = 0
    ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    correct = dict.fromkeys(ce, 0)
    kl = {"spliced": 0.0, "ablated": 0.0}
    labelled = True
    pooled: dict[str, Tensor] = {}
    reads = [(POOLED, _keep(pooled, name)) for name in ("clean", "spliced", "ablated")] \
        if POOLED in _hook_names(model) else [None] * 3
    cos = {"spliced": 0.0, "ablated": 0.0}
    for x, labels in batches:
        spliced = splice_hooks(x) if callable(splice_hooks) else splice_hooks
        passes = {"clean": [], "spliced": list(spliced), "ablated": [(h, ablate) for h in ablate_hooks]}
        logits = {name: model.run_with_hooks(x, fwd_hooks=hooks + ([read] if read else []))
                  for (name, hooks), read in zip(passes.items(), reads)}
        if pooled:
            for name in cos:
                cos[name] += float(F.cosine_similarity(pooled["clean"].double(), pooled[name].double(), dim=-1).sum())
        clean_logp = logits["clean"].double().log_softmax(-1)
        labelled = labels is not None
        for name, lg in logits.items() if labelled else ():
            labels = labels.to(lg.device)
            ce[name] += float(F.cross_entropy(lg.double(), labels, reduction="sum"))
            correct[name] += int((lg.argmax(-1) == labels).sum())
        for name in kl:
            kl[name] += _kl_sum(clean_logp, logits[name])
        n += x.shape[0]
    if n == 0:
        raise ValueError("downstream_metrics got no images: pass at least one non-empty batch")
    mean_ce = {k: v / n if labelled else math.nan for k, v in ce.items()}
    mean_kl = {k: v / n for k, v in kl.items()}
    if labelled:
        gap, recovered_by = mean_ce["ablated"] - mean_ce["clean"], mean_ce["ablated"] - mean_ce["spliced"]
    else:  # the clean model's own distribution is the reference: its KL to itself is 0
        gap, recovered_by = mean_kl["ablated"], mean_kl["ablated"] - mean_kl["spliced"]
    return DownstreamMetrics(
        n_images=n,
        ce_clean=mean_ce["clean"],
        ce_spliced=mean_ce["spliced"],
        ce_ablated=mean_ce["ablated"],
        kl_spliced=mean_kl["spliced"],
        kl_ablated=mean_kl["ablated"],
        acc_clean=correct["clean"] / n if labelled else math.nan,
        acc_spliced=correct["spliced"] / n if labelled else math.nan,
        acc_ablated=correct["ablated"] / n if labelled else math.nan,
        loss_recovered=recovered_by / gap if gap != 0 else math.nan,
        ablation_gap=gap,
        cos_spliced=cos["spliced"] / n if pooled else math.nan,
        cos_ablated=cos["ablated"] / n if pooled else math.nan,
    )


POOLED = "hook_pooled"
"""The image embedding a HookedViT's head reads."""


def _hook_names(model) -> set[str]:
    """The hook points of a HookedViT, or of the tower under a zero-shot head."""
    hooked = getattr(model, "tower", model)
    return set(getattr(hooked, "hook_dict", {}))


def _keep(store: dict[str, Tensor], name: str) -> Callable:
    def read(act: Tensor, *, hook) -> None:
        store[name] = act.detach()
    return read
