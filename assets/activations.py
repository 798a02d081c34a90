"""Activation assets: the store layout, the extraction partitioned by image shard, the statistics."""


import dagster as dg

from analysis.stages.activations import ensure_layout, ensure_stats, extract, nonfinite_counts, store_layout
from analysis.stages.suite import SuiteSpec
from assets._common import DEVICE_POOL, data_version, metadata
from resources import ComputeResource, StorageResource


def shard_partitions(spec: SuiteSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([f"{i:04d}" for i in range(store_layout(spec).n_shards)])


def activation_assets(spec: SuiteSpec) -> list[dg.AssetsDefinition]:
    # code_version names the store format these assets write: a format change bumps it, so Dagster
    # marks stores written in another format stale
    @dg.asset(name="activation_layout", group_name="activations", code_version="3", deps=["model"],
              kinds={"zarr"}, description="Creates every hook's Zarr arrays once, before the shards fill them.")
    def activation_layout(storage: StorageResource) -> dg.MaterializeResult:
        summary = ensure_layout(spec, storage.data_root())
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(spec.store_id))

    @dg.asset(pool=DEVICE_POOL, name="activations", group_name="activations", code_version="3", deps=["activation_layout"],
              partitions_def=shard_partitions(spec), kinds={"zarr"},
              description=f"Activations of {', '.join(spec.activations.hooks)}, one partition per image shard.")
    def activations(context: dg.AssetExecutionContext, storage: StorageResource,
                    compute: ComputeResource) -> dg.MaterializeResult:
        shard = int(context.partition_key)
        summary = extract(spec, storage.data_root(), shard, device=compute.apply())
        context.log.info(f"shard {shard}: {summary}")
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(spec.store_id, shard))

    @dg.asset(name="activation_stats", group_name="activations", code_version="1", deps=["activations"],
              description="Per-dimension mean/variance and mean token norm per hook (merged shard partials).")
    def activation_stats(storage: StorageResource) -> dg.MaterializeResult:
        summary = ensure_stats(spec, storage.data_root())
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(spec.store_id))

    return [activation_layout, activations, activation_stats]


def activation_checks(spec: SuiteSpec) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset="activation_stats", blocking=True,
                    description="Every stored activation and statistic is finite (counts per hook).")
    def activations_are_finite(storage: StorageResource) -> dg.AssetCheckResult:
        counts = nonfinite_counts(spec, storage.data_root())
        return dg.AssetCheckResult(passed=not any(counts.values()),
                                   metadata={f"nonfinite.{hook}": n for hook, n in counts.items()})

    return [activations_are_finite]
