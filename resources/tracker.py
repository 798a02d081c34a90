"""Experiment tracking: wandb (offline by default) behind a two-method interface."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import dagster as dg


class TrackerResource(dg.ConfigurableResource):
    """`mode`: offline (default, no network), online, or disabled (no wandb at all)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "spectra"
    directory: str = ""
    """Where wandb writes its run folders; empty means `<data root>/wandb`."""

    @contextmanager
    def run(self, name: str, config: dict, data_root) -> Iterator[Callable[[dict], None]]:
        """Yield a `log(row)` function; the wandb run is finished even when the body raises."""
        if self.mode == "disabled":
            yield lambda row: None
            return
        import wandb

        directory = self.directory or str(data_root.root / "wandb")
        os.makedirs(directory, exist_ok=True)
        run = wandb.init(
            project=self.project, name=name, config=config, dir=directory, mode=self.mode,
            reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            yield lambda row: run.log(row)
        finally:
            run.finish()
