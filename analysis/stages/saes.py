"""The SAE-specific half of stages 4–6 (config, training, metrics) for one suite member.

`analysis.stages.dictionaries` owns the shared flow (ids, done-markers, lineage, tables) and
calls these for members of kind "sae": one sparse autoencoder reads and reconstructs
`member.hook`, trained on a shuffled loader over that hook's store.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from torch import Tensor

from analysis.activations.loader import ShuffledLoader
from analysis.activations.reader import ActivationStore, iter_images, read_tokens
from analysis.dictionaries import SparseAutoencoder
from analysis.dictionaries.training.loop import TrainResult
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae
from analysis.evaluation.downstream import sae_splice_hooks
from analysis.evaluation.metrics import ReconstructionMetrics, reconstruction_metrics
from analysis.ids import content_id
from analysis.paths import DataRoot
from analysis.stages.dataset import training_monitor_images
from analysis.stages.members import SAEMember
from analysis.stages.parsing import construct
from analysis.stages.suite import SuiteSpec


def train_config(spec: SuiteSpec, member: SAEMember, d_in: int) -> SAETrainConfig:
    overrides = {"width": member.expansion * d_in, "architecture": member.architecture, "k": member.k,
                 "seed": member.seed}
    if member.sparsity_coef is not None:
        overrides["sparsity_coef"] = member.sparsity_coef
    return construct(SAETrainConfig, {**spec.dictionaries.train, **overrides}, "dictionaries.train")


def member_id(spec: SuiteSpec, member: SAEMember) -> str:
    cfg = train_config(spec, member, spec.vit_config().d_model)
    return content_id("sae", {"member": asdict(member), "train": cfg.resolved(), "store": spec.store_id})


def _store(spec: SuiteSpec, root: DataRoot, member: SAEMember) -> ActivationStore:
    return ActivationStore.open(root.hook_store(spec.store_id, member.hook))


def train_member(spec: SuiteSpec, root: DataRoot, member: SAEMember, train_idx: np.ndarray, *,
                 checkpoint_dir: Path, checkpoint_every: int, device: str,
                 on_log: Callable[[dict], None] | None, progress: bool,
                 on_step: Callable[[dict], None] | None = None) -> tuple[TrainResult, dict, dict]:
    """(result, train config as a dict, store lineage); resumes from `checkpoint_dir`."""
    store = _store(spec, root, member)
    cfg = train_config(spec, member, store.d_model)
    make_loader = lambda: ShuffledLoader(  # noqa: E731
        store, train_idx, batch_size=cfg.batch_size, seed=member.seed, device=device)
    init_batch = next(iter(make_loader()))  # the same first batch on a resumed run
    # held-out tokens for the eval_fvu column of the training log (never trained on)
    eval_tokens = read_tokens(store, training_monitor_images(spec, root), device)
    result = train_sae(make_loader(), store.d_model, cfg, mean_norm=float(store.stats.mean_norm),
                       init_batch=init_batch, progress=progress, on_log=on_log, on_step=on_step,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                       eval_tokens=eval_tokens)
    return result, cfg.resolved(), store.lineage


def reconstruction(spec: SuiteSpec, root: DataRoot, member: SAEMember, sae: SparseAutoencoder,
                   eval_idx: np.ndarray, *, device: str, positions: slice = slice(None)) -> ReconstructionMetrics:
    """Reconstruction metrics of `hook` over the token `positions` of each image."""
    tokens = (acts[:, positions].reshape(-1, acts.shape[-1]).to(device) for _, acts in
              iter_images(_store(spec, root, member), eval_idx, images_per_batch=spec.evaluation.batch_images))
    return reconstruction_metrics(sae, tokens)


def splice_hooks(model, member: SAEMember, sae: SparseAutoencoder, positions) -> tuple[list, list[str]]:
    """(forward hooks putting the reconstruction of `hook` in at `positions`, the hooks an ablation zeroes)."""
    return sae_splice_hooks(sae, member.hook, positions=positions), [member.hook]


def extra_metrics(spec: SuiteSpec, member: SAEMember, sae: SparseAutoencoder, rec: ReconstructionMetrics, model,
                  batches) -> dict:
    """No columns beyond the shared ones."""
    return {}


def mining_input(spec: SuiteSpec, root: DataRoot, member: SAEMember, sae: SparseAutoencoder,
                 eval_idx: np.ndarray, device: str) -> tuple[SparseAutoencoder, Iterator[tuple[np.ndarray, Tensor]]]:
    """What `mine_features` reads: the SAE itself and per-image activations of `hook`."""
    return sae, ((idx, acts.to(device)) for idx, acts in
                 iter_images(_store(spec, root, member), eval_idx, images_per_batch=spec.evaluation.batch_images))
