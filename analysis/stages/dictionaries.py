"""Stages 4–5 for one suite member: train its dictionary and evaluate it (mining, stage 6, is
`analysis.stages.features`, on the same `after_training` flow).

This is the flow every member kind shares (ids, done-markers, lineage, tables). What differs by
kind lives in one module per kind, `saes`, `transcoders` and `crosscoders`, each with the same
functions (`member_id`, `train_member`, `reconstruction`, `splice_hooks`, `extra_metrics`,
`mining_input`), looked up in `KIND_STAGES` by `member.kind` (`kind_stage`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from analysis.catalog import table_number, typed_table, write_table_partition
from analysis.ids import code_modified, code_version
from analysis.integrity import file_lock, read_done, remove_temporaries, require_done, write_done
from analysis.data.images import open_images
from analysis.models.inputs import to_model_input
from analysis.evaluation.downstream import DownstreamMetrics, spliced_downstream_metrics
from analysis.evaluation.metrics import ReconstructionMetrics, firing_fractions, log10_density_histogram
from analysis.paths import DataRoot
from analysis.dictionaries import load_dictionary
from analysis.dictionaries.base import CONFIG_FILE, WEIGHTS_FILE
from analysis.dictionaries.resume import RESUME_DIR
from analysis.stages import crosscoders, saes, transcoders
from analysis.stages.activations import token_selection
from analysis.stages.dataset import dataset_labels, dead_window_images, evaluation_images, split_indices
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


def kind_stage(member: Member) -> ModuleType:
    return KIND_STAGES[member.kind]


def member_train_config(spec: SuiteSpec, member: Member, d_model: int):
    """The member's full trainer config (the suite section's overrides plus its grid values);
    raises ValueError naming an unknown key or a bad value."""
    return kind_stage(member).train_config(spec, member, d_model)


def dictionary_id(spec: SuiteSpec, member: Member) -> str:
    """The content id of the member's dictionary: its directory under the data root."""
    return kind_stage(member).member_id(spec, member)


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
        result, train_cfg, store_lineage = kind_stage(member).train_member(
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


def after_training(spec: SuiteSpec, root: DataRoot, member: Member, marker: str, tables: tuple[str, ...],
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
    return after_training(spec, root, member, EVALUATION_FILE, ("evaluations", "density_histogram"),
                           lambda dict_id: _evaluate(spec, root, member, dict_id, device, dask_scheduler))


def _evaluate(spec: SuiteSpec, root: DataRoot, member: Member, dict_id: str, device: str,
              dask_scheduler: str | None = None) -> dict:
    directory = root.dictionary(dict_id)
    dictionary = load_member(spec, root, member, device, dict_id=dict_id)
    eval_idx = evaluation_images(spec, root)
    model = load_model(spec, root, device=device)
    batches = lambda: _labelled_batches(spec, root, eval_idx, device)  # noqa: E731  (a fresh pass each call)
    stage = kind_stage(member)
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
    whole = kind_stage(member).reconstruction(spec, root, member, dictionary, window, device=device)
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
    scorer = kind_stage(member).reconstruction
    return {name: None if p is None else scorer(spec, root, member, dictionary, eval_idx, device=device, positions=p).fvu
            for name, p in kinds.items()}


def _downstream(member: Member, dictionary, model, batches, positions) -> DownstreamMetrics:
    """Clean vs spliced vs zero-ablated passes with the member's output put in at `positions`."""
    hooks, ablate = kind_stage(member).splice_hooks(model, member, dictionary, positions)
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


def _remove_temporaries(root: DataRoot, dict_id: str, *tables: str) -> None:
    """Leftovers of a killed earlier attempt, in the member's folder and its table partitions (the
    caller holds the member's lock for this stage)."""
    remove_temporaries(root.dictionary(dict_id), *(root.table(t) / f"dict_id={dict_id}" for t in tables))
