"""The image dataset asset."""


import dagster as dg

from analysis.stages.dataset import ensure_dataset
from analysis.stages.suite import SuiteSpec
from assets._common import data_version, metadata
from resources import StorageResource


def images_asset(spec: SuiteSpec) -> dg.AssetsDefinition:
    @dg.asset(name="images", group_name="data", code_version="1", kinds={"zarr", "parquet"},
              description=f"`{spec.dataset.source}` images (the model's preprocessing applied) and labels.")
    def images(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        summary = ensure_dataset(spec, storage.data_root())
        context.log.info(f"dataset {summary['dataset_id']}: {summary['n_images']} images at {summary['path']}")
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(summary["content_hash"]))

    return images
