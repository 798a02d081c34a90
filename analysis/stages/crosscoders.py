"""The crosscoder-specific half of stages 4–6 (config, training, metrics) for one suite member.

`analysis.stages.dictionaries` owns the shared flow (ids, done-markers, lineage, tables) and
calls these for members of kind "crosscoder": one acausal crosscoder reads and reconstructs all
of `member.hooks` at once, trained on an aligned loader over the hooks' stores.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from analysis.dictionaries import Crosscoder, SAEOutput
from analysis.catalog import table_number
from analysis.ids import content_id
from analysis.activations.reader import ActivationStore, iter_images, read_tokens
from analysis.evaluation.downstream import (
    crosscoder_splice_hooks,
    spliced_downstream_metrics,
)
from analysis.evaluation.metrics import ReconstructionMetrics, reconstruction_metrics
from analysis.activations.multi_loader import MultiShuffledLoader
from analysis.paths import DataRoot
from analysis.stages.activations import token_selection
from analysis.stages.dataset import training_monitor_images
from analysis.stages.members import CrosscoderMember
from analysis.stages.parsing import construct
from analysis.stages.suite import SuiteSpec
from analysis.dictionaries.training.loop import TrainResult
from analysis.dictionaries.training.crosscoder import CrosscoderTrainConfig, train_crosscoder


def train_config(spec: SuiteSpec, member: CrosscoderMember, d: int) -> CrosscoderTrainConfig:
    grid = {"width": member.expansion * d, "architecture": member.architecture, "k": member.k,
            "sparsity_coef": member.sparsity_coef, "seed": member.seed}
    return construct(CrosscoderTrainConfig, {**spec.crosscoders.train, **grid}, "crosscoders.train")


def member_id(spec: SuiteSpec, member: CrosscoderMember) -> str:
    cfg = train_config(spec, member, spec.vit_config().d_model)
    return content_id("crosscoder", {"member": asdict(member), "train": cfg.resolved(), "store": spec.store_id})


def _stores(spec: SuiteSpec, root: DataRoot, member: CrosscoderMember) -> list[ActivationStore]:
    return [ActivationStore.open(root.hook_store(spec.store_id, h)) for h in member.hooks]


def train_member(spec: SuiteSpec, root: DataRoot, member: CrosscoderMember, train_idx: np.ndarray, *,
                 checkpoint_dir: Path, checkpoint_every: int, device: str,
                 on_log: Callable[[dict], None] | None, progress: bool,
                 on_step: Callable[[dict], None] | None = None) -> tuple[TrainResult, dict, dict]:
    """(result, train config as a dict, first store's lineage); resumes from `checkpoint_dir`."""
    stores = _stores(spec, root, member)
    cfg = train_config(spec, member, stores[0].d_model)
    make_loader = lambda: MultiShuffledLoader(  # noqa: E731
        stores, train_idx, batch_size=cfg.batch_size, seed=member.seed, device=device)
    init_batch = next(iter(make_loader()))  # the same first batch on a resumed run
    held_out = training_monitor_images(spec, root)
    eval_batch = [read_tokens(s, held_out, device) for s in stores]
    loader = make_loader()
    result = train_crosscoder(loader, cfg, mean_norms=loader.mean_norms, init_batch=init_batch, progress=progress,
                              on_log=on_log, on_step=on_step, checkpoint_dir=checkpoint_dir,
                              checkpoint_every=checkpoint_every, eval_batch=eval_batch)
    return result, cfg.resolved(), stores[0].lineage


class ConcatenatedView(nn.Module):
    """A crosscoder seen as an SAE over the concatenated layers (tokens, Σ d_l): what the shared
    metrics and mining code take (`cfg.width`, `__call__ -> (x_hat, top_acts, top_indices)`,
    `encode`, `dense_latents`)."""

    def __init__(self, crosscoder: Crosscoder):
        super().__init__()
        self.crosscoder, self.cfg = crosscoder, crosscoder.cfg

    def forward(self, x_cat: Tensor):
        enc = self.crosscoder.encode_concat(x_cat)
        x_hat = self.crosscoder.decode_concat(enc.top_acts, enc.top_indices)
        return SAEOutput(x_hat, enc.top_acts, enc.top_indices)

    def encode(self, x_cat: Tensor):
        return self.crosscoder.encode_concat(x_cat)

    def dense_latents(self, x_cat: Tensor) -> Tensor:
        enc = self.crosscoder.encode_concat(x_cat)
        return enc.top_acts.new_zeros(enc.top_acts.shape[0], self.cfg.width).scatter_(1, enc.top_indices, enc.top_acts)


def iter_concatenated(spec: SuiteSpec, root: DataRoot, member: CrosscoderMember, image_indices: np.ndarray,
                      positions: slice = slice(None)) -> Iterator[tuple[np.ndarray, Tensor]]:
    """(image_idx (n,), acts (n, T, Σ d_l)): every hook of the member, side by side per token."""
    streams = [iter_images(s, image_indices, images_per_batch=spec.evaluation.batch_images)
               for s in _stores(spec, root, member)]
    for parts in zip(*streams, strict=True):
        yield parts[0][0], torch.cat([acts[:, positions] for _, acts in parts], dim=-1)


def reconstruction(spec: SuiteSpec, root: DataRoot, member: CrosscoderMember, cc: Crosscoder,
                   eval_idx: np.ndarray, *, device: str, positions: slice = slice(None)) -> ReconstructionMetrics:
    """Pooled metrics over the concatenated layers, and the FVU of each layer (`fvu_per_slice`)
    from the same pass, on the token `positions` of each image."""
    tokens = (a.reshape(-1, a.shape[-1]).to(device) for _, a in
              iter_concatenated(spec, root, member, eval_idx, positions))
    return reconstruction_metrics(ConcatenatedView(cc), tokens, slices=cc.cfg.slices())


def extra_metrics(spec: SuiteSpec, member: CrosscoderMember, cc: Crosscoder, rec: ReconstructionMetrics, model,
                  batches) -> dict:
    """FVU per layer (from the pooled pass), and the loss with each layer alone spliced or ablated,
    the model running on: with every layer spliced, the later ones overwrite what the earlier
    reconstructions caused, so the all-layers number says little about the early layers."""
    positions = token_selection(spec).keep  # the tokens it was trained on
    per_layer = []
    for hook in member.hooks:
        hooks = crosscoder_splice_hooks(model, cc, member.hooks, positions=positions, splice=[hook])
        per_layer.append(spliced_downstream_metrics(model, hooks, [hook], batches(), positions=positions))
    return {"fvu_per_layer": list(rec.fvu_per_slice),
            "loss_recovered_per_layer": [table_number(d.loss_recovered) for d in per_layer],
            "ablation_gap_per_layer": [table_number(d.ablation_gap) for d in per_layer]}


def splice_hooks(model, member: CrosscoderMember, cc: Crosscoder, positions) -> tuple[object, list[str]]:
    """(per-batch forward hooks putting every layer's reconstruction in at `positions`, the hooks an
    ablation zeroes)."""
    return crosscoder_splice_hooks(model, cc, member.hooks, positions=positions), list(member.hooks)


def mining_input(spec: SuiteSpec, root: DataRoot, member: CrosscoderMember, cc: Crosscoder,
                 eval_idx: np.ndarray, device: str) -> tuple[ConcatenatedView, Iterator[tuple[np.ndarray, Tensor]]]:
    """What `mine_features` reads: the concatenated view and per-image concatenated activations."""
    return ConcatenatedView(cc), ((idx, acts.to(device)) for idx, acts in
                                  iter_concatenated(spec, root, member, eval_idx))
