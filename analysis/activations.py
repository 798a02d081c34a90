"""Activation store: chunked, resumable Zarr extraction of hooked activations.

One store per hook at <root>/activations/<store_id>/<hook>.zarr (DESIGN.md §2) — a local
directory or any fsspec URL (memory://, s3://, …) — holding one Zarr group:

    acts       (N, T, d)  float16 | float32 | uint16 (bfloat16 bits, attr logical_dtype)
    norms      (N, T)     float32 token L2 norms, taken in fp32 before the cast
    image_idx  (N,)       int64
    partials   (n_shards, 2 + 2d) float64, one row and chunk per shard: [count, norm_sum,
               mean (d), M2 (d)], written after the shard's data; a nonzero count marks it complete
    mean, var  (d,)       float64, written by `finalize_stats` (population variance)
    attrs      layout, lineage, format, logical_dtype, token_groups (where the class token,
               registers and patches sit along T; analysis.tokens) (+ mean_norm,
               n_tokens_total when final)

Arrays are chunked along N only (`images_per_chunk` images) and Zarr-sharded with
`images_per_write` images per shard file (about a quarter of an extraction shard): one
extraction shard (a Dagster partition) writes whole shard files, each as soon as its images are
in, and never shares one with another partition.

The code lives in three modules, re-exported here:
`analysis.activation_store` (layout, creation, lineage, completion),
`analysis.activation_extract` (`extract_shard`) and `analysis.activation_stats` (statistics).
"""

from analysis.activation_extract import FLOAT16_MAX, Capture, ShardReport, ShardWriteError, extract_shard
from analysis.activation_stats import StoreStats, chan_merge, finalize_stats, merge_partials
from analysis.activation_store import (
    FORMAT,
    StoreLayout,
    StoreLocation,
    create_store,
    is_complete,
    missing_shards,
    read_layout,
)

__all__ = [
    "FLOAT16_MAX", "FORMAT", "Capture", "ShardReport", "ShardWriteError", "StoreLayout", "StoreLocation",
    "StoreStats", "chan_merge", "create_store", "extract_shard", "finalize_stats", "is_complete",
    "merge_partials", "missing_shards", "read_layout",
]
