"""Arrivals: new images in the suite's watched folder, one dynamic partition each (registered by
the `arrivals` sensor of `pipelines.arrivals`), extracted with the suite's model; the `features`
partitions depend on all of them and merge each new one into their tables."""


import dagster as dg

from analysis.stages.arrivals import ensure_arrival
from analysis.stages.suite import SuiteSpec
from assets._common import DEVICE_POOL, data_version, metadata
from resources import ComputeResource, StorageResource

ARRIVAL_PARTITIONS = dg.DynamicPartitionsDefinition(name="arrivals")


def arrival_assets(spec: SuiteSpec) -> list[dg.AssetsDefinition]:
    if spec.arrivals.path is None:
        return []

    @dg.asset(pool=DEVICE_POOL, name="arrivals", group_name="arrivals", code_version="1", deps=["model"],
              partitions_def=ARRIVAL_PARTITIONS, kinds={"zarr", "parquet"},
              description=f"New images in {spec.arrivals.path}, one partition per batch the sensor found: ingested "
                          "and extracted at every hook of the suite (table arrival_images: their global ids).")
    def arrivals(context: dg.AssetExecutionContext, storage: StorageResource,
                 compute: ComputeResource) -> dg.MaterializeResult:
        summary = ensure_arrival(spec, storage.data_root(), context.partition_key, device=compute.apply())
        if summary["n_rejected"]:
            context.log.warning(f"{summary['n_rejected']} files of arrival {summary['key']} are not usable images: "
                                f"see rejected.parquet under images/{summary['dataset_id']}")
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(summary["store_id"]))

    return [arrivals]


def arrival_deps(spec: SuiteSpec) -> list[dg.AssetDep]:
    """What `features` reads beside its dictionary: every arrival partition (each merged in)."""
    if spec.arrivals.path is None:
        return []
    return [dg.AssetDep("arrivals", partition_mapping=dg.AllPartitionMapping())]
