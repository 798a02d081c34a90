"""From a folder of JPEGs to stored activations, against a bare forward on decoded tensors.

The pipeline decodes a folder once (`ingest`: decode, the model's eval transform, whole-chunk
Zarr writes, on a thread pool) and then extracts from the stored pixels (`extract_shard`). Same
run, interleaved repeats, same model (a timm ViT converted to a HookedViT, random weights) and
batch size:

    decode_w<k>   ingest the folder with k decoding threads          (images/s against k)
    decode_p<k>   the same with k decoding processes (--processes)

(each also as CPU milliseconds per image, this process's and its decoding processes', which a
busy machine disturbs less than images/s)
    extract       extract_shard from the ingested images into fresh stores
    bare          model(x) on the same images already decoded, preprocessed and in memory

and the end-to-end ratio bare ÷ (ingest with the most threads + extract): 1.0 means decoding and
storing cost nothing beside the forward pass. `gil_held_fraction` is the share of a decoding
thread's time during which it holds the GIL (median of 7 interleaved estimates), and `thread_scaling_limit` = 1 / that share, the most
images/s decoding threads can reach as a multiple of one thread, however many cores. Writes benchmarks/results/folder_ingest.json.

    python benchmarks/bench_folder_ingest.py [--model vit_small_patch16_224] [--images 256] [--repeats 3] [--threads 0]
    python benchmarks/bench_folder_ingest.py --decode-only --images 1024 --workers 1 2 --processes 2   # the ingest alone
    python benchmarks/bench_folder_ingest.py --device cuda --compute-dtype bfloat16 --model vit_base_patch16_224 \
        --images 4096 --batch-size 256 --workers 4 8 16 --out benchmarks/results/folder_ingest_cuda.json

On a GPU, `bare` runs on pixels already on the device, and every variant waits for the device
before its clock stops.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from skimage import data as skdata

from _results import machine, median_ratio, write
from analysis.activations.extract import extract_shard
from analysis.activations.store import StoreLayout, create_store
from analysis.data.images import open_images
from analysis.data.ingest import _decoded, ingest
from analysis.data.sources import FolderSource
from analysis.models.inputs import to_model_input
from analysis.models.zoo import load_model, timm_input


def make_folder(root: Path, n: int) -> None:
    """n JPEGs of ImageNet-like size (about 500 x 375): random crops of scikit-image's photos."""
    rng = np.random.default_rng(0)
    photos = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = min(375, photo.shape[0]), min(500, photo.shape[1])
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        buf = io.BytesIO()
        Image.fromarray(photo[y:y + h, x:x + w]).save(buf, "JPEG", quality=90)
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def time_ingest(folder: Path, out: Path, pre, workers: int, processes: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""
    shutil.rmtree(out, ignore_errors=True)
    source = FolderSource(str(folder))
    listing = source.listing()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    ingest(source.entries(), listing.n_entries, pre, out, class_names=listing.class_names, workers=workers,
           processes=processes, progress=False)
    return time.perf_counter() - t0, _cpu_seconds() - cpu0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def gil_held_fractions(folder: Path, pre, pairs: int = 7, seconds: float = 1.0) -> list[float]:
    """The share of a decoding thread's time during which it holds the GIL: a pure-Python counter
    on a second thread runs at (1 - share) of its solo rate while one thread decodes (the machine
    needs a core for each). Threads can then scale to at most 1 / share of one thread (Amdahl).
    One estimate per (solo, beside decoding) pair of runs, interleaved: single runs are noisy."""
    files = sorted(folder.rglob("*.jpg"))
    datas = [f.read_bytes() for f in files]

    def count(stop: threading.Event, out: list) -> None:
        n = 0
        while not stop.is_set():
            n += 1
        out.append(n)

    def rate(work) -> float:
        stop, out = threading.Event(), []
        counter = threading.Thread(target=count, args=(stop, out), daemon=True)
        t0 = time.perf_counter()
        counter.start()
        try:
            work()
        finally:
            stop.set()
            counter.join()
        return out[0] / (time.perf_counter() - t0)

    def decode_for(duration: float) -> None:
        end, i = time.perf_counter() + duration, 0
        while time.perf_counter() < end:
            _decoded(datas[i % len(datas)], pre)
            i += 1

    return [1 - rate(lambda: decode_for(seconds)) / rate(lambda: time.sleep(seconds)) for _ in range(pairs)]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: str, compute_dtype: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, compute_dtype),
                          enabled=compute_dtype != "float32")


def time_extract(model, images, hook: str, work: Path, batch: int, n_tokens: int, device: str,
                 compute_dtype: str) -> float:
    shutil.rmtree(work, ignore_errors=True)
    n = images.shape[0]
    layout = StoreLayout(n_images=n, n_tokens=n_tokens, d_model=model.cfg.d_model, images_per_shard=n,
                         images_per_chunk=64 if n % 64 == 0 else n, dtype="float16")
    stores = {hook: work / "store.zarr"}
    create_store(stores[hook], layout, {"bench": "folder_ingest"})
    stop = int(hook.split(".")[1]) + 1

    def capture(x):
        with _autocast(device, compute_dtype):
            _, cache = model.run_with_cache(x, names_filter=[hook], stop_at_layer=stop)
        return {hook: cache[hook].float()}

    t0 = time.perf_counter()
    extract_shard(capture, images, stores, 0, batch_size=batch, device=device, progress=False)
    _sync(device)
    return time.perf_counter() - t0


def time_bare(model, decoded: torch.Tensor, batch: int, device: str, compute_dtype: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(device, compute_dtype):
        for i in range(0, decoded.shape[0], batch):
            model(decoded[i:i + batch])
    _sync(device)
    return time.perf_counter() - t0


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="decoding threads to time")
    ap.add_argument("--processes", type=int, nargs="*", default=[], help="decoding processes to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...: where the forward pass runs")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="forward precision (autocast below float32), as the suite's activations.compute_dtype")
    ap.add_argument("--decode-only", action="store_true",
                    help="time only the ingest (images/s against the workers): no extraction, no bare forward")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "folder_ingest.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source = timm_input(args.model)
    torch.manual_seed(0)
    model = load_model(f"timm:{args.model}", "random").with_input_normalization(source.mean, source.std).eval()
    model = model.to(args.device)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    runs: dict[str, list[float]] = {f"decode_w{k}": [] for k in args.workers} | \
        {f"decode_p{k}": [] for k in args.processes}
    cpu_ms = {name: [] for name in runs}  # CPU per image: steadier than images/s on a shared machine
    if not args.decode_only:
        runs |= {"extract": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "jpegs", args.images)
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for name, k, processes in [(f"decode_w{k}", k, False) for k in args.workers] + \
                    [(f"decode_p{k}", k, True) for k in args.processes]:
                wall, cpu = time_ingest(tmp / "jpegs", tmp / "ds", source.preprocessing, k, processes)
                runs[name].append(args.images / wall)
                cpu_ms[name].append(1e3 * cpu / args.images)
            if args.decode_only:
                continue
            images = open_images(tmp / "ds")
            decoded = to_model_input(images[...]).to(args.device)
            runs["extract"].append(args.images / time_extract(model, images, hook, tmp / "acts", args.batch_size,
                                                              model.cfg.n_tokens, args.device, args.compute_dtype))
            runs["bare"].append(args.images / time_bare(model, decoded, args.batch_size, args.device,
                                                        args.compute_dtype))
            del decoded
        gil = gil_held_fractions(tmp / "jpegs", source.preprocessing)
    result = {"machine": machine(pillow=PIL.__version__, device=_device_name(args.device)), "args": vars(args),
              "images_per_s": runs, "median_images_per_s": {name: statistics.median(v) for name, v in runs.items()},
              "cpu_ms_per_image": cpu_ms, "median_cpu_ms_per_image": {n: statistics.median(v) for n, v in cpu_ms.items()},
              "gil_held_fraction": statistics.median(gil), "gil_held_fraction_pairs": gil,
              "thread_scaling_limit": 1 / statistics.median(gil)}
    if not args.decode_only:
        most = f"decode_w{max(args.workers)}"
        folder_to_store = [1 / (1 / d + 1 / e) for d, e in zip(runs[most], runs["extract"])]  # images/s of both
        result |= {"ratio_folder_to_store_over_bare": median_ratio(folder_to_store, runs["bare"]),
                   "ratio_extract_over_bare": median_ratio(runs["extract"], runs["bare"])}
    write(args.out, result, runs_key="images_per_s")

if __name__ == "__main__":
    main()
