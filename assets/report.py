"""The catalog (DuckDB views over the tables), the suite report (plot + summary table) and the
static HTML feature browser."""


import dagster as dg

from analysis.stages.browser import build_suite_browser
from analysis.stages.lineage import write_lineage_tables
from analysis.stages.published import publish
from analysis.stages.report import write_report, write_seed_spread, write_stability
from analysis.stages.suite import SuiteSpec
from assets._common import data_version, image_markdown, metadata
from resources import CatalogResource, StorageResource
from resources.storage import check_url


def summary_table(rows: list[dict]) -> dg.MetadataValue:
    """The suite's summary as a table the UI shows as one (a Markdown table hides behind a click)."""
    if not rows:
        return dg.MetadataValue.text("(no evaluations)")
    types = {int: "int", float: "float", bool: "bool"}
    columns = [dg.TableColumn(name, next((types[type(r[name])] for r in rows if r[name] is not None
                                          and type(r[name]) in types), "string")) for name in rows[0]]
    records = [dg.TableRecord({k: v if v is None or type(v) in types else str(v) for k, v in r.items()})
               for r in rows]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def report_assets(spec: SuiteSpec) -> list[dg.AssetsDefinition]:
    @dg.asset(name="catalog", group_name="catalog", code_version="2", deps=["evaluations", "features", "toolkit"],
              kinds={"duckdb"}, description="Lineage tables and cross-seed stability, then DuckDB views over "
                                            "every Parquet table under the data root.")
    def catalog(storage: StorageResource, catalog: CatalogResource) -> dg.MaterializeResult:
        root = storage.data_root()
        # tables first, so that the views cover them; lineage comes from the artifacts' own files
        lineage_rows = write_lineage_tables(spec, root)
        n_stability = write_stability(spec, root)
        n_spread = write_seed_spread(spec, root)
        views = catalog.refresh(root)
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(root.catalog)), "views": ", ".join(views),
                      "stability_rows": n_stability, "seed_spread_rows": n_spread,
                      **{f"{table}_rows": n for table, n in lineage_rows.items()}},
            data_version=data_version(spec.store_id, *(m.key for m in spec.members())),
        )

    @dg.asset(name="report", group_name="catalog", code_version="1", deps=["catalog"], kinds={"matplotlib"},
              description="FVU vs L0 plot and the suite's summary table.")
    def report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        summary = write_report(spec, storage.data_root())
        context.log.info("\n" + summary["table"])
        rows = summary.pop("rows")
        return dg.MaterializeResult(
            metadata={"summary": summary_table(rows), **metadata(summary), "fvu_vs_l0": image_markdown(summary["plot"])},
            data_version=data_version(summary["table"]),
        )

    @dg.asset(name="feature_browser", group_name="catalog", code_version="1", deps=["features", "evaluations"],
              kinds={"html"}, description="Static HTML feature browser (reports/browser/index.html, opens from "
                                          "file://): every mined member's features, sortable and filterable, "
                                          "with top images under their patch heatmaps.")
    def feature_browser(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        root = storage.data_root()
        summary = build_suite_browser(spec, root)
        if summary["unmined"]:  # a partial browser is still useful while the suite runs
            context.log.warning(f"no mined features yet for {', '.join(summary['unmined'])}: not in the browser")
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(summary["path"])), "url": dg.MetadataValue.url(summary["url"]),
                      "n_dictionaries": summary["n_dictionaries"], "n_reused": len(summary["reused"]),
                      "unmined": dg.MetadataValue.json(summary["unmined"])},
            data_version=data_version("browser", *summary["dict_ids"]),
        )

    @dg.asset(name="published", group_name="catalog", code_version="1", deps=["catalog", "report", "feature_browser"],
              description="The tables, checkpoints, models and catalog copied to SPECTRA_PUBLISH_URL (object storage; "
                          "changed files only), where `connect_published_catalog` queries them. Without a URL: "
                          "nothing to do.")
    def published(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        if storage.publish_url is None:
            context.log.info("no publish_url (SPECTRA_PUBLISH_URL): nothing published")
            return dg.MaterializeResult(metadata={"url": "", "files": 0}, data_version=data_version("unpublished"))
        check_url(storage.publish_url, "publish_url")
        summary = publish(storage.data_root(), storage.publish_url)
        return dg.MaterializeResult(metadata={"url": dg.MetadataValue.url(summary["url"]), "files": summary["files"],
                                              "bytes": summary["bytes"]},
                                    data_version=data_version(summary["url"], summary["manifest_sha256"]))

    return [catalog, report, feature_browser, published]
