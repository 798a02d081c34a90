"""What every benchmark's result file holds: the machine and versions, medians, same-run ratios."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine(**extra) -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **extra}


def median_ratio(numerators, denominators) -> float:
    """Median of the per-repeat ratios of neighbouring runs: robust to drift between repeats."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def write(out: str | Path, result: dict, *, runs_key: str) -> None:
    """Write `result` (plus the time) to `out` and print it without the machine and the raw runs."""
    result = {**result, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", runs_key)}, indent=2))
