"""Where every artifact lives under one data root (DESIGN.md §2). Pure path arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataRoot:
    root: Path
    """Local directory every artifact lives under (activation stores too, unless redirected)."""
    activations_url: str | None = None
    """Where activation stores live instead of <root>/activations: an fsspec URL such as
    s3://bucket/spectra/activations (s3fs installed) or memory://… (tests), or a local path."""

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        url = self.activations_url
        if url is not None:
            if not isinstance(url, str) or not url.strip():
                raise ValueError(
                    f"DataRoot.activations_url={url!r}: expected a URL such as "
                    "'s3://bucket/activations' or a local path, or None for <root>/activations"
                )
            if "://" not in url:  # a local path: normalize like root
                object.__setattr__(self, "activations_url", str(Path(url).expanduser().resolve()))

    def images(self, dataset_id: str) -> Path:
        return self.root / "images" / dataset_id

    def model(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def store(self, store_id: str) -> Path | str:
        """A store id's folder: a Path, or a str URL when activations_url is one."""
        url = self.activations_url
        if url is None:
            return self.root / "activations" / store_id
        if "://" in url:
            return f"{url.rstrip('/')}/{store_id}"
        return Path(url) / store_id

    def hook_store(self, store_id: str, hook: str) -> Path | str:
        """One hook's store: the only place that computes it (Path locally, str for a URL)."""
        store = self.store(store_id)
        name = f"{hook}.zarr"
        return f"{store}/{name}" if isinstance(store, str) else store / name

    def dictionary(self, dict_id: str) -> Path:
        return self.root / "dictionaries" / dict_id

    def table(self, name: str) -> Path:
        return self.root / "tables" / name

    def lock(self, artifact_id: str) -> Path:
        """The lock file one process holds while it writes `artifact_id` (a content id, or an id
        and a part): local to this machine, like the data root."""
        return self.root / ".locks" / f"{artifact_id}.lock"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
