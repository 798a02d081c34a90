"""Ingesting real image folders and Parquet files: every kind of image decoded once, the model's
preprocessing applied, unusable files set aside with a reason, duplicates on one side of the split."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from numpy.testing import assert_array_equal
from PIL import Image
from skimage import data as skdata

from analysis.data.decode import decode_image
from analysis.data.images import IMAGE_WRITE_CONFIG, image_sha256, read_images
from analysis.data.ingest import ChunkWriter, ingest, split_unique
from analysis.data.sources import FolderSource, ParquetSource
from analysis.models.inputs import Preprocessing

PRE = Preprocessing(size=32, resize=40)


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


def make_photo_folder(root):
    """Real photos from scikit-image and generated images of every awkward kind, in class folders,
    with a duplicate (the same pixels as JPEG and PNG) and three unusable files."""
    chelsea_jpg = _encode(skdata.chelsea(), "JPEG", quality=90)
    rng = np.random.default_rng(0)
    files = {
        "cat/chelsea.jpg": chelsea_jpg,
        "cat/chelsea_copy.png": _encode(decode_image(chelsea_jpg), "PNG"),  # same decoded pixels
        "space/astronaut.png": _encode(skdata.astronaut(), "PNG"),
        "space/rocket.webp": _encode(skdata.rocket(), "WEBP"),
        "misc/gray.png": _encode(skdata.camera(), "PNG"),
        "misc/rgba.png": _encode(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "PNG"),
        "misc/sixteen.png": _encode((rng.integers(0, 65536, (24, 24), dtype=np.uint16)).astype(np.uint16), "PNG"),
        "misc/cmyk.jpg": _encode(skdata.coffee(), "JPEG", mode="CMYK"),
        "misc/palette.gif": _encode(skdata.coffee()[:100, :100], "GIF", mode="P"),
        "misc/empty.jpg": b"",
        "misc/truncated.png": _encode(skdata.astronaut(), "PNG")[:5000],
        "misc/notes.txt": b"not an image\n",
        ".DS_Store": b"hidden: skipped",
    }
    for rel, payload in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return root


def _ingest(source, directory, **kw):
    listing = source.listing()
    kw = {"eval_fraction": 0.25, "seed": 0, "workers": 4, "images_per_chunk": 4, "progress": False, **kw}
    return listing, ingest(source.entries(), listing.n_entries, PRE, directory, class_names=listing.class_names,
                           **kw)


def test_folder_of_real_photos(photo_folder, tmp_path):
    listing, report = _ingest(FolderSource(str(photo_folder)), tmp_path / "ds")
    assert listing.n_entries == 12 and listing.class_names == ("cat", "misc", "space")
    assert (report.n_images, report.n_rejected, report.n_duplicates) == (9, 3, 1)
    labels = pq.read_table(tmp_path / "ds" / "labels.parquet").to_pylist()
    assert [r["source"] for r in labels] == ["cat/chelsea.jpg", "cat/chelsea_copy.png", "misc/cmyk.jpg",
                                             "misc/gray.png", "misc/palette.gif", "misc/rgba.png",
                                             "misc/sixteen.png", "space/astronaut.png", "space/rocket.webp"]
    assert [r["label"] for r in labels] == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    images = zarr.open_array(str(tmp_path / "ds" / "images.zarr"), mode="r")
    assert images.shape == (9, 32, 32, 3) and images.dtype == np.uint8
    for i, row in enumerate(labels):  # the stored image is the model's preprocessing of the decoded file
        decoded = decode_image((photo_folder / row["source"]).read_bytes())
        assert row["sha256"] == image_sha256(decoded)
        assert_array_equal(images[i], PRE.apply(decoded))
    assert labels[1]["duplicate_of"] == 0 and labels[1]["split"] == labels[0]["split"]
    assert sum(r["duplicate_of"] is not None for r in labels) == 1
    rejected = {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "ds" / "rejected.parquet").to_pylist()}
    assert set(rejected) == {"misc/empty.jpg", "misc/truncated.png", "misc/notes.txt"}
    assert rejected["misc/empty.jpg"] == "empty file" and rejected["misc/notes.txt"] == "not an image"
    assert rejected["misc/truncated.png"].startswith("truncated or corrupt")
    assert (report.n_train, report.n_eval) == (7, 2)  # 8 distinct contents: 2 held out, copies together


def test_ingestion_is_deterministic_across_thread_counts(photo_folder, tmp_path):
    _, a = _ingest(FolderSource(str(photo_folder)), tmp_path / "a", workers=1)
    _, b = _ingest(FolderSource(str(photo_folder)), tmp_path / "b", workers=8, images_per_chunk=256)
    assert a == b
    assert_array_equal(zarr.open_array(str(tmp_path / "a" / "images.zarr"))[:],
                       zarr.open_array(str(tmp_path / "b" / "images.zarr"))[:])
    assert pq.read_table(tmp_path / "a" / "labels.parquet").equals(pq.read_table(tmp_path / "b" / "labels.parquet"))


def test_decoding_processes_store_the_bytes_of_decoding_threads(photo_folder, tmp_path, monkeypatch):
    """Files read here, decoded in spawned processes (tasks of 3 files, so the 12 files are 4 tasks
    over 2 processes), in order: the same images, labels, duplicates and rejected files as one thread."""
    import analysis.data.ingest

    monkeypatch.setattr(analysis.data.ingest, "PROCESS_TASK_IMAGES", 3)
    _, threads = _ingest(FolderSource(str(photo_folder)), tmp_path / "threads", workers=1)
    _, processes = _ingest(FolderSource(str(photo_folder)), tmp_path / "processes", workers=2, processes=True)
    assert processes == threads
    for name in ("labels.parquet", "rejected.parquet"):
        assert pq.read_table(tmp_path / "processes" / name).equals(pq.read_table(tmp_path / "threads" / name))
    assert_array_equal(zarr.open_array(str(tmp_path / "processes" / "images.zarr"))[:],
                       zarr.open_array(str(tmp_path / "threads" / "images.zarr"))[:])


def test_chunk_writer_keeps_the_order_on_several_threads_and_raises_a_failed_write(tmp_path):
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(10, 2), chunks=(2, 2), dtype="uint8")
    with ChunkWriter(arr, threads=3) as writer:
        for start in range(0, 10, 2):
            writer.write([np.full(2, start, np.uint8), np.full(2, start + 1, np.uint8)])
    assert writer.written == 10
    assert_array_equal(arr[:], np.repeat(np.arange(10, dtype=np.uint8)[:, None], 2, axis=1))

    class FullDisk:
        calls = 0

        def __setitem__(self, key, value):
            FullDisk.calls += 1
            if FullDisk.calls == 2:
                raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with ChunkWriter(FullDisk(), threads=2) as writer:
            for _ in range(3):
                writer.write([np.zeros(2, np.uint8)])


def test_read_images_decompresses_whole_chunks_itself_and_equals_zarr(tmp_path, monkeypatch):
    import analysis.data.images as image_files

    pixels = np.random.default_rng(0).integers(0, 40, (10, 6, 5, 3), dtype=np.uint8)  # compressible
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=pixels.shape, chunks=(4, 6, 5, 3), dtype="uint8",
                            config=IMAGE_WRITE_CONFIG)  # chunks 0-3, 4-7 and 8-9 (stored padded to 4)
    arr[:] = pixels
    decoded = []
    real = image_files._ZSTD

    class Recording:
        def decode(self, data, out):
            decoded.append(out.size)
            return real.decode(data, out=out)

    monkeypatch.setattr(image_files, "_ZSTD", Recording())
    buffer = np.full((12, 6, 5, 3), 255, np.uint8)
    for lo, hi, direct in ((0, 10, 2), (0, 4, 1), (4, 8, 1), (2, 9, 1), (8, 10, 0), (1, 3, 0)):
        decoded.clear()
        assert_array_equal(read_images(arr, lo, hi), pixels[lo:hi])
        assert_array_equal(read_images(arr, lo, hi, buffer), pixels[lo:hi])
        assert_array_equal(buffer[:hi - lo], pixels[lo:hi])  # filled in place
        assert decoded == [4 * 6 * 5 * 3] * (2 * direct)  # whole chunks inside the array only
    # another codec, and a chunk file gone (Zarr's fill value, as Zarr reads it), go through Zarr
    plain = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=pixels.shape, chunks=(4, 6, 5, 3),
                              dtype="uint8", compressors=None)
    plain[:] = pixels
    decoded.clear()
    assert_array_equal(read_images(plain, 0, 8), pixels[:8])
    assert decoded == []
    chunk = tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0"
    chunk.unlink()
    assert_array_equal(read_images(arr, 0, 8), arr[0:8])
    assert (read_images(arr, 4, 8) == 0).all()


def test_a_listing_changes_when_a_file_does(photo_folder, tmp_path):
    folder = tmp_path / "f"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "a.png").write_bytes(_encode(skdata.camera(), "PNG"))
    before = FolderSource(str(folder)).listing().digest
    (folder / "x" / "b.png").write_bytes(_encode(skdata.camera()[:64], "PNG"))
    assert FolderSource(str(folder)).listing().digest != before


def test_label_file_with_extra_columns(photo_folder, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for name, img in (("a.png", skdata.camera()), ("b.png", skdata.astronaut()), ("c.png", skdata.coffee())):
        (folder / name).write_bytes(_encode(img, "PNG"))
    labels = folder / "labels.csv"
    labels.write_text("path,label,photographer\na.png,gray,x\nb.png,space,y\nc.png,gray,z\n")
    source = FolderSource(str(folder), labels_file=str(labels))
    listing, report = _ingest(source, tmp_path / "ds", eval_fraction=0.34)
    assert listing.n_entries == 3 and listing.class_names == ("gray", "space")  # the label file is not an image
    rows = pq.read_table(tmp_path / "ds" / "labels.parquet").to_pylist()
    assert [(r["source"], r["label"], r["photographer"]) for r in rows] == [("a.png", 0, "x"), ("b.png", 1, "y"),
                                                                           ("c.png", 0, "z")]
    labels.write_text("path,label\na.png,gray\nb.png,space\nc.png,gray\nd.png,gray\n")
    with pytest.raises(ValueError, match=r"names 1 images not in .*d\.png"):
        FolderSource(str(folder), labels_file=str(labels)).listing()
    labels.write_text("path,label\na.png,gray\n")
    with pytest.raises(ValueError, match=r"2 files in .* have no row"):
        FolderSource(str(folder), labels_file=str(labels)).listing()
    with pytest.raises(ValueError, match="no column 'class'"):
        FolderSource(str(folder), labels_file=str(labels), label_column="class").listing()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_parquet_in_the_hugging_face_layout(tmp_path, processes):
    photos = [skdata.camera(), skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    cells = [{"bytes": _encode(p, "PNG"), "path": f"img{i}.png"} for i, p in enumerate(photos)]
    cells.append({"bytes": b"\x89PNG broken", "path": "bad.png"})
    features = {"image": {"_type": "Image"}, "label": {"names": ["animal", "object", "person"], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.table({"image": cells, "label": [1, 2, 1, 0, 1, 0]}, schema=schema)
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)  # three row groups
    source = ParquetSource(str(tmp_path / "train.parquet"))
    listing, report = _ingest(source, tmp_path / "ds", eval_fraction=0.4, processes=processes,
                              workers=2 if processes else 4)  # Parquet rows are read here, sent as bytes
    assert listing.n_entries == 6 and listing.class_names == ("animal", "object", "person")
    assert (report.n_images, report.n_rejected) == (5, 1)
    rows = pq.read_table(tmp_path / "ds" / "labels.parquet").to_pylist()
    assert [r["label"] for r in rows] == [1, 2, 1, 0, 1]  # names map back to the same sorted indices
    assert [r["source"] for r in rows] == [f"train.parquet#{i}" for i in range(5)]
    images = zarr.open_array(str(tmp_path / "ds" / "images.zarr"), mode="r")
    assert_array_equal(images[1], PRE.apply(skdata.astronaut()))
    rejected = pq.read_table(tmp_path / "ds" / "rejected.parquet").to_pylist()
    assert [r["source"] for r in rejected] == ["train.parquet#5"]


def test_parquet_with_string_labels_and_raw_bytes(tmp_path):
    table = pa.table({"png": [_encode(skdata.camera(), "PNG"), _encode(skdata.coffee(), "PNG")],
                      "kind": ["gray", "colour"]})
    pq.write_table(table, tmp_path / "a.parquet")
    source = ParquetSource((str(tmp_path),), image_column="png", label_column="kind")
    assert source.listing().class_names == ("colour", "gray")
    assert [e.label for e in source.entries()] == ["gray", "colour"]
    with pytest.raises(ValueError, match="no column 'image'"):
        ParquetSource(str(tmp_path / "a.parquet")).listing()
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read Parquet file"):
        ParquetSource(str(tmp_path / "broken.parquet")).listing()


def test_bad_folders_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        FolderSource(str(tmp_path / "nope")).listing()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        FolderSource(str(tmp_path / "empty")).listing()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="none of the 1 files could be used"):
        _ingest(FolderSource(str(tmp_path / "junk")), tmp_path / "ds")


def test_split_keeps_copies_together_and_needs_both_sides():
    shas = ["a", "b", "a", "c", "d", "a", "b"]
    split = split_unique(shas, 0.5, seed=3)
    for s in set(shas):
        assert len({split[i] for i, x in enumerate(shas) if x == s}) == 1
    assert len({shas[i] for i in range(len(shas)) if split[i] == "eval"}) == 2
    with pytest.raises(ValueError, match="empty split"):
        split_unique(["a", "a", "a"], 0.5, seed=0)


def test_preprocessing_resizes_the_short_side_then_crops_the_centre():
    image = np.zeros((60, 120, 3), np.uint8)
    image[:, 55:65] = 255  # a vertical bar at the centre survives the centre crop
    out = Preprocessing(size=30).apply(image)
    assert out.shape == (30, 30, 3) and out[:, 14:16].min() > 200 and out[:, :5].max() == 0
    gray = Preprocessing(size=30, channels=1).apply(image)
    assert gray.shape == (30, 30, 1)
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(size=30, resize=20)


def test_a_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    from analysis.data.sources import HFSource

    photos = [skdata.camera(), skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["b", "a"])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in photos], "label": [0, 1, 1, 0]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    listing, report = _ingest(HFSource(str(tmp_path / "single")), tmp_path / "ds", eval_fraction=0.5)
    assert listing.n_entries == 4 and listing.class_names == ("a", "b") and listing.n_unlabelled == 0
    rows = pq.read_table(tmp_path / "ds" / "labels.parquet").to_pylist()
    assert [r["label"] for r in rows] == [1, 0, 0, 1]  # ClassLabel "b", "a", "a", "b" in sorted class order
    images = zarr.open_array(str(tmp_path / "ds" / "images.zarr"), mode="r")
    assert_array_equal(images[1], PRE.apply(skdata.astronaut()))  # the saved PNG bytes, decoded once
    assert HFSource(str(tmp_path / "dict"), split="validation").listing().n_entries == 1
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'validation'\]"):
        HFSource(str(tmp_path / "dict")).listing()
    with pytest.raises(ValueError, match="save_to_disk"):  # a hub name: no network here, and no hang
        HFSource("user/some-dataset").listing()
