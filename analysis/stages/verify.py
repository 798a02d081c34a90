"""Full verification of a suite's artifacts: every file a done-marker vouches for, reread.

Reuse already runs the cheap check (presence and size) everywhere; this rereads every file
against the checksum written with it, which catches what the cheap check cannot (a file
replaced by one of the same size, a flipped bit). With `repair`, every damaged artifact's
marker is taken back (a store's damaged shards are marked not extracted), so the next run
redoes exactly those from their inputs.
"""

from __future__ import annotations

from pathlib import Path

from analysis.activations.store import damaged_shards, open_layout, reset_shard
from analysis.data.images import DONE_FILE as DATASET_DONE
from analysis.integrity import Damage, marker_damage, stale_inputs
from analysis.paths import DataRoot
from analysis.stages.arrivals import (ARRIVAL_FILE, STATES_DIR, arrival_dataset_id, arrival_store_id, arrivals_dir,
                                      registered)
from analysis.stages.dictionaries import EVALUATION_FILE, FEATURES_FILE, SUMMARY_FILE, dictionary_id
from analysis.stages.model import RESULT_FILE
from analysis.stages.suite import SuiteSpec


def _markers(spec: SuiteSpec, root: DataRoot) -> list[tuple[Path, Path | None]]:
    """(done-marker, the upstream marker whose files it read, or None), upstream first."""
    out: list[tuple[Path, Path | None]] = [(root.images(spec.dataset_id) / DATASET_DONE, None),
                                           (root.model(spec.model_id) / RESULT_FILE, None)]
    for member in spec.members():
        directory = root.dictionary(dictionary_id(spec, member))
        out += [(directory / SUMMARY_FILE, None), (directory / EVALUATION_FILE, directory / SUMMARY_FILE),
                (directory / FEATURES_FILE, directory / SUMMARY_FILE)]
        out += [(state, directory / SUMMARY_FILE) for state in sorted((directory / STATES_DIR).glob("*.json"))]
    for arrival in _arrivals(spec, root):
        out += [(root.images(arrival_dataset_id(spec, arrival.key)) / DATASET_DONE, None),
                (arrivals_dir(spec, root) / arrival.key / ARRIVAL_FILE, None)]
    return out


def _arrivals(spec: SuiteSpec, root: DataRoot) -> list:
    return registered(spec, root) if spec.arrivals.path is not None else []


def verify_suite(spec: SuiteSpec, root: DataRoot, *, full: bool = True, repair: bool = False) -> list:
    """Everything damaged among the suite's finished artifacts (absent ones are not damage: they
    are simply not made yet); with `repair`, their markers are taken back."""
    found: list = []
    for marker, upstream in _markers(spec, root):
        damage = marker_damage(marker, full=full)
        if damage is None:
            continue
        if not damage and upstream is not None:
            damage = stale_inputs(marker, upstream)
        found += damage
        if damage and repair:
            marker.unlink(missing_ok=True)
    stores = [spec.store_id, *(arrival_store_id(spec, a.key) for a in _arrivals(spec, root))]
    for store_id in stores:
        for hook in spec.activations.hooks:
            found += _store_damage(root.hook_store(store_id, hook), full, repair)
    return found


def _store_damage(location, full: bool, repair: bool) -> list:
    try:
        group, layout = open_layout(location, "r+" if repair else "r")
    except FileNotFoundError:
        return []  # not created yet
    damage = damaged_shards(group, layout, full=full)
    for shard in sorted({d.shard for d in damage}) if repair else []:
        reset_shard(group, shard)
    return [Damage(Path(str(location)), str(d)) for d in damage]
