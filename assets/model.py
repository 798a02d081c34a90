"""The model asset: the mouse ViT trained on the dataset's task, or the suite's timm model converted."""


from dataclasses import asdict

import dagster as dg

from analysis.stages.model import ensure_model
from analysis.stages.suite import SuiteSpec
from assets._common import DEVICE_POOL, data_version, metadata, per_step
from resources import ComputeResource, StorageResource, TrackerResource


def model_asset(spec: SuiteSpec) -> dg.AssetsDefinition:
    @dg.asset(pool=DEVICE_POOL, name="model", group_name="model", code_version="1", deps=["images"], kinds={"pytorch"},
              description=f"The suite's HookedViT: a {spec.model.kind} model ({spec.model_id}).")
    def model(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
              tracker: TrackerResource) -> dg.MaterializeResult:
        root = storage.data_root()
        if spec.model.kind != "mouse":  # converted, not trained: nothing to track
            summary = ensure_model(spec, root, device=compute.apply())
        else:
            config = {"suite": spec.name, "dataset_id": spec.dataset_id, **asdict(spec.model_config())}
            with tracker.run(spec.model_id, config, root, job_type="mouse") as run:
                summary = ensure_model(spec, root, device=compute.apply(), on_step=lambda row: run(per_step(row)),
                                       on_epoch=run)
                run.update_config({"summary": summary})
        if "eval_accuracy" in summary:  # a mouse trained here
            context.log.info(f"model {summary['model_id']}: held-out accuracy {summary['eval_accuracy']:.4f}")
        return dg.MaterializeResult(metadata=metadata(summary), data_version=data_version(summary["weights_hash"]))

    return model
