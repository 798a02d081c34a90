"""The model asset: the mouse ViT trained on the dataset's task, or the suite's timm model converted."""


import dagster as dg

from analysis.stages.model import ensure_model
from analysis.stages.suite import SuiteSpec
from assets._common import data_version, metadata
from resources import ComputeResource, StorageResource


def model_asset(spec: SuiteSpec) -> dg.AssetsDefinition:
    @dg.asset(name="model", group_name="model", code_version="1", deps=["images"], kinds={"pytorch"},
              description=f"The suite's HookedViT: a {spec.model.kind} model ({spec.model_id}).")
    def model(context: dg.AssetExecutionContext, storage: StorageResource,
              compute: ComputeResource) -> dg.MaterializeResult:
        summary = ensure_model(spec, storage.data_root(), device=compute.apply())
        if "eval_accuracy" in summary:  # a mouse trained here
            context.log.info(f"model {summary['model_id']}: held-out accuracy {summary['eval_accuracy']:.4f}")
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(summary["weights_hash"]))

    return model
