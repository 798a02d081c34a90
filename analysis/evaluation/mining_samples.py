"""Per-feature running selections for mining's one streaming pass, each O(width · n) memory:

- `RunningTop`: the top n images by one value per image (mining keeps one by the max over
  tokens, whose heatmaps it moves along, and one by the class token's activation), ties to the
  lower image index;
- `Reservoir`: a uniform sample of the images a feature fires on, with their activation: a
  bottom-n by a hash of (image, feature), so the sample is the same in any batch order and on any
  machine. Ranked by activation it gives examples from every part of the distribution, not only
  the top (each sample's `quantile` is its rank among the feature's samples, in [0, 1]).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

_NO_IMAGE = torch.iinfo(torch.int64).max  # placeholder id; sorts after every real image
_NO_KEY = torch.iinfo(torch.int64).max  # an empty reservoir slot: any real key is smaller


def _changing_rows(changes: Tensor) -> Tensor | slice | None:
    """The rows (features) flagged in `changes` (width,): None when none, every row as a slice when
    most are (plain views beat gathering and scattering nearly all of them)."""
    rows = changes.nonzero().squeeze(1)
    if not len(rows):
        return None
    return slice(None) if 2 * len(rows) > len(changes) else rows


_MAX_IMAGE = (1 << 32) - 1  # image ids RunningTop can order: the low 32 bits of a rank key


def _rank_keys(vals: Tensor, img: Tensor) -> Tensor:
    """Distinct int64 keys whose descending order is (value descending, image ascending) over the
    positive float32 `vals` (their images below _MAX_IMAGE), then the other entries in column
    order, so those never displace a kept one. A positive float32's bits, read as an integer, order
    like the float: one topk over the keys replaces two stable sorts (by image, then by value),
    which cost more than twice as much. (torch.topk alone leaves equal values in no set order.)"""
    rank = (vals.view(torch.int32).to(torch.int64) << 32) | (_MAX_IMAGE - img)  # garbage where not positive
    return torch.where(vals > 0, rank, -1 - torch.arange(vals.shape[1], device=vals.device))


class RunningTop:
    """Per feature, the `n` images with the largest positive value (ties: the lower image index)."""

    def __init__(self, width: int, n: int, device: torch.device):
        self.n = n
        self.vals = torch.full((width, n), -torch.inf, device=device)
        self.img = torch.full((width, n), _NO_IMAGE, dtype=torch.int64, device=device)

    def update(self, values: Tensor, ids: Tensor) -> tuple[Tensor | slice, Tensor] | None:
        """Fold in `values` (c, width) of images `ids` (c,). Returns the features whose top changed
        (indices, or every one as a slice) and their merged tops: `sel` (rows, n), positions among
        the n running entries then the c new images; None when no top changed."""
        if len(ids) and int(ids.max()) >= _MAX_IMAGE:
            raise ValueError(f"image id {int(ids.max())} is past the {_MAX_IMAGE} that mining's tops can order")
        new = values.T  # (width, c)
        # Only features where some image fires at least as high as the n-th entry can change; once
        # the tops fill up that is a few, so the ranking skips the rest. An image that does not fire
        # never enters: empty slots keep -inf and are dropped at the end.
        rows = _changing_rows(((new > 0) & (new >= self.vals[:, -1:])).any(1))
        if rows is None:
            return None
        vals = torch.cat([self.vals[rows], new[rows]], 1)
        img = torch.cat([self.img[rows], ids.expand(len(vals), -1)], 1)
        sel = _rank_keys(vals, img).topk(self.n, dim=1).indices
        self.vals[rows], self.img[rows] = vals.gather(1, sel), img.gather(1, sel)
        return rows, sel

    def merge(self, other: "RunningTop") -> Tensor:
        """Fold in another top of other images; returns `sel` (width, n): positions among this
        top's n entries then the other's n."""
        vals, img = torch.cat([self.vals, other.vals], 1), torch.cat([self.img, other.img], 1)
        sel = _rank_keys(vals, img).topk(self.n, dim=1).indices
        self.vals, self.img = vals.gather(1, sel), img.gather(1, sel)
        return sel

    def table(self, **columns: tuple[Tensor, type]) -> pa.Table:
        """feature int32, rank int16 (0 = strongest), image_idx int64, activation float32, then
        each of `columns`: name=(a (width, n) tensor in rank order, its numpy dtype)."""
        filled = self.vals > 0
        feature, rank = filled.nonzero(as_tuple=True)
        picked = {"image_idx": (self.img, np.int64), "activation": (self.vals, np.float32), **columns}
        return pa.table({
            "feature": pa.array(feature.cpu().numpy().astype(np.int32)),
            "rank": pa.array(rank.cpu().numpy().astype(np.int16)),
            **{name: pa.array(values[feature, rank].cpu().numpy().astype(dtype))
               for name, (values, dtype) in picked.items()},
        })


def sample_keys(ids: Tensor, width: int) -> Tensor:
    """(c, width) int64 pseudo-random keys of each (image, feature): a splitmix64-style mix (int64
    arithmetic wraps), the same for an image whatever batch or device it comes in."""
    x = ids.view(-1, 1) * -7046029254386353131 + torch.arange(width, device=ids.device) * -4658895280553007687
    x = x ^ (x >> 31)
    x = x * -7723592293110705685
    return x ^ (x >> 29)


class Reservoir:
    """Per feature, a uniform sample of up to `n` of the images it fires on (value > 0)."""

    def __init__(self, width: int, n: int, device: torch.device):
        self.n, self.width = n, width
        self.keys = torch.full((width, n), _NO_KEY, dtype=torch.int64, device=device)
        self.img = torch.zeros((width, n), dtype=torch.int64, device=device)
        self.vals = torch.zeros((width, n), device=device)

    def update(self, values: Tensor, ids: Tensor) -> None:
        """`values` (c, width) of images `ids` (c,)."""
        keys = torch.where(values > 0, sample_keys(ids, self.width), _NO_KEY).T  # (width, c)
        rows = _changing_rows((keys < self.keys.amax(1, keepdim=True)).any(1))
        if rows is None:
            return
        cand_keys = torch.cat([self.keys[rows], keys[rows]], 1)
        cand_img = torch.cat([self.img[rows], ids.expand(len(cand_keys), -1)], 1)
        cand_vals = torch.cat([self.vals[rows], values.T[rows].float()], 1)
        sel = cand_keys.topk(self.n, dim=1, largest=False).indices
        self.keys[rows], self.img[rows], self.vals[rows] = (cand_keys.gather(1, sel), cand_img.gather(1, sel),
                                                            cand_vals.gather(1, sel))

    def merge(self, other: "Reservoir") -> None:
        """Fold in the sample of other images: the n smallest keys of both, as one pass would keep."""
        keys, img = torch.cat([self.keys, other.keys], 1), torch.cat([self.img, other.img], 1)
        vals = torch.cat([self.vals, other.vals], 1)
        sel = keys.topk(self.n, dim=1, largest=False).indices
        self.keys, self.img, self.vals = keys.gather(1, sel), img.gather(1, sel), vals.gather(1, sel)

    def table(self) -> pa.Table:
        """feature int32, image_idx int64, activation float32, quantile float32 (the sample's rank
        by activation among its feature's samples, 0 = weakest, 1 = strongest), ordered by
        feature then activation."""
        filled = self.keys < _NO_KEY
        order = torch.where(filled, self.vals, torch.inf).argsort(dim=1, stable=True)  # empty slots last
        vals, img, filled = self.vals.gather(1, order), self.img.gather(1, order), filled.gather(1, order)
        count = filled.sum(1, keepdim=True)
        rank = torch.arange(self.n, device=vals.device).expand_as(vals)
        quantile = rank / (count - 1).clamp_min(1)
        feature, slot = filled.nonzero(as_tuple=True)
        return pa.table({
            "feature": pa.array(feature.cpu().numpy().astype(np.int32)),
            "image_idx": pa.array(img[feature, slot].cpu().numpy()),
            "activation": pa.array(vals[feature, slot].cpu().numpy().astype(np.float32)),
            "quantile": pa.array(quantile[feature, slot].cpu().numpy().astype(np.float32)),
        })
