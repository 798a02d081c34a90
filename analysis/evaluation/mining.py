"""Feature mining: the top-activating images of every SAE latent, plus per-latent statistics.

One streaming pass over (image_idx, acts) batches. The state is a running top-n per feature
(activation, image, token, per-token heatmap), merged with each batch's per-image maxima, so
memory is O(width · n_top · T) whatever the dataset size.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm.auto import tqdm

_NO_IMAGE = torch.iinfo(torch.int64).max  # placeholder id; sorts after every real image


class MiningResult(NamedTuple):
    top_images: pa.Table
    """feature int32, rank int16 (0 = strongest), image_idx int64, activation float32, token int32."""
    feature_stats: pa.Table
    """feature int32, fire_count int64, frequency float64 (fraction of tokens),
    mean_activation float64 (over firing tokens; null if never fired), max_activation float32."""
    heatmaps: np.ndarray
    """(width, n_top, T) float16 per-token activations of each top image; zeros in empty slots."""


def _sae_device(sae) -> torch.device:
    try:
        return next(sae.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def mine_features(
    sae,
    image_batches: Iterable[tuple[np.ndarray, Tensor]],
    *,
    n_top: int = 16,
    max_latent_elements: int = 1 << 24,
    progress: bool = False,
) -> MiningResult:
    """Top `n_top` images per feature by max-over-tokens activation (ties: lower image_idx first).

    `image_batches` yields (image_idx (n,), acts (n, T, d)) of RAW activations.
    `max_latent_elements` caps the dense (images, T, width) latent block computed at once.
    """
    if n_top <= 0:
        raise ValueError(f"n_top={n_top} must be > 0")
    width = sae.cfg.width
    device = _sae_device(sae)
    running: _Running | None = None
    for image_idx, acts in tqdm(image_batches, desc="mine features", unit="batch", disable=not progress):
        acts = torch.as_tensor(acts).to(device=device, dtype=torch.float32)
        image_idx = torch.as_tensor(np.asarray(image_idx), dtype=torch.int64, device=device)
        if acts.ndim != 3 or acts.shape[0] != image_idx.shape[0]:
            raise ValueError(
                f"expected acts (n, T, d) with n = len(image_idx) = {image_idx.shape[0]}, got {tuple(acts.shape)}"
            )
        T = acts.shape[1]
        if running is None:
            running = _Running(width, n_top, T, device)
        elif T != running.T:
            raise ValueError(f"token count changed from {running.T} to {T}: mine one hook/store at a time")
        chunk = max(1, max_latent_elements // (T * width))
        for s in range(0, acts.shape[0], chunk):
            a = acts[s : s + chunk]
            running.update(sae.dense_latents(a.reshape(-1, a.shape[-1])).reshape(a.shape[0], T, width),
                           image_idx[s : s + chunk])
    if running is None:
        raise ValueError("mine_features got no batches: pass at least one (image_idx, acts) batch")
    return running.result()


class _Running:
    """Per feature: the running top `n_top` images (value, image, token, per-token heatmap) and
    the firing statistics."""

    def __init__(self, width: int, n_top: int, T: int, device: torch.device):
        self.width, self.n_top, self.T = width, n_top, T
        self.top_vals = torch.full((width, n_top), -torch.inf, device=device)
        self.top_img = torch.full((width, n_top), _NO_IMAGE, dtype=torch.int64, device=device)
        self.top_tok = torch.zeros((width, n_top), dtype=torch.int64, device=device)
        self.heat = torch.zeros((width, n_top, T), dtype=torch.float16, device=device)
        self.fire = torch.zeros(width, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(width, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def update(self, lat: Tensor, ids: Tensor) -> None:
        """Fold in the latents `lat` (c, T, width) of images `ids` (c,)."""
        c, T, width, n_top = lat.shape[0], self.T, self.width, self.n_top
        self.fire += (lat > 0).sum((0, 1))
        self.act_sum += lat.sum((0, 1), dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, lat.amax((0, 1)))
        self.n_tokens += c * T

        vmax, argmax = lat.max(dim=1)  # (c, width)
        cand_vals = torch.cat([self.top_vals, vmax.T], 1)
        cand_img = torch.cat([self.top_img, ids.expand(width, c)], 1)
        cand_tok = torch.cat([self.top_tok, argmax.T], 1)
        # torch.topk does not define an order among equal values; two stable sorts do:
        # by image id, then by activation (descending), so ties keep the lower image first.
        by_img = cand_img.argsort(stable=True, dim=1)
        by_val = cand_vals.gather(1, by_img).argsort(stable=True, dim=1, descending=True)
        sel = by_img.gather(1, by_val)[:, :n_top]  # (width, n_top) positions in the candidates
        from_running = sel < n_top
        idx_t = sel.unsqueeze(-1).expand(-1, -1, T)
        old = self.heat.gather(1, idx_t.clamp(max=n_top - 1))
        new = lat.permute(2, 0, 1).gather(1, (idx_t - n_top).clamp(min=0)).to(torch.float16)
        self.heat = torch.where(from_running.unsqueeze(-1), old, new)
        self.top_vals, self.top_img = cand_vals.gather(1, sel), cand_img.gather(1, sel)
        self.top_tok = cand_tok.gather(1, sel)

    def result(self) -> MiningResult:
        top_vals, top_img, top_tok, heat, width = self.top_vals, self.top_img, self.top_tok, self.heat, self.width
        filled = top_vals > 0  # features that never fire (or fire on few images) keep empty slots
        heat[~filled] = 0
        feat, rank = filled.nonzero(as_tuple=True)
        top_images = pa.table({
            "feature": pa.array(feat.cpu().numpy().astype(np.int32)),
            "rank": pa.array(rank.cpu().numpy().astype(np.int16)),
            "image_idx": pa.array(top_img[feat, rank].cpu().numpy()),
            "activation": pa.array(top_vals[feat, rank].cpu().numpy().astype(np.float32)),
            "token": pa.array(top_tok[feat, rank].cpu().numpy().astype(np.int32)),
        })
        fire_np = self.fire.cpu().numpy()
        mean_act = np.divide(self.act_sum.cpu().numpy(), fire_np, out=np.zeros(width), where=fire_np > 0)
        feature_stats = pa.table({
            "feature": pa.array(np.arange(width, dtype=np.int32)),
            "fire_count": pa.array(fire_np.astype(np.int64)),
            "frequency": pa.array(fire_np / self.n_tokens),
            "mean_activation": pa.array(mean_act, mask=fire_np == 0),
            "max_activation": pa.array(self.act_max.cpu().numpy()),
        })
        return MiningResult(top_images, feature_stats, heat.cpu().numpy())
