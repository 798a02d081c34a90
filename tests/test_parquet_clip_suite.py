"""An open_clip suite over a Parquet file in the Hugging Face layout, end to end through Dagster:
the zero-shot head over the dataset's classes, scored on its labels."""

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from analysis.catalog import connect_catalog
from analysis.data.images import open_images, read_labels
from analysis.models.inputs import to_model_input
from analysis.models.zoo import create_open_clip
from analysis.stages.model import load_model
from analysis.stages.suite import parse_suite
from analysis.stages.validate import validate_suite
from conftest import small_training, suite_in_dagster

HOOK = "blocks.1.hook_resid_post"
CFG = open_clip.get_model_config("ViT-B-32")
# the ViT-B-32 architecture, shrunk: 2 blocks of width 64 at 64 px, a 1-layer text tower
KWARGS = {"vision_cfg": dict(CFG["vision_cfg"], width=64, layers=2, image_size=64),
          "text_cfg": dict(CFG["text_cfg"], width=64, heads=2, layers=1), "embed_dim": 32}


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    """40 random crops of two photos as a `datasets`-style Parquet file (image struct, ClassLabel)."""
    rng = np.random.default_rng(1)
    cells, labels = [], []
    for label, photo in ((0, skdata.chelsea()), (1, skdata.astronaut())):
        for _ in range(20):
            y, x = rng.integers(0, 150, 2)
            cells.append({"bytes": _png(photo[y:y + 150, x:x + 150]), "path": None})
            labels.append(label)
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "astronaut"], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    path = tmp_path_factory.mktemp("parquet") / "train-00000.parquet"
    pq.write_table(pa.table({"image": cells, "label": labels}, schema=schema), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def clip_run(parquet_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    spec = parse_suite({
        "name": "clip_parquet",
        "dataset": {"source": "parquet", "params": {"paths": [str(parquet_file)], "eval_fraction": 0.3}},
        "model": {"kind": "open_clip", "name": "ViT-B-32", "weights": "random", "kwargs": KWARGS,
                  "templates": ["a photo of a {}.", "a picture of a {}."]},
        "activations": {"hooks": [HOOK], "images_per_shard": 32, "images_per_chunk": 16, "batch_size": 16},
        "dictionaries": small_training(batch_size=64, n_train_tokens=4096, dead_tokens=512),
        "evaluation": {"max_images": 64, "n_top": 4, "batch_images": 16},
    })
    with suite_in_dagster(spec, tmp) as (root, _):
        yield spec, root


def test_zero_shot_logits_equal_open_clip_on_its_own_preprocessing(clip_run, parquet_file):
    spec, root = clip_run
    assert spec.dataset.class_names() == ["astronaut", "cat"]  # ClassLabel names, sorted
    images = open_images(root.images(spec.dataset_id))
    assert images.shape == (40, 64, 64, 3)
    with torch.random.fork_rng():  # the same seeded random weights the suite converted
        torch.manual_seed(0)
        clip = create_open_clip("ViT-B-32", "random", KWARGS)
    preprocess = open_clip.image_transform(clip.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rows = pq.read_table(parquet_file).to_pylist()
    ours = load_model(spec, root)
    for i in (0, 17, 39):
        photo = Image.open(io.BytesIO(rows[i]["image"]["bytes"])).convert("RGB")
        x = preprocess(photo)[None]
        with torch.no_grad():
            img = F.normalize(clip.encode_image(x), dim=-1)
            text = torch.stack([F.normalize(F.normalize(clip.encode_text(tokenizer([t.format(c) for t in
                                                                                    spec.model.templates])), dim=-1)
                                            .mean(0), dim=-1) for c in ("astronaut", "cat")])
            expected = clip.logit_scale.exp() * img @ text.T
            torch.testing.assert_close(ours(to_model_input(images[i][None])), expected, atol=1e-4, rtol=1e-4)


def test_a_clip_suite_is_scored_on_the_labels_through_the_zero_shot_head(clip_run):
    spec, root = clip_run
    con = connect_catalog(root.catalog)
    downstream, ce, acc, recovered = con.execute(
        "SELECT downstream, ce_clean, acc_clean, loss_recovered FROM evaluations WHERE suite = 'clip_parquet'"
    ).fetchone()
    assert downstream == "labels" and np.isfinite(ce) and 0 <= acc <= 1 and np.isfinite(recovered)
    labels = read_labels(root.images(spec.dataset_id)).to_pylist()
    assert [r["label"] for r in labels] == [1] * 20 + [0] * 20  # cat = 1, astronaut = 0 in sorted class order
    assert labels[0]["source"] == "train-00000.parquet#0"


def test_the_toolkit_reads_a_clip_tower_through_its_zero_shot_head(clip_run):
    spec, root = clip_run
    con = connect_catalog(root.catalog)
    try:
        lens = con.execute("SELECT layer, token, target FROM toolkit_identifiability WHERE token = 'cls' "
                           "ORDER BY layer").fetchall()
        components = [c for (c,) in con.execute("SELECT DISTINCT component FROM toolkit_attribution").fetchall()]
    finally:
        con.close()
    n_layers = spec.vit_config().n_layers
    assert [(layer, target) for layer, _, target in lens] == [(i, "label") for i in range(n_layers + 1)]
    assert "embed" in components and "pos_embed" not in components  # ln_pre: the embeddings are one term


def test_open_clip_weights_files_are_checked_before_any_work(parquet_file, tmp_path):
    from safetensors.torch import save_file

    clip = create_open_clip("ViT-B-32", "random", KWARGS)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, str(tmp_path / "tower.safetensors"))

    def suite(weights, kwargs):
        return parse_suite({"name": "w", "dataset": {"source": "parquet", "params": {"paths": [str(parquet_file)]}},
                            "model": {"kind": "open_clip", "name": "ViT-B-32", "weights": weights, "kwargs": kwargs},
                            "activations": {"hooks": [HOOK]}})

    validate_suite(suite(str(tmp_path / "clip.safetensors"), KWARGS))
    validate_suite(suite(str(tmp_path / "tower.safetensors"), KWARGS))  # the image tower alone
    deeper = {**KWARGS, "vision_cfg": {**KWARGS["vision_cfg"], "layers": 3}}
    with pytest.raises(ValueError, match=r"does not fit open_clip:ViT-B-32.*missing .*transformer\.resblocks\.2"):
        validate_suite(suite(str(tmp_path / "clip.safetensors"), deeper))
    with pytest.raises(ValueError, match="needs the hub"):  # a pretrained tag, offline
        validate_suite(suite("laion2b_s34b_b79k", KWARGS))
