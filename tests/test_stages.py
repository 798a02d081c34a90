"""Stage functions without Dagster: bf16 autocast extraction against the fp32 path, token selections."""

import dataclasses
from pathlib import Path

import pytest
import torch
import zarr

from analysis.data.images import open_images
from analysis.models.inputs import to_model_input
from analysis.paths import DataRoot
from analysis.stages.activations import ensure_layout, extract, stop_layer
from analysis.stages.dataset import ensure_dataset
from analysis.stages.model import ensure_model, load_model
from analysis.stages.suite import load_suite
from analysis.activations.tokens import TokenGroups

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


def test_blocking_finiteness_check_fails_with_counts_and_stops_the_run(tmp_path):
    import dagster as dg

    from analysis.stages.activations import nonfinite_counts
    from conftest import materialize_store
    from pipelines.definitions import build_definitions, default_resources

    spec = load_suite(TINY)
    root = DataRoot(tmp_path)
    materialize_store(spec, root)
    assert nonfinite_counts(spec, root) == {h: 0 for h in spec.activations.hooks}

    hook = spec.activations.hooks[0]
    norms = zarr.open_group(str(root.hook_store(spec.store_id, hook)), mode="r+")["norms"]
    norms[3, 2] = float("nan")
    norms[700, 0] = float("inf")
    assert nonfinite_counts(spec, root)[hook] == 2

    defs = build_definitions(spec, default_resources(str(tmp_path)))
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("stats_job").execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success, "a blocking check that fails must fail the run"
        evaluation = next(e for e in result.get_asset_check_evaluations())
        assert not evaluation.passed
        assert evaluation.metadata[f"nonfinite.{hook}"].value == 2


@pytest.mark.parametrize("selection", ["all", "cls", "patches", "no_registers"])
def test_each_token_selection_stores_exactly_the_models_tokens_of_those_kinds(tmp_path, selection):
    """The tiny mouse has a class token, one register and a 4x4 patch grid (18 tokens)."""
    base = load_suite(TINY)
    spec = dataclasses.replace(base, activations=dataclasses.replace(base.activations, tokens=selection))
    root = DataRoot(tmp_path)
    ensure_dataset(spec, root)
    ensure_model(spec, root, progress=False)
    ensure_layout(spec, root)
    extract(spec, root, 0, progress=False)
    hook = spec.activations.hooks[-1]
    store = zarr.open_group(str(root.hook_store(spec.store_id, hook)), mode="r")
    kept = {"all": list(range(18)), "cls": [0], "patches": list(range(2, 18)),
            "no_registers": [0, *range(2, 18)]}[selection]
    images = open_images(root.images(spec.dataset_id))[0:64]
    model = load_model(spec, root)
    with torch.inference_mode():
        _, cache = model.run_with_cache(to_model_input(images), names_filter=[hook])
    assert cache[hook].shape[1] == 18
    torch.testing.assert_close(torch.from_numpy(store["acts"][0:64].astype("float32")),
                               cache[hook][:, kept].half().float(), rtol=0, atol=0)
    groups = TokenGroups.from_dict(store.attrs["token_groups"])
    assert groups.n_tokens == len(kept) and groups.patch_grid == (4, 4)
    assert (groups.positions("registers") is not None) == (selection == "all")
