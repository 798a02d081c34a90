"""When the suite reruns without anyone pressing a button: two schedules and declarative automation.

- `nightly_evaluation` (02:00 every day): one `evaluation_job` run per suite member, re-evaluating
  and re-mining each dictionary. Each stage reuses what is current (its done-marker, unchanged
  inputs), so a night with nothing new costs a check per member; a member whose checkpoint,
  store or code changed is evaluated again.
- `weekly_full` (03:00 every Monday): `prepare_job`, the unpartitioned head (images, model,
  layout). What lies below follows through the automation conditions.
- Every asset below `images` carries `AutomationCondition.eager()`: once any of its upstream
  assets (or partitions) has been materialized since it last ran, and none is missing or still
  running, the automation sensor requests it. So the weekly head flows into extraction, statistics,
  training, evaluation, mining, the toolkit, the catalog, the report and the browser, and the
  nightly evaluations flow into the catalog, the report and the browser, without hand-written
  chains of triggers. Reuse makes every such rerun of an unchanged artifact a no-op.

The schedules and the sensor are declared STOPPED: turn them on in the UI (Automation tab) with
`make ui`, whose daemon evaluates them.
"""

from __future__ import annotations

import dagster as dg

from analysis.stages.suite import SuiteSpec

NIGHTLY_EVALUATION_CRON = "0 2 * * *"
WEEKLY_FULL_CRON = "0 3 * * 1"
HEAD = "images"
"""The one asset nothing automatic materializes: the schedule (or a user) starts from it."""


def with_automation(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """Every asset but the head gets AutomationCondition.eager()."""
    def condition(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key.to_user_string() == HEAD:
            return spec
        return spec.replace_attributes(automation_condition=dg.AutomationCondition.eager())

    return dg.map_asset_specs(condition, assets)


def schedules(spec: SuiteSpec, jobs: dict[str, dg.UnresolvedAssetJobDefinition]) -> list[dg.ScheduleDefinition]:
    members = [m.key for m in spec.members()]

    @dg.schedule(name="nightly_evaluation", cron_schedule=NIGHTLY_EVALUATION_CRON, job=jobs["evaluation_job"],
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"{spec.name}: re-evaluate and re-mine every member (reusing what is current)")
    def nightly_evaluation(context: dg.ScheduleEvaluationContext):
        day = context.scheduled_execution_time.strftime("%Y-%m-%d")
        # one run per member partition; the run key makes a retried tick launch each run once
        return [dg.RunRequest(run_key=f"{day}:{key}", partition_key=key) for key in members]

    weekly = dg.ScheduleDefinition(name="weekly_full", cron_schedule=WEEKLY_FULL_CRON, job=jobs["prepare_job"],
                                   default_status=dg.DefaultScheduleStatus.STOPPED,
                                   description=f"{spec.name}: rerun the head; the automation conditions carry "
                                               "every asset below it")
    return [nightly_evaluation, weekly]


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "spectra_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.STOPPED,
        description="Requests every asset whose eager() condition holds (see pipelines/automation.py)")
