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

Modules: `store` (layout, creation, lineage, completion), `extract` (`extract_shard`, writing
whole shard files through `shard_file`), `stats` (streamed moments), `tokens` (which token
positions a store keeps), `reader` (`ActivationStore`: ordered reads, held-out tokens), `loader`
(`ShuffledLoader`) and `multi_loader` (N aligned stores, for transcoders and crosscoders).
"""
