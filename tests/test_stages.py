"""Stage functions without Dagster: bf16 autocast extraction against the fp32 path."""

import dataclasses
from pathlib import Path

import torch
import zarr

from analysis.paths import DataRoot
from analysis.stages.activations import ensure_layout, extract, stop_layer
from analysis.stages.dataset import ensure_dataset
from analysis.stages.model import ensure_model
from analysis.suite import load_suite

TINY = Path(__file__).parent / "suites" / "tiny.yaml"


def test_stop_layer_runs_only_the_blocks_the_hooks_need():
    assert stop_layer(["blocks.0.hook_resid_post"]) == 1
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]) == 2
    assert stop_layer(["blocks.0.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_bfloat16_autocast_extraction_is_close_to_fp32_and_lands_in_its_own_store(tmp_path):
    fp32 = load_suite(TINY)
    bf16 = dataclasses.replace(fp32, activations=dataclasses.replace(fp32.activations, compute_dtype="bfloat16"))
    assert bf16.store_id != fp32.store_id and bf16.model_id == fp32.model_id
    root = DataRoot(tmp_path)
    ensure_dataset(fp32, root)
    ensure_model(fp32, root, progress=False)
    acts = {}
    for spec in (fp32, bf16):
        ensure_layout(spec, root)
        assert extract(spec, root, 0, progress=False)["skipped"] is False
        assert extract(spec, root, 0, progress=False)["skipped"] is True  # resumable: done shards are kept
        hook = spec.activations.hooks[-1]
        group = zarr.open_group(str(root.hook_store(spec.store_id, hook)), mode="r")  # shard 1 still missing
        assert group.attrs["lineage"]["compute_dtype"] == spec.activations.compute_dtype
        assert group.attrs["code_version"]
        acts[spec.activations.compute_dtype] = torch.from_numpy(group["acts"][0:64].astype("float32"))
    a, b = acts["float32"], acts["bfloat16"]
    assert not torch.equal(a, b), "autocast must actually change the precision"
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel
