"""The transcoder-specific half of stages 4–6 (config, training, metrics) for one suite member.

`analysis.stages.dictionaries` owns the shared flow (ids, done-markers, lineage, tables) and
calls these for members of kind "transcoder": a TopK transcoder reads `member.hook` and predicts
`member.out_hook` of the same tokens, trained on a paired loader over the two hook stores.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from torch import Tensor

from analysis.dictionaries import TopKTranscoder
from analysis.ids import content_id
from analysis.activations.reader import ActivationStore, iter_images, read_tokens
from analysis.evaluation.downstream import (
    transcoder_splice_hooks,
)
from analysis.evaluation.metrics import ReconstructionMetrics, prediction_metrics
from analysis.activations.multi_loader import PairedShuffledLoader
from analysis.paths import DataRoot
from analysis.stages.dataset import training_monitor_images
from analysis.stages.members import TranscoderMember
from analysis.stages.parsing import construct
from analysis.stages.suite import SuiteSpec
from analysis.dictionaries.training.loop import TrainResult
from analysis.dictionaries.training.transcoder import TranscoderTrainConfig, train_transcoder


def train_config(spec: SuiteSpec, member: TranscoderMember, d_in: int) -> TranscoderTrainConfig:
    grid = {"width": member.expansion * d_in, "k": member.k, "skip": member.skip, "seed": member.seed}
    return construct(TranscoderTrainConfig, {**spec.transcoders.train, **grid}, "transcoders.train")


def member_id(spec: SuiteSpec, member: TranscoderMember) -> str:
    d = spec.vit_config().d_model  # every hook a transcoder may pair is a d_model stream
    cfg = train_config(spec, member, d)
    return content_id("transcoder", {"member": asdict(member), "train": cfg.resolved(), "store": spec.store_id})


def _stores(spec: SuiteSpec, root: DataRoot, member: TranscoderMember) -> tuple[ActivationStore, ActivationStore]:
    return (ActivationStore.open(root.hook_store(spec.store_id, member.hook)),
            ActivationStore.open(root.hook_store(spec.store_id, member.out_hook)))


def train_member(spec: SuiteSpec, root: DataRoot, member: TranscoderMember, train_idx: np.ndarray, *,
                 checkpoint_dir: Path, checkpoint_every: int, device: str,
                 on_log: Callable[[dict], None] | None, progress: bool,
                 on_step: Callable[[dict], None] | None = None) -> tuple[TrainResult, dict, dict]:
    """(result, train config as a dict, input store lineage); resumes from `checkpoint_dir`."""
    store_in, store_out = _stores(spec, root, member)
    cfg = train_config(spec, member, store_in.d_model)
    make_loader = lambda: PairedShuffledLoader(  # noqa: E731
        store_in, store_out, train_idx, batch_size=cfg.batch_size, seed=member.seed, device=device)
    init_batch = next(iter(make_loader()))  # the same first batch on a resumed run
    held_out = training_monitor_images(spec, root)
    eval_batch = (read_tokens(store_in, held_out, device), read_tokens(store_out, held_out, device))
    loader = make_loader()
    result = train_transcoder(
        loader, cfg, mean_norm_in=float(store_in.stats.mean_norm), mean_norm_out=float(store_out.stats.mean_norm),
        init_batch=init_batch, progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        on_log=on_log, on_step=on_step, eval_batch=eval_batch)
    return result, cfg.resolved(), store_in.lineage


def reconstruction(spec: SuiteSpec, root: DataRoot, member: TranscoderMember, tc: TopKTranscoder,
                   eval_idx: np.ndarray, *, device: str, positions: slice = slice(None)) -> ReconstructionMetrics:
    """Prediction metrics of `out_hook` from `hook` over the token `positions` of each image."""
    store_in, store_out = _stores(spec, root, member)
    batch = spec.evaluation.batch_images
    pairs = ((x[:, positions].to(device), y[:, positions].to(device)) for (_, x), (_, y) in zip(
        iter_images(store_in, eval_idx, images_per_batch=batch),
        iter_images(store_out, eval_idx, images_per_batch=batch), strict=True))
    return prediction_metrics(tc, pairs)


def splice_hooks(model, member: TranscoderMember, tc: TopKTranscoder, positions) -> tuple[list, list[str]]:
    """(forward hooks putting the prediction of `out_hook` from `hook` in at `positions`, the hooks an
    ablation zeroes)."""
    return transcoder_splice_hooks(tc, member.hook, member.out_hook, positions=positions), [member.out_hook]


def extra_metrics(spec: SuiteSpec, member: TranscoderMember, tc: TopKTranscoder, rec: ReconstructionMetrics, model,
                  batches) -> dict:
    """No columns beyond the shared ones."""
    return {}


def mining_input(spec: SuiteSpec, root: DataRoot, member: TranscoderMember, tc: TopKTranscoder,
                 eval_idx: np.ndarray, device: str) -> tuple[TopKTranscoder, Iterator[tuple[np.ndarray, Tensor]]]:
    """What `mine_features` reads: the transcoder and per-image activations of its input hook
    (its latents read `hook`; `out_hook` is only predicted)."""
    store_in = ActivationStore.open(root.hook_store(spec.store_id, member.hook))
    return tc, ((idx, acts.to(device)) for idx, acts in
                iter_images(store_in, eval_idx, images_per_batch=spec.evaluation.batch_images))
