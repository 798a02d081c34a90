"""The full verification of the suite's artifacts, as an asset check on the catalog."""


import dagster as dg

from analysis.stages.verify import verify_suite
from analysis.stages.suite import SuiteSpec
from resources import StorageResource


def verification_checks(spec: SuiteSpec) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset="catalog", description=(
        "Rereads every file a done-marker vouches for (dataset, model, activation shards, dictionaries, "
        "tables) against the checksum written with it. On failure: `python -m pipelines.verify --repair`, "
        "then rerun, redoes exactly the damaged artifacts."))
    def artifacts_match_their_checksums(storage: StorageResource) -> dg.AssetCheckResult:
        damage = verify_suite(spec, storage.data_root(), full=True)
        return dg.AssetCheckResult(passed=not damage, metadata={
            "damaged": len(damage), "details": dg.MetadataValue.md("\n".join(f"- {d}" for d in damage[:50]) or "none")})

    return [artifacts_match_their_checksums]
