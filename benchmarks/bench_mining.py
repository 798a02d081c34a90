"""Feature mining against a bare encode, and a query over a million-row `feature_stats` table.

1. `mine_features` (top images, heatmaps, every per-feature statistic: label counts, class-token
   and patch firing, token norm ratios) over stored-like batches, against one bare pass of
   `sae.encode` over the same tokens in the same chunks (what mining cannot avoid
   computing: for a TopK SAE its `encode`, the k values and ids per token, which mining reads
   directly; threshold architectures are mined from `dense_latents`). Interleaved repeats, median
   of per-repeat ratios. Target: <= 1.3.
2. A filtered, sorted DuckDB query through the catalog's `feature_stats` view over 64 partitions
   of 16,384 features (1,048,576 rows, written by `write_table_partition` as the pipeline does):
   median wall time of repeats after one warm-up. Target: <= 100 ms.

Writes benchmarks/results/mining.json.

    .venv/bin/python benchmarks/bench_mining.py [--images 512] [--width 16384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from _results import machine, median_ratio, write
from analysis.catalog import connect_catalog, refresh_catalog, write_table_partition
from analysis.dictionaries import SAEConfig, TopKSAE
from analysis.evaluation.mining import mine_features

QUERY = """
SELECT dict_id, feature, frequency, max_activation, top_label, top_label_share
FROM feature_stats
WHERE fire_count > 0 AND frequency BETWEEN 1e-4 AND 1e-2 AND top_label_share >= 0.5
ORDER BY max_activation DESC
LIMIT 100
"""


def batches(n_images: int, T: int, d: int, per_batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_images, T, d, generator=g)
    return [(np.arange(lo, min(lo + per_batch, n_images)), acts[lo:lo + per_batch])
            for lo in range(0, n_images, per_batch)]


def time_bare_encode(sae, data, max_latent_elements: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, acts in data:
            T, width = acts.shape[1], sae.cfg.width
            chunk = max(1, max_latent_elements // (T * width))
            for s in range(0, acts.shape[0], chunk):
                a = acts[s:s + chunk]
                sae.encode(a.reshape(-1, a.shape[-1]))  # the TopK code mining reads (no dense scatter)
    return time.perf_counter() - t0


def time_mining(sae, data, labels, max_latent_elements: int) -> float:
    t0 = time.perf_counter()
    mine_features(sae, data, n_top=16, labels=labels, cls=(0, 1), patches=(1, data[0][1].shape[1]),
                  max_latent_elements=max_latent_elements)
    return time.perf_counter() - t0


def feature_stats_query(root: Path, n_dicts: int, width: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    for i in range(n_dicts):
        fire = rng.integers(0, 10_000, width)
        table = pa.table({
            "feature": np.arange(width, dtype=np.int32), "fire_count": fire, "frequency": fire / 1e6,
            "mean_activation": rng.random(width), "max_activation": rng.random(width).astype(np.float32),
            "cls_frequency": rng.random(width), "patch_frequency": rng.random(width),
            "top_label": rng.integers(0, 1000, width), "top_label_share": rng.random(width),
            "label_entropy": rng.random(width) * 10, "top_norm_ratio": rng.random(width).astype(np.float32) * 3,
            "high_norm": rng.random(width) > 0.9,
        })
        write_table_partition(root / "tables" / "feature_stats", {"dict_id": f"sae-{i:012d}"}, table)
    catalog = root / "catalog.duckdb"
    refresh_catalog(catalog, root / "tables")
    con = connect_catalog(catalog)
    try:
        [(n_rows,)] = con.sql("SELECT count(*) FROM feature_stats").fetchall()
        con.sql(QUERY).fetchall()  # warm-up: file metadata, page cache
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows = con.sql(QUERY).fetchall()
            seconds.append(time.perf_counter() - t0)
    finally:
        con.close()
    return {"rows": int(n_rows), "partitions": n_dicts, "result_rows": len(rows), "query": QUERY.strip(),
            "seconds": seconds, "median_ms": 1000 * statistics.median(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=65, help="tokens per image (a class token and 64 patches)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--images-per-batch", type=int, default=64)
    ap.add_argument("--max-latent-elements", type=int, default=1 << 24, help="mine_features' default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mining.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=args.d, width=args.width, k=args.k)).eval()
    data = batches(args.images, args.tokens, args.d, args.images_per_batch)
    labels = np.random.default_rng(1).integers(0, args.labels, args.images)
    runs = {"bare_encode": [], "mining": []}
    time_mining(sae, data[:1], labels, args.max_latent_elements)  # warm-up
    for r in range(args.repeats):  # interleaved, the order flipped every repeat
        order = ["bare_encode", "mining"] if r % 2 == 0 else ["mining", "bare_encode"]
        for name in order:
            fn = time_bare_encode if name == "bare_encode" else \
                lambda s, d, m: time_mining(s, d, labels, m)
            runs[name].append(fn(sae, data, args.max_latent_elements))
        print(f"repeat {r + 1}/{args.repeats}: bare encode {runs['bare_encode'][-1]:.3f} s, "
              f"mining {runs['mining'][-1]:.3f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        query = feature_stats_query(Path(tmp), 64, 16384, args.repeats * 2)
    write(args.out, {
        "machine": machine(), "args": vars(args), "seconds": runs,
        "median_seconds": {k: statistics.median(v) for k, v in runs.items()},
        "ratio_mining_over_bare_encode": median_ratio(runs["mining"], runs["bare_encode"]),
        "target_ratio": "<= 1.3",
        "feature_stats_query": query, "target_query_ms": "<= 100",
    }, runs_key="seconds")


if __name__ == "__main__":
    main()
