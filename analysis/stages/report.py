"""Stage 7: the catalog views, the FVU-vs-L0 plot and the summary table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from analysis.catalog import connect_catalog, read_table, typed_table, write_table_partition
from analysis.paths import DataRoot
from analysis.evaluation.plots import plot_fvu_vs_l0
from analysis.evaluation.stability import suite_stability
from analysis.stages.dictionaries import MEMBER_NULL_TYPES, dictionary_id, load_member
from analysis.stages.suite import SuiteSpec

SUMMARY_COLUMNS = ("kind", "hook", "out_hook", "architecture", "k", "sparsity_coef", "width", "l0", "fvu", "fvu_cls", "dead_fraction", "dense_fraction",
                   "ce_clean", "ce_spliced", "ce_ablated", "loss_recovered", "ablation_gap",
                   "acc_clean", "acc_spliced")


def suite_evaluations(spec: SuiteSpec, root: DataRoot) -> pa.Table:
    """This suite's evaluation rows, through the catalog (the same SQL a researcher runs).

    Rows are found by the members' dictionary ids, not by the `suite` column: a member is content
    addressed, so a suite whose members were first evaluated under another suite's name (same
    dataset, model and grid, another file) reuses those rows as its own."""
    ids = list(member_dict_ids(spec).values())
    con = connect_catalog(root.catalog)
    try:
        if not _has_view(con, "evaluations"):  # no member was ever evaluated under this root
            return pa.table({"dict_id": pa.array([], pa.string())})
        return con.sql(
            "SELECT * FROM evaluations WHERE list_contains($ids, dict_id) "
            "ORDER BY kind, hook, architecture, k, sparsity_coef, expansion, seed",
            params={"ids": ids},
        ).to_arrow_table()
    finally:
        con.close()


def member_dict_ids(spec: SuiteSpec) -> dict[str, str]:
    """member key -> dictionary id, for every member of the suite."""
    return {m.key: dictionary_id(spec, m) for m in spec.members()}


def missing_members(spec: SuiteSpec, evals: pa.Table) -> list[str]:
    """Keys of the suite's members with no row in `evals` (a suite_evaluations result)."""
    have = set(evals.column("dict_id").to_pylist())
    return [key for key, dict_id in member_dict_ids(spec).items() if dict_id not in have]


def _has_view(con, name: str) -> bool:
    # fetchall: DuckDB 2 keeps the connection busy until a result is read to its end
    [(n,)] = con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND NOT internal",
                         [name]).fetchall()
    return n > 0


def write_stability(spec: SuiteSpec, root: DataRoot) -> int:
    """Mean Hungarian-matched decoder cosine across seeds, per member that differs only by seed.

    Written as the `stability` table (one partition per suite); returns its row count (0 when the
    suite has a single seed: stability needs at least two).
    """
    groups: dict = {}
    for m in spec.members():
        groups.setdefault(dataclasses.replace(m, seed=0), []).append(m)  # the member up to its seed
    rows = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        dict_ids = [dictionary_id(spec, m) for m in members]
        dictionaries = [load_member(spec, root, m, dict_id=i) for m, i in zip(members, dict_ids)]
        rows.append({"suite": spec.name, "store_id": spec.store_id, "kind": key.kind, "hook": key.hook,
                     "out_hook": getattr(key, "out_hook", None), "architecture": key.architecture,
                     "expansion": key.expansion, "k": key.k, "sparsity_coef": key.sparsity_coef,
                     "n_seeds": len(members), "mean_matched_cosine": suite_stability(dictionaries),
                     "dict_ids": dict_ids})
    # written even when empty, so the view (and the README's query) exists for one-seed suites
    _write_suite_rows(root, "stability", spec,
                      typed_table(rows, MEMBER_NULL_TYPES) if rows else STABILITY_SCHEMA.empty_table())
    return len(rows)


def _write_suite_rows(root: DataRoot, table: str, spec: SuiteSpec, rows: pa.Table) -> None:
    """The suite's rows of a per-suite table, one file per suite in the store's partition: suites
    sharing a store (the frontiers suite reads the default's) keep each other's rows."""
    write_table_partition(root.table(table), {"store_id": spec.store_id}, rows, file_name=f"{spec.name}.parquet")
    # earlier versions wrote one part.parquet per store, holding whichever suite ran last
    (root.table(table) / f"store_id={spec.store_id}" / "part.parquet").unlink(missing_ok=True)


_GROUP_FIELDS = [("suite", pa.string()), ("kind", pa.string()), ("hook", pa.string()), ("out_hook", pa.string()),
                 ("architecture", pa.string()), ("expansion", pa.int64()), ("k", pa.int64()),
                 ("sparsity_coef", pa.float64())]
STABILITY_SCHEMA = pa.schema([*_GROUP_FIELDS, ("n_seeds", pa.int64()), ("mean_matched_cosine", pa.float64()),
                              ("dict_ids", pa.list_(pa.string()))])
SEED_SPREAD_SCHEMA = pa.schema([*_GROUP_FIELDS, ("metric", pa.string()), ("n_seeds", pa.int64()),
                                *((name, pa.float64()) for name in ("mean", "std", "min", "max")),
                                ("dict_ids", pa.list_(pa.string()))])
SPREAD_METRICS = ("fvu", "fvu_cls", "l0", "dead_fraction", "loss_recovered", "ablation_gap")


def write_seed_spread(spec: SuiteSpec, root: DataRoot) -> int:
    """Mean, standard deviation (over seeds, n - 1), min and max of the headline metrics, per
    member that differs only by seed: the `seed_spread` table (long: one row per metric), so a
    number is read with its spread rather than as one lucky run. Returns its row count."""
    groups: dict = {}
    for m in spec.members():
        groups.setdefault(dataclasses.replace(m, seed=0), []).append(dictionary_id(spec, m))
    evaluations = root.table("evaluations")
    by_id = {r["dict_id"]: r for r in read_table(evaluations).to_pylist()} if evaluations.exists() else {}
    rows = []
    for key, dict_ids in groups.items():
        found = [by_id[i] for i in dict_ids if i in by_id]
        if len(found) < 2:
            continue
        for metric in SPREAD_METRICS:
            values = np.array([r[metric] for r in found if r.get(metric) is not None], dtype=np.float64)
            if len(values) < 2:
                continue
            rows.append({"suite": spec.name, "kind": key.kind, "hook": key.hook,
                         "out_hook": getattr(key, "out_hook", None), "architecture": key.architecture,
                         "expansion": key.expansion, "k": key.k, "sparsity_coef": key.sparsity_coef,
                         "metric": metric, "n_seeds": len(values), "mean": float(values.mean()),
                         "std": float(values.std(ddof=1)), "min": float(values.min()), "max": float(values.max()),
                         "dict_ids": [r["dict_id"] for r in found]})
    _write_suite_rows(root, "seed_spread", spec,
                      typed_table(rows, MEMBER_NULL_TYPES) if rows else SEED_SPREAD_SCHEMA.empty_table())
    return len(rows)


def write_report(spec: SuiteSpec, root: DataRoot) -> dict:
    """The plot and summary of the members evaluated so far; `missing_members` names the others
    (a report of part of a suite is useful while it runs; `pipelines.run` fails on a gap at its end)."""
    evals = suite_evaluations(spec, root)
    plot = plot_fvu_vs_l0(evals, root.reports / f"{spec.name}_fvu_vs_l0.png")
    return {"plot": str(plot), "n_dictionaries": evals.num_rows, "table": format_summary(evals),
            "missing_members": missing_members(spec, evals), "rows": summary_rows(evals)}


def summary_rows(evals: pa.Table) -> list[dict]:
    """The summary table's rows: the SUMMARY_COLUMNS of every evaluation."""
    return evals.select([c for c in SUMMARY_COLUMNS if c in evals.column_names]).to_pylist()


def format_summary(evals: pa.Table) -> str:
    """A fixed-width text table of the suite's headline metrics."""
    rows = summary_rows(evals)
    if not rows:
        return "(no evaluations)"
    cells = [[_fmt(v) for v in r.values()] for r in rows]
    header = list(rows[0].keys())
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
