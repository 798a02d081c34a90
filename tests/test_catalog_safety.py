"""The catalog against hostile paths and names, and a copied data root: real DuckDB, real files."""

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from analysis.catalog import check_sql_path, connect_catalog, read_table, refresh_catalog, write_table_partition
from resources.storage import StorageResource

# quotes, a statement terminator with an injection, a comment, spaces, unicode, glob wildcards and
# a percent escape: each has broken or misdirected string-formatted SQL
HOSTILE = "root it's \"q\"; DROP TABLE x; -- ü [1]*%20"
TABLE = "ev\"al's; DROP VIEW x --"


def _table(root, value, dict_id="a"):
    write_table_partition(root / "tables" / TABLE, {"dict_id": dict_id}, pa.table({"fvu": [value]}))


def _read(catalog):
    con = connect_catalog(catalog)
    try:
        return con.execute('SELECT dict_id, fvu FROM "ev""al\'s; DROP VIEW x --" ORDER BY dict_id').fetchall()
    finally:
        con.close()


def test_hostile_root_table_and_partition_names_round_trip(tmp_path):
    root = tmp_path / HOSTILE
    _table(root, 0.5, dict_id="it's; DROP TABLE y; -- ü")
    _table(root, 0.25, dict_id="0123")  # an id of digits stays text (no hive type autocast)
    # a sibling the unescaped wildcards '[1]' and '*' would also match
    decoy = tmp_path / "root it's \"q\"; DROP TABLE x; -- ü 1XX%20"
    _table(decoy, 99.0, dict_id="decoy")
    assert refresh_catalog(root / "catalog.duckdb", root / "tables") == [TABLE]
    assert _read(root / "catalog.duckdb") == [("0123", 0.25), ("it's; DROP TABLE y; -- ü", 0.5)]
    assert sorted(read_table(root / "tables" / TABLE).column("dict_id").to_pylist()) == ["0123", "it's; DROP TABLE y; -- ü"]
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)  # the plain connection works in place
    assert con.execute('SELECT count(*) FROM "ev""al\'s; DROP VIEW x --"').fetchall() == [(2,)]
    con.close()


def test_copied_root_reads_its_own_tables_and_a_plain_connection_to_it_refuses(tmp_path):
    a, b = tmp_path / "A it's", tmp_path / "B \"copy\""
    _table(a, 0.5)
    refresh_catalog(a / "catalog.duckdb", a / "tables")
    shutil.copytree(a, b)
    _table(a, 0.9)  # the original moves on
    assert _read(b / "catalog.duckdb") == [("a", 0.5)]
    assert _read(a / "catalog.duckdb") == [("a", 0.9)]
    con = duckdb.connect(str(b / "catalog.duckdb"), read_only=True)
    with pytest.raises(duckdb.Error) as err:
        con.execute('SELECT * FROM "ev""al\'s; DROP VIEW x --"').fetchall()
    con.close()
    message = str(err.value)
    assert str(b / "catalog.duckdb") in message and str(a / "catalog.duckdb") in message
    assert "connect_catalog" in message
    shutil.rmtree(a)  # the original gone: the copy still reads its own
    assert _read(b / "catalog.duckdb") == [("a", 0.5)]


def test_refresh_drops_views_whose_table_is_gone(tmp_path):
    _table(tmp_path, 0.5)
    write_table_partition(tmp_path / "tables" / "images", {}, pa.table({"image_idx": [0]}))
    refresh_catalog(tmp_path / "catalog.duckdb", tmp_path / "tables")
    shutil.rmtree(tmp_path / "tables" / "images")
    assert refresh_catalog(tmp_path / "catalog.duckdb", tmp_path / "tables") == [TABLE]
    con = connect_catalog(tmp_path / "catalog.duckdb")
    assert [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()] == [TABLE]
    con.close()


def test_catalog_with_absolute_path_views_is_refused_with_the_rebuild(tmp_path):
    """A catalog from before the views located their root: a copy of it would read the original."""
    _table(tmp_path, 0.5)
    con = duckdb.connect(str(tmp_path / "catalog.duckdb"))
    pattern = str(tmp_path / "tables" / TABLE / "*" / "*.parquet").replace("'", "''")
    con.execute(f"CREATE VIEW old AS SELECT * FROM read_parquet('{pattern}')")
    con.close()
    with pytest.raises(RuntimeError, match="older Spectra.*refresh_catalog"):
        connect_catalog(tmp_path / "catalog.duckdb")
    refresh_catalog(tmp_path / "catalog.duckdb", tmp_path / "tables")  # the fix the message names
    assert _read(tmp_path / "catalog.duckdb") == [("a", 0.5)]


@pytest.mark.parametrize("name", ["back\\slash", "what?"])
def test_paths_duckdb_cannot_address_are_refused_up_front(tmp_path, name):
    with pytest.raises(ValueError, match="choose a path without it"):
        check_sql_path(tmp_path / name)
    with pytest.raises(ValueError, match="choose a path without it"):
        refresh_catalog(tmp_path / name / "catalog.duckdb", tmp_path / name / "tables")


@pytest.mark.parametrize("value", ["a%20b", "back\\slash", "a/b", "a=b"])
def test_partition_values_hive_cannot_hold_are_refused(tmp_path, value):
    with pytest.raises(ValueError, match="may not contain"):
        write_table_partition(tmp_path, {"dict_id": value}, pa.table({"x": [1]}))


def test_tables_outside_the_catalogs_folder_are_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="not inside the catalog's folder"):
        refresh_catalog(tmp_path / "root" / "catalog.duckdb", tmp_path / "elsewhere")


def test_cli_and_storage_refuse_such_a_root_before_writing_anything(tmp_path):
    root = tmp_path / "what?"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--root", str(root)], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "choose a path without it" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="choose a path without it"):
        StorageResource(root=str(root)).data_root()
    assert not root.exists()
