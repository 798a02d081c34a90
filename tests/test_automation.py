"""The schedules and the declarative automation, evaluated by Dagster itself (no daemon): which runs
a tick requests, and how a fresh head or a night's evaluations flow down the graph."""

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from analysis.stages.suite import load_suite
from pipelines.definitions import build_definitions

TINY = Path(__file__).parent / "suites" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # inside Dagster's own condition tester


@pytest.fixture(scope="module")
def suite():
    spec = load_suite(TINY)
    return spec, build_definitions(spec)


def test_the_nightly_schedule_requests_one_evaluation_run_per_member(suite):
    spec, defs = suite
    schedule = defs.resolve_schedule_def("nightly_evaluation")
    assert schedule.job_name == "evaluation_job" and schedule.cron_schedule == "0 2 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        tick = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
        requests = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                                                 repository_def=defs.get_repository_def()))
    members = [m.key for m in spec.members()]
    assert [r.partition_key for r in requests.run_requests] == members
    assert [r.run_key for r in requests.run_requests] == [f"2026-12-01:{key}" for key in members]
    job = defs.resolve_job_def("evaluation_job")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"evaluations", "features"}


def test_the_weekly_schedule_reruns_the_head(suite):
    _, defs = suite
    schedule = defs.resolve_schedule_def("weekly_full")
    assert schedule.job_name == "prepare_job" and schedule.cron_schedule == "0 3 * * 1"
    with dg.instance_for_test() as instance:
        requests = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
    assert len(requests.run_requests) == 1 and requests.run_requests[0].partition_key is None


def _requested(defs, instance, cursor):
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    graph = defs.resolve_asset_graph()
    wanted = {}
    for key in graph.get_all_asset_keys():
        if result.get_num_requested(key):
            wanted[key.to_user_string()] = sorted(result.get_requested_partitions(key)) \
                if graph.get(key).partitions_def else None
    return wanted, result.cursor


def _done(instance, wanted: dict) -> None:
    """Record the requested runs as finished (what the launched runs would report)."""
    for name, partitions in wanted.items():
        for partition in partitions or [None]:
            instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=partition))


def _waves(defs, instance, cursor, limit: int = 10) -> tuple[list[dict], object]:
    """Every tick's requests until the graph rests, each recorded as done before the next tick."""
    waves = []
    for _ in range(limit):
        wanted, cursor = _requested(defs, instance, cursor)
        if not wanted:
            break
        waves.append(wanted)
        _done(instance, wanted)
    return waves, cursor


def test_a_fresh_head_flows_down_the_whole_graph_and_then_everything_rests(suite):
    spec, defs = suite
    shards = defs.resolve_assets_def("activations").partitions_def.get_partition_keys()
    members = sorted(m.key for m in spec.members())
    with dg.instance_for_test() as instance:
        wanted, cursor = _requested(defs, instance, None)
        assert wanted == {}  # nothing below a missing head is requested
        _done(instance, {"images": None, "model": None, "activation_layout": None})  # the weekly prepare_job
        waves, _ = _waves(defs, instance, cursor)
    # assets of the same partitioning are requested together and run in dependency order
    assert waves == [
        {"activations": sorted(shards), "toolkit": None},
        {"activation_stats": None},
        {"dictionaries": members, "evaluations": members, "features": members},
        {"catalog": None, "report": None, "feature_browser": None, "published": None},
    ]


def test_a_nights_evaluations_refresh_the_catalog_report_and_browser(suite):
    spec, defs = suite
    graph = defs.resolve_asset_graph()
    with dg.instance_for_test() as instance:
        for key in dg.AssetSelection.all().resolve(graph):  # a suite that ran to the end before
            partitions = graph.get(key).partitions_def
            for partition in partitions.get_partition_keys() if partitions else [None]:
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        wanted, cursor = _requested(defs, instance, None)
        assert wanted == {}  # nothing is out of date
        _done(instance, {"evaluations": [m.key for m in spec.members()]})  # the nightly evaluation runs
        _done(instance, {"features": [m.key for m in spec.members()]})
        wanted, cursor = _requested(defs, instance, cursor)
        assert wanted == {"catalog": None, "report": None, "feature_browser": None, "published": None}
        _done(instance, wanted)
        assert _requested(defs, instance, cursor)[0] == {}
