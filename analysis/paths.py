"""Where every artifact lives under one data root (DESIGN.md §2). Pure path arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataRoot:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def images(self, dataset_id: str) -> Path:
        return self.root / "images" / dataset_id

    def model(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def store(self, store_id: str) -> Path:
        return self.root / "activations" / store_id

    def hook_store(self, store_id: str, hook: str) -> Path:
        return self.store(store_id) / f"{hook}.zarr"

    def dictionary(self, dict_id: str) -> Path:
        return self.root / "dictionaries" / dict_id

    def table(self, name: str) -> Path:
        return self.root / "tables" / name

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
