"""Experiment tracking: wandb (offline by default) behind a small interface."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Literal

import dagster as dg


class TrackedRun:
    """One tracked run: `run(row)` logs a history row (at its "step" when it has one);
    `run.update_config(values)` adds to the run's config (lineage known only after the work)."""

    def __init__(self, wandb_run=None):
        self._run = wandb_run

    def __call__(self, row: dict) -> None:
        if self._run is not None:
            step = row.get("step")
            self._run.log(row, step=None if step is None else int(step))

    def update_config(self, values: dict) -> None:
        if self._run is not None:
            self._run.config.update(values, allow_val_change=True)


class TrackerResource(dg.ConfigurableResource):
    """`mode`: offline (default, no network), online, or disabled (no wandb at all)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "spectra"
    directory: str = ""
    """Where wandb writes its run folders; empty means `<data root>/wandb`."""

    @contextmanager
    def run(self, name: str, config: dict, data_root, job_type: str | None = None) -> Iterator[TrackedRun]:
        """Yield a TrackedRun; the wandb run is finished even when the body raises."""
        if self.mode == "disabled":
            yield TrackedRun()
            return
        import wandb

        directory = self.directory or str(data_root.root / "wandb")
        os.makedirs(directory, exist_ok=True)
        run = wandb.init(
            project=self.project, name=name, config=config, dir=directory, mode=self.mode, job_type=job_type,
            reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            yield TrackedRun(run)
        finally:
            run.finish()
