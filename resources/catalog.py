"""The DuckDB catalog: views over the Parquet tables under the data root (`<root>/catalog.duckdb`)."""

from __future__ import annotations

import dagster as dg

from analysis.catalog import connect_catalog, refresh_catalog
from analysis.paths import DataRoot


class CatalogResource(dg.ConfigurableResource):
    """One short-lived writer (the catalog asset); everyone else attaches read-only.

    The file's place is fixed by the storage layout (DESIGN.md §2), so notebooks find it from the
    data root alone.
    """

    def refresh(self, root: DataRoot) -> list[str]:
        return refresh_catalog(root.catalog, root.root / "tables")

    def connect(self, root: DataRoot, read_only: bool = True):
        return connect_catalog(root.catalog, read_only=read_only)
