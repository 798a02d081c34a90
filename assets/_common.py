"""Small helpers shared by the asset modules: metadata and data versions."""


import base64
from pathlib import Path

import dagster as dg

from analysis.ids import content_id

DEVICE_POOL = "gpu"
"""Dagster concurrency pool of every asset that runs a model or trains on the compute device
(model, activations, dictionaries, evaluations, features, toolkit). Its limit (1 unless set with
`dagster instance concurrency set gpu N`) makes those steps take the device one at a time across
all runs, while the CPU-only steps (ingest, layout, statistics, catalog, report, browser) run beside
them."""


def metadata(summary: dict) -> dict:
    """Turn a stage summary into UI metadata: paths as paths, numbers as numbers."""
    out = {}
    for key, value in summary.items():
        if key in ("path", "plot") or key.endswith("_path"):
            out[key] = dg.MetadataValue.path(str(value))
        elif key == "table":
            out[key] = dg.MetadataValue.md(f"```\n{value}\n```")
        elif isinstance(value, (int, float, str, bool)):
            out[key] = value
        else:
            out[key] = dg.MetadataValue.json(value)
    return out


def image_markdown(path: str | Path) -> dg.MetadataValue:
    """Inline a small PNG so the UI shows it without serving files."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{data})")


def data_version(*parts) -> dg.DataVersion:
    """Content-derived: same upstream ids and config, same version, so nothing looks stale."""
    return dg.DataVersion(content_id("v", [str(p) for p in parts]))


def per_step(row: dict) -> dict:
    """A per-step training row as tracker history: its values under `train/`, beside the log rows'
    window means (same step, other names: neither overwrites the other)."""
    return {key if key in ("step", "tokens", "epoch") else f"train/{key}": value for key, value in row.items()}
