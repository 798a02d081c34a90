"""What makes trained weights machine-dependent, recorded in lineage and compared on reuse.

Float reductions depend on the device, the torch thread count and the torch version: the same
ids and seed on another machine train slightly different weights (DESIGN.md §3 measured a
transcoder's loss recovered move from 0.125 to 0.503 with the thread count). A reused artifact
trained under other settings is kept, but the run says so instead of silently mixing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("spectra.machine")


def machine(device) -> dict:
    return {"device": str(device), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def machine_differences(recorded: dict | None, device) -> str | None:
    """'torch_threads 1 (now 2), …' for each recorded setting that differs from this process's;
    None when they agree or nothing was recorded."""
    if not recorded:
        return None
    now = machine(device)
    diffs = [f"{key} {recorded[key]} (now {now[key]})" for key in now if key in recorded and recorded[key] != now[key]]
    return ", ".join(diffs) or None


def note_reuse(what: str, recorded: dict | None, device) -> dict:
    """Log a reuse across machine settings; returns {"machine_differs": …} for the summary, or {}."""
    diff = machine_differences(recorded, device)
    if diff is None:
        return {}
    log.warning("reusing %s, trained with %s: kept as it is (a retrain here would give slightly different "
                "weights; delete it to retrain under these settings)", what, diff)
    return {"machine_differs": diff}
