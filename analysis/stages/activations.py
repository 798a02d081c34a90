"""Stage 3: residual-stream activations into Zarr, one store per hook, one partition per shard.

Stores live where `DataRoot.hook_store` says: under the data root, or under an fsspec URL.
"""

from __future__ import annotations


import numpy as np
import torch

from analysis.activations.store import StoreLayout, create_store, shard_intact
from analysis.activations.extract import extract_shard
from analysis.activations.stats import finalize_stats
from analysis.activations.store import open_store_group
from analysis.ids import code_modified, code_version
from analysis.data.images import open_images
from analysis.activations.reader import ActivationStore
from analysis.paths import DataRoot
from analysis.integrity import file_lock, require_done
from analysis.stages.model import RESULT_FILE, load_tower, vit_config
from analysis.stages.suite import SuiteSpec
from analysis.activations.tokens import TokenSelection, select_tokens
from analysis.models.vit import HookedViT


def token_selection(spec: SuiteSpec) -> TokenSelection:
    """The suite's token selection applied to its model: positions kept and their groups."""
    return select_tokens(vit_config(spec), spec.activations.tokens, spec.activations.patches_sample)


def store_layout(spec: SuiteSpec, n_images: int | None = None) -> StoreLayout:
    """The stores' layout for a dataset of `n_images` (None: the images the dataset is planned to
    hold, exact for generated data and an upper bound for an ingested source, whose extra shard
    partitions then have nothing to do)."""
    vit = vit_config(spec)
    return StoreLayout(
        n_images=spec.dataset.planned_images() if n_images is None else n_images,
        n_tokens=token_selection(spec).groups.n_tokens,
        d_model=vit.d_model,
        images_per_shard=spec.activations.images_per_shard,
        images_per_chunk=spec.activations.images_per_chunk, dtype=spec.activations.dtype,
    )


def store_bytes(spec: SuiteSpec, n_images: int | None = None) -> int:
    """Bytes the suite's activation stores take: images x tokens x d x dtype size x hooks."""
    layout = store_layout(spec, n_images)
    item = 4 if spec.activations.dtype == "float32" else 2
    return layout.n_images * layout.n_tokens * layout.d_model * item * len(spec.activations.hooks)


def check_store_size(spec: SuiteSpec) -> None:
    """Refuse, before any work, stores larger than `activations.max_store_gb`, saying what shrinks them."""
    gb = store_bytes(spec) / 1e9
    if gb > spec.activations.max_store_gb:
        layout = store_layout(spec)
        raise ValueError(
            f"the activation stores would take {gb:.3g} GB ({layout.n_images} images x {layout.n_tokens} tokens x "
            f"d {layout.d_model} x {len(spec.activations.hooks)} hooks, {spec.activations.dtype}), over "
            f"activations.max_store_gb={spec.activations.max_store_gb:g}: keep fewer tokens (activations.tokens: "
            "cls), fewer hooks or images, or raise max_store_gb")


def check_hooks(spec: SuiteSpec) -> None:
    """Unknown hook names fail before any work, listing the valid ones."""
    HookedViT(vit_config(spec)).check_hook_names(list(spec.activations.hooks))


def stop_layer(hooks: list[str]) -> int | None:
    """Run only the blocks the hooks need: deepest block + 1, or None when a hook sits after them."""
    if not all(h.startswith("blocks.") for h in hooks):
        return None
    return max(int(h.split(".")[1]) for h in hooks) + 1


def ensure_layout(spec: SuiteSpec, root: DataRoot) -> dict:
    """Create every hook's arrays once; partitions then write disjoint shard-aligned regions."""
    model_summary = require_done(root.model(spec.model_id) / RESULT_FILE, "model",
                                 "materialize the model asset again (make run does)")
    images = open_images(root.images(spec.dataset_id))
    layout = store_layout(spec, images.shape[0])
    with file_lock(root.lock(spec.store_id)):  # creation must not race: an unfinished store is recreated empty
        for hook in spec.activations.hooks:
            _create_hook_store(spec, root, hook, layout, model_summary, images.attrs["content_hash"])
    return {"store_id": spec.store_id, "path": str(root.store(spec.store_id)), "n_shards": layout.n_shards,
            "store_gb": round(store_bytes(spec, layout.n_images) / 1e9, 3),
            "n_images": layout.n_images, "n_tokens": layout.n_tokens, "d_model": layout.d_model,
            "tokens": spec.activations.tokens, "token_groups": token_selection(spec).groups.to_dict(),
            "hooks": list(spec.activations.hooks)}


def _create_hook_store(spec: SuiteSpec, root: DataRoot, hook: str, layout: StoreLayout, model_summary: dict,
                       dataset_hash: str) -> None:
    lineage = {
        "store_id": spec.store_id, "hook": hook,
        "model_id": spec.model_id, "model_weights_hash": model_summary["weights_hash"],
        "dataset_id": spec.dataset_id, "dataset_content_hash": dataset_hash,
        "tokens": spec.activations.tokens, "dtype": spec.activations.dtype,
        "compute_dtype": spec.activations.compute_dtype,
        "preprocessing": "uint8 / 255 -> float32 (B, C, H, W)",
    }
    if spec.dataset.source != "shapes":  # decoded files: how they became the stored pixels
        lineage["preprocessing"] = {"stored": spec.preprocessing().to_dict(),
                                    "model_input": lineage["preprocessing"] + "; mean/std folded into the "
                                                   "model's patch embedding"}
    if spec.activations.patches_sample:  # which patches: a pure function of the image index
        lineage["patches_sample"] = {"n": spec.activations.patches_sample,
                                     "drawn_by": "analysis.activations.tokens.TokenSelection.positions_for"}
    path = root.hook_store(spec.store_id, hook)
    create_store(path, layout, lineage, token_groups=token_selection(spec).groups)
    # The code version is lineage too, but kept outside the compared lineage: a new commit
    # must not invalidate a store whose content ids are unchanged.
    group = open_store_group(path, "r+")
    if "code_version" not in group.attrs:
        group.attrs.update({"code_version": code_version(), "code_modified": code_modified()})


def extract(spec: SuiteSpec, root: DataRoot, shard: int, *, device: str = "cpu", progress: bool = True) -> dict:
    """Extract one shard into every hook's store unless it is there with intact files. A second
    process on the same shard (on this machine) waits, then finds it done."""
    with file_lock(root.lock(f"{spec.store_id}.shard{shard:05d}")):
        return _extract(spec, root, shard, device, progress)


def _extract(spec: SuiteSpec, root: DataRoot, shard: int, device: str, progress: bool) -> dict:
    stores = {hook: root.hook_store(spec.store_id, hook) for hook in spec.activations.hooks}
    if all(shard_intact(path, shard) for path in stores.values()):  # this shard only: one check per partition
        return {"shard": shard, "skipped": True}
    model = load_tower(spec, root, device=device)
    hooks = list(spec.activations.hooks)
    stop = stop_layer(hooks)

    autocast = spec.activations.compute_dtype != "float32"
    amp_dtype = getattr(torch, spec.activations.compute_dtype)

    def capture(x):
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=autocast):
            _, cache = model.run_with_cache(x, names_filter=hooks, stop_at_layer=stop)
        return {h: cache[h].float() for h in hooks}  # statistics and norms are taken in fp32

    report = extract_shard(
        capture, open_images(root.images(spec.dataset_id)), stores, shard,
        batch_size=spec.activations.batch_size, device=device, tokens=_stored_positions(token_selection(spec)),
        progress=progress,
    )
    return {"shard": shard, "skipped": report.skipped, "n_images": report.n_images, "batch_size": report.batch_size,
            "seconds": round(report.seconds, 2), "images_per_second": round(report.n_images / max(report.seconds, 1e-9), 1)}


def _stored_positions(selection: TokenSelection):
    """What extraction keeps: the selection's positions, or each image's own patch sample."""
    return selection.positions_for if selection.sample else selection.keep


def ensure_stats(spec: SuiteSpec, root: DataRoot) -> dict:
    out = {"store_id": spec.store_id}
    for hook in spec.activations.hooks:
        with file_lock(root.lock(spec.store_id)):
            stats = finalize_stats(root.hook_store(spec.store_id, hook))
        out[f"{hook}.mean_norm"] = round(float(stats.mean_norm), 4)
        out[f"{hook}.n_tokens"] = int(stats.n_tokens)
    return out


def nonfinite_counts(spec: SuiteSpec, root: DataRoot) -> dict[str, int]:
    """Per hook: tokens whose stored norm is NaN/inf plus non-finite stats entries.

    A token's norm is non-finite exactly when one of its elements is, so reading the (N, T) norms
    checks every stored activation without reading the (N, T, d) arrays.
    """
    counts = {}
    for hook in spec.activations.hooks:
        store = ActivationStore.open(root.hook_store(spec.store_id, hook))
        bad = 0
        for start in range(0, store.n_images, store.chunk_images):
            norms = store.read_norms(start, min(start + store.chunk_images, store.n_images))
            bad += int((~torch.isfinite(norms)).sum())
        stats = store.stats
        bad += int((~np.isfinite(stats.mean)).sum() + (~np.isfinite(stats.var)).sum())
        counts[hook] = bad
    return counts


def materialize_store(spec: SuiteSpec, root: DataRoot, *, progress: bool = False) -> None:
    """Stages 1-3 of `spec` without Dagster, in order: the dataset, the model, every shard of the
    store and its statistics (each reused where done). For notebooks, tests and benchmarks."""
    from analysis.stages.dataset import ensure_dataset
    from analysis.stages.model import ensure_model

    ensure_dataset(spec, root)
    ensure_model(spec, root, progress=progress)
    ensure_layout(spec, root)
    for shard in range(store_layout(spec).n_shards):
        extract(spec, root, shard, progress=progress)
    ensure_stats(spec, root)
