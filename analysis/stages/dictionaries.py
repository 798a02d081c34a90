"""Stage 4–6 for one suite member: train its dictionary, evaluate it, mine its features.

The flow (ids, done-markers, lineage, tables) is shared by every member kind; the SAE-specific
parts are here and the transcoder-specific ones in `analysis.stages.transcoders`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from analysis.catalog import write_table_partition
from analysis.ids import code_version, content_id
from analysis.data.images import open_images, read_labels
from analysis.models.inputs import to_model_input
from analysis.activations.reader import ActivationStore, iter_images, read_tokens
from analysis.activations.loader import ShuffledLoader
from analysis.evaluation.downstream import downstream_metrics
from analysis.evaluation.metrics import log10_density_histogram, reconstruction_metrics
from analysis.evaluation.mining import mine_features
from analysis.paths import DataRoot
from analysis.dictionaries import load_dictionary
from analysis.dictionaries.resume import RESUME_DIR
from analysis.stages.dataset import evaluation_images, split_indices, training_monitor_images
from analysis.stages import crosscoders, transcoders
from analysis.stages.activations import token_selection
from analysis.stages.model import load_model
from analysis.stages.suite import DictionaryMember, Member, SuiteSpec
from analysis.dictionaries.training.sae import SAETrainConfig, train_sae

SUMMARY_FILE = "train_summary.json"  # written last: its presence marks a finished checkpoint


CHECKPOINT_EVERY = 200  # steps between resumable training states (a multiple of the log interval)

# member kind -> module with its member_id, train_member, evaluate_member, reconstruction
KIND_STAGES = {"transcoder": transcoders, "crosscoder": crosscoders}


def train_config(spec: SuiteSpec, member: DictionaryMember, d_in: int) -> SAETrainConfig:
    overrides = {"width": member.expansion * d_in, "architecture": member.architecture, "k": member.k,
                 "seed": member.seed}
    if member.sparsity_coef is not None:
        overrides["sparsity_coef"] = member.sparsity_coef
    return SAETrainConfig(**{**spec.dictionaries.train, **overrides})


def dictionary_id(spec: SuiteSpec, member: Member) -> str:
    if member.kind in KIND_STAGES:
        return KIND_STAGES[member.kind].member_id(spec, member)
    cfg = train_config(spec, member, spec.model_config().vit.d_model)
    return content_id("sae", {"member": asdict(member), "train": asdict(cfg), "store": spec.store_id})


def _open_store(spec: SuiteSpec, root: DataRoot, hook: str) -> ActivationStore:
    return ActivationStore.open(root.hook_store(spec.store_id, hook))


def ensure_dictionary(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu",
                      on_log: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    dict_id = dictionary_id(spec, member)
    directory = root.dictionary(dict_id)
    done = directory / SUMMARY_FILE
    if not done.exists():
        train_idx, _ = split_indices(root, spec.dataset_id)
        train = KIND_STAGES[member.kind].train_member if member.kind in KIND_STAGES else _train_sae_member
        # A killed run resumes from its last state in <dict dir>/resume and ends on the same weights.
        try:
            result, train_cfg, store_lineage = train(
                spec, root, member, train_idx, checkpoint_dir=directory, checkpoint_every=CHECKPOINT_EVERY,
                device=device, on_log=on_log, progress=progress)
        except RuntimeError as err:  # diverged: say where the last good state is, and keep it
            state = directory / RESUME_DIR / "state.json"
            kept = (f"the last good training state (step {json.loads(state.read_text())['step']}, weights at "
                    f"training scale) is kept in {state.parent}" if state.exists()
                    else "no training state was saved before it")
            raise RuntimeError(f"member {member.key}: {err}; {kept}") from err
        lineage = {"dict_id": dict_id, "kind": member.kind, **asdict(member), "store_id": spec.store_id,
                   "store_lineage": store_lineage, "train_config": train_cfg, "code_version": code_version()}
        model = result[0]
        model.save(directory, extra_config=lineage)
        write_table_partition(root.table("train_log"), {"dict_id": dict_id}, pa.Table.from_pylist(result.log))
        summary = {"dict_id": dict_id, "steps": int(result.steps), "train_tokens": int(result.tokens),
                   "train_seconds": round(float(result.seconds), 2),
                   "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1)}
        done.write_text(json.dumps(summary, indent=2))
        shutil.rmtree(directory / RESUME_DIR, ignore_errors=True)  # optimizer state is not needed past here
    return {**json.loads(done.read_text()), "path": str(directory)}


def _train_sae_member(spec: SuiteSpec, root: DataRoot, member: DictionaryMember, train_idx: np.ndarray, *,
                      checkpoint_dir, checkpoint_every: int, device: str,
                      on_log: Callable[[dict], None] | None, progress: bool):
    store = _open_store(spec, root, member.hook)
    cfg = train_config(spec, member, store.d_model)
    make_loader = lambda: ShuffledLoader(  # noqa: E731
        store, train_idx, batch_size=cfg.batch_size, seed=member.seed, device=device)
    init_batch = next(iter(make_loader()))  # the same first batch on a resumed run
    # held-out tokens for the eval_fvu column of the training log (never trained on)
    eval_tokens = read_tokens(store, training_monitor_images(spec, root), device)
    result = train_sae(make_loader(), store.d_model, cfg, mean_norm=float(store.stats.mean_norm),
                       init_batch=init_batch, progress=progress, on_log=on_log,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                       eval_tokens=eval_tokens)
    return result, asdict(cfg), store.lineage


def load_member(spec: SuiteSpec, root: DataRoot, member: Member, device: str = "cpu"):
    """The member's trained dictionary, refused when its lineage is not this store and hook(s)."""
    path = root.dictionary(dictionary_id(spec, member))
    model = load_dictionary(path, device=device)
    lineage = model.lineage or {}
    # the member fields that name hooks: hook (SAE), hook + out_hook (transcoder), hooks (crosscoder);
    # JSON round trip so a saved list compares equal to the member's tuple
    wanted = json.loads(json.dumps({k: v for k, v in asdict(member).items() if "hook" in k}))
    got = {k: lineage.get(k) for k in wanted}
    if (lineage.get("store_id"), got) != (spec.store_id, wanted):
        raise ValueError(
            f"{member.kind} at {path} was trained on store {lineage.get('store_id')!r}, {got} "
            f"(lineage {lineage.get('store_lineage')}), but this suite member reads store {spec.store_id!r}, "
            f"{wanted}: delete that directory and rematerialize the member"
        )
    return model


def ensure_evaluation(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu") -> dict:
    dict_id = dictionary_id(spec, member)
    directory = root.dictionary(dict_id)
    done = directory / "evaluation.json"
    if not done.exists():
        dictionary = load_member(spec, root, member, device)
        eval_idx = evaluation_images(spec, root)
        batch = spec.evaluation.batch_images
        images = open_images(root.images(spec.dataset_id))
        labels = torch.from_numpy(read_labels(root.images(spec.dataset_id)).column("label").to_numpy().copy())
        model = load_model(spec, root, device=device)
        model_batches = ((to_model_input(images.get_orthogonal_selection((eval_idx[i:i + batch],)), device),
                          labels[eval_idx[i:i + batch]].to(device)) for i in range(0, len(eval_idx), batch))
        extra = {}
        if member.kind in KIND_STAGES:
            rec, down, extra = KIND_STAGES[member.kind].evaluate_member(
                spec, root, member, dictionary, eval_idx, model, model_batches, device=device)
        else:
            rec = _sae_reconstruction(spec, root, member, dictionary, eval_idx, device=device)
            down = downstream_metrics(model, dictionary, member.hook, model_batches,
                                      positions=token_selection(spec).keep)
        extra.update(_fvu_by_token_kind(spec, root, member, dictionary, eval_idx, rec, device))
        row = {"dict_id": dict_id, "suite": spec.name, "kind": member.kind, "hook": member.hook, "out_hook": None,
               "hooks": None, "sparsity_coef": None, "skip": None, **asdict(member),
               "architecture": member.architecture,
               "width": dictionary.cfg.width, "store_id": spec.store_id, "model_id": spec.model_id,
               "dataset_id": spec.dataset_id,
               **{k: float(v) for k, v in rec._asdict().items() if k not in ("fire_counts", "n_tokens")},
               "n_eval_tokens": int(rec.n_tokens), **{k: float(v) for k, v in down._asdict().items()}, **extra}
        row["n_images"] = int(row["n_images"])
        write_table_partition(root.table("evaluations"), {"dict_id": dict_id}, pa.Table.from_pylist([row]))
        histogram = log10_density_histogram(rec.fire_counts, rec.n_tokens)
        write_table_partition(root.table("density_histogram"), {"dict_id": dict_id},
                              pa.Table.from_pylist(histogram))
        done.write_text(json.dumps(row, indent=2))
    return json.loads(done.read_text())


def _sae_reconstruction(spec: SuiteSpec, root: DataRoot, member: DictionaryMember, sae, eval_idx: np.ndarray, *,
                        device: str, positions: slice = slice(None)):
    store = _open_store(spec, root, member.hook)
    tokens = (acts[:, positions].reshape(-1, acts.shape[-1]).to(device) for _, acts in
              iter_images(store, eval_idx, images_per_batch=spec.evaluation.batch_images))
    return reconstruction_metrics(sae, tokens)


def _fvu_by_token_kind(spec: SuiteSpec, root: DataRoot, member: Member, dictionary, eval_idx: np.ndarray,
                       rec, device: str) -> dict:
    """FVU on the class token alone, the registers alone and the patch tokens alone (None for a
    kind the store does not keep), each against its own mean. The pooled FVU is dominated by the
    patches (16 of 17 tokens in the default mouse), while the classifier reads the class token: a
    dictionary can reconstruct patches well, CLS badly, and lose the task when spliced in."""
    groups = token_selection(spec).groups
    kinds = {f"fvu_{kind}": groups.positions(kind) for kind in ("cls", "registers", "patches")}
    if sum(p is not None for p in kinds.values()) == 1:  # one kind only: the pooled FVU is its own
        return {name: None if p is None else rec.fvu for name, p in kinds.items()}
    stage = KIND_STAGES.get(member.kind)
    scorer = stage.reconstruction if stage is not None else _sae_reconstruction
    return {name: None if p is None else scorer(spec, root, member, dictionary, eval_idx, device=device, positions=p).fvu
            for name, p in kinds.items()}


def ensure_features(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu") -> dict:
    """Max-activating held-out images per latent (a transcoder's latents read its input hook, a
    crosscoder's all of its hooks)."""
    dict_id = dictionary_id(spec, member)
    directory = root.dictionary(dict_id)
    done = directory / "features.json"
    if not done.exists():
        dictionary = load_member(spec, root, member, device)
        eval_idx = evaluation_images(spec, root)
        if member.kind == "crosscoder":  # its latents read every hook at once
            miner, batches = crosscoders.mining_input(spec, root, member, dictionary, eval_idx, device)
        else:
            store = _open_store(spec, root, member.hook)
            miner, batches = dictionary, ((idx, acts.to(device)) for idx, acts in
                                          iter_images(store, eval_idx, images_per_batch=spec.evaluation.batch_images))
        mined = mine_features(miner, batches, n_top=spec.evaluation.n_top)
        write_table_partition(root.table("top_images"), {"dict_id": dict_id}, mined.top_images)
        write_table_partition(root.table("feature_stats"), {"dict_id": dict_id}, mined.feature_stats)
        np.save(directory / "heatmaps.npy", mined.heatmaps)
        alive = int((np.asarray(mined.feature_stats.column("fire_count")) > 0).sum())
        summary = {"dict_id": dict_id, "n_features": int(dictionary.cfg.width), "n_alive": alive,
                   "n_top_rows": mined.top_images.num_rows}
        done.write_text(json.dumps(summary, indent=2))
    return json.loads(done.read_text())
