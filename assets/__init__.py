"""Thin Dagster assets: each pulls its resources, calls one analysis stage, returns metadata."""


import dagster as dg

from analysis.stages.suite import SuiteSpec
from assets.activations import activation_assets, activation_checks
from assets.arrivals import arrival_assets
from assets.dictionaries import dictionary_assets
from assets.images import images_asset
from assets.model import model_asset
from assets.report import report_assets
from assets.toolkit import toolkit_asset
from assets.verify import verification_checks


def build_assets(spec: SuiteSpec) -> list[dg.AssetsDefinition]:
    return [images_asset(spec), model_asset(spec), *activation_assets(spec), *arrival_assets(spec),
            *dictionary_assets(spec), toolkit_asset(spec), *report_assets(spec)]


def build_asset_checks(spec: SuiteSpec) -> list[dg.AssetChecksDefinition]:
    return [*activation_checks(spec), *verification_checks(spec)]
