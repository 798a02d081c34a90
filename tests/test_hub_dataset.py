"""A hub dataset named in a suite (`dataset: {source: hf, params: {name: owner/name}}`), read here
from the hub cache (no network: HF_HUB_OFFLINE=1) laid out as huggingface_hub writes it, with the
Parquet files `datasets` writes; the split chosen from the files' paths."""

import shutil

import pyarrow.parquet as pq
import pytest
import zarr
from numpy.testing import assert_array_equal
from PIL import Image
from skimage import data as skdata

from analysis.data.hub import PARQUET_EXPORT, split_files
from analysis.data.ingest import ingest
from analysis.data.sources import HFSource
from analysis.models.inputs import Preprocessing
from analysis.stages.inputs import DatasetSpec

datasets = pytest.importorskip("datasets")

PRE = Preprocessing(size=32, resize=40)
NAME = "spectra-test/photos"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _write_split(path, photos, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "person"])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in photos], "label": labels},
                                    features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding NAME at COMMIT (refs/main points at it) with a train and a test split."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / ("datasets--" + NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    _write_split(snapshot / "data" / "train-00000-of-00001.parquet",
                 [skdata.chelsea(), skdata.astronaut(), skdata.coffee()], [0, 1, 0])
    _write_split(snapshot / "data" / "test-00000-of-00001.parquet", [skdata.camera()], [1])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_split_is_ingested_with_its_class_names(hub_cache, tmp_path):
    source = HFSource(name=NAME, split="train")
    listing = source.listing()
    assert (listing.n_entries, listing.class_names, listing.n_unlabelled) == (3, ("cat", "person"), 0)
    report = ingest(source.entries(), listing.n_entries, PRE, tmp_path / "ds", class_names=listing.class_names,
                    eval_fraction=0.34, seed=0, workers=2, images_per_chunk=2, progress=False)
    assert report.n_images == 3 and report.n_rejected == 0
    rows = pq.read_table(tmp_path / "ds" / "labels.parquet").to_pylist()
    assert [r["label"] for r in rows] == [0, 1, 0]
    images = zarr.open_array(str(tmp_path / "ds" / "images.zarr"), mode="r")
    assert_array_equal(images[1], PRE.apply(skdata.astronaut()))  # the hub's PNG bytes, decoded once
    assert HFSource(name=NAME, split="test").listing().n_entries == 1


def test_the_dataset_id_names_the_commit_not_where_the_cache_is(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from analysis.stages.inputs import _listing

    train = DatasetSpec(source="hf", params={"name": NAME, "split": "train"})
    here = train.dataset_id(PRE)
    shutil.copytree(hub_cache, tmp_path / "elsewhere")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    _listing.cache_clear()  # listings are cached per process; this one must be read again
    assert train.dataset_id(PRE) == here
    assert DatasetSpec(source="hf", params={"name": NAME, "split": "test"}).dataset_id(PRE) != here
    _listing.cache_clear()
    (tmp_path / "elsewhere" / ("datasets--" + NAME.replace("/", "--")) / "refs" / "main").write_text("f" * 40)
    shutil.copytree(tmp_path / "elsewhere" / ("datasets--" + NAME.replace("/", "--")) / "snapshots" / COMMIT,
                    tmp_path / "elsewhere" / ("datasets--" + NAME.replace("/", "--")) / "snapshots" / ("f" * 40))
    assert train.dataset_id(PRE) != here  # another commit of the same files: another dataset


def test_hub_mistakes_are_named_before_any_work(hub_cache):
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\]: set dataset.params.split"):
        HFSource(name=NAME).listing()
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['test', 'train'\]\).*cached files"):
        HFSource(name=NAME, split="validation").listing()
    with pytest.raises(ValueError, match="not in the hub cache, and the hub is unreachable.*save_to_disk"):
        HFSource(name="spectra-test/absent", split="train").listing()
    with pytest.raises(ValueError, match="exactly one of path"):
        HFSource(path="/data/x", name=NAME)
    with pytest.raises(ValueError, match="exactly one of path"):
        HFSource()
    with pytest.raises(ValueError, match="set name, not path"):
        HFSource(path="/data/x", revision=PARQUET_EXPORT)
    with pytest.raises(ValueError, match="dataset.params.name to a hub dataset"):
        HFSource("user/some-dataset").listing()  # a hub name given as a path


def test_splits_are_read_from_the_hub_layouts():
    sharded = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
               "data/test-00000-of-00001.parquet"]
    assert split_files(sharded, NAME, "train", None) == sharded[1:3]
    assert split_files(["train.parquet", "valid.parquet"], NAME, "valid", None) == ["valid.parquet"]
    assert split_files(["train.parquet"], NAME, None, None) == ["train.parquet"]  # one split: no need to name it
    export = ["full/train/0000.parquet", "full/train/0001.parquet", "full/test/0000.parquet", "mini/train/0000.parquet"]
    assert split_files(export, NAME, "train", "full") == export[:2]
    assert split_files(export, NAME, "train", "mini") == export[3:]
    with pytest.raises(ValueError, match=r"no subset 'tiny' \(subsets: \['full', 'mini'\]\)"):
        split_files(export, NAME, "train", "tiny")
    with pytest.raises(ValueError, match="no Parquet files.*refs/convert/parquet"):
        split_files(["README.md", "photos.zip"], NAME, "train", None)


def test_online_only_the_split_is_downloaded_at_the_commit_the_listing_saw(hub_cache, monkeypatch):
    """The online branch with the hub's two calls stood in for (no network here): it asks for the
    files of one split, at the commit whose file list it chose them from."""
    import huggingface_hub
    from huggingface_hub.hf_api import DatasetInfo

    import analysis.data.hub as hub

    snapshot = hub_cache / ("datasets--" + NAME.replace("/", "--")) / "snapshots" / COMMIT
    files = ["README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]
    asked = {}

    def dataset_info(self, name, revision=None, **kw):
        asked["info"] = (name, revision)
        return DatasetInfo(id=name, sha=COMMIT, siblings=[{"rfilename": f} for f in files])

    def snapshot_download(name, repo_type, revision, allow_patterns):
        asked["download"] = (name, repo_type, revision, allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder, commit, chosen = hub.hub_split(NAME, "test", revision="v1")
    assert (folder, commit, chosen) == (snapshot, COMMIT, ["data/test-00000-of-00001.parquet"])
    assert asked == {"info": (NAME, "v1"), "download": (NAME, "dataset", COMMIT, chosen)}
