"""Extraction throughput (images/s) vs a bare forward pass over the same images.

Uses the pipeline's real path: shapes images written with `write_image_dataset` and opened with
`open_images`, a `HookedViT`, stores made by `create_store`, and `extract_shard` driven by the
capture of `analysis.stages.activations.extract` (`run_with_cache(x, names_filter=hooks,
stop_at_layer=...)`) on every block's `hook_resid_post`. Per model config, each repeat times
these passes back to back (interleaved, so load spikes on a shared machine hit all alike):

    forward_only   model(x) on inputs already converted in memory         (the stricter baseline)
    bare           read uint8 from Zarr + to_model_input + model(x)       (the baseline)
    capture        read + to_model_input + the pipeline's capture only    (hooks, no store)
    extract_nowrite extract_shard minus the acts/norms/image_idx Zarr writes and their read-back
                    for checksums (checks, stats, cast)
    extract        extract_shard into fresh stores                        (what the pipeline does)
    extract_threads extract with worker and writer threads forced          (one of extract's two modes)
    extract_inline  extract with the worker's share and the writes on the caller (the other)

and one instrumented extract pass afterwards splits the time by step and thread (not part of
the ratios); last, one activation shard is written chunk by chunk vs in one call (as extraction does).
Writes benchmarks/results/extraction.json.

    python benchmarks/bench_extraction.py [--repeats 7] [--mouse-images 4096] [--large-images 512]
    python benchmarks/bench_extraction.py --device cuda --configs mouse large vitb16 --out benchmarks/results/extraction_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr

import analysis.activations.extract as extraction
import analysis.activations.stats as act_stats
from analysis.activations.store import StoreLayout, create_store
from analysis.activations.extract import extract_shard
from analysis.data.images import open_images, write_image_dataset
from analysis.models.inputs import to_model_input
from analysis.models.mouse import MouseTrainConfig
from analysis.data.shapes import ShapesConfig, generate_shapes
from analysis.models.vit import HookedViT, ViTConfig

CONFIGS = {
    # The pipeline's mouse: 64x64x1, 16 px patches -> 17 tokens, d 64, 2 blocks.
    "mouse": MouseTrainConfig().vit,
    # 8 px patches -> 65 tokens, d 192, 4 blocks: the forward pass dominates.
    "large": ViTConfig(image_size=64, patch_size=8, in_chans=1, d_model=192, n_layers=4,
                       n_heads=4, d_mlp=768, n_classes=3),
    # ViT-B/16 at 224 px (197 tokens, d 768, 12 blocks): the accelerator case (--device cuda
    # --configs vitb16); random pixels, which cost the same as real ones.
    "vitb16": ViTConfig(image_size=224, patch_size=16, in_chans=3, d_model=768, n_layers=12,
                        n_heads=12, d_mlp=3072, n_classes=1000),
}
DEFAULT_CONFIGS = ["mouse", "large"]
DEVICE = torch.device("cpu")  # set once by --device


def _sync() -> None:
    """Wait for queued accelerator work, so a timer stops after it, not after its launch."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}


def make_images(directory: Path, n: int, cfg: ViTConfig) -> zarr.Array:
    if (cfg.image_size, cfg.in_chans) == (64, 1):  # the shapes generator's images
        data = generate_shapes(ShapesConfig(n_images=n))
        write_image_dataset(directory, data.images, data.labels)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (n, cfg.image_size, cfg.image_size, cfg.in_chans),
                                                   dtype=np.uint8)
        write_image_dataset(directory, pixels, {"label": np.zeros(n, dtype=np.int64)})
    return open_images(directory)


def make_capture(model: HookedViT, hooks: list[str], stop: int | None, compute_dtype: str = "float32"):
    # Same as analysis.stages.activations.extract (autocast is off at the default float32).
    autocast, amp_dtype = compute_dtype != "float32", getattr(torch, compute_dtype)

    def capture(x):
        with torch.autocast(device_type=DEVICE.type, dtype=amp_dtype, enabled=autocast):
            _, cache = model.run_with_cache(x, names_filter=hooks, stop_at_layer=stop)
        return {h: cache[h].float() for h in hooks}
    return capture


def with_autocast(fn, compute_dtype: str):
    """`fn` under the capture's autocast, so the bare forward it is compared with runs at the same precision."""
    def run(x):
        with torch.autocast(device_type=DEVICE.type, dtype=getattr(torch, compute_dtype),
                            enabled=compute_dtype != "float32"):
            return fn(x)
    return run


def forward_loop(fn, images: zarr.Array, batch_size: int) -> None:
    n = images.shape[0]
    for lo in range(0, n, batch_size):
        with torch.inference_mode():
            fn(to_model_input(images[lo:lo + batch_size], DEVICE))


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _discard_put(self, name, data, offset):
    """The real worker thread and queue, minus the Zarr writes of acts, norms and image_idx."""


def run_extract(capture, images, layout: StoreLayout, hooks: list[str], workdir: Path,
                batch_size: int, discard_writes: bool = False) -> float:
    """Seconds for extract_shard over every shard into fresh stores (store creation not timed)."""
    workdir.mkdir(parents=True)
    stores = {h: workdir / f"{h}.zarr" for h in hooks}
    for h, p in stores.items():
        create_store(p, layout, {"bench": True, "hook": h}, overwrite=True)
    put = _discard_put if discard_writes else extraction._HookShard._put
    # without written files there is nothing to read back and record
    record = (lambda *a, **k: None) if discard_writes else extraction.record_shard_files
    try:
        with _patched(extraction._HookShard, "_put", put), _patched(extraction, "record_shard_files", record):
            t0 = time.perf_counter()
            for shard in range(layout.n_shards):
                extract_shard(capture, images, stores, shard, batch_size=batch_size, device=DEVICE,
                              progress=False)
            seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir)
    return seconds


class _TimedImages:
    """Proxy for the images array that times `images[lo:hi]` (the uint8 Zarr read)."""

    def __init__(self, arr, timed):
        self.arr, self.shape = arr, arr.shape
        self._get = timed("read_images", arr.__getitem__)

    def __getitem__(self, key):
        return self._get(key)


def breakdown(capture, images, layout, hooks, workdir, batch_size) -> dict:
    """One instrumented extract pass: seconds per step and per thread, by wrapping the steps.

    Only the caller thread's time adds up to the wall time; the reader, worker and writer
    threads run beside it. A step inside another (Moments.add inside _HookShard.add, a write
    inside it when writes run on the caller) is listed on its own but counted once in the rest.
    """
    times: dict[str, float] = defaultdict(float)
    outermost: dict[str, float] = defaultdict(float)  # per thread: time in steps not nested in others
    depth = threading.local()

    def timed(name, fn):
        def wrapper(*a, **k):
            thread = threading.current_thread().name.split('_')[0]
            level = getattr(depth, "n", 0)
            depth.n = level + 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t0
                depth.n = level
                times[f"{name} [{thread}]"] += elapsed
                if level == 0:
                    outermost[thread] += elapsed
        return wrapper

    shard = extraction._HookShard
    steps = [
        (extraction, "to_model_input", "to_model_input"),
        (extraction, "_checked", "token selection + norms + checks (_checked)"),
        (shard, "add", "stats + cast into the shard buffer (_HookShard.add)"),
        (act_stats.Moments, "add", "stats (Moments.add)"),
        (shard, "_put", "zarr writes of acts, norms, image_idx"),
        (extraction, "write_partial", "zarr writes of the statistics rows (= completion markers)"),
        (extraction, "_open_todo", "open stores, read layouts and markers"),
    ]
    with contextlib.ExitStack() as stack:
        for obj, name, label in steps:
            stack.enter_context(_patched(obj, name, timed(label, getattr(obj, name))))
        total = run_extract(timed("capture (forward + hooks)", capture), _TimedImages(images, timed),
                            layout, hooks, workdir, batch_size)
    steps_s = {k: round(v, 4) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}
    on_caller = outermost["MainThread"]
    steps_s["other on the caller (loop, waiting for the reader, the final writes) [MainThread]"] = round(total - on_caller, 4)
    return {"total_seconds": round(total, 4), "steps_seconds": steps_s}


def shard_write_pattern(layout: StoreLayout, n_hooks: int, tmp: Path, repeats: int) -> dict:
    # layout.images_per_shard here is the requested one, not capped at N (see bench_config).
    """One Zarr shard of acts written the way _Writer does (chunk by chunk) vs in one call.

    Chunk-by-chunk writes into a sharded array rewrite the shard file each time (read-modify-
    write), so the bytes written grow with (chunks per shard)^2 / 2.
    """
    ips, ipc = layout.images_per_shard, layout.images_per_chunk
    rows = ips  # a full shard of the requested geometry (pipeline: 4096 images), even when N is smaller
    data = np.random.default_rng(0).standard_normal((rows, layout.n_tokens, layout.d_model)).astype(np.float16)
    runs = {"chunk_by_chunk": [], "whole_shard": []}
    for _ in range(repeats):
        for mode in runs:
            arr = zarr.create_array(store=str(tmp / "pattern.zarr"), shape=data.shape, dtype="float16",
                                    chunks=(ipc,) + data.shape[1:], shards=(ips,) + data.shape[1:],
                                    compressors=None, fill_value=0, overwrite=True)
            t0 = time.perf_counter()
            if mode == "whole_shard":
                arr[:] = data
            else:
                for lo in range(0, rows, ipc):
                    arr[lo:lo + ipc] = data[lo:lo + ipc]
            runs[mode].append(time.perf_counter() - t0)
            shutil.rmtree(tmp / "pattern.zarr")
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"shard_mb": round(data.nbytes / 1e6, 2), "chunks_per_shard": -(-rows // ipc),
            "seconds_median": {k: round(v, 4) for k, v in med.items()},
            "chunk_by_chunk_over_whole": round(med["chunk_by_chunk"] / med["whole_shard"], 2),
            "per_shard_all_hooks_seconds": {k: round(v * n_hooks, 3) for k, v in med.items()},
            "runs_seconds": {k: [round(x, 4) for x in v] for k, v in runs.items()}}


def bench_config(name: str, cfg: ViTConfig, n_images: int, args, tmp: Path) -> dict:
    images = make_images(tmp / f"images_{name}", n_images, cfg)
    torch.manual_seed(0)
    model = HookedViT(cfg).eval().to(DEVICE)
    layers = range(cfg.n_layers) if args.layers is None else [cfg.n_layers + i if i < 0 else i for i in args.layers]
    hooks = [f"blocks.{i}.hook_resid_post" for i in layers]
    stop = max(layers) + 1  # stop_layer(hooks) of the pipeline: deepest block + 1
    capture = make_capture(model, hooks, stop, args.compute_dtype)
    ips = min(args.images_per_shard, -(-n_images // args.images_per_chunk) * args.images_per_chunk)
    layout = StoreLayout(n_images=n_images, n_tokens=cfg.n_tokens, d_model=cfg.d_model,
                         images_per_shard=ips, images_per_chunk=args.images_per_chunk, dtype="float16")
    bs = args.batch_size
    inputs = [to_model_input(images[lo:lo + bs], DEVICE) for lo in range(0, n_images, bs)]

    bare_model = with_autocast(model, args.compute_dtype)

    def forward_only():
        with torch.inference_mode():
            for x in inputs:
                bare_model(x)

    passes = {
        "forward_only": lambda: _seconds(forward_only),
        "capture": lambda: _seconds(lambda: forward_loop(capture, images, bs)),
        "bare": lambda: _seconds(lambda: forward_loop(bare_model, images, bs)),
        "extract": lambda: run_extract(capture, images, layout, hooks, tmp / "w", bs),
        "extract_nowrite": lambda: run_extract(capture, images, layout, hooks, tmp / "w", bs, discard_writes=True),
        # The two ways extract_shard can place its non-forward work, forced (extract picks one):
        # worker and writer threads, or everything on the caller.
        "extract_threads": lambda: _forced(True, lambda: run_extract(capture, images, layout, hooks, tmp / "w", bs)),
        "extract_inline": lambda: _forced(False, lambda: run_extract(capture, images, layout, hooks, tmp / "w", bs)),
    }
    for fn in passes.values():  # warm-up: page cache, allocator, thread pool
        fn()
    runs = {k: [] for k in passes}
    order = list(passes)
    for r in range(args.repeats):
        # bare and extract run back to back; the order flips every repeat so a load change
        # on a shared machine does not favour one side. Headline: median of per-repeat ratios.
        for k in order if r % 2 == 0 else order[::-1]:
            runs[k].append(n_images / passes[k]())
        print(f"  [{name}] repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()) + " images/s", flush=True)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    split = pattern = None
    if not args.headline_only:
        split = breakdown(capture, images, layout, hooks, tmp / "w", bs)
        full = StoreLayout(n_images=args.images_per_shard, n_tokens=cfg.n_tokens, d_model=cfg.d_model,
                           images_per_shard=args.images_per_shard, images_per_chunk=args.images_per_chunk)
        pattern = shard_write_pattern(full, len(hooks), tmp, min(args.repeats, 3))
    per_repeat = [e / b for e, b in zip(runs["extract"], runs["bare"])]
    ratios = {k: float(np.median([x / b for x, b in zip(runs[k], runs["bare"])]))
              for k in ("capture", "extract_nowrite", "extract", "extract_threads", "extract_inline")}
    bare_ms = 1000 / med["bare"]
    return {
        "vit": asdict(cfg), "n_tokens": cfg.n_tokens, "hooks": hooks, "stop_at_layer": stop,
        "n_images": n_images, "batch_size": bs, "compute_dtype": args.compute_dtype, "layout": asdict(layout),
        "store_bytes_per_pass": n_images * cfg.n_tokens * cfg.d_model * 2 * len(hooks),
        "images_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "extraction_over_bare": round(ratios["extract"], 3),
        "extraction_over_bare_of_medians": round(med["extract"] / med["bare"], 3),
        "extraction_over_bare_per_repeat": [round(x, 3) for x in per_repeat],
        "capture_over_bare": round(ratios["capture"], 3),
        # Stricter: model(x) alone on inputs already in memory (no Zarr read, no conversion).
        "extraction_over_forward_only": round(float(np.median(
            [e / f for e, f in zip(runs["extract"], runs["forward_only"])])), 3),
        "extract_nowrite_over_bare": round(ratios["extract_nowrite"], 3),
        "device": str(DEVICE),
        "extract_mode": "threads" if extraction.spare_core(DEVICE) else "inline",
        "forced_modes_over_bare": {"threads": round(ratios["extract_threads"], 3),
                                   "inline": round(ratios["extract_inline"], 3)},
        # Extra milliseconds per image each stage adds on top of the bare forward (medians).
        "ms_per_image": {"bare": round(bare_ms, 4),
                         "+hooks/capture": round(1000 / med["capture"] - bare_ms, 4),
                         "+checks/stats/cast": round(1000 / med["extract_nowrite"] - 1000 / med["capture"], 4),
                         "+zarr writes": round(1000 / med["extract"] - 1000 / med["extract_nowrite"], 4)},
        "breakdown_one_pass": split,
        "acts_shard_write_pattern": pattern,
        "runs_images_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }


def _forced(spare: bool, fn) -> float:
    with _patched(extraction, "spare_core", lambda device: spare):
        return fn()


def _seconds(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...: where the forward pass runs")
    ap.add_argument("--layers", type=int, nargs="+",
                    help="blocks whose residual stream is stored (default: every block; -1 = the last)")
    ap.add_argument("--headline-only", action="store_true",
                    help="skip the per-step breakdown and the shard write pattern (a GPU check's short run)")
    ap.add_argument("--mouse-images", type=int, default=4096)
    ap.add_argument("--large-images", type=int, default=512)
    ap.add_argument("--vitb16-images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256, help="the pipeline's default")
    ap.add_argument("--images-per-shard", type=int, default=4096, help="the pipeline's default")
    ap.add_argument("--images-per-chunk", type=int, default=256, help="the pipeline's default")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the suite's activations.compute_dtype (autocast); the bare baseline stays float32")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0 keeps torch's default, as SPECTRA_THREADS unset)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats; medians reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "extraction.json"))
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = {"mouse": args.mouse_images, "large": args.large_images, "vitb16": args.vitb16_images}
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            print(f"{name}: {sizes[name]} images, batch {args.batch_size}", flush=True)
            results[name] = bench_config(name, CONFIGS[name], sizes[name], args, Path(tmp))
    out = {"benchmark": "extraction", "target": "extraction/bare >= 0.90",
           "repeats": args.repeats, "wall_seconds": round(time.perf_counter() - t0, 1),
           "machine": machine(), "configs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"\n{'config':<7} {'bare':>8} {'capture':>8} {'nowrite':>8} {'extract':>8}  extract/bare: median of per-repeat "
          "ratios  (images/s: medians)")
    for name, r in results.items():
        m = r["images_per_s_median"]
        print(f"{name:<7} {m['bare']:>8.0f} {m['capture']:>8.0f} {m['extract_nowrite']:>8.0f} "
              f"{m['extract']:>8.0f}  {r['extraction_over_bare']:.3f}   (ratio of medians "
              f"{r['extraction_over_bare_of_medians']:.3f}; capture/bare {r['capture_over_bare']:.3f}, "
              f"nowrite/bare {r['extract_nowrite_over_bare']:.3f}; extract/forward_only "
              f"{r['extraction_over_forward_only']:.3f} at {m['forward_only']:.0f} images/s)")
        f = r["forced_modes_over_bare"]
        print(f"{'':<7} extract runs {r['extract_mode']}; forced: threads {f['threads']:.3f}, inline {f['inline']:.3f}")
    for name, r in results.items():
        if (b := r["breakdown_one_pass"]) is None:
            continue
        print(f"\n{name}: one instrumented extract pass, {b['total_seconds']} s")
        for k, v in sorted(b["steps_seconds"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:7.4f} s  {k}")
    for name, r in results.items():
        if (w := r["acts_shard_write_pattern"]) is None:
            continue
        print(f"{name}: one {w['shard_mb']} MB acts shard ({w['chunks_per_shard']} chunks): chunk-by-chunk "
              f"{w['seconds_median']['chunk_by_chunk']} s vs whole-shard {w['seconds_median']['whole_shard']} s "
              f"({w['chunk_by_chunk_over_whole']}x)")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
