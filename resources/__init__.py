from resources.catalog import CatalogResource
from resources.compute import ComputeResource
from resources.storage import StorageResource
from resources.tracker import TrackerResource

__all__ = ["CatalogResource", "ComputeResource", "StorageResource", "TrackerResource"]
