"""Stage 6 for one suite member: mine its dictionary's features (the `features` asset).

The top-activating held-out images of every latent, with their token heatmaps, a sample across
each latent's activation range and the per-latent statistics (`analysis.evaluation.mining`),
written as one partition per dictionary of the FEATURE_TABLES plus `heatmaps.npy`, vouched for by
the member's `features.json`. A suite that watches a folder mines its arrivals beside the held-out
images (`analysis.stages.arrivals`); a dask scheduler mines an SAE on its cluster.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from analysis.catalog import write_table_partition
from analysis.dictionaries.base import WEIGHTS_FILE
from analysis.evaluation.mining import mine_features
from analysis.integrity import atomic_write, write_done
from analysis.models.class_projection import direction_logits, has_classifier
from analysis.paths import DataRoot
from analysis.stages.activations import token_selection
from analysis.stages.arrivals import done_arrivals, mine_with_arrivals
from analysis.stages.dataset import dataset_factors, dataset_labels, evaluation_images
from analysis.stages.dictionaries import (FEATURES_FILE, HEATMAPS_FILE, SUMMARY_FILE, after_training, kind_stage,
                                         load_member)
from analysis.stages.members import Member
from analysis.stages.model import load_model
from analysis.stages.suite import SuiteSpec

FEATURE_TABLES = ("top_images", "feature_stats", "top_images_cls", "feature_samples", "feature_factors")
"""The tables the features stage writes a partition of (top_images_cls only where the store keeps
a class token)."""


def ensure_features(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu",
                    dask_scheduler: str | None = None) -> dict:
    """Max-activating held-out images per latent, over the activations its latents read (the
    kind's `mining_input`: a transcoder's input hook, a crosscoder's hooks all at once). An SAE's
    is mined on the dask cluster at `dask_scheduler` when one is given (`dask_passes.mining_pass`,
    the same batches as in process)."""
    arrived = done_arrivals(spec, root)  # mined beside the held-out images; a new one redoes the tables
    return after_training(spec, root, member, FEATURES_FILE, FEATURE_TABLES,
                          lambda dict_id: _mine(spec, root, member, dict_id, device, dask_scheduler, arrived),
                          current=lambda summary: summary.get("arrivals", []) == arrived)


def _mine(spec: SuiteSpec, root: DataRoot, member: Member, dict_id: str, device: str,
          dask_scheduler: str | None = None, arrived: list[dict] = ()) -> dict:
    directory = root.dictionary(dict_id)
    dictionary = load_member(spec, root, member, device, dict_id=dict_id)
    eval_idx = evaluation_images(spec, root)
    groups = token_selection(spec).groups
    options = dict(n_top=spec.evaluation.n_top, labels=dataset_labels(spec, root), factors=dataset_factors(spec, root),
                   cls=groups.cls, patches=groups.patches)
    if spec.arrivals.path is not None:  # the suite takes arrivals: every part's state is kept for merging
        kind = kind_stage(member)
        miner, _ = kind.mining_input(spec, root, member, dictionary, eval_idx[:0], device)
        mined = mine_with_arrivals(root, directory, directory / SUMMARY_FILE, list(arrived), miner,
                                   lambda part, idx: kind.mining_input(part, root, member, dictionary, idx, device)[1],
                                   spec, eval_idx, options)
    elif dask_scheduler and member.kind == "sae":
        from analysis.evaluation.dask_passes import connect, mining_pass  # dask only where it is asked for

        with connect(dask_scheduler):
            mined = mining_pass(root.hook_store(spec.store_id, member.hook), dictionary, eval_idx,
                                images_per_batch=spec.evaluation.batch_images, **options)
    else:
        miner, batches = kind_stage(member).mining_input(spec, root, member, dictionary, eval_idx, device)
        mined = mine_features(miner, batches, **options)
    feature_stats = mined.feature_stats
    for name, column in _head_classes(spec, root, member, dictionary, device).items():
        feature_stats = feature_stats.append_column(name, column)
    partition = {"dict_id": dict_id}
    files = [write_table_partition(root.table("top_images"), partition, mined.top_images),
             write_table_partition(root.table("feature_stats"), partition, feature_stats),
             write_table_partition(root.table("feature_samples"), partition, mined.samples),
             # written even when empty, so the view (and a query over it) exists for every dataset
             write_table_partition(root.table("feature_factors"), partition, mined.factor_stats),
             *([] if mined.top_images_cls is None else
               [write_table_partition(root.table("top_images_cls"), partition, mined.top_images_cls)]),
             atomic_write(directory / HEATMAPS_FILE, lambda tmp: _save_npy(tmp, mined.heatmaps)),
             directory / WEIGHTS_FILE]
    alive = int((np.asarray(mined.feature_stats.column("fire_count")) > 0).sum())
    summary = {"dict_id": dict_id, "n_features": int(dictionary.cfg.width), "n_alive": alive,
               "n_top_rows": mined.top_images.num_rows}
    if arrived:  # which images the tables cover beyond the held-out split: readers resolve ids with it
        summary["arrivals"] = list(arrived)
    return write_done(directory / FEATURES_FILE, summary, files)


HEAD_TOP = 3
"""Classes kept per feature in head_top3."""


def _head_classes(spec: SuiteSpec, root: DataRoot, member: Member, dictionary, device: str) -> dict[str, pa.Array]:
    """Per feature, the classes its decoder direction promotes when read through the model's head
    (`direction_logits`, the class-embedding view of Vilas et al.): head_top_class, its score and
    head_top3. A crosscoder is read at its last layer. Null where the model has no classifier or the
    dictionary writes outside the residual stream."""
    width = int(dictionary.cfg.width)
    columns = {"head_top_class": pa.nulls(width, pa.string()), "head_top_score": pa.nulls(width, pa.float32()),
               "head_top3": pa.nulls(width, pa.list_(pa.string()))}
    model = load_model(spec, root, device)
    tower = getattr(model, "tower", model)
    directions = dictionary.W_dec.detach()
    if member.kind == "crosscoder":
        directions = directions[:, dictionary.cfg.slices()[-1]]
    if not has_classifier(model) or directions.shape[-1] != tower.cfg.d_model:
        return columns
    logits = direction_logits(model, directions)
    names = _head_class_names(spec, model, logits.shape[1])
    scores, top = logits.topk(min(HEAD_TOP, logits.shape[1]), dim=1)
    top = top.cpu().numpy()
    return {"head_top_class": pa.array([names[t[0]] for t in top]),
            "head_top_score": pa.array(scores[:, 0].float().cpu().numpy()),
            "head_top3": pa.array([[names[i] for i in t] for t in top], pa.list_(pa.string()))}


def _head_class_names(spec: SuiteSpec, model, n_classes: int) -> list[str]:
    """The head's class names: a zero-shot head's own, the dataset's where the head has as many
    outputs, else the output indices (a pretrained head over classes the dataset does not name)."""
    head_names = getattr(getattr(model, "head", None), "class_names", None)
    if head_names is not None:
        return list(head_names)
    names = spec.class_names()
    return list(names) if len(names) == n_classes else [str(i) for i in range(n_classes)]


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save given a name would append ".npy" to it
        np.save(f, array)
