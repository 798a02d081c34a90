"""Where tensors run: device, threads, and the dask cluster of the store-wide passes."""

from __future__ import annotations

from typing import Literal

import dagster as dg
import torch


class ComputeResource(dg.ConfigurableResource):
    """Device `auto` picks cuda, then mps, then cpu. threads=0 keeps torch's default.

    Precision is not here: it changes stored values, so it lives in the suite
    (`activations.compute_dtype`) and in the content ids.
    """

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = 0
    dask_scheduler: str | None = None
    """Address of a dask scheduler (tcp://host:8786) for the store-wide passes that need no model
    (an SAE's dead-latent window in `evaluations`, its mining in `features`); None: they run in the
    step's own process."""

    def resolved_device(self) -> str:
        if self.device != "auto":
            if self.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("compute.device='cuda' but no CUDA device is visible: use device='auto' or 'cpu'")
            return self.device
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def apply(self) -> str:
        """Set thread count and return the device; call at the start of each compute asset."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return self.resolved_device()
