"""The classic toolkit on the suite's model: lens, attribution, attention, patching, perturbations,
memories and probes, each a catalog table and (where drawn) a PNG shown in the UI."""


import dagster as dg

from analysis.stages.suite import SuiteSpec
from analysis.stages.toolkit import ensure_toolkit
from assets._common import DEVICE_POOL, data_version, image_markdown
from resources import ComputeResource, StorageResource


def toolkit_asset(spec: SuiteSpec) -> dg.AssetsDefinition:
    @dg.asset(pool=DEVICE_POOL, name="toolkit", group_name="toolkit", code_version="1", deps=["model", "images"], kinds={"pytorch"},
              description="Class-embedding lens, direct logit attribution, attention views, activation patching, "
                          "Vilas et al.'s perturbations, memories and linear probes of the suite's model on its "
                          "held-out images (tables toolkit_*, PNGs under reports/toolkit/).")
    def toolkit(context: dg.AssetExecutionContext, storage: StorageResource,
                compute: ComputeResource) -> dg.MaterializeResult:
        summary = ensure_toolkit(spec, storage.data_root(), device=compute.apply())
        if "skipped" in summary:
            context.log.warning(f"toolkit skipped: {summary['skipped']}")
        pictures = {name: image_markdown(path) for name, path in summary.get("plots", {}).items()}
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k != "plots"}
        return dg.MaterializeResult(
            metadata={**scalars, "seconds": dg.MetadataValue.json(summary.get("seconds", {})),
                      "rows": dg.MetadataValue.json(summary.get("rows", {})), **pictures},
            data_version=data_version(summary["toolkit_id"]),
        )

    return toolkit
