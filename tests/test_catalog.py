import duckdb
import pyarrow as pa
import pytest

from analysis.catalog import connect_catalog, read_table, refresh_catalog, write_table_partition


def test_partitions_replace_views_query_and_reader_is_read_only(tmp_path):
    tables = tmp_path / "tables"
    write_table_partition(tables / "evaluations", {"dict_id": "a"}, pa.table({"fvu": [0.5]}))
    write_table_partition(tables / "evaluations", {"dict_id": "b"}, pa.table({"fvu": [0.2]}))
    write_table_partition(tables / "evaluations", {"dict_id": "a"}, pa.table({"fvu": [0.1]}))  # rerun replaces
    write_table_partition(tables / "images", {}, pa.table({"image_idx": [0, 1, 2]}))
    (tables / "empty").mkdir()
    assert refresh_catalog(tmp_path / "c.duckdb", tables) == ["evaluations", "images"]
    con = connect_catalog(tmp_path / "c.duckdb")
    assert con.sql("SELECT dict_id, fvu FROM evaluations ORDER BY dict_id").fetchall() == [("a", 0.1), ("b", 0.2)]
    assert con.execute("SELECT count(*) FROM images").fetchone() == (3,)
    with pytest.raises(duckdb.Error):
        con.execute("CREATE TABLE t (x INT)")
    con.close()
    assert sorted(read_table(tables / "evaluations").column("dict_id").to_pylist()) == ["a", "b"]


def test_missing_catalog_error_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make run"):
        connect_catalog(tmp_path / "nope.duckdb")


def test_partition_value_with_slash_is_refused(tmp_path):
    with pytest.raises(ValueError, match="may not contain"):
        write_table_partition(tmp_path, {"dict_id": "a/b"}, pa.table({"x": [1]}))
