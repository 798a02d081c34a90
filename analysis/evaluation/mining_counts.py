"""Per-feature counters of the images a feature fires on, kept by the streaming mining pass
(`analysis.evaluation.mining`): its activation histogram, and how the values of a per-image
attribute (the label, or a latent factor of generated data) fall among those images. Each adds
(image, feature) firing pairs, O(pairs) per batch, in O(width x bins) memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

HISTOGRAM_LOG2 = (-12.0, 12.0, 0.5)
"""(first edge, last edge, bin width) in log2 units of the per-feature activation histogram:
48 bins from 2^-12 (2.4e-4) to 2^12 (4096), so one fixed set of edges holds any model's scale;
values outside fall into the first or last bin. Fixed edges let a streaming pass count without
knowing a feature's range first, and make histograms of two dictionaries comparable."""
HISTOGRAM_BINS = round((HISTOGRAM_LOG2[1] - HISTOGRAM_LOG2[0]) / HISTOGRAM_LOG2[2])

MAX_FACTOR_VALUES = 4096
"""More distinct values than this make a factor's counts (width x values) too large to keep: a
continuous column is not a factor; bin it first."""


def histogram_edges() -> np.ndarray:
    """The activation values at the edges of the HISTOGRAM_LOG2 bins (HISTOGRAM_BINS + 1)."""
    lo, hi, step = HISTOGRAM_LOG2
    return 2.0 ** np.arange(lo, hi + step / 2, step)


class ActivationHistogram:
    """Per feature, the max activation of each image it fires on, counted in the HISTOGRAM_LOG2 bins."""

    def __init__(self, width: int, device: torch.device):
        self.counts = torch.zeros((width, HISTOGRAM_BINS), dtype=torch.int64, device=device)

    def count(self, values: Tensor, feature: Tensor) -> None:
        """Add the positive `values` of firing pairs to their `feature`'s bins."""
        lo, _, step = HISTOGRAM_LOG2
        bins = ((values.float().log2() - lo) / step).floor().clamp_(0, HISTOGRAM_BINS - 1).long()
        flat = feature * HISTOGRAM_BINS + bins
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def column(self) -> pa.Array:
        """The counts as a list<int32> column, one list per feature."""
        width, n = self.counts.shape
        offsets = pa.array(np.arange(0, (width + 1) * n, n, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(self.counts.cpu().numpy().astype(np.int32).reshape(-1)))


def label_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..k-1 per image and the k label values, sorted; -1 for an image without one."""
    labels = np.asarray(labels)
    valid = ~is_null(labels)
    values, inverse = np.unique(labels[valid], return_inverse=True)
    codes = np.full(len(labels), -1, dtype=np.int64)
    codes[valid] = inverse
    return codes, values


def is_null(labels: np.ndarray) -> np.ndarray:
    """None, NaN, and negative integers (ingestion writes -1 for an image without a label)."""
    if labels.dtype.kind == "f":
        return np.isnan(labels)
    if labels.dtype.kind == "i":
        return labels < 0
    if labels.dtype.kind == "O":
        return np.array([v is None for v in labels], dtype=bool)
    return np.zeros(len(labels), dtype=bool)


class Attribute:
    """Per feature, how many of the images it fires on carry each value of one per-image attribute;
    `factor` names a latent factor (refused past MAX_FACTOR_VALUES values), None the label."""

    def __init__(self, values_by_image: np.ndarray, width: int, device: torch.device, factor: str | None = None):
        codes, self.values = label_codes(values_by_image)
        if factor is not None and len(self.values) > MAX_FACTOR_VALUES:
            raise ValueError(f"factor {factor!r} has {len(self.values)} distinct values, more than "
                             f"MAX_FACTOR_VALUES={MAX_FACTOR_VALUES}: a factor is categorical; bin a continuous "
                             "column first")
        self.codes = torch.as_tensor(codes, device=device)
        self.counts = torch.zeros((width, max(len(self.values), 1)), dtype=torch.int64, device=device)

    def count(self, image_ids: Tensor, feature: Tensor) -> None:
        """Add each (feature, value of an image it fires on) pair; `image_ids` are dataset indices."""
        code = self.codes[image_ids]
        keep = code >= 0
        flat = feature[keep] * self.counts.shape[1] + code[keep]
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def distribution(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per feature: the most common value's index (ties: the first in sorted order), its share,
        the entropy in bits of the values, and whether the feature fired on no valued image."""
        # Over the nonzero counts only: a feature fires on few images, so (width x values) is mostly
        # zeros, and float64 arithmetic over all of it cost more than the rest of mining's result.
        counts = self.counts
        total = counts.sum(1)
        feature, value = counts.nonzero(as_tuple=True)
        p = counts[feature, value].double() / total[feature]
        entropy = torch.zeros(len(counts), dtype=torch.float64, device=counts.device)
        entropy.index_add_(0, feature, -(p * p.log2()))
        top_count, top = counts.max(1)  # the first of equal maxima
        none = total == 0
        share = top_count.double() / total.clamp_min(1)  # + 0.0 below: no -0.0 entropy for one value
        return top.cpu().numpy(), share.cpu().numpy(), entropy.cpu().numpy() + 0.0, none.cpu().numpy()


FACTOR_SCHEMA = pa.schema([("feature", pa.int32()), ("factor", pa.string()), ("top_value", pa.string()),
                           ("top_share", pa.float64()), ("entropy", pa.float64()), ("n_images", pa.int64())])
"""One row per (feature, factor) where the feature fired on an image with a value of it: the
commonest value (as text), its share, the entropy of the values (bits) and the image count."""


def factor_table(factors: dict[str, Attribute]) -> pa.Table:
    """FACTOR_SCHEMA rows of every factor, by feature then factor (no rows without factors)."""
    parts = [FACTOR_SCHEMA.empty_table()]
    for name, attribute in factors.items():
        top, share, entropy, none = attribute.distribution()
        fired = np.flatnonzero(~none)
        parts.append(pa.table({
            "feature": pa.array(fired.astype(np.int32)), "factor": pa.array([name] * len(fired), pa.string()),
            "top_value": pa.array([str(v) for v in attribute.values[top[fired]]], pa.string()),
            "top_share": pa.array(share[fired]), "entropy": pa.array(entropy[fired]),
            "n_images": pa.array(attribute.counts.sum(1).cpu().numpy()[fired])}, schema=FACTOR_SCHEMA))
    return pa.concat_tables(parts).sort_by([("feature", "ascending"), ("factor", "ascending")])
