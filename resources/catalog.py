"""The DuckDB catalog: views over the Parquet tables under the data root."""

from __future__ import annotations

import dagster as dg

from analysis.catalog import connect_catalog, refresh_catalog


class CatalogResource(dg.ConfigurableResource):
    """One short-lived writer (the catalog asset); everyone else attaches read-only."""

    path: str = ""
    """DuckDB file; empty means `<data root>/catalog.duckdb`."""

    def refresh(self, data_root) -> list[str]:
        return refresh_catalog(self.path or data_root.catalog, data_root.root / "tables")

    def connect(self, data_root, read_only: bool = True):
        return connect_catalog(self.path or data_root.catalog, read_only=read_only)
