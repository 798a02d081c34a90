"""A suite over a folder of real photos, end to end through Dagster: awkward and unusable files,
duplicates, the model's preprocessing, activations equal to run_with_cache, the catalog."""

import io

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from analysis.activations.reader import ActivationStore
from analysis.catalog import connect_catalog
from analysis.data.images import open_images, read_labels
from analysis.models.inputs import to_model_input
from analysis.paths import DataRoot
from analysis.stages.model import load_model
from analysis.stages.suite import parse_suite
from analysis.stages.validate import validate_suite
from conftest import small_training, suite_in_dagster
from pipelines.run import run_suite

HOOK = "blocks.1.hook_resid_post"


def _save(path, array, fmt="PNG", mode=None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Two classes of random crops of two real photos (60 files), five awkward kinds of image, one
    exact duplicate and three unusable files: 69 files, 66 usable, in two partitions of 32 (+2)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, photo in (("cat", skdata.chelsea()), ("astronaut", skdata.astronaut())):
        for i in range(30):
            y, x = rng.integers(0, 200, 2)
            crop = photo[y:y + 200, x:x + 200]
            _save(root / name / f"{i:02d}.jpg", crop[:, ::-1] if i % 2 else crop, "JPEG")
    _save(root / "cat" / "gray.png", skdata.chelsea(), mode="L")
    _save(root / "cat" / "rgba.png", np.dstack([skdata.chelsea(), np.full(skdata.chelsea().shape[:2], 128, np.uint8)]))
    _save(root / "cat" / "palette.gif", skdata.chelsea(), "GIF", mode="P")
    _save(root / "astronaut" / "cmyk.jpg", skdata.astronaut(), "JPEG", mode="CMYK")
    sixteen = (skdata.astronaut()[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(root / "astronaut" / "sixteen.png")
    (root / "astronaut" / "copy.png").write_bytes((root / "astronaut" / "sixteen.png").read_bytes())
    (root / "cat" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "PNG")
    (root / "astronaut" / "broken.png").write_bytes(buf.getvalue()[:3000])
    (root / "cat" / "notes.txt").write_text("a note, not an image")
    return root


def _suite(folder):
    return parse_suite({
        "name": "photos",
        "dataset": {"source": "folder", "params": {"path": str(folder), "eval_fraction": 0.25, "workers": 2}},
        "model": {"vit": {"image_size": 32, "patch_size": 8, "in_chans": 3, "d_model": 32, "n_layers": 2,
                          "n_heads": 2, "d_mlp": 64},
                  "train": {"epochs": 4, "batch_size": 16, "warmup_steps": 2}},
        "activations": {"hooks": ["blocks.0.hook_resid_post", HOOK], "images_per_shard": 32,
                        "images_per_chunk": 16, "batch_size": 16},
        "dictionaries": {"hooks": [HOOK], "architectures": ["topk"], "expansions": [2], "ks": [4], "seeds": [0],
                         "train": {"batch_size": 128, "n_train_tokens": 4096, "warmup_steps": 2,
                                   "dead_tokens": 1024}},
        "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 16},
    })


@pytest.fixture(scope="module")
def folder_run(photo_folder, tmp_path_factory):
    spec = _suite(photo_folder)
    with suite_in_dagster(spec, tmp_path_factory.mktemp("run")) as (root, instance):
        yield spec, root, instance


def test_ingestion_counts_and_sets_aside_what_it_cannot_read(folder_run):
    spec, root, instance = folder_run
    meta = instance.get_latest_materialization_event(dg.AssetKey("images")).asset_materialization.metadata
    assert meta["n_images"].value == 66 and meta["n_rejected"].value == 3 and meta["n_duplicates"].value == 1
    assert spec.dataset.planned_images() == 69  # the partitions were planned before decoding: 3 shards
    con = connect_catalog(root.catalog)
    rejected = dict(con.execute("SELECT source, reason FROM rejected_images WHERE dataset_id = ? ORDER BY source",
                                [spec.dataset_id]).fetchall())
    assert rejected == {"astronaut/broken.png": rejected["astronaut/broken.png"], "cat/empty.jpg": "empty file",
                        "cat/notes.txt": "not an image"}
    assert rejected["astronaut/broken.png"].startswith("truncated or corrupt")
    labels = read_labels(root.images(spec.dataset_id)).to_pylist()
    by_sha = {}
    for row in labels:  # no content is on both sides of the split
        by_sha.setdefault(row["sha256"], set()).add(row["split"])
    assert all(len(sides) == 1 for sides in by_sha.values()) and len(by_sha) == 65
    assert open_images(root.images(spec.dataset_id)).shape == (66, 32, 32, 3)


def test_stored_activations_equal_run_with_cache_on_the_stored_images(folder_run):
    spec, root, _ = folder_run
    images = open_images(root.images(spec.dataset_id))
    store = ActivationStore.open(root.hook_store(spec.store_id, HOOK))
    assert store.n_images == 66
    model = load_model(spec, root)
    idx = [0, 31, 32, 65]  # both real shards, their edges
    with torch.no_grad():
        _, cache = model.run_with_cache(to_model_input(images.get_orthogonal_selection((idx,))), names_filter=[HOOK])
    got = torch.cat([store.read(i, i + 1) for i in idx])
    torch.testing.assert_close(got, cache[HOOK].half().float())  # the store keeps float16


def test_the_dictionary_is_trained_evaluated_and_in_the_catalog(folder_run):
    spec, root, _ = folder_run
    con = connect_catalog(root.catalog)
    rows = con.execute("SELECT fvu, l0, loss_recovered FROM evaluations WHERE dataset_id = ?",
                       [spec.dataset_id]).fetchall()
    assert len(rows) == 1 and 0 < rows[0][0] < 1 and 0 < rows[0][1] <= 4 and np.isfinite(rows[0][2])
    n_top = con.execute("SELECT count(*) FROM top_images").fetchone()[0]
    assert n_top > 0
    assert pq.read_table(root.images(spec.dataset_id) / "labels.parquet").num_rows == 66


def test_a_folder_suite_without_labels_is_refused_before_any_work(tmp_path):
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "a.png", skdata.camera())
    with pytest.raises(ValueError, match="0 classes and 1 unlabelled images"):
        parse_suite({"name": "flat", "dataset": {"source": "folder", "params": {"path": str(tmp_path / "flat")}},
                     "model": {"vit": {"in_chans": 3}}})
    with pytest.raises(ValueError, match="dataset folder .* does not exist"):
        parse_suite({"name": "x", "dataset": {"source": "folder", "params": {"path": str(tmp_path / "nope")}}})
    with pytest.raises(ValueError, match="did you mean labels_file"):
        parse_suite({"name": "x", "dataset": {"source": "folder", "params": {"path": ".", "label_file": "x"}}}
                    ).dataset.config()


def _timm_suite(folder):
    return parse_suite({
        "name": "photos_timm",  # decoded in processes; the mouse suite above decodes on threads
        "dataset": {"source": "folder", "params": {"path": str(folder), "eval_fraction": 0.25, "workers": 2,
                                                   "processes": True}},
        "model": {"kind": "timm", "name": "vit_tiny_patch16_224", "weights": "random",
                  "kwargs": {"img_size": 64, "depth": 2}},
        "activations": {"hooks": [HOOK], "images_per_shard": 32, "images_per_chunk": 16, "batch_size": 16},
        "dictionaries": small_training(batch_size=256, n_train_tokens=8192, dead_tokens=2048),
        "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 16},
    })


@pytest.fixture(scope="module")
def timm_run(photo_folder, tmp_path_factory):
    spec = _timm_suite(photo_folder)
    with suite_in_dagster(spec, tmp_path_factory.mktemp("timm")) as (root, _):
        yield spec, root


def test_a_timm_model_reads_the_folder_through_its_own_preprocessing(timm_run, photo_folder):
    import timm
    from timm.data import create_transform, resolve_data_config

    spec, root = timm_run
    images = open_images(root.images(spec.dataset_id))
    assert images.shape == (66, 64, 64, 3)  # timm's eval transform: shorter side 71, centre crop 64
    labels = read_labels(root.images(spec.dataset_id)).to_pylist()
    with torch.random.fork_rng():  # the same seeded random weights the suite converted
        torch.manual_seed(0)
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    data_config = {**resolve_data_config({}, model=reference), "input_size": (3, 64, 64)}
    transform = create_transform(**data_config)  # timm's own eval transform, on the files themselves
    unnormalized = create_transform(**{**data_config, "mean": (0, 0, 0), "std": (1, 1, 1)})
    model = load_model(spec, root)
    for row in labels[::7]:
        photo = Image.open(photo_folder / row["source"]).convert("RGB")  # these are plain RGB files
        if row["source"].endswith((".gif", ".png")):
            continue  # alpha, palette and 16-bit files: decode_image's conversions, not Pillow's convert
        stored = images[row["image_idx"]]
        expected = (unnormalized(photo).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(stored, expected)  # timm's resize and centre crop, exactly
        with torch.no_grad():  # timm's normalisation, folded into our patch embedding
            torch.testing.assert_close(model(to_model_input(stored[None])), reference(transform(photo)[None]),
                                       atol=1e-4, rtol=1e-4)


def test_a_timm_suite_scores_against_the_clean_output_distribution(timm_run):
    spec, root = timm_run
    con = connect_catalog(root.catalog)
    (downstream, kl_spliced, kl_ablated, recovered, gap, ce, fvu) = con.execute(
        "SELECT downstream, kl_spliced, kl_ablated, loss_recovered, ablation_gap, ce_clean, fvu FROM evaluations "
        "WHERE suite = 'photos_timm'").fetchone()
    assert downstream == "kl" and ce is None  # ImageNet logits say nothing about cat vs astronaut labels
    assert 0 <= kl_spliced < kl_ablated and gap == kl_ablated
    assert recovered == pytest.approx((kl_ablated - kl_spliced) / kl_ablated) and 0 < fvu < 1
    cos_spliced, cos_ablated = con.execute("SELECT cos_spliced, cos_ablated FROM evaluations").fetchone()
    assert cos_ablated < cos_spliced <= 1  # the spliced embedding stays closer to the clean one
    store = ActivationStore.open(root.hook_store(spec.store_id, HOOK))
    assert store.n_tokens == 17 and store.d_model == 192
    assert store.lineage["preprocessing"]["stored"] == {"size": 64, "resize": 71, "channels": 3,
                                                        "interpolation": "bicubic"}


def test_the_toolkit_scores_a_timm_head_on_its_own_predictions(timm_run):
    """A timm head's 1000 classes are not the folder's: the toolkit's target is the prediction, so
    the model's head on the final stream ranks it first on every image."""
    _, root = timm_run
    con = connect_catalog(root.catalog)
    try:
        rows = con.execute("SELECT layer, token, identifiability, top1, target FROM toolkit_identifiability "
                           "ORDER BY layer, token").fetchall()
        perturbed = con.execute("SELECT condition FROM toolkit_perturbation ORDER BY condition").fetchall()
    finally:
        con.close()
    assert {r[4] for r in rows} == {"prediction"} and max(r[0] for r in rows) == 2  # depth 2
    [(_, _, identifiability, top1, _)] = [r for r in rows if r[0] == 2 and r[1] == "stream"]
    assert identifiability == 1.0 and top1 == 1.0
    assert perturbed == [("no_cls",), ("none",), ("self_only",)]  # no object masks outside generated shapes


def test_timm_weights_are_checked_before_any_work_and_hashed_into_the_id(photo_folder, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))

    def suite(**model_fields):
        return parse_suite({"name": "w", "dataset": {"source": "folder", "params": {"path": str(photo_folder)}},
                            "model": {"kind": "timm", "name": "vit_tiny_patch16_224", **model_fields},
                            "activations": {"hooks": [HOOK]}})

    fits = suite(weights=str(tmp_path / "tiny.safetensors"), kwargs={"img_size": 64, "depth": 2})
    validate_suite(fits)
    assert fits.model_id != suite(weights="random", kwargs={"img_size": 64, "depth": 2}).model_id
    with pytest.raises(ValueError, match=r"does not fit timm:vit_tiny_patch16_224.*2 unexpected .*blocks\.1"):
        validate_suite(suite(weights=str(tmp_path / "tiny.safetensors"), kwargs={"img_size": 64, "depth": 1}))
    with pytest.raises(ValueError, match="2 of another shape.*head"):  # a 10-class head for a 1000-class file
        validate_suite(suite(weights=str(tmp_path / "tiny.safetensors"),
                             kwargs={"img_size": 64, "depth": 2, "num_classes": 10}))
    with pytest.raises(ValueError, match="pretrained needs the hub"):
        validate_suite(suite(weights="pretrained", kwargs={"img_size": 64, "depth": 2}))
    with pytest.raises(ValueError, match="is not a file"):
        suite(weights=str(tmp_path / "nope.safetensors")).model_id
    with pytest.raises(ValueError, match="needs model.name"):
        parse_suite({"name": "w", "dataset": {"source": "folder", "params": {"path": str(photo_folder)}},
                     "model": {"kind": "timm"}})
    with pytest.raises(ValueError, match="unknown model 'timm:vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        suite(name="vit_tiny_patch16_2244")


def test_a_saved_hookedvit_directory_is_a_model_kind(timm_run, photo_folder, tmp_path):
    timm_spec, timm_root = timm_run
    saved = timm_root.model(timm_spec.model_id)
    spec = parse_suite({
        "name": "photos_file",
        "dataset": {"source": "folder", "params": {"path": str(photo_folder), "eval_fraction": 0.25}},
        "model": {"kind": "file", "name": str(saved)},
        "activations": {"hooks": [HOOK], "images_per_shard": 64, "images_per_chunk": 16, "batch_size": 16},
        "dictionaries": {"hooks": [HOOK], "architectures": ["topk"], "expansions": [2], "ks": [8], "seeds": [0],
                         "train": {"batch_size": 256, "n_train_tokens": 4096, "warmup_steps": 2}},
        "evaluation": {"max_images": 32, "n_top": 4, "batch_images": 16},
    })
    assert spec.preprocessing().size == 64 and spec.downstream == "kl"
    validate_suite(spec)
    run_suite(spec, tmp_path / "data", instance=dg.DagsterInstance.ephemeral(), log=lambda _: None)
    root = DataRoot(tmp_path / "data")
    assert load_model(spec, root).weights_hash() == load_model(timm_spec, timm_root).weights_hash()
    con = connect_catalog(root.catalog)
    assert con.execute("SELECT downstream FROM evaluations").fetchall() == [("kl",)]
    with pytest.raises(ValueError, match="not a HookedViT directory"):
        parse_suite({"name": "x", "dataset": {"source": "folder", "params": {"path": str(photo_folder)}},
                     "model": {"kind": "file", "name": str(tmp_path)}})
