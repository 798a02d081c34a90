"""Peak RSS of activation extraction at 4N images vs at N (target: ratio <= 1.15).

Extraction memory should depend on the shard and batch size, not on the dataset size. The parent
writes two shapes datasets (N and 4N images) with `write_image_dataset`; each measurement then
runs in a fresh subprocess (so peaks never mix) that builds the HookedViT, creates one store per
block's `hook_resid_post` (images_per_shard = N, so N is one shard and 4N four), resets the RSS
high-water mark (the torch import transient is higher than the extraction's peak), runs
`extract_shard` over every shard with the pipeline's capture, then reads
`resource.getrusage(RUSAGE_SELF).ru_maxrss`. Sizes are interleaved (N, 4N, N, 4N, ...).
Reported: the ratio of peaks, and the ratio of the growth during extraction (peak minus the RSS
just before the first shard, which is mostly torch/zarr imports and the model).
Writes benchmarks/results/extraction_memory.json.

    python benchmarks/bench_extraction_memory.py [--images 4096] [--repeats 3] [--vit mouse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `analysis` when run as a script


def _vmrss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    # Linux reports kilobytes (macOS bytes).
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _vit(name: str):
    from analysis.models.mouse import MouseTrainConfig
    from analysis.models.vit import ViTConfig
    return {"mouse": MouseTrainConfig().vit,
            "large": ViTConfig(image_size=64, patch_size=8, in_chans=1, d_model=192, n_layers=4,
                               n_heads=4, d_mlp=768, n_classes=3)}[name]


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), which also resets ru_maxrss.

    Importing torch peaks higher (~700 MB) than a small extraction ever does; without the reset
    ru_maxrss at the end would report that import transient for both sizes.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    from analysis.activations.store import StoreLayout, create_store
    from analysis.activations.extract import extract_shard
    from analysis.data.images import open_images
    from analysis.models.vit import HookedViT

    cfg = _vit(args.vit)
    torch.manual_seed(0)
    model = HookedViT(cfg).eval()
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)]
    stop = cfg.n_layers

    def capture(x):  # as analysis.stages.activations.extract at compute_dtype float32
        _, cache = model.run_with_cache(x, names_filter=hooks, stop_at_layer=stop)
        return {h: cache[h].float() for h in hooks}

    images = open_images(args.images_dir)
    n = images.shape[0]
    layout = StoreLayout(n_images=n, n_tokens=cfg.n_tokens, d_model=cfg.d_model,
                         images_per_shard=args.images_per_shard,
                         images_per_chunk=args.images_per_chunk, dtype="float16")
    stores = {h: Path(args.store_dir) / f"{h}.zarr" for h in hooks}
    for h, p in stores.items():
        create_store(p, layout, {"bench": True, "hook": h}, overwrite=True)
    import_peak = _maxrss_mb()
    reset = _reset_peak()
    before = {"vmrss_mb": _vmrss_mb(), "maxrss_mb": _maxrss_mb()}
    per_shard = []
    t0 = time.perf_counter()
    for shard in range(layout.n_shards):
        extract_shard(capture, images, stores, shard, batch_size=args.batch_size, progress=False)
        per_shard.append({"vmrss_mb": round(_vmrss_mb(), 1), "maxrss_mb": round(_maxrss_mb(), 1)})
    seconds = time.perf_counter() - t0
    peak = _maxrss_mb()
    import zarr
    versions = {"torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__}
    print(json.dumps({"versions": versions, "peak_vmhwm_mb": round(_vmhwm_mb(), 1),"n_images": n, "n_shards": layout.n_shards, "seconds": round(seconds, 3),
                      "peak_maxrss_mb": round(peak, 1),
                      "before_extract_vmrss_mb": round(before["vmrss_mb"], 1),
                      "before_extract_maxrss_mb": round(before["maxrss_mb"], 1),
                      "growth_mb": round(peak - before["vmrss_mb"], 1),
                      "peak_was_reset_before_extract": reset,
                      "maxrss_before_reset_mb (imports, model, store creation)": round(import_peak, 1),
                      "after_each_shard": per_shard}))


def make_images(args) -> None:
    """Write one shapes dataset (in a subprocess, so the parent stays small: see main)."""
    from analysis.data.images import write_image_dataset
    from analysis.data.shapes import ShapesConfig, generate_shapes

    data = generate_shapes(ShapesConfig(n_images=args.n))
    write_image_dataset(args.images_dir, data.images, data.labels)


def measure(args, images_dir: Path, store_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--images-dir", str(images_dir),
           "--store-dir", str(store_dir), "--vit", args.vit, "--batch-size", str(args.batch_size),
           "--images-per-shard", str(args.images_per_shard),
           "--images-per-chunk", str(args.images_per_chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    if done.returncode:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4096, help="N; the large run uses 4N")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--vit", choices=["mouse", "large"], default="mouse")
    ap.add_argument("--batch-size", type=int, default=256, help="the pipeline's default")
    ap.add_argument("--images-per-shard", type=int, default=None, help="default: N (one shard at N)")
    ap.add_argument("--images-per-chunk", type=int, default=256, help="the pipeline's default")
    ap.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per size; medians reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "extraction_memory.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--store-dir", help=argparse.SUPPRESS)
    ap.add_argument("--make-images", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.images_per_shard is None:
        args.images_per_shard = args.images
    if args.child:
        return child(args)
    if args.make_images:
        return make_images(args)
    # The parent never imports torch or holds images: on Linux a child's ru_maxrss starts at
    # the high-water mark of the process that spawned it (exec inherits it), so a big parent
    # would put a floor under every child's peak.
    t0 = time.perf_counter()
    sizes = {"N": args.images, f"{args.factor}N": args.factor * args.images}
    runs: dict[str, list[dict]] = {k: [] for k in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for key, n in sizes.items():
            subprocess.run([sys.executable, __file__, "--make-images", "--n", str(n),
                            "--images-dir", str(tmp / f"images_{key}")], check=True)
        for r in range(args.repeats):
            for key in sizes:
                runs[key].append(measure(args, tmp / f"images_{key}", tmp / f"stores_{key}_{r}"))
                m = runs[key][-1]
                print(f"  repeat {r + 1}/{args.repeats} {key:>3} ({m['n_images']} images, {m['n_shards']} shards): "
                      f"peak {m['peak_maxrss_mb']:.1f} MB, before extraction {m['before_extract_vmrss_mb']:.1f} MB, "
                      f"growth {m['growth_mb']:.1f} MB, {m['seconds']:.2f} s", flush=True)
    parent_peak = _maxrss_mb()  # before _vit below imports torch
    big = f"{args.factor}N"
    med = {k: {f: float(np.median([m[f] for m in v])) for f in ("peak_maxrss_mb", "peak_vmhwm_mb", "growth_mb", "seconds")}
           for k, v in runs.items()}
    ratio = med[big]["peak_maxrss_mb"] / med["N"]["peak_maxrss_mb"]
    hwm_ratio = med[big]["peak_vmhwm_mb"] / med["N"]["peak_vmhwm_mb"]
    growth_ratio = med[big]["growth_mb"] / max(med["N"]["growth_mb"], 1e-9)
    cfg = _vit(args.vit)
    result = {
        "benchmark": "extraction_memory", "target": f"peak RSS at {big} / at N <= 1.15",
        "config": {"vit_name": args.vit, "vit": asdict(cfg), "n_tokens": cfg.n_tokens,
                   "hooks": [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)],
                   "sizes": sizes, "batch_size": args.batch_size, "images_per_shard": args.images_per_shard,
                   "images_per_chunk": args.images_per_chunk, "dtype": "float16", "tokens": "all"},
        "repeats": args.repeats,
        "medians": {k: {f: round(x, 2) for f, x in v.items()} for k, v in med.items()},
        "peak_ratio": round(ratio, 3),
        "peak_ratio_vmhwm": round(hwm_ratio, 3),
        "growth_ratio": round(growth_ratio, 3),
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    **runs["N"][0]["versions"]},
        "parent_maxrss_mb_while_measuring": round(parent_peak, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.vit}: peak RSS (median of {args.repeats} fresh processes)")
    for k, v in med.items():
        print(f"  {k:>3} = {sizes[k]:>6} images: peak {v['peak_maxrss_mb']:.1f} MB, growth during extraction "
              f"{v['growth_mb']:.1f} MB, {v['seconds']:.2f} s")
    print(f"  peak ratio {big}/N = {ratio:.3f} (target <= 1.15); growth ratio = {growth_ratio:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
