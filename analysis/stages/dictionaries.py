"""Stages 4–6 for one suite member: train its dictionary, evaluate it, mine its features.

This is the flow every member kind shares (ids, done-markers, lineage, tables). What differs by
kind lives in one module per kind, `saes`, `transcoders` and `crosscoders`, each with the same
functions (`member_id`, `train_member`, `reconstruction`, `splice_hooks`, `extra_metrics`,
`mining_input`),
looked up in `KIND_STAGES` by `member.kind`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from analysis.catalog import table_number, typed_table, write_table_partition
from analysis.ids import code_modified, code_version
from analysis.integrity import atomic_write, file_lock, read_done, remove_temporaries, require_done, write_done
from analysis.data.images import open_images, read_labels
from analysis.models.inputs import to_model_input
from analysis.evaluation.downstream import DownstreamMetrics, spliced_downstream_metrics
from analysis.evaluation.metrics import ReconstructionMetrics, firing_fractions, log10_density_histogram
from analysis.evaluation.mining import mine_features
from analysis.evaluation.mining_counts import MAX_FACTOR_VALUES
from analysis.models.class_projection import direction_logits, has_classifier
from analysis.paths import DataRoot
from analysis.dictionaries import load_dictionary
from analysis.dictionaries.base import CONFIG_FILE, WEIGHTS_FILE
from analysis.dictionaries.resume import RESUME_DIR
from analysis.stages import crosscoders, saes, transcoders
from analysis.stages.activations import token_selection
from analysis.stages.arrivals import done_arrivals, mine_with_arrivals
from analysis.stages.dataset import dead_window_images, evaluation_images, split_indices
from analysis.stages.members import Member
from analysis.stages.machine import machine, note_reuse
from analysis.stages.model import load_model
from analysis.stages.suite import SuiteSpec

# Done-markers, each written last and vouching for the files its stage wrote (analysis.integrity)
SUMMARY_FILE = "train_summary.json"
EVALUATION_FILE = "evaluation.json"
FEATURES_FILE = "features.json"
HEATMAPS_FILE = "heatmaps.npy"
CHECKPOINT_EVERY = 200  # steps between resumable training states (a multiple of the log interval)

# member kind -> the module with that kind's half of these stages
KIND_STAGES: dict[str, ModuleType] = {"sae": saes, "transcoder": transcoders, "crosscoder": crosscoders}

# member fields of every kind, so one evaluations table holds all kinds (None where a kind has none)
_MEMBER_COLUMNS = {"out_hook": None, "hooks": None, "sparsity_coef": None, "skip": None}
# Their types where every row has None (`sparsity_coef` in an all-TopK suite); any other None is a metric.
MEMBER_NULL_TYPES = {"out_hook": pa.string(), "hooks": pa.list_(pa.string()), "sparsity_coef": pa.float64(),
               "skip": pa.bool_(), "k": pa.int64()}


def _stage(member: Member) -> ModuleType:
    return KIND_STAGES[member.kind]


def member_train_config(spec: SuiteSpec, member: Member, d_model: int):
    """The member's full trainer config (the suite section's overrides plus its grid values);
    raises ValueError naming an unknown key or a bad value."""
    return _stage(member).train_config(spec, member, d_model)


def dictionary_id(spec: SuiteSpec, member: Member) -> str:
    """The content id of the member's dictionary: its directory under the data root."""
    return _stage(member).member_id(spec, member)


def ensure_dictionary(spec: SuiteSpec, root: DataRoot, member: Member, *, dict_id: str | None = None,
                      device: str = "cpu", on_log: Callable[[dict], None] | None = None,
                      progress: bool = True, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train the member's dictionary unless it is done; `dict_id` saves recomputing its id.
    A second process training the same member waits for the first, then reuses its checkpoint:
    two never train into one `resume/` directory."""
    dict_id = dictionary_id(spec, member) if dict_id is None else dict_id
    directory = root.dictionary(dict_id)
    done = directory / SUMMARY_FILE
    with file_lock(root.lock(dict_id)):
        summary = read_done(done)  # None when absent, or damaged (logged): then trained again
        if summary is None:
            summary = _train(spec, root, member, dict_id, device, on_log, progress, on_step)
        else:
            lineage = dictionary_lineage(root, dict_id)
            summary.update(note_reuse(f"{member.kind} {dict_id}", lineage.get("machine"), device))
    return {**summary, "path": str(directory)}


def dictionary_lineage(root: DataRoot, dict_id: str) -> dict:
    """What a saved dictionary's config records about how it was made: member, store and its
    lineage, the full training config, code version, machine."""
    return json.loads((root.dictionary(dict_id) / CONFIG_FILE).read_text()).get("lineage", {})


def _train(spec: SuiteSpec, root: DataRoot, member: Member, dict_id: str, device: str,
           on_log: Callable[[dict], None] | None, progress: bool,
           on_step: Callable[[dict], None] | None = None) -> dict:
    directory = root.dictionary(dict_id)
    _remove_temporaries(root, dict_id, "train_log")
    train_idx, _ = split_indices(root, spec.dataset_id)
    # A killed run resumes from its last state in <dict dir>/resume and ends on the same weights.
    try:
        result, train_cfg, store_lineage = _stage(member).train_member(
            spec, root, member, train_idx, checkpoint_dir=directory, checkpoint_every=CHECKPOINT_EVERY,
            device=device, on_log=on_log, progress=progress, on_step=on_step)
    except RuntimeError as err:  # diverged: say where the last good state is, and keep it
        state = directory / RESUME_DIR / "state.json"
        kept = (f"the last good training state (step {json.loads(state.read_text())['step']}, weights at "
                f"training scale) is kept in {state.parent}" if state.exists()
                else "no training state was saved before it")
        raise RuntimeError(f"member {member.key}: {err}; {kept}") from err
    lineage = {"dict_id": dict_id, "kind": member.kind, **asdict(member), "store_id": spec.store_id,
               "store_lineage": store_lineage, "train_config": train_cfg, "code_version": code_version(),
               "code_modified": code_modified(), "machine": machine(device)}
    model = result[0]
    model.save(directory, extra_config=lineage)
    train_log = write_table_partition(root.table("train_log"), {"dict_id": dict_id}, pa.Table.from_pylist(result.log))
    summary = {"dict_id": dict_id, "steps": int(result.steps), "train_tokens": int(result.tokens),
               "train_seconds": round(float(result.seconds), 2),
               "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1)}
    write_done(directory / SUMMARY_FILE, summary, [directory / WEIGHTS_FILE, directory / CONFIG_FILE, train_log])
    shutil.rmtree(directory / RESUME_DIR, ignore_errors=True)  # optimizer state is not needed past here
    return summary


def load_member(spec: SuiteSpec, root: DataRoot, member: Member, device: str = "cpu", *,
                dict_id: str | None = None):
    """The member's trained dictionary, refused when its lineage is not this store and hook(s);
    `dict_id` saves recomputing its id."""
    path = root.dictionary(dictionary_id(spec, member) if dict_id is None else dict_id)
    require_done(path / SUMMARY_FILE, f"{member.kind} checkpoint",
                 f"materialize the dictionaries partition {member.key!r} again (make run does)")
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


def _labelled_batches(spec: SuiteSpec, root: DataRoot, eval_idx: np.ndarray,
                      device: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(model input, label) batches of the held-out images, for the downstream metrics; the
    label is None where the model's head does not predict the dataset's classes."""
    batch = spec.evaluation.batch_images
    images = open_images(root.images(spec.dataset_id))
    labels = torch.from_numpy(np.array(dataset_labels(spec, root), dtype=np.int64))  # ingested: -1 where unlabelled
    return ((to_model_input(images.get_orthogonal_selection((eval_idx[i:i + batch],)), device),
             labels[eval_idx[i:i + batch]].to(device) if spec.downstream == "labels" else None)
            for i in range(0, len(eval_idx), batch))


def _after_training(spec: SuiteSpec, root: DataRoot, member: Member, marker: str, tables: tuple[str, ...],
                    compute: Callable[[str], dict], current: Callable[[dict], bool] = lambda summary: True) -> dict:
    """The summary in the member's `marker`, or `compute(dict_id)` under the member's lock for this
    stage (a second process waits, then reuses it). Redone when a file it vouches for is damaged,
    when the weights it read were replaced since, or when `current(summary)` says its inputs have
    changed; a killed attempt's temporaries in the member's folder and its `tables` partitions are
    removed first."""
    dict_id = dictionary_id(spec, member)
    directory = root.dictionary(dict_id)
    with file_lock(root.lock(f"{dict_id}.{marker}")):
        summary = read_done(directory / marker, upstream=directory / SUMMARY_FILE)
        if summary is None or not current(summary):
            _remove_temporaries(root, dict_id, *tables)
            summary = compute(dict_id)
    return summary


def ensure_evaluation(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu",
                      dask_scheduler: str | None = None) -> dict:
    """The evaluations row and density histogram of `member`'s dictionary. `dask_scheduler` (an
    address): an SAE's dead-latent window, the one pass over more of the store than the other
    metrics read, runs on that dask cluster (`dask_passes.dictionary_pass`); its counts are exact,
    so the row is the same either way."""
    return _after_training(spec, root, member, EVALUATION_FILE, ("evaluations", "density_histogram"),
                           lambda dict_id: _evaluate(spec, root, member, dict_id, device, dask_scheduler))


def _evaluate(spec: SuiteSpec, root: DataRoot, member: Member, dict_id: str, device: str,
              dask_scheduler: str | None = None) -> dict:
    directory = root.dictionary(dict_id)
    dictionary = load_member(spec, root, member, device, dict_id=dict_id)
    eval_idx = evaluation_images(spec, root)
    model = load_model(spec, root, device=device)
    batches = lambda: _labelled_batches(spec, root, eval_idx, device)  # noqa: E731  (a fresh pass each call)
    stage = _stage(member)
    rec = stage.reconstruction(spec, root, member, dictionary, eval_idx, device=device)
    down = _downstream(member, dictionary, model, batches, token_selection(spec).keep)  # its trained tokens
    extra = stage.extra_metrics(spec, member, dictionary, rec, model, batches)
    extra.update(_fvu_by_token_kind(spec, root, member, dictionary, eval_idx, rec, device))
    extra.update(_downstream_by_token_kind(spec, member, dictionary, model, batches, down))
    row = {"dict_id": dict_id, "suite": spec.name, "kind": member.kind, "hook": member.hook,
           "downstream": spec.downstream, **_MEMBER_COLUMNS,
           **asdict(member), "architecture": member.architecture,
           "width": dictionary.cfg.width, "store_id": spec.store_id, "model_id": spec.model_id,
           "dataset_id": spec.dataset_id,
           **{k: float(v) for k, v in rec._asdict().items()
              if k not in ("fire_counts", "n_tokens", "fvu_per_slice")},
           "n_eval_tokens": int(rec.n_tokens), **{k: table_number(v) for k, v in down._asdict().items()}, **extra}
    row["n_images"] = int(row["n_images"])
    fire_counts, n_fire_tokens = _firing_over_split(spec, root, member, dictionary, eval_idx, rec, device,
                                                    dask_scheduler)
    row["dead_fraction"], row["dense_fraction"] = firing_fractions(fire_counts, n_fire_tokens)
    row["n_dead_tokens"] = int(n_fire_tokens)
    table = write_table_partition(root.table("evaluations"), {"dict_id": dict_id}, typed_table([row], MEMBER_NULL_TYPES))
    histogram = log10_density_histogram(fire_counts, n_fire_tokens)
    hist_table = write_table_partition(root.table("density_histogram"), {"dict_id": dict_id},
                                       pa.Table.from_pylist(histogram))
    # the weights too: a retrain that replaced them makes this evaluation stale (read_done's upstream)
    return write_done(directory / EVALUATION_FILE, row, [table, hist_table, directory / WEIGHTS_FILE])


def _firing_over_split(spec: SuiteSpec, root: DataRoot, member: Member, dictionary, eval_idx: np.ndarray,
                       rec, device: str, dask_scheduler: str | None = None) -> tuple[np.ndarray, int]:
    """(tokens each latent fired on, tokens counted) over the dead-latent window of the eval split
    (DESIGN.md §4), which is usually more than the `max_images` the other metrics use. An SAE's
    runs on the dask cluster at `dask_scheduler` when one is given (the other kinds read several
    hooks or a second one, which `dask_passes` does not)."""
    window = dead_window_images(spec, root, token_selection(spec).groups.n_tokens)
    if np.array_equal(window, eval_idx):
        return rec.fire_counts, rec.n_tokens
    if dask_scheduler and member.kind == "sae":
        from analysis.evaluation.dask_passes import connect, dictionary_pass  # dask only where it is asked for

        with connect(dask_scheduler):
            counted = dictionary_pass(root.hook_store(spec.store_id, member.hook), dictionary, window)
        return counted.fire_counts, counted.n_tokens
    whole = _stage(member).reconstruction(spec, root, member, dictionary, window, device=device)
    return whole.fire_counts, whole.n_tokens


def _fvu_by_token_kind(spec: SuiteSpec, root: DataRoot, member: Member, dictionary, eval_idx: np.ndarray,
                       rec: ReconstructionMetrics, device: str) -> dict:
    """FVU on the class token alone, the registers alone and the patch tokens alone (None for a
    kind the store does not keep), each against its own mean. The pooled FVU is dominated by the
    patches (16 of 17 tokens in the default mouse), while the classifier reads the class token: a
    dictionary can reconstruct patches well, CLS badly, and lose the task when spliced in."""
    groups = token_selection(spec).groups
    kinds = {f"fvu_{kind}": groups.positions(kind) for kind in ("cls", "registers", "patches")}
    if sum(p is not None for p in kinds.values()) == 1:  # one kind only: the pooled FVU is its own
        return {name: None if p is None else rec.fvu for name, p in kinds.items()}
    scorer = _stage(member).reconstruction
    return {name: None if p is None else scorer(spec, root, member, dictionary, eval_idx, device=device, positions=p).fvu
            for name, p in kinds.items()}


def _downstream(member: Member, dictionary, model, batches, positions) -> DownstreamMetrics:
    """Clean vs spliced vs zero-ablated passes with the member's output put in at `positions`."""
    hooks, ablate = _stage(member).splice_hooks(model, member, dictionary, positions)
    return spliced_downstream_metrics(model, hooks, ablate, batches(), positions=positions)


def _downstream_by_token_kind(spec: SuiteSpec, member: Member, dictionary, model, batches,
                              down: DownstreamMetrics) -> dict:
    """Loss recovered and ablation gap when only the class token, only the registers or only the
    patches are replaced (None for a kind the store does not keep): the head reads the class token,
    so the all-token number can hide that the loss comes from one kind."""
    kinds = token_selection(spec).model_positions
    out = {}
    for kind in ("cls", "registers", "patches"):
        if kind not in kinds:
            d = None
        elif len(kinds) == 1:  # one kind only: the all-token numbers are its own
            d = down
        else:
            d = _downstream(member, dictionary, model, batches, kinds[kind])
        out[f"loss_recovered_{kind}"] = None if d is None else table_number(d.loss_recovered)
        out[f"ablation_gap_{kind}"] = None if d is None else table_number(d.ablation_gap)
    return out


FEATURE_TABLES = ("top_images", "feature_stats", "top_images_cls", "feature_samples", "feature_factors")
"""The tables the features stage writes a partition of (top_images_cls only where the store keeps
a class token)."""
NOT_FACTORS = {"image_idx", "label", "split", "sha256", "source", "duplicate_of"}
"""labels.parquet columns that are bookkeeping, not attributes of an image's content."""


def ensure_features(spec: SuiteSpec, root: DataRoot, member: Member, *, device: str = "cpu",
                    dask_scheduler: str | None = None) -> dict:
    """Max-activating held-out images per latent, over the activations its latents read (the
    kind's `mining_input`: a transcoder's input hook, a crosscoder's hooks all at once). An SAE's
    is mined on the dask cluster at `dask_scheduler` when one is given (`dask_passes.mining_pass`,
    the same batches as in process)."""
    arrived = done_arrivals(spec, root)  # mined beside the held-out images; a new one redoes the tables
    return _after_training(spec, root, member, FEATURES_FILE, FEATURE_TABLES,
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
        kind = _stage(member)
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
        miner, batches = _stage(member).mining_input(spec, root, member, dictionary, eval_idx, device)
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


def dataset_labels(spec: SuiteSpec, root: DataRoot) -> np.ndarray | None:
    """Every image's label, by image index (row i of labels.parquet is image i), or None when
    the dataset has no label column."""
    table = read_labels(root.images(spec.dataset_id))
    if "label" not in table.column_names:
        return None
    order = table.column("image_idx").to_numpy()
    if not np.array_equal(order, np.arange(len(order))):
        raise ValueError(f"{root.images(spec.dataset_id)}/labels.parquet is not in image order: ingest it again")
    return table.column("label").to_numpy(zero_copy_only=False)


def dataset_factors(spec: SuiteSpec, root: DataRoot) -> dict[str, np.ndarray]:
    """The categorical per-image columns of labels.parquet beyond the label (the latent factors of
    generated shapes; extra columns of a label file), by image index: integer or text columns with at
    most MAX_FACTOR_VALUES distinct values."""
    table = read_labels(root.images(spec.dataset_id))
    factors = {}
    for name in table.column_names:
        column = table.column(name)
        if name in NOT_FACTORS or not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)):
            continue
        values = column.to_numpy(zero_copy_only=False)
        if len(pc.unique(column)) <= MAX_FACTOR_VALUES:
            factors[name] = values
    return factors


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save given a name would append ".npy" to it
        np.save(f, array)


def _remove_temporaries(root: DataRoot, dict_id: str, *tables: str) -> None:
    """Leftovers of a killed earlier attempt, in the member's folder and its table partitions (the
    caller holds the member's lock for this stage)."""
    remove_temporaries(root.dictionary(dict_id), *(root.table(t) / f"dict_id={dict_id}" for t in tables))
