"""Dictionary assets, one partition per suite member: training, evaluation, feature mining."""


from dataclasses import asdict

import dagster as dg

from analysis.stages.dictionaries import dictionary_id, dictionary_lineage, ensure_dictionary, ensure_evaluation
from analysis.stages.features import ensure_features
from analysis.stages.suite import SuiteSpec
from analysis.stages.previews import browser_page, features_preview, train_log, training_curve
from assets.arrivals import arrival_deps
from assets._common import DEVICE_POOL, data_version, image_markdown, metadata, per_step
from resources import ComputeResource, StorageResource, TrackerResource


def member_partitions(spec: SuiteSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([m.key for m in spec.members()])


def dictionary_assets(spec: SuiteSpec) -> list[dg.AssetsDefinition]:
    partitions = member_partitions(spec)

    @dg.asset(pool=DEVICE_POOL, name="dictionaries", group_name="dictionaries", code_version="1", deps=["activation_stats"],
              partitions_def=partitions, kinds={"pytorch", "safetensors"},
              description="One dictionary checkpoint (SAE, transcoder or crosscoder) per suite member, with full lineage.")
    def dictionaries(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource,
                     tracker: TrackerResource) -> dg.MaterializeResult:
        member = spec.member(context.partition_key)
        root = storage.data_root()
        dict_id = dictionary_id(spec, member)
        with tracker.run(dict_id, {"suite": spec.name, **asdict(member)}, root, job_type=member.kind) as run:
            summary = ensure_dictionary(spec, root, member, dict_id=dict_id, device=compute.apply(), on_log=run,
                                        on_step=lambda row: run(per_step(row)))
            lineage = dictionary_lineage(root, dict_id)
            run.update_config({"lineage": lineage, "summary": summary})
        rows = train_log(root, dict_id)
        last = {f"final_{k}": rows[-1][k] for k in ("loss", "l0", "dead_fraction", "eval_fvu")
                if rows and rows[-1].get(k) is not None}
        extra = {"lineage": dg.MetadataValue.json(lineage), **last}
        if (curve := training_curve(root, dict_id, rows)) is not None:
            extra["training_curve"] = image_markdown(curve)
        return dg.MaterializeResult(metadata={**metadata(summary), **extra},
                                    data_version=data_version(summary["dict_id"]))

    @dg.asset(pool=DEVICE_POOL, name="evaluations", group_name="dictionaries", code_version="1", deps=["dictionaries"],
              partitions_def=partitions, kinds={"parquet"},
              description="L0, FVU, dead/dense fractions and loss recovered when spliced (DESIGN.md §4).")
    def evaluations(context: dg.AssetExecutionContext, storage: StorageResource,
                    compute: ComputeResource) -> dg.MaterializeResult:
        member = spec.member(context.partition_key)
        root = storage.data_root()
        row = ensure_evaluation(spec, root, member, device=compute.apply(), dask_scheduler=compute.dask_scheduler)
        keep = ("dict_id", "l0", "fvu", "dead_fraction", "dense_fraction", "loss_recovered", "ablation_gap",
                "ce_clean", "ce_spliced", "ce_ablated", "acc_spliced", "n_eval_tokens")
        # the page the feature_browser asset writes once the features are mined
        browser = dg.MetadataValue.url(browser_page(root, row["dict_id"]).as_uri())
        return dg.MaterializeResult(metadata={**metadata({k: row[k] for k in keep}), "feature_browser": browser},
                                    data_version=data_version(row["dict_id"], "eval"))

    @dg.asset(pool=DEVICE_POOL, name="features", group_name="dictionaries", code_version="1",
              deps=["dictionaries", *arrival_deps(spec)],
              partitions_def=partitions, kinds={"parquet"},
              description="Top max-activating held-out images per feature, with token heatmaps and statistics.")
    def features(context: dg.AssetExecutionContext, storage: StorageResource,
                 compute: ComputeResource) -> dg.MaterializeResult:
        member = spec.member(context.partition_key)
        root = storage.data_root()
        summary = ensure_features(spec, root, member, device=compute.apply(), dask_scheduler=compute.dask_scheduler)
        extra = {}
        if (preview := features_preview(root, summary["dict_id"])) is not None:
            extra["preview"] = image_markdown(preview)  # a few features' top images under their heatmaps
        return dg.MaterializeResult(metadata={**metadata(summary), **extra}, data_version=data_version(summary["dict_id"], "feat"))

    return [dictionaries, evaluations, features]
