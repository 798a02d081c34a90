"""The `arrivals` sensor: new files in the suite's watched folder (`arrivals.path`) become a new
partition of the `arrivals` asset and a run of `arrival_job` that ingests and extracts them.
The `features` partitions depend on every arrival (`assets.arrivals.arrival_deps`), so the
automation sensor then re-mines each dictionary, merging the new images' state into the saved
ones (nothing already mined is mined again), and the catalog, report and browser follow.

Declared STOPPED, like the schedules: turn it on in the UI (Automation tab) with `make ui`.
"""

from __future__ import annotations

import dagster as dg

from analysis.stages.arrivals import register_arrivals, registered
from analysis.stages.suite import SuiteSpec
from assets.arrivals import ARRIVAL_PARTITIONS
from resources import StorageResource

CHECK_EVERY_SECONDS = 60


def arrival_job() -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job("arrival_job", selection=["arrivals"],
                               description="Ingest and extract one arrival (a partition the arrivals sensor added)")


def pending_arrivals(spec: SuiteSpec, storage: StorageResource, instance: dg.DagsterInstance) -> list[str]:
    """Registers the watched folder's new files (if any) and returns every registered arrival the
    instance has no partition for yet: also those a failed tick registered without adding."""
    root = storage.data_root()
    register_arrivals(spec, root)
    known = set(instance.get_dynamic_partitions(ARRIVAL_PARTITIONS.name))
    return [a.key for a in registered(spec, root) if a.key not in known]


def arrivals_sensor(spec: SuiteSpec, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name="arrivals", job=job, minimum_interval_seconds=CHECK_EVERY_SECONDS,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"{spec.name}: new files in {spec.arrivals.path} become an arrival partition and its run")
    def arrivals(context: dg.SensorEvaluationContext, storage: StorageResource):
        try:
            keys = pending_arrivals(spec, storage, context.instance)
        except ValueError as err:  # the folder is missing: say so on every tick, start nothing
            return dg.SkipReason(str(err))
        if not keys:
            return dg.SkipReason(f"no new files in {spec.arrivals.path}")
        # run_key = the arrival's content id: a retried tick launches each arrival's run once
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=key, partition_key=key) for key in keys],
                               dynamic_partitions_requests=[ARRIVAL_PARTITIONS.build_add_request(keys)])

    return arrivals
