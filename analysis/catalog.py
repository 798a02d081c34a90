"""Metric tables as immutable Parquet partitions, and DuckDB views over them.

Each table lives at `<root>/tables/<table>/<col>=<value>/part.parquet` (hive layout), one file set
per partition, written atomically (tmp file + rename) so a reader never sees half a file and a
rerun of one partition replaces exactly that partition. The catalog is a DuckDB file of views with
absolute paths; notebooks attach it read-only (`connect_catalog`).
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq


def table_number(value) -> float | None:
    """A metric for a table: NaN (nothing to measure: no labels, no ablation gap) becomes SQL NULL,
    which aggregates skip, instead of a NaN that poisons them."""
    value = float(value)
    return None if math.isnan(value) else value


def write_table_partition(table_dir: str | Path, partition: dict[str, str], table: pa.Table) -> Path:
    """Replace one partition of a table. `partition` maps column → value (also stored as columns)."""
    directory = Path(table_dir)
    for col, value in partition.items():
        if "/" in str(value) or "=" in str(value):
            raise ValueError(f"partition value {value!r} for {col!r} may not contain '/' or '='")
        directory = directory / f"{col}={value}"
        if col in table.column_names:
            table = table.drop_columns([col])  # hive partitioning supplies it on read
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "part.parquet.tmp"
    pq.write_table(table, tmp)
    final = directory / "part.parquet"
    tmp.replace(final)
    return final


def read_table(table_dir: str | Path) -> pa.Table:
    """All partitions of a table as one Arrow table (partition columns included)."""
    con = duckdb.connect()
    try:
        return con.sql(f"SELECT * FROM {_scan(Path(table_dir))}").to_arrow_table()
    finally:
        con.close()


def _scan(table_dir: Path) -> str:
    depth = _partition_depth(table_dir)
    pattern = str(table_dir.resolve() / ("*/" * depth) / "*.parquet").replace("//", "/")
    return f"read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)"


def _partition_depth(table_dir: Path) -> int:
    depth, here = 0, table_dir
    while True:
        subdirs = [p for p in here.iterdir() if p.is_dir() and "=" in p.name]
        if not subdirs:
            return depth
        depth, here = depth + 1, subdirs[0]


def refresh_catalog(catalog_path: str | Path, tables_root: str | Path) -> list[str]:
    """(Re)create one view per table directory that holds Parquet; returns the view names."""
    tables_root = Path(tables_root).resolve()
    names = []
    con = duckdb.connect(str(catalog_path))
    try:
        for table_dir in sorted(p for p in tables_root.iterdir() if p.is_dir()) if tables_root.exists() else []:
            if not any(table_dir.rglob("*.parquet")):
                continue
            con.execute(f'CREATE OR REPLACE VIEW "{table_dir.name}" AS SELECT * FROM {_scan(table_dir)}')
            names.append(table_dir.name)
    finally:
        con.close()
    return names


def connect_catalog(catalog_path: str | Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the catalog; read-only by default so notebooks never block the pipeline's writer."""
    path = Path(catalog_path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: materialize the `catalog` asset first (make run)")
    return duckdb.connect(str(path), read_only=read_only)
