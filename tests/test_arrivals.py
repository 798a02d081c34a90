"""Arrivals: new files in a watched folder become arrivals, extracted with the suite's model and
mined by its dictionaries beside the held-out images. The merged tables equal one mining pass over
all of those images; nothing already mined is mined again; readers find arrival images by their
global ids; the sensor registers each batch once and the automation carries it to the features."""

import itertools
import json
import logging
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import analysis.stages.arrivals as arrivals
from analysis.activations.reader import ActivationStore, iter_images
from analysis.data.shapes import ShapesConfig, generate_shapes
from analysis.dictionaries import load_dictionary
from analysis.evaluation.mining import mine_features
from analysis.paths import DataRoot
from analysis.stages.arrivals import (done_arrivals, ensure_arrival, register_arrivals, registered,
                                      suite_images)
from analysis.stages.dataset import evaluation_images
from analysis.stages.dataset import dataset_factors, dataset_labels
from analysis.stages.dictionaries import FEATURES_FILE, dictionary_id, ensure_dictionary
from analysis.stages.features import ensure_features
from analysis.stages.activations import token_selection
from analysis.stages.notebook import feature_card
from analysis.stages.suite import parse_suite
from conftest import materialize_store
from test_damage import SUITE_RAW
from test_mining import assert_same_mining

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def _suite(inbox: Path):
    return parse_suite({**SUITE_RAW, "name": "arrivals", "arrivals": {"path": str(inbox)}})


def _drop_shapes(inbox: Path, spec, seed: int, n: int) -> np.ndarray:
    """`n` new shapes as PNGs under inbox/<class name>/ (the folder convention); returns their pixels
    in the order of their relative paths (the order an arrival ingests them)."""
    data = generate_shapes(ShapesConfig(n_images=n, seed=seed))
    names = spec.class_names()
    paths = []
    for i, (pixels, label) in enumerate(zip(data.images, data.labels["label"])):
        path = inbox / names[label] / f"s{seed}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0]).save(path)
        paths.append(path.relative_to(inbox).as_posix())
    return data.images[np.argsort(paths, kind="stable")]


@pytest.fixture(scope="module")
def mined_base(tmp_path_factory):
    """The suite's store, one SAE and its features mined before anything arrived."""
    tmp = tmp_path_factory.mktemp("arrivals")
    inbox = tmp / "inbox"
    inbox.mkdir()
    spec = _suite(inbox)
    root = DataRoot(tmp / "data")
    materialize_store(spec, root)
    member = spec.members()[0]
    ensure_dictionary(spec, root, member, progress=False)
    ensure_features(spec, root, member)
    return spec, root, member, inbox


def _one_pass(spec, root, member):
    """What one mining pass over the held-out images and every arrival gives, ids global."""
    sae = load_dictionary(root.dictionary(dictionary_id(spec, member)))
    hook = member.hook
    eval_idx = evaluation_images(spec, root)
    parts = [iter_images(ActivationStore.open(root.hook_store(spec.store_id, hook)), eval_idx,
                         images_per_batch=spec.evaluation.batch_images)]
    labels = dataset_labels(spec, root)
    factors = dataset_factors(spec, root)
    done = done_arrivals(spec, root)
    total = done[-1]["first_image"] + done[-1]["n_images"]
    labels = arrivals._extended(labels, total)
    factors = {k: arrivals._extended(v, total) for k, v in factors.items()}
    for a in done:
        store = ActivationStore.open(root.hook_store(a["store_id"], hook))
        batches = iter_images(store, np.arange(a["n_images"]), images_per_batch=spec.evaluation.batch_images)
        parts.append([(a["first_image"] + i, x) for i, x in batches])
        labels[a["first_image"]:a["first_image"] + a["n_images"]] = pq.read_table(
            root.images(a["dataset_id"]) / "labels.parquet").column("label").to_numpy()
    groups = token_selection(spec).groups
    return mine_features(sae, itertools.chain(*parts), n_top=spec.evaluation.n_top, labels=labels, factors=factors,
                         cls=groups.cls, patches=groups.patches)


def _tables(root, dict_id):
    out = {name: pq.read_table(root.table(name) / f"dict_id={dict_id}")
           for name in ("top_images", "feature_stats", "top_images_cls", "feature_samples", "feature_factors")}
    out["heatmaps"] = np.load(root.dictionary(dict_id) / "heatmaps.npy")
    return out


def test_arrivals_are_registered_once_extracted_and_merged_as_one_pass_would_mine_them(mined_base, monkeypatch):
    spec, root, member, inbox = mined_base
    dict_id = dictionary_id(spec, member)
    n_base = 640
    assert register_arrivals(spec, root) is None  # an empty folder: nothing arrives
    first_pixels = _drop_shapes(inbox, spec, seed=11, n=12)
    (inbox / "notes.txt").write_text("not an image")
    first = register_arrivals(spec, root)
    assert first.ordinal == 0 and len(first.files) == 13
    hashed = []
    monkeypatch.setattr(arrivals, "sha256_file", lambda p: hashed.append(p) or arrivals.hashlib.sha256(
        Path(p).read_bytes()).hexdigest())
    assert register_arrivals(spec, root) is None and hashed == []  # unchanged files are not hashed again
    summary = ensure_arrival(spec, root, first.key, progress=False)
    assert (summary["first_image"], summary["n_images"], summary["n_rejected"]) == (n_base, 12, 1)
    assert summary["n_unlabelled"] == 0  # the sub-folders are the suite's class names
    assert ensure_arrival(spec, root, first.key) == summary  # done: reused
    arrival_images = pq.read_table(root.table("arrival_images") / f"key={first.key}")
    assert arrival_images.column("image_idx").to_pylist() == list(range(n_base, n_base + 12))

    # a copy of a registered image under a new name is not an arrival; new shapes are
    (inbox / "copy.png").write_bytes((inbox / first.files[0]["path"]).read_bytes())
    assert register_arrivals(spec, root) is None
    second_pixels = _drop_shapes(inbox, spec, seed=12, n=8)
    second = register_arrivals(spec, root)
    assert second.ordinal == 1 and len(second.files) == 8
    second_summary = ensure_arrival(spec, root, second.key, progress=False)
    assert second_summary["first_image"] == n_base + 13  # after every file of the first, the text file too

    # features: the base state is reused, each arrival mined once, the merge equals one pass
    mined = []
    real = arrivals.mining_state

    def counted(miner, batches, **kw):  # which images each mining pass reads
        batches = list(batches)
        mined.append(np.concatenate([np.asarray(i) for i, _ in batches]))
        return real(miner, iter(batches), **kw)

    monkeypatch.setattr(arrivals, "mining_state", counted)
    base_state = root.dictionary(dict_id) / "mining_states" / "base.pt"
    before = base_state.stat().st_mtime_ns
    ensure_features(spec, root, member)
    assert [m.tolist() for m in mined] == [list(range(n_base, n_base + 12)), list(range(n_base + 13, n_base + 21))]
    assert base_state.stat().st_mtime_ns == before
    expected = _one_pass(spec, root, member)
    got = _tables(root, dict_id)
    stats = got["feature_stats"].select(expected.feature_stats.column_names)  # the head's columns aside
    assert_same_mining(type(expected)(got["top_images"], stats, got["heatmaps"], got["top_images_cls"],
                                      got["feature_samples"], got["feature_factors"]), expected)
    marker = json.loads((root.dictionary(dict_id) / FEATURES_FILE).read_text())
    assert [a["key"] for a in marker["arrivals"]] == [first.key, second.key]
    mined.clear()
    ensure_features(spec, root, member)
    assert mined == []  # nothing new: the tables are reused

    # readers resolve global ids: pixels and labels of arrivals, by the id in the tables
    images, labels = suite_images(root, spec.dataset_id, marker["arrivals"])
    np.testing.assert_array_equal(images.get_orthogonal_selection((np.array([n_base + 13, n_base, 3]),)),
                                  np.stack([second_pixels[0], first_pixels[0],
                                            root_images(root, spec)[3]]))
    top = got["top_images"].to_pydict()
    arrived = [f for f, i in zip(top["feature"], top["image_idx"]) if i >= n_base]
    assert arrived, "no arrival image reached a top list: the test would not check the card"
    card = feature_card(root, dict_id, arrived[0])
    for idx, pixels in zip(card.image_idx, card.images):
        np.testing.assert_array_equal(pixels, images.get_orthogonal_selection((np.array([idx]),))[0])


def _an_arrival_with_images(spec, root, member, inbox, seed: int) -> dict:
    """A done arrival holding images, mined into the features (made here when this test runs alone)."""
    if not any(a["n_images"] for a in done_arrivals(spec, root)):
        _drop_shapes(inbox, spec, seed=seed, n=4)
        ensure_arrival(spec, root, register_arrivals(spec, root).key, progress=False)
        ensure_features(spec, root, member)
    return next(a for a in done_arrivals(spec, root) if a["n_images"])


def root_images(root, spec):
    from analysis.data.images import open_images
    return open_images(root.images(spec.dataset_id))[:]


def test_a_damaged_saved_state_is_mined_again_not_reused(mined_base, caplog):
    spec, root, member, inbox = mined_base
    dict_id = dictionary_id(spec, member)
    key = _an_arrival_with_images(spec, root, member, inbox, seed=13)["key"]
    before = _tables(root, dict_id)
    state = root.dictionary(dict_id) / "mining_states" / f"{key}.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    os.remove(root.dictionary(dict_id) / FEATURES_FILE)  # the tables are redone from the states
    with caplog.at_level(logging.WARNING):
        ensure_features(spec, root, member)
    assert f"{state}: content changed" in caplog.text
    assert state.read_bytes() != bytes(data)
    after = _tables(root, dict_id)
    np.testing.assert_array_equal(after.pop("heatmaps"), before.pop("heatmaps"))
    for name, table in before.items():
        assert after[name].equals(table), name


def test_an_arrival_of_only_unusable_files_completes_empty_and_blocks_nothing(mined_base):
    """A batch with no usable image (a stray text file) still arrives, with every file set aside:
    an arrival partition that could never succeed would hold every later features update back."""
    spec, root, member, inbox = mined_base
    (inbox / "readme.txt").write_text("nothing to see")
    arrival = register_arrivals(spec, root)
    summary = ensure_arrival(spec, root, arrival.key, progress=False)
    assert (summary["n_images"], summary["n_rejected"]) == (0, 1)
    rejected = pq.read_table(root.images(summary["dataset_id"]) / "rejected.parquet").to_pylist()
    assert [r["source"] for r in rejected] == ["readme.txt"]
    ensure_features(spec, root, member)  # merges around it
    marker = json.loads((root.dictionary(dictionary_id(spec, member)) / FEATURES_FILE).read_text())
    assert arrival.key in [a["key"] for a in marker["arrivals"]]


def test_the_sensor_adds_each_arrival_once_and_the_features_follow_it(tmp_path):
    from pipelines.definitions import build_definitions, default_resources
    from test_automation import _done, _requested, _waves

    inbox = tmp_path / "inbox"
    spec = _suite(inbox)
    defs = build_definitions(spec, default_resources(str(tmp_path / "data")))
    sensor = defs.resolve_sensor_def("arrivals")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance:
        def tick():
            context = dg.build_sensor_context(instance=instance, definitions=defs,
                                              resources={"storage": defs.resources["storage"]})
            return sensor(context)

        skipped = tick()
        assert isinstance(skipped, dg.SkipReason) and str(inbox) in skipped.skip_message \
            and "does not exist" in skipped.skip_message
        inbox.mkdir()
        _drop_shapes(inbox, spec, seed=21, n=3)
        result = tick()
        key = registered(spec, DataRoot(tmp_path / "data"))[0].key
        assert [r.partition_key for r in result.run_requests] == [key]
        assert [r.run_key for r in result.run_requests] == [key]
        assert result.dynamic_partitions_requests[0].partition_keys == [key]
        instance.add_dynamic_partitions("arrivals", [key])  # what the daemon does with the request
        assert isinstance(tick(), dg.SkipReason)  # nothing new: no second run

        # the automation: a fresh head flows through the arrival too; a later arrival re-mines
        # every member's features, then the catalog, report and browser follow
        members = sorted(m.key for m in spec.members())
        _, cursor = _requested(defs, instance, None)
        _done(instance, {"images": None, "model": None, "activation_layout": None})
        waves, cursor = _waves(defs, instance, cursor)
        assert any(w.get("arrivals") == [key] for w in waves)
        one = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)  # one image is an arrival too
        Image.fromarray(one).save(inbox / spec.class_names()[0] / "one.png")
        later = tick().run_requests[0].partition_key
        instance.add_dynamic_partitions("arrivals", [later])
        _done(instance, {"arrivals": [later]})  # its run
        wanted, cursor = _requested(defs, instance, cursor)
        assert wanted == {"features": members}
        _done(instance, wanted)
        wanted, cursor = _requested(defs, instance, cursor)
        assert set(wanted) == {"catalog", "report", "feature_browser", "published"}


def test_make_run_names_a_missing_watched_folder_before_any_work(tmp_path, capsys):
    import yaml

    from pipelines.run import main

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({**SUITE_RAW, "arrivals": {"path": str(tmp_path / "nowhere")}}))
    assert main(["--suite", str(suite), "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "does not exist" in err
    assert not (tmp_path / "root").exists()


def test_arrivals_refuse_a_sampled_store():
    with pytest.raises(ValueError, match="arrivals need every patch kept"):
        parse_suite({**SUITE_RAW, "arrivals": {"path": "inbox"},
                     "activations": {**SUITE_RAW["activations"], "patches_sample": 4}})


def test_a_suite_run_through_dagster_takes_the_watched_folders_files(tmp_path):
    """`make run`'s path (`run_suite`, in process here): registered arrivals are partitions of the
    instance, extracted, mined into every member's tables, in the catalog and on the browser's pages."""
    from conftest import suite_in_dagster
    from analysis.catalog import connect_catalog

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spec = _suite(inbox)
    _drop_shapes(inbox, spec, seed=31, n=6)
    with suite_in_dagster(spec, tmp_path) as (root, instance):
        keys = instance.get_dynamic_partitions("arrivals")
        assert [a.key for a in registered(spec, root)] == keys and len(keys) == 1
        dict_id = dictionary_id(spec, spec.members()[0])
        marker = json.loads((root.dictionary(dict_id) / FEATURES_FILE).read_text())
        assert [a["key"] for a in marker["arrivals"]] == keys
        with connect_catalog(root.catalog) as con:
            assert con.execute("select count(*), min(image_idx) from arrival_images").fetchone() == (6, 640)
        split = pq.read_table(root.images(done_arrivals(spec, root)[0]["dataset_id"]) / "labels.parquet")
        assert set(split.column("split").to_pylist()) == {"eval"}  # nothing trains on an arrival


def test_verify_names_damage_in_an_arrival_and_a_rerun_redoes_exactly_that(mined_base):
    """The full verification covers arrivals (their images, stores and the saved mining states);
    after `--repair` the arrival's stage redoes the damaged shard, and the stores read as before."""
    import zarr

    from analysis.activations.store_files import shard_keys
    from analysis.stages.verify import verify_suite

    spec, root, member, inbox = mined_base
    arrival = _an_arrival_with_images(spec, root, member, inbox, seed=14)
    assert verify_suite(spec, root) == []
    location = root.hook_store(arrival["store_id"], member.hook)
    before = ActivationStore.open(location).read(0, arrival["n_images"]).clone()
    group = zarr.open_group(str(location), mode="r")
    store_file = Path(location) / [k for k in shard_keys(group, 0, 0, arrival["n_images"]) if k.startswith("acts")][0]
    data = bytearray(store_file.read_bytes())
    data[10] ^= 0xFF
    store_file.write_bytes(bytes(data))
    state = root.dictionary(dictionary_id(spec, member)) / "mining_states" / f"{arrival['key']}.pt"
    state.write_bytes(state.read_bytes()[:-1] + bytes([state.read_bytes()[-1] ^ 0xFF]))
    found = verify_suite(spec, root, full=True)
    assert any(str(store_file.relative_to(Path(location))) in str(d) for d in found)
    assert any(str(state) in str(d) for d in found)
    assert verify_suite(spec, root, full=True, repair=True) == found
    ensure_arrival(spec, root, arrival["key"], progress=False)
    assert ActivationStore.open(location).read(0, arrival["n_images"]).equal(before)
    assert verify_suite(spec, root, full=True) == []  # the state's marker was taken back: mined anew when next merged
