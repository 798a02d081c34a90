"""Metric tables as immutable Parquet partitions, and DuckDB views over them.

Each table lives at `<root>/tables/<table>/<col>=<value>/part.parquet` (hive layout), one file set
per partition, written atomically (tmp file + rename) so a reader never sees half a file and a
rerun of one partition replaces exactly that partition. The catalog `<root>/catalog.duckdb` holds
one view per table; notebooks attach it read-only (`connect_catalog`).

A copied or moved root must read its own tables. A view stores SQL text, and DuckDB resolves a
relative path against the process's working directory, not the database file's folder, so the
views locate their Parquet through the session variable `spectra_root` (the catalog's folder),
which `connect_catalog` sets from where the file actually is. A plain `duckdb.connect` (the CLI,
the README one-liner) leaves the variable unset: the views then fall back to the folder they were
built in, which is right where the file was built and wrong for a copy, so they check that the
file is still there and otherwise fail, naming both places (or, the original deleted, fail to find
its files).

Every value reaches SQL as a parameter or a quoted literal; every name as a quoted identifier.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.integrity import atomic_write, file_lock

ROOT_VARIABLE = "spectra_root"
PARQUET_SCAN_OPTIONS = (
    # partition values are ids written as text: autocasting would turn a value "0123" into 123
    "hive_partitioning = true, hive_types_autocast = false, union_by_name = true"
)
# DuckDB globs treat these as wildcards even inside a folder name; a one-character class matches
# the character itself ('*' would otherwise also read a sibling root's tables). '\' cannot be
# escaped: DuckDB's glob reads it as a path separator, so paths holding it are refused.
GLOB_ESCAPE_SQL = "replace(replace(replace({}, '[', '[[]'), '*', '[*]'), '?', '[?]')"


def table_number(value) -> float | None:
    """A metric for a table: NaN (nothing to measure: no labels, no ablation gap) becomes SQL NULL,
    which aggregates skip, instead of a NaN that poisons them."""
    value = float(value)
    return None if math.isnan(value) else value


def typed_table(rows: list[dict], null_types: dict[str, pa.DataType]) -> pa.Table:
    """`rows` as a table whose all-None columns carry a type (`null_types`, else float64): a
    Parquet column of type null reads back as SQL type "NULL", which no query can use as a number."""
    table = pa.Table.from_pylist(rows)
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, field.name, pa.nulls(len(table), null_types.get(field.name, pa.float64())))
    return table


def sql_literal(text: str) -> str:
    """A SQL string literal for statements that take no parameters (CREATE VIEW, CREATE MACRO)."""
    return "'" + str(text).replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    return '"' + str(name).replace('"', '""') + '"'


def write_table_partition(table_dir: str | Path, partition: dict[str, str], table: pa.Table,
                          file_name: str = "part.parquet") -> Path:
    """Replace one partition of a table. `partition` maps column → value (also stored as columns).
    Several writers may share a partition, each replacing only its own `file_name` in it."""
    directory = Path(table_dir)
    for col, value in partition.items():
        _check_partition_value(col, str(value))
        directory = directory / f"{col}={value}"
        if col in table.column_names:
            table = table.drop_columns([col])  # hive partitioning supplies it on read
    return atomic_write(directory / file_name, lambda tmp: pq.write_table(table, tmp))


def _check_partition_value(col: str, value: str) -> None:
    # '/' and '=' break the hive layout; DuckDB URL-decodes '%XX' in partition values and reads
    # '\' as a path separator (the partition's rows vanish): each would be read back wrong.
    bad = [c for c in "/=%\\" if c in value]
    if bad:
        raise ValueError(f"partition value {value!r} for {col!r} may not contain {' or '.join(map(repr, bad))}: "
                         "hive partition folders cannot hold it faithfully; use an id without it")


def check_sql_path(path: str | Path, what: str = "data root") -> Path:
    """The absolute path, or a ValueError for a path DuckDB cannot address faithfully."""
    path = Path(path).expanduser().resolve()
    # DuckDB's globbing reads a backslash as a path separator (it would read another folder's
    # tables), and a database file's path cuts at '?' (its write-ahead log goes to a missing folder)
    bad = [c for c in "\\?" if c in str(path)]
    if bad:
        raise ValueError(f"{what} {str(path)!r} contains {' and '.join(map(repr, bad))}, which DuckDB cannot use "
                         "in a file path: choose a path without it")
    return path


def read_table(table_dir: str | Path) -> pa.Table:
    """All partitions of a table as one Arrow table (partition columns included)."""
    table_dir = check_sql_path(table_dir, "table folder")
    pattern = _partition_pattern(table_dir)
    con = duckdb.connect()
    try:
        glob = GLOB_ESCAPE_SQL.format("$dir") + " || $pattern"
        return con.sql(f"SELECT * FROM read_parquet({glob}, {PARQUET_SCAN_OPTIONS})",
                       params={"dir": str(table_dir), "pattern": pattern}).to_arrow_table()
    finally:
        con.close()


def _partition_pattern(table_dir: Path) -> str:
    """'/*/*.parquet' with one '*/' per partition level, below the table's folder."""
    depth, here = 0, table_dir
    while True:
        subdirs = [p for p in here.iterdir() if p.is_dir() and "=" in p.name]
        if not subdirs:
            return "/" + "*/" * depth + "*.parquet"
        depth, here = depth + 1, subdirs[0]


def refresh_catalog(catalog_path: str | Path, tables_root: str | Path) -> list[str]:
    """(Re)create one view per table directory that holds Parquet, drop views whose table is gone;
    returns the view names."""
    catalog_path = check_sql_path(catalog_path, "catalog")
    tables_root = check_sql_path(tables_root, "tables folder")
    if not tables_root.is_relative_to(catalog_path.parent):
        raise ValueError(f"tables folder {tables_root} is not inside the catalog's folder {catalog_path.parent}: "
                         "keep both under one data root, so a copy of the root carries its tables with it")
    tables = [p for p in sorted(tables_root.iterdir()) if p.is_dir() and any(p.rglob("*.parquet"))] \
        if tables_root.exists() else []
    # one writer at a time: DuckDB refuses a second process's write connection outright
    with file_lock(catalog_path.parent / ".locks" / "catalog.lock"):
        con = duckdb.connect(str(catalog_path))
        try:
            _set_root(con, catalog_path.parent)
            _create_macros(con, catalog_path)
            for table_dir in tables:
                _create_view(con, table_dir, catalog_path.parent)
            _drop_views_except(con, {p.name for p in tables})
        finally:
            con.close()
    return [p.name for p in tables]


def _set_root(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    con.execute(f"SET VARIABLE {ROOT_VARIABLE} = ?", [str(root)])


def _create_macros(con: duckdb.DuckDBPyConnection, catalog_path: Path) -> None:
    """The two macros every view calls, stored in the catalog itself."""
    built = catalog_path.parent
    # spectra_glob(rel, pattern): the glob of `<root>/<rel><pattern>`, root = the session's variable
    # or, unset, the folder the catalog was built in
    folder = f"coalesce(getvariable('{ROOT_VARIABLE}'), {sql_literal(built)}) || '/' || rel"
    con.execute(f"CREATE OR REPLACE MACRO spectra_glob(rel, pattern) AS {GLOB_ESCAPE_SQL.format(folder)} || pattern")
    # spectra_guard(): true, unless the variable is unset and the catalog file is no longer where it
    # was built (a plain connection to a copy: the fallback would read the original's tables)
    opened = "(SELECT string_agg(path, ', ') FROM duckdb_databases() WHERE path IS NOT NULL)"
    moved = (f"{sql_literal('the catalog opened from ')} || {opened} || "
             + sql_literal(f" was built at {catalog_path}: with the variable {ROOT_VARIABLE} unset its views would "
                           f"read {built}/tables, another copy's tables. Open it with "
                           "analysis.catalog.connect_catalog(<its path>), which reads the tables beside it, or run "
                           f"SET VARIABLE {ROOT_VARIABLE} = '<its folder>' first"))
    built_here = f"EXISTS (SELECT 1 FROM duckdb_databases() WHERE path = {sql_literal(catalog_path)})"
    con.execute(f"CREATE OR REPLACE MACRO spectra_guard() AS CASE WHEN getvariable('{ROOT_VARIABLE}') IS NOT NULL "
                f"OR {built_here} THEN true ELSE error({moved}) END")


def _create_view(con: duckdb.DuckDBPyConnection, table_dir: Path, root: Path) -> None:
    relative = table_dir.relative_to(root).as_posix()
    scan = f"read_parquet(spectra_glob({sql_literal(relative)}, {sql_literal(_partition_pattern(table_dir))}), " \
           f"{PARQUET_SCAN_OPTIONS})"
    con.execute(f"CREATE OR REPLACE VIEW {sql_identifier(table_dir.name)} AS SELECT * FROM {scan} WHERE spectra_guard()")


def _drop_views_except(con: duckdb.DuckDBPyConnection, keep: set[str]) -> None:
    # a view whose table folder is gone would fail, or (built by an older Spectra with absolute
    # paths) read another root's copy of it
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database()"
                       " AND schema_name = 'main'").fetchall()
    for (name,) in rows:
        if name not in keep:
            con.execute(f"DROP VIEW {sql_identifier(name)}")


def connect_catalog(catalog_path: str | Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the catalog with its views reading the tables beside the file, wherever it now lies;
    read-only by default so notebooks never block the pipeline's writer."""
    path = check_sql_path(catalog_path, "catalog")
    if read_only and not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: materialize the `catalog` asset first (make run)")
    con = duckdb.connect(str(path), read_only=read_only)
    _set_root(con, path.parent)
    if _views_locate_root(con):
        return con
    con.close()
    raise RuntimeError(f"the catalog {path} was built by an older Spectra: its views hold absolute paths and a "
                       f"copied root would read the original's tables. Rebuild it: make run (the catalog asset), or "
                       f"analysis.catalog.refresh_catalog({str(path)!r}, {str(path.parent / 'tables')!r})")


def _views_locate_root(con: duckdb.DuckDBPyConnection) -> bool:
    """True when the catalog has no views or has the macros its views locate their tables with."""
    # fetchall: DuckDB 2.0 keeps the connection busy until a result is read to its end
    [(views,)] = con.execute("SELECT count(*) FROM duckdb_views() WHERE NOT internal AND database_name = "
                             "current_database()").fetchall()
    [(macros,)] = con.execute("SELECT count(*) FROM duckdb_functions() WHERE function_name = 'spectra_glob' AND "
                              "database_name = current_database()").fetchall()
    return views == 0 or macros > 0
